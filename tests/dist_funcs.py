"""Exposed functions for the distributed autograd tests (in-process agents and workers)."""

from __future__ import annotations

from typing import Any

import numpy as np

import asyncgrad as ag
from asyncgrad import rpc
from asyncgrad.ops import Function

# (agent name, seed) -> that agent's weight: agents in one process keep separate weights.
WEIGHTS: dict[tuple[str, int], ag.Tensor] = {}


def weight(seed: int) -> ag.Tensor:
    key = (rpc.current_agent().name, seed)
    if key not in WEIGHTS:
        data = np.random.default_rng(seed).standard_normal((4, 4)) / 2
        WEIGHTS[key] = ag.tensor(data, requires_grad=True)
    return WEIGHTS[key]


@rpc.expose(name="dt.layer")
def layer(h: ag.Tensor, seed: int) -> ag.Tensor:
    return (h @ weight(seed)).tanh()


@rpc.expose(name="dt.weight_data")
def weight_data(seed: int) -> np.ndarray:
    return weight(seed).data


@rpc.expose(name="dt.weight_grad")
def weight_grad(context_id: int, seed: int) -> Any:
    grads = ag.dist_autograd.get_gradients(context_id)
    return grads.get(weight(seed))


@rpc.expose(name="dt.weight_dot_grad")
def weight_dot_grad(seed: int) -> Any:
    return weight(seed).grad


@rpc.expose(name="dt.forward_to")
async def forward_to(h: ag.Tensor, seed: int, nxt: str) -> ag.Tensor:
    return await rpc.rpc_async(nxt, "dt.layer", args=(layer(h, seed), seed + 1))


@rpc.expose(name="dt.requires_grad")
def requires_grad(t: ag.Tensor) -> bool:
    return t.requires_grad


@rpc.expose(name="dt.product")
def product(a: ag.Tensor, b: ag.Tensor) -> ag.Tensor:
    return a * b


@rpc.expose(name="dt.two_outputs")
def two_outputs(h: ag.Tensor, seed: int) -> tuple[ag.Tensor, ag.Tensor]:
    y = layer(h, seed)
    return y, y * 2


class Explode(Function):
    def forward(self, x: np.ndarray) -> np.ndarray:
        return x

    def backward(self, grad: np.ndarray) -> np.ndarray:
        raise ValueError("boom in backward")


@rpc.expose(name="dt.explode")
def explode(h: ag.Tensor) -> ag.Tensor:
    from asyncgrad.tensor import _apply

    return _apply(Explode(), h * 1.0)


@rpc.expose(name="dt.context_count")
def context_count() -> int:
    return len(rpc.current_agent().autograd.by_id)


@rpc.expose(name="dt.param_rrefs")
def param_rrefs(seed: int) -> list[rpc.RRef[ag.Tensor]]:
    return [rpc.RRef(weight(seed))]
