# examples/model_parallel/stages.py: the model's two halves; both workers import this module
import numpy as np

from asyncgrad import nn, rpc


class Stage:
    """One part of the model, on the worker that remote() made it on."""

    def __init__(self, module):
        self.module = module

    def forward(self, x):
        return self.module(x)

    def parameter_rrefs(self):  # for the driver's DistributedOptimizer
        return [rpc.RRef(p) for p in self.module.parameters()]


@rpc.expose(name="model_parallel.Stage1")
class Stage1(Stage):
    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        super().__init__(nn.Sequential(nn.Linear(16, 64, rng=rng), nn.ReLU()))


@rpc.expose(name="model_parallel.Stage2")
class Stage2(Stage):
    def __init__(self, seed=1):
        super().__init__(nn.Linear(64, 4, rng=np.random.default_rng(seed)))
