"""B6_local_autograd: the MLP of B5 trained in one process, no RPC.

Each thread setting runs in a fresh interpreter, because BLAS fixes its thread count when
numpy is first imported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

from asyncgrad import nn, optim
from asyncgrad.bench.options import Options
from asyncgrad.local_cluster import THREAD_VARS
from asyncgrad.nn import functional as F
from asyncgrad.tensor import tensor


def make_mlp(seed: int = 0) -> nn.Sequential:
    """Linear(784, 256) - ReLU - Linear(256, 10), as in docs/BENCH.md."""
    rng = np.random.default_rng(seed)
    return nn.Sequential(nn.Linear(784, 256, rng=rng), nn.ReLU(), nn.Linear(256, 10, rng=rng))


def make_teacher() -> np.ndarray:
    return np.random.default_rng(4242).standard_normal((784, 10)).astype(np.float32)


def make_batches(n: int, seed: int, teacher: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` batches of 64 inputs labelled by a fixed random linear teacher: learnable."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n):
        x = rng.standard_normal((64, 784)).astype(np.float32)
        batches.append((x, (x @ teacher).argmax(axis=1)))
    return batches


def train_steps(quick: bool) -> dict[str, Any]:
    """The timed loop; runs in the child interpreter."""
    warmup, timed = (5, 50) if quick else (20, 500)
    model = make_mlp()
    opt = optim.SGD(model.parameters(), lr=0.05)
    batches = make_batches(50, seed=7, teacher=make_teacher())

    def step(i: int) -> float:
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        loss = F.cross_entropy(model(tensor(x)), y)
        loss.backward()
        opt.step()
        return float(loss.item())

    for i in range(warmup):
        step(i)
    start = time.perf_counter()
    losses = [step(i) for i in range(timed)]
    elapsed = time.perf_counter() - start
    return {
        "steps_per_s": timed / elapsed,
        "warmup": warmup,
        "timed": timed,
        "first10_loss": float(np.mean(losses[:10])),
        "last10_loss": float(np.mean(losses[-10:])),
    }


def _in_child(threads: int | None, quick: bool) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    if threads is not None:
        env.update(dict.fromkeys(THREAD_VARS, str(threads)))
    argv = [sys.executable, "-m", "asyncgrad.bench.local"] + (["--quick"] if quick else [])
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"B6 child failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def b6_local_autograd(options: Options) -> dict[str, Any]:
    one, default = _in_child(1, options.quick), _in_child(None, options.quick)
    return {
        "params": {
            "model": "Linear(784,256)-ReLU-Linear(256,10)",
            "batch": 64,
            "warmup_steps": one["warmup"],
            "timed_steps": one["timed"],
            "optimizer": "SGD lr=0.05",
            "default_threads": os.cpu_count(),
        },
        "figures": {
            "steps_per_s_threads1": one["steps_per_s"],
            "steps_per_s_default_threads": default["steps_per_s"],
            "first10_loss": one["first10_loss"],
            "last10_loss": one["last10_loss"],
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one B6 measurement (used by asyncgrad bench)")
    parser.add_argument("--quick", action="store_true")
    print(json.dumps(train_steps(parser.parse_args().quick)))
