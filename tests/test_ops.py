"""Every differentiable op, one line per case, through the one checker."""

from __future__ import annotations

import numpy as np
import pytest

import asyncgrad as ag
from asyncgrad.nn import functional as F
from tests.gradcheck import check_grad

BINARY = [
    ("add", lambda x, y: x + y),
    ("sub", lambda x, y: x - y),
    ("mul", lambda x, y: x * y),
    ("div", lambda x, y: x / y),
]
BROADCAST = [[(3, 4), (3, 4)], [(3, 4), (4,)], [(3, 1), (1, 4)], [(2, 3, 4), (3, 1)], [(4,), ()]]


@pytest.mark.parametrize(("name", "fn"), BINARY)
@pytest.mark.parametrize("shapes", BROADCAST)
def test_binary_broadcasting(name: str, fn: object, shapes: list[tuple[int, ...]]) -> None:
    check_grad(fn, shapes, positive=name == "div")  # type: ignore[arg-type]


def test_scalar_operands() -> None:
    check_grad(lambda x: 2.0 * x + 1 - x / 4 + (3 - x) * 0.5 + 1 / (x + 5), [(3, 2)], positive=True)


def test_unary_minus_and_pow() -> None:
    check_grad(lambda x: -x, [(3,)])
    check_grad(lambda x: x**2, [(3, 2)])
    check_grad(lambda x: x**-1.5, [(4,)], positive=True)
    check_grad(lambda x, p: x**p, [(3,), (3,)], positive=True)
    check_grad(lambda x: 2.0**x, [(3,)])


@pytest.mark.parametrize(
    "shapes",
    [
        [(3, 4), (4, 5)],
        [(4,), (4, 5)],
        [(3, 4), (4,)],
        [(4,), (4,)],
        [(2, 3, 4), (4, 5)],
        [(2, 3, 4), (2, 4, 5)],
        [(2, 1, 3, 4), (5, 4, 2)],
        [(4,), (2, 4, 3)],
        [(2, 3, 4), (4,)],
    ],
)
def test_matmul(shapes: list[tuple[int, ...]]) -> None:
    check_grad(lambda x, y: x @ y, shapes)


@pytest.mark.parametrize("axis", [None, 0, 1, -1, (0, 2)])
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_reductions(axis: object, keepdims: bool, reduce: str) -> None:
    check_grad(lambda x: getattr(x, reduce)(axis=axis, keepdims=keepdims), [(2, 3, 4)])


def test_max_splits_ties() -> None:
    x = ag.tensor([1.0, 3.0, 3.0], requires_grad=True)
    x.max().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.5, 0.5])


def test_movement() -> None:
    check_grad(lambda x: x.reshape(4, 3), [(2, 6)])
    check_grad(lambda x: x.reshape((3, -1)), [(2, 6)])
    check_grad(lambda x: x.transpose(), [(2, 3, 4)])
    check_grad(lambda x: x.transpose(1, 2, 0), [(2, 3, 4)])
    check_grad(lambda x: x.transpose((2, 0, 1)), [(2, 3, 4)])
    check_grad(lambda x: x.T, [(2, 3)])


@pytest.mark.parametrize(
    "index",
    [
        1,
        -1,
        slice(1, None),
        (slice(None), 2),
        (Ellipsis, slice(None, None, 2)),
        (None, 0),
        np.array([2, 0, 2, 2]),  # repeated indices add up
        (np.array([0, 1, 1]), np.array([3, 3, 0])),
        (slice(None), [0, 0, 3]),
        np.array([True, False, True]),
    ],
)
def test_getitem(index: object) -> None:
    check_grad(lambda x: x[index], [(3, 4)])


def test_getitem_with_tensor_index() -> None:
    check_grad(lambda x: x[ag.tensor(np.array([1, 1, 0]))], [(3, 2)])


@pytest.mark.parametrize(
    ("name", "fn", "positive"),
    [
        ("relu", lambda x: x.relu(), False),
        ("tanh", lambda x: x.tanh(), False),
        ("sigmoid", lambda x: x.sigmoid(), False),
        ("exp", lambda x: x.exp(), False),
        ("log", lambda x: x.log(), True),
        ("sqrt", lambda x: x.sqrt(), True),
        ("abs", lambda x: x.abs(), False),
    ],
)
def test_unary(name: str, fn: object, positive: bool) -> None:
    check_grad(fn, [(3, 4)], positive=positive)  # type: ignore[arg-type]


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_cat_and_stack(axis: int) -> None:
    check_grad(lambda x, y: ag.cat([x, y], axis=axis), [(2, 3), (2, 3)])
    check_grad(lambda x, y, z: ag.stack([x, y, z], axis=axis), [(2, 3), (2, 3), (2, 3)])


def test_cat_unequal_sizes() -> None:
    check_grad(lambda x, y: ag.cat([x, y], axis=1), [(2, 1), (2, 4)])


def test_tensor_used_twice() -> None:
    check_grad(lambda x: x * x, [(3,)])
    check_grad(lambda x: (x + x) * x - x.exp() * x, [(2, 2)])
    check_grad(lambda x, y: (x @ y) @ (x @ y).T, [(3, 4), (4, 3)])


def test_functional() -> None:
    check_grad(lambda x: F.softmax(x), [(3, 5)])
    check_grad(lambda x: F.softmax(x, axis=0), [(3, 5)])
    check_grad(lambda x: F.log_softmax(x), [(3, 5)])
    check_grad(lambda x: F.cross_entropy(x, np.array([4, 0, 2])), [(3, 5)])
    check_grad(lambda x: F.cross_entropy(x, np.array(1)), [(5,)])
    check_grad(lambda x, y: F.mse_loss(x, y), [(3, 2), (3, 2)])
    check_grad(lambda x: F.relu(x) + F.tanh(x) + F.sigmoid(x), [(4,)])


@pytest.mark.parametrize("shape", [(5, 4), (4,), (2, 3, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(shape: tuple[int, ...], bias: bool) -> None:
    if bias:
        check_grad(lambda x, w, b: F.linear(x, w, b), [shape, (3, 4), (3,)])
    else:
        check_grad(lambda x, w: F.linear(x, w), [shape, (3, 4)])


def test_log_softmax_is_stable() -> None:
    x = ag.tensor(np.array([[1000.0, 0.0, -1000.0]]), requires_grad=True)
    out = F.log_softmax(x)
    assert np.isfinite(out.data).all()
    np.testing.assert_allclose(out.data, [[0.0, -1000.0, -2000.0]])
    F.cross_entropy(x, [2]).backward()
    assert np.isfinite(x.grad).all()


def test_cross_entropy_rejects_bad_targets() -> None:
    logits = ag.zeros((2, 3), requires_grad=True)
    with pytest.raises(IndexError, match="out of range"):
        F.cross_entropy(logits, [0, 3])
    with pytest.raises(TypeError, match="integer"):
        F.cross_entropy(logits, [0.0, 1.0])
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        F.cross_entropy(logits, [0, 1, 2])
