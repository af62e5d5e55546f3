"""asyncgrad: distributed autograd for Python on numpy, asyncio and Redis streams.

>>> import asyncgrad as ag
>>> w = ag.tensor([1.0, 2.0], requires_grad=True)
>>> (w * w).sum().backward()
>>> w.grad
array([2., 4.], dtype=float32)
"""

from __future__ import annotations

from asyncgrad import startup

startup.while_starting()  # before the imports below (numpy's take a few tenths of a second)

from asyncgrad import dist_autograd, nn, optim, rpc  # noqa: E402
from asyncgrad.errors import (  # noqa: E402
    AgentNameTaken,
    AsyncgradError,
    CodecError,
    ContextError,
    NotExposedError,
    OutcomeUnknown,
    RemoteError,
    RpcError,
    RPCTimeout,
    RRefReleased,
    TransportError,
    WorkerUnavailable,
)
from asyncgrad.graph import is_grad_enabled, no_grad  # noqa: E402
from asyncgrad.tensor import Tensor, cat, ones, randn, stack, tensor, zeros  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AgentNameTaken",
    "AsyncgradError",
    "CodecError",
    "ContextError",
    "NotExposedError",
    "OutcomeUnknown",
    "RPCTimeout",
    "RRefReleased",
    "RemoteError",
    "RpcError",
    "Tensor",
    "TransportError",
    "WorkerUnavailable",
    "cat",
    "dist_autograd",
    "is_grad_enabled",
    "nn",
    "no_grad",
    "ones",
    "optim",
    "randn",
    "rpc",
    "stack",
    "tensor",
    "zeros",
]
