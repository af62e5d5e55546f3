"""Distributed autograd, named as in `torch.distributed.autograd`.

    async with ag.dist_autograd.context() as context_id:
        out = await ag.rpc.rpc_async("ps", forward, args=(x,))
        loss = ag.nn.functional.cross_entropy(out, y)
        await ag.dist_autograd.backward(context_id, [loss])
        grads = ag.dist_autograd.get_gradients(context_id)   # this worker's leaves
        await opt.step(context_id)

Every agent gets the machinery when this package is imported (asyncgrad imports it).
"""

from __future__ import annotations

from asyncgrad.rpc import Agent

from .context import Contexts, context, get_gradients
from .nodes import RecvRpcBackward, SendRpcBackward
from .optimizer import DistributedOptimizer
from .passes import backward

__all__ = [
    "DistributedOptimizer",
    "RecvRpcBackward",
    "SendRpcBackward",
    "backward",
    "context",
    "get_gradients",
]

# The seam (DESIGN.md): rpc records tensors through whatever autograd registered here.
Agent.seam_factory = Contexts
