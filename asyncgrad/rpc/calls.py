"""The calls an agent makes: each one's message out, its wait for the reply, its end.

A call names the incarnation of the callee it is for and carries its deadline on Redis's
clock (the callee drops it when late). It ends with the reply's value or error, with
`RPCTimeout` when its timeout (which bounds the whole call) runs out, or, when the callee
is suspected meanwhile (`suspect`), with `WorkerUnavailable` if the callee had not taken
it yet (it is withdrawn from the callee's inbox: it will never run) or `OutcomeUnknown` if
it had.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from asyncgrad.codec import UnencodableError, path_text
from asyncgrad.errors import (
    CodecError,
    OutcomeUnknown,
    RemoteError,
    RpcError,
    RPCTimeout,
    RRefReleased,
    TransferLost,
    TransportError,
    WorkerUnavailable,
)
from asyncgrad.messages import Call, Header, Kind, Reply
from asyncgrad.rpc.lifecycle import Lifecycle
from asyncgrad.rpc.liveness import Liveness
from asyncgrad.rpc.references import References
from asyncgrad.rpc.seam import AutogradSeam
from asyncgrad.rpc.server import TRACE, UNANSWERED
from asyncgrad.rpc.wire import Wire
from asyncgrad.tracing import Span
from asyncgrad.transport import Inbound, InboxMissing

__all__ = ["Calls"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Any]
    dest: str
    fn: str
    to_run: str  # the callee's incarnation it was sent to ("" if unknown)
    entry: bytes | None = None  # its stream entry, once stored
    settling: bool = False  # being withdrawn, or found taken, after a suspicion


class Calls:
    """The calls one agent made and still waits for, by message id.

    `rpc_timeout` bounds a call that names no timeout; `failure_timeout` bounds the
    questions asked after Redis lost this agent's inbox (`recheck`).
    """

    def __init__(
        self,
        wire: Wire,
        liveness: Liveness,
        references: References,
        autograd: AutogradSeam,
        lifecycle: Lifecycle,
        *,
        rpc_timeout: float,
        failure_timeout: float,
    ) -> None:
        self._wire = wire
        self._liveness = liveness
        self._references = references
        self._autograd = autograd
        self._lifecycle = lifecycle
        self.rpc_timeout = rpc_timeout
        self._failure_timeout = failure_timeout
        self._pending: dict[int, _Pending] = {}

    async def make(self, to: str, call: Call, timeout: float | None) -> Any:
        """Send `call` to `to` and return the reply's value (or raise its error)."""
        self._lifecycle.check_running()
        if call.kwargs is not None and not (
            isinstance(call.kwargs, dict) and all(isinstance(k, str) for k in call.kwargs)
        ):
            raise TypeError(f"kwargs must be a dict with str keys, not {call.kwargs!r}")
        what = call.fn or f"rref {call.target}.{call.method or 'to_here'}"
        limit = self.rpc_timeout if timeout is None else timeout
        # One deadline for the whole call: the liveness check and the announcement of
        # passed-on RRefs wait for Redis too, and a caller's timeout bounds all of it.
        expires = asyncio.get_running_loop().time() + limit
        spans = self._wire.spans
        opened = None
        # A trace's own calls are left out of it (their messages still show).
        if spans.enabled and call.fn != TRACE:
            opened = spans.begin(f"{call.label} → {to}", "call", cpu=True)
        with spans.ending(opened) as span:
            try:
                return await self._make_within(to, call, what, expires, span)
            except _Expired:
                raise RPCTimeout(f"{what} on {to!r} got no reply within {limit} s") from None

    async def _make_within(
        self, to: str, call: Call, what: str, expires: float, span: Span | None
    ) -> Any:
        if not self._liveness.seen_alive(to):
            try:
                await _until(expires, self._liveness.ensure_alive(to))
            except TransportError as e:
                e.may_have_run = False  # Redis out of reach before the call left
                raise
        try:
            payload = self._wire.encode(call.to_wire())
        except UnencodableError as e:
            raise _in_arguments(e) from None
        # The built-ins are about the agents, not the step: they join no context (which
        # would make every agent traced or asked a peer of it, waited on by its passes).
        record = None if call.fn in _BUILT_IN else self._autograd.outgoing(to, payload.tensors)
        context = 0 if record is None else record.context
        if span is not None:
            span.context = context
        to_run = self._liveness.incarnation(to)
        now_ms = self._wire.transport.redis_now_ms()
        deadline = 0 if now_ms is None else int(now_ms + (expires - _now()) * 1000) + 1
        header_id, frames = self._wire.frames(
            Kind.CALL, payload, context=record, to_run=to_run, deadline=deadline
        )
        sent = False
        try:
            if passed := self._references.take_passed(payload.rrefs, to):
                await _until(expires, self._references.announce_forks(passed))
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            self._pending[header_id] = _Pending(future, to, what, to_run)
            self._liveness.wanted.set()
            stored = self._wire.send_call(to, frames, (context, header_id))
            sent = True
            stored.add_done_callback(functools.partial(self._on_stored, header_id))
            # A timer bounds the wait for the reply, not `asyncio.timeout`: every call
            # passes here, and the timer costs a fraction of the context manager.
            timer = loop.call_at(expires, _expire, future)
            try:
                return await future
            finally:
                timer.cancel()
        except BaseException as e:
            # A recorded send that never reached its callee must not leave a pass waiting
            # for its gradient: failed, cancelled or timed out before it left, or refused.
            if not sent and isinstance(e, TransportError):
                e.may_have_run = False
            never_arrived = not sent or isinstance(e, WorkerUnavailable)
            never_arrived |= isinstance(e, RemoteError) and e.remote_type == "CodecError"
            if record is not None and never_arrived:
                self._autograd.unsent(to, record)
            raise
        finally:
            self._pending.pop(header_id, None)

    def _on_stored(self, call_id: int, stored: asyncio.Future[bytes]) -> None:
        pending = self._pending.get(call_id)
        if pending is None or stored.cancelled():
            return
        error: BaseException | None = stored.exception()
        if error is None:
            pending.entry = stored.result()
            return
        if isinstance(error, InboxMissing):
            error = WorkerUnavailable(f"no worker named {pending.dest!r} is serving: {error}")
        elif isinstance(error, TransportError):
            # Redis refused to store the call (OOM, NOPERM, too large): it never left.
            error.may_have_run = False
        _fail(pending.future, error)

    def on_reply(self, header: Header, message: Inbound) -> None:
        try:
            payload, tensors = self._wire.decode(message)
            reply = Reply.from_wire(payload)
        except CodecError as e:
            self._wire.dead_letter(message, f"bad reply: {e}")
            pending = self._pending.get(header.reply_to)
            if pending is not None:
                error: Exception = e
                if isinstance(e, TransferLost):  # it ran; its result is gone
                    why = f"the call ran on {header.sender!r}, but its result was lost: {e}"
                    error = OutcomeUnknown(why)
                _fail(pending.future, error)
            return
        self._wire.done(message)
        if header.context is not None:
            self._autograd.incoming(header.sender, header.context, tensors, False)
        pending = self._pending.get(header.reply_to)
        if pending is None:
            logger.debug("event=late_reply call=%d from=%s", header.reply_to, header.sender)
            return
        if reply.error is None:
            if not pending.future.done():
                pending.future.set_result(reply.value)
            return
        if reply.refused:  # a new incarnation answered: look at its heartbeat again
            self._liveness.forget(header.sender)
        _fail(pending.future, _reply_error(reply, header.sender))

    # *** a callee suspected ***

    def suspect(self, callee: str) -> None:
        """`callee` stopped heartbeating: each call in flight to it is withdrawn if it was
        not taken yet (`WorkerUnavailable`), else ends with `OutcomeUnknown`."""
        settling = [
            p
            for p in self._pending.values()
            if p.dest == callee and not p.settling and p.entry is not None
        ]
        if settling and self._lifecycle.running:
            for p in settling:
                p.settling = True
            self._lifecycle.spawn(self._settle(callee, settling))

    async def _settle(self, callee: str, calls: list[_Pending]) -> None:
        entries: dict[bytes, list[_Pending]] = {}
        for p in calls:
            assert p.entry is not None
            entries.setdefault(p.entry, []).append(p)
        for entry, waiting in entries.items():
            try:
                withdrawn = await self._wire.withdraw(callee, entry)
            except TransportError as e:  # Redis out of reach: ask again at the next check
                logger.info("event=withdraw_failed agent=%s error=%s", self._wire.name, e)
                for p in waiting:
                    p.settling = False
                continue
            for p in waiting:
                if withdrawn:
                    error: RpcError = WorkerUnavailable(
                        f"{p.fn} on {callee!r}: the worker stopped heartbeating before it "
                        "took the call, which was withdrawn (it will not run)"
                    )
                else:
                    error = OutcomeUnknown(
                        f"{p.fn} on {callee!r}: the worker took the call, then stopped "
                        "heartbeating (it may have run, or may still run)"
                    )
                _fail(p.future, error)
        logger.info(
            "event=calls_settled agent=%s callee=%s calls=%d", self._wire.name, callee, len(calls)
        )

    # *** for liveness and shutdown ***

    def callees(self) -> set[str]:
        """The agents calls wait for."""
        return {p.dest for p in self._pending.values()}

    def waiting(self) -> list[asyncio.Future[Any]]:
        """The futures of the calls in flight (a graceful shutdown waits for them)."""
        return [p.future for p in self._pending.values()]

    async def recheck(self) -> None:
        """Redis lost this agent's inbox: ask each callee which of the calls in flight it
        still has, and fail the others now (their request or their reply went with Redis's
        data) rather than at their timeout."""
        waiting: dict[str, list[int]] = {}
        for call_id, pending in self._pending.items():
            if pending.fn != UNANSWERED:
                waiting.setdefault(pending.dest, []).append(call_id)
        await asyncio.gather(*(self._recheck(dest, ids) for dest, ids in waiting.items()))

    async def _recheck(self, dest: str, call_ids: list[int]) -> None:
        name, limit = self._wire.name, self._failure_timeout
        deadline, delay = time.monotonic() + limit, 0.05
        while True:
            try:
                known = await self.make(dest, Call(UNANSWERED, (name,)), limit)
                break
            except WorkerUnavailable:
                # Its inbox may not be back yet: its reader reconnects with a backoff too.
                if time.monotonic() + delay > deadline:
                    return  # cannot ask: liveness and the calls' timeouts still bound them
                await asyncio.sleep(delay)  # retry timer
                delay *= 2
            except (RpcError, TransportError) as e:
                logger.info("event=recheck_failed agent=%s callee=%s error=%s", name, dest, e)
                return
        lost = set(call_ids) - set(known)
        logger.info(
            "event=rechecked agent=%s callee=%s calls=%d lost=%d",
            name, dest, len(call_ids), len(lost),
        )  # fmt: skip
        for call_id in lost:
            pending = self._pending.get(call_id)
            if pending is not None:
                _fail(
                    pending.future,
                    TransportError(
                        f"{pending.fn} on {dest!r}: Redis lost its data while the call was in "
                        "flight (restarted without persistence?); its request or reply is gone"
                    ),
                )

    def fail(self, error: BaseException, dest: str | None = None) -> None:
        """End the calls to `dest` (None: all calls) with `error`."""
        for pending in self._pending.values():
            if dest is None or pending.dest == dest:
                _fail(pending.future, error)


_BUILT_IN = frozenset({TRACE, UNANSWERED})


class _Expired(Exception):
    """A call's deadline passed (`Calls.make` turns it into `RPCTimeout`)."""


async def _until(expires: float, work: Awaitable[T]) -> T:
    """`await work`, or `_Expired` once the loop's clock reaches `expires`."""
    deadline = asyncio.timeout_at(expires)
    try:
        async with deadline:
            return await work
    except TimeoutError:
        if deadline.expired():
            raise _Expired from None
        raise


def _now() -> float:
    return asyncio.get_running_loop().time()


def _reply_error(reply: Reply, callee: str) -> RpcError:
    """The error a caller raises for an error reply."""
    assert reply.error is not None
    kind, text, tb = reply.error
    if reply.refused and kind in _REFUSALS:
        return _REFUSALS[kind](text, callee)
    return RemoteError(kind, text, worker=callee, remote_traceback=tb)


_REFUSALS: dict[str, Callable[[str, str], RpcError]] = {
    "WorkerUnavailable": lambda text, _: WorkerUnavailable(text),
    "OutcomeUnknown": lambda text, _: OutcomeUnknown(text),
    "RRefReleased": lambda text, callee: RRefReleased(text, worker=callee),
}


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(_Expired())


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _in_arguments(error: UnencodableError) -> TypeError:
    """`error` placed from the caller's arguments down (`args[0]['layers']`, `kwargs['x']`)
    rather than from the message that carries them."""
    if error.steps and error.steps[0][0] == "item":
        name = Call.VALUE_FIELDS.get(error.steps[0][1])
        if name is not None:
            return error.restated(f"at {name}{path_text(error.steps[1:])}")
    return error
