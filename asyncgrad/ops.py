"""Differentiable ops: one `Function` per op, a forward over arrays and its backward.

`forward` keeps only what `backward` needs. `backward` may return gradients in the
broadcast shape of the output; `Function.backward_edges` sums them back to each input's
shape and dtype, the one place where broadcasting is undone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from asyncgrad.graph import Array, Node

Axis = int | tuple[int, ...] | None
Grads = Array | None | tuple[Array | None, ...]


def unbroadcast(grad: Array, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Array:
    """Sum `grad` over the axes numpy broadcast to reach it from `shape`."""
    if grad.shape != shape:
        extra = grad.ndim - len(shape)
        axes = tuple(range(extra)) + tuple(
            i + extra for i, n in enumerate(shape) if n == 1 and grad.shape[i + extra] != 1
        )
        grad = grad.sum(axis=axes, keepdims=True).reshape(shape)
    return grad if grad.dtype == dtype else grad.astype(dtype)


class Function(Node):
    """An op in the graph. Subclasses define `forward(*arrays, **consts)` and `backward`."""

    needs_input_grad: tuple[bool, ...] = ()
    input_meta: tuple[tuple[tuple[int, ...], np.dtype[Any]], ...] = ()
    # Each op names its own arrays and constants, so these are declared, not defined.
    forward: Callable[..., Array]
    backward: Callable[[Array], Grads]

    def backward_edges(self, grad: Array) -> Sequence[Array | None]:
        grads = self.backward(grad)
        if not isinstance(grads, tuple):
            grads = (grads,)
        return [
            None if g is None or not need else unbroadcast(g, shape, dtype)
            for g, need, (shape, dtype) in zip(
                grads, self.needs_input_grad, self.input_meta, strict=True
            )
        ]

    def release(self) -> None:
        edges = self.edges
        self.__dict__.clear()
        self.edges = edges
        self.released = True

    @property
    def name(self) -> str:
        return type(self).__name__ + "Backward"


def _keepdims_shape(shape: tuple[int, ...], axis: Axis) -> tuple[int, ...]:
    if axis is None:
        return (1,) * len(shape)
    axes = {a % len(shape) for a in ((axis,) if isinstance(axis, int) else axis)}
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


# *** unary ***


class Neg(Function):
    def forward(self, x: Array) -> Array:
        return -x

    def backward(self, grad: Array) -> Grads:
        return -grad


class ReLU(Function):
    def forward(self, x: Array) -> Array:
        self.mask = x > 0
        return np.maximum(x, 0)

    def backward(self, grad: Array) -> Grads:
        return grad * self.mask


class Tanh(Function):
    def forward(self, x: Array) -> Array:
        self.out = np.tanh(x)
        return self.out

    def backward(self, grad: Array) -> Grads:
        return grad * (1 - self.out * self.out)


class Sigmoid(Function):
    def forward(self, x: Array) -> Array:
        # NOTE: the tanh form never overflows, unlike 1 / (1 + exp(-x)).
        self.out = 0.5 * (np.tanh(0.5 * x) + 1)
        return self.out

    def backward(self, grad: Array) -> Grads:
        return grad * self.out * (1 - self.out)


class Exp(Function):
    def forward(self, x: Array) -> Array:
        self.out = np.exp(x)
        return self.out

    def backward(self, grad: Array) -> Grads:
        return grad * self.out


class Log(Function):
    def forward(self, x: Array) -> Array:
        self.x = x
        return np.log(x)

    def backward(self, grad: Array) -> Grads:
        return grad / self.x


class Sqrt(Function):
    def forward(self, x: Array) -> Array:
        self.out = np.sqrt(x)
        return self.out

    def backward(self, grad: Array) -> Grads:
        return grad * 0.5 / self.out


class Abs(Function):
    def forward(self, x: Array) -> Array:
        self.x = x
        return np.abs(x)

    def backward(self, grad: Array) -> Grads:
        return grad * np.sign(self.x)


class Pow(Function):
    """`x ** exponent` for a constant exponent; tensor exponents go through exp and log."""

    def forward(self, x: Array, *, exponent: float) -> Array:
        self.x, self.exponent = x, exponent
        return np.power(x, exponent)

    def backward(self, grad: Array) -> Grads:
        return grad * self.exponent * np.power(self.x, self.exponent - 1)


# *** binary ***


class Add(Function):
    def forward(self, x: Array, y: Array) -> Array:
        return x + y

    def backward(self, grad: Array) -> Grads:
        return grad, grad


class Sub(Function):
    def forward(self, x: Array, y: Array) -> Array:
        return x - y

    def backward(self, grad: Array) -> Grads:
        return grad, -grad if self.needs_input_grad[1] else None


class Mul(Function):
    def forward(self, x: Array, y: Array) -> Array:
        self.x, self.y = x, y
        return x * y

    def backward(self, grad: Array) -> Grads:
        dx, dy = self.needs_input_grad
        return (grad * self.y if dx else None), (grad * self.x if dy else None)


class Div(Function):
    def forward(self, x: Array, y: Array) -> Array:
        self.x, self.y = x, y
        return x / y

    def backward(self, grad: Array) -> Grads:
        gx = grad / self.y
        return gx, (-gx * self.x / self.y if self.needs_input_grad[1] else None)


class MatMul(Function):
    """`np.matmul` semantics: 1-D operands are promoted to matrices and squeezed back."""

    def forward(self, x: Array, y: Array) -> Array:
        if x.ndim == 0 or y.ndim == 0:
            raise ValueError("matmul: both operands need at least one dimension")
        self.x, self.y = x, y
        return np.matmul(x, y)

    def backward(self, grad: Array) -> Grads:
        x, y = self.x, self.y
        x2 = x[None, :] if x.ndim == 1 else x
        y2 = y[:, None] if y.ndim == 1 else y
        g2 = grad
        if y.ndim == 1:
            g2 = np.expand_dims(g2, -1)
        if x.ndim == 1:
            g2 = np.expand_dims(g2, -2)
        dx = dy = None
        if self.needs_input_grad[0]:
            dx = np.matmul(g2, np.swapaxes(y2, -1, -2))
            dx = dx[..., 0, :] if x.ndim == 1 else dx
        if self.needs_input_grad[1]:
            dy = np.matmul(np.swapaxes(x2, -1, -2), g2)
            dy = dy[..., 0] if y.ndim == 1 else dy
        return dx, dy


class Linear(Function):
    """`x @ w.T + b` in one node, as `nn.Linear` computes it (PyTorch's addmm)."""

    def forward(self, x: Array, w: Array, *bias: Array) -> Array:
        self.x, self.w = x, w
        out = x @ w.T
        if bias:
            out += bias[0]
        return out

    def backward(self, grad: Array) -> Grads:
        g2 = grad.reshape(-1, grad.shape[-1])
        dx = (g2 @ self.w).reshape(self.x.shape) if self.needs_input_grad[0] else None
        dw = g2.T @ self.x.reshape(-1, self.x.shape[-1]) if self.needs_input_grad[1] else None
        if len(self.needs_input_grad) == 2:
            return dx, dw
        return dx, dw, (g2.sum(axis=0) if self.needs_input_grad[2] else None)


# *** reduce ***


class Sum(Function):
    def forward(self, x: Array, *, axis: Axis = None, keepdims: bool = False) -> Array:
        self.shape, self.axis = x.shape, axis
        return np.asarray(x.sum(axis=axis, keepdims=keepdims))

    def backward(self, grad: Array) -> Grads:
        return np.broadcast_to(grad.reshape(_keepdims_shape(self.shape, self.axis)), self.shape)


class Mean(Function):
    def forward(self, x: Array, *, axis: Axis = None, keepdims: bool = False) -> Array:
        self.shape, self.axis = x.shape, axis
        out = np.asarray(x.mean(axis=axis, keepdims=keepdims))
        self.count = x.size // max(out.size, 1) if x.size else 1
        return out

    def backward(self, grad: Array) -> Grads:
        g = grad.reshape(_keepdims_shape(self.shape, self.axis)) / self.count
        return np.broadcast_to(g, self.shape)


class Max(Function):
    """Ties share the gradient equally, as PyTorch's full `max()` and `amax` do."""

    def forward(self, x: Array, *, axis: Axis = None, keepdims: bool = False) -> Array:
        self.axis, self.x = axis, x
        self.out = x.max(axis=axis, keepdims=True)
        return self.out if keepdims else np.asarray(np.squeeze(self.out, axis=axis))

    def backward(self, grad: Array) -> Grads:
        mask = (self.x == self.out).astype(grad.dtype)
        mask /= mask.sum(axis=self.axis, keepdims=True)
        return grad.reshape(self.out.shape) * mask


# *** movement ***


class Reshape(Function):
    def forward(self, x: Array, *, shape: tuple[int, ...]) -> Array:
        self.in_shape = x.shape
        return x.reshape(shape)

    def backward(self, grad: Array) -> Grads:
        return grad.reshape(self.in_shape)


class Transpose(Function):
    def forward(self, x: Array, *, axes: tuple[int, ...] | None) -> Array:
        self.axes = tuple(range(x.ndim))[::-1] if axes is None else axes
        return np.transpose(x, self.axes)

    def backward(self, grad: Array) -> Grads:
        return np.transpose(grad, tuple(np.argsort(self.axes)))


def _is_basic_index(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return all(
        p is None
        or p is Ellipsis
        or isinstance(p, slice)
        or (isinstance(p, int | np.integer) and not isinstance(p, bool | np.bool_))
        for p in parts
    )


class GetItem(Function):
    """Basic slicing and integer-array indexing; repeated indices add up (np.add.at)."""

    def forward(self, x: Array, *, index: Any) -> Array:
        self.shape, self.index = x.shape, index
        return np.asarray(x[index])

    def backward(self, grad: Array) -> Grads:
        out = np.zeros(self.shape, dtype=grad.dtype)
        if _is_basic_index(self.index):
            out[self.index] = grad
        else:
            np.add.at(out, self.index, grad)
        return out


class Cat(Function):
    def forward(self, *xs: Array, axis: int = 0) -> Array:
        self.axis = axis
        self.splits = np.cumsum([x.shape[axis] for x in xs])[:-1]
        return np.concatenate(xs, axis=axis)

    def backward(self, grad: Array) -> Grads:
        return tuple(np.split(grad, self.splits, axis=self.axis))


class Stack(Function):
    def forward(self, *xs: Array, axis: int = 0) -> Array:
        self.axis = axis
        return np.stack(xs, axis=axis)

    def backward(self, grad: Array) -> Grads:
        return tuple(np.moveaxis(grad, self.axis, 0))


# *** losses ***


class LogSoftmax(Function):
    def forward(self, x: Array, *, axis: int) -> Array:
        self.axis = axis
        shifted = x - x.max(axis=axis, keepdims=True)
        self.out = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
        return self.out

    def backward(self, grad: Array) -> Grads:
        return grad - np.exp(self.out) * grad.sum(axis=self.axis, keepdims=True)


class Softmax(Function):
    def forward(self, x: Array, *, axis: int) -> Array:
        self.axis = axis
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        self.out = e / e.sum(axis=axis, keepdims=True)
        return self.out

    def backward(self, grad: Array) -> Grads:
        out = self.out
        return out * (grad - (grad * out).sum(axis=self.axis, keepdims=True))


class NLLLoss(Function):
    """Mean of `-logp[i, target[i]]` over the batch; `target` holds class indices."""

    def forward(self, logp: Array, *, target: Array) -> Array:
        self.shape, self.dtype = logp.shape, logp.dtype
        self.rows = np.arange(len(target))
        self.target = target
        return np.asarray(-logp[self.rows, target].mean(), dtype=logp.dtype)

    def backward(self, grad: Array) -> Grads:
        out = np.zeros(self.shape, dtype=self.dtype)
        out[self.rows, self.target] = -grad / len(self.rows)
        return out
