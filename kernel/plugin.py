"""The plugin protocol.

A plugin is a plain class::

    class EchoPlugin(Plugin):
        name = "echo"

        class Config(msgspec.Struct, frozen=True):
            prefix: str = ""

        calls = (Recall,)            # contracts this plugin calls

        @contextlib.asynccontextmanager
        async def lifespan(self):   # open resources, yield, close them
            yield

        @serves(Echo, concurrency=64, max_queue=1024)
        async def echo(self, req: Echo) -> EchoResult:
            return EchoResult(text=self.config.prefix + req.text)

The kernel builds it as ``PluginClass(config, kernel)``; ``self.kernel`` is a
:class:`KernelHandle` (an :class:`aiwfe.kernel.routing.Caller`) restricted to the contracts
listed in ``calls``.
Handlers are validated when the plugin is registered (:func:`validate_plugin_class`);
every problem names the plugin, the handler and the signature it expected.

Config is checked by :func:`config_problems`, the same way by ``aiwfe check`` and by a
starting pod: misspelled keys (with a "did you mean"), types (the ``Config`` Struct), the
plugin's own :meth:`Plugin.validate_config` (closed sets of values, fields that depend on
each other), and :attr:`Plugin.config_addresses` (values naming contracts some pod of the
manifest must serve).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import typing
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, ClassVar, Protocol, TypeVar

import msgspec

from ._config_keys import did_you_mean, strip_unknown, unknown_keys
from .contract import Request, address_of, kind_of, reply_type

R = TypeVar("R")

__all__ = [
    "HandlerOptions",
    "HandlerSpec",
    "KernelHandle",
    "Plugin",
    "config_problems",
    "handler_options",
    "handlers_of",
    "one_of",
    "problem_text",
    "served_contracts",
    "serves",
    "validate_plugin_class",
]


class KernelHandle(Protocol):
    """What a plugin sees of its pod's kernel (``self.kernel``); see
    :class:`aiwfe.kernel.routing.Caller`. Records are :class:`aiwfe.kernel.jobs.JobRecord`,
    events :class:`aiwfe.kernel.jobs.JobEvent`."""

    async def call(self, req: Request[R], *, timeout_s: float | None = None) -> R: ...
    async def publish(self, event: Any) -> None: ...
    async def submit(self, job: Any, *, job_id: str | None = None, idempotency_key: str | None = None) -> str: ...
    async def submit_json(
        self,
        address: str,
        data: bytes,
        *,
        job_id: str | None = None,
        idempotency_key: str | None = None,
        owner: str | None = None,
    ) -> str: ...
    async def job_record(self, job_id: str) -> Any: ...
    async def job_owner(self, job_id: str) -> str | None: ...
    async def wait_job(self, job_id: str, *, timeout_s: float = 30.0) -> Any: ...
    def job_events(self, job_id: str, after_seq: int = 0) -> AsyncIterator[Any]: ...
    async def cancel_job(self, job_id: str, reason: str = ...) -> bool: ...
    async def cluster_status(self, timeout_s: float = 0.5) -> list[dict[str, Any]]: ...


class HandlerOptions(msgspec.Struct, frozen=True, kw_only=True):
    """How one handler is served.

    ``concurrency``: handler invocations running at once in this pod.
    ``max_queue``: invocations allowed to wait for a slot; past it callers get ``Overloaded``.
    ``timeout_s``: default deadline for calls that carry none, and the longest a caller may ask for.
    Jobs only: ``ack_wait_s`` (redelivery after a silent worker; heartbeats keep a live one),
    ``max_deliver`` (attempts before dead-lettering), ``backoff_s`` (delay before attempt
    n+1 after a failed attempt n; the last value repeats).
    """

    concurrency: int = 64
    max_queue: int = 1024
    timeout_s: float = 30.0
    ack_wait_s: float = 30.0
    max_deliver: int = 5
    backoff_s: tuple[float, ...] = (1.0, 5.0, 30.0)


class HandlerSpec(msgspec.Struct, frozen=True):
    """A validated handler: which method of which plugin serves which contract."""

    plugin: str
    method: str
    contract: type
    address: str
    kind: str
    options: HandlerOptions


def serves(contract: type, **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark an ``async def`` method as the handler of ``contract``.

    Keyword options are those of :class:`HandlerOptions`.

    Raises:
        TypeError: an unknown option (at class definition time).
    """
    opts = HandlerOptions(**options)

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__aiwfe_serves__ = (contract, opts)  # type: ignore[attr-defined]
        return fn

    return mark


class Plugin:
    """Base class of every plugin. See the module docstring."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[msgspec.Struct]]
    calls: ClassVar[tuple[type, ...]] = ()
    #: External services the plugin needs besides NATS: any of "postgres", "redis".
    #: ``aiwfe up`` starts an embedded one for each that has no URL in the environment.
    services: ClassVar[tuple[str, ...]] = ()
    #: Config fields whose values name contract addresses that some pod of the manifest must
    #: serve: field name → the contract kind (``"request"``, ``"job"``, ``"event"``, or ``""``
    #: for any). A string field is one address, a list holds addresses, a dict maps names to
    #: addresses (the gateway's ``job_kinds = {helios = "helios.ask"}``).
    config_addresses: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def validate_config(cls, config: Any) -> list[str | tuple[str, str]]:
        """Check ``config`` (an instance of ``Config``) beyond its types: closed sets of values
        (:func:`one_of`), fields that depend on each other. Return one problem per finding,
        ``"field: what is wrong"`` or ``(message, hint)``; ``[]`` when valid. Runs in
        ``aiwfe check`` and before a pod builds the plugin, with the same messages.
        Default: nothing to check."""
        return []

    class _NoConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        pass

    def __init__(self, config: msgspec.Struct, kernel: KernelHandle) -> None:
        self.config = config
        self.kernel = kernel

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Open the plugin's resources before it serves, close them after. Default: none."""
        yield

    def readiness(self) -> str | None:
        """Return None when ready to serve, else a short reason shown by ``/ready`` (503)."""
        return None

    def degraded(self) -> list[str]:
        """What works in a reduced way right now (e.g. "redis: unreachable, verifying from
        signatures"); ``/ready`` stays 200 and lists these under ``degraded``."""
        return []


def config_type(cls: type[Plugin]) -> type[msgspec.Struct]:
    """Return the plugin's Config Struct (an empty one when it declares none)."""
    return getattr(cls, "Config", Plugin._NoConfig)


def handlers_of(cls: type[Plugin]) -> list[HandlerSpec]:
    """Return the handlers a plugin class declares (without validating them)."""
    specs = []
    for attr in dir(cls):
        fn = getattr(cls, attr, None)
        mark = getattr(fn, "__aiwfe_serves__", None)
        if mark is None:
            continue
        contract, opts = mark
        try:
            address = address_of(contract)
            kind = kind_of(contract)
        except TypeError:
            address, kind = "?", "?"
        specs.append(HandlerSpec(cls.name, attr, contract, address, kind, opts))
    return specs


def validate_plugin_class(cls: Any) -> list[str]:
    """Check a plugin class; return every problem found (empty when valid).

    Each message names the plugin, the handler and the expected signature.
    """
    problems: list[str] = []
    label = getattr(cls, "__qualname__", repr(cls))
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        return [f"{label}: not a subclass of aiwfe.kernel.Plugin"]
    if not cls.name or not cls.name.isidentifier():
        problems.append(f"{label}: `name` must be a non-empty identifier, got {cls.name!r}")
    cfg = config_type(cls)
    if not (isinstance(cfg, type) and issubclass(cfg, msgspec.Struct)):
        problems.append(f"plugin {cls.name}: Config must be a msgspec.Struct")
    for c in cls.calls:
        try:
            address_of(c)
            reply_type(c)
        except TypeError as e:
            problems.append(f"plugin {cls.name}: calls: {e}")
    seen: dict[str, str] = {}
    for spec in handlers_of(cls):
        where = f"plugin {cls.name}, handler {spec.method}"
        try:
            address_of(spec.contract)
            rt = reply_type(spec.contract)
        except TypeError as e:
            problems.append(f"{where}: {e}")
            continue
        cname = spec.contract.__name__
        ret = rt.__name__ if rt is not None else "None"
        expected = f"async def {spec.method}(self, msg: {cname}) -> {ret}"
        fn = getattr(cls, spec.method)
        if not inspect.iscoroutinefunction(fn):
            problems.append(f"{where}: must be `{expected}` (it is not async)")
            continue
        params = list(inspect.signature(fn).parameters.values())
        if len(params) != 2 or params[1].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            problems.append(f"{where}: must be `{expected}` (takes exactly one message)")
            continue
        try:
            hints = typing.get_type_hints(fn)
        except Exception as e:  # a broken annotation is itself a problem to report
            problems.append(f"{where}: annotations do not resolve ({e}); expected `{expected}`")
            continue
        ann = hints.get(params[1].name)
        if ann is not None and ann is not spec.contract:
            problems.append(f"{where}: message annotated {ann!r}; expected `{expected}`")
        if "return" in hints:
            got = hints["return"]
            want = rt if rt is not None else type(None)
            if got is not want:
                problems.append(f"{where}: returns {got!r}; expected `{expected}`")
        if spec.address in seen:
            problems.append(f"{where}: {spec.address} is already served by handler {seen[spec.address]}")
        seen[spec.address] = spec.method
    return problems


def _addresses(value: Any) -> Iterable[tuple[str, str]]:
    """(label, address) pairs of a config value per :attr:`Plugin.config_addresses`."""
    if isinstance(value, str):
        return [("", value)] if value else []
    if isinstance(value, Mapping):
        return [(f"[{k!r}]", v) for k, v in value.items() if isinstance(v, str)]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [("", v) for v in value if isinstance(v, str)]
    return []


def config_problems(
    cls: type[Plugin], raw: Mapping[str, Any], served: Mapping[str, str] | None = None
) -> tuple[msgspec.Struct | None, list[tuple[str, str]]]:
    """Convert a plugin's raw config table and check it; used by ``aiwfe check`` and pods.

    ``served`` maps every contract address some pod of the manifest serves to its kind
    (None: unknown, so :attr:`Plugin.config_addresses` is not checked).
    Returns the config (None when it does not convert; not to be used when any problem
    is returned) and every problem as a ``(message, hint)`` pair: unknown keys with the closest known one, type errors, the
    plugin's :meth:`Plugin.validate_config` messages, addresses no pod serves.
    """
    ctype = config_type(cls)
    problems: list[tuple[str, str]] = []
    for u in unknown_keys(dict(raw), ctype):
        problems.append((u.message(), u.hint()))
    try:
        config = msgspec.convert(strip_unknown(dict(raw), ctype), ctype, strict=False)
    except msgspec.ValidationError as e:
        fields = ", ".join(getattr(ctype, "__struct_fields__", ()))
        problems.append((str(e), f"{cls.__qualname__}.Config fields: {fields or 'none'}"))
        return None, problems
    try:
        own = list(cls.validate_config(config))
    except Exception as e:  # a broken validator is itself a problem to report, not a crash of check
        own = [(f"validate_config failed: {e!r}", f"a bug in {cls.__qualname__}.validate_config")]
    doc = f"see {cls.__qualname__}.Config"
    problems.extend(p if isinstance(p, tuple) else (p, doc) for p in own)
    if served is not None:
        for fname, kind in cls.config_addresses.items():
            for label, address in _addresses(getattr(config, fname, None)):
                if served.get(address) is not None and (not kind or served[address] == kind):
                    continue
                what = f"{kind} " if kind else ""
                candidates = [a for a, k in served.items() if not kind or k == kind]
                problems.append(
                    (
                        f"{fname}{label}: {address!r} is no {what}contract served by a pod of this manifest",
                        did_you_mean(address, candidates, what=f"served {what}contracts"),
                    )
                )
    return config, problems


def handler_options(base: HandlerOptions, override: Mapping[str, Any]) -> tuple[HandlerOptions | None, list[tuple[str, str]]]:
    """Apply a manifest's handler override (``[pods.NAME.handlers."address"]``) to ``base``.

    Returns the options (None when they do not convert) and every problem as
    ``(message, hint)``: unknown keys with the closest option name, then type errors.
    """
    known = HandlerOptions.__struct_fields__
    problems = [(f"unknown key {k!r}", did_you_mean(k, known, what="options")) for k in override if k not in known]
    try:
        opts = msgspec.convert(
            {**msgspec.structs.asdict(base), **{k: v for k, v in override.items() if k in known}}, HandlerOptions, strict=False
        )
    except (msgspec.ValidationError, TypeError) as e:
        problems.append((str(e), f"options: {', '.join(known)}"))
        return None, problems
    return opts, problems


def served_contracts(classes: Iterable[type[Plugin]]) -> dict[str, str]:
    """Address → kind (``request``/``job``/``event``) of every contract these plugins serve."""
    return {s.address: s.kind for cls in classes for s in handlers_of(cls) if s.address != "?"}


def one_of(field: str, value: Any, allowed: Iterable[Any]) -> list[str | tuple[str, str]]:
    """For :meth:`Plugin.validate_config`: ``[]`` when ``value`` is in ``allowed``, else one
    problem naming the field and the value, with the closest allowed value and all of them
    as its hint."""
    allowed = [str(a) for a in allowed]
    if str(value) in allowed:
        return []
    close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.6)
    near = f"did you mean {close[0]!r}? " if close else ""
    return [(f"{field}: unknown value {value!r}", f"{near}available: {', '.join(allowed)}")]


def problem_text(problem: str | tuple[str, str]) -> str:
    """One line for a :meth:`Plugin.validate_config` problem (``message (hint)``)."""
    return problem if isinstance(problem, str) else f"{problem[0]} ({problem[1]})"
