"""Misspelled keys: find the keys of a raw TOML/JSON table that a msgspec type does not know,
with a "did you mean" for each (difflib), and strip them so the rest can still be checked.

msgspec's ``forbid_unknown_fields`` stops at the first unknown key and offers no
suggestion; :func:`unknown_keys` finds every one at any depth (nested Structs, lists and
dicts of them, optional Structs).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import msgspec
import msgspec.inspect as mi

__all__ = ["UnknownKey", "did_you_mean", "did_you_mean_keys", "strip_unknown", "unknown_keys"]


class UnknownKey(msgspec.Struct, frozen=True):
    """A key of ``path`` that the type does not have; ``known`` lists the keys it does."""

    path: str
    key: str
    known: tuple[str, ...]

    def message(self) -> str:
        """``unknown key 'provder'`` (``in <path>`` when nested)."""
        return f"unknown key {self.key!r}" + (f" in {self.path}" if self.path else "")

    def hint(self) -> str:
        """The closest known key, else every known key."""
        return did_you_mean(self.key, self.known)


def did_you_mean(word: str, known: Iterable[str], *, what: str = "known") -> str:
    """Return ``did you mean 'x'?`` for the closest of ``known``, else ``<what>: a, b, c``."""
    known = sorted(set(known))
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"{what}: {', '.join(known) or 'none'}"


def _struct_info(t: mi.Type) -> mi.StructType | None:
    if isinstance(t, mi.StructType):
        return t
    if isinstance(t, mi.UnionType):
        for member in t.types:
            if isinstance(member, mi.StructType):
                return member
    return None


def _walk(raw: Any, t: mi.Type, path: str, found: list[UnknownKey], strip: bool) -> Any:
    info = _struct_info(t)
    if info is not None and isinstance(raw, dict):
        fields = {f.encode_name: f for f in info.fields}
        out = {}
        for key, value in raw.items():
            if key not in fields and info.forbid_unknown_fields:
                found.append(UnknownKey(path, str(key), tuple(fields)))
                continue
            if key not in fields:
                out[key] = value
                continue
            out[key] = _walk(value, fields[key].type, f"{path}.{key}" if path else str(key), found, strip)
        return out if strip else raw
    if isinstance(t, mi.DictType) and isinstance(raw, dict):
        return {k: _walk(v, t.value_type, f"{path}.{k}" if path else str(k), found, strip) for k, v in raw.items()}
    if isinstance(t, (mi.ListType, mi.VarTupleType, mi.SetType, mi.FrozenSetType)) and isinstance(raw, list):
        return [_walk(v, t.item_type, f"{path}[{i}]", found, strip) for i, v in enumerate(raw)]
    return raw


def unknown_keys(raw: Any, typ: type, path: str = "") -> list[UnknownKey]:
    """Every key in ``raw`` (at any depth) that ``typ``'s Structs do not declare, where the
    Struct forbids unknown fields (one that does not has chosen to ignore them)."""
    found: list[UnknownKey] = []
    _walk(raw, mi.type_info(typ), path, found, strip=False)
    return found


def strip_unknown(raw: Any, typ: type) -> Any:
    """``raw`` without the keys :func:`unknown_keys` reports (a copy; ``raw`` is untouched)."""
    return _walk(raw, mi.type_info(typ), "", [], strip=True)


def did_you_mean_keys(raw: Any, typ: type) -> str:
    """``"; unknown key 'replica' in pods.a (did you mean 'replicas'?)"`` for every unknown key."""
    return "".join(f"; {u.message()} ({u.hint()})" for u in unknown_keys(raw, typ))
