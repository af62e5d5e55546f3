"""`Tensor`: a numpy array that records the ops applied to it, and the local backward.

>>> import asyncgrad as ag
>>> x = ag.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
>>> (x * x).sum().backward()
>>> x.grad
array([[2., 4.],
       [6., 8.]], dtype=float32)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from asyncgrad import ops
from asyncgrad.graph import Array, Node, is_grad_enabled, run_backward

DTypeLike = npt.DTypeLike


class Tensor:
    """An `np.ndarray` (`.data`) with its gradient (`.grad`) and the node that made it.

    Tensors hash by identity, so they can key a dict (as gradients do).
    """

    __slots__ = ("__weakref__", "data", "grad", "grad_fn", "output_nr", "requires_grad")
    __array_ufunc__ = None  # numpy defers to our reflected operators: array * tensor works

    data: Array
    grad: Array | None
    grad_fn: Node | None
    output_nr: int  # which output of grad_fn this is (nodes with several: see graph.py)
    requires_grad: bool

    def __init__(self, data: Any, *, dtype: DTypeLike | None = None, requires_grad: bool = False):
        self.data = _as_array(data, dtype)
        self.grad = None
        self.grad_fn = None
        self.output_nr = 0
        self.requires_grad = False
        if requires_grad:
            self.requires_grad_(True)

    @classmethod
    def _make(cls, data: Array, grad_fn: Node | None = None) -> Tensor:
        t = cls.__new__(cls)
        t.data, t.grad, t.grad_fn, t.requires_grad = data, None, grad_fn, grad_fn is not None
        t.output_nr = 0
        return t

    @property
    def edge(self) -> Any:
        """Where this tensor's gradient goes: its node (and output), itself if a leaf."""
        if self.grad_fn is None:
            return self if self.requires_grad else None
        return self.grad_fn if not self.output_nr else (self.grad_fn, self.output_nr)

    def requires_grad_(self, requires_grad: bool = True) -> Tensor:
        """Start (or stop) recording ops on this leaf; returns self."""
        if requires_grad and self.data.dtype.kind not in "fc":
            raise RuntimeError(
                f"only floating point and complex tensors can require gradients, "
                f"not {self.data.dtype}"
            )
        if self.grad_fn is not None and not requires_grad:
            raise RuntimeError("requires_grad can only be turned off on leaf tensors")
        self.requires_grad = requires_grad
        return self

    # *** properties ***

    @property
    def is_leaf(self) -> bool:
        return self.grad_fn is None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    def __len__(self) -> int:
        return len(self.data)

    def item(self) -> Any:
        """The value of a one-element tensor as a Python number (`float`, `int`, `bool`)."""
        return self.data.item()

    def numpy(self) -> Array:
        """The array itself, not a copy."""
        return self.data

    def __array__(self, dtype: DTypeLike | None = None, copy: bool | None = None) -> Array:
        """numpy's array protocol: `np.asarray(t)` is `t.data` (no copy unless asked).

        Unlike PyTorch, a tensor that requires grad converts too: the array is only read,
        and nothing numpy does with it is recorded.
        """
        if copy is None:  # numpy 1.x never passes `copy`; numpy 2 passes None for "if needed"
            return self.data if dtype is None else self.data.astype(dtype, copy=False)
        return np.array(self.data, dtype=dtype, copy=copy)

    def detach(self) -> Tensor:
        """The same data, cut off from the graph."""
        return Tensor._make(self.data)

    def __repr__(self) -> str:
        body = np.array2string(self.data, separator=", ", prefix="tensor(")
        extra = f", dtype={self.dtype}" if self.dtype != np.float32 else ""
        if self.grad_fn is not None:
            extra += f", grad_fn=<{self.grad_fn.name}>"
        elif self.requires_grad:
            extra += ", requires_grad=True"
        return f"tensor({body}{extra})"

    def __bool__(self) -> bool:
        return bool(self.data)

    def __float__(self) -> float:
        return float(self.data)

    # *** backward ***

    def backward(self, gradient: Any = None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's `.grad`.

        `gradient` (d loss / d self) may be omitted only for a one-element tensor.
        """
        for leaf, grad in gradients([self], [gradient], retain_graph=retain_graph).items():
            leaf.grad = grad if leaf.grad is None else leaf.grad + grad

    # *** ops ***

    def __add__(self, other: Any) -> Tensor:
        return _apply(ops.Add(), self, other)

    def __radd__(self, other: Any) -> Tensor:
        return _apply(ops.Add(), other, self)

    def __sub__(self, other: Any) -> Tensor:
        return _apply(ops.Sub(), self, other)

    def __rsub__(self, other: Any) -> Tensor:
        return _apply(ops.Sub(), other, self)

    def __mul__(self, other: Any) -> Tensor:
        return _apply(ops.Mul(), self, other)

    def __rmul__(self, other: Any) -> Tensor:
        return _apply(ops.Mul(), other, self)

    def __truediv__(self, other: Any) -> Tensor:
        return _apply(ops.Div(), self, other)

    def __rtruediv__(self, other: Any) -> Tensor:
        return _apply(ops.Div(), other, self)

    def __matmul__(self, other: Any) -> Tensor:
        return _apply(ops.MatMul(), self, other)

    def __rmatmul__(self, other: Any) -> Tensor:
        return _apply(ops.MatMul(), other, self)

    def __neg__(self) -> Tensor:
        return _apply(ops.Neg(), self)

    def __pow__(self, exponent: Any) -> Tensor:
        if isinstance(exponent, Tensor | np.ndarray):
            return (self.log() * exponent).exp()  # d/dp x**p = x**p log x
        return _apply(ops.Pow(), self, exponent=exponent)

    def __rpow__(self, base: Any) -> Tensor:
        return (self * math.log(base)).exp()

    def relu(self) -> Tensor:
        return _apply(ops.ReLU(), self)

    def tanh(self) -> Tensor:
        return _apply(ops.Tanh(), self)

    def sigmoid(self) -> Tensor:
        return _apply(ops.Sigmoid(), self)

    def exp(self) -> Tensor:
        return _apply(ops.Exp(), self)

    def log(self) -> Tensor:
        return _apply(ops.Log(), self)

    def sqrt(self) -> Tensor:
        return _apply(ops.Sqrt(), self)

    def abs(self) -> Tensor:
        return _apply(ops.Abs(), self)

    def sum(self, axis: ops.Axis = None, keepdims: bool = False) -> Tensor:
        return _apply(ops.Sum(), self, axis=axis, keepdims=keepdims)

    def mean(self, axis: ops.Axis = None, keepdims: bool = False) -> Tensor:
        return _apply(ops.Mean(), self, axis=axis, keepdims=keepdims)

    def max(self, axis: ops.Axis = None, keepdims: bool = False) -> Tensor:
        return _apply(ops.Max(), self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape: int | Sequence[int]) -> Tensor:
        dims = shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
        return _apply(ops.Reshape(), self, shape=tuple(dims))

    def transpose(self, *axes: int | Sequence[int]) -> Tensor:
        dims = axes[0] if len(axes) == 1 and not isinstance(axes[0], int) else axes
        return _apply(ops.Transpose(), self, axes=tuple(dims) or None)

    @property
    def T(self) -> Tensor:
        return self.transpose()

    def __getitem__(self, index: Any) -> Tensor:
        return _apply(ops.GetItem(), self, index=_plain_index(index))


def _plain_index(index: Any) -> Any:
    if isinstance(index, tuple):
        return tuple(_plain_index(i) for i in index)
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, list):
        return np.asarray(index)
    return index


def _as_array(data: Any, dtype: DTypeLike | None) -> Array:
    if isinstance(data, Tensor):
        data = data.data
    if dtype is not None:
        return np.array(data, dtype=dtype)
    if isinstance(data, np.ndarray | np.generic):
        return np.array(data)
    array = np.array(data)
    # Python numbers and lists default to float32, as in PyTorch; bools stay bool.
    if array.dtype.kind in "iuf":
        return array.astype(np.float32)
    if array.dtype.kind == "c":
        return array.astype(np.complex64)
    if array.dtype.kind != "b":
        raise TypeError(f"cannot make a tensor from {type(data).__name__} ({array.dtype})")
    return array


def _constant(value: Any, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return Tensor._make(value)
    if isinstance(value, int | float | bool | np.generic):
        # A Python scalar takes the tensor's dtype, as numpy's weak scalars do.
        return Tensor._make(np.asarray(value, dtype=np.result_type(like.data, value)))
    raise TypeError(f"unsupported operand type for a tensor op: {type(value).__name__}")


def _apply(fn: ops.Function, *operands: Any, **consts: Any) -> Tensor:
    """Run `fn` forward; record it in the graph if any input requires grad."""
    first = next(o for o in operands if isinstance(o, Tensor))
    inputs = [_constant(o, first) for o in operands]
    if is_grad_enabled() and any(t.requires_grad for t in inputs):
        fn.needs_input_grad = tuple(t.requires_grad for t in inputs)
        fn.input_meta = tuple((t.data.shape, t.data.dtype) for t in inputs)
        fn.edges = tuple(t.edge for t in inputs)
        return Tensor._make(fn.forward(*(t.data for t in inputs), **consts), fn)
    return Tensor._make(fn.forward(*(t.data for t in inputs), **consts))


def gradients(
    roots: Sequence[Tensor],
    grads: Sequence[Any] | None = None,
    *,
    retain_graph: bool = False,
) -> dict[Tensor, Array]:
    """d(sum of roots)/d(leaf) for every leaf reached, without touching `.grad`.

    `grads[i]` is d loss / d roots[i]; `None` is allowed for a one-element root.
    """
    seeds = root_seeds(roots, grads)
    return run_backward(seeds, retain_graph=retain_graph)  # type: ignore[return-value]


def root_seeds(
    roots: Sequence[Tensor], grads: Sequence[Any] | None = None
) -> list[tuple[Any, Array]]:
    """(edge, gradient) for each root of a backward, local or distributed: `grads[i]` is
    d loss / d roots[i], or None (then the root must have one element, seeded with 1)."""
    seeds: list[tuple[Any, Array]] = []
    for i, root in enumerate(roots):
        given = None if grads is None else grads[i]
        if not isinstance(root, Tensor) or not root.requires_grad:
            raise RuntimeError(
                f"element {i} of tensors does not require grad and does not have a grad_fn: "
                "nothing recorded how it was made (under no_grad, or from tensors of which "
                "none requires grad)"
            )
        if given is None:
            if root.data.size != 1:
                raise RuntimeError(
                    f"grad can be implicitly created only for one-element outputs; "
                    f"root {i} has shape {root.shape}: pass its gradient"
                )
            seed = np.ones(root.shape, dtype=root.dtype)
        else:
            seed = np.array(given.data if isinstance(given, Tensor) else given, dtype=root.dtype)
            if seed.shape != root.shape:
                raise RuntimeError(
                    f"gradient has shape {seed.shape}, but root {i} has shape {root.shape}"
                )
        seeds.append((root.edge, seed))
    return seeds


# *** creation ***


def tensor(data: Any, *, dtype: DTypeLike | None = None, requires_grad: bool = False) -> Tensor:
    """A new leaf tensor from an array, list or scalar (Python numbers become float32)."""
    return Tensor(data, dtype=dtype, requires_grad=requires_grad)


def from_numpy(array: Array) -> Tensor:
    """A leaf tensor over `array` itself, not a copy (as `torch.from_numpy`)."""
    return Tensor._make(array)


def _shape(dims: tuple[int | Iterable[int], ...], what: str) -> tuple[int, ...]:
    """A shape given as several ints, or as one tuple or list of them (as in PyTorch)."""
    given = dims
    try:
        if len(dims) == 1 and not isinstance(dims[0], int | np.integer | str | bytes):
            dims = tuple(dims[0])
        return tuple(operator.index(d) for d in dims)  # type: ignore[arg-type]
    except TypeError:
        shown = ", ".join(map(repr, given))
        raise TypeError(
            f"{what}() takes a shape as ints, {what}(2, 3), or as one tuple of ints, "
            f"{what}((2, 3)), not {what}({shown})"
        ) from None


def _leaf(data: Array, requires_grad: bool) -> Tensor:
    return Tensor._make(data).requires_grad_(requires_grad)


def zeros(
    shape: int | Iterable[int] = (),
    *dims: int,
    dtype: DTypeLike = "float32",
    requires_grad: bool = False,
) -> Tensor:
    """A tensor of zeros: `zeros(2, 3)`, `zeros((2, 3))` or `zeros(shape=(2, 3))`."""
    return _leaf(np.zeros(_shape((shape, *dims), "zeros"), dtype=dtype), requires_grad)


def ones(
    shape: int | Iterable[int] = (),
    *dims: int,
    dtype: DTypeLike = "float32",
    requires_grad: bool = False,
) -> Tensor:
    """A tensor of ones: `ones(2, 3)`, `ones((2, 3))` or `ones(shape=(2, 3))`."""
    return _leaf(np.ones(_shape((shape, *dims), "ones"), dtype=dtype), requires_grad)


def randn(
    *shape: int | Iterable[int],
    rng: np.random.Generator | None = None,
    dtype: DTypeLike = "float32",
    requires_grad: bool = False,
) -> Tensor:
    """Standard normal samples, `randn(2, 3)` or `randn((2, 3))`; pass `rng` (a
    `np.random.Generator`) to make them repeatable."""
    dims = _shape(shape, "randn")
    rng = np.random.default_rng() if rng is None else rng
    target = np.dtype(dtype)
    if target in (np.float32, np.float64):
        data = rng.standard_normal(dims, dtype=target)  # type: ignore[arg-type]
    else:
        data = rng.standard_normal(dims).astype(target)
    return _leaf(data, requires_grad)


def cat(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Join tensors along an existing axis."""
    return _apply(ops.Cat(), *(_as_tensor(t) for t in tensors), axis=axis)


def stack(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Join tensors along a new axis."""
    return _apply(ops.Stack(), *(_as_tensor(t) for t in tensors), axis=axis)


def _as_tensor(value: Any) -> Tensor:
    return value if isinstance(value, Tensor) else Tensor(value)
