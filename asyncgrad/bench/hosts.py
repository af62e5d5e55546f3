"""B3x: B3's echo between two simulated hosts, beside a raw TCP echo of the same bytes
over the same link (docs/BENCH.md).

Host 0 holds Redis and the driver (this process's thread, entered there), host 1 the echo
worker and the raw TCP echo server; one veth pair joins them (asyncgrad.simulated_hosts).
Redis is always an embedded one on host 0, whatever `--redis` says: it must sit on a host.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from asyncgrad.bench import raw_tcp
from asyncgrad.bench.options import Options
from asyncgrad.bench.rpc import ECHO, b3_sizes, echo_bandwidth
from asyncgrad.local_cluster import LocalCluster
from asyncgrad.rpc import Agent
from asyncgrad.simulated_hosts import SimulatedHosts
from asyncgrad.worker import run_loop

__all__ = ["b3x_bandwidth_hosts"]


def b3x_bandwidth_hosts(options: Options) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        here, there = stack.enter_context(SimulatedHosts(2))
        server = stack.enter_context(here.redis(os.environ.get("ASYNCGRAD_REDIS_SERVER")))
        stack.enter_context(here.entered())
        prefix = {"worker1": there.prefix}
        stack.enter_context(
            LocalCluster(ECHO, server.url, options.namespace, command_prefix=prefix)
        )

        async def main() -> dict[str, Any]:
            async with Agent("driver", server.url, options.namespace) as agent:
                return await echo_bandwidth(agent, options.quick)

        record: dict[str, Any] = run_loop(main())
        echo_server = stack.enter_context(raw_tcp.EchoServer(there))
        sizes = b3_sizes(options.quick)
        raw = raw_tcp.echo_bandwidth(there.address, echo_server.port, sizes)
    figures = record["figures"]
    figures.update(raw)
    for label, _, _ in sizes:
        figures[f"vs_raw_tcp_{label}"] = figures[f"GBps_{label}"] / raw[f"raw_tcp_GBps_{label}"]
    record["params"].update(
        hosts="2 network namespaces joined by one veth pair (MTU 1500)",
        placement="host 0: Redis (embedded) and the driver; host 1: worker1 (echo)",
        raw_tcp="one TCP connection from host 0 to a plain socket echo server on host 1; "
        "each message received whole into a fresh numpy array and sent from it",
    )
    return record
