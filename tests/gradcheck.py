"""The one gradient checker: analytic gradients against central differences in float64."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import asyncgrad as ag

Spec = tuple[int, ...] | np.ndarray


def check_grad(
    fn: Callable[..., ag.Tensor],
    specs: Sequence[Spec],
    *,
    positive: bool = False,
    seed: int = 0,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-7,
) -> None:
    """Assert that backward through `fn` matches finite differences for every input.

    A spec is a shape (standard normal data, or |data| + 0.5 with `positive`) or an array.
    A non-scalar output is reduced with fixed random weights, so every element counts.
    """
    rng = np.random.default_rng(seed)
    arrays = [
        np.asarray(s, dtype=np.float64) if isinstance(s, np.ndarray) else _sample(rng, s, positive)
        for s in specs
    ]
    inputs = [ag.tensor(a, requires_grad=True) for a in arrays]
    out = fn(*inputs)
    weights = rng.standard_normal(out.shape)

    def loss(*xs: Any) -> Any:
        return (fn(*xs) * weights).sum()

    loss(*inputs).backward()
    for i, (x, array) in enumerate(zip(inputs, arrays, strict=True)):
        numeric = np.zeros_like(array)
        for idx in np.ndindex(array.shape):
            probe = [ag.tensor(a) for a in arrays]
            with ag.no_grad():
                probe[i].data[idx] = array[idx] + eps
                up = loss(*probe).item()
                probe[i].data[idx] = array[idx] - eps
                down = loss(*probe).item()
            numeric[idx] = (up - down) / (2 * eps)
        assert x.grad is not None, f"input {i} received no gradient"
        assert x.grad.dtype == np.float64
        assert x.grad.shape == array.shape
        np.testing.assert_allclose(x.grad, numeric, rtol=rtol, atol=atol, err_msg=f"input {i}")


def _sample(rng: np.random.Generator, shape: tuple[int, ...], positive: bool) -> np.ndarray:
    data = rng.standard_normal(shape)
    return np.abs(data) + 0.5 if positive else data
