"""A job for `asyncgrad run` tests."""

from __future__ import annotations

from asyncgrad import rpc


async def sum_on_workers(agent: rpc.Agent) -> int:
    values = [await agent.rpc_async(w, "echo", args=(i,)) for i, w in enumerate(["a", "b", "a"])]
    print(f"echoed {len(values)} values")
    return 7
