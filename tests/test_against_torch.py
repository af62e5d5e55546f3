"""Side by side with PyTorch, where it is installed (it is not a dependency)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import asyncgrad as ag
from asyncgrad import nn, optim
from asyncgrad.nn import functional as F

torch = pytest.importorskip("torch")
TF = torch.nn.functional

CASES: list[tuple[str, list[tuple[int, ...]], Callable[..., Any], Any]] = [
    ("broadcast", [(3, 4), (4,)], lambda x, y: (x * y - y / (x * x + 1)).sum(), None),
    ("matmul", [(2, 3, 4), (4, 5)], lambda x, y: (x @ y).tanh().sum(), None),
    ("reduce", [(3, 4)], lambda x: x.max(axis=1).sum() + x.mean(), None),
    ("softmax", [(3, 5)], lambda x: (F.softmax(x) * F.log_softmax(x)).sum(), None),
    ("unary", [(6,)], lambda x: (x.sigmoid() + x.relu() + x.abs() + x.exp()).sum(), None),
    ("index", [(4, 3)], lambda x: x[np.array([0, 2, 2])].sum() + x[1:, ::2].sum(), None),
]
TORCH = {
    "broadcast": lambda x, y: (x * y - y / (x * x + 1)).sum(),
    "matmul": lambda x, y: (x @ y).tanh().sum(),
    "reduce": lambda x: x.amax(dim=1).sum() + x.mean(),
    "softmax": lambda x: (TF.softmax(x, -1) * TF.log_softmax(x, -1)).sum(),
    "unary": lambda x: (x.sigmoid() + x.relu() + x.abs() + x.exp()).sum(),
    "index": lambda x: x[[0, 2, 2]].sum() + x[1:, ::2].sum(),
}


@pytest.mark.parametrize(("name", "shapes", "fn", "_"), CASES, ids=[c[0] for c in CASES])
def test_ops_match_torch(name: str, shapes: list[tuple[int, ...]], fn: Any, _: Any) -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s) for s in shapes]
    ours = [ag.tensor(a, requires_grad=True) for a in arrays]
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    out, ref = fn(*ours), TORCH[name](*theirs)
    out.backward()
    ref.backward()
    np.testing.assert_allclose(out.item(), ref.item(), rtol=1e-10)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a.grad, b.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_cross_entropy_matches_torch() -> None:
    rng = np.random.default_rng(1)
    logits, target = rng.standard_normal((8, 5)) * 10, rng.integers(0, 5, 8)
    ours, theirs = ag.tensor(logits, requires_grad=True), torch.tensor(logits, requires_grad=True)
    loss, ref = F.cross_entropy(ours, target), TF.cross_entropy(theirs, torch.tensor(target))
    loss.backward()
    ref.backward()
    np.testing.assert_allclose(loss.item(), ref.item(), rtol=1e-12)
    np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    ("ours", "theirs", "kw"),
    [
        (optim.SGD, "SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
        (optim.Adam, "Adam", {"lr": 0.01, "betas": (0.85, 0.995), "eps": 1e-7}),
    ],
)
def test_training_matches_torch(ours: Any, theirs: str, kw: dict[str, Any]) -> None:
    rng = np.random.default_rng(2)
    model = nn.Sequential(
        nn.Linear(6, 8, rng=rng, dtype="float64"),
        nn.Tanh(),
        nn.Linear(8, 3, rng=rng, dtype="float64"),
    )
    ref = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()
    with torch.no_grad():
        for (_, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            q.copy_(torch.tensor(p.data))
    opt, ref_opt = (
        ours(model.parameters(), **kw),
        getattr(torch.optim, theirs)(ref.parameters(), **kw),
    )
    for _ in range(5):
        x, y = rng.standard_normal((16, 6)), rng.integers(0, 3, 16)
        opt.zero_grad()
        F.cross_entropy(model(ag.tensor(x)), y).backward()
        opt.step()
        ref_opt.zero_grad()
        TF.cross_entropy(ref(torch.tensor(x)), torch.tensor(y)).backward()
        ref_opt.step()
    for (_, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        np.testing.assert_allclose(p.data, q.detach().numpy(), rtol=1e-9, atol=1e-12)
