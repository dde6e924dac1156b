"""Contracts: frozen msgspec Structs whose tag is their address.

A contract is one message type. Three kinds exist:

* :class:`Request` ``[R]`` -- a synchronous call answered by a reply Struct ``R``;
* :class:`Job` ``[R]`` -- a durable unit of work (always JetStream), its result ``R``;
* :class:`Event` -- fire-and-forget fan-out to every subscriber.

The tag is the address: ``class Recall(Request[RecallResult], tag="memory.recall")``.
New fields must always get defaults so that older senders keep working; the schema
hash (:func:`schema_hash`) lets a receiver detect a sender on a different contract
version and fail with a clear error instead of mis-decoding.

A request whose handler may run twice for one call without harm (a pure function of its
input, a read) declares it by also deriving from :class:`Idempotent`:
``class Recall(Request[RecallResult], Idempotent, tag="memory.recall")``. When the pod
serving such a call is lost mid-call, the kernel calls again once (another replica, or the
restarted pod); any other call fails at once with the retryable ``PeerLost``.
"""

from __future__ import annotations

import hashlib
import re
import sys
import typing
from typing import Any, Generic, TypeVar

import msgspec

__all__ = [
    "ADDRESS_RE", "Event", "Idempotent", "Job", "Message", "Reply", "Request", "address_of", "kind_of", "reply_type",
    "schema_hash",
]  # fmt: skip

R = TypeVar("R")

#: An address is two or more dot-separated lowercase tokens: ``memory.recall``.
ADDRESS_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every addressed contract. Do not subclass directly."""


class Request(Message, Generic[R]):
    """An RPC request; ``R`` is its reply Struct."""


class Job(Message, Generic[R]):
    """A durable job; ``R`` is its result Struct."""


class Event(Message):
    """A fire-and-forget event delivered to every subscriber."""


class Idempotent:
    """Marks a request contract idempotent (module docstring): list it after ``Request[R]``.
    It adds no field, so the schema hash is unchanged."""

    __slots__ = ()


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    """Convenience base for reply and result Structs (any frozen Struct will do)."""


_KINDS: dict[type, str] = {Request: "request", Job: "job", Event: "event"}


def address_of(cls: type) -> str:
    """Return the address (msgspec tag) of contract class ``cls``.

    Raises:
        TypeError: ``cls`` is not a contract or its tag is not a dotted lowercase address.
    """
    if not (isinstance(cls, type) and issubclass(cls, Message)):
        raise TypeError(f"{cls!r} is not a contract (subclass Request, Job or Event)")
    tag = cls.__struct_config__.tag
    if not isinstance(tag, str) or not ADDRESS_RE.match(tag):
        raise TypeError(
            f"contract {cls.__qualname__} has tag {tag!r}; give it an address such as "
            f'`class {cls.__name__}(..., tag="plugin.op")`'
        )
    return tag


def kind_of(cls: type) -> str:
    """Return ``"request"``, ``"job"`` or ``"event"`` for a contract class.

    Raises:
        TypeError: ``cls`` is not a contract.
    """
    for base, kind in _KINDS.items():
        if isinstance(cls, type) and issubclass(cls, base):
            return kind
    raise TypeError(f"{cls!r} is not a contract (subclass Request, Job or Event)")


_reply_cache: dict[type, type | None] = {}


def reply_type(cls: type) -> type | None:
    """Return the reply Struct of a Request, the result Struct of a Job, None for an Event.

    Raises:
        TypeError: a Request or Job was declared without its type parameter.
    """
    try:
        return _reply_cache[cls]
    except KeyError:
        pass
    found: Any = None
    if kind_of(cls) != "event":
        for klass in cls.__mro__:
            for base in getattr(klass, "__orig_bases__", ()):
                origin = typing.get_origin(base)
                if origin in (Request, Job):
                    (found,) = typing.get_args(base)
                    break
            if found is not None:
                break
        if found is None or isinstance(found, TypeVar):
            raise TypeError(
                f"contract {cls.__qualname__} must name its reply: "
                f"`class {cls.__name__}({kind_of(cls).title()}[MyResult], tag=...)`"
            )
        if isinstance(found, (str, typing.ForwardRef)):
            name = found if isinstance(found, str) else found.__forward_arg__
            found = vars(sys.modules[cls.__module__])[name]
    _reply_cache[cls] = found
    return typing.cast("type | None", found)


_hash_cache: dict[type, str] = {}


def schema_hash(cls: type) -> str:
    """Return a short stable hash of the JSON schema of ``cls`` (and its reply).

    Two pods agree on a contract exactly when these hashes match.
    """
    try:
        return _hash_cache[cls]
    except KeyError:
        pass
    types: list[Any] = [cls]
    rt = reply_type(cls) if issubclass(cls, Message) else None
    if rt is not None:
        types.append(rt)
    _, defs = msgspec.json.schema_components(types)
    digest = hashlib.sha256(msgspec.json.encode(defs, order="sorted")).hexdigest()[:16]
    _hash_cache[cls] = digest
    return digest
