"""A job for `asyncgrad run` tests."""

from __future__ import annotations

from asyncgrad import rpc


async def sum_on_workers(agent: rpc.Agent) -> int:
    values = [await agent.rpc_async(w, "echo", args=(i,)) for i, w in enumerate(["a", "b", "a"])]
    print(f"echoed {len(values)} values")
    return 7


def sync_job(agent: rpc.Agent) -> int:
    """A plain function: `asyncgrad run` calls it with the agent too."""
    print(f"plain job on agent {agent.name}")
    return 3


def returns_text(agent: rpc.Agent) -> str:
    return "done"


async def waits_for_nobody(agent: rpc.Agent) -> None:
    from asyncgrad.workloads.demo import wait_for_workers

    await wait_for_workers(agent, ["nobody", "noone"], timeout=0.5)


NOT_A_FUNCTION = 5
