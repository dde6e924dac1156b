"""The ``aiwfe`` pytest plugin (entry point ``pytest11``: installing ``aiwfe`` is enough).

Fixtures: ``nats_url``, ``database_url``, ``redis_url``, ``qdrant_url`` (session; a server
from the environment, testcontainers or embedded — :mod:`aiwfe.testing.servers`), ``prefix``
(a subject prefix of the test's own), ``pg_url`` (``database_url`` with a schema of the test's
own), ``cleanup_streams``, and the placement runner: ``aiwfe_system`` (a running
:class:`~aiwfe.testing.system.System`) under ``aiwfe_placement``, which the
``aiwfe_placements`` marker parametrizes::

    @pytest.mark.aiwfe_placements("monolith", "per_plugin", "random", plugins=["echo"])
    async def test_echo(aiwfe_system):
        reply = await aiwfe_system.call(Echo(text="hi"))
        aiwfe_system.record("reply", reply.text)  # must be equal under every placement

Options: ``--aiwfe-servers=auto|env|containers|embedded`` (ini ``aiwfe_servers``),
``--aiwfe-seeds=1,2,3``: the seeds a bare ``random`` placement expands to (ini ``aiwfe_seeds``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .placement import Placement, SystemSpec
from .servers import SOURCES, service

if TYPE_CHECKING:
    from .system import System

try:
    import pytest_asyncio

    _async_fixture: Any = pytest_asyncio.fixture
except ImportError:  # pragma: no cover - the async fixtures need pytest-asyncio (aiwfe[testing])
    _async_fixture = pytest.fixture

__all__ = [
    "aiwfe_placement",
    "aiwfe_services",
    "aiwfe_spec",
    "aiwfe_system",
    "cleanup_streams",
    "database_url",
    "nats_url",
    "pg_url",
    "prefix",
    "qdrant_url",
    "redis_url",
]

DEFAULT_PLACEMENTS = ("monolith", "per_plugin", "random")
MARKER = (
    "aiwfe_placements(*placements, plugins=None, manifest=None, config=None, system=None, env=None, services=()): "
    "run the test once under each placement (monolith, per_plugin, random[:SEED], manifest) with the "
    "aiwfe_system fixture; values recorded with aiwfe_system.record must agree across placements"
)
_RESULTS = pytest.StashKey[dict[tuple[Any, ...], tuple[str, Any]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("aiwfe", "aiwfe.testing: real servers and placements")
    group.addoption(
        "--aiwfe-servers",
        choices=SOURCES,
        default=None,
        help="where nats_url, database_url, redis_url, qdrant_url come from: auto (environment URL, "
        "then testcontainers when Docker answers, then embedded servers), env, containers or embedded",
    )
    group.addoption("--aiwfe-seeds", default=None, help="comma-separated seeds a bare 'random' placement runs under (default 1)")
    parser.addini("aiwfe_servers", "default of --aiwfe-servers", default="auto")
    parser.addini("aiwfe_seeds", "default of --aiwfe-seeds", default="1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)
    config.stash[_RESULTS] = {}


def seeds(config: pytest.Config) -> list[int]:
    """The seeds of ``--aiwfe-seeds`` (or ini ``aiwfe_seeds``).

    Raises:
        pytest.UsageError: not a comma-separated list of integers.
    """
    raw = config.getoption("aiwfe_seeds") or config.getini("aiwfe_seeds") or "1"
    try:
        return [int(s) for s in str(raw).split(",") if s.strip()]
    except ValueError:
        raise pytest.UsageError(f"--aiwfe-seeds: {raw!r} is not a comma-separated list of integers") from None


def expand(placements: tuple[str, ...] | list[str], seed_list: list[int]) -> list[Placement]:
    """The placements a marker names, a bare ``random`` once per seed."""
    out: list[Placement] = []
    for p in placements:
        if p == "random":
            out += [Placement("random", s) for s in seed_list]
        else:
            out.append(Placement.parse(p))
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("aiwfe_placements")
    if marker is None or "aiwfe_placement" not in metafunc.fixturenames:
        return
    placements = expand(marker.args or DEFAULT_PLACEMENTS, seeds(metafunc.config))
    metafunc.parametrize("aiwfe_placement", placements, indirect=True, ids=[str(p) for p in placements])


def _servers(config: pytest.Config) -> str:
    return str(config.getoption("aiwfe_servers") or config.getini("aiwfe_servers") or "auto")


def _session_service(name: str, request: pytest.FixtureRequest, tmp: pytest.TempPathFactory) -> Iterator[str]:
    with service(name, tmp.mktemp(name), _servers(request.config)) as url:
        yield url


@pytest.fixture(scope="session")
def nats_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A NATS server with JetStream; the URL carries the credentials it needs (embedded and
    container servers require a user)."""
    yield from _session_service("nats", request, tmp_path_factory)


@pytest.fixture(scope="session")
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server URL."""
    yield from _session_service("postgres", request, tmp_path_factory)


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis-protocol server URL."""
    yield from _session_service("redis", request, tmp_path_factory)


@pytest.fixture(scope="session")
def qdrant_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Qdrant server URL, or ``""``: the memory plugin's embedded vector store."""
    yield from _session_service("qdrant", request, tmp_path_factory)


@pytest.fixture
def prefix() -> str:
    """A subject prefix of this test's own, so its streams never meet another test's."""
    return "t" + uuid.uuid4().hex[:12]


@_async_fixture
async def pg_url(database_url: str, prefix: str) -> AsyncIterator[str]:
    """``database_url`` with a fresh schema of this test's own as its search_path (dropped after)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(f'CREATE SCHEMA "{prefix}"')
    params: dict[str, Any] = conninfo_to_dict(database_url)
    params["options"] = (str(params.get("options") or "") + f" -c search_path={prefix}").strip()
    yield make_conninfo(**params)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{prefix}" CASCADE')


@_async_fixture
async def cleanup_streams(nats_url: str, prefix: str) -> AsyncIterator[None]:
    """Delete this test's streams and results bucket afterwards (shared servers stay clean)."""
    yield
    import nats

    from aiwfe.bus.codec import stream_names

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    names = stream_names(prefix)
    for stream in (names["jobs"], names["events"], names["dlq"], f"KV_{names['results']}"):
        try:
            await js.delete_stream(stream)
        except Exception:
            pass
    await nc.close()


@pytest.fixture
def aiwfe_placement(request: pytest.FixtureRequest) -> Placement:
    """The placement of this run (the ``aiwfe_placements`` marker's; ``monolith`` without it)."""
    return Placement.parse(getattr(request, "param", "monolith"))


@pytest.fixture
def aiwfe_spec(request: pytest.FixtureRequest) -> SystemSpec:
    """What ``aiwfe_system`` runs, from the marker's keywords (``manifest`` — a path or TOML text —
    or ``plugins``, with ``config``, ``system``, ``env``, ``services``). Override it to build one in code."""
    marker = request.node.get_closest_marker("aiwfe_placements")
    kw = dict(marker.kwargs) if marker else {}
    manifest = kw.pop("manifest", None)
    env = {str(k): str(v) for k, v in (kw.pop("env", {}) or {}).items()}
    services = tuple(kw.pop("services", ()) or ())
    if manifest is not None:
        spec = SystemSpec.from_manifest(manifest, env=env, services=services)
    else:
        spec = SystemSpec(plugins=list(kw.pop("plugins", []) or []), env=env, services=services)
    spec.config.update(kw.pop("config", {}) or {})
    spec.system.update(kw.pop("system", {}) or {})
    if kw:
        raise pytest.UsageError(f"aiwfe_placements: unknown keywords {sorted(kw)}")
    if not spec.plugins:
        raise pytest.UsageError(
            "aiwfe_system: give plugins=[...] or manifest=... to the aiwfe_placements marker, or override aiwfe_spec"
        )
    return spec


_SERVICE_ENV = {
    "postgres": ("pg_url", "DATABASE_URL"),
    "redis": ("redis_url", "REDIS_URL"),
    "qdrant": ("qdrant_url", "QDRANT_URL"),
}


@pytest.fixture
def aiwfe_services(request: pytest.FixtureRequest, aiwfe_spec: SystemSpec) -> dict[str, str]:
    """The environment of the spec's ``services``: their fixtures' URLs (``pg_url`` as
    ``DATABASE_URL``, ``redis_url`` as ``REDIS_URL``, ``qdrant_url`` as ``QDRANT_URL``). A plain
    fixture, so the async ones it asks for are set up outside the event loop."""
    env: dict[str, str] = {}
    for name in aiwfe_spec.services:
        if name == "nats":
            continue  # process placements run a nats-server of their own, with the manifest's users
        if name not in _SERVICE_ENV:
            raise pytest.UsageError(f"aiwfe_placements: services are of {', '.join(['nats', *_SERVICE_ENV])}, not {name!r}")
        fixture, var = _SERVICE_ENV[name]
        env[var] = str(request.getfixturevalue(fixture))
    return env


@_async_fixture
async def aiwfe_system(
    request: pytest.FixtureRequest,
    aiwfe_spec: SystemSpec,
    aiwfe_services: dict[str, str],
    aiwfe_placement: Placement,
    prefix: str,
    tmp_path: Path,
) -> AsyncIterator[System]:
    """The spec running under this run's placement (see :func:`aiwfe.testing.start_system`)."""
    from .system import start_system

    async with start_system(aiwfe_spec, aiwfe_placement, tmp_path / "system", prefix=prefix, env=aiwfe_services) as system:
        system.recorder = _recorder(request, str(aiwfe_placement))
        yield system


def _recorder(request: pytest.FixtureRequest, placement: str) -> Any:
    from .system import PlacementMismatch

    node = request.node
    params = getattr(getattr(node, "callspec", None), "params", {})
    others = tuple(sorted((k, repr(v)) for k, v in params.items() if k != "aiwfe_placement"))
    test = (str(node.path), getattr(node, "originalname", node.name), others)
    results = request.config.stash[_RESULTS]

    def record(key: str, value: Any) -> None:
        first = results.setdefault((*test, key), (placement, value))
        if first[0] != placement and first[1] != value:
            raise PlacementMismatch(
                f"{key!r} differs between placements: {first[0]} gave {first[1]!r}, {placement} gave {value!r}"
            )

    return record
