"""`Agent`: one named participant in a namespace, calling and serving over its transport.

    >>> async with Agent("trainer") as agent:
    ...     y = await agent.rpc_async("ps", forward, args=(x,))
    ...     rref = await agent.remote("ps", ParameterServer, args=(784,))

Exposed sync functions run on the event loop (keep them short or make them async and
offload with `asyncio.to_thread`); async ones run as tasks. Liveness comes from
heartbeats: a call to an agent that is not registered, or whose heartbeat lapsed, fails
with `WorkerUnavailable`, at once or within `failure_timeout` for calls in flight.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import inspect
import itertools
import logging
import os
import secrets
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self

from asyncgrad.codec import DEFAULT_MAX_SIZE, Codec, Extension
from asyncgrad.errors import (
    CodecError,
    NotExposedError,
    RemoteError,
    RpcError,
    RPCTimeout,
    TransportError,
    WorkerUnavailable,
)
from asyncgrad.resp import DEFAULT_URL, RedisAddress
from asyncgrad.rpc import exposed
from asyncgrad.rpc.messages import Call, Header, Kind, MessageError, Reply, RRefUpdates
from asyncgrad.rpc.rref import RRef, RRefTable
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
_HEADER_LIMIT = 64 * 1024
_TENSOR, _PARAMETER, _RREF = 16, 17, 18


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


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A live agent: its name and its id (a small int unique in the namespace)."""

    name: str
    id: int


class AutogradSeam(Protocol):
    """How distributed autograd sees RPC: the seam between the two layers (DESIGN.md).

    `outgoing` sees every call and reply about to leave with the tensors in it that
    require grad, and returns the record to put in its header (None: nothing to record);
    `incoming` sees each record that arrives (`call`: it runs in the call's own context);
    `unsent` hears of a recorded call that never reached its callee; `handle` gets the
    autograd message kinds; `open_contexts` is asked, from the heartbeat's thread, how
    many contexts are open here (published for `asyncgrad status`).
    """

    def outgoing(self, agent: Agent, dest: str, tensors: list[Tensor]) -> Any: ...

    def incoming(
        self, agent: Agent, sender: str, record: Any, tensors: list[Tensor], call: bool
    ) -> None: ...

    def unsent(self, agent: Agent, dest: str, record: Any) -> None: ...

    def handle(self, agent: Agent, header: Header, payload: Any) -> None: ...

    def open_contexts(self) -> int: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Any]
    dest: str
    fn: str


class Agent:
    """A worker or driver: serves exposed functions and calls other agents.

    `redis_url=None` means `$ASYNCGRAD_REDIS_URL`, else `redis://127.0.0.1:6379/0`.
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
        self._check_every = failure_timeout * 0.2
        self._transport = Transport(
            RedisAddress.from_url(self.redis_url),
            namespace,
            name,
            self._deliver,
            settings,
            open_contexts=self._open_contexts,
        )
        self._codec = Codec(
            max_size=max_message_size,
            extensions=[
                Extension(_TENSOR, Tensor, self._tensor_to_wire, self._tensor_from_wire),
                Extension(
                    _PARAMETER, _parameter_type(), self._tensor_to_wire, self._tensor_from_wire
                ),
                Extension(_RREF, RRef, self._rref_to_wire, self._rref_from_wire),
            ],
        )
        self._header_codec = Codec(max_size=_HEADER_LIMIT)
        self._ids = itertools.count(secrets.randbits(40) << 20)
        self._pending: dict[int, _Pending] = {}
        self._recent: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()
        self._alive_at: dict[str, float] = {}
        self._rrefs = RRefTable(name)
        self._held_from: collections.Counter[str] = collections.Counter()
        self._releases: dict[str, list[tuple[int, str, int]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watch_wanted = asyncio.Event()
        self._hurry = asyncio.Event()
        self._closed = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        # Set only while one message is encoded or decoded (both synchronous).
        self._encoding_to = ""
        self._passing: list[tuple[str, int, str]] = []  # (owner, id, receiver) of RRefs
        self._tensors: list[Tensor] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "new"
        self._handlers: dict[Kind, Callable[[Header, Inbound], None]] = {
            Kind.CALL: self._on_call,
            Kind.REPLY: self._on_reply,
            Kind.RREF_UPDATES: self._on_rref_updates,
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
        except BaseException:
            self._state = "closed"
            await self._transport.close()
            raise
        self._watcher = asyncio.create_task(self._watch(), name=f"{self.name}-watch")
        logger.info(
            "event=agent_started agent=%s id=%d namespace=%s redis=%s",
            self.name, self.id, self.namespace, self._transport.address,
        )  # fmt: skip
        return self

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
        for pending in self._pending.values():
            _fail(pending.future, RpcError(f"agent {self.name!r} shut down"))
        if self._tasks:
            await asyncio.wait(self._tasks)
        self._announce_leaving()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
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
        while waits := [
            w for w in (*self._tasks, *(p.future for p in self._pending.values())) if not w.done()
        ]:
            await asyncio.wait(waits)

    def __del__(self) -> None:
        if getattr(self, "_state", "closed") in ("running", "draining"):
            import warnings

            warnings.warn(f"agent {self.name!r} was never shut down", ResourceWarning, stacklevel=1)

    def _open_contexts(self) -> int:
        # Called from the heartbeat's thread: it only reads (a len() of a dict).
        seam = self.seam
        return seam.open_contexts() if seam is not None else 0

    def _check_running(self) -> None:
        if self._state not in ("running", "draining"):
            raise RpcError(f"agent {self.name!r} is {self._state}, not running")

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
        return await self._call(to, Call(exposed.name_of(fn), tuple(args), kwargs), timeout)

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
        rref: RRef[Any] = await self._call(to, call, timeout)
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
        return await self._call(rref.owner, call, timeout)

    async def _call(self, to: str, call: Call, timeout: float | None) -> Any:
        self._check_running()
        if call.kwargs is not None and not (
            isinstance(call.kwargs, dict) and all(isinstance(k, str) for k in call.kwargs)
        ):
            raise TypeError(f"kwargs must be a dict with str keys, not {call.kwargs!r}")
        what = call.fn or f"rref {call.target}.{call.method or 'to_here'}"
        limit = self.rpc_timeout if timeout is None else timeout
        # One deadline for the whole call: the liveness check and the announcement of
        # passed-on RRefs wait for Redis too, and a caller's timeout bounds all of it.
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                return await self._call_within(to, call, what)
        except TimeoutError:
            if deadline.expired():
                raise RPCTimeout(f"{what} on {to!r} got no reply within {limit} s") from None
            raise

    async def _call_within(self, to: str, call: Call, what: str) -> Any:
        await self._ensure_alive(to)
        header_id = next(self._ids)
        frames, record = self._encode(to, Kind.CALL, header_id, call.to_wire())
        sent = False
        try:
            await self._announce_forks(self._take_passed())
            future = asyncio.get_running_loop().create_future()
            self._pending[header_id] = _Pending(future, to, what)
            self._watch_wanted.set()
            stored = self._transport.send(to, frames)
            sent = True
            stored.add_done_callback(functools.partial(self._on_stored, header_id))
            return await future
        except BaseException as e:
            # A recorded send that never reached its callee must not leave a pass waiting
            # for its gradient: failed, cancelled or timed out before it left, or refused.
            never_arrived = not sent or isinstance(e, WorkerUnavailable)
            never_arrived |= isinstance(e, RemoteError) and e.remote_type == "CodecError"
            if record is not None and self.seam is not None and never_arrived:
                self.seam.unsent(self, to, record)
            raise
        finally:
            self._pending.pop(header_id, None)

    def _on_stored(self, call_id: int, stored: asyncio.Future[None]) -> None:
        pending = self._pending.get(call_id)
        if pending is None or stored.cancelled() or stored.exception() is None:
            return
        error: BaseException | None = stored.exception()
        if isinstance(error, InboxMissing):
            error = WorkerUnavailable(f"no worker named {pending.dest!r} is serving: {error}")
        _fail(pending.future, error or RpcError("send failed"))

    async def _ensure_alive(self, name: str) -> None:
        if time.monotonic() - self._alive_at.get(name, -1e9) < self._check_every:
            return
        (alive,) = await self._transport.alive([name])
        if not alive:
            raise WorkerUnavailable(
                f"no live worker named {name!r} in namespace {self.namespace!r}"
            )
        self._alive_at[name] = time.monotonic()

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

    async def workers(self) -> list[WorkerInfo]:
        """Every live agent of the namespace, this one included, by id."""
        agents = await self._transport.agents()
        names = sorted(agents, key=agents.__getitem__)
        alive = await self._transport.alive(names)
        return [WorkerInfo(n, agents[n]) for n, ok in zip(names, alive, strict=True) if ok]

    # *** encoding ***

    def _encode(
        self, dest: str, kind: Kind, message_id: int, payload: Any, reply_to: int = 0
    ) -> tuple[list[Any], Any]:
        """The frames of one message to `dest`, and autograd's record of it (or None)."""
        # `_passing` starts empty: the RRefs of a message that failed to encode (and so is
        # never sent) are never counted.
        self._encoding_to, self._tensors, self._passing = dest, [], []
        try:
            body = self._codec.encode_frames(payload)
            tensors = self._tensors
        finally:
            self._encoding_to, self._tensors = "", []
        context = None
        if self.seam is not None and kind in (Kind.CALL, Kind.REPLY):
            context = self.seam.outgoing(self, dest, tensors)
        header = Header(kind, message_id, self.name, reply_to, context)
        return [self._header_codec.encode(header.to_wire()), *body], context

    def _tensor_to_wire(self, t: Tensor) -> tuple[Any, bool]:
        if t.requires_grad:
            self._tensors.append(t)
        return (t.data, t.requires_grad)

    def _tensor_from_wire(self, wire: Any) -> Tensor:
        if not (isinstance(wire, tuple) and len(wire) == 2 and isinstance(wire[1], bool)):
            raise MessageError("a tensor is (array, requires_grad)")
        data, requires_grad = wire
        t = Tensor._make(data)
        if requires_grad:
            t.requires_grad_(True)
            self._tensors.append(t)
        return t

    def _rref_to_wire(self, rref: RRef[Any]) -> tuple[str, int]:
        # Counted by `_take_passed` once the whole message has encoded.
        self._passing.append((rref.owner, rref.id, self._encoding_to))
        return (rref.owner, rref.id)

    def _rref_from_wire(self, wire: Any) -> RRef[Any]:
        if not (isinstance(wire, tuple) and len(wire) == 2 and isinstance(wire[0], str)):
            raise MessageError("an rref is (owner, id)")
        return RRef._held(self, wire[0], wire[1])

    def _take_passed(self) -> list[tuple[str, int, str]]:
        """The RRefs (owner, id, receiver) of the message just encoded, taken before any
        other message is: those owned here are counted for the receiver at once, while
        the local reference that may be the last one is still alive."""
        passed, self._passing = self._passing, []
        for owner, rref_id, holder in passed:
            if owner == self.name:
                self._rrefs.add(rref_id, holder, +1)
                if holder != self.name:
                    self._watch_wanted.set()  # so a holder that dies unannounced is noticed
        return passed

    async def _announce_forks(self, passed: list[tuple[str, int, str]]) -> None:
        """Tell the owners of the RRefs passed on, and wait until Redis has stored it (so
        the receiver's release can never overtake it). If an owner cannot be told, or the
        caller is cancelled meanwhile, the message must not leave: every count added for
        it is taken back."""
        forks = [(owner, i, holder) for owner, i, holder in passed if owner != self.name]
        if not forks:
            return
        stored = [self._send_updates(owner, [(i, holder, +1)]) for owner, i, holder in forks]
        try:
            errors = await asyncio.gather(*stored, return_exceptions=True)
            failed = next((e for e in errors if e is not None), None)
            if isinstance(failed, InboxMissing):
                raise WorkerUnavailable(f"an RRef passed on is owned by a gone worker: {failed}")
            if failed is not None:
                raise failed
        except (Exception, asyncio.CancelledError):
            self._take_back(passed)
            raise

    def _take_back(self, passed: list[tuple[str, int, str]]) -> None:
        """Undo the counts of a message that will not be sent. Each -1 to an owner is
        sent after its +1, in order, so it cannot overtake it (and one whose +1 failed
        fails the same way)."""
        for owner, rref_id, holder in passed:
            if owner == self.name:
                self._rrefs.add(rref_id, holder, -1)
                continue
            try:
                self._send_updates(owner, [(rref_id, holder, -1)]).add_done_callback(_log_unsent)
            except TransportError as e:  # Redis is gone: the count stays until holder leaves
                logger.warning("event=take_back_failed owner=%s error=%s", owner, e)

    def _send_updates(
        self, owner: str, updates: list[tuple[int, str, int]]
    ) -> asyncio.Future[None]:
        return self.send(owner, Kind.RREF_UPDATES, RRefUpdates(tuple(updates)).to_wire())

    def send(self, dest: str, kind: Kind, payload: Any, reply_to: int = 0) -> asyncio.Future[None]:
        """Post a one-way message (how the autograd seam talks); RRefs in it are not allowed."""
        frames, _ = self._encode(dest, kind, next(self._ids), payload, reply_to)
        if self._passing:
            self._passing = []
            raise TypeError("RRefs cannot travel in one-way messages")
        return self._transport.send(dest, frames)

    # *** receiving ***

    def _deliver(self, batch: list[Inbound]) -> None:
        for message in batch:
            try:
                header = Header.from_wire(self._header_codec.decode(message.frames[0]))
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

    def _decode(self, message: Inbound) -> tuple[Any, list[Tensor]]:
        self._tensors = []
        try:
            return self._codec.decode_frames(message.frames[1:]), self._tensors
        finally:
            self._tensors = []

    def _on_call(self, header: Header, message: Inbound) -> None:
        if self._state == "closing":
            # Past the drain nothing new is served: the caller learns that this agent is
            # gone as for any agent that stops, by its heartbeat.
            logger.debug("event=call_dropped agent=%s caller=%s", self.name, header.sender)
            self._transport.done(message)
            return
        # A fresh context, not a copy of the reader's: a call must not inherit what was
        # set where the agent started (a `no_grad` block, another agent, an autograd
        # context), only that this agent is the one serving it.
        context = contextvars.Context()
        context.run(_current.set, self)
        try:
            payload, tensors = self._decode(message)
            call = Call.from_wire(payload)
        except CodecError as e:
            self._transport.dead_letter(message, f"bad call: {e}")
            context.run(self._reply, header, Reply(error=("CodecError", str(e), "")))
            return
        try:
            if header.context is not None and self.seam is not None:
                context.run(self.seam.incoming, self, header.sender, header.context, tensors, True)
            fn = self._resolve(call)
            result = context.run(fn, *call.args, **(call.kwargs or {}))
        except Exception as e:
            context.run(self._reply_error, header, call, e)
            self._transport.done(message)
            return
        if inspect.isawaitable(result):
            task = asyncio.get_running_loop().create_task(
                self._finish(header, call, result, message), context=context
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            context.run(self._reply_result, header, call, result)
            self._transport.done(message)

    async def _finish(self, header: Header, call: Call, result: Any, message: Inbound) -> None:
        try:
            value = await result
        except Exception as e:
            self._reply_error(header, call, e)
        else:
            self._reply_result(header, call, value)
        finally:
            self._transport.done(message)

    def _resolve(self, call: Call) -> Callable[..., Any]:
        if not call.target:
            return exposed.lookup(call.fn)  # type: ignore[no-any-return]
        value = self._rrefs.get(call.target)
        if not call.method:
            return lambda: value
        if call.method.startswith("_"):
            raise NotExposedError(f"private method {call.method!r} cannot be called remotely")
        method = getattr(value, call.method)
        if not callable(method):
            raise TypeError(f"{type(value).__name__}.{call.method} is not callable")
        return method  # type: ignore[no-any-return]

    def _reply_result(self, header: Header, call: Call, value: Any) -> None:
        if call.make_rref:
            value = RRef._owned(self, value)
        try:
            self._reply(header, Reply(value))
        except (TypeError, CodecError) as e:
            self._reply_error(header, call, e)

    def _reply_error(self, header: Header, call: Call, error: Exception) -> None:
        logger.debug("event=call_failed fn=%s caller=%s error=%r", call.fn, header.sender, error)
        tb = "".join(traceback.format_exception(error))
        self._reply(header, Reply(error=(type(error).__name__, str(error), tb)))

    def _reply(self, header: Header, reply: Reply) -> None:
        frames, _ = self._encode(
            header.sender, Kind.REPLY, next(self._ids), reply.to_wire(), header.id
        )
        passed = self._take_passed()
        if all(owner == self.name for owner, _, _ in passed):
            self._transport.send(header.sender, frames).add_done_callback(_log_unsent)
            return
        # The result passes on RRefs owned elsewhere: their owners must count the caller
        # before the caller can release them.
        task = asyncio.get_running_loop().create_task(
            self._send_after_forks(header, passed, frames)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_after_forks(
        self, header: Header, passed: list[tuple[str, int, str]], frames: list[Any]
    ) -> None:
        try:
            await self._announce_forks(passed)
        except (RpcError, TransportError) as e:
            # The result cannot leave; the caller hears why instead of waiting in vain.
            self._reply(header, Reply(error=(type(e).__name__, str(e), "")))
            return
        self._transport.send(header.sender, frames).add_done_callback(_log_unsent)

    def _on_reply(self, header: Header, message: Inbound) -> None:
        try:
            payload, tensors = self._decode(message)
            reply = Reply.from_wire(payload)
        except CodecError as e:
            self._transport.dead_letter(message, f"bad reply: {e}")
            pending = self._pending.get(header.reply_to)
            if pending is not None:
                _fail(pending.future, e)
            return
        self._transport.done(message)
        if header.context is not None and self.seam is not None:
            self.seam.incoming(self, header.sender, header.context, tensors, False)
        pending = self._pending.get(header.reply_to)
        if pending is None:
            logger.debug("event=late_reply call=%d from=%s", header.reply_to, header.sender)
            return
        if reply.error is None:
            if not pending.future.done():
                pending.future.set_result(reply.value)
            return
        kind, text, tb = reply.error
        _fail(pending.future, RemoteError(kind, text, worker=header.sender, remote_traceback=tb))

    def _on_rref_updates(self, header: Header, message: Inbound) -> None:
        try:
            updates = RRefUpdates.from_wire(self._decode(message)[0])
        except CodecError as e:
            self._transport.dead_letter(message, f"bad rref updates: {e}")
            return
        for rref_id, holder, delta in updates.updates:
            self._rrefs.add(rref_id, holder, delta)
        self._transport.done(message)
        if self._rrefs.holders():
            self._watch_wanted.set()

    def _on_leaving(self, header: Header, message: Inbound) -> None:
        freed = self._rrefs.drop_holder(header.sender)
        self._alive_at.pop(header.sender, None)
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

    # *** references ***

    def _release_rref(self, owner: str, rref_id: int) -> None:
        """An RRef object died (maybe in another thread, maybe at interpreter exit)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._queue_release, owner, rref_id)
        except RuntimeError:  # the loop closed between the check and the call: nothing to free
            return

    def _queue_release(self, owner: str, rref_id: int) -> None:
        if owner == self.name:
            self._rrefs.add(rref_id, self.name, -1)
            return
        self._held_from[owner] -= 1
        if self._state not in ("running", "draining"):
            return
        queued = self._releases.setdefault(owner, [])
        queued.append((rref_id, self.name, -1))
        if len(queued) == 1:
            asyncio.get_running_loop().call_soon(self._flush_releases, owner)

    def _flush_releases(self, owner: str) -> None:
        updates = self._releases.pop(owner, [])
        if updates and self._state in ("running", "draining"):
            self._send_updates(owner, updates).add_done_callback(_log_unsent)

    def _announce_leaving(self) -> None:
        # Releases still queued need not go: leaving drops all of this agent's counts.
        owners = {o for o, n in self._held_from.items() if n > 0} | set(self._releases)
        self._releases.clear()
        for owner in sorted(owners - {self.name}):
            try:
                self.send(owner, Kind.LEAVING, {}).add_done_callback(_log_unsent)
            except TransportError as e:  # Redis is gone: the owner's liveness check frees them
                logger.warning("event=leave_notice_failed owner=%s error=%s", owner, e)

    # *** liveness ***

    async def _watch(self) -> None:
        """Fail calls to, and drop references held by, agents whose heartbeat lapsed."""
        while True:
            await self._watch_wanted.wait()
            await asyncio.sleep(self._check_every)  # the checking period, not a wait for an event
            names = sorted({p.dest for p in self._pending.values()} | self._rrefs.holders())
            if not names:
                self._watch_wanted.clear()
                continue
            try:
                alive = await self._transport.alive(names)
            except TransportError as e:
                logger.warning("event=liveness_check_failed agent=%s error=%s", self.name, e)
                continue
            now = time.monotonic()
            for name, ok in zip(names, alive, strict=True):
                if ok:
                    self._alive_at[name] = now
                else:
                    self._lost(name)

    def _lost(self, name: str) -> None:
        self._alive_at.pop(name, None)
        error = WorkerUnavailable(f"worker {name!r} stopped heartbeating")
        for pending in self._pending.values():
            if pending.dest == name:
                _fail(pending.future, error)
        freed = self._rrefs.drop_holder(name)
        logger.info("event=worker_lost agent=%s lost=%s rrefs_freed=%d", self.name, name, freed)

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, namespace={self.namespace!r}, state={self._state})"


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _log_unsent(stored: asyncio.Future[None]) -> None:
    if stored.cancelled() or (error := stored.exception()) is None:
        return
    # A receiver that left needs no reply, release or notice: expected, so not a warning.
    level = logging.DEBUG if isinstance(error, InboxMissing) else logging.WARNING
    logger.log(level, "event=send_failed error=%s", error)


def _parameter_type() -> type:
    from asyncgrad.nn import Parameter

    return Parameter
