"""The serving side of an agent: each call that arrives runs, and its result or error
goes back to the caller as the reply.

Exposed sync functions run on the event loop (keep them short or make them async and
offload with `asyncio.to_thread`); async ones run as tasks the agent drains on shutdown.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import traceback
from collections.abc import Callable
from typing import Any

from asyncgrad.errors import CodecError, NotExposedError, RpcError, TransportError
from asyncgrad.messages import Call, Header, Kind, Reply
from asyncgrad.rpc import exposed
from asyncgrad.rpc.lifecycle import Lifecycle
from asyncgrad.rpc.references import Passed, References
from asyncgrad.rpc.seam import AutogradSeam
from asyncgrad.rpc.wire import Wire
from asyncgrad.transport import Inbound

__all__ = ["UNANSWERED", "Server"]

logger = logging.getLogger(__name__)


# A function every agent serves by itself: which calls from a caller it has not answered
# yet (`Server.unanswered`). A caller asks it after Redis lost its inbox (`Calls.recheck`).
UNANSWERED = "asyncgrad.unanswered"


class Server:
    """Runs the calls that arrive at one agent and sends their replies.

    Each call runs in a fresh `serving_context()`; `make_rref(value)` makes the RRef that
    a call with `make_rref` returns.
    """

    def __init__(
        self,
        wire: Wire,
        references: References,
        autograd: AutogradSeam,
        lifecycle: Lifecycle,
        serving_context: Callable[[], contextvars.Context],
        make_rref: Callable[[Any], Any],
    ) -> None:
        self._wire = wire
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
        self._unanswered.add((header.sender, header.id))
        context = self._serving_context()
        try:
            payload, tensors = self._wire.decode(message)
            call = Call.from_wire(payload)
        except CodecError as e:
            self._wire.dead_letter(message, f"bad call: {e}")
            context.run(self._reply, header, Reply(error=("CodecError", str(e), "")))
            return
        try:
            if header.context is not None:
                context.run(self._autograd.incoming, header.sender, header.context, tensors, True)
            fn = self._resolve(call)
            result = context.run(fn, *call.args, **(call.kwargs or {}))
        except Exception as e:
            context.run(self._reply_error, header, call, e)
            self._wire.done(message)
            return
        if inspect.isawaitable(result):
            self._lifecycle.spawn(self._finish(header, call, result, message), context)
        else:
            context.run(self._reply_result, header, call, result)
            self._wire.done(message)

    async def _finish(self, header: Header, call: Call, result: Any, message: Inbound) -> None:
        try:
            value = await result
        except Exception as e:
            self._reply_error(header, call, e)
        else:
            self._reply_result(header, call, value)
        finally:
            self._wire.done(message)

    def _resolve(self, call: Call) -> Callable[..., Any]:
        if not call.target:
            if call.fn == UNANSWERED:
                return self.unanswered
            return exposed.lookup(call.fn)  # type: ignore[no-any-return]
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
        method = getattr(value, call.method)
        if not callable(method):
            raise TypeError(f"{type(value).__name__}.{call.method} is not callable")
        return method  # type: ignore[no-any-return]

    def _reply_result(self, header: Header, call: Call, value: Any) -> None:
        if call.make_rref:
            value = self._make_rref(value)
        try:
            self._reply(header, Reply(value))
        except (TypeError, CodecError) as e:
            self._reply_error(header, call, e)

    def _reply_error(self, header: Header, call: Call, error: Exception) -> None:
        logger.debug("event=call_failed fn=%s caller=%s error=%r", call.fn, header.sender, error)
        tb = "".join(traceback.format_exception(error))
        self._reply(header, Reply(error=(type(error).__name__, str(error), tb)))

    def _reply(self, header: Header, reply: Reply) -> None:
        payload = self._wire.encode(reply.to_wire())
        record = self._autograd.outgoing(header.sender, payload.tensors)
        _, frames = self._wire.frames(Kind.REPLY, payload, header.id, record)
        passed = self._references.take_passed(payload.rrefs, header.sender)
        if all(owner == self._wire.name for owner, _, _ in passed):
            self._post((header.sender, header.id), frames)
            return
        # The result passes on RRefs owned elsewhere: their owners must count the caller
        # before the caller can release them.
        self._lifecycle.spawn(self._send_after_forks(header, passed, frames))

    def _post(self, key: tuple[str, int], frames: list[Any]) -> None:
        try:
            self._wire.post_frames(key[0], frames, lambda: self._unanswered.discard(key))
        except TransportError:
            self._unanswered.discard(key)
            raise

    async def _send_after_forks(self, header: Header, passed: Passed, frames: list[Any]) -> None:
        try:
            await self._references.announce_forks(passed)
        except (RpcError, TransportError) as e:
            # The result cannot leave; the caller hears why instead of waiting in vain.
            self._reply(header, Reply(error=(type(e).__name__, str(e), "")))
            return
        self._post((header.sender, header.id), frames)
