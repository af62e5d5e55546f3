"""Exposed functions for the process-level tests (`asyncgrad worker W --import tests.worker_funcs`).

Cross-process gates go through Redis lists, so a test waits on an event (BLPOP), never on
a timer: `hold` pushes to `started` once it runs, then waits for an item on `release`
(or, with no `release` key, forever).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from asyncgrad import rpc
from asyncgrad.transport.cluster import connect
from asyncgrad.transport.resp import RedisAddress


@rpc.expose(name="test.echo")
def echo(value: Any) -> Any:
    """`value` as received."""
    return value


@rpc.expose(name="test.whoami")
def whoami() -> tuple[str, str, int]:
    """The namespace and name of the agent serving this call, and its process id."""
    agent = rpc.current_agent()
    return agent.namespace, agent.name, os.getpid()


@rpc.expose(name="test.hold")
async def hold(started: str, release: str | None, value: Any = None) -> Any:
    """Push to list `started`, then wait for an item on list `release` (None: forever)."""
    address = RedisAddress.from_url(rpc.current_agent().redis_url)
    conn = await connect(address)
    try:
        await conn.execute("RPUSH", started, os.getpid())
        if release is None:
            await asyncio.Event().wait()  # never set: only a kill or a cancel ends this
        else:
            await conn.execute("BLPOP", release, 0)
        return value
    finally:
        conn.close()
