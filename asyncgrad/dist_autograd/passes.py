"""`Pass`: this worker's part of one backward pass in one context, and all its bookkeeping
(README, "How it works": the distributed backward).

A pass spreads like a diffusing computation: the caller sends PASS_START to the peers its
context reached; a worker that hears of the pass for the first time makes the sender its
parent and passes the start on to its own peers; one that already takes part answers
DONE at once. Each worker runs its part with the local engine, starting from its
`SendRpcBackward` nodes (and the roots, on the caller): a `RecvRpcBackward` that none of
them reaches is told "none coming" at once, every other one ships its gradient when the
engine reaches it. A worker answers its parent DONE when its engine has drained, the
gradients it sent are stored, and its children answered; so the caller's `backward`
returns exactly when the whole graph has run. Any failure sends PASS_ABORT along every
edge of the context; each worker drops the pass (and undoes its gradients) once.

Its part is a span ("backward": from its start here to its DONE or abort), and each run of
the local engine (from the roots, or from a gradient that arrived) one within it ("graph").

A `Pass` exists here from the first message about it: before its start arrives it keeps
what came early; after it ended it stays, so that a late start is answered and a late
abort still undoes its gradients.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from asyncgrad.errors import (
    AsyncgradError,
    ContextError,
    RemoteError,
    RPCTimeout,
    WorkerUnavailable,
)
from asyncgrad.graph import Array, GraphTask, Node, nodes_of
from asyncgrad.messages import AutogradRecord, Grad, PassAbort, PassDone, PassStart
from asyncgrad.tensor import Tensor
from asyncgrad.tracing import Span
from asyncgrad.transport import InboxMissing

from .context import Context
from .nodes import RecvRpcBackward, SendRpcBackward

if TYPE_CHECKING:
    from asyncgrad.rpc.wire import OneWay, Wire

__all__ = ["Pass"]

logger = logging.getLogger(__name__)


class Pass:
    """Pass `pass_id` of context `ctx` on this worker.

    `state`: "waiting" (heard of, not started here), "running", "done" or "aborted".
    `result` resolves when this worker's part has finished, or fails with the pass.
    """

    def __init__(self, ctx: Context, pass_id: int, wire: Wire) -> None:
        self.ctx, self.id = ctx, pass_id
        self._wire = wire
        self._spans = wire.spans
        self._span: Span | None = None
        self.state = "waiting"
        self.parent: str | None = None
        self.retain = False
        self.started = time.monotonic()
        self.result: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._early: list[tuple[str, Grad | PassDone]] = []
        self._sends: dict[tuple[str, int], SendRpcBackward] = {}
        self._recvs: dict[tuple[str, int], RecvRpcBackward] = {}
        self._children: set[str] = set()
        self._unstored: Counter[str] = Counter()  # gradients sent, per peer, not yet stored
        self._fresh: Counter[str] = Counter()  # of those, posted since this worker last woke
        self._task: GraphTask | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    # *** running ***

    def start(
        self, parent: str | None, retain: bool, roots: Sequence[tuple[Any, Array]] = ()
    ) -> None:
        """Count dependencies, answer unreached receives, spread the start, seed the roots."""
        ctx = self.ctx
        self.state, self.parent, self.retain = "running", parent, retain
        self.started = time.monotonic()
        args = {"pass": self.id, "from": parent or "roots"}
        self._span = self._spans.begin("backward", "backward", ctx.id, args=args, cpu=True)
        with self._spans.ending(self._spans.begin("graph", "backward", ctx.id)):
            self._launch(parent, retain, roots)
        early, self._early = self._early, []
        for sender, record in early:
            self._on(sender, record)
        self._check()

    def _launch(self, parent: str | None, retain: bool, roots: Sequence[tuple[Any, Array]]) -> None:
        """The engine from the sends (and roots), "none" to unreached receives, the start
        spread to the peers, the roots seeded."""
        ctx = self.ctx
        self._sends, self._recvs = dict(ctx.sends), dict(ctx.recvs)
        starts: list[Node] = [*nodes_of(edge for edge, _ in roots), *self._sends.values()]
        self._task = GraphTask(starts, retain_graph=retain, exit=self._ship)
        for node in self._recvs.values():
            if not self._task.reaches(node):
                self._post_grad(node, None)
        for peer in sorted(ctx.peers - {parent, self._wire.name}):
            self._children.add(peer)
            self._post(peer, PassStart(ctx.id, self.id, retain), counted=False)
        for edge, grad in roots:
            self._task.seed(edge, grad)

    def receive(self, sender: str, record: AutogradRecord) -> None:
        """A message about this pass from `sender` (the dispatcher in contexts.py)."""
        if isinstance(record, PassStart):
            if self.state == "waiting":
                self.start(sender, record.retain)
            else:  # it takes part already, or took part: nothing more to do for this parent
                self._wire.post(sender, PassDone(self.ctx.id, self.id))
        elif isinstance(record, PassAbort):
            self.fail(_rebuild(*record.error), came_from=sender)
        elif isinstance(record, Grad | PassDone):
            if self.state == "waiting":
                self._early.append((sender, record))
            elif self.running:
                self._on(sender, record)
            else:
                logger.debug("event=late_message agent=%s from=%s", self._wire.name, sender)

    def _on(self, sender: str, record: Grad | PassDone) -> None:
        """A GRAD for one of our sends, or a child's DONE."""
        assert self._task is not None
        self._fresh.clear()
        if isinstance(record, PassDone):
            self._children.discard(sender)
        else:
            send = self._sends.get((sender, record.message))
            if send is None or not self._task.reaches(send):
                logger.debug("event=grad_ignored agent=%s from=%s", self._wire.name, sender)
                return
            grads = record.grads
            run = self._spans.begin("graph", "backward", self.ctx.id, args={"none": grads is None})
            with self._spans.ending(run):
                self._task.feed(send, None if grads is None else send.check(grads))
        self._check()

    def _ship(self, node: Node, grads: list[Any] | None) -> None:
        assert isinstance(node, RecvRpcBackward)
        self._post_grad(node, grads)

    def _post_grad(self, node: RecvRpcBackward, grads: list[Any] | None) -> None:
        record = Grad(
            self.ctx.id, self.id, node.message_id, None if grads is None else tuple(grads)
        )
        self._post(node.peer, record, counted=True)

    def _post(self, peer: str, record: OneWay, counted: bool) -> None:
        stored = self._wire.send(peer, record)
        if counted:
            self._unstored[peer] += 1
            self._fresh[peer] += 1
            stored.add_done_callback(functools.partial(self._stored, peer))
        else:
            stored.add_done_callback(self._reached)

    def _stored(self, peer: str, stored: asyncio.Future[bytes]) -> None:
        self._unstored[peer] -= 1
        self._fresh[peer] = min(self._fresh[peer], self._unstored[peer])
        self._reached(stored)
        self._check()

    def _reached(self, stored: asyncio.Future[bytes]) -> None:
        error = None if stored.cancelled() else stored.exception()
        if error is None or not self.running:
            return
        if isinstance(error, InboxMissing):
            self.fail(WorkerUnavailable(f"backward could not reach a worker: {error}"))
        else:  # Redis refused the message (OOM, NOPERM, too large): say so, with why
            self.fail(ContextError(f"backward could not send a message: {error}"))

    def _check(self) -> None:
        """Finish once the engine drained, our gradients are stored and children answered.

        Gradients still on their way count as stored when they all go to the parent and
        were posted in this same turn: DONE then leaves in the same stream entry, after
        them, which saves the parent a wait for one more message.
        """
        if not self.running or self._task is None or not self._task.done or self._children:
            return
        waiting = {peer for peer, n in self._unstored.items() if n}
        parent = self.parent
        if waiting and not (
            parent is not None
            and waiting == {parent}
            and self._unstored[parent] == self._fresh[parent]
        ):
            return
        ctx = self.ctx
        grads: dict[Tensor, Array] = self._task.leaf_grads  # type: ignore[assignment]
        ctx.apply(self.id, grads)
        if not self.retain:
            for key in self._sends:
                ctx.sends.pop(key, None)
            for key in self._recvs:
                ctx.recvs.pop(key, None)
        self._let_go()
        self.state = "done"
        self._spans.end(self._span)
        if parent is not None:
            self._wire.post(parent, PassDone(ctx.id, self.id))
        if not self.result.done():
            self.result.set_result(None)

    def _let_go(self) -> None:
        """An ended pass stays only as a record that it ended: what it held (the graph and
        its saved arrays, the engine, which refers back to this pass) goes now."""
        self._task, self._sends, self._recvs, self._early = None, {}, {}, []

    # *** failing ***

    def fail(
        self, error: BaseException, *, spread: bool = True, came_from: str | None = None
    ) -> None:
        """Drop this pass here (undoing its gradients) and, if `spread`, tell every peer of
        the context but `came_from`; whatever state it was in, once."""
        if self.state == "aborted":
            return
        self.state = "aborted"
        self._spans.end(self._span, error=type(error).__name__)
        self._let_go()
        self.ctx.undo(self.id)
        if not self.result.done():
            self.result.set_exception(error)
            self.result.exception()  # only the caller's pass has someone awaiting it
        if spread:
            kind, message, worker = _describe(error, self._wire.name)
            record = PassAbort(self.ctx.id, self.id, (kind, message, worker))
            for peer in sorted(self.ctx.peers - {came_from, self._wire.name}):
                self._wire.post(peer, record)


def _describe(error: BaseException, here: str) -> tuple[str, str, str]:
    if isinstance(error, RemoteError):
        return error.remote_type, error.message, error.worker
    return type(error).__name__, str(error), here


def _rebuild(kind: str, message: str, worker: str) -> AsyncgradError:
    if kind == "WorkerUnavailable":
        return WorkerUnavailable(message)
    if kind == "RPCTimeout":
        return RPCTimeout(message)
    return RemoteError(kind, message, worker=worker)
