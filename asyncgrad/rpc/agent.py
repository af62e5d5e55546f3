"""`Agent`: one named participant in a namespace, calling and serving over its transport.

    >>> async with Agent("trainer") as agent:
    ...     y = await agent.rpc_async("ps", forward, args=(x,))
    ...     rref = await agent.remote("ps", ParameterServer, args=(784,))

The agent is a composition root: it builds its parts and hands each what it needs, and
keeps only its lifecycle and the calling API. The parts, and what each is given:

    Transport  (asyncgrad.transport)  the inbox, heartbeats, writes; delivers to the Wire
    Wire       (wire.py)        ids, frames, sending and resending; routes what arrives
    Liveness   (liveness.py)    heartbeats of the agents watched; tells `_lost`
    References (references.py)  the values owned here (`RRefTable`), reference counts
    Contexts   (asyncgrad.dist_autograd)  distributed autograd: the seam's other side
    Calls      (calls.py)       the calls made: Wire, Liveness, References, the seam
    Server     (server.py)      the calls served: Wire, References, the seam
    Spans      (asyncgrad.tracing)  what this agent did, and when: given to the Transport,
                                which hands it on to the Wire, and through it to the rest
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

from asyncgrad.codec import DEFAULT_MAX_SIZE
from asyncgrad.dist_autograd.contexts import Contexts
from asyncgrad.errors import RpcError, WorkerUnavailable
from asyncgrad.messages import Call, Kind
from asyncgrad.rpc import exposed
from asyncgrad.rpc.calls import Calls
from asyncgrad.rpc.current import current, process_default, running_agent
from asyncgrad.rpc.lifecycle import Lifecycle
from asyncgrad.rpc.liveness import Liveness
from asyncgrad.rpc.references import References, RRefTable
from asyncgrad.rpc.rref import RRef
from asyncgrad.rpc.server import Server
from asyncgrad.rpc.traces import gather
from asyncgrad.rpc.wire import MessageCodec, Wire
from asyncgrad.tracing import Spans, tracing_enabled
from asyncgrad.transport import (
    DEFAULT_INLINE_LIMIT,
    DEFAULT_URL,
    DataSettings,
    Inbound,
    RedisAddress,
    Transport,
    TransportSettings,
)

__all__ = ["Agent", "WorkerInfo", "current_agent", "default_redis_url", "init"]

logger = logging.getLogger(__name__)


async def init(name: str, **agent_kwargs: Any) -> Agent:
    """Start an agent and make it current: for this task and the tasks it creates from now
    on (also inside an `async with Agent(...)` block), and for every task of the process
    that has no agent of its own. Its shutdown makes the agent it displaced here current
    again."""
    agent = await Agent(name, **agent_kwargs).start()
    displaced = current.get()
    agent._displaced = (displaced if isinstance(displaced, Agent) else None,)
    current.set(agent)
    process_default.append(agent)
    return agent


def current_agent() -> Agent:
    """The agent of this task (or of the exposed function running), else `rpc.init`'s."""
    agent = running_agent()
    assert isinstance(agent, Agent), "only agents become current"
    return agent


def _check_context_id(context_id: object) -> None:
    if context_id is not None and type(context_id) is not int:
        raise TypeError(f"context_id is an int, not {type(context_id).__name__}")


def default_redis_url() -> str:
    """$ASYNCGRAD_REDIS_URL, else redis://127.0.0.1:6379/0."""
    return os.environ.get("ASYNCGRAD_REDIS_URL") or DEFAULT_URL


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A live agent: its name and its id (a small int unique in the namespace)."""

    name: str
    id: int


class Agent:
    """A worker or driver: serves exposed functions and calls other agents.

    `redis_url=None` means `$ASYNCGRAD_REDIS_URL`, else `redis://127.0.0.1:6379/0`. Also
    `rediss://` (TLS), `unix:///path/to/redis.sock`, and for a Redis Cluster
    `redis+cluster://[user:password@]host:port[,host:port...]` (some of its nodes; or
    `rediss+cluster://`): see `asyncgrad.transport.resp`.

    Arrays above `inline_limit` bytes travel directly between agents, not through Redis
    (`data_plane="redis"`: never); other agents fetch them from this one's data port,
    `data_host:data_port` (None: the address this host reaches Redis from; 0: any free
    port), advertised as `$ASYNCGRAD_DATA_HOST` if set (behind NAT, in a container).

    With `trace` (the default, unless `$ASYNCGRAD_TRACE=0`) the agent keeps its recent
    spans (README, "Tracing"); `trace()` gathers those of every live agent.
    """

    def __init__(
        self,
        name: str,
        redis_url: str | None = None,
        namespace: str = "asyncgrad",
        rpc_timeout: float = 60.0,
        *,
        failure_timeout: float = 5.0,
        rref_lease: float = 300.0,
        max_message_size: int = DEFAULT_MAX_SIZE,
        inline_limit: int = DEFAULT_INLINE_LIMIT,
        data_plane: Literal["direct", "redis"] = "direct",
        data_host: str | None = None,
        data_port: int = 0,
        trace: bool = True,
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.rpc_timeout = rpc_timeout
        self.failure_timeout = failure_timeout
        self.rref_lease = rref_lease
        self.redis_url = redis_url or default_redis_url()
        settings = TransportSettings(
            heartbeat_ttl=failure_timeout * 0.6, heartbeat_interval=failure_timeout * 0.15
        )
        self._spans = Spans(name, enabled=tracing_enabled(trace))
        # The transport calls back only once started, when every part below exists.
        self._transport = Transport(
            RedisAddress.from_url(self.redis_url),
            namespace,
            name,
            self._receive,
            settings,
            open_contexts=self._open_contexts,
            on_inbox_lost=self._on_inbox_lost,
            data=DataSettings(
                data_plane, inline_limit, data_host, data_port, max_size=max_message_size
            ),
            spans=self._spans,
        )
        self._lifecycle = Lifecycle(name)
        codec = MessageCodec(max_message_size, RRef, self._held_rref)
        self._wire = Wire(self._transport, codec, self._lifecycle, resend_for=failure_timeout)
        self._liveness = Liveness(
            self._transport, failure_timeout, self._watched, self._suspect, self._born
        )
        owned = RRefTable(name, self._transport.redis_now_ms)
        self._references = References(self._wire, owned, self._liveness, self._lifecycle)
        self._autograd = Contexts(
            self._wire, self._liveness, rpc_timeout=rpc_timeout, failure_timeout=failure_timeout
        )
        self._calls = Calls(
            self._wire,
            self._liveness,
            self._references,
            self._autograd,
            self._lifecycle,
            rpc_timeout=rpc_timeout,
            failure_timeout=failure_timeout,
        )
        self._server = Server(
            self._wire,
            self._references,
            self._autograd,
            self._lifecycle,
            self._serving_context,
            self._owned_rref,
            self._dump_spans,
        )
        self._wire.route(
            {
                Kind.CALL: self._server.on_call,
                Kind.REPLY: self._calls.on_reply,
                Kind.RREF_UPDATES: self._references.on_updates,
                Kind.LEAVING: self._references.on_leaving,
            },
            self._autograd.receive,
        )
        self._hurry = asyncio.Event()
        self._closed = asyncio.Event()
        self._entered: list[contextvars.Token[Any]] = []
        # What `init` displaced as the current agent of its task: restored by shutdown.
        self._displaced: tuple[Agent | None] | None = None

    @property
    def id(self) -> int:
        """Small int unique among the agents of the namespace (stable across restarts)."""
        return self._transport.id

    # The parts that the modules below the agent reach through `rpc.current`.

    @property
    def references(self) -> References:
        """This agent's reference counting, and the values it owns (`.owned`)."""
        return self._references

    @property
    def calls(self) -> Calls:
        """The calls this agent makes."""
        return self._calls

    @property
    def autograd(self) -> Contexts:
        """This agent's distributed autograd contexts."""
        return self._autograd

    # *** lifecycle ***

    async def start(self) -> Self:
        """Connect, register and start serving; returns self."""
        self._lifecycle.start()
        try:
            await self._transport.start()
        except BaseException:
            self._lifecycle.state = "closed"
            await self._transport.close()
            raise
        self._liveness.start()
        data = self._transport.data
        logger.info(
            "event=agent_started agent=%s id=%d namespace=%s redis=%s data=%s",
            self.name, self.id, self.namespace, self._transport.address,
            data.endpoints.tcp_address or data.settings.mode,
        )  # fmt: skip
        return self

    async def __aenter__(self) -> Self:
        await self.start()
        self._entered.append(current.set(self))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.shutdown(graceful=exc_type is None)
        finally:
            if self._entered:
                current.reset(self._entered.pop())

    async def shutdown(self, graceful: bool = True) -> None:
        """Stop. Graceful: the calls being served and the calls made finish first (within
        `rpc_timeout`), calls that arrive meanwhile too; a non-graceful shutdown meanwhile
        cuts that wait short. Calls still running then are cancelled."""
        if self._displaced is not None and current.get() is self:
            # Whatever state it is in, this agent stops being the one `init` made current.
            current.set(self._displaced[0])
        lifecycle = self._lifecycle
        if lifecycle.state in ("draining", "closing"):
            if not graceful:
                self._hurry.set()
            await self._closed.wait()
            return
        if lifecycle.state != "running":
            lifecycle.state = "closed"
            return
        lifecycle.state = "draining"
        if graceful:
            drained = asyncio.ensure_future(self._drain())
            hurry = asyncio.ensure_future(self._hurry.wait())
            await asyncio.wait(
                [drained, hurry], timeout=self.rpc_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            drained.cancel()
            hurry.cancel()
            await asyncio.gather(drained, hurry, return_exceptions=True)
        lifecycle.state = "closing"
        tasks = lifecycle.cancel_tasks()
        self._calls.fail(RpcError(f"agent {self.name!r} shut down"))
        if tasks:
            await asyncio.wait(tasks)
        self._references.announce_leaving()
        await self._liveness.stop()
        self._autograd.close()
        await self._transport.close()
        self._spans.close()
        lifecycle.state = "closed"
        self._closed.set()
        if self in process_default:
            process_default.remove(self)
        logger.info("event=agent_stopped agent=%s graceful=%s", self.name, graceful)

    async def _drain(self) -> None:
        """Until no call is being served or awaited, including those begun meanwhile."""
        while waits := [
            *self._lifecycle.unfinished(),
            *(w for w in self._calls.waiting() if not w.done()),
        ]:
            await asyncio.wait(waits)

    def __del__(self) -> None:
        lifecycle = getattr(self, "_lifecycle", None)
        if lifecycle is not None and lifecycle.running:
            import warnings

            warnings.warn(f"agent {self.name!r} was never shut down", ResourceWarning, stacklevel=1)

    # *** what the parts are given ***

    def _serving_context(self) -> contextvars.Context:
        """Where a call that arrives runs: a fresh context, not a copy of the reader's, so
        that it inherits nothing set where the agent started (a `no_grad` block, another
        agent, an autograd context), only that this agent is the one serving it."""
        context = contextvars.Context()
        context.run(current.set, self)
        return context

    def _held_rref(self, owner: str, rref_id: int) -> RRef[Any]:
        return RRef.held(self._references, self._calls, owner, rref_id)

    def _owned_rref(self, value: Any) -> RRef[Any]:
        return RRef.owned(self._references, self._calls, value)

    def _receive(self, batch: list[Inbound]) -> None:
        self._wire.receive(batch)

    def _open_contexts(self) -> int:
        # Called from the heartbeat's thread: it only reads (a len() of a dict).
        return self._autograd.open_contexts()

    def _watched(self) -> set[str]:
        """Whom liveness watches: the callees of calls in flight, the holders of RRefs."""
        return self._calls.callees() | self._references.owned.holders()

    def _suspect(self, name: str, away: float) -> None:
        """`name` stopped heartbeating, `away` s ago: fail the calls in flight to it. What
        it holds here is freed only once its lease ran out (suspicion is not death)."""
        self._calls.suspect(name)
        if away >= self.rref_lease and name in self._references.owned.holders():
            why = (
                f"its holder {name!r} was unreachable for {away:.0f} s, longer than "
                f"rref_lease ({self.rref_lease:g} s)"
            )
            self._release_holder(name, why)

    def _born(self, name: str, born_ms: int) -> None:
        """The incarnation under `name` began at `born_ms`: if after `name` got what it
        holds here, the one that got it is dead. (Calls in flight to that one end when
        the new one refuses them.)"""
        since = self._references.owned.holder_since(name)
        if since is not None and born_ms > since:
            self._release_holder(name, f"its holder {name!r} was started again")

    def _release_holder(self, name: str, why: str) -> None:
        freed = self._references.owned.drop_holder(name, released=why)
        logger.info(
            "event=holder_released agent=%s holder=%s rrefs_freed=%d why=%s",
            self.name, name, freed, why,
        )  # fmt: skip

    def _on_inbox_lost(self) -> None:
        """Redis lost this agent's inbox (a restart without persistence): messages on their
        way, to it or from it, may be gone. Calls whose callee has no record of them fail
        now, and backward passes running here fail, instead of waiting out their timeouts."""
        logger.warning("event=inbox_lost agent=%s", self.name)
        self._autograd.inbox_lost()
        if self._lifecycle.running:
            self._lifecycle.spawn(self._calls.recheck(), self._serving_context())

    # *** calling ***

    async def rpc_async(
        self,
        to: str,
        fn: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run the exposed `fn(*args, **kwargs)` on worker `to` and return its result."""
        return await self._calls.make(to, Call(exposed.name_of(fn), tuple(args), kwargs), timeout)

    async def remote(
        self,
        to: str,
        fn: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> RRef[Any]:
        """Run `fn` (a function or class) on `to`, keep the result there, return an RRef."""
        call = Call(exposed.name_of(fn), tuple(args), kwargs, make_rref=True)
        rref: RRef[Any] = await self._calls.make(to, call, timeout)
        return rref

    async def get_worker_info(self, name: str | None = None) -> WorkerInfo:
        """This agent's info, or that of the live worker `name`."""
        if name is None or name == self.name:
            return WorkerInfo(self.name, self.id)
        agents = await self._transport.agents()
        if name not in agents or not (await self._transport.alive([name]))[0]:
            raise WorkerUnavailable(
                f"no live worker named {name!r} in namespace {self.namespace!r}"
            )
        return WorkerInfo(name, agents[name])

    def data_plane_stats(self) -> dict[str, int]:
        """Frames this agent sent and got by each path: `sent_direct` (as references;
        `sent_shared` of them were received frames sent on, without a copy), `sent_inline`
        (above the limit, inline to a receiver that asked for that), `served_local`/
        `served_tcp`/`served_redis` (fetched from here, by each path), `fetched_local`/
        `fetched_tcp`/`fetched_redis` (fetched by this agent); and `held`, the frames
        held here now, waiting for their receivers."""
        data = self._transport.data
        return {**data.counts, "held": len(data.held)}

    async def trace(
        self, context_id: int | None = None, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """The recent spans of every live agent of the namespace (this one included), as
        Chrome/Perfetto trace events (README, "Tracing"); `context_id`: only that
        distributed autograd context's. An agent that does not answer within `timeout`
        (default: `failure_timeout`) shows as an empty row that says so."""
        _check_context_id(context_id)  # here, before any worker is asked
        workers = [(w.name, w.id) for w in await self.workers()]
        limit = self.failure_timeout if timeout is None else timeout
        here = (self.name, self._dump_spans)
        return await gather(self._calls, here, workers, context_id, limit)

    def _dump_spans(self, context_id: int | None = None) -> dict[str, Any]:
        _check_context_id(context_id)  # as any caller of `TRACE` sent it
        return self._spans.dump(context_id)

    async def alive(self, names: list[str]) -> list[bool]:
        """Whether each named agent's heartbeat is current."""
        return await self._transport.alive(names)

    async def gone(self, names: list[str]) -> set[str]:
        """Those of the named agents known to be gone: their heartbeat lapsed (not merely
        missing from a Redis this agent reached again only just now)."""
        return await self._liveness.gone(names)

    async def workers(self) -> list[WorkerInfo]:
        """Every live agent of the namespace, this one included, by id."""
        agents = await self._transport.agents()
        names = sorted(agents, key=agents.__getitem__)
        alive = await self._transport.alive(names)
        return [WorkerInfo(n, agents[n]) for n, ok in zip(names, alive, strict=True) if ok]

    def __repr__(self) -> str:
        state = self._lifecycle.state
        return f"Agent({self.name!r}, namespace={self.namespace!r}, state={state})"
