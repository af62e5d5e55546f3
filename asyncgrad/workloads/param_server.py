"""A parameter server: an MLP that trainers run forward on by RPC and step by context.

    ps = await agent.remote("ps", ParameterServer, args=((784, 256, 10),))
    async with dist_autograd.context() as ctx:
        logits = await ps.rpc_async().forward(x)
        ...
    opt = DistributedOptimizer(optim.SGD, await ps.rpc_async().parameter_rrefs(), lr=0.05)

The server never copies its weights per forward: each optimizer step gives the parameters
new arrays, so a backward still in flight uses the weights its forward saw.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from asyncgrad import nn, rpc
from asyncgrad.graph import Array
from asyncgrad.tensor import Tensor


def mlp(sizes: Sequence[int], seed: int = 0) -> nn.Sequential:
    """Linear-ReLU-...-Linear with the given layer widths."""
    rng = np.random.default_rng(seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out, rng=rng))
    return nn.Sequential(*layers)


@rpc.expose(name="ps.ParameterServer")
class ParameterServer:
    """Holds the model; every method runs on the server."""

    def __init__(self, sizes: Sequence[int] = (784, 256, 10), seed: int = 0) -> None:
        self.model = mlp(sizes, seed)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.model(x)
        return out

    def parameter_rrefs(self) -> list[rpc.RRef[Tensor]]:
        """RRefs to the parameters, for a DistributedOptimizer."""
        return [rpc.RRef(p) for p in self.model.parameters()]

    def state_dict(self) -> dict[str, Array]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Array]) -> None:
        """Restore a checkpoint (what `state_dict` returned), e.g. after a restart."""
        self.model.load_state_dict(state)
