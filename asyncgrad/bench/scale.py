"""`asyncgrad bench --scale`: B2 with 1, 2, 4 and 8 echo workers, B4 with chains of 2, 4
and 8, each with the CPU time the driver, the workers and Redis spent per call or step.

One record per configuration, named `B2_throughput_scale` or
`B4_dist_backward_chain_scale`, with `params.workers`. B4's records also carry what the
same chain costs computed in one process on one thread (`compute_ms_per_step`), so the
rest of a step is the price of distributing it.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from asyncgrad.bench.autograd import chain, chain_names, chain_workers, local_chain_backward
from asyncgrad.bench.driver import drive_metered, scale
from asyncgrad.bench.options import Options
from asyncgrad.bench.rpc import throughput
from asyncgrad.local_cluster import one_thread_env
from asyncgrad.tensor import tensor

__all__ = ["B2_WORKERS", "B4_CHAINS", "SCALED", "jobs"]

B2_WORKERS = (1, 2, 4, 8)
B4_CHAINS = (2, 4, 8)

Workload = Callable[[Options], dict[str, Any]]

_CPU = (
    "CPU time used over the timed section per call (step), by process: driver and workers "
    "from /proc/PID/task/*/schedstat, Redis from its INFO (used_cpu_user + used_cpu_sys); "
    "runqueue_wait: time ready to run but without a core, same unit; cores_busy: all their "
    "CPU time / wall time (2 cores: 2.0 is saturation), machine_cores_busy the same for all "
    "processes of the machine (/proc/stat); redis_commands: commands per call (step)"
)


SCALED = ("B2_throughput", "B4_dist_backward_chain")


def jobs(bases: list[str]) -> list[tuple[str, Workload]]:
    """The scale points of the workloads in `bases`; ValueError for one with none."""
    if unscaled := [name for name in bases if name not in SCALED]:
        raise ValueError(f"--scale covers B2 and B4 only, not {', '.join(unscaled)}")
    points: list[tuple[str, Workload]] = []
    if "B2_throughput" in bases:
        points += [("B2_throughput_scale", functools.partial(b2_at, workers=n)) for n in B2_WORKERS]
    if "B4_dist_backward_chain" in bases:
        points += [
            ("B4_dist_backward_chain_scale", functools.partial(b4_at, workers=n)) for n in B4_CHAINS
        ]
    return points


def b2_at(options: Options, workers: int) -> dict[str, Any]:
    names = [f"worker{i}" for i in range(1, workers + 1)]
    record = drive_metered(
        options,
        {name: ["asyncgrad.workloads.echo"] for name in names},
        lambda agent, meter: throughput(agent, names, options.quick, meter),
    )
    record["params"].update(
        workers=workers,
        spread=f"call i (warm-up and timed alike) goes to worker{{i % {workers} + 1}}; the one "
        f"window of 256 spans all workers, so each has about {256 // workers} in flight",
        cpu=f"cpu_us_per_call: {_CPU}",
    )
    return record


def b4_at(options: Options, workers: int) -> dict[str, Any]:
    warmup, timed = scale(10, options.quick), scale(50, options.quick)
    names = chain_names(workers)
    record = drive_metered(
        options,
        chain_workers(names),
        lambda agent, meter: chain(agent, names, warmup, timed, meter),
    )
    compute_steps = scale(30, options.quick, 3)
    record["figures"]["compute_ms_per_step"] = _compute_in_child(workers, compute_steps)
    record["params"].update(
        cpu=f"cpu_ms_per_step: {_CPU}",
        compute=f"compute_ms_per_step: the same {workers}-stage forward + backward in one "
        f"process on one thread, no RPC; median of {compute_steps} steps after 3 warm-up",
    )
    return record


def compute_ms_per_step(stages: int, steps: int) -> float:
    """Median ms of the chain's forward + backward with local autograd (no RPC)."""
    rng = np.random.default_rng(0)
    x = tensor(rng.standard_normal((64, 512), dtype=np.float32))
    weights = [
        tensor(rng.standard_normal((512, 512), dtype=np.float32) / 512**0.5, requires_grad=True)
        for _ in range(stages)
    ]

    def step() -> None:
        for w in weights:
            w.grad = None
        local_chain_backward(x, weights)

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter_ns()
        step()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e6


def _compute_in_child(stages: int, steps: int) -> float:
    # A fresh interpreter: BLAS fixes its thread count when numpy is first imported.
    argv = [sys.executable, "-m", "asyncgrad.bench.scale", str(stages), str(steps)]
    done = subprocess.run(
        argv, env=one_thread_env(), capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"compute child failed ({done.returncode}): {done.stderr[-400:]}")
    return float(json.loads(done.stdout))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one compute_ms_per_step (asyncgrad bench)")
    parser.add_argument("stages", type=int)
    parser.add_argument("steps", type=int)
    args = parser.parse_args()
    print(json.dumps(compute_ms_per_step(args.stages, args.steps)))
