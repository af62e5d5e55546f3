"""What every RPC workload shares: local workers, a driver agent, a body run against them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from asyncgrad.bench.options import Options
from asyncgrad.local_cluster import LocalCluster
from asyncgrad.rpc import Agent
from asyncgrad.worker import run_loop

__all__ = ["drive", "scale"]

Body = Callable[[Agent], Awaitable[dict[str, Any]]]


def scale(n: int, quick: bool, minimum: int = 1) -> int:
    """`n`, or about a tenth of it with `--quick` (as the anchor's `--quick` does)."""
    return max(minimum, n // 10) if quick else n


def drive(options: Options, workers: Mapping[str, Sequence[str]], body: Body) -> dict[str, Any]:
    """Start `workers` (and a Redis unless one is given), run `body(driver agent)`."""
    with LocalCluster(workers, options.redis_url, options.namespace) as cluster:

        async def main() -> dict[str, Any]:
            async with Agent("driver", cluster.redis_url, cluster.namespace) as agent:
                return await body(agent)

        result: dict[str, Any] = run_loop(main())
        return result
