"""Modules, parameters and state dicts."""

from __future__ import annotations

import numpy as np
import pytest

import asyncgrad as ag
from asyncgrad import nn


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 3, rng=np.random.default_rng(0))
        self.scale = nn.Parameter(np.ones(3, np.float32))
        self.second = nn.Sequential(nn.Tanh(), nn.Linear(3, 2, rng=np.random.default_rng(1)))
        self.shared = self.scale  # registered twice, listed once

    def forward(self, x: ag.Tensor) -> ag.Tensor:
        return self.second(self.first(x) * self.scale)


def test_parameters_in_registration_order() -> None:
    names = [name for name, _ in Block().named_parameters()]
    assert names == ["scale", "first.weight", "first.bias", "second.1.weight", "second.1.bias"]
    block = Block()
    assert [id(p) for p in block.parameters()] == [id(p) for _, p in block.named_parameters()]


def test_parameter_is_a_leaf_that_requires_grad() -> None:
    p = nn.Parameter([1.0, 2.0])
    assert isinstance(p, ag.Tensor) and p.requires_grad and p.is_leaf
    assert p.dtype == np.float32
    assert nn.Parameter(np.zeros(2, np.float64)).dtype == np.float64


def test_linear_shapes_and_init() -> None:
    layer = nn.Linear(5, 3, rng=np.random.default_rng(0))
    assert layer.weight.shape == (3, 5) and layer.bias is not None and layer.bias.shape == (3,)
    assert np.abs(layer.weight.data).max() <= 1 / np.sqrt(5)
    x = ag.randn(7, 5, rng=np.random.default_rng(1))
    np.testing.assert_allclose(
        layer(x).data, x.data @ layer.weight.data.T + layer.bias.data, rtol=1e-6
    )
    assert nn.Linear(5, 3, bias=False).bias is None
    assert [n for n, _ in nn.Linear(5, 3, bias=False).named_parameters()] == ["weight"]


def test_forward_backward_and_zero_grad() -> None:
    block = Block()
    out = block(ag.randn(6, 4, rng=np.random.default_rng(2)))
    assert out.shape == (6, 2)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in block.parameters())
    block.zero_grad()
    assert all(p.grad is None for p in block.parameters())


def test_sequential_and_activations() -> None:
    seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Tanh())
    assert len(seq) == 3 and isinstance(seq[1], nn.ReLU)
    assert [type(m).__name__ for m in seq] == ["Linear", "ReLU", "Tanh"]
    out = seq(ag.randn(3, 2))
    assert (out.data >= 0).all() and (out.data < 1).all()


def test_state_dict_round_trip() -> None:
    a, b = Block(), Block()
    b.first.weight.data = b.first.weight.data + 1
    state = a.state_dict()
    assert list(state) == [name for name, _ in a.named_parameters()]
    b.load_state_dict(state)
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        np.testing.assert_array_equal(pa.data, pb.data)
        assert pa.data is not pb.data


def test_load_state_dict_rejects_mismatches() -> None:
    block = Block()
    state = block.state_dict()
    with pytest.raises(KeyError, match="missing"):
        block.load_state_dict({k: v for k, v in state.items() if k != "scale"})
    with pytest.raises(KeyError, match="unexpected"):
        block.load_state_dict({**state, "extra": np.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        block.load_state_dict({**state, "scale": np.zeros(4)})


def test_module_without_init_gives_clear_error() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            self.w = nn.Parameter([1.0])

    with pytest.raises(AttributeError, match=r"Module\.__init__"):
        Broken()


def test_learns_a_separable_task() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 4)).astype(np.float32)
    y = (x @ rng.standard_normal((4, 3))).argmax(axis=1)
    model = nn.Sequential(nn.Linear(4, 16, rng=rng), nn.ReLU(), nn.Linear(16, 3, rng=rng))
    opt = ag.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(ag.tensor(x)), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]
