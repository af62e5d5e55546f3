"""Optimizers, named as in `torch.optim` and `torch.distributed.optim`: the local ones
(`SGD`, `Adam`, `Optimizer` to subclass; optimizers.py) and `DistributedOptimizer`, which
steps them on the owners of remote parameters (asyncgrad.dist_autograd).
"""

from __future__ import annotations

from asyncgrad.dist_autograd.optimizer import DistributedOptimizer
from asyncgrad.optimizers import SGD, Adam, Optimizer

__all__ = ["SGD", "Adam", "DistributedOptimizer", "Optimizer"]
