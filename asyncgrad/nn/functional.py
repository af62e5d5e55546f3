"""Stateless functions on tensors: activations and losses (`asyncgrad.nn.functional`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from asyncgrad import ops
from asyncgrad.tensor import Tensor, _apply

__all__ = [
    "cross_entropy",
    "linear",
    "log_softmax",
    "mse_loss",
    "relu",
    "sigmoid",
    "softmax",
    "tanh",
]


def relu(x: Tensor) -> Tensor:
    return x.relu()


def tanh(x: Tensor) -> Tensor:
    return x.tanh()


def sigmoid(x: Tensor) -> Tensor:
    return x.sigmoid()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`x @ weight.T + bias` as one graph node."""
    operands = (x, weight) if bias is None else (x, weight, bias)
    return _apply(ops.Linear(), *operands)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    return _apply(ops.Softmax(), x, axis=axis)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """`log(softmax(x))`, computed without overflow for any logits."""
    return _apply(ops.LogSoftmax(), x, axis=axis)


def cross_entropy(logits: Tensor, target: Any) -> Tensor:
    """Mean negative log-likelihood of integer class `target` under `softmax(logits)`.

    `logits` is (N, C) and `target` (N,) class indices; or (C,) and one index.
    """
    labels = np.asarray(target.data if isinstance(target, Tensor) else target)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: target must hold integer classes, not {labels.dtype}")
    if logits.ndim == 1:
        logits, labels = logits.reshape(1, -1), labels.reshape(1)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy: expected logits (N, C) and target (N,), "
            f"got {logits.shape} and {labels.shape}"
        )
    classes = logits.shape[1]
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise IndexError(f"cross_entropy: target out of range for {classes} classes")
    return _apply(ops.NLLLoss(), log_softmax(logits, axis=1), target=labels)


def mse_loss(input: Tensor, target: Any) -> Tensor:
    """Mean of the squared differences."""
    diff = input - target
    return (diff * diff).mean()
