"""Plugin discovery (validation of a plugin class: :func:`aiwfe.kernel.plugin.validate_plugin_class`;
of whole manifests: :mod:`aiwfe.kernel.tools.check`).

Plugins are found through the ``aiwfe.plugins`` entry-point group (the in-repo plugins
register there exactly like a third-party package would). A manifest may also name a
plugin by import path, ``"package.module:ClassName"``, which is how tests add plugins
that are not installed.
"""

from __future__ import annotations

import importlib
import importlib.metadata

from .plugin import Plugin

__all__ = ["discover", "resolve"]

ENTRY_POINT_GROUP = "aiwfe.plugins"


def discover() -> dict[str, str]:
    """Return installed plugins: name → ``module:Class`` (not imported yet)."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def resolve(name: str, installed: dict[str, str] | None = None) -> type[Plugin]:
    """Import the plugin class a manifest names (entry-point name or ``module:Class``).

    Raises:
        LookupError: unknown name, with the installed names as a hint.
        ImportError: the plugin's module failed to import.
    """
    installed = discover() if installed is None else installed
    target = installed.get(name) or (name if ":" in name else None)
    if target is None:
        raise LookupError(
            f"unknown plugin {name!r}; installed: {', '.join(sorted(installed)) or 'none'} "
            "(install its package, or name it as 'module:Class')"
        )
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]
