"""`Contexts`: one agent's distributed autograd. Its contexts and their passes, their
lifetime (release, expiry), and its side of RPC's seam and of every autograd message.

The agent builds one and gives it the agent's `Wire` (to send autograd messages) and
`Liveness` (to fail a pass whose peer dies). RPC hands it each recorded call and reply
(`outgoing`, `incoming`, `unsent`) and each autograd message (`receive`, the one
dispatcher: it finds the pass a message is about and hands the message to it).

This module must not import `asyncgrad.rpc` at run time: the agent imports it.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import secrets
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from asyncgrad.errors import ContextError, RPCTimeout, TransportError, WorkerUnavailable
from asyncgrad.graph import Array, is_grad_enabled
from asyncgrad.messages import AutogradRecord, ContextRecord, ContextRelease, PassDone, PassStart
from asyncgrad.tensor import Tensor, root_seeds

from .context import Context
from .nodes import RecvRpcBackward, SendRpcBackward
from .passes import Pass

if TYPE_CHECKING:
    from asyncgrad.rpc.liveness import Liveness
    from asyncgrad.rpc.wire import Wire

__all__ = ["Contexts", "current_context"]

logger = logging.getLogger(__name__)

# The context id of this task (set inside `dist_autograd.context()`, and in a call served
# in a context).
current_context: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "asyncgrad_autograd_context", default=None
)
DEFAULT_EXPIRY = 600.0  # seconds a context nobody touches is kept
RELEASE_DELAY = 0.05  # seconds a release waits for a message to ride on before it goes alone


class Contexts:
    """An agent's contexts, their passes, and its side of every distributed autograd message.

    `rpc_timeout` bounds a backward that names no timeout; a running pass fails when a
    peer of its context stops heartbeating (checked every `failure_timeout / 5`).
    """

    def __init__(
        self, wire: Wire, liveness: Liveness, *, rpc_timeout: float, failure_timeout: float
    ) -> None:
        self._wire = wire
        self.spans = wire.spans
        self._liveness = liveness
        self._rpc_timeout = rpc_timeout
        self._failure_timeout = failure_timeout
        self.by_id: dict[int, Context] = {}
        self._passes: dict[int, dict[int, Pass]] = {}  # context id -> pass id -> pass
        self.expiry = DEFAULT_EXPIRY
        # Random start: a restarted agent (same id) must not reuse its earlier ids.
        self._context_ids = itertools.count(secrets.randbits(40))
        self._message_ids = itertools.count(1)
        self._pass_ids = itertools.count(secrets.randbits(24) << 8)
        self._sweeper: asyncio.TimerHandle | None = None
        self._releases: dict[str, list[int]] = {}  # peer -> contexts released, news not sent
        self._release_timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task[None] | None = None

    # *** contexts ***

    def new(self) -> Context:
        agent_id = self._wire.agent_id
        if not 0 <= agent_id < 1 << 16:
            raise ContextError(f"agent id {agent_id} does not fit the high 16 bits")
        ctx_id = (agent_id << 48) | (next(self._context_ids) & ((1 << 48) - 1))
        ctx = self.by_id[ctx_id] = Context(ctx_id)
        ctx.span = self.spans.begin("context", "step", ctx_id, cpu=True)
        self._schedule_sweep()
        return ctx

    def get(self, ctx_id: int) -> Context:
        ctx = self.by_id.get(ctx_id)
        if ctx is None:
            raise LookupError(f"no distributed autograd context {ctx_id} on {self._wire.name}")
        return ctx

    def gradients(self, ctx_id: int) -> dict[Tensor, Array]:
        """The leaves of this worker that received gradients in the context, with them."""
        ctx = self.get(ctx_id)
        ctx.touch()
        return dict(ctx.grads)

    def release(self, ctx_id: int, came_from: str | None = None) -> None:
        """Drop a context here and tell every peer it reached (each passes it on once).

        The news rides on the next call or reply to that peer, or leaves on its own after
        `RELEASE_DELAY`: a loop of short contexts then sends no release messages at all.
        """
        ctx = self.by_id.pop(ctx_id, None)
        if ctx is None:
            return
        self.spans.end(ctx.span, peers=len(ctx.peers))
        for work in self._passes.pop(ctx_id, {}).values():
            if work.running:
                error = ContextError(f"context {ctx_id} was released during backward")
                work.fail(error, spread=False)
        for peer in ctx.peers - {came_from, self._wire.name}:
            self._releases.setdefault(peer, []).append(ctx_id)
        if self._releases and self._release_timer is None:
            loop = asyncio.get_running_loop()
            self._release_timer = loop.call_later(RELEASE_DELAY, self._flush_releases)

    def _flush_releases(self) -> None:
        self._release_timer = None
        pending, self._releases = self._releases, {}
        for peer, ids in pending.items():
            self._wire.post(peer, ContextRelease(tuple(ids)))

    def _schedule_sweep(self) -> None:
        if self._sweeper is None and self.by_id:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(max(self.expiry / 4, 0.05), self._sweep)

    def _sweep(self) -> None:
        """Drop contexts nobody touched for `expiry` seconds (their owner went away)."""
        self._sweeper = None
        stale = time.monotonic() - self.expiry
        for ctx in [c for c in self.by_id.values() if c.touched < stale]:
            if not any(p.running for p in self._passes.get(ctx.id, {}).values()):
                logger.info("event=context_expired agent=%s context=%d", self._wire.name, ctx.id)
                self.spans.end(ctx.span, error="expired")
                self.by_id.pop(ctx.id, None)
                self._passes.pop(ctx.id, None)
        self._schedule_sweep()

    def open_contexts(self) -> int:
        return len(self.by_id)  # asked from the heartbeat's thread: len() of a dict is safe

    # *** passes ***

    def running(self) -> list[Pass]:
        """The passes running here."""
        return [p for passes in self._passes.values() for p in passes.values() if p.running]

    def _pass(self, ctx: Context, pass_id: int) -> Pass:
        passes = self._passes.setdefault(ctx.id, {})
        work = passes.get(pass_id)
        if work is None:
            work = passes[pass_id] = Pass(ctx, pass_id, self._wire)
        return work

    async def backward(
        self,
        ctx_id: int,
        roots: Sequence[Tensor],
        retain_graph: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Run a pass from `roots` in context `ctx_id` (see `dist_autograd.backward`)."""
        ctx = self.get(ctx_id)
        if any(p.running for p in self._passes.get(ctx_id, {}).values()):
            raise ContextError(f"context {ctx_id} already runs a backward pass")
        seeds = root_seeds(roots)
        pass_id = (self._wire.agent_id << 48) | (next(self._pass_ids) & ((1 << 48) - 1))
        work = self._pass(ctx, pass_id)
        limit = self._rpc_timeout if timeout is None else timeout
        deadline = asyncio.timeout(limit)
        try:
            try:
                work.start(None, retain_graph, seeds)
            except Exception as e:
                work.fail(e)
                raise
            self._watch()
            async with deadline:
                await work.result
        except TimeoutError:
            if not deadline.expired():
                raise
            message = f"distributed backward in context {ctx_id} took over {limit} s"
            work.fail(RPCTimeout(message))
            raise RPCTimeout(message) from None

    def receive(self, sender: str, record: AutogradRecord) -> None:
        """One autograd message from `sender`: to the pass it is about."""
        if isinstance(record, ContextRelease):
            for released in record.contexts:
                self.release(released, came_from=sender)
            return
        ctx = self.by_id.get(record.context)
        if ctx is None:
            if isinstance(record, PassStart):  # a context never seen, or released: no part
                self._wire.post(sender, PassDone(record.context, record.pass_id))
            return
        ctx.touch()
        work = self._pass(ctx, record.pass_id)
        try:
            work.receive(sender, record)
        except Exception as e:
            # This worker's part failed: the pass fails everywhere, with this error.
            logger.info(
                "event=pass_failed agent=%s context=%d error=%r", self._wire.name, ctx.id, e
            )
            work.fail(e)
        if work.running:
            self._watch()

    # *** liveness during passes ***

    def _watch(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_peers())

    async def _watch_peers(self) -> None:
        """Fail a running pass when a worker its context reached stops heartbeating."""
        period = self._failure_timeout * 0.2
        name = self._wire.name
        try:
            while running := self.running():
                await asyncio.sleep(period)  # the checking period, not a wait for an event
                peers = sorted({p for work in running for p in work.ctx.peers} - {name})
                if not peers:
                    continue
                try:
                    dead = await self._liveness.gone(peers)
                except TransportError as e:  # Redis unreachable: passes keep their deadlines
                    logger.warning("event=pass_watch_failed agent=%s error=%s", name, e)
                    continue
                for work in [w for w in self.running() if w.ctx.peers & dead]:
                    lost = sorted(work.ctx.peers & dead)[0]
                    work.fail(
                        WorkerUnavailable(f"worker {lost!r} stopped heartbeating during backward")
                    )
        finally:
            self._watcher = None

    def inbox_lost(self) -> None:
        """Redis lost this agent's inbox: a pass running here may wait for a message that
        is gone, so each fails (everywhere) now rather than at its deadline."""
        for work in self.running():
            work.fail(
                ContextError(
                    f"Redis lost the inbox of {self._wire.name!r} during backward (restarted "
                    "without persistence?): messages of the pass may be gone"
                )
            )

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._release_timer is not None:
            self._release_timer.cancel()
        self._flush_releases()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for work in self.running():
            work.fail(ContextError(f"agent {self._wire.name} shut down"), spread=False)
        self.by_id.clear()
        self._passes.clear()

    # *** RPC's seam ***

    def outgoing(self, dest: str, tensors: list[Tensor]) -> ContextRecord | None:
        """The record for a call or reply to `dest` (None: nothing to record)."""
        released = tuple(self._releases.pop(dest, ()))
        ctx_id = current_context.get()
        if ctx_id is None:
            return ContextRecord(0, 0, released) if released else None
        ctx = self.by_id.get(ctx_id)
        if ctx is None:
            raise ContextError(f"context {ctx_id} was released; calls in it cannot be recorded")
        ctx.peers.add(dest)
        ctx.touch()
        message_id = 0
        if tensors and is_grad_enabled():
            message_id = next(self._message_ids)
            ctx.sends[(dest, message_id)] = SendRpcBackward(dest, message_id, tensors)
        return ContextRecord(ctx_id, message_id, released)

    def incoming(
        self, sender: str, record: ContextRecord, tensors: list[Tensor], call: bool
    ) -> None:
        """A recorded call or reply arrived: a recv node for its tensors (those that
        required grad on the sender; they arrived as constants), in its context."""
        for released in record.released:
            self.release(released, came_from=sender)
        if not record.context:
            return
        ctx = self.by_id.get(record.context)
        if ctx is None:
            ctx = self.by_id[record.context] = Context(record.context)
            self._schedule_sweep()
        ctx.peers.add(sender)
        ctx.touch()
        if call:
            current_context.set(record.context)  # the caller runs this in the call's context
        if record.message and tensors:
            node = RecvRpcBackward(sender, record.message, len(tensors))
            ctx.recvs[(sender, record.message)] = node
            for i, t in enumerate(tensors):
                t.grad_fn, t.output_nr, t.requires_grad = node, i, True

    def unsent(self, dest: str, record: ContextRecord) -> None:
        """A recorded message never reached `dest`: forget its send, or a pass would wait;
        the releases it carried go with the next message."""
        ctx = self.by_id.get(record.context)
        if ctx is not None:
            ctx.sends.pop((dest, record.message), None)
        if record.released:
            self._releases.setdefault(dest, []).extend(record.released)
