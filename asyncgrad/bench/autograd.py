"""B4 (a distributed backward through a chain of four workers) and B5 (a parameter server
with two concurrent trainers), as docs/BENCH.md defines them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from asyncgrad import dist_autograd
from asyncgrad.bench.driver import CpuMeter, drive, scale
from asyncgrad.bench.options import Options
from asyncgrad.bench.records import b5_record
from asyncgrad.rpc import Agent
from asyncgrad.tensor import Tensor, tensor

__all__ = [
    "b4_dist_backward_chain",
    "b5_param_server",
    "chain",
    "chain_names",
    "chain_workers",
    "local_chain_backward",
]


def b4_dist_backward_chain(options: Options) -> dict[str, Any]:
    warmup, timed = scale(10, options.quick), scale(50, options.quick)
    names = chain_names(4)
    return drive(options, chain_workers(names), lambda agent: chain(agent, names, warmup, timed))


def chain_names(n: int) -> list[str]:
    return [f"worker{i}" for i in range(1, n + 1)]


def chain_workers(names: list[str]) -> dict[str, list[str]]:
    return {name: ["asyncgrad.workloads.pipeline"] for name in names}


async def chain(
    agent: Agent, names: list[str], warmup: int, timed: int, meter: CpuMeter | None = None
) -> dict[str, Any]:
    """B4's steps through a chain of `names`, each holding a `pipeline.Stage`."""
    x = tensor(np.random.default_rng(0).standard_normal((64, 512), dtype=np.float32))
    stages = [
        await agent.remote(name, "pipeline.Stage", args=(512, 512, 1000 + i))
        for i, name in enumerate(names, start=1)
    ]

    async def step() -> tuple[float, list[float]]:
        async with dist_autograd.context() as ctx:
            h = x
            for stage in stages:
                h = await stage.rpc_async().forward(h)
            loss = h.sum()
            await dist_autograd.backward(ctx, [loss])
            norms = [await stage.rpc_async().grad_norm(ctx) for stage in stages]
        return loss.item(), norms

    for _ in range(warmup):
        await step()
    times = []
    before = await meter.sample() if meter else None
    started = time.perf_counter_ns()
    for _ in range(timed):
        t0 = time.perf_counter_ns()
        loss, norms = await step()
        times.append(time.perf_counter_ns() - t0)
    total = (time.perf_counter_ns() - started) / 1e9
    cpu = (await meter.sample()).since(before, timed, 1e-3) if meter and before else None
    weights = [await stage.rpc_async().weight_data() for stage in stages]
    reference = _local_norms(x, weights)
    ms = sorted(t / 1e6 for t in times)
    figures: dict[str, Any] = {
        "steps_per_s": timed / total,
        "median_ms_per_step": float(np.percentile(ms, 50)),
        "p90_ms_per_step": float(np.percentile(ms, 90)),
        "loss": loss,
        "grad_norms": norms,
        "grad_norm_max_rel_err_vs_local": max(
            abs(a - b) / max(abs(b), 1e-12) for a, b in zip(norms, reference, strict=True)
        ),
    }
    if cpu is not None:
        figures["cpu_ms_per_step"] = cpu
    return {
        "params": {
            "workers": len(names),
            "W": "512x512 f32",
            "x": "64x512 f32",
            "warmup_steps": warmup,
            "timed_steps": timed,
        },
        "figures": figures,
    }


def local_chain_backward(x: Tensor, weights: list[Tensor]) -> None:
    """B4's chain (`tanh(h @ W)` per stage, summed) and its backward, in this process."""
    h = x
    for w in weights:
        h = (h @ w).tanh()
    h.sum().backward()


def _local_norms(x: Tensor, weights: list[np.ndarray]) -> list[float]:
    ws = [tensor(w, requires_grad=True) for w in weights]
    local_chain_backward(x, ws)
    return [float(np.linalg.norm(w.grad)) if w.grad is not None else 0.0 for w in ws]


def b5_param_server(options: Options) -> dict[str, Any]:
    steps, lr = scale(200, options.quick, 20), 0.05
    trainers = ["trainer1", "trainer2"]

    async def body(agent: Agent) -> dict[str, Any]:
        ps = await agent.remote("ps", "ps.ParameterServer", args=((784, 256, 10), 0))
        # Setup (data, parameter references, optimizers) before the clock starts, as the
        # anchor's b5_trainer_setup does.
        runners = [
            await agent.remote(t, "demo.Trainer", args=(ps, 100 + i, steps, lr))
            for i, t in enumerate(trainers)
        ]
        await asyncio.gather(*(r.rpc_async().prepare() for r in runners))
        started = time.perf_counter()
        runs = [r.rpc_async(timeout=600).run() for r in runners]
        results: list[dict[str, list[float]]] = await asyncio.gather(*runs)
        wall = time.perf_counter() - started
        return b5_record(
            trainers,
            steps,
            lr,
            wall,
            [r["losses"] for r in results],
            [[ms / 1000 for ms in r["step_ms"]] for r in results],
        )

    workers = {
        "ps": ["asyncgrad.workloads.param_server"],
        **{t: ["asyncgrad.workloads.demo"] for t in trainers},
    }
    return drive(options, workers, body)
