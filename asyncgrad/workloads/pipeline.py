"""A pipeline stage: one slice of a model split across workers.

Each worker holds one `Stage` (made with `agent.remote`); a batch flows stage to stage by
RPC and the distributed backward flows back the same way.

    stages = [await agent.remote(f"stage{i}", Stage, args=(sizes[i], sizes[i + 1], i))
              for i in range(len(sizes) - 1)]
    h = x
    for stage in stages:
        h = await stage.rpc_async().forward(h)
"""

from __future__ import annotations

import math

import numpy as np

from asyncgrad import dist_autograd, nn, rpc
from asyncgrad.graph import Array
from asyncgrad.tensor import Tensor


@rpc.expose(name="pipeline.Stage")
class Stage:
    """`tanh(x @ W)` with `W` (fan_in, fan_out) scaled by 1/sqrt(fan_in), seeded."""

    def __init__(self, fan_in: int, fan_out: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        # math.sqrt: a Python float keeps float32; a numpy float64 scalar would promote.
        weight = rng.standard_normal((fan_in, fan_out), dtype=np.float32) / math.sqrt(fan_in)
        self.weight = nn.Parameter(weight)

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.weight).tanh()

    def parameter_rrefs(self) -> list[rpc.RRef[Tensor]]:
        return [rpc.RRef(self.weight)]

    def weight_data(self) -> Array:
        return self.weight.data

    def grad_norm(self, context_id: int) -> float:
        """Norm of this stage's weight gradient in a context (0 if it got none)."""
        grad = dist_autograd.get_gradients(context_id).get(self.weight)
        return 0.0 if grad is None else float(np.linalg.norm(grad))
