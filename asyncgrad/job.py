"""`asyncgrad run` and `asyncgrad demo`: a job coroutine on its own agent, local workers too."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from asyncgrad.local_cluster import LocalCluster
from asyncgrad.rpc import Agent
from asyncgrad.worker import import_modules, run_loop

__all__ = ["DEMO_WORKERS", "parse_spawns", "run_demo", "run_job"]

DEMO_WORKERS = {
    "ps": ["asyncgrad.workloads.param_server"],
    "trainer1": ["asyncgrad.workloads.demo"],
    "trainer2": ["asyncgrad.workloads.demo"],
}


def parse_spawns(specs: Sequence[str]) -> dict[str, list[str]]:
    """`["ps=asyncgrad.workloads.param_server", "t1=a,b"]` -> `{"ps": [...], "t1": ["a", "b"]}`."""
    spawns: dict[str, list[str]] = {}
    for spec in specs:
        name, _, modules = spec.partition("=")
        if not name or not modules:
            raise ValueError(f"--spawn takes NAME=MODULE[,MODULE], not {spec!r}")
        spawns[name] = [m for m in modules.split(",") if m]
    return spawns


def run_job(
    module: str,
    function: str,
    redis_url: str | None,
    namespace: str | None,
    name: str,
    spawns: Mapping[str, Sequence[str]],
    **job_kwargs: Any,
) -> int:
    """Start the spawned workers, run `function(agent, **job_kwargs)`, stop everything.

    The exit code is what the job returns if it is an int, else 0.
    """
    import_modules([module])
    job = getattr(importlib.import_module(module), function)
    cluster = LocalCluster(spawns, redis_url)
    if namespace:
        cluster.namespace = namespace
    with cluster:

        async def main() -> Any:
            async with Agent(name, cluster.redis_url, cluster.namespace) as agent:
                return await job(agent, **job_kwargs)

        result = run_loop(main())
    return result if isinstance(result, int) else 0


def run_demo(redis_url: str | None, namespace: str | None, steps: int) -> int:
    """The whole main job on an embedded Redis (or `redis_url`), with no setup."""
    return run_job(
        "asyncgrad.workloads.demo", "main", redis_url, namespace, "job", DEMO_WORKERS, steps=steps
    )
