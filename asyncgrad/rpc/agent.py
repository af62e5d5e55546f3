"""`Agent`: one named participant in a namespace, calling and serving over its transport.

    >>> async with Agent("trainer") as agent:
    ...     y = await agent.rpc_async("ps", forward, args=(x,))
    ...     rref = await agent.remote("ps", ParameterServer, args=(784,))

The agent keeps its lifecycle and the calling API; its parts, each holding the agent,
do the rest: `Calls` (calls.py) the calls in flight, `Server` (server.py) the calls
that arrive, `References` (references.py) the reference counting, and `Liveness`
(liveness.py) failure detection. `MessageCodec` (messages.py) makes the frames, and
distributed autograd meets them through the `AutogradSeam` (seam.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from asyncgrad.codec import DEFAULT_MAX_SIZE
from asyncgrad.errors import CodecError, RpcError, WorkerUnavailable
from asyncgrad.resp import DEFAULT_URL, RedisAddress, ReplyError
from asyncgrad.rpc import exposed
from asyncgrad.rpc.calls import Calls
from asyncgrad.rpc.liveness import Liveness
from asyncgrad.rpc.messages import Call, Header, Kind, MessageCodec, MessageError
from asyncgrad.rpc.references import References
from asyncgrad.rpc.rref import RRef, RRefTable
from asyncgrad.rpc.seam import AutogradSeam
from asyncgrad.rpc.server import Server
from asyncgrad.tensor import Tensor
from asyncgrad.transport import Inbound, InboxMissing, Transport, TransportSettings

__all__ = ["Agent", "AutogradSeam", "WorkerInfo", "current_agent", "default_redis_url"]

logger = logging.getLogger(__name__)

_current: contextvars.ContextVar[Agent | None] = contextvars.ContextVar(
    "asyncgrad_current_agent", default=None
)
# What `rpc.init` started: current for every task of the process that has no agent of its own.
_process_default: list[Agent] = []
_RECENT = 20_000  # message ids remembered to drop duplicates (resends after a reconnect)
# Posted again while their receiver has no inbox (`_post_resending`); not count updates,
# whose order matters, nor a goodbye.
_RESENT = frozenset({Kind.REPLY, Kind.PASS_DONE, Kind.PASS_ABORT, Kind.CONTEXT_RELEASE})


def current_agent() -> Agent:
    """The agent of this task (or of the exposed function running), else `rpc.init`'s."""
    agent = _current.get()
    if agent is None and _process_default:
        agent = _process_default[-1]
    if agent is None:
        raise RuntimeError(
            "no current agent: use `async with Agent(...)` or `await asyncgrad.rpc.init(...)`"
        )
    return agent


def default_redis_url() -> str:
    """$ASYNCGRAD_REDIS_URL, else redis://127.0.0.1:6379/0."""
    return os.environ.get("ASYNCGRAD_REDIS_URL") or DEFAULT_URL


@dataclass(slots=True)
class _Posting:
    """A message posted again while its receiver has no inbox (`Agent._post_resending`)."""

    dest: str
    frames: list[Any]
    over: Callable[[], None] | None
    deadline: float
    delay: float = 0.05


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
    `rediss+cluster://`): see `asyncgrad.resp`.
    """

    # Set by asyncgrad.dist_autograd on import; every agent then gets its own seam.
    seam_factory: Callable[[Agent], AutogradSeam] | None = None
    seam: AutogradSeam | None = None

    def __init__(
        self,
        name: str,
        redis_url: str | None = None,
        namespace: str = "asyncgrad",
        rpc_timeout: float = 60.0,
        *,
        failure_timeout: float = 5.0,
        max_message_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.rpc_timeout = rpc_timeout
        self.failure_timeout = failure_timeout
        self.redis_url = redis_url or default_redis_url()
        settings = TransportSettings(
            heartbeat_ttl=failure_timeout * 0.6, heartbeat_interval=failure_timeout * 0.15
        )
        self._transport = Transport(
            RedisAddress.from_url(self.redis_url),
            namespace,
            name,
            self._deliver,
            settings,
            open_contexts=self._open_contexts,
            on_inbox_lost=self._on_inbox_lost,
        )
        self._rrefs = RRefTable(name)
        self._references = References(self)
        self._calls = Calls(self)
        self._server = Server(self)
        self._liveness = Liveness(self, failure_timeout)
        self._codec = MessageCodec(
            max_message_size, self._references.to_wire, self._references.from_wire
        )
        self._ids = itertools.count(secrets.randbits(40) << 20)
        self._recent: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._hurry = asyncio.Event()
        self._closed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "new"
        self._handlers: dict[Kind, Callable[[Header, Inbound], None]] = {
            Kind.CALL: self._server.on_call,
            Kind.REPLY: self._calls.on_reply,
            Kind.RREF_UPDATES: self._references.on_updates,
            Kind.LEAVING: self._on_leaving,
        }
        self._entered: list[contextvars.Token[Agent | None]] = []

    @property
    def id(self) -> int:
        """Small int unique among the agents of the namespace (stable across restarts)."""
        return self._transport.id

    # *** lifecycle ***

    async def start(self) -> Self:
        """Connect, register and start serving; returns self."""
        if self._state != "new":
            raise RuntimeError(f"agent {self.name!r} was already started")
        self._loop = asyncio.get_running_loop()
        self._state = "running"
        if self.seam_factory is not None:
            self.seam = self.seam_factory(self)
        try:
            await self._transport.start()
        except BaseException as e:
            self._state = "closed"
            await self._transport.close()
            if isinstance(e, ReplyError) and e.code == "NOPERM":
                raise self._not_permitted(e) from e
            raise
        self._liveness.start()
        logger.info(
            "event=agent_started agent=%s id=%d namespace=%s redis=%s",
            self.name, self.id, self.namespace, self._transport.address,
        )  # fmt: skip
        return self

    def _not_permitted(self, error: ReplyError) -> ReplyError:
        """Redis's NOPERM names neither the user nor the key: say who may not do what."""
        address = self._transport.address
        detail = str(error).partition(" ")[2]
        return ReplyError(
            f"NOPERM Redis user {address.username or 'default'!r} at {address} may not use "
            f"namespace {self.namespace!r}: {detail} (an agent needs the keys "
            f"~{self.namespace}:* and the commands SECURITY.md lists)"
        )

    async def __aenter__(self) -> Self:
        await self.start()
        self._entered.append(_current.set(self))
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
                _current.reset(self._entered.pop())

    async def shutdown(self, graceful: bool = True) -> None:
        """Stop. Graceful: the calls being served and the calls made finish first (within
        `rpc_timeout`), calls that arrive meanwhile too; a non-graceful shutdown meanwhile
        cuts that wait short. Calls still running then are cancelled."""
        if self._state in ("draining", "closing"):
            if not graceful:
                self._hurry.set()
            await self._closed.wait()
            return
        if self._state != "running":
            self._state = "closed"
            return
        # While draining, the agent still serves and calls: a call being served may need
        # nested calls, or a reply task, to finish.
        self._state = "draining"
        if graceful:
            drained = asyncio.ensure_future(self._drain())
            hurry = asyncio.ensure_future(self._hurry.wait())
            await asyncio.wait(
                [drained, hurry], timeout=self.rpc_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            drained.cancel()
            hurry.cancel()
            await asyncio.gather(drained, hurry, return_exceptions=True)
        self._state = "closing"
        for task in self._tasks:
            task.cancel()
        self._calls.fail(RpcError(f"agent {self.name!r} shut down"))
        if self._tasks:
            await asyncio.wait(self._tasks)
        self._references.announce_leaving()
        await self._liveness.stop()
        if self.seam is not None:
            self.seam.close()
        await self._transport.close()
        self._state = "closed"
        self._closed.set()
        if self in _process_default:
            _process_default.remove(self)
        logger.info("event=agent_stopped agent=%s graceful=%s", self.name, graceful)

    async def _drain(self) -> None:
        """Until no call is being served or awaited, including those begun meanwhile."""
        while waits := [w for w in (*self._tasks, *self._calls.waiting()) if not w.done()]:
            await asyncio.wait(waits)

    def __del__(self) -> None:
        if getattr(self, "_state", "closed") in ("running", "draining"):
            import warnings

            warnings.warn(f"agent {self.name!r} was never shut down", ResourceWarning, stacklevel=1)

    def _running(self) -> bool:
        return self._state in ("running", "draining")

    def _check_running(self) -> None:
        if not self._running():
            raise RpcError(f"agent {self.name!r} is {self._state}, not running")

    def _spawn(
        self, work: Coroutine[Any, Any, None], context: contextvars.Context | None = None
    ) -> None:
        """A task the agent waits for while draining, and cancels once it closes."""
        task = asyncio.get_running_loop().create_task(work, context=context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _serving_context(self) -> contextvars.Context:
        """Where a call that arrives runs: a fresh context, not a copy of the reader's, so
        that it inherits nothing set where the agent started (a `no_grad` block, another
        agent, an autograd context), only that this agent is the one serving it."""
        context = contextvars.Context()
        context.run(_current.set, self)
        return context

    def _open_contexts(self) -> int:
        # Called from the heartbeat's thread: it only reads (a len() of a dict).
        seam = self.seam
        return seam.open_contexts() if seam is not None else 0

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

    async def _call_rref(
        self,
        rref: RRef[Any],
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        make_rref: bool,
        timeout: float | None,
    ) -> Any:
        call = Call("", tuple(args), kwargs, target=rref.id, method=method, make_rref=make_rref)
        return await self._calls.make(rref.owner, call, timeout)

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

    # *** messages ***

    def send(self, dest: str, kind: Kind, payload: Any, reply_to: int = 0) -> asyncio.Future[None]:
        """Post a one-way message (how the autograd seam talks); RRefs in it are not allowed."""
        return self._transport.send(dest, self._one_way(dest, kind, payload, reply_to))

    def post(self, dest: str, kind: Kind, payload: Any) -> None:
        """`send`, for a message nobody waits for: a failure to store it is only logged."""
        frames = self._one_way(dest, kind, payload)
        if kind in _RESENT:
            self._post_resending(dest, frames)
        else:
            self._transport.post(dest, frames)

    def _post_resending(
        self, dest: str, frames: list[Any], over: Callable[[], None] | None = None
    ) -> None:
        """Post; while `dest` has no inbox, post again for up to `failure_timeout`: after a
        Redis restart lost every inbox, a live agent's comes back within a reconnect. (The
        receiver drops a duplicate by its message id.) `over()` runs once the message is
        stored or given up."""
        self._repost(_Posting(dest, frames, over, time.monotonic() + self.failure_timeout))

    def _repost(self, posting: _Posting) -> None:
        stored = self._transport.send(posting.dest, posting.frames)
        stored.add_done_callback(functools.partial(self._posted, posting))

    def _posted(self, posting: _Posting, stored: asyncio.Future[None]) -> None:
        error = None if stored.cancelled() else stored.exception()
        if isinstance(error, InboxMissing) and time.monotonic() + posting.delay < posting.deadline:
            asyncio.get_running_loop().call_later(posting.delay, self._repost_later, posting)
            posting.delay = min(posting.delay * 2, 1.0)  # retry timer
            return
        if posting.over is not None:
            posting.over()
        if error is not None:
            # A receiver that left needs nobody's answer or notice: expected, not a warning.
            level = logging.DEBUG if isinstance(error, InboxMissing) else logging.WARNING
            logger.log(
                level, "event=send_failed agent=%s to=%s error=%s", self.name, posting.dest, error
            )

    def _repost_later(self, posting: _Posting) -> None:
        if self._running():
            self._repost(posting)
        elif posting.over is not None:
            posting.over()

    def _on_inbox_lost(self) -> None:
        """Redis lost this agent's inbox (a restart without persistence): messages on their
        way, to it or from it, may be gone. Calls whose callee has no record of them fail
        now, and backward passes running here fail, instead of waiting out their timeouts."""
        logger.warning("event=inbox_lost agent=%s", self.name)
        if self.seam is not None:
            self.seam.inbox_lost(self)
        if self._running():
            self._spawn(self._calls.recheck(), self._serving_context())

    def _one_way(self, dest: str, kind: Kind, payload: Any, reply_to: int = 0) -> list[Any]:
        frames, _ = self._encode(dest, kind, next(self._ids), payload, reply_to)
        if self._references.drop_passed():
            raise TypeError("RRefs cannot travel in one-way messages")
        return frames

    def _encode(
        self, dest: str, kind: Kind, message_id: int, payload: Any, reply_to: int = 0
    ) -> tuple[list[Any], Any]:
        """The frames of one message to `dest`, and autograd's record of it (or None)."""
        self._references.encoding_to(dest)
        body, tensors = self._codec.encode_payload(payload)
        record = None
        if self.seam is not None and kind in (Kind.CALL, Kind.REPLY):
            record = self.seam.outgoing(self, dest, tensors)
        header = Header(kind, message_id, self.name, reply_to, record)
        return [self._codec.encode_header(header), *body], record

    def _decode(self, message: Inbound) -> tuple[Any, list[Tensor]]:
        return self._codec.decode_payload(message.frames[1:])

    def _deliver(self, batch: list[Inbound]) -> None:
        for message in batch:
            try:
                header = self._codec.decode_header(message.frames[0])
                if len(message.frames) < 2:
                    raise MessageError("a message has a header and a payload")
            except CodecError as e:
                self._transport.dead_letter(message, f"bad header: {e}")
                continue
            key = (header.sender, header.id)
            if key in self._recent:
                self._transport.done(message)
                continue
            self._recent[key] = None
            if len(self._recent) > _RECENT:
                self._recent.popitem(last=False)
            self._handlers.get(header.kind, self._on_autograd)(header, message)

    def _on_leaving(self, header: Header, message: Inbound) -> None:
        freed = self._rrefs.drop_holder(header.sender)
        self._liveness.forget(header.sender)
        logger.debug(
            "event=holder_left agent=%s holder=%s freed=%d", self.name, header.sender, freed
        )
        self._transport.done(message)

    def _on_autograd(self, header: Header, message: Inbound) -> None:
        if self.seam is None:
            self._transport.dead_letter(message, f"{header.kind.name} but no autograd here")
            return
        try:
            payload, _ = self._decode(message)
        except CodecError as e:
            self._transport.dead_letter(message, f"bad {header.kind.name}: {e}")
            return
        self._transport.done(message)
        self.seam.handle(self, header, payload)

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, namespace={self.namespace!r}, state={self._state})"
