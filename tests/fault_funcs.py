"""Exposed functions for the fault tests (`asyncgrad worker W --import tests.fault_funcs`).

A holder keeps an RRef to a `Counter` on another worker (`keep`) and uses it (`use`); a
call that must not run twice records each run in a Redis list (`record`); a call that
stops half-way waits on a Redis list, on a connection a test can find by its name
(`hold`); `GatedSGD` is an optimizer whose step does the same.
"""

from __future__ import annotations

import os
from typing import Any

import redis

from asyncgrad import optim, rpc
from asyncgrad.errors import RRefReleased
from asyncgrad.graph import Array
from asyncgrad.tensor import Tensor
from asyncgrad.transport.cluster import connect
from asyncgrad.transport.resp import RedisAddress

_KEPT: dict[str, rpc.RRef[Any]] = {}  # per holder agent


@rpc.expose(name="fault.Counter")
class Counter:
    def __init__(self, n: int = 0) -> None:
        self.n = n
        self.helper = lambda: "an instance attribute, not a method"

    def add(self, k: int) -> int:
        self.n += k
        return self.n


@rpc.expose(name="fault.echo")
def echo(value: Any) -> Any:
    return value


@rpc.expose(name="fault.keep")
async def keep(owner: str) -> int:
    """Make a `Counter` on `owner` and hold an RRef to it here."""
    agent = rpc.current_agent()
    rref = await agent.remote(owner, Counter, args=(0,))
    _KEPT[agent.name] = rref
    return rref.id


@rpc.expose(name="fault.use")
async def use() -> tuple[Any, ...]:
    """Add 1 through the RRef held here: ("ok", n), or what RRefReleased said."""
    try:
        return ("ok", await _KEPT[rpc.current_agent().name].rpc_async().add(1))
    except RRefReleased as e:
        return ("released", str(e), e.may_have_run, isinstance(e, LookupError))


@rpc.expose(name="fault.owned")
def owned() -> int:
    """How many values the agent serving this owns."""
    return len(rpc.current_agent().references.owned)


async def _redis() -> Any:
    return await connect(RedisAddress.from_url(rpc.current_agent().redis_url))


@rpc.expose(name="fault.record")
async def record(key: str, value: int) -> int:
    """Push `value` to list `key` (each run of the call leaves its trace), return it."""
    conn = await _redis()
    try:
        await conn.execute("RPUSH", key, value)
    finally:
        conn.close()
    return value


@rpc.expose(name="fault.hold")
async def hold(started: str, release: str, value: Any = None) -> Any:
    """Push to list `started`, then wait on list `release` on a connection named
    `release` (a test ends the wait with an item, or with CLIENT UNBLOCK); return value."""
    conn = await _redis()
    try:
        await conn.execute("CLIENT", "SETNAME", release)
        await conn.execute("RPUSH", started, os.getpid())
        await conn.execute("BLPOP", release, 0)
        return value
    finally:
        conn.close()


@rpc.expose(name="fault.GatedSGD")
class GatedSGD(optim.SGD):
    """SGD whose step first pushes to list `gate:started`, then waits for `gate:release`
    (blocking this worker's event loop, as a long step does)."""

    def step(self, grads: dict[Tensor, Array] | None = None) -> None:
        client = redis.Redis.from_url(rpc.current_agent().redis_url)
        prefix = rpc.current_agent().namespace
        try:
            client.rpush(f"{prefix}:gate:started", os.getpid())
            client.blpop([f"{prefix}:gate:release"], 0)
        finally:
            client.close()
        super().step(grads)
