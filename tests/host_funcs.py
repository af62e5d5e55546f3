"""Exposed functions for the cross-host tests (tests/test_hosts.py), served by worker
processes on simulated hosts."""

from __future__ import annotations

import os
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
