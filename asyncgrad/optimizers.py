"""Local optimizers with PyTorch's update rules (users reach them as `asyncgrad.optim`,
which adds the `DistributedOptimizer` of the layer above).

A step gives every parameter a new array instead of writing into the old one: a backward
pass still in flight keeps using the weights its forward saw, so concurrent trainers on
one parameter server never corrupt each other's graphs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from asyncgrad.graph import Array
from asyncgrad.tensor import Tensor

__all__ = ["SGD", "Adam", "Optimizer"]


class Optimizer:
    """Holds parameters and per-parameter state; subclasses define `_update`."""

    def __init__(self, params: Iterable[Tensor], **defaults: Any) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        for p in self.params:
            if not isinstance(p, Tensor) or not p.requires_grad:
                raise TypeError(f"can only optimize tensors that require grad, got {p!r:.60}")
        self.defaults = defaults
        self.state: dict[Tensor, dict[str, Any]] = {}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self, grads: Mapping[Tensor, Array] | None = None) -> None:
        """Update every parameter that has a gradient: from `grads` if given, else `.grad`."""
        for p in self.params:
            grad = p.grad if grads is None else grads.get(p)
            if grad is None:
                continue
            if grad.shape != p.shape:
                raise ValueError(f"gradient of shape {grad.shape} for a parameter of {p.shape}")
            p.data = self._update(
                p.data, np.asarray(grad, dtype=p.dtype), self.state.setdefault(p, {})
            )

    def _update(self, param: Array, grad: Array, state: dict[str, Any]) -> Array:
        raise NotImplementedError


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and L2 weight decay."""

    def __init__(
        self, params: Iterable[Tensor], lr: float, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"invalid SGD settings: {lr=}, {momentum=}, {weight_decay=}")
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay

    def _update(self, param: Array, grad: Array, state: dict[str, Any]) -> Array:
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = np.array(grad)
            else:
                buf *= self.momentum
                buf += grad
            grad = buf
        new = np.multiply(grad, -self.lr, dtype=param.dtype)
        new += param
        return new


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction, as `torch.optim.Adam`."""

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if lr < 0 or eps < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid Adam settings: {lr=}, {betas=}, {eps=}")
        super().__init__(params, lr=lr, betas=betas, eps=eps)
        self.lr, self.betas, self.eps = lr, betas, eps

    def _update(self, param: Array, grad: Array, state: dict[str, Any]) -> Array:
        beta1, beta2 = self.betas
        if not state:
            state.update(step=0, exp_avg=np.zeros_like(param), exp_avg_sq=np.zeros_like(param))
        state["step"] += 1
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        m *= beta1
        m += (1 - beta1) * grad
        v *= beta2
        v += (1 - beta2) * grad * grad
        denom = np.sqrt(v) / math.sqrt(1 - beta2**t)
        denom += self.eps
        step = m / denom
        step *= -self.lr / (1 - beta1**t)
        step += param
        return step
