"""The backward graph: nodes, `no_grad`, and the dependency-counted engine.

A `Node` maps the gradient of its output to gradients for its edges. An edge is the
`Node` that produced an input (or `(node, i)` for output `i` of a node with several, such
as the one that receives a message's tensors over the network), a leaf (any hashable
object, in practice a `Tensor` with `requires_grad`) whose gradient is collected, or
`None` for an input that needs none.

`GraphTask` runs one backward pass. It counts, for every node reachable from its start
nodes, how many gradients it will receive; a node runs once, when its count reaches zero.
Start nodes receive theirs from outside: the roots' through `seed`, others through `feed`,
which is what lets the distributed engine (a later layer) feed gradients arriving over the
network into the same pass. A gradient may be `None` ("none is coming"): a node whose
gradients were all `None` does not run and passes `None` on, so every count still reaches
zero. A node that `exits` (its inputs live in another process) hands what it received to
the task's `exit` callback instead of running.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable, Hashable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]
F = TypeVar("F", bound=Callable[..., Any])

_grad_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "asyncgrad_grad_enabled", default=True
)

RETAIN_GRAPH_MESSAGE = (
    "Trying to backward through the graph a second time: its saved values were freed by "
    "the first backward. Pass retain_graph=True to the first backward to keep them."
)


def is_grad_enabled() -> bool:
    """Whether ops called now record the graph (False inside `no_grad`)."""
    return _grad_enabled.get()


class no_grad:
    """Ops inside `with no_grad():` record nothing.

    The flag is a contextvar, so it covers this asyncio task and the tasks it creates,
    never a concurrently running one. Also works as a decorator (sync or async).
    """

    def __init__(self) -> None:
        self._tokens: list[contextvars.Token[bool]] = []

    def __enter__(self) -> None:
        self._tokens.append(_grad_enabled.set(False))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _grad_enabled.reset(self._tokens.pop())

    def __call__(self, fn: F) -> F:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                with no_grad():
                    return await fn(*args, **kwargs)

            return run_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with no_grad():
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]


class Node:
    """A function in the backward graph, with `edges` toward its inputs.

    A node with `num_outputs > 1` receives, in `backward_edges`, a list holding one
    gradient (or `None`) per output.
    """

    edges: tuple[Any, ...] = ()
    num_outputs = 1
    released = False
    # Its gradient leaves this graph (to another process): `GraphTask(exit=...)` takes it.
    exits = False

    def backward_edges(self, grad: Any) -> Sequence[Array | None]:
        """Gradients for `edges`, one each (`None` where an edge needs none)."""
        raise NotImplementedError

    def release(self) -> None:
        """Drop what was saved for backward; a later backward through here must fail."""
        self.released = True

    def no_gradient(self) -> None:
        """Called instead of `backward_edges` when every incoming gradient was `None`."""

    def no_exit(self) -> Exception:
        """What a pass with no `exit` raises on reaching this node (one that `exits`):
        the layer that made the node knows what the user should run instead."""
        return RuntimeError(
            f"{self.name} hands its gradient out of this graph: a backward with no exit "
            "for it cannot run through it"
        )

    @property
    def name(self) -> str:
        return type(self).__name__


_ABSENT: Any = object()


def _add(total: Array | None, grad: Array | None) -> Array | None:
    # `+` and never `+=`: the same array may be held by several buffers and leaves.
    if total is _ABSENT or total is None:
        return grad
    if grad is None:
        return total
    return total + grad


def _target(edge: Any) -> Any:
    return edge[0] if type(edge) is tuple else edge


class GraphTask:
    """One backward pass over the nodes reachable from `starts`.

    Each start expects one gradient per time it is listed, delivered by `seed` or `feed`;
    gradients for leaves collect in `leaf_grads`. A node that `exits` is handed to
    `exit(node, grads)` when reached: `grads` has one gradient (or None) per output, or is
    None when none came. `done` turns true when every node has resolved.
    """

    def __init__(
        self,
        starts: Iterable[Node],
        *,
        retain_graph: bool = False,
        exit: Callable[[Node, list[Any] | None], None] | None = None,
    ) -> None:
        self.retain_graph = retain_graph
        self._exit = exit
        self.leaf_grads: dict[Hashable, Array] = {}
        self._buffers: dict[Node, Any] = {}
        self._waiting: dict[Node, int] = {}
        self._given: set[int] = set()
        starts = list(starts)
        for node in starts:
            self._waiting[node] = self._waiting.get(node, 0) + 1
        self._count_dependencies(starts)

    def _count_dependencies(self, starts: list[Node]) -> None:
        # Iterative DFS: a 10,000-node chain must not touch Python's recursion limit.
        seen = set(starts)
        stack = list(seen)
        waiting = self._waiting
        while stack:
            for edge in stack.pop().edges:
                node = _target(edge)
                if isinstance(node, Node):
                    waiting[node] = waiting.get(node, 0) + 1
                    if node not in seen:
                        seen.add(node)
                        stack.append(node)

    @property
    def done(self) -> bool:
        return not self._waiting

    def reaches(self, node: Node) -> bool:
        """Whether `node` still waits for a gradient in this pass."""
        return node in self._waiting

    def seed(self, edge: Any, grad: Array) -> None:
        """A root's gradient: `edge` is a node, `(node, output index)`, or a leaf (whose
        gradient is collected as it is). A node must be among the starts."""
        node = _target(edge)
        if isinstance(node, Node):
            self.feed(node, grad, edge[1] if type(edge) is tuple else 0)
        else:
            self._collect(node, grad)

    def feed(self, node: Node, grad: Any, index: int = 0) -> None:
        """Deliver one gradient (or `None`) for output `index` of `node`; run what is ready."""
        if node not in self._waiting:
            raise RuntimeError(f"{node.name} expects no more gradients in this pass")
        ready = self._receive(node, index, grad)
        while ready:
            self._run(ready.pop(), ready)

    def _receive(self, node: Node, index: int, grad: Array | None) -> list[Node]:
        if node.num_outputs == 1:
            self._buffers[node] = _add(self._buffers.get(node, _ABSENT), grad)
        else:
            slots = self._buffers.get(node)
            if slots is None:
                slots = self._buffers[node] = [None] * node.num_outputs
            slots[index] = _add(slots[index], grad)
        left = self._waiting[node] - 1
        if left:
            self._waiting[node] = left
            return []
        del self._waiting[node]
        return [node]

    def _run(self, node: Node, ready: list[Node]) -> None:
        grad = self._buffers.pop(node)
        outputs: Sequence[Array | None]
        if grad is None or (type(grad) is list and all(g is None for g in grad)):
            if node.exits:
                self._leave(node, None)
            else:
                node.no_gradient()
            outputs = (None,) * len(node.edges)
        else:
            if node.released:
                raise RuntimeError(f"{node.name}: {RETAIN_GRAPH_MESSAGE}")
            if node.exits:
                self._leave(node, grad if type(grad) is list else [grad])
                outputs = ()
            else:
                outputs = node.backward_edges(grad)
            if not self.retain_graph:
                node.release()
        for edge, out in zip(node.edges, outputs, strict=True):
            if edge is None:
                continue
            if type(edge) is tuple:
                ready.extend(self._receive(edge[0], edge[1], out))
            elif isinstance(edge, Node):
                ready.extend(self._receive(edge, 0, out))
            elif out is not None:
                self._collect(edge, out)

    def _leave(self, node: Node, grads: list[Any] | None) -> None:
        if self._exit is None:
            raise node.no_exit()
        self._exit(node, grads)

    def _collect(self, leaf: Hashable, grad: Array) -> None:
        total = self.leaf_grads.get(leaf)
        if total is not None:
            self.leaf_grads[leaf] = total + grad
            return
        # A leaf's gradient is handed to the user: it must own its memory, since backward
        # functions pass arrays through (add) or return views (reshape, broadcast).
        if grad.base is not None or not grad.flags.writeable or id(grad) in self._given:
            grad = np.array(grad, order="C")
        self._given.add(id(grad))
        self.leaf_grads[leaf] = grad


def nodes_of(edges: Iterable[Any]) -> list[Node]:
    """The nodes among `edges` (leaves left out): the starts of a task seeded at them."""
    return [node for node in map(_target, edges) if isinstance(node, Node)]


def run_backward(
    seeds: Sequence[tuple[Any, Array]], *, retain_graph: bool = False
) -> dict[Hashable, Array]:
    """Gradients of the leaves reached from `seeds`: (edge, gradient) pairs, where an edge is
    a node, `(node, output index)` or a leaf."""
    task = GraphTask(nodes_of(e for e, _ in seeds), retain_graph=retain_graph)
    for edge, grad in seeds:
        task.seed(edge, grad)
    return task.leaf_grads
