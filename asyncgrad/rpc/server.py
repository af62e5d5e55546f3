"""The serving side of an agent: each call that arrives runs, and its result or error
goes back to the caller as the reply.

Exposed sync functions run on the event loop (keep them short or make them async and
offload with `asyncio.to_thread`); async ones run as tasks the agent drains on shutdown.
"""

from __future__ import annotations

import inspect
import logging
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from asyncgrad.errors import CodecError, NotExposedError, RpcError, TransportError
from asyncgrad.rpc import exposed
from asyncgrad.rpc.messages import Call, Header, Kind, Reply
from asyncgrad.rpc.references import Passed
from asyncgrad.rpc.rref import RRef
from asyncgrad.transport import Inbound

if TYPE_CHECKING:
    from asyncgrad.rpc.agent import Agent

__all__ = ["Server"]

logger = logging.getLogger(__name__)


# Which calls from a caller are not answered yet: what a caller asks after Redis lost its
# inbox (Calls.recheck).
UNANSWERED = "asyncgrad.unanswered"


@exposed.expose(name=UNANSWERED)
def unanswered(caller: str) -> list[int]:
    """The message ids of the calls from `caller` that this agent has not answered yet."""
    from asyncgrad.rpc.agent import current_agent

    return current_agent()._server.unanswered(caller)


class Server:
    """Runs the calls that arrive at one agent and sends their replies."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        # (caller, message id) of the calls being served, or whose reply is not stored yet.
        self._unanswered: set[tuple[str, int]] = set()

    def unanswered(self, caller: str) -> list[int]:
        return [call_id for who, call_id in self._unanswered if who == caller]

    def on_call(self, header: Header, message: Inbound) -> None:
        """Run the call (a sync function at once, an async one as a task), then reply."""
        agent = self._agent
        if agent._state == "closing":
            # Past the drain nothing new is served: the caller learns that this agent is
            # gone as for any agent that stops, by its heartbeat.
            logger.debug("event=call_dropped agent=%s caller=%s", agent.name, header.sender)
            agent._transport.done(message)
            return
        self._unanswered.add((header.sender, header.id))
        context = agent._serving_context()
        try:
            payload, tensors = agent._decode(message)
            call = Call.from_wire(payload)
        except CodecError as e:
            agent._transport.dead_letter(message, f"bad call: {e}")
            context.run(self._reply, header, Reply(error=("CodecError", str(e), "")))
            return
        try:
            if header.context is not None and agent.seam is not None:
                context.run(
                    agent.seam.incoming, agent, header.sender, header.context, tensors, True
                )
            fn = self._resolve(call)
            result = context.run(fn, *call.args, **(call.kwargs or {}))
        except Exception as e:
            context.run(self._reply_error, header, call, e)
            agent._transport.done(message)
            return
        if inspect.isawaitable(result):
            agent._spawn(self._finish(header, call, result, message), context)
        else:
            context.run(self._reply_result, header, call, result)
            agent._transport.done(message)

    async def _finish(self, header: Header, call: Call, result: Any, message: Inbound) -> None:
        try:
            value = await result
        except Exception as e:
            self._reply_error(header, call, e)
        else:
            self._reply_result(header, call, value)
        finally:
            self._agent._transport.done(message)

    def _resolve(self, call: Call) -> Callable[..., Any]:
        if not call.target:
            return exposed.lookup(call.fn)  # type: ignore[no-any-return]
        value = self._agent._rrefs.get(call.target)
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
            value = RRef._owned(self._agent, value)
        try:
            self._reply(header, Reply(value))
        except (TypeError, CodecError) as e:
            self._reply_error(header, call, e)

    def _reply_error(self, header: Header, call: Call, error: Exception) -> None:
        logger.debug("event=call_failed fn=%s caller=%s error=%r", call.fn, header.sender, error)
        tb = "".join(traceback.format_exception(error))
        self._reply(header, Reply(error=(type(error).__name__, str(error), tb)))

    def _reply(self, header: Header, reply: Reply) -> None:
        agent = self._agent
        frames, _ = agent._encode(
            header.sender, Kind.REPLY, next(agent._ids), reply.to_wire(), header.id
        )
        passed = agent._references.take_passed()
        if all(owner == agent.name for owner, _, _ in passed):
            self._post((header.sender, header.id), frames)
            return
        # The result passes on RRefs owned elsewhere: their owners must count the caller
        # before the caller can release them.
        agent._spawn(self._send_after_forks(header, passed, frames))

    def _post(self, key: tuple[str, int], frames: list[Any]) -> None:
        try:
            self._agent._post_resending(key[0], frames, lambda: self._unanswered.discard(key))
        except TransportError:
            self._unanswered.discard(key)
            raise

    async def _send_after_forks(self, header: Header, passed: Passed, frames: list[Any]) -> None:
        try:
            await self._agent._references.announce_forks(passed)
        except (RpcError, TransportError) as e:
            # The result cannot leave; the caller hears why instead of waiting in vain.
            self._reply(header, Reply(error=(type(e).__name__, str(e), "")))
            return
        self._post((header.sender, header.id), frames)
