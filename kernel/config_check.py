"""Checking a plugin's config the same way in ``aiwfe check`` and in a starting pod.

:func:`config_problems` finds every problem of one plugin's config table at once: misspelled
keys (with the closest known one), types (the plugin's ``Config`` Struct), the plugin's own
:meth:`Plugin.validate_config <aiwfe.kernel.plugin.Plugin.validate_config>` (closed sets of
values, fields that depend on each other; :func:`one_of` helps), and
:attr:`Plugin.config_addresses <aiwfe.kernel.plugin.Plugin.config_addresses>` (config values
naming contracts that some pod of the manifest must serve, e.g. the gateway's ``job_kinds``).
:func:`handler_options` does the same for a pod's handler overrides.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from ._config_keys import did_you_mean, strip_unknown, unknown_keys
from .manifest import Manifest
from .plugin import HandlerOptions, Plugin, config_type, handlers_of
from .registry import discover, resolve

__all__ = ["config_problems", "handler_options", "manifest_served", "one_of", "problem_text", "served_contracts"]


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
    Returns the config (None when it does not convert; not to be used when any problem is
    returned) and every problem as a ``(message, hint)`` pair: unknown keys with the closest
    known one, type errors, the plugin's :meth:`Plugin.validate_config` findings, addresses
    no pod serves.
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


def manifest_served(manifest: Manifest) -> dict[str, str] | None:
    """:func:`served_contracts` of every plugin of the manifest; None when one of them does not
    import here (a pod's image may lack another pod's plugins: only ``aiwfe check`` can tell)."""
    installed = discover()
    try:
        return served_contracts(resolve(p, installed) for pod in manifest.pods.values() for p in pod.plugins)
    except Exception:
        return None


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
