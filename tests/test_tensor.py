"""Tensor behaviour and the local backward engine."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

import asyncgrad as ag
from asyncgrad.graph import GraphTask
from asyncgrad.ops import Function
from asyncgrad.tensor import gradients


def test_dtypes_default_and_kept() -> None:
    assert ag.tensor(1.5).dtype == np.float32
    assert ag.tensor([1, 2]).dtype == np.float32
    assert ag.tensor([True, False]).dtype == np.bool_
    assert ag.tensor(np.arange(3)).dtype == np.int64
    assert ag.tensor(np.ones(2, np.float64)).dtype == np.float64
    assert ag.tensor([1, 2], dtype="float64").dtype == np.float64
    assert ag.zeros((2, 3)).dtype == np.float32
    assert ag.randn(2, 3, dtype="float64").dtype == np.float64


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ops_and_gradients_keep_dtype(dtype: type) -> None:
    x = ag.tensor(np.ones((2, 3), dtype), requires_grad=True)
    w = ag.tensor(np.ones((3, 2), dtype), requires_grad=True)
    y = ((x @ w).tanh() * 2.0 + 1 - x.sum() / 3).sigmoid().mean()
    assert y.dtype == dtype
    y.backward()
    assert x.grad is not None and x.grad.dtype == dtype
    assert w.grad is not None and w.grad.dtype == dtype


def test_mixed_precision_gradient_takes_each_input_dtype() -> None:
    a = ag.tensor(np.ones(3, np.float32), requires_grad=True)
    b = ag.tensor(np.ones(3, np.float64), requires_grad=True)
    (a * b).sum().backward()
    assert a.grad is not None and a.grad.dtype == np.float32
    assert b.grad is not None and b.grad.dtype == np.float64


def test_attributes() -> None:
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = ag.tensor(data, requires_grad=True)
    assert t.shape == (2, 3) and t.ndim == 2 and len(t) == 2
    assert t.is_leaf and t.grad_fn is None and t.grad is None
    assert t.numpy() is t.data
    assert ag.tensor(4.0).item() == 4.0
    y = t * 2
    assert not y.is_leaf and y.requires_grad and y.grad_fn is not None
    d = y.detach()
    assert d.is_leaf and not d.requires_grad and d.data is y.data
    assert "grad_fn=<MulBackward>" in repr(y)


@pytest.mark.parametrize("make", [ag.zeros, ag.ones, ag.randn])
def test_a_shape_is_several_ints_or_one_tuple(make: Any) -> None:
    assert make(2, 20).shape == (2, 20)
    assert make((2, 20)).shape == (2, 20)
    assert make([2, 20]).shape == (2, 20)
    assert make(np.int64(3)).shape == (3,)
    assert make((2, 3), dtype="float64", requires_grad=True).dtype == np.float64
    assert make(2, 3, requires_grad=True).requires_grad
    name = make.__name__
    with pytest.raises(TypeError, match=rf"{name}\(\(2, 3\)\), not {name}\(2.0\)"):
        make(2.0)
    with pytest.raises(TypeError, match=rf"not {name}\(\(2, 3\), 4\)"):
        make((2, 3), 4)


def test_zeros_and_ones_take_shape_by_keyword() -> None:
    assert ag.zeros(shape=(2, 3)).shape == (2, 3)
    assert ag.ones(shape=4).shape == (4,)


def test_item_gives_a_python_number() -> None:
    assert type(ag.tensor([[2.5]]).item()) is float
    assert type(ag.tensor(np.int64(3)).item()) is int
    with pytest.raises(ValueError, match="size 1"):
        ag.tensor([1.0, 2.0]).item()


def test_numpy_array_protocol() -> None:
    t = ag.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)  # requires grad: converts too
    a = np.asarray(t)
    assert a is t.data and a.dtype == np.float32
    assert np.asarray(t, dtype=np.float64).dtype == np.float64
    copied = np.array(t)
    assert np.array_equal(copied, t.data) and not np.shares_memory(copied, t.data)
    assert np.asarray(t, copy=False) is t.data
    with pytest.raises(ValueError, match="copy"):
        np.array(t, dtype=np.float64, copy=False)
    stacked = np.asarray([ag.tensor(1.0), ag.tensor(2.0)])
    assert stacked.dtype == np.float32 and stacked.tolist() == [1.0, 2.0]
    assert t.grad_fn is None and t.grad is None  # numpy's use records nothing


def test_tensors_hash_by_identity() -> None:
    a, b = ag.tensor([1.0]), ag.tensor([1.0])
    table = {a: "a", b: "b"}
    assert table[a] == "a" and table[b] == "b"
    assert a != b and a == a


def test_numpy_arrays_on_the_left() -> None:
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    y = np.array([3.0, 4.0], dtype=np.float32) * x
    assert isinstance(y, ag.Tensor)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, 4.0])


def test_integer_tensors_cannot_require_grad() -> None:
    with pytest.raises(RuntimeError, match="floating point"):
        ag.tensor(np.arange(3), requires_grad=True)


def test_grads_accumulate_across_backward_calls() -> None:
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    (x * 3).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, [3 + 2, 3 + 4])


def test_second_backward_needs_retain_graph() -> None:
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward()


def test_retain_graph_twice_doubles_gradients() -> None:
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    y = (x.exp() * x).sum()
    y.backward(retain_graph=True)
    once = x.grad.copy()
    y.backward(retain_graph=True)
    np.testing.assert_allclose(x.grad, 2 * once)
    y.backward()
    np.testing.assert_allclose(x.grad, 3 * once)


def test_backward_needs_gradient_for_non_scalar() -> None:
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="one-element"):
        (x * 2).backward()
    (x * 2).backward(gradient=np.array([1.0, 10.0]))
    np.testing.assert_allclose(x.grad, [2.0, 20.0])
    with pytest.raises(RuntimeError, match="shape"):
        (x * 2).backward(gradient=np.ones(3))


def test_backward_of_tensor_without_grad_fails() -> None:
    with pytest.raises(RuntimeError, match="does not require grad"):
        ag.tensor(1.0).backward()


def test_backward_from_a_leaf_root() -> None:
    x = ag.tensor(2.0, requires_grad=True)
    x.backward()
    assert x.grad == 1.0


def test_ten_thousand_op_chain() -> None:
    x = ag.tensor(1.0, dtype="float64", requires_grad=True)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.backward()
    assert x.grad == pytest.approx(1.0001**10_000)


class Counting(Function):
    """Identity op that counts its backward calls and checks its gradient is complete."""

    calls = 0

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x

    def backward(self, grad: np.ndarray) -> np.ndarray:
        Counting.calls += 1
        return grad


def test_every_node_runs_once_after_all_its_gradients() -> None:
    from asyncgrad.tensor import _apply

    Counting.calls = 0
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    shared = _apply(Counting(), x)
    # shared feeds four paths of different depth; its backward must see their sum, once.
    paths = [shared * 2, (shared * 3).tanh(), shared.exp().log(), ((shared + 1) * shared)]
    total = paths[0]
    for p in paths[1:]:
        total = total + p
    total.sum().backward()
    assert Counting.calls == 1
    xs = np.array([1.0, 2.0])
    expected = 2 + 3 * (1 - np.tanh(3 * xs) ** 2) + 1 + (2 * xs + 1)
    np.testing.assert_allclose(x.grad, expected, rtol=1e-6)


def test_gradients_is_pure() -> None:
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    grads = gradients([(x * x).sum()])
    assert x.grad is None
    np.testing.assert_array_equal(grads[x], [2.0, 4.0])


def test_several_roots_add_up() -> None:
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    y = x * x
    grads = gradients([y.sum(), (y * 3).sum(), x.sum()])
    np.testing.assert_allclose(grads[x], 2 * np.array([1.0, 2.0]) * 4 + 1)


def test_leaf_gradients_are_distinct_writable_arrays() -> None:
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    y = ag.tensor([3.0, 4.0], requires_grad=True)
    (x + y).sum().backward()
    assert x.grad is not y.grad
    assert x.grad.flags.writeable and x.grad.flags.c_contiguous
    x.grad += 1
    np.testing.assert_array_equal(y.grad, [1.0, 1.0])


def test_no_grad_records_nothing() -> None:
    x = ag.tensor([1.0], requires_grad=True)
    with ag.no_grad():
        assert not ag.is_grad_enabled()
        y = x * 2
    assert ag.is_grad_enabled()
    assert not y.requires_grad and y.grad_fn is None


def test_no_grad_as_decorator() -> None:
    @ag.no_grad()
    def f(t: ag.Tensor) -> ag.Tensor:
        return t * 2

    assert not f(ag.tensor([1.0], requires_grad=True)).requires_grad


async def test_no_grad_does_not_leak_across_tasks() -> None:
    x = ag.tensor([1.0], requires_grad=True)
    inside, release = asyncio.Event(), asyncio.Event()

    async def quiet() -> bool:
        with ag.no_grad():
            inside.set()
            await release.wait()
            return (x * 2).requires_grad

    async def busy() -> bool:
        await inside.wait()
        recorded = (x * 2).requires_grad
        release.set()
        return recorded

    async with asyncio.timeout(5):
        quiet_recorded, busy_recorded = await asyncio.gather(quiet(), busy())
    assert not quiet_recorded and busy_recorded


async def test_no_grad_decorates_coroutines() -> None:
    @ag.no_grad()
    async def f(t: ag.Tensor) -> ag.Tensor:
        return t * 2

    assert not (await f(ag.tensor([1.0], requires_grad=True))).requires_grad


def test_graph_task_feeds_none_through() -> None:
    # The distributed engine feeds "no gradient" into start nodes; every count still ends.
    x = ag.tensor([1.0], requires_grad=True)
    y = x * 2
    task = GraphTask([y.grad_fn])
    assert not task.done
    task.feed(y.grad_fn, None)
    assert task.done and task.leaf_grads == {}
    with pytest.raises(RuntimeError, match="expects no more"):
        task.feed(y.grad_fn, None)
