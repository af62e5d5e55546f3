"""Exposed functions for the data plane tests (tests/test_data_plane.py): large values."""

from __future__ import annotations

from typing import Any

import numpy as np

import asyncgrad as ag
from asyncgrad import rpc

# Agent name -> its weight: agents in one process keep separate weights.
WEIGHTS: dict[str, ag.Tensor] = {}


@rpc.expose(name="dp.echo")
def echo(value: Any) -> Any:
    return value


@rpc.expose(name="dp.describe")
def describe(arrays: list[np.ndarray]) -> list[tuple[str, tuple[int, ...], bool, float]]:
    """What the callee sees of each array: dtype, shape, writeable, a checksum."""
    return [
        (a.dtype.str, a.shape, bool(a.flags.writeable), float(np.abs(a).astype(np.float64).sum()))
        for a in arrays
    ]


@rpc.expose(name="dp.stats")
def stats() -> dict[str, int]:
    return rpc.current_agent().data_plane_stats()


def weight() -> ag.Tensor:
    name = rpc.current_agent().name
    if name not in WEIGHTS:
        data = np.random.default_rng(7).standard_normal((512, 512)).astype(np.float32) / 20
        WEIGHTS[name] = ag.tensor(data, requires_grad=True)
    return WEIGHTS[name]


@rpc.expose(name="dp.layer")
def layer(h: ag.Tensor) -> ag.Tensor:
    return (h @ weight()).tanh()


@rpc.expose(name="dp.weight_and_grad")
def weight_and_grad(context_id: int) -> tuple[np.ndarray, np.ndarray]:
    w = weight()
    return w.data, ag.dist_autograd.get_gradients(context_id)[w]
