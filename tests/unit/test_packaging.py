"""The install: one `aiwfe` namespace in the wheel, nothing else at the top level."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {
    "kernel": "aiwfe.kernel",
    "bus": "aiwfe.bus",
    "plugins": "aiwfe.plugins",
    "bench": "aiwfe.bench",
    "testing": "aiwfe.testing",
}


def _packages_on_disk() -> set[str]:
    found = set()
    for folder, dotted in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((dotted, *rel)))
        for data in (*(ROOT / folder).rglob("migrations"), *(ROOT / folder).rglob("static")):
            found.add(".".join((dotted, *data.relative_to(ROOT / folder).parts)))  # data-only packages
    return found


def test_every_package_on_disk_is_listed_in_pyproject() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"] == {v: k for k, v in FOLDERS.items()}
    assert set(cfg["packages"]) == _packages_on_disk()


@pytest.mark.slow
def test_wheel_has_only_the_aiwfe_namespace(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("aiwfe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"aiwfe"}
    assert "aiwfe/__init__.py" not in names  # a namespace package
    for pkg in _packages_on_disk():
        assert any(n.startswith(pkg.replace(".", "/") + "/") for n in names), pkg
    # data files travel with their packages
    assert any(n.startswith("aiwfe/plugins/auth/migrations/") and n.endswith(".sql") for n in names)
    assert "aiwfe/plugins/gateway/static/index.html" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "aiwfe = aiwfe.kernel.tools.cli:main" in text
    assert "gateway = aiwfe.plugins.gateway.plugin:GatewayPlugin" in text
    assert "[pytest11]\naiwfe = aiwfe.testing.plugin" in text  # the pytest plugin loads wherever aiwfe is installed
    assert "aiwfe/testing/plugin.py" in names
