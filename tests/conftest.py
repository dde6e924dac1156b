"""Shared helpers; the fixtures of real servers and isolated prefixes are aiwfe.testing's."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

# The project installs as one namespace (aiwfe.kernel, aiwfe.bus, aiwfe.plugins, aiwfe.bench, aiwfe.testing).
# The checkout is on sys.path when pytest runs from it, so a stray `import kernel` would
# load a second copy of a module (and its metrics registry) from the folder: refuse it.
_FOLDERS = frozenset({"kernel", "bus", "plugins", "bench", "testing"})


class _NoTopLevelFolders:
    @staticmethod
    def find_spec(name: str, path: object = None, target: object = None) -> None:
        if name.partition(".")[0] in _FOLDERS:
            raise ImportError(f"import aiwfe.{name}, not {name}: the folders install under the aiwfe namespace")
        return None


sys.meta_path.insert(0, _NoTopLevelFolders)


# nats_url, database_url, redis_url, qdrant_url, prefix, pg_url, cleanup_streams and the
# placement runner (aiwfe_system, the aiwfe_placements marker) come from the aiwfe.testing
# pytest plugin (pyproject's pytest11 entry point, testing/plugin.py).


async def wait_until(pred, timeout_s: float = 10.0, every_s: float = 0.02) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``pred`` (sync or async) until true; False on timeout."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        r = pred()
        if asyncio.iscoroutine(r):
            r = await r
        if r:
            return True
        await asyncio.sleep(every_s)
    return False


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
