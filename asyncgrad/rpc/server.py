"""The serving side of an agent: each call that arrives runs, and its result or error
goes back to the caller as the reply.

Exposed sync functions run on the event loop (keep them short or make them async and
offload with `asyncio.to_thread`); async ones run as tasks the agent drains on shutdown.
Each call served is a span ("serve"), from the start of its run until its reply leaves.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import traceback
from collections.abc import Callable
from types import FunctionType
from typing import Any

from asyncgrad.codec import UnencodableError, path_text
from asyncgrad.errors import (
    CodecError,
    NotExposedError,
    RpcError,
    RRefReleased,
    TransferLost,
    TransportError,
)
from asyncgrad.messages import Call, ContextRecord, Header, Kind, Reply
from asyncgrad.rpc import exposed
from asyncgrad.rpc.lifecycle import Lifecycle
from asyncgrad.rpc.references import Passed, References
from asyncgrad.rpc.seam import AutogradSeam
from asyncgrad.rpc.wire import Wire
from asyncgrad.tracing import Span
from asyncgrad.transport import Inbound, ReplyError

__all__ = ["TRACE", "UNANSWERED", "Server"]

logger = logging.getLogger(__name__)


# A function every agent serves by itself: which calls from a caller it has not answered
# yet (`Server.unanswered`). A caller asks it after Redis lost its inbox (`Calls.recheck`).
UNANSWERED = "asyncgrad.unanswered"
# Another: this agent's recent spans (`Spans.dump(context_id)`), for `Agent.trace`.
TRACE = "asyncgrad.trace"


class Server:
    """Runs the calls that arrive at one agent and sends their replies.

    Each call runs in a fresh `serving_context()`; `make_rref(value)` makes the RRef that
    a call with `make_rref` returns; `trace(context_id)` answers `TRACE`.
    """

    def __init__(
        self,
        wire: Wire,
        references: References,
        autograd: AutogradSeam,
        lifecycle: Lifecycle,
        serving_context: Callable[[], contextvars.Context],
        make_rref: Callable[[Any], Any],
        trace: Callable[[int | None], dict[str, Any]],
    ) -> None:
        self._wire = wire
        self._trace = trace
        self._references = references
        self._autograd = autograd
        self._lifecycle = lifecycle
        self._serving_context = serving_context
        self._make_rref = make_rref
        # (caller, message id) of the calls being served, or whose reply is not stored yet.
        self._unanswered: set[tuple[str, int]] = set()

    def unanswered(self, caller: str) -> list[int]:
        """The message ids of the calls from `caller` not answered yet."""
        return [call_id for who, call_id in self._unanswered if who == caller]

    def on_call(self, header: Header, message: Inbound) -> None:
        """Run the call (a sync function at once, an async one as a task), then reply."""
        if self._lifecycle.state == "closing":
            # Past the drain nothing new is served: the caller learns that this agent is
            # gone as for any agent that stops, by its heartbeat.
            logger.debug("event=call_dropped agent=%s caller=%s", self._wire.name, header.sender)
            self._wire.done(message)
            return
        transport = self._wire.transport
        # For an earlier incarnation: sent while it was the one under this name (a caller
        # that learns of this one later is not refused: the earlier one could not take it).
        if (
            header.to_run
            and header.to_run != transport.incarnation
            and message.stored_ms < transport.started_ms
        ):
            self._discard(header, message)
            self._reply(header, self._refusal(header, message))
            return
        now_ms = transport.redis_now_ms()
        if header.deadline and now_ms is not None and now_ms > header.deadline:
            # Its caller gave up on it already (it took us too long to read it).
            logger.info(
                "event=late_call_dropped agent=%s caller=%s late_ms=%d",
                self._wire.name, header.sender, now_ms - header.deadline,
            )  # fmt: skip
            self._discard(header, message)
            return
        self._unanswered.add((header.sender, header.id))
        context = self._serving_context()
        try:
            payload, tensors = self._wire.decode(message)
            call = Call.from_wire(payload)
        except TransferLost as e:
            # The call never ran, and never will: its caller may send it again.
            self._wire.dead_letter(message, f"call's data lost: {e}")
            why = f"{self._wire.name!r} could not fetch the call's arguments: {e}"
            refusal = Reply(error=("WorkerUnavailable", why, ""), refused=True)
            context.run(self._reply, header, refusal)
            return
        except CodecError as e:
            self._wire.dead_letter(message, f"bad call: {e}")
            context.run(self._reply, header, Reply(error=("CodecError", str(e), "")))
            return
        span = None
        if self._wire.spans.enabled and call.fn != TRACE:  # a trace's gathering is not in it
            span = self._wire.spans.begin(
                call.label,
                "serve",
                0 if header.context is None else header.context.context,
                args={"caller": header.sender},
                cpu=True,
            )
        try:
            if header.context is not None:
                context.run(self._autograd.incoming, header.sender, header.context, tensors, True)
            fn = self._resolve(call)
            result = context.run(fn, *call.args, **(call.kwargs or {}))
        except Exception as e:
            context.run(self._reply_error, header, call, e)
            self._wire.done(message)
            self._wire.spans.end(span, error=type(e).__name__)
            return
        if inspect.isawaitable(result):
            self._lifecycle.spawn(self._finish(header, call, result, message, span), context)
            return
        with self._wire.spans.ending(span):
            context.run(self._reply_result, header, call, result)
            self._wire.done(message)

    def _refusal(self, header: Header, message: Inbound) -> Reply:
        """What a call for an earlier incarnation of this agent gets."""
        if message.redelivered:  # that incarnation took it, and may have run it
            why = (
                f"{self._wire.name!r} was started again: its earlier incarnation "
                f"{header.to_run} took the call and stopped (it may have run)"
            )
            return Reply(error=("OutcomeUnknown", why, ""), refused=True)
        why = (
            f"{self._wire.name!r} was started again: the call was for its earlier "
            f"incarnation {header.to_run}, and did not run"
        )
        return Reply(error=("WorkerUnavailable", why, ""), refused=True)

    def _discard(self, header: Header, message: Inbound) -> None:
        """A call that will not run: what it carried that counts still counts down (its
        RRefs are released once collected; contexts it released are released)."""
        with contextlib.suppress(CodecError):
            self._wire.decode(message)
        if header.context is not None and header.context.released:
            released = ContextRecord(0, 0, header.context.released)
            self._autograd.incoming(header.sender, released, [], False)
        self._wire.done(message)

    async def _finish(
        self, header: Header, call: Call, result: Any, message: Inbound, span: Span | None
    ) -> None:
        try:
            value = await result
        except Exception as e:
            self._reply_error(header, call, e)
            self._wire.spans.end(span, error=type(e).__name__)
        else:
            self._reply_result(header, call, value)
        finally:
            self._wire.done(message)
            self._wire.spans.end(span)

    def _resolve(self, call: Call) -> Callable[..., Any]:
        if not call.target:
            if call.fn == UNANSWERED:
                return self.unanswered
            if call.fn == TRACE:
                return self._trace
            return exposed.lookup(call.fn, self._wire.name)  # type: ignore[no-any-return]
        value = self._references.owned.get(call.target)
        if not call.method:
            return lambda: value
        if call.method.startswith("_"):
            raise NotExposedError(f"private method {call.method!r} cannot be called remotely")
        # Only an exposed class's methods: an RRef to anything else (an array, a tensor, a
        # dict) can be fetched, but `ndarray.tofile(path)` must not run on the owner.
        if not exposed.is_exposed_class(type(value)):
            raise NotExposedError(
                f"{type(value).__name__} is not an exposed class: "
                f"its method {call.method!r} cannot be called remotely"
            )
        # A method the class defines, not whatever callable an instance attribute holds
        # (`ParameterServer.model(x)` must not be reachable through an RRef).
        defined = inspect.getattr_static(type(value), call.method, None)
        if defined is None and not hasattr(value, call.method):
            raise AttributeError(f"{type(value).__name__!r} object has no method {call.method!r}")
        if not isinstance(defined, FunctionType | staticmethod | classmethod):
            raise NotExposedError(
                f"{type(value).__name__}.{call.method} is not a method of the exposed class"
            )
        method = getattr(value, call.method)
        return method  # type: ignore[no-any-return]

    def _reply_result(self, header: Header, call: Call, value: Any) -> None:
        if call.make_rref:
            value = self._make_rref(value)
        try:
            self._reply(header, Reply(value))
        except UnencodableError as e:
            self._reply_error(header, call, self._in_result(call, value, e))
        except (TypeError, CodecError) as e:
            self._reply_error(header, call, e)

    def _in_result(self, call: Call, value: Any, error: UnencodableError) -> TypeError:
        """`error` placed in what the caller asked for, from the result down, with a hint
        where the usual mistake is known."""
        steps = error.steps
        if steps[:1] == (("item", Reply.VALUE_FIELD),):
            steps = steps[1:]
        at = f", at {path_text(steps)}" if steps else ""
        if call.target and not call.method:
            return error.restated(
                f"in the value to_here() fetches{at}",
                "to_here() copies the value to the caller, so only values that travel can "
                f"be fetched ({error.rule}); call the value's methods with "
                "`rref.rpc_async().method(...)` instead",
            )
        if call.target:
            owned = self._references.owned.get(call.target)
            name = f"{type(owned).__name__}.{call.method}()"
        else:
            name = repr(call.fn)
        if not steps and exposed.is_exposed_class(type(value)):
            return error.restated(
                f"in the return value of {name}",
                "an instance of an exposed class stays on the worker that made it: "
                "`remote()` makes one there and returns an RRef to it",
            )
        return error.restated(f"in the return value of {name}{at}")

    def _reply_error(self, header: Header, call: Call, error: Exception) -> None:
        logger.debug("event=call_failed fn=%s caller=%s error=%r", call.fn, header.sender, error)
        if isinstance(error, RRefReleased):  # the call did not run: its value is gone
            self._reply(header, Reply(error=("RRefReleased", error.message, ""), refused=True))
            return
        tb = "".join(traceback.format_exception(error))
        self._reply(header, Reply(error=(type(error).__name__, str(error), tb)))

    def _reply(self, header: Header, reply: Reply, first: bool = True) -> None:
        payload = self._wire.encode(reply.to_wire())
        record = self._autograd.outgoing(header.sender, payload.tensors)
        reply_id, frames = self._wire.frames(Kind.REPLY, payload, header.id, record)
        traced = (0 if record is None else record.context, reply_id)
        passed = self._references.take_passed(payload.rrefs, header.sender)
        if all(owner == self._wire.name for owner, _, _ in passed):
            self._post(header, frames, traced, first)
            return
        # The result passes on RRefs owned elsewhere: their owners must count the caller
        # before the caller can release them.
        self._lifecycle.spawn(self._send_after_forks(header, passed, frames, traced))

    def _post(
        self, header: Header, frames: list[Any], traced: tuple[int, int], first: bool = True
    ) -> None:
        """Post a reply. If Redis refuses it (OOM, NOPERM, too large), the caller gets an
        error reply with Redis's reason instead: nothing is lost in silence. Each of the
        two may take half the failure window (`resend_for`)."""
        key = (header.sender, header.id)

        def over(error: BaseException | None) -> None:
            if first and isinstance(error, ReplyError):  # Redis answered: it will not store it
                logger.warning(
                    "event=reply_refused agent=%s caller=%s error=%s",
                    self._wire.name, header.sender, error,
                )  # fmt: skip
                why = f"Redis refused the reply of {self._wire.name!r}: {error}"
                self._reply(header, Reply(error=("ReplyError", why, "")), first=False)
            else:
                self._unanswered.discard(key)

        try:
            self._wire.post_frames(
                key[0], frames, over, resend_for=self._wire.resend_for / 2, traced=traced
            )
        except TransportError:
            self._unanswered.discard(key)
            raise

    async def _send_after_forks(
        self, header: Header, passed: Passed, frames: list[Any], traced: tuple[int, int]
    ) -> None:
        try:
            await self._references.announce_forks(passed)
        except (RpcError, TransportError) as e:
            # The result cannot leave; the caller hears why instead of waiting in vain.
            self._reply(header, Reply(error=(type(e).__name__, str(e), "")))
            return
        self._post(header, frames, traced)
