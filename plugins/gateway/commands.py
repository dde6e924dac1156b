"""The WebSocket command protocol: what a client's frames do once the socket is open.

:class:`Commands` decodes each client frame (:mod:`~aiwfe.plugins.gateway.frames`) and
dispatches it: ``ping`` → ``pong``; ``submit`` → ``accepted``, then the job's events and its
``result``; ``resume`` → the events of an own job after a sequence; ``cancel`` → ``cancelled``;
``call`` → ``reply`` of an allowed request contract (``ws_calls``; its ``owner`` field, if it has
one, is the socket's user whatever the frame says). Failures answer with an
``error`` frame carrying ``code`` (the remote error's type, or the kernel error's code),
``message``, the frame's ``id`` and, for retryable errors, ``retry_after_s``.

Limits: at most :data:`MAX_CALLS_IN_FLIGHT` commands run at once per socket and at most
:data:`MAX_FOLLOWED_JOBS` jobs are followed (``too_many_in_flight`` / ``too_many_followed``
otherwise: the job was accepted, only not followed; resume it later). A ``submit`` past the
user's job slots of the kind (:mod:`aiwfe.kernel.quotas`) is answered ``too_many_jobs`` with
``retry_after_s``, a budget over the server's cap ``bad_input`` naming the field; the socket
stays open. Someone else's job is indistinguishable from no job (``not_found``). The frames go out through the connection
(:class:`FrameSink`), which owns the send queue and its slow-reader policy
(:mod:`~aiwfe.plugins.gateway.ws`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, Protocol

import msgspec

from aiwfe.kernel import AiwfeError, RemoteError, acting_for

from . import frames
from .frames import TERMINAL
from .limits import check_ranges, finished_last_seq, past_end, running_past_end, too_deep
from .services import GatewayServices

__all__ = ["MAX_CALLS_IN_FLIGHT", "MAX_FOLLOWED_JOBS", "Commands", "FrameSink"]

log = logging.getLogger("aiwfe.gateway.ws")

MAX_CALLS_IN_FLIGHT = 16
MAX_FOLLOWED_JOBS = 64
#: Jobs a socket remembers to cancel when it closes, oldest out: a job not followed is never seen to
#: end, so the list grew with the socket's life (and close() cancels each). Past the users' job limits
#: (``max_per_owner`` per kind, 64 by default) the oldest have finished.
MAX_CANCEL_ON_DISCONNECT = 1024
#: A ``call`` contract's field naming the user it acts for (``memory.recall``, ``memory.remember``):
#: set to the socket's user, never taken from the frame, or one user could read and write another's memories.
OWNER = "owner"
_input_decoders: dict[type, msgspec.json.Decoder[Any]] = {}  # per call contract: a frame's raw input → the request


class FrameSink(Protocol):
    """Where server frames go (the connection's send queue)."""

    def push(self, frame: dict[str, Any]) -> bool:
        """Queue a reply frame at once; False when it was not queued."""

    async def put(self, frame: dict[str, Any]) -> bool:
        """Queue a job event, waiting (bounded) for space; False when it was not queued."""


class Commands:
    """The command state of one socket of user ``sub``: running commands, followed jobs."""

    def __init__(self, services: GatewayServices, out: FrameSink, sub: str) -> None:
        self.services = services
        self.kernel = services.kernel
        self.out = out
        self.sub = sub
        self.followers: dict[str, asyncio.Task[None]] = {}
        self.calls: set[asyncio.Task[None]] = set()
        self.cancel_on_disconnect: dict[str, None] = {}  # in submission order (see MAX_CANCEL_ON_DISCONNECT)

    def dispatch(self, data: str | bytes) -> None:
        """Decode one client frame and start what it asks for (never blocks)."""
        depth = self.services.config.max_frame_depth
        if too_deep(data, depth):
            self.out.push({"type": "error", "code": "bad_frame", "message": f"frame nested deeper than {depth} levels"})
            return
        try:
            frame = frames.decode_frame(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.out.push({"type": "error", "code": "bad_frame", "message": str(e)})
            return
        match frame:
            case frames.Ping():
                self.out.push({"type": "pong", "id": frame.id})
            case frames.Submit():
                self._spawn(self._submit(frame))
            case frames.Resume():
                self._spawn(self._resume(frame))
            case frames.Cancel():
                self._spawn(self._cancel(frame))
            case frames.Call():
                self._spawn(self._call(frame))

    async def close(self) -> None:
        """Stop every command and follower; then cancel the jobs submitted with
        ``cancel_on_disconnect`` that have not finished (failures are logged)."""
        tasks = [*self.followers.values(), *self.calls]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        for job_id in list(self.cancel_on_disconnect):
            try:
                await self.kernel.cancel_job(job_id, "client disconnected")
            except AiwfeError as e:
                log.warning("ws: cancelling job %s on disconnect failed: %s", job_id, e)

    def _cancel_later(self, job_id: str) -> None:
        c = self.cancel_on_disconnect
        c[job_id] = None
        if len(c) > MAX_CANCEL_ON_DISCONNECT:
            del c[next(iter(c))]

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if len(self.calls) >= MAX_CALLS_IN_FLIGHT:
            coro.close()
            self.out.push({"type": "error", "code": "too_many_in_flight", "message": f"at most {MAX_CALLS_IN_FLIGHT} at once"})
            return
        t = asyncio.get_running_loop().create_task(coro)
        self.calls.add(t)
        t.add_done_callback(self.calls.discard)

    def _error(self, e: AiwfeError, ref: str = "", **extra: Any) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "error", "code": e.code, "message": e.message, "id": ref, **extra}
        if isinstance(e, RemoteError):
            frame["code"] = e.type
        if e.retryable:
            frame["retry_after_s"] = self.services.retry_after_s(e)
        return frame

    async def _submit(self, f: frames.Submit) -> None:
        job_kinds = self.services.config.job_kinds
        address = job_kinds.get(f.kind)
        if address is None:
            known = ", ".join(sorted(job_kinds)) or "none configured"
            self.out.push(
                {"type": "error", "code": "unknown_kind", "message": f"unknown job kind {f.kind!r}; known: {known}", "id": f.id}
            )
            return
        submitting = asyncio.ensure_future(self.services.submit(address, f.input, self.sub, f.idempotency_key))
        try:
            job_id = await asyncio.shield(submitting)
        except asyncio.CancelledError:
            # The socket closed mid-submit. A submission cut short may leave its job queued, or
            # one of the user's job slots held until its lease ends for a job never queued
            # (kernel.submitting): it runs to its end, so that a cancel_on_disconnect job is
            # cancelled with the socket's others (close() waits for this task).
            with contextlib.suppress(BaseException):
                job_id = await asyncio.shield(submitting)
                if f.cancel_on_disconnect:
                    self._cancel_later(job_id)
            raise
        except AiwfeError as e:
            self.out.push(self._error(e, f.id))
            return
        if f.cancel_on_disconnect:
            self._cancel_later(job_id)
        self.out.push({"type": "accepted", "id": f.id, "job_id": job_id})
        self._follow(job_id, 0)

    async def _owned(self, job_id: str, ref: str) -> bool:
        """True when this socket's user owns ``job_id``; else an error frame (``not_found``:
        someone else's job is indistinguishable from no job)."""
        try:
            if await self.services.owns(job_id, self.sub):
                return True
        except AiwfeError as e:
            self.out.push(self._error(e, ref, job_id=job_id))
            return False
        self.out.push({"type": "error", "code": "not_found", "message": f"no job {job_id}", "id": ref, "job_id": job_id})
        return False

    async def _resume(self, f: frames.Resume) -> None:
        if not await self._owned(f.job_id, f.id):
            return
        after = f.after_seq
        try:
            last = await finished_last_seq(self.kernel, f.job_id, after)
            if last is None and (now := await running_past_end(self.kernel, f.job_id, after)) is not None:
                last = now  # refused below: past the running job's last event
        except AiwfeError as e:
            self.out.push(self._error(e, f.id, job_id=f.job_id))
            return
        if last is not None and after > last:
            self.out.push(
                {"type": "error", "code": "bad_frame", "message": past_end(after, last), "id": f.id, "job_id": f.job_id}
            )
            return
        if last is not None and after == last:
            after = last - 1  # the client saw the end: send the result again rather than wait forever
        self._follow(f.job_id, after)

    async def _cancel(self, f: frames.Cancel) -> None:
        if not await self._owned(f.job_id, f.id):
            return
        try:
            cancelled = await self.kernel.cancel_job(f.job_id, "cancelled by the client")
        except AiwfeError as e:
            self.out.push(self._error(e, f.id, job_id=f.job_id))
            return
        self.out.push({"type": "cancelled", "id": f.id, "job_id": f.job_id, "cancelled": cancelled})

    async def _call(self, f: frames.Call) -> None:
        contract = self.services.ws_calls.get(f.contract)
        if contract is None:
            self.out.push(
                {"type": "error", "code": "unknown_contract", "message": f"{f.contract!r} may not be called here", "id": f.id}
            )
            return
        try:
            if (decoder := _input_decoders.get(contract)) is None:
                decoder = _input_decoders[contract] = msgspec.json.Decoder(contract)
            req: Any = decoder.decode(f.input)
            check_ranges(f.contract, req)
        except (msgspec.DecodeError, ValueError) as e:  # ValidationError is a DecodeError
            self.out.push({"type": "error", "code": "bad_frame", "message": f"{f.contract}: {e}", "id": f.id})
            return
        if OWNER in getattr(contract, "__struct_fields__", ()):  # as the HTTP routes: the socket's user, whatever the frame said
            req = msgspec.structs.replace(req, **{OWNER: self.sub})
        try:
            with acting_for(self.sub):  # queued fairly with this user's other work, wherever it lands
                reply: Any = await self.kernel.call(req, timeout_s=self.services.config.call_timeout_s)
        except AiwfeError as e:
            self.out.push(self._error(e, f.id))
            return
        self.out.push({"type": "reply", "id": f.id, "result": reply})  # the JSON encoder takes the Struct as it is

    def _follow(self, job_id: str, after_seq: int) -> None:
        old = self.followers.pop(job_id, None)
        if old is not None:
            old.cancel()
        elif len(self.followers) >= MAX_FOLLOWED_JOBS:
            msg = f"at most {MAX_FOLLOWED_JOBS} jobs followed per socket; wait for results or reconnect"
            # not too_many_jobs: that one means "not submitted"; this job was accepted, only not followed
            self.out.push({"type": "error", "code": "too_many_followed", "message": msg, "job_id": job_id})
            return
        t = asyncio.get_running_loop().create_task(self._follow_job(job_id, after_seq))
        self.followers[job_id] = t
        t.add_done_callback(lambda _t: self.followers.pop(job_id, None) if self.followers.get(job_id) is _t else None)

    async def _follow_job(self, job_id: str, after_seq: int) -> None:
        try:
            async for ev in self.kernel.job_events(job_id, after_seq):
                status = TERMINAL.get(ev.type)
                if status is None:
                    event = {"type": "event", "job_id": job_id, "seq": ev.seq, "event": ev.type, "data": ev.data}
                    if not await self.out.put(event):
                        return
                    continue
                frame: dict[str, Any] = {"type": "result", "job_id": job_id, "seq": ev.seq, "status": status}
                frame["result" if status == "done" else "error"] = ev.data
                await self.out.put(frame)
                self.cancel_on_disconnect.pop(job_id, None)
                return
        except AiwfeError as e:
            self.out.push(self._error(e, job_id=job_id))
