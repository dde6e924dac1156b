"""How NatsBus authenticates and encrypts: credentials, TLS, and a first connection that fails fast.

:class:`NatsConnectOptions` holds what NATS users use besides the URL: a user and password
or a token (also accepted as the URL's userinfo, ``nats://user:pass@host`` or
``nats://token@host``, percent-encoded), an nkey seed file, a decentralized-JWT ``.creds``
file, and TLS (a CA, a client certificate and key, the server name to verify).
:meth:`NatsConnectOptions.check` reads every file once so a bad setting is reported before
connecting, as :class:`ConnectOptionError` naming the field.

Choices (after reading nats-py 2.16):

* The ``.creds`` file is read on every (re)connect by callbacks of our own, bounded in size:
  nats-py's own reader loops forever on a file without a JWT, and a rotated file (a
  Kubernetes Secret) is picked up on the next reconnect.
* nats-py upgrades to TLS only when the server's INFO says ``tls_required``, even for a
  ``tls://`` URL: it would send credentials in clear to a server (or a man in the middle)
  that does not offer TLS. With a ``tls://`` URL or any TLS setting the client refuses such a server
  (overriding nats-py's private ``_process_info``; ``tests/unit/test_nats_connect.py`` checks its signature).
* nats-py retries a refused first connection forever (a pod keeps trying until NATS is up);
  :func:`connect_first` stops at the first *refusal* — wrong credentials, a certificate that
  does not verify — with one line saying so, since retrying cannot fix it. The line names the
  settings by their environment variables (``NATS_CREDS``, ``NATS_TLS_CA`` ...), which is how
  the CLI and pods take them (:mod:`aiwfe.kernel.tools.connect`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import msgspec
import nats.errors

from ._client import FastClient
from .errors import NotConnected

__all__ = ["ConnectOptionError", "NatsConnectOptions", "connect_first", "redact_url"]

_MAX_FILE = 64 * 1024  # a creds file is ~1 KB; nothing legitimate comes near this
_CREDS_RE = re.compile(
    rb"-{3,}BEGIN NATS USER JWT-{3,}\s*(?P<jwt>[A-Za-z0-9_\-.=]+)\s*-{3,}END NATS USER JWT-{3,}"
    rb".*?-{3,}BEGIN USER NKEY SEED-{3,}\s*(?P<seed>SU[A-Z2-7]+)\s*-{3,}END USER NKEY SEED-{3,}",
    re.S,
)
_REFUSALS = ("authorization violation", "authentication", "secure connection")


class ConnectOptionError(ValueError):
    """A connection setting is unusable; ``field`` names it (a :class:`NatsConnectOptions` field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _read(field: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE + 1)
    except OSError as e:
        raise ConnectOptionError(field, f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > _MAX_FILE:
        raise ConnectOptionError(field, f"{path} is larger than {_MAX_FILE} bytes")
    return data


def _keypair(field: str, seed: bytes, what: str) -> Any:
    import nkeys  # nats-py's optional dependency; in pyproject

    try:
        return nkeys.from_seed(bytearray(seed.strip()))
    except Exception:
        raise ConnectOptionError(field, f"{what} does not hold a valid nkey seed") from None


def _creds(path: str) -> tuple[bytes, bytes]:
    """The user JWT and seed of a ``.creds`` file (raises ConnectOptionError)."""
    m = _CREDS_RE.search(_read("creds_file", path))
    if m is None:
        raise ConnectOptionError("creds_file", f"{path} is not a NATS credentials file (no user JWT and user nkey seed)")
    return m["jwt"], m["seed"]


def _creds_callbacks(path: str) -> tuple[Callable[[], bytearray], Callable[[str], bytes]]:
    """nats-py's ``user_jwt_cb`` and ``signature_cb`` for a ``.creds`` file, read on each (re)connect."""

    def user_jwt() -> bytearray:
        return bytearray(_creds(path)[0])

    def sign(nonce: str) -> bytes:
        return base64.b64encode(_keypair("creds_file", _creds(path)[1], path).sign(nonce.encode()))

    return user_jwt, sign


def redact_url(url: str) -> str:
    """``url`` (comma-separated servers) with any password or token replaced by ``***``."""

    def one(m: re.Match[str]) -> str:
        user, sep, _ = m[1].partition(":")
        return f"//{user}:***@" if sep else "//***@"

    return re.sub(r"//([^/,]*)@", one, url)  # greedy: up to the last @ of a server, as URL parsers split


def _split_url(url: str) -> tuple[list[str], str, str, str]:
    """Servers without userinfo, and the (percent-decoded) user, password and token they carried."""
    servers, found = [], set()
    for raw in (u.strip() for u in url.split(",")):
        if not raw:
            continue
        full = raw if "://" in raw else f"nats://{raw}"
        parts = urlsplit(full)
        if "@" in parts.netloc:
            userinfo, host = parts.netloc.rsplit("@", 1)
            found.add(userinfo)
            full = parts._replace(netloc=host).geturl()
        servers.append(full)
    if len(found) > 1:
        raise ConnectOptionError("url", "the servers of the URL carry different credentials")
    if not found:
        return servers, "", "", ""
    user, sep, password = next(iter(found)).partition(":")
    if not sep:
        return servers, "", "", unquote(user)
    return servers, unquote(user), unquote(password), ""


class NatsConnectOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Credentials and TLS for a NATS connection; every field optional (empty = unset).

    Credentials (at most one kind): ``user``/``password``, ``token``, ``nkey_seed_file``
    (a file holding an ``SU...`` user seed), ``creds_file`` (a decentralized-JWT ``.creds``
    file). The URL's userinfo counts as user/password (``user:pass@``) or token (``token@``),
    percent-decoded; explicit credentials replace it.
    TLS: ``tls_ca_file`` (PEM CA bundle that signed the server; default: the system's),
    ``tls_cert_file``/``tls_key_file`` (client certificate, for servers with ``verify: true``),
    ``tls_hostname`` (the name to verify instead of the URL's host). Any TLS field, or a
    ``tls://`` URL, makes TLS mandatory.
    """

    user: str = ""
    password: str = ""
    token: str = ""
    creds_file: str = ""
    nkey_seed_file: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_hostname: str = ""

    def check(self) -> None:
        """Read every file once; raise :class:`ConnectOptionError` naming the first bad field."""
        kinds = [k for k, on in (("user", self.user or self.password), ("token", self.token),
                                 ("nkey_seed_file", self.nkey_seed_file), ("creds_file", self.creds_file)) if on]  # fmt: skip
        if len(kinds) > 1:
            raise ConnectOptionError(kinds[1], f"give one kind of credentials, not both {kinds[0]} and {kinds[1]}")
        if bool(self.user) != bool(self.password):
            raise ConnectOptionError("password" if self.user else "user", "user and password go together")
        if self.creds_file:
            _keypair("creds_file", _creds(self.creds_file)[1], self.creds_file)
        if self.nkey_seed_file:
            kp = _keypair("nkey_seed_file", _read("nkey_seed_file", self.nkey_seed_file), self.nkey_seed_file)
            if not kp.public_key.startswith(b"U"):
                raise ConnectOptionError("nkey_seed_file", f"{self.nkey_seed_file} holds a seed that is not a user's (SU...)")
        self.ssl_context()

    def wants_tls(self, url: str = "") -> bool:
        """True when the connection must be encrypted."""
        return any(u.strip().startswith("tls://") for u in url.split(",")) or bool(
            self.tls_ca_file or self.tls_cert_file or self.tls_key_file or self.tls_hostname
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context the TLS fields describe (None when none is set)."""
        if not (self.tls_ca_file or self.tls_cert_file or self.tls_key_file):
            return None
        if self.tls_key_file and not self.tls_cert_file:
            raise ConnectOptionError("tls_key_file", "a client key needs its certificate (tls_cert_file)")
        for field in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            if getattr(self, field):
                _read(field, getattr(self, field))
        try:
            ctx = ssl.create_default_context(cafile=self.tls_ca_file or None)
        except (ssl.SSLError, ValueError) as e:
            raise ConnectOptionError("tls_ca_file", f"{self.tls_ca_file} is not a PEM CA certificate ({e})") from None
        if self.tls_cert_file:
            try:
                ctx.load_cert_chain(self.tls_cert_file, self.tls_key_file or None)
            except (ssl.SSLError, ValueError) as e:
                field = "tls_key_file" if self.tls_key_file else "tls_cert_file"
                raise ConnectOptionError(field, f"the client certificate and key do not load ({e})") from None
        return ctx

    def connect_args(self, url: str) -> tuple[list[str], dict[str, Any]]:
        """The server list and the nats-py ``connect`` keyword arguments for ``url``."""
        servers, user, password, token = _split_url(url)
        if self.user or self.token or self.nkey_seed_file or self.creds_file:
            user = password = token = ""  # explicit credentials win over the URL's userinfo
        kw: dict[str, Any] = {}
        if self.user or user:
            kw.update(user=self.user or user, password=self.password or password)
        if self.token or token:
            kw["token"] = self.token or token
        if self.nkey_seed_file:
            kw["nkeys_seed"] = self.nkey_seed_file
        if self.creds_file:
            kw["user_jwt_cb"], kw["signature_cb"] = _creds_callbacks(self.creds_file)
        if (ctx := self.ssl_context()) is not None:
            kw["tls"] = ctx
        if self.tls_hostname:
            kw["tls_hostname"] = self.tls_hostname
        return servers, kw

    def client(self, url: str) -> FastClient:
        """A fresh client; one that refuses a server without TLS when :meth:`wants_tls`."""
        return _TlsOnlyClient() if self.wants_tls(url) else FastClient()


class _TlsOnlyClient(FastClient):
    """Refuses to go on in clear: upgrades when the server merely offers TLS, fails when it has none."""

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        if initial_connection and not info.get("tls_required"):
            if not info.get("tls_available"):
                raise nats.errors.SecureConnWantedError
            info["tls_required"] = True
        await super()._process_info(info, initial_connection)


def _refusal(e: BaseException) -> str | None:
    """Why the server refused us for good (credentials, TLS), or None for a transient failure."""
    if isinstance(e, ssl.SSLCertVerificationError) and "hostname" in str(e.verify_message).lower():
        return f"its TLS certificate is not for that host ({e.verify_message}): use a name it holds, or set NATS_TLS_HOSTNAME"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"its TLS certificate does not verify ({e.verify_message}): give the CA that signed it (NATS_TLS_CA)"
    if isinstance(e, ssl.SSLError) and not isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)):
        return (
            f"TLS failed ({e.reason or e}): check the CA, client certificate and key (NATS_TLS_CA, NATS_TLS_CERT, NATS_TLS_KEY)"
        )
    if isinstance(e, ConnectOptionError):
        return str(e)
    text = str(e).strip()
    if isinstance(e, nats.errors.Error) and any(r in text.lower() for r in _REFUSALS) and "timeout" not in text.lower():
        text = text.removeprefix("nats:").strip().strip("'")
        if "secure connection" in text:
            return f"{text}: the URL is tls:// or TLS is configured, but the server offers no TLS"
        return f"{text}: check the credentials (the URL's user:password@ or token@, NATS_TOKEN, NATS_NKEY_SEED, NATS_CREDS)"
    return None


async def connect_first(
    nc: FastClient,
    url: str,
    options: NatsConnectOptions,
    timeout_s: float | None,
    error_cb: Callable[[Exception], Awaitable[None]],
    **kwargs: Any,
) -> None:
    """``nc.connect`` to ``url`` with ``options``; nats-py retries transient failures for
    up to ``timeout_s`` (None: forever), a refusal ends it at once.

    Raises:
        NotConnected: refused, or no connection in time (one line naming the redacted URL).
        ConnectOptionError: a setting is unusable.
    """
    servers, extra = options.connect_args(url)
    loop = asyncio.get_running_loop()
    refused: asyncio.Future[str] = loop.create_future()
    last: list[BaseException] = []

    async def on_error(e: Exception) -> None:
        last[:] = [e]
        if not refused.done() and (why := _refusal(e)) is not None:
            refused.set_result(why)
        await error_cb(e)

    disconnected_cb = kwargs.pop("disconnected_cb", None)

    async def on_disconnect() -> None:  # not for the attempts before the first connection
        if ok and disconnected_cb is not None:
            await disconnected_cb()

    ok = False
    task = loop.create_task(nc.connect(servers, error_cb=on_error, disconnected_cb=on_disconnect, **kwargs, **extra))
    try:
        either: set[asyncio.Future[Any]] = {task, refused}
        done = (await asyncio.wait(either, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED))[0]
        if task in done and task.exception() is None:
            ok = True
            return
        failure = task.exception() if task in done else None
        why = refused.result() if refused.done() else _refusal(failure) if failure else None
        if why is not None:
            raise NotConnected(f"NATS at {redact_url(url)} refused the connection: {why}")
        cause = failure or (last[0] if last else None)
        raise NotConnected(
            f"cannot connect to NATS at {redact_url(url)}{f' within {timeout_s:g} s' if timeout_s is not None else ''}"
            f"{f' ({cause!r})' if cause else ''}: is the server running, and the URL right?"
        )
    finally:
        if not ok:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            with contextlib.suppress(Exception):
                await nc.close()
