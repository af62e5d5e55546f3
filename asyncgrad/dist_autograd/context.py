"""Distributed autograd contexts: what one agent recorded, per context, and their lifetime.

Each agent holds a `Contexts` (installed as its RPC seam). Inside a context every message
carries the context id; one carrying tensors that require grad also gets a message id,
a `SendRpcBackward` on the sender and a `RecvRpcBackward` on the receiver. A context
remembers the peers it reached, so a pass, a release or an abort can follow it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from asyncgrad.errors import ContextError, TransportError, WorkerUnavailable
from asyncgrad.graph import Array, is_grad_enabled
from asyncgrad.rpc import Agent, current_agent
from asyncgrad.rpc.messages import Header, Kind, MessageError, require
from asyncgrad.tensor import Tensor

from .nodes import RecvRpcBackward, SendRpcBackward

if TYPE_CHECKING:
    from .passes import Pass

__all__ = ["Context", "Contexts", "context", "contexts_of", "get_gradients"]

logger = logging.getLogger(__name__)

_current_context: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "asyncgrad_autograd_context", default=None
)
DEFAULT_EXPIRY = 600.0  # seconds a context nobody touches is kept
RELEASE_DELAY = 0.05  # seconds a release waits for a message to ride on before it goes alone


@dataclass(eq=False)
class Context:
    """One context as this agent sees it."""

    id: int
    peers: set[str] = field(default_factory=set)
    sends: dict[tuple[str, int], SendRpcBackward] = field(default_factory=dict)
    recvs: dict[tuple[str, int], RecvRpcBackward] = field(default_factory=dict)
    grads: dict[Tensor, Array] = field(default_factory=dict)
    passes: dict[int, Pass] = field(default_factory=dict)
    # Pass id -> this pass's gradients, kept until the next pass so an abort can undo them.
    applied: dict[int, dict[Tensor, Array]] = field(default_factory=dict)
    ended: set[int] = field(default_factory=set)  # passes finished or aborted here
    aborted: set[int] = field(default_factory=set)  # passes whose abort was passed on
    early: dict[int, list[tuple[str, Kind, Any]]] = field(default_factory=dict)
    touched: float = field(default_factory=time.monotonic)

    def touch(self) -> None:
        self.touched = time.monotonic()

    def add_grads(self, grads: dict[Tensor, Array], sign: int = 1) -> None:
        for leaf, grad in grads.items():
            total = self.grads.get(leaf)
            if sign > 0:
                self.grads[leaf] = grad if total is None else total + grad
            elif total is not None:
                self.grads[leaf] = total - grad


class Contexts:
    """An agent's contexts, and its side of every distributed autograd message."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.by_id: dict[int, Context] = {}
        self.expiry = DEFAULT_EXPIRY
        # Random start: a restarted agent (same id) must not reuse its earlier ids.
        self._context_ids = itertools.count(secrets.randbits(40))
        self._message_ids = itertools.count(1)
        self._pass_ids = itertools.count(secrets.randbits(24) << 8)
        self._sweeper: asyncio.TimerHandle | None = None
        self._releases: dict[str, list[int]] = {}  # peer -> contexts released, news not sent
        self._release_timer: asyncio.TimerHandle | None = None
        self._running: set[Pass] = set()
        self._watcher: asyncio.Task[None] | None = None

    # *** contexts ***

    def new(self) -> Context:
        if not 0 <= self.agent.id < 1 << 16:
            raise ContextError(f"agent id {self.agent.id} does not fit the high 16 bits")
        ctx_id = (self.agent.id << 48) | (next(self._context_ids) & ((1 << 48) - 1))
        ctx = self.by_id[ctx_id] = Context(ctx_id)
        self._schedule_sweep()
        return ctx

    def get(self, ctx_id: int) -> Context:
        ctx = self.by_id.get(ctx_id)
        if ctx is None:
            raise LookupError(f"no distributed autograd context {ctx_id} on {self.agent.name}")
        return ctx

    def new_pass_id(self) -> int:
        return (self.agent.id << 48) | (next(self._pass_ids) & ((1 << 48) - 1))

    def release(self, ctx_id: int, came_from: str | None = None) -> None:
        """Drop a context here and tell every peer it reached (each passes it on once).

        The news rides on the next call or reply to that peer, or leaves on its own after
        `RELEASE_DELAY`: a loop of short contexts then sends no release messages at all.
        """
        ctx = self.by_id.pop(ctx_id, None)
        if ctx is None:
            return
        for p in list(ctx.passes.values()):
            p.fail(ContextError(f"context {ctx_id} was released during backward"), spread=False)
        for peer in ctx.peers - {came_from, self.agent.name}:
            self._releases.setdefault(peer, []).append(ctx_id)
        if self._releases and self._release_timer is None:
            loop = asyncio.get_running_loop()
            self._release_timer = loop.call_later(RELEASE_DELAY, self._flush_releases)

    def _flush_releases(self) -> None:
        self._release_timer = None
        pending, self._releases = self._releases, {}
        for peer, ids in pending.items():
            self.agent.post(peer, Kind.CONTEXT_RELEASE, {"c": 0, "r": ids})

    def _schedule_sweep(self) -> None:
        if self._sweeper is None and self.by_id:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(max(self.expiry / 4, 0.05), self._sweep)

    def _sweep(self) -> None:
        """Drop contexts nobody touched for `expiry` seconds (their owner went away)."""
        self._sweeper = None
        stale = time.monotonic() - self.expiry
        for ctx in [c for c in self.by_id.values() if c.touched < stale and not c.passes]:
            logger.info("event=context_expired agent=%s context=%d", self.agent.name, ctx.id)
            self.by_id.pop(ctx.id, None)
        self._schedule_sweep()

    # *** liveness during passes ***

    def watch(self, running: Pass) -> None:
        self._running.add(running)
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def unwatch(self, running: Pass) -> None:
        self._running.discard(running)

    async def _watch(self) -> None:
        """Fail a running pass when a worker its context reached stops heartbeating."""
        period = self.agent.failure_timeout * 0.2
        try:
            while self._running:
                await asyncio.sleep(period)  # the checking period, not a wait for an event
                peers = sorted({p for r in self._running for p in r.ctx.peers} - {self.agent.name})
                if not peers:
                    continue
                try:
                    dead = await self.agent.gone(peers)
                except TransportError as e:  # Redis unreachable: passes keep their deadlines
                    logger.warning("event=pass_watch_failed agent=%s error=%s", self.agent.name, e)
                    continue
                for running in [r for r in self._running if r.ctx.peers & dead]:
                    lost = sorted(running.ctx.peers & dead)[0]
                    running.fail(
                        WorkerUnavailable(f"worker {lost!r} stopped heartbeating during backward")
                    )
        finally:
            self._watcher = None

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._release_timer is not None:
            self._release_timer.cancel()
        self._flush_releases()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for ctx in list(self.by_id.values()):
            for p in list(ctx.passes.values()):
                p.fail(ContextError(f"agent {self.agent.name} shut down"), spread=False)
        self.by_id.clear()

    # *** the RPC seam ***

    def outgoing(self, agent: Agent, dest: str, tensors: list[Tensor]) -> Any:
        """[context id, message id, contexts released] for a call or reply (or None)."""
        released = self._releases.pop(dest, [])
        ctx_id = _current_context.get()
        if ctx_id is None:
            return [0, 0, released] if released else None
        ctx = self.by_id.get(ctx_id)
        if ctx is None:
            raise ContextError(f"context {ctx_id} was released; calls in it cannot be recorded")
        ctx.peers.add(dest)
        ctx.touch()
        message_id = 0
        if tensors and is_grad_enabled():
            message_id = next(self._message_ids)
            ctx.sends[(dest, message_id)] = SendRpcBackward(dest, message_id, tensors)
        return [ctx_id, message_id, released]

    def incoming(
        self, agent: Agent, sender: str, record: Any, tensors: list[Tensor], call: bool
    ) -> None:
        require(record, list, "context record")
        if len(record) != 3:
            raise MessageError("a context record is [context id, message id, released ids]")
        ctx_id, message_id = require(record[0], int, "context"), require(record[1], int, "msg")
        for released in require(record[2], list, "released"):
            self.release(require(released, int, "released id"), came_from=sender)
        if not ctx_id:
            return
        ctx = self.by_id.get(ctx_id)
        if ctx is None:
            ctx = self.by_id[ctx_id] = Context(ctx_id)
            self._schedule_sweep()
        ctx.peers.add(sender)
        ctx.touch()
        if call:
            _current_context.set(ctx_id)  # the caller runs this in the call's own context
        if message_id and tensors:
            node = RecvRpcBackward(sender, message_id, len(tensors))
            ctx.recvs[(sender, message_id)] = node
            for i, t in enumerate(tensors):
                t.grad_fn, t.output_nr, t.requires_grad = node, i, True

    def unsent(self, agent: Agent, dest: str, record: Any) -> None:
        """A recorded message never reached `dest`: forget its send, or a pass would wait;
        the releases it carried go with the next message."""
        ctx = self.by_id.get(record[0])
        if ctx is not None:
            ctx.sends.pop((dest, record[1]), None)
        if record[2]:
            self._releases.setdefault(dest, []).extend(record[2])

    def handle(self, agent: Agent, header: Header, payload: Any) -> None:
        from .passes import handle

        handle(self, header.sender, header.kind, payload)

    def inbox_lost(self, agent: Agent) -> None:
        """Redis lost this agent's inbox: a pass running here may wait for a message that
        is gone, so each fails (everywhere) now rather than at its deadline."""
        for running in list(self._running):
            running.fail(
                ContextError(
                    f"Redis lost the inbox of {agent.name!r} during backward (restarted "
                    "without persistence?): messages of the pass may be gone"
                )
            )

    def send(self, dest: str, kind: Kind, payload: Any) -> asyncio.Future[None]:
        """A message whose storing someone waits for (a gradient, a pass start)."""
        return self.agent.send(dest, kind, payload)

    def post(self, dest: str, kind: Kind, payload: Any) -> None:
        """A message nobody waits for (done, abort, release): a failure is only logged."""
        self.agent.post(dest, kind, payload)

    def open_contexts(self) -> int:
        return len(self.by_id)  # asked from the heartbeat's thread: len() of a dict is safe


def contexts_of(agent: Agent) -> Contexts:
    seam = agent.seam
    if not isinstance(seam, Contexts):
        raise RuntimeError(f"agent {agent.name} has no distributed autograd")
    return seam


@contextlib.asynccontextmanager
async def context() -> AsyncIterator[int]:
    """A distributed autograd context on the current agent; yields its id.

    Leaving it releases the context here and on every worker it reached.

        >>> async with dist_autograd.context() as context_id:
        ...     out = await rpc.rpc_async("ps", forward, args=(x,))
        ...     await dist_autograd.backward(context_id, [loss(out)])
    """
    contexts = contexts_of(current_agent())
    ctx = contexts.new()
    token = _current_context.set(ctx.id)
    try:
        yield ctx.id
    finally:
        _current_context.reset(token)
        contexts.release(ctx.id)


def get_gradients(context_id: int) -> dict[Tensor, Array]:
    """The leaves of this worker that received gradients in the context, with them."""
    ctx = contexts_of(current_agent()).get(context_id)
    ctx.touch()
    return dict(ctx.grads)
