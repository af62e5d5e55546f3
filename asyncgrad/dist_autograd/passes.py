"""The distributed backward pass (DESIGN.md, "The distributed backward, step by step").

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
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from asyncgrad.errors import (
    AsyncgradError,
    ContextError,
    RemoteError,
    RPCTimeout,
    WorkerUnavailable,
)
from asyncgrad.graph import Array, GraphTask
from asyncgrad.rpc import current_agent
from asyncgrad.rpc.messages import Kind, MessageError, require
from asyncgrad.tensor import Tensor

from .context import Context, Contexts, contexts_of
from .nodes import RecvRpcBackward

__all__ = ["Pass", "backward", "handle"]

logger = logging.getLogger(__name__)


class Pass:
    """This worker's part of one backward pass in one context."""

    def __init__(
        self, contexts: Contexts, ctx: Context, pass_id: int, parent: str | None, retain: bool
    ) -> None:
        self.contexts, self.ctx, self.id = contexts, ctx, pass_id
        self.parent, self.retain = parent, retain
        self.agent = contexts.agent
        self.sends = dict(ctx.sends)
        self.recvs = dict(ctx.recvs)
        self.children: set[str] = set()
        self.unstored: Counter[str] = Counter()  # gradients sent, per peer, not yet stored
        self.fresh: Counter[str] = Counter()  # of those, posted since this worker last woke
        self.result: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.started = time.monotonic()
        self.task: GraphTask | None = None
        self.over = False

    # *** running ***

    def start(self, roots: Sequence[tuple[Any, Array]] = ()) -> None:
        """Count dependencies, answer unreached receives, spread the start, seed the roots."""
        ctx = self.ctx
        ctx.passes[self.id] = self
        self.fresh.clear()
        starts = [edge for edge, _ in roots] + list(self.sends.values())
        nodes = [e[0] if type(e) is tuple else e for e in starts]
        self.task = GraphTask(
            [n for n in nodes if not isinstance(n, Tensor)], retain_graph=self.retain
        )
        for node in self.recvs.values():
            node.ship = self._ship
            if not self.task.reaches(node):
                self._ship(node, None)
        for peer in sorted(ctx.peers - {self.parent, self.agent.name}):
            self.children.add(peer)
            start = {"c": ctx.id, "p": self.id, "r": self.retain}
            self._post(peer, Kind.PASS_START, start, counted=False)
        self.contexts.watch(self)
        for edge, grad in roots:
            if isinstance(edge, Tensor):  # a leaf as a root
                self.task._collect(edge, grad)
            elif type(edge) is tuple:
                self.task.feed(edge[0], grad, edge[1])
            else:
                self.task.feed(edge, grad)
        for sender, kind, payload in ctx.early.pop(self.id, []):
            self.receive(sender, kind, payload)
        self.check()

    def receive(self, sender: str, kind: Kind, payload: Any) -> None:
        """A GRAD for one of our sends, or a child's DONE."""
        self.fresh.clear()
        if kind is Kind.PASS_DONE:
            self.children.discard(sender)
        else:
            send = self.sends.get((sender, require(payload.get("m"), int, "m")))
            if send is None or self.task is None or not self.task.reaches(send):
                logger.debug("event=grad_ignored agent=%s from=%s", self.agent.name, sender)
                return
            grads = payload.get("g")
            self.task.feed(send, None if grads is None else send.check(grads))
        self.check()

    def _ship(self, node: RecvRpcBackward, grads: list[Array | None] | None) -> None:
        payload = {"c": self.ctx.id, "p": self.id, "m": node.message_id, "g": grads}
        self._post(node.peer, Kind.GRAD, payload, counted=True)

    def _post(self, peer: str, kind: Kind, payload: Any, counted: bool) -> None:
        stored = self.contexts.send(peer, kind, payload)
        if counted:
            self.unstored[peer] += 1
            self.fresh[peer] += 1
            stored.add_done_callback(functools.partial(self._stored, peer))
        else:
            stored.add_done_callback(self._started)

    def _stored(self, peer: str, stored: asyncio.Future[None]) -> None:
        self.unstored[peer] -= 1
        self.fresh[peer] = min(self.fresh[peer], self.unstored[peer])
        self._started(stored)
        self.check()

    def _started(self, stored: asyncio.Future[None]) -> None:
        error = None if stored.cancelled() else stored.exception()
        if error is not None and not self.over:
            self.fail(WorkerUnavailable(f"backward could not reach a worker: {error}"))

    def check(self) -> None:
        """Finish once the engine drained, our gradients are stored and children answered.

        Gradients still on their way count as stored when they all go to the parent and
        were posted in this same turn: DONE then leaves in the same stream entry, after
        them, which saves the parent a wait for one more message.
        """
        if self.over or self.task is None or not self.task.done or self.children:
            return
        waiting = {peer for peer, n in self.unstored.items() if n}
        parent = self.parent
        if waiting and not (
            parent is not None
            and waiting == {parent}
            and self.unstored[parent] == self.fresh[parent]
        ):
            return
        ctx = self.ctx
        grads: dict[Tensor, Array] = self.task.leaf_grads  # type: ignore[assignment]
        ctx.applied.clear()  # only the latest pass can still be undone by an abort
        ctx.applied[self.id] = grads
        ctx.add_grads(grads)
        if not self.retain:
            for key in self.sends:
                ctx.sends.pop(key, None)
            for key in self.recvs:
                ctx.recvs.pop(key, None)
        self._end()
        if self.parent is not None:
            self.contexts.post(self.parent, Kind.PASS_DONE, {"c": ctx.id, "p": self.id})
        if not self.result.done():
            self.result.set_result(None)

    def _end(self) -> None:
        self.over = True
        self.ctx.passes.pop(self.id, None)
        self.ctx.ended.add(self.id)
        for node in self.recvs.values():
            node.ship = None
        self.contexts.unwatch(self)

    def fail(self, error: BaseException, *, spread: bool = True) -> None:
        """Drop this pass here (undoing its gradients) and, if `spread`, on every peer."""
        ctx = self.ctx
        if self.id in ctx.aborted:
            return
        ctx.aborted.add(self.id)
        if self.id in ctx.applied:
            ctx.add_grads(ctx.applied.pop(self.id), sign=-1)
        self._end()
        if not self.result.done():
            self.result.set_exception(error)
            self.result.exception()  # only the caller's pass has someone awaiting it
        if spread:
            abort(self.contexts, ctx, self.id, error, None)


def abort(
    contexts: Contexts, ctx: Context, pass_id: int, error: BaseException, came_from: str | None
) -> None:
    """Tell every peer of the context that the pass failed, with what and where."""
    kind, message, worker = _describe(error, contexts.agent.name)
    payload = {"c": ctx.id, "p": pass_id, "e": (kind, message, worker)}
    for peer in sorted(ctx.peers - {came_from, contexts.agent.name}):
        contexts.post(peer, Kind.PASS_ABORT, payload)


def _describe(error: BaseException, here: str) -> tuple[str, str, str]:
    if isinstance(error, RemoteError):
        return error.remote_type, error.message, error.worker
    return type(error).__name__, str(error), here


def _error_fields(fields: Any, sender: str) -> tuple[str, str, str]:
    if isinstance(fields, tuple) and len(fields) == 3 and all(isinstance(f, str) for f in fields):
        return fields
    return ("ContextError", "backward aborted", sender)


def _rebuild(kind: str, message: str, worker: str) -> AsyncgradError:
    if kind == "WorkerUnavailable":
        return WorkerUnavailable(message)
    if kind == "RPCTimeout":
        return RPCTimeout(message)
    return RemoteError(kind, message, worker=worker)


# *** messages ***


def handle(contexts: Contexts, sender: str, kind: Kind, payload: Any) -> None:
    """One autograd message from `sender`."""
    try:
        require(payload, dict, "autograd payload")
        ctx_id = require(payload.get("c"), int, "c")
    except MessageError as e:
        logger.warning("event=bad_autograd_message from=%s error=%s", sender, e)
        return
    if kind is Kind.CONTEXT_RELEASE:
        released = payload.get("r", [ctx_id])
        for released_id in released if isinstance(released, list) else ():
            if isinstance(released_id, int):
                contexts.release(released_id, came_from=sender)
        return
    ctx = contexts.by_id.get(ctx_id)
    pass_id = payload.get("p")
    if ctx is None or not isinstance(pass_id, int):
        if kind is Kind.PASS_START:  # a context we never saw or already released: no part
            contexts.post(sender, Kind.PASS_DONE, {"c": ctx_id, "p": pass_id})
        return
    ctx.touch()
    current = ctx.passes.get(pass_id)
    try:
        if kind is Kind.PASS_ABORT:
            if pass_id in ctx.aborted:
                return
            kind_name, message, worker = _error_fields(payload.get("e"), sender)
            error = _rebuild(kind_name, message, worker)
            if current is not None:
                current.fail(error, spread=False)
            else:
                ctx.aborted.add(pass_id)
                ctx.ended.add(pass_id)
                ctx.early.pop(pass_id, None)
                if pass_id in ctx.applied:
                    ctx.add_grads(ctx.applied.pop(pass_id), sign=-1)
            abort(contexts, ctx, pass_id, error, came_from=sender)
        elif kind is Kind.PASS_START:
            if current is not None or pass_id in ctx.ended:
                contexts.post(sender, Kind.PASS_DONE, {"c": ctx_id, "p": pass_id})
            else:
                retain = bool(payload.get("r"))
                Pass(contexts, ctx, pass_id, sender, retain).start()
        elif current is not None:
            current.receive(sender, kind, payload)
        elif pass_id not in ctx.ended:
            ctx.early.setdefault(pass_id, []).append((sender, kind, payload))
    except Exception as e:
        # This worker's part failed: the pass fails everywhere, with this error.
        logger.info(
            "event=pass_failed agent=%s context=%d error=%r", contexts.agent.name, ctx_id, e
        )
        failing = ctx.passes.get(pass_id)
        if failing is not None:
            failing.fail(e)
        else:
            abort(contexts, ctx, pass_id, e, None)


# *** the public call ***


async def backward(
    context_id: int,
    roots: Sequence[Tensor],
    retain_graph: bool = False,
    timeout: float | None = None,
) -> None:
    """Run backward from `roots` (one-element tensors) through every worker the context reached.

    Gradients accumulate in the context on each worker (`get_gradients`), never in `.grad`.
    Returns when every worker's part has run; raises `RemoteError`, `WorkerUnavailable`
    or `RPCTimeout` if any part failed anywhere (the pass is then dropped everywhere).
    `timeout` defaults to the agent's `rpc_timeout`.
    """
    agent = current_agent()
    contexts = contexts_of(agent)
    ctx = contexts.get(context_id)
    if ctx.passes:
        raise ContextError(f"context {context_id} already runs a backward pass")
    seeds: list[tuple[Any, Array]] = []
    for i, root in enumerate(roots):
        if not isinstance(root, Tensor) or not root.requires_grad:
            raise RuntimeError(f"root {i} does not require grad and has no grad_fn")
        if root.data.size != 1:
            raise RuntimeError(
                f"roots must be one-element tensors; root {i} has shape {root.shape}"
            )
        seeds.append((root.edge, np.ones(root.shape, dtype=root.dtype)))
    work = Pass(contexts, ctx, contexts.new_pass_id(), None, retain_graph)
    limit = agent.rpc_timeout if timeout is None else timeout
    deadline = asyncio.timeout(limit)
    try:
        try:
            work.start(seeds)
        except Exception as e:
            work.fail(e)
            raise
        async with deadline:
            await work.result
    except TimeoutError:
        if not deadline.expired():
            raise
        message = f"distributed backward in context {context_id} took over {limit} s"
        work.fail(RPCTimeout(message))
        raise RPCTimeout(message) from None
