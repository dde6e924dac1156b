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
every problem names the plugin, the handler and the signature it expected; config is
checked by :mod:`aiwfe.kernel.config_check` (``aiwfe check`` and pods alike).
"""

from __future__ import annotations

import contextlib
import inspect
import typing
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, ClassVar, Protocol, TypeVar

import msgspec

from .contract import Request, address_of, kind_of, reply_type

R = TypeVar("R")

__all__ = ["HandlerOptions", "HandlerSpec", "KernelHandle", "Plugin", "handlers_of", "serves", "validate_plugin_class"]


class KernelHandle(Protocol):
    """What a plugin sees of its pod's kernel (``self.kernel``); see
    :class:`aiwfe.kernel.routing.Caller`. Records are :class:`aiwfe.kernel.jobs.JobRecord`,
    events :class:`aiwfe.kernel.jobs.JobEvent`."""

    async def call(self, req: Request[R], *, timeout_s: float | None = None, optional: bool = False) -> R: ...
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
    async def job_last_seq(self, job_id: str) -> int: ...
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
    #: Parts of the kernel beyond contracts that the plugin's handle may reach (least privilege:
    #: none by default). The only one is ``"jobs"``, the pod's :class:`~aiwfe.kernel.jobs.Jobs`
    #: (dead letters, the results bucket), which the gateway's admin and console routes use.
    privileges: ClassVar[frozenset[str]] = frozenset()
    #: External services the plugin needs besides NATS: any of "postgres", "redis".
    #: ``aiwfe up`` starts an embedded one for each that has no URL in the environment.
    services: ClassVar[tuple[str, ...]] = ()
    #: Config fields whose values name contract addresses that some pod of the manifest must
    #: serve: field name → the contract kind (``"request"``, ``"job"``, ``"event"``, or ``""``
    #: for any). A string field is one address, a list holds addresses, a dict maps names to
    #: addresses (the gateway's ``job_kinds = {helios = "helios.ask"}``).
    config_addresses: ClassVar[Mapping[str, str]] = {}

    # Checks of a Config beyond its types (closed sets of values, fields that depend on each
    # other), run by `aiwfe check` and before a pod builds the plugin: one problem per finding,
    # "field: what is wrong" or (message, hint); [] when valid. See aiwfe.kernel.config_check.
    @classmethod
    def validate_config(cls, config: Any) -> list[str | tuple[str, str]]:
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
