"""The public functions of distributed autograd, on the current agent's `Contexts`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from asyncgrad.graph import Array
from asyncgrad.rpc.current import running_agent
from asyncgrad.tensor import Tensor

from .contexts import Contexts, current_context

__all__ = ["backward", "context", "current_contexts", "get_gradients"]


def current_contexts() -> Contexts:
    """The distributed autograd of the current agent."""
    contexts = running_agent().autograd
    assert isinstance(contexts, Contexts), "every agent builds a Contexts"
    return contexts


@contextlib.asynccontextmanager
async def context() -> AsyncIterator[int]:
    """A distributed autograd context on the current agent; yields its id.

    Leaving it releases the context here and on every worker it reached.

        >>> async with dist_autograd.context() as context_id:
        ...     out = await rpc.rpc_async("ps", forward, args=(x,))
        ...     await dist_autograd.backward(context_id, [loss(out)])
    """
    contexts = current_contexts()
    ctx = contexts.new()
    token = current_context.set(ctx.id)
    try:
        yield ctx.id
    finally:
        current_context.reset(token)
        contexts.release(ctx.id)


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
    await current_contexts().backward(context_id, roots, retain_graph, timeout)


def get_gradients(context_id: int) -> dict[Tensor, Array]:
    """The leaves of this worker that received gradients in the context, with them."""
    return current_contexts().gradients(context_id)
