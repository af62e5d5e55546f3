"""Optimizers follow PyTorch's update rules and never write into a parameter's array."""

from __future__ import annotations

import numpy as np
import pytest

import asyncgrad as ag
from asyncgrad import optim

GRADS = [np.array([0.5, -1.0, 2.0]), np.array([-0.25, 0.0, 1.0]), np.array([1.0, 1.0, -3.0])]


def run(opt_cls: type[optim.Optimizer], use_dict: bool = False, **kw: float) -> list[np.ndarray]:
    p = ag.tensor(np.array([1.0, 2.0, -1.0]), requires_grad=True)
    opt = opt_cls([p], **kw)
    seen = []
    for g in GRADS:
        if use_dict:
            opt.step({p: g})
        else:
            p.grad = g
            opt.step()
        seen.append(p.data.copy())
    return seen


def sgd_reference(lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> list[np.ndarray]:
    p, buf, out = np.array([1.0, 2.0, -1.0]), None, []
    for g in GRADS:
        d = g + weight_decay * p
        if momentum:
            buf = d.copy() if buf is None else momentum * buf + d
            d = buf
        p = p - lr * d
        out.append(p)
    return out


def adam_reference(lr: float, b1: float, b2: float, eps: float) -> list[np.ndarray]:
    p, m, v, out = np.array([1.0, 2.0, -1.0]), np.zeros(3), np.zeros(3), []
    for t, g in enumerate(GRADS, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        out.append(p)
    return out


@pytest.mark.parametrize(
    "kw",
    [{"lr": 0.1}, {"lr": 0.1, "momentum": 0.9}, {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.1}],
)
@pytest.mark.parametrize("use_dict", [False, True])
def test_sgd_matches_formula(kw: dict[str, float], use_dict: bool) -> None:
    np.testing.assert_allclose(run(optim.SGD, use_dict, **kw), sgd_reference(**kw), rtol=1e-12)


@pytest.mark.parametrize("use_dict", [False, True])
def test_adam_matches_formula(use_dict: bool) -> None:
    got = run(optim.Adam, use_dict, lr=0.01, betas=(0.8, 0.99), eps=1e-6)  # type: ignore[arg-type]
    np.testing.assert_allclose(got, adam_reference(0.01, 0.8, 0.99, 1e-6), rtol=1e-12)


@pytest.mark.parametrize("opt_cls", [optim.SGD, optim.Adam])
def test_step_gives_parameters_new_arrays(opt_cls: type[optim.Optimizer]) -> None:
    p = ag.tensor([1.0, 2.0], requires_grad=True)
    before = p.data
    saved = before.copy()
    p.grad = np.array([1.0, 1.0], dtype=np.float32)
    opt_cls([p], lr=0.1).step()
    assert p.data is not before and not np.shares_memory(p.data, before)
    np.testing.assert_array_equal(before, saved)
    assert p.data.dtype == np.float32


def test_step_with_dict_ignores_dot_grad_and_skips_missing() -> None:
    p, q = ag.tensor([1.0], requires_grad=True), ag.tensor([5.0], requires_grad=True)
    p.grad = np.array([100.0], dtype=np.float32)
    opt = optim.SGD([p, q], lr=1.0)
    opt.step({q: np.array([1.0])})
    assert p.data[0] == 1.0 and q.data[0] == 4.0


def test_zero_grad_and_validation() -> None:
    p = ag.tensor([1.0], requires_grad=True)
    p.grad = np.ones(1, np.float32)
    opt = optim.SGD([p], lr=0.1)
    opt.zero_grad()
    assert p.grad is None
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)
    with pytest.raises(TypeError, match="require grad"):
        optim.SGD([ag.tensor([1.0])], lr=0.1)
    with pytest.raises(ValueError, match="invalid"):
        optim.Adam([p], betas=(1.5, 0.9))
    with pytest.raises(ValueError, match="shape"):
        opt.step({p: np.ones(2)})
