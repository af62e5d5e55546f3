"""Distributed autograd, named as in `torch.distributed.autograd`.

    async with ag.dist_autograd.context() as context_id:
        out = await ag.rpc.rpc_async("ps", forward, args=(x,))
        loss = ag.nn.functional.cross_entropy(out, y)
        await ag.dist_autograd.backward(context_id, [loss])
        grads = ag.dist_autograd.get_gradients(context_id)   # this worker's leaves
        await opt.step(context_id)

Every `rpc.Agent` builds its own `Contexts` (contexts.py); the functions here use the
current agent's.
"""

from __future__ import annotations

from .functions import backward, context, get_gradients
from .nodes import RecvRpcBackward, SendRpcBackward
from .optimizer import DistributedOptimizer

__all__ = [
    "DistributedOptimizer",
    "RecvRpcBackward",
    "SendRpcBackward",
    "backward",
    "context",
    "get_gradients",
]
