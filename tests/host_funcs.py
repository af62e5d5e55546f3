"""Exposed functions for the cross-host tests (tests/test_hosts.py), served by worker
processes on simulated hosts."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from asyncgrad import rpc


@rpc.expose(name="hosts.network")
def network() -> int:
    """This process's network namespace (its inode): which host it runs on."""
    return os.stat("/proc/self/ns/net").st_ino


@rpc.expose(name="hosts.pass_on")
async def pass_on(value: Any, to: str) -> Any:
    """`value` echoed by worker `to`: a round trip between two workers' hosts."""
    return await rpc.rpc_async(to, "echo", args=(value,))


@rpc.expose(name="hosts.data_plane_stats")
def data_plane_stats() -> dict[str, int]:
    """This worker's data plane counters (`Agent.data_plane_stats`)."""
    return rpc.current_agent().data_plane_stats()


@rpc.expose(name="hosts.ones")
def ones(count: int) -> np.ndarray:
    """`count` float32 ones: a large result from a small call."""
    return np.ones(count, dtype=np.float32)


def clock_truth() -> int:
    """The true offset from this process's monotonic clock to Redis's (ns): every simulated
    host shares one kernel, so Redis's `TIME` (CLOCK_REALTIME) is this process's
    `time.time_ns()`. The realtime read between two monotonic ones, from the tightest of a
    few tries: right to ~0.1 µs."""
    _gap, truth = min(
        (m1 - m0, realtime - (m0 + m1) // 2)
        for m0, realtime, m1 in (
            (time.monotonic_ns(), time.time_ns(), time.monotonic_ns()) for _ in range(9)
        )
    )
    return truth


@rpc.expose(name="hosts.clock_truth")
def clock_truth_here() -> int:
    """`clock_truth()` in this worker's process."""
    return clock_truth()


@rpc.expose(name="hosts.busy")
def busy(seconds: float) -> int:
    """Hold the event loop (and the GIL) in pure Python for `seconds`: a worker computing."""
    until, rounds = time.monotonic() + seconds, 0
    while time.monotonic() < until:
        rounds += 1
    return rounds
