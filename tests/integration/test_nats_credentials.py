"""Connecting to a secured NATS: user/password and token in the URL, nkeys, decentralized-JWT
``.creds`` files, TLS with a private CA and client certificates.

Each test starts its own nats-server (tests/support/nats_secure.py) and runs two pods built
by ``make_bus`` (so the settings come from the URL and the ``NATS_*`` environment, as for
``aiwfe run``): a request/reply between them and a JetStream job; then ``aiwfe publish``.
A wrong credential gives one line naming the server (never the secret) and the remedy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest

from aiwfe.bus.errors import NotConnected
from aiwfe.bus.nats import NatsBus
from aiwfe.kernel.errors import ConfigError
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from aiwfe.kernel.tools.connect import NATS_ENV, make_bus, nats_connect_options
from aiwfe.kernel.tools.publish import dead_letters, publish
from tests.support.nats_secure import (
    JETSTREAM,
    UNLIMITED,
    ConfiguredNats,
    Key,
    make_ca,
    make_cert,
    make_jwt,
    write_creds,
)
from tests.support.probe import Crunch, WhoAmI
from tests.unit.test_routing import TWO_PODS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No NATS setting leaks in from the environment the tests run in."""
    for var in (*NATS_ENV, "NATS_URL"):
        monkeypatch.delenv(var, raising=False)


@contextlib.contextmanager
def server(tmp_path: Path, conf: str, *, tls: bool = False) -> Iterator[ConfiguredNats]:
    srv = ConfiguredNats(tmp_path / "nats", conf, tls=tls).start()
    try:
        yield srv
    finally:
        srv.stop()


@contextlib.asynccontextmanager
async def pods(url: str, prefix: str) -> AsyncIterator[dict[str, PodRunner]]:
    m = parse_manifest(TWO_PODS.replace("{prefix}", prefix), env={})
    runners = {name: PodRunner(m, name, make_bus(m, name=name, url=url), ops_port=0) for name in m.pods}
    async with contextlib.AsyncExitStack() as stack:
        for p in runners.values():
            await stack.enter_async_context(p)
        yield runners


async def works(url: str, prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Pods on ``url``: a call across the server, a durable job, then ``aiwfe publish`` of a job and ``aiwfe dlq``."""
    async with pods(url, prefix) as p:
        assert (await p["front"].kernel.call(WhoAmI())).pid == os.getpid()  # served by the back pod
        rec = await p["back"].kernel.wait_job(await p["back"].kernel.submit(Crunch(n=7)), timeout_s=20)
        assert rec.status == "done" and msgspec.msgpack.decode(rec.result)["square"] == 49
        capsys.readouterr()
        assert await publish(url, f"{prefix}.jobs.probe.crunch", {"n": 5}, wait=True, timeout_s=20, prefix=prefix) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["result"]["square"] == 25
        assert await dead_letters(url, prefix, "list", kind=None, job_id=None) == 0  # `aiwfe dlq list`
        assert capsys.readouterr().out == ""


async def refused(url: str, *secrets: str, options: object = None, contains: str = "") -> str:
    """Start a bus that must be refused; the one-line reason (checked to hide ``secrets``)."""
    bus = NatsBus(url, "refused", connect_timeout_s=10.0, connect_options=options or nats_connect_options())  # type: ignore[arg-type]
    with pytest.raises(NotConnected) as e:
        await bus.start()
    msg = str(e.value)
    assert "\n" not in msg and "refused the connection" in msg and contains in msg, msg
    assert not any(s in msg for s in secrets), msg
    return msg


async def cli_refused(url: str, prefix: str, capsys: pytest.CaptureFixture[str], *secrets: str) -> str:
    """``aiwfe publish`` against a refusing server: exit 1 and one line on stderr."""
    capsys.readouterr()
    assert await publish(url, f"{prefix}.jobs.probe.crunch", {"n": 1}, wait=False, timeout_s=5, prefix=prefix) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: NATS at ") and "\n" not in err and "refused" in err, err
    assert not any(s in err for s in secrets), err
    return err


def aiwfe(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in NATS_ENV and k != "NATS_URL"}
    return subprocess.run(
        [sys.executable, "-m", "aiwfe.kernel.tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**clean, **env},
    )


async def test_user_and_password_in_the_url_or_the_environment(
    tmp_path: Path, prefix: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    password = "s3cr@t:/x"  # percent-encoded in a URL
    conf = f'authorization {{ users = [ {{ user: alice, password: "{password}" }} ] }}\n'
    with server(tmp_path, conf) as srv:
        url = f"nats://alice:s3cr%40t%3A%2Fx@{srv.address}"
        await works(url, prefix, capsys)

        wrong = f"nats://alice:n0pe@{srv.address}"
        msg = await refused(wrong, "n0pe", contains="Authorization Violation")
        assert f"nats://alice:***@{srv.address}" in msg
        await cli_refused(wrong, prefix, capsys, "n0pe")
        await refused(srv.url, contains="Authorization Violation")  # no credentials at all
        await refused(f"tls://alice:x@{srv.address}", contains="offers no TLS")  # never sends them in clear

        monkeypatch.setenv("NATS_USER", "alice")
        monkeypatch.setenv("NATS_PASSWORD", password)
        bus = NatsBus(srv.url, prefix, connect_options=nats_connect_options())
        await bus.start()
        await bus.close()

        # `aiwfe run`: one line, exit 1, no traceback
        manifest = tmp_path / "m.toml"
        manifest.write_text(TWO_PODS.replace("{prefix}", prefix))
        r = await asyncio.to_thread(aiwfe, "run", "-m", str(manifest), "--pod", "back", env={"NATS_URL": wrong})
        assert r.returncode == 1, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("error: NATS at nats://alice:***@"), r.stderr
        assert "Traceback" not in r.stderr and "n0pe" not in r.stderr


async def test_token_in_the_url_or_the_environment(
    tmp_path: Path, prefix: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with server(tmp_path, 'authorization { token: "t0k3n-abc" }\n') as srv:
        await works(f"nats://t0k3n-abc@{srv.address}", prefix, capsys)
        monkeypatch.setenv("NATS_TOKEN", "t0k3n-abc")
        await works(srv.url, prefix, capsys)
        monkeypatch.setenv("NATS_TOKEN", "wrong-token")
        await refused(srv.url, "wrong-token", contains="Authorization Violation")
        await cli_refused(srv.url, prefix, capsys, "wrong-token")


async def test_nkey_user(
    tmp_path: Path, prefix: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    user, stranger = Key("user"), Key("user")
    seed, other = tmp_path / "user.nk", tmp_path / "stranger.nk"
    seed.write_bytes(user.seed + b"\n")
    other.write_bytes(stranger.seed)
    with server(tmp_path, f"authorization {{ users = [ {{ nkey: {user.public} }} ] }}\n") as srv:
        monkeypatch.setenv("NATS_NKEY_SEED", str(seed))
        await works(srv.url, prefix, capsys)
        monkeypatch.setenv("NATS_NKEY_SEED", str(other))
        await refused(srv.url, stranger.seed.decode(), contains="Authorization Violation")
        await cli_refused(srv.url, prefix, capsys, stranger.seed.decode())


def test_bad_settings_are_config_errors_naming_the_variable(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_text("not a key\n")
    account_seed = tmp_path / "account.nk"
    account_seed.write_bytes(Key("account").seed)
    cases = {
        "NATS_CREDS": ({"NATS_CREDS": str(tmp_path / "missing.creds")}, "cannot read"),
        "NATS_CREDS ": ({"NATS_CREDS": str(junk)}, "not a NATS credentials file"),
        "NATS_NKEY_SEED": ({"NATS_NKEY_SEED": str(junk)}, "valid nkey seed"),
        "NATS_NKEY_SEED ": ({"NATS_NKEY_SEED": str(account_seed)}, "not a user's"),
        "NATS_TLS_CA": ({"NATS_TLS_CA": str(junk)}, "not a PEM CA"),
        "NATS_TLS_CERT": ({"NATS_TLS_CERT": str(tmp_path / "nope.pem")}, "cannot read"),
        "NATS_TLS_KEY": ({"NATS_TLS_KEY": str(junk)}, "needs its certificate"),
        "NATS_PASSWORD": ({"NATS_USER": "alice"}, "go together"),
        "NATS_TOKEN": ({"NATS_USER": "a", "NATS_PASSWORD": "b", "NATS_TOKEN": "c"}, "one kind of credentials"),
    }
    for var, (env, text) in cases.items():
        with pytest.raises(ConfigError) as e:
            nats_connect_options(env)
        assert e.value.message.startswith(f"{var.strip()}: ") and text in e.value.message, (var, e.value.message)
    # and the CLI says so in one line, exit 2
    r = aiwfe("publish", "aiwfe.jobs.x.y", "{}", "--url", "nats://127.0.0.1:9", env={"NATS_CREDS": str(junk)})
    assert (
        r.returncode == 2
        and r.stderr.strip() == f"error: NATS_CREDS: {junk} is not a NATS credentials file (no user JWT and user nkey seed)"
    ), r.stderr


def _operator_setup(tmp_path: Path) -> tuple[str, Path, Path]:
    """A trusted operator, a system account, an account with JetStream and a user in it:
    the server configuration, the user's .creds, and a .creds of a user of an untrusted account."""
    op, system, acc, user = Key("operator"), Key("account"), Key("account"), Key("user")
    op_jwt = make_jwt(op, op, "aiwfe-test", {"type": "operator", "system_account": system.public})
    sys_jwt = make_jwt(op, system, "SYS", {"type": "account", "limits": UNLIMITED})
    acc_jwt = make_jwt(op, acc, "app", {"type": "account", "limits": {**UNLIMITED, **JETSTREAM}})
    user_claims = {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}
    creds = write_creds(tmp_path / "pod.creds", make_jwt(acc, user, "pod", user_claims), user)
    rogue_acc, rogue = Key("account"), Key("user")  # signed by an account the operator never issued
    rogue_creds = write_creds(tmp_path / "rogue.creds", make_jwt(rogue_acc, rogue, "rogue", user_claims), rogue)
    conf = (
        f"operator: {op_jwt}\n"
        f"system_account: {system.public}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {{\n  {system.public}: {sys_jwt}\n  {acc.public}: {acc_jwt}\n}}\n"
    )
    return conf, creds, rogue_creds


async def test_decentralized_jwt_creds_file(
    tmp_path: Path, prefix: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    conf, creds, rogue = _operator_setup(tmp_path)
    with server(tmp_path, conf) as srv:
        monkeypatch.setenv("NATS_CREDS", str(creds))
        await works(srv.url, prefix, capsys)

        # the real CLI in its own process, the credentials from the environment
        async with pods(srv.url, prefix):
            r = await asyncio.to_thread(
                aiwfe,
                "publish",
                f"{prefix}.jobs.probe.crunch",
                '{"n": 3}',
                "--wait",
                "--url",
                srv.url,
                "--prefix",
                prefix,
                env={"NATS_CREDS": str(creds)},
            )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.splitlines()[-1])["result"]["square"] == 9

        monkeypatch.setenv("NATS_CREDS", str(rogue))
        await refused(srv.url, contains="Authorization Violation")
        await cli_refused(srv.url, prefix, capsys)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, as files."""
    ca, _, ca_key, ca_cert = make_ca(tmp_path)
    server_cert, server_key = make_cert(tmp_path, "server", ca_key, ca_cert, server=True)
    client_cert, client_key = make_cert(tmp_path, "client", ca_key, ca_cert, server=False)
    (tmp_path / "other").mkdir()
    other_ca = make_ca(tmp_path / "other", "another CA")[0]
    return {
        "ca": ca,
        "server_cert": server_cert,
        "server_key": server_key,
        "client_cert": client_cert,
        "client_key": client_key,
        "other_ca": other_ca,
    }


async def test_tls_with_a_private_ca_and_client_certificates(
    tmp_path: Path, prefix: str, pki: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = (
        f'tls {{\n  cert_file: "{pki["server_cert"]}"\n  key_file: "{pki["server_key"]}"\n'
        f'  ca_file: "{pki["ca"]}"\n  verify: true\n  timeout: 2\n}}\n'
    )
    with server(tmp_path, conf, tls=True) as srv:
        monkeypatch.setenv("NATS_TLS_CA", str(pki["ca"]))
        monkeypatch.setenv("NATS_TLS_CERT", str(pki["client_cert"]))
        monkeypatch.setenv("NATS_TLS_KEY", str(pki["client_key"]))
        await works(srv.url, prefix, capsys)
        plain = srv.url.replace("tls://", "nats://")  # the server requires TLS: nats-py upgrades
        bus = NatsBus(plain, prefix, connect_options=nats_connect_options())
        await bus.start()
        await bus.close()
        monkeypatch.setenv("NATS_TLS_HOSTNAME", "localhost")  # the certificate's name, not the URL's 127.0.0.1
        bus = NatsBus(srv.url, prefix, connect_options=nats_connect_options())
        await bus.start()
        await bus.close()
        monkeypatch.setenv("NATS_TLS_HOSTNAME", "nats.example.com")
        await refused(srv.url, contains="NATS_TLS_HOSTNAME")
        monkeypatch.delenv("NATS_TLS_HOSTNAME")

        monkeypatch.delenv("NATS_TLS_CERT")
        monkeypatch.delenv("NATS_TLS_KEY")
        await refused(srv.url, contains="TLS")  # no client certificate: the server refuses us

        monkeypatch.delenv("NATS_TLS_CA")
        msg = await refused(srv.url, contains="does not verify")  # the system CAs do not know ours
        assert "NATS_TLS_CA" in msg
        err = await cli_refused(srv.url, prefix, capsys)
        assert "NATS_TLS_CA" in err

        monkeypatch.setenv("NATS_TLS_CA", str(pki["other_ca"]))
        await refused(srv.url, contains="does not verify")
