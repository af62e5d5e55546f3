"""Exposed functions for the data plane's fault and security tests
(`asyncgrad worker W --import tests.data_fault_funcs`).

Arrays of `BIG` elements are far above the inline limit, so they travel by the data plane.
`pattern_after` makes one on the worker once a test lets it (a Redis list, as
`fault.hold`); `echo_recorded` leaves a trace of each run; `call` makes a call from the
worker and returns how it ended, so that a test can freeze or kill either end of that
call; `block` holds the worker's event loop (its heartbeat thread beats on); `stats` is
the worker's `data_plane_stats()`.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import numpy as np
import redis

from asyncgrad import rpc
from asyncgrad.errors import AsyncgradError
from asyncgrad.transport.cluster import connect
from asyncgrad.transport.resp import RedisAddress

BIG = 1 << 20  # float64 elements: 8 MiB, 32 times the default inline limit


def pattern(seed: int, n: int = BIG) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Values no two seeds share, so that a mixed-up or partly written frame shows."""
    return np.random.default_rng(seed).standard_normal(n)


def digest(value: Any) -> str:
    """What an array is, exactly: dtype, shape and every byte."""
    array = np.asarray(value)
    h = hashlib.sha256(f"{array.dtype.str} {array.shape}".encode())
    h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()


@rpc.expose(name="data.pattern_after")
async def pattern_after(started: str, release: str, seed: int) -> Any:
    """Push this pid to list `started`, wait for an item in list `release`, then return
    `pattern(seed)`: the reply is large, and leaves when the test says."""
    conn = await connect(RedisAddress.from_url(rpc.current_agent().redis_url))
    try:
        await conn.execute("RPUSH", started, os.getpid())
        await conn.execute("BLPOP", release, 0)
    finally:
        conn.close()
    return pattern(seed)


@rpc.expose(name="data.echo_recorded")
async def echo_recorded(runs: str, value: Any) -> Any:
    """Push the digest of `value` to list `runs` (each run leaves its trace), return it."""
    conn = await connect(RedisAddress.from_url(rpc.current_agent().redis_url))
    try:
        await conn.execute("RPUSH", runs, digest(value))
    finally:
        conn.close()
    return value


@rpc.expose(name="data.block")
async def block(started: str, release: str) -> None:
    """Push to `started`, then block this worker's event loop until an item is in
    `release`. The push is awaited first: meanwhile the reader asks Redis for the next
    entries, so what arrives in the inbox while the loop is blocked counts as taken."""
    agent = rpc.current_agent()
    conn = await connect(RedisAddress.from_url(agent.redis_url))
    try:
        await conn.execute("RPUSH", started, os.getpid())
    finally:
        conn.close()
    client = redis.Redis.from_url(agent.redis_url)
    try:
        client.blpop([release], 0)
    finally:
        client.close()


@rpc.expose(name="data.call")
async def call(
    to: str, fn: str, args: tuple[Any, ...], big_seed: int | None = None
) -> dict[str, Any]:
    """Call `fn(*args)` on `to` from this worker (with `pattern(big_seed)` as a last
    argument, if given: made here, so it leaves from here): `ok` and the result's
    `digest`, or the error's type, `may_have_run` and message; `elapsed` s either way."""
    if big_seed is not None:
        args = (*args, pattern(big_seed))
    began = time.monotonic()
    try:
        value = await rpc.current_agent().rpc_async(to, fn, args=args)
    except AsyncgradError as e:
        return {
            "ok": False,
            "error": type(e).__name__,
            "may_have_run": getattr(e, "may_have_run", None),
            "message": str(e),
            "elapsed": time.monotonic() - began,
        }
    return {"ok": True, "digest": digest(value), "elapsed": time.monotonic() - began}


@rpc.expose(name="data.stats")
def stats() -> dict[str, int]:
    return rpc.current_agent().data_plane_stats()
