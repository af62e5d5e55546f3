"""What both sides of a workload report, defined once: `bench --against torch` pairs the
records by their keys, so asyncgrad's and PyTorch's must not drift apart."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["b1_record", "b2_params", "b5_record", "percentile"]


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def b1_record(calls: int, warmup: int, latencies_ns: Sequence[float]) -> dict[str, Any]:
    us = sorted(v / 1000 for v in latencies_ns)
    return {
        "params": {"calls": calls, "warmup": warmup, "tensor": "float32[16]", "target": "worker1"},
        "figures": {
            "median_us": percentile(us, 50),
            "p90_us": percentile(us, 90),
            "p99_us": percentile(us, 99),
            "mean_us": statistics.fmean(us),
            "min_us": us[0],
        },
    }


def b2_params(calls: int, window: int, warmup: int) -> dict[str, Any]:
    return {
        "calls": calls,
        "max_in_flight": window,
        "warmup_calls": warmup,
        "tensor": "float32[16]",
        "window": f"sliding: when {window} outstanding, wait on the oldest",
    }


def b5_record(
    trainers: Sequence[str],
    steps: int,
    lr: float,
    wall_s: float,
    losses: Sequence[Sequence[float]],
    step_s: Sequence[Sequence[float]],
) -> dict[str, Any]:
    """B5's record from each trainer's losses and step times (seconds), in `trainers` order."""
    figures: dict[str, Any] = {"total_steps_per_s": len(trainers) * steps / wall_s}
    figures["wall_s"] = wall_s
    fell = True
    for name, trainer_losses, times in zip(trainers, losses, step_s, strict=True):
        first, last = float(np.mean(trainer_losses[:10])), float(np.mean(trainer_losses[-10:]))
        figures[f"{name}_first10_loss"] = first
        figures[f"{name}_last10_loss"] = last
        figures[f"{name}_median_ms_per_step"] = statistics.median(times) * 1000
        figures[f"{name}_steps_per_s"] = steps / sum(times)
        fell = fell and last < first
    # The first 10 steps of each trainer warm caches and connections up.
    steady = sum(sum(times[10:]) for times in step_s) / len(step_s)
    figures["total_steps_per_s_excl_first10"] = len(trainers) * (steps - 10) / steady
    figures["loss_fell"] = fell
    return {
        "params": {
            "roles": "driver(coord only), ps, " + ", ".join(trainers),
            "model": "Linear(784,256)-ReLU-Linear(256,10) on ps",
            "batch": 64,
            "steps_per_trainer": steps,
            "optimizer": f"DistributedOptimizer(SGD lr={lr})",
            "concurrent_trainers": len(trainers),
        },
        "figures": figures,
    }
