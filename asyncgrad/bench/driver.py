"""What every RPC workload shares: local workers, a driver agent, a body run against them.

`drive_metered` also hands the body a `CpuMeter`, which reads the CPU time used so far by
the driver, each worker and Redis, so a workload can say where its time went.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from asyncgrad.bench.options import Options
from asyncgrad.local_cluster import LocalCluster
from asyncgrad.rpc import Agent
from asyncgrad.tracing import breakdown, timeline
from asyncgrad.transport.resp import Connection, RedisAddress
from asyncgrad.worker import run_loop

__all__ = ["CpuMeter", "CpuSample", "Usage", "drive", "drive_metered", "parse_info", "scale"]

Body = Callable[[Agent], Awaitable[dict[str, Any]]]
MeteredBody = Callable[[Agent, "CpuMeter"], Awaitable[dict[str, Any]]]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def scale(n: int, quick: bool, minimum: int = 1) -> int:
    """`n`, or about a tenth of it with `--quick` (as the anchor's `--quick` does)."""
    return max(minimum, n // 10) if quick else n


def drive(options: Options, workers: Mapping[str, Sequence[str]], body: Body) -> dict[str, Any]:
    """Start `workers` (and a Redis unless one is given), run `body(driver agent)`."""

    async def plain(cluster: LocalCluster, agent: Agent) -> dict[str, Any]:
        return await body(agent)

    return _in_cluster(options, workers, plain)


def drive_metered(
    options: Options, workers: Mapping[str, Sequence[str]], body: MeteredBody
) -> dict[str, Any]:
    """`drive`, with a `CpuMeter` over the driver, the workers and Redis for the body."""

    async def metered(cluster: LocalCluster, agent: Agent) -> dict[str, Any]:
        assert cluster.redis_url is not None
        pids = {name: process.pid for name, process in cluster.processes.items()}
        async with CpuMeter(cluster.redis_url, pids) as meter:
            return await body(agent, meter)

    return _in_cluster(options, workers, metered)


def _in_cluster(
    options: Options,
    workers: Mapping[str, Sequence[str]],
    body: Callable[[LocalCluster, Agent], Awaitable[dict[str, Any]]],
) -> dict[str, Any]:
    with LocalCluster(workers, options.redis_url, options.namespace) as cluster:

        async def main() -> dict[str, Any]:
            async with Agent("driver", cluster.redis_url, cluster.namespace) as agent:
                result = await body(cluster, agent)
                if options.trace is not None:
                    await _save_last_step(agent, options.trace)
                return result

        result: dict[str, Any] = run_loop(main())
        return result


async def _save_last_step(agent: Agent, path: Path) -> None:
    """The timeline of the workload's last step (if it has steps): `path`.json, and
    `path`.png where matplotlib is installed; where the time of its last 50 steps went:
    `path`.txt."""
    trace = await agent.trace()
    last = timeline.window(trace, 1)
    if not any(e.get("cat") == "step" for e in last):
        return
    path.with_suffix(".txt").write_text(breakdown.table(timeline.window(trace, 50)) + "\n")
    timeline.save(last, path.with_suffix(".json"))
    if importlib.util.find_spec("matplotlib") is not None:
        timeline.save(last, path.with_suffix(".png"), title=f"{path.name}: one step")


@dataclass(frozen=True)
class Usage:
    """A process's on-CPU time and its time runnable but waiting for a core, in seconds."""

    cpu_s: float
    wait_s: float | None  # None: not readable here (a Redis on another host)


@dataclass(frozen=True)
class CpuSample:
    """What the driver, each worker and Redis have used since they started."""

    wall_s: float
    processes: dict[str, Usage]  # "driver", "redis" and the worker names
    redis_commands: int
    machine_busy_s: float  # all CPUs of the machine, whoever used them (/proc/stat)

    def since(self, before: CpuSample, per: float, unit: float) -> dict[str, Any]:
        """Use between `before` and this sample, in `unit` seconds per `per` calls or steps.

        `cores_busy` is the CPU time of all of them over the wall time: on two cores, 2.0
        is saturation; `machine_cores_busy` is the same for every process on the machine,
        so the difference is what else ran. `runqueue_wait` is time each was ready to run
        but had no core.
        """
        factor = 1 / per / unit
        cpu = {n: (u.cpu_s - before.processes[n].cpu_s) * factor for n, u in self.processes.items()}
        wait = {
            n: (u.wait_s - w) * factor
            for n, u in self.processes.items()
            if u.wait_s is not None and (w := before.processes[n].wait_s) is not None
        }
        workers = [n for n in self.processes if n not in ("driver", "redis")]
        total = sum(cpu.values())
        wall = self.wall_s - before.wall_s
        return {
            "driver": cpu["driver"],
            "workers": sum(cpu[n] for n in workers),
            "redis": cpu["redis"],
            "total": total,
            "each_worker": [cpu[n] for n in workers],
            "cores_busy": total / factor / wall,
            "machine_cores_busy": (self.machine_busy_s - before.machine_busy_s) / wall,
            "runqueue_wait": {
                "driver": wait["driver"],
                "workers": sum(wait[n] for n in workers),
                "redis": wait.get("redis"),
            },
            # minus the meter's own INFO, which the later sample counts
            "redis_commands": (self.redis_commands - before.redis_commands - 1) / per,
        }


class CpuMeter:
    """CPU time of the driver (this process), the worker processes and Redis.

    Processes: /proc/PID/task/*/schedstat, summed over threads: on-CPU and run-queue wait
    in ns (the clock that /proc/PID/stat's utime + stime are cut from, without its 10 ms
    ticks). Redis's CPU is what it reports itself (`INFO`: used_cpu_user + used_cpu_sys,
    getrusage of the server), so a Redis on another host works too; its run-queue wait
    only when its `process_id` is a redis-server on this machine.
    """

    def __init__(self, redis_url: str, worker_pids: Mapping[str, int]) -> None:
        self.redis_url = redis_url
        self.worker_pids = dict(worker_pids)
        self._conn: Connection | None = None

    async def __aenter__(self) -> Self:
        address = RedisAddress.from_url(self.redis_url)
        self._conn = await Connection.open(address, name="asyncgrad:bench-meter")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def sample(self) -> CpuSample:
        assert self._conn is not None, "use CpuMeter in `async with`"
        info = parse_info(await self._conn.execute("INFO"))
        redis_pid = int(info["process_id"])
        local = _is_redis_server(redis_pid)
        processes = {
            "driver": process_usage(os.getpid()),
            "redis": Usage(
                float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
                process_usage(redis_pid).wait_s if local else None,
            ),
        }
        processes.update({name: process_usage(pid) for name, pid in self.worker_pids.items()})
        return CpuSample(
            time.perf_counter(), processes, int(info["total_commands_processed"]), machine_busy_s()
        )


def process_usage(pid: int) -> Usage:
    """On-CPU and run-queue time of a live process, all its threads, from /proc."""
    cpu_ns = wait_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            on_cpu, waiting, _ = (task / "schedstat").read_text().split()
            cpu_ns, wait_ns = cpu_ns + int(on_cpu), wait_ns + int(waiting)
    return Usage(cpu_ns / 1e9, wait_ns / 1e9)


def machine_busy_s() -> float:
    """CPU seconds all cores of this machine have spent busy since boot (not idle, iowait
    or stolen by the hypervisor)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[1:8])
    return (user + nice + system + irq + softirq) / _CLOCK_TICKS


def _is_redis_server(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().startswith("redis-server")
    except OSError:
        return False


def parse_info(reply: bytes) -> dict[str, str]:
    """The `field: value` lines of an `INFO` reply."""
    pairs = (line.split(":", 1) for line in reply.decode().splitlines() if ":" in line)
    return {key: value for key, value in pairs}
