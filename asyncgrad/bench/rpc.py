"""B1-B3: RPC latency, throughput and bandwidth against one echo worker (docs/BENCH.md)."""

from __future__ import annotations

import asyncio
import collections
import statistics
import time
from typing import Any

import numpy as np

from asyncgrad.bench.driver import CpuMeter, drive, scale
from asyncgrad.bench.options import Options
from asyncgrad.bench.records import b1_record, b2_params
from asyncgrad.bench.redis_memory import MemoryPeak
from asyncgrad.rpc import Agent
from asyncgrad.tensor import Tensor, tensor

__all__ = [
    "b1_latency",
    "b2_throughput",
    "b3_bandwidth",
    "b3_sizes",
    "echo_bandwidth",
    "throughput",
]

ECHO = {"worker1": ["asyncgrad.workloads.echo"]}


def b1_latency(options: Options) -> dict[str, Any]:
    calls, warmup = scale(5000, options.quick), scale(200, options.quick)
    x = tensor(np.arange(16, dtype=np.float32))

    async def body(agent: Agent) -> dict[str, Any]:
        for _ in range(warmup):
            await agent.rpc_async("worker1", "echo", args=(x,))
        latencies = []
        clock = time.perf_counter_ns
        for _ in range(calls):
            t0 = clock()
            out = await agent.rpc_async("worker1", "echo", args=(x,))
            latencies.append(clock() - t0)
        assert np.array_equal(out.data, x.data)
        return b1_record(calls, warmup, latencies)

    return drive(options, ECHO, body)


def b2_throughput(options: Options) -> dict[str, Any]:
    return drive(options, ECHO, lambda agent: throughput(agent, ["worker1"], options.quick))


async def throughput(
    agent: Agent, targets: list[str], quick: bool, meter: CpuMeter | None = None
) -> dict[str, Any]:
    """B2 against `targets`: call i goes to `targets[i % len(targets)]`."""
    calls, window, warmup = scale(20000, quick), 256, scale(1000, quick)
    x = tensor(np.arange(16, dtype=np.float32))

    async def run(count: int) -> None:
        inflight: collections.deque[asyncio.Future[Any]] = collections.deque()
        for i in range(count):
            if len(inflight) >= window:
                await inflight.popleft()
            target = targets[i % len(targets)]
            inflight.append(asyncio.ensure_future(agent.rpc_async(target, "echo", args=(x,))))
        while inflight:
            await inflight.popleft()

    await run(warmup)
    before = await meter.sample() if meter else None
    t0 = time.perf_counter()
    await run(calls)
    elapsed = time.perf_counter() - t0
    figures: dict[str, Any] = {"calls_per_s": calls / elapsed, "elapsed_s": elapsed}
    if meter and before:
        figures["cpu_us_per_call"] = (await meter.sample()).since(before, calls, 1e-6)
    return {
        "params": b2_params(calls, window, warmup),
        "figures": figures,
    }


def b3_bandwidth(options: Options) -> dict[str, Any]:
    return drive(options, ECHO, lambda agent: echo_bandwidth(agent, options.quick))


def b3_sizes(quick: bool) -> list[tuple[str, int, int]]:
    """B3's echoes: (label, bytes, timed reps) of each size, each after one warm-up."""
    return [("1MiB", 1 << 20, scale(20, quick, 2)), ("64MiB", 64 << 20, scale(5, quick, 1))]


async def echo_bandwidth(agent: Agent, quick: bool) -> dict[str, Any]:
    """B3's echoes against worker1 (B3x's too), and what they cost Redis in memory."""
    out: dict[str, Any] = {
        "params": {
            "sizes": {},
            "GB": "1e9 bytes; GB/s = 2*size*reps/total_time",
            "warmup_reps": 1,
        },
        "figures": {},
    }
    rng = np.random.default_rng(0)
    async with MemoryPeak(agent.redis_url) as peak:
        for label, nbytes, reps in b3_sizes(quick):
            t = tensor(rng.standard_normal(nbytes // 4, dtype=np.float32))
            echoed: Tensor = await agent.rpc_async("worker1", "echo", args=(t,))  # warm-up
            per = []
            t_all = time.perf_counter_ns()
            for _ in range(reps):
                t0 = time.perf_counter_ns()
                echoed = await agent.rpc_async("worker1", "echo", args=(t,))
                per.append(time.perf_counter_ns() - t0)
            total = (time.perf_counter_ns() - t_all) / 1e9
            assert np.array_equal(echoed.data, t.data)
            out["params"]["sizes"][label] = {"bytes": nbytes, "reps": reps}
            out["figures"][f"GBps_{label}"] = 2 * nbytes * reps / total / 1e9
            out["figures"][f"median_ms_per_echo_{label}"] = statistics.median(per) / 1e6
    out["params"]["redis_peak"] = peak.method
    if peak.mib is not None:
        out["figures"]["redis_peak_MiB"] = peak.mib
    return out
