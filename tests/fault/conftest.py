"""The fault suite runs only when asked for (``./dev test -m fault tests/fault``, as ``.ci/run``
does): the README's test command (``./dev test --aiwfe-seeds=1,2,3``) leaves it out, so
nothing runs twice and the default run stays short. Figures the tests record with
``record_property`` are printed in the terminal summary, one JSON line each."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _asked_for(config: pytest.Config) -> bool:
    if re.search(r"(?<!not )\bfault\b", config.option.markexpr or ""):
        return True
    for arg in config.args:
        path = Path(str(arg).split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _asked_for(config):
        return
    mine = [it for it in items if HERE in Path(str(it.path)).parents]
    if mine:
        config.hook.pytest_deselected(items=mine)
        items[:] = [it for it in items if it not in mine]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = [
        f"{r.nodeid.rsplit('::', 1)[-1]} {name}: {value}"
        for outcome in ("passed", "failed")
        for r in terminalreporter.stats.get(outcome, [])
        if getattr(r, "when", "") == "call"
        for name, value in r.user_properties
    ]
    if lines:
        terminalreporter.section("fault figures")
        for line in lines:
            terminalreporter.write_line(line)
