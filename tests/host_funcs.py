"""Exposed functions for the cross-host tests (tests/test_hosts.py), served by worker
processes on simulated hosts."""

from __future__ import annotations

import os
from typing import Any

from asyncgrad import rpc


@rpc.expose(name="hosts.network")
def network() -> int:
    """This process's network namespace (its inode): which host it runs on."""
    return os.stat("/proc/self/ns/net").st_ino


@rpc.expose(name="hosts.pass_on")
async def pass_on(value: Any, to: str) -> Any:
    """`value` echoed by worker `to`: a round trip between two workers' hosts."""
    return await rpc.rpc_async(to, "echo", args=(value,))
