"""`asyncgrad bench --soak`: B5's job for 10,000 steps, once undisturbed and once under chaos.

The job is docs/BENCH.md's B5 setup (a parameter server and two trainers as `asyncgrad worker`
processes, the MLP 784-256-10, `DistributedOptimizer` SGD) with the `soak.Trainer` of
workers/soak.py, whose every step has a deadline and is retried, boundedly, when it fails.
The job keeps a checkpoint of the model (every twentieth of the run, at least 50 steps).

- `soak`: after setup and warm-up, and again at the end, once the streams are empty and
  Redis holds still: Redis `used_memory` must come back to its baseline (within 1 MiB),
  and no worker's RSS may grow by 20 MiB or more. Tracing stays on: each agent's ring of
  spans fills and then turns over (`spans`: recorded, kept, capacity), and at rest no
  worker may hold a span open (one that never ends would show in every trace).
- `chaos`: the same job, during which the parameter server is SIGKILLed and restarted (the
  job restores the model from its checkpoint and rebinds the trainers to it), then Redis is
  stopped and a new, empty one started at the same address. Every step must still finish;
  the figures say which errors the steps saw, how many were retried, how long each
  recovery took.
- `faults`: the same job through every fault README's failure semantics speak of, none of
  which may free state or apply a step twice: a trainer, then the parameter server,
  frozen for 10 s (SIGSTOP), `CLIENT PAUSE 4000 WRITE`, `DEBUG SLEEP 3`, Redis at
  `maxmemory` for 2 s, and malformed reply-kind messages in every inbox.

In every run, the steps the parameter server applied for each trainer must equal the
steps that succeeded there: a step whose update may have run is completed in its own
context (workloads/soak.py), which the server applies once.

Why the parameter server is the worker killed: it is the one whose loss the job must
notice and repair (its model is gone: restored from the checkpoint, and both trainers
must be pointed at the new one), and both trainers' step loops see the failure. A dead
trainer only takes its own step loop with it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from asyncgrad.bench.driver import parse_info
from asyncgrad.bench.options import Options, Progress
from asyncgrad.embedded import find_redis_server, redis_version
from asyncgrad.errors import ContextError, OutcomeUnknown, RpcError, TransportError
from asyncgrad.local_cluster import LocalCluster
from asyncgrad.rpc import Agent, RRef, expose
from asyncgrad.rpc.server import TRACE
from asyncgrad.transport import GROUP, inbox
from asyncgrad.transport.resp import Connection, RedisAddress, ReplyError
from asyncgrad.worker import run_loop

__all__ = ["CHAOS", "FAULTS", "Fault", "SoakFailed", "chaos", "faults", "soak", "soak_job"]

SOAK_STEPS = 10_000  # parameter-server steps, over both trainers
QUICK_STEPS = 1_000
SIZES = (784, 256, 10)
TRAINERS = ("trainer1", "trainer2")
WORKERS = {
    "ps": ["asyncgrad.workloads.param_server"],
    **{t: ["asyncgrad.workloads.soak"] for t in TRAINERS},
}
REDIS_BOUND = 1 << 20  # bytes used_memory may differ from its baseline
RSS_BOUND = 20 << 20  # bytes an RSS may grow
STEP_TIMEOUT = 10.0
SETTLE_TIMEOUT = 30.0
RETRYABLE = (RpcError, TransportError, ContextError)
T = TypeVar("T")
Injector = Callable[["Fault"], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Fault:
    """Injected once `at` (a fraction) of the run's steps are done: `kill` SIGKILLs worker
    `target` and starts it again; `redis` stops Redis for `downtime` s and starts an empty
    one at the same address; `stop` freezes worker `target` (SIGSTOP) for `downtime` s;
    `pause` is `CLIENT PAUSE` of writes, `sleep` `DEBUG SLEEP`, both for `downtime` s;
    `oom` sets `maxmemory` below what Redis uses for `downtime` s; `garbage` writes a
    malformed reply-kind message into every agent's inbox."""

    at: float
    kind: str
    target: str = ""
    downtime: float = 1.0


CHAOS = (Fault(0.3, "kill", "ps"), Fault(0.65, "redis"))
FAULTS = (
    Fault(0.12, "stop", "trainer1", 10.0),
    Fault(0.26, "stop", "ps", 10.0),
    Fault(0.40, "pause", downtime=4.0),
    Fault(0.54, "sleep", downtime=3.0),
    Fault(0.68, "oom", downtime=2.0),
    Fault(0.82, "garbage"),
)
# A REPLY whose context record is a string: dead-lettered alone.
_GARBAGE = {b"m": b"\x84\xa1k\x02\xa1i\x01\xa1s\xa1x\xa1c\xa7context", b"f": b"\x80"}


class SoakFailed(RuntimeError):
    """A check of the soak failed (the figures say which)."""


def soak(options: Options) -> dict[str, Any]:
    """The long run, undisturbed: memory must come back to where it was, no step may fail."""
    return soak_job(
        _steps(options),
        (),
        options.redis_url,
        options.namespace,
        options.failure_timeout,
        progress=options.progress,
        label="S1",
    )


def chaos(options: Options) -> dict[str, Any]:
    """The same job with a worker killed and Redis restarted (always an embedded Redis of its
    own: the one restarted)."""
    return soak_job(
        _steps(options),
        CHAOS,
        None,
        options.namespace,
        options.failure_timeout,
        progress=options.progress,
        label="S2",
    )


def faults(options: Options) -> dict[str, Any]:
    """The same job through freezes, stalls, a full Redis and garbage (an embedded Redis of
    its own, which takes `DEBUG`: Redis 7 only when told so, 6.2 always)."""
    server = find_redis_server(os.environ.get("ASYNCGRAD_REDIS_SERVER"))
    debug = ("--enable-debug-command", "local") if redis_version(server) >= (7, 0) else ()
    return soak_job(
        _steps(options),
        FAULTS,
        None,
        options.namespace,
        options.failure_timeout,
        server_options=debug,
        progress=options.progress,
        label="S3",
    )


def _steps(options: Options) -> int:
    return options.soak_steps or (QUICK_STEPS if options.quick else SOAK_STEPS)


def soak_job(
    steps: int,
    faults: Sequence[Fault] = (),
    redis_url: str | None = None,
    namespace: str | None = None,
    failure_timeout: float = 5.0,
    warmup: int | None = None,
    workers: dict[str, list[str]] | None = None,
    server_options: tuple[str, ...] = (),
    inject: Injector | None = None,
    progress: Progress | None = None,
    label: str = "soak",
) -> dict[str, Any]:
    """Run the job for `steps` parameter-server steps (half per trainer), injecting `faults`.

    Returns the bench record: `ok` (every check held), `params`, `figures`, `violations`.
    `workers` overrides the modules each worker imports (a test swaps in a leaky one);
    `inject` does the faults of kinds this module does not know (a test's Redis Cluster
    failover), returning what to record of each. `progress` hears what the job is doing
    (`label: ...`), and, always, each fault before it is injected.
    """
    per_trainer = steps // len(TRAINERS)
    warmup = min(200, max(20, per_trainer // 5)) if warmup is None else warmup
    cluster = LocalCluster(
        workers or WORKERS,
        redis_url,
        worker_args=("--failure-timeout", str(failure_timeout)),
        server_options=server_options,
    )
    if namespace:
        cluster.namespace = namespace
    say = _Say(progress or Progress(), label)
    where = "an embedded Redis" if redis_url is None else "the given Redis"
    say.step(f"starting ps, {', '.join(TRAINERS)} on {where}")
    with cluster:
        job = _Job(cluster, per_trainer, warmup, faults, failure_timeout, inject, say)
        figures: dict[str, Any] = run_loop(job.run())
    violations = _violations(figures, faults)
    return {
        "ok": not violations,
        "params": {
            "roles": "driver(job), ps, trainer1, trainer2",
            "model": "Linear(784,256)-ReLU-Linear(256,10) on ps",
            "batch": 64,
            "steps": per_trainer * len(TRAINERS),
            "steps_per_trainer": per_trainer,
            "warmup_steps_per_trainer": warmup,
            "optimizer": "DistributedOptimizer(SGD lr=0.05)",
            "step_timeout_s": STEP_TIMEOUT,
            "failure_timeout_s": failure_timeout,
            "checkpoint_every_steps": _checkpoint_every(per_trainer * len(TRAINERS)),
            "faults": [f.__dict__ for f in faults],
            "redis": "embedded" if redis_url is None else redis_url,
        },
        "figures": figures,
        "violations": violations,
    }


def _checkpoint_every(total: int) -> int:
    return max(50, total // 20)


def _violations(figures: dict[str, Any], faults: Sequence[Fault]) -> list[str]:
    found = []
    if figures["steps_done"] != figures["steps"]:
        found.append(f"{figures['steps_done']} of {figures['steps']} steps done")
    for name, counts in figures["steps_applied"].items():
        if counts["applied"] != counts["succeeded"]:
            found.append(
                f"{name}: the server applied {counts['applied']} steps for "
                f"{counts['succeeded']} that succeeded"
            )
    if not faults:
        if figures["failed_attempts"]:
            found.append(f"{figures['failed_attempts']} attempts failed with no fault injected")
        delta = figures["redis_used_memory_delta_bytes"]
        if abs(delta) > REDIS_BOUND:
            found.append(f"Redis used_memory changed by {delta} bytes (bound {REDIS_BOUND})")
        for name, growth in figures["rss_growth_mib"].items():
            if growth * (1 << 20) >= RSS_BOUND:
                found.append(f"{name} RSS grew by {growth:.1f} MiB (bound {RSS_BOUND >> 20})")
    for name, spans in figures.get("spans", {}).items():
        # At rest nothing is in flight on a worker: a span still open there never ends.
        if name != "driver" and spans["open"]:
            found.append(f"{name} has {spans['open']} spans open at rest (never ended)")
    missing = len(faults) - len(figures.get("faults", []))
    if missing:
        found.append(f"{missing} fault(s) never injected")
    return found


@expose(name="soak.Board")
class Board:
    """Where the trainers report their progress (they hold an RRef to it)."""

    def __init__(self, trainers: Sequence[str]) -> None:
        self.done = dict.fromkeys(trainers, 0)
        self.over = False
        self._changed = asyncio.Event()
        self._final: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def report(self, trainer: str, steps: int, final: dict[str, Any] | None = None) -> None:
        """`steps` done by `trainer`; `final`: its run's report, once it is over."""
        self.done[trainer] = max(self.done[trainer], steps)
        self._changed.set()
        if final is not None and not (future := self._final_of(trainer)).done():
            future.set_result(final)

    async def final(self, trainer: str) -> dict[str, Any]:
        """The report `trainer` gives at the end of its run."""
        return await self._final_of(trainer)

    def _final_of(self, trainer: str) -> asyncio.Future[dict[str, Any]]:
        if trainer not in self._final:
            self._final[trainer] = asyncio.get_running_loop().create_future()
        return self._final[trainer]

    def finish(self) -> None:
        self.over = True
        self._changed.set()

    async def reached(self, steps: int) -> bool:
        """Once the trainers did `steps` together (True), or finished short of it (False)."""
        while sum(self.done.values()) < steps:
            if self.over:
                return False
            self._changed.clear()
            await self._changed.wait()
        return True


class _Job:
    """The job's side: setup, the runs, the faults and the repairs, the measurements."""

    def __init__(
        self,
        cluster: LocalCluster,
        steps: int,
        warmup: int,
        faults: Sequence[Fault],
        failure_timeout: float,
        inject: Injector | None = None,
        say: _Say | None = None,
    ) -> None:
        assert cluster.redis_url is not None
        self.cluster, self.steps, self.warmup, self.faults = cluster, steps, warmup, faults
        self.failure_timeout, self.inject = failure_timeout, inject
        self.say = say or _Say(Progress(), "soak")
        self.probe = _Probe(cluster.redis_url)
        self.agent: Agent | None = None
        self.ps: RRef[Any] | None = None
        self.trainers: dict[str, RRef[Any]] = {}
        self.checkpoint: dict[str, Any] = {}
        self.checkpoint_at = 0
        self.injected: list[dict[str, Any]] = []

    async def run(self) -> dict[str, Any]:
        url, namespace = self.cluster.redis_url, self.cluster.namespace
        async with Agent("driver", url, namespace, failure_timeout=self.failure_timeout) as agent:
            self.agent = agent
            try:
                return await self._measured()
            finally:
                await self.probe.aclose()

    async def _measured(self) -> dict[str, Any]:
        agent = self.agent
        assert agent is not None
        self.ps = await agent.remote("ps", "ps.ParameterServer", args=(SIZES, 0))
        for i, name in enumerate(TRAINERS):
            trainer = await agent.remote(name, "soak.Trainer", args=(100 + i,))
            await trainer.rpc_async().bind(self.ps)
            self.trainers[name] = trainer
        await self._save_checkpoint(0)
        self.say.step(f"warm-up, {self.warmup:,} steps per trainer")
        await self._train(self.warmup, Board(TRAINERS), ())
        # Redis's memory is compared only in the run it is not restarted in.
        if not self.faults:
            self.say.step("waiting for Redis's memory to hold still (the baseline)")
        before = None if self.faults else await self._settle()
        rss_before = self._rss()
        board = Board(TRAINERS)
        total = self.steps * len(TRAINERS)
        faults = f", {len(self.faults)} faults on the way" if self.faults else ""
        self.say.step(f"measuring {total:,} steps{faults}")
        started = time.perf_counter()
        reports = await self._train(self.steps, board, self.faults)
        wall = time.perf_counter() - started
        self.say.step(f"{total:,} steps in {wall:.1f} s ({total / wall:,.0f} steps/s)")
        if not self.faults:
            self.say.step("waiting for Redis's memory to hold still again")
        after = None if self.faults else await self._settle()
        rss_after = self._rss()
        figures = self._figures(reports, wall, rss_before, rss_after)
        figures["spans"] = await self._spans(agent)
        figures["steps_applied"] = {
            name: await _retrying(functools.partial(_applied, trainer))
            for name, trainer in self.trainers.items()
        }
        if before is not None and after is not None:
            figures["redis_used_memory_before"] = before
            figures["redis_used_memory_after"] = after
            figures["redis_used_memory_delta_bytes"] = after - before
        return figures

    async def _train(
        self, steps: int, board: Board, faults: Sequence[Fault]
    ) -> dict[str, dict[str, Any]]:
        """Both trainers run `steps` steps; meanwhile checkpoints are taken, faults injected."""
        assert self.agent is not None
        ref = RRef(board)
        # Bounded, never hit in a healthy run: every step of it retried to the limit.
        limit = 120.0 + steps * 0.1

        async def one(name: str) -> dict[str, Any]:
            trainer = self.trainers[name]
            try:
                report: dict[str, Any] = await trainer.rpc_async(timeout=limit).run(
                    steps, ref, step_timeout=STEP_TIMEOUT
                )
            except OutcomeUnknown:
                # The trainer was frozen past the failure window (a `stop` fault): its run
                # goes on once it thaws, and leaves its report on the board.
                async with asyncio.timeout(limit):
                    report = await board.final(name)
            return report

        async def runs() -> list[dict[str, Any]]:
            try:
                return await asyncio.gather(*(one(name) for name in TRAINERS))
            finally:
                board.finish()

        async with asyncio.TaskGroup() as group:
            done = group.create_task(runs())
            group.create_task(self._control(board, steps * len(TRAINERS), faults))
        return dict(zip(TRAINERS, done.result(), strict=True))

    async def _control(self, board: Board, total: int, faults: Sequence[Fault]) -> None:
        """A checkpoint every twentieth of the run; each fault once its time comes."""
        every = _checkpoint_every(total)
        plan: list[tuple[float, Fault | None]] = [(f.at * total, f) for f in faults]
        plan += [(float(n), None) for n in range(every, total, every)]
        started = shown = time.monotonic()
        for at, fault in sorted(plan, key=lambda p: (p[0], p[1] is None)):
            if not await board.reached(int(at)):
                return
            done = sum(board.done.values())
            if fault is None:
                await self._save_checkpoint(done)
                if time.monotonic() - shown >= 3.0:
                    shown = time.monotonic()
                    rate = done / (shown - started)
                    self.say.step(f"{done:,} of {total:,} steps ({rate:,.0f} steps/s)")
            else:
                self.say.notice(f"injecting at step {done:,}: {describe(fault)}")
                began = time.monotonic()
                await self._inject(fault, board)
                what = f"{fault.kind} {fault.target}".rstrip()
                self.say.notice(f"fault over ({what}, {time.monotonic() - began:.1f} s)")
                # Training goes on before the next fault (one that came due meanwhile, as
                # during a 10 s freeze, would else follow at once): each one's figures are
                # its own.
                if not await board.reached(sum(board.done.values()) + max(total // 100, 1)):
                    return

    # *** faults and repairs ***

    async def _inject(self, fault: Fault, board: Board) -> None:
        record: dict[str, Any] = {"kind": fault.kind, "target": fault.target}
        record["at_step"] = sum(board.done.values())
        record["t"] = time.time()
        if fault.kind == "kill":
            self.cluster.kill(fault.target)
            self.cluster.spawn(fault.target)
            await asyncio.to_thread(self.cluster.wait_ready, fault.target)
            record["serving_after_s"] = time.time() - record["t"]
            if fault.target != "ps":
                raise ValueError("only the parameter server's restart is repaired by this job")
            record["steps_rolled_back"] = record["at_step"] - self.checkpoint_at
            await self._restore_ps()
            record["rebound_after_s"] = time.time() - record["t"]
        elif fault.kind == "stop":
            pid = self.cluster.processes[fault.target].pid
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(fault.downtime)  # the freeze's length, not a wait
            finally:
                os.kill(pid, signal.SIGCONT)
        elif fault.kind == "pause":
            ms = int(fault.downtime * 1000)
            await self.probe.execute("CLIENT", "PAUSE", str(ms), "WRITE")
            # A write waits out a write pause: when it returns, the pause is over.
            await self.probe.execute("SET", f"{self.cluster.namespace}:after-pause", "1")
        elif fault.kind == "sleep":
            await self.probe.execute("DEBUG", "SLEEP", str(fault.downtime))
        elif fault.kind == "oom":
            used = await self.probe.used_memory()
            await self.probe.execute("CONFIG", "SET", "maxmemory", str(used // 2))
            try:
                await asyncio.sleep(fault.downtime)  # how long Redis stays full
            finally:
                await self.probe.execute("CONFIG", "SET", "maxmemory", "0")
        elif fault.kind == "garbage":
            for name in ["driver", "ps", *TRAINERS]:
                stream = inbox(self.cluster.namespace, name)
                await self.probe.execute("XADD", stream, "*", *_flat(_GARBAGE))
        elif fault.kind == "redis":
            server = self.cluster.server
            assert server is not None
            server.stop(keep_address=True)
            # The outage itself: how long Redis stays away, not a wait for an event.
            await asyncio.sleep(fault.downtime)
            server.start()
            self.probe.close()
            record["redis_back_after_s"] = time.time() - record["t"]
        elif self.inject is not None:
            record.update(await self.inject(fault))
        else:
            raise ValueError(f"unknown fault {fault.kind!r}")
        self.injected.append(record)

    async def _restore_ps(self) -> None:
        """A new ParameterServer, with the checkpoint's weights; both trainers rebound to it."""
        agent = self.agent
        assert agent is not None
        ps = await _retrying(lambda: agent.remote("ps", "ps.ParameterServer", args=(SIZES, 0)))
        await _retrying(lambda: ps.rpc_async(timeout=STEP_TIMEOUT).load_state_dict(self.checkpoint))
        self.ps = ps
        for trainer in self.trainers.values():
            await _retrying(functools.partial(_bind, trainer, ps))

    async def _save_checkpoint(self, at_step: int) -> None:
        ps = self.ps
        assert ps is not None
        try:
            self.checkpoint = await ps.rpc_async(timeout=STEP_TIMEOUT).state_dict()
        except RETRYABLE:
            return  # the previous checkpoint stays (the server, or Redis, is being replaced)
        self.checkpoint_at = at_step

    # *** measurements ***

    async def _settle(self) -> int:
        """Redis's used_memory at rest, once every inbox is empty with nothing pending.

        Past the agents' idle cycle (a blocked read ends every 2 s; Redis's cron resizes
        idle clients' buffers), Redis 7 holds still: the value once it held for 2 s. Redis
        6.2 never does: client buffers come and go above a floor in 32 KiB steps, and the
        floor, the least value over 3 s, is what a leak raises.
        """
        names = ["driver", "ps", *TRAINERS]
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while backlog := await self.probe.backlog(self.cluster.namespace, names):
            if time.monotonic() > deadline:
                raise SoakFailed(f"Redis did not settle within {SETTLE_TIMEOUT} s: {backlog=}")
            await asyncio.sleep(0.2)  # sampling period: a backlog has no event to wait on
        idle, samples = time.monotonic(), collections.deque[int](maxlen=12)
        while True:
            samples.append(await self.probe.used_memory())
            held = list(samples)[-8:]
            quiet = time.monotonic() - idle
            if quiet >= 3.0 and len(held) == 8 and max(held) - min(held) <= 4096:
                return min(held)
            if quiet >= 6.0:
                return min(samples)
            # Idleness is the condition measured: the sampling period of an idle state.
            await asyncio.sleep(0.25)

    async def _spans(self, agent: Agent) -> dict[str, dict[str, int]]:
        """Each live agent's spans: recorded since it started, kept (at most its ring's
        capacity, however long it ran), and still open."""
        out = {}
        for worker in await agent.workers():
            # A context nobody has: the counts without the spans.
            dump = await agent.rpc_async(worker.name, TRACE, args=(-1,))
            out[worker.name] = {k: dump[k] for k in ("recorded", "kept", "open", "capacity")}
        return out

    def _rss(self) -> dict[str, int]:
        pids = {name: p.pid for name, p in self.cluster.processes.items()}
        return {name: _rss_bytes(pid) for name, pid in {**pids, "driver": os.getpid()}.items()}

    def _figures(
        self,
        reports: dict[str, dict[str, Any]],
        wall: float,
        rss_before: dict[str, int],
        rss_after: dict[str, int],
    ) -> dict[str, Any]:
        total = self.steps * len(TRAINERS)
        done = sum(r["steps"] for r in reports.values())
        killed = {f["target"] for f in self.injected if f["kind"] == "kill"}
        errors: dict[str, int] = {}
        for report in reports.values():
            for kind, n in report["errors"].items():
                errors[kind] = errors.get(kind, 0) + n
        figures: dict[str, Any] = {
            "steps": total,
            "steps_done": done,
            "total_steps_per_s": done / wall,
            "wall_s": wall,
            "rss_before_mib": {n: b / (1 << 20) for n, b in rss_before.items()},
            # Of the processes that ran throughout (a worker killed and started again is new).
            "rss_growth_mib": {
                n: (rss_after[n] - rss_before[n]) / (1 << 20)
                for n in rss_before
                if n != "driver" and n not in killed
            },
            "driver_rss_growth_mib": (rss_after["driver"] - rss_before["driver"]) / (1 << 20),
            "failed_attempts": sum(r["failed_attempts"] for r in reports.values()),
            "retried_steps": sum(r["retried_steps"] for r in reports.values()),
            "most_attempts_for_a_step": max(r["most_attempts"] for r in reports.values()),
            "slowest_step_s": max(r["slowest_step_s"] for r in reports.values()),
            "slowest_attempt_s": max(r["slowest_attempt_s"] for r in reports.values()),
            "errors": errors,
            "progress_reports_lost": sum(r["progress_reports_lost"] for r in reports.values()),
            "loss_fell": all(r["last10_loss"] < r["first10_loss"] for r in reports.values()),
        }
        for name, report in reports.items():
            figures[f"{name}_first10_loss"] = report["first10_loss"]
            figures[f"{name}_last10_loss"] = report["last10_loss"]
        if self.faults:
            figures["faults"] = [_recovery(f, reports) for f in self.injected]
        return figures


def _recovery(fault: dict[str, Any], reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """When each trainer finished its first step after the fault, and what failed meanwhile."""
    t0 = fault["t"]
    out = {k: v for k, v in fault.items() if k != "t"}
    per_trainer = {}
    for name, report in reports.items():
        # The interruption the fault caused: the first gap that ends after it.
        gap = next((g for g in report["gaps"] if g[1] > t0 and g[0] <= t0 + 1.0), None)
        per_trainer[name] = {
            "first_step_after_s": None if gap is None else gap[1] - t0,
            "failed_attempts": 0 if gap is None else gap[2],
        }
    out["trainers"] = per_trainer
    # A trainer the fault did not hold up (a freeze of the other one) has no gap.
    known = [t for t in (p["first_step_after_s"] for p in per_trainer.values()) if t is not None]
    out["recovered_after_s"] = max(known) if known else None
    return out


class _Say:
    """Progress lines of one run, each prefixed with its label (`S2: ...`)."""

    def __init__(self, progress: Progress, label: str) -> None:
        self.progress, self.label = progress, label

    def step(self, text: str) -> None:
        self.progress.step(f"{self.label}: {text}")

    def notice(self, text: str) -> None:
        self.progress.notice(f"{self.label}: {text}")


# What the agents log while each fault lasts: said before it starts, so that no WARNING
# line of a fault the soak injected itself reads like a failure of its own.
_REDIS_AWAY = "WARNING lines from the agents (reconnect_failed, heartbeat_failed, inbox_lost)"


def describe(fault: Fault) -> str:
    """What `fault` does, and what a reader of the log will see meanwhile."""
    seconds = f"{fault.downtime:g} s"
    if fault.kind == "kill":
        return (
            f"{fault.target} killed (SIGKILL) and started again; the job restores it from its "
            "checkpoint, and the steps it broke are retried"
        )
    if fault.kind == "redis":
        return (
            f"Redis stopped for {seconds}, then an empty one started at the same address; "
            f"expect {_REDIS_AWAY} until it is back"
        )
    if fault.kind == "stop":
        held = "its own steps wait" if fault.target != "ps" else "steps fail and are retried"
        return f"{fault.target} frozen {seconds} (SIGSTOP); {held} until it thaws (SIGCONT)"
    if fault.kind == "pause":
        ms = int(fault.downtime * 1000)
        return f"Redis takes no writes for {seconds} (CLIENT PAUSE {ms} WRITE); steps wait"
    if fault.kind == "sleep":
        return f"Redis answers nothing for {seconds} (DEBUG SLEEP {fault.downtime:g}); steps wait"
    if fault.kind == "oom":
        return (
            f"Redis full for {seconds} (maxmemory below used_memory): writes fail with OOM, "
            "the steps that hit it are retried; expect a WARNING heartbeat_failed ... OOM"
        )
    if fault.kind == "garbage":
        return (
            "a malformed message into every agent's inbox; each is dead-lettered; expect a "
            "WARNING dead_letter from the driver (the workers' are in their logs, -v)"
        )
    return f"{fault.kind} {fault.target}".strip()


def _flat(fields: dict[bytes, bytes]) -> list[Any]:
    return [part for pair in fields.items() for part in pair]


async def _applied(trainer: RRef[Any]) -> dict[str, int]:
    counts: dict[str, int] = await trainer.rpc_async(timeout=STEP_TIMEOUT).applied()
    return counts


async def _bind(trainer: RRef[Any], ps: RRef[Any]) -> None:
    await trainer.rpc_async(timeout=STEP_TIMEOUT).bind(ps)


async def _retrying(make: Callable[[], Awaitable[T]], attempts: int = 20) -> T:
    """`make()` until it succeeds, at most `attempts` times, with a doubling retry timer."""
    delay = 0.05
    for attempt in range(1, attempts + 1):
        try:
            return await make()
        except RETRYABLE:
            if attempt == attempts:
                raise
            await asyncio.sleep(delay)  # the retry timer
            delay = min(delay * 2, 1.0)
    raise AssertionError("unreachable")


class _Probe:
    """A connection of the job's own, to look at Redis (reopened after a restart)."""

    def __init__(self, url: str) -> None:
        self.address = RedisAddress.from_url(url)
        self.conn: Connection | None = None

    async def execute(self, *args: str) -> Any:
        async with asyncio.timeout(10.0):
            if self.conn is None or not self.conn.is_open:
                self.conn = await Connection.open(self.address, name="asyncgrad-soak-probe")
            return await self.conn.execute(*args)

    async def used_memory(self) -> int:
        return int(parse_info(await self.execute("INFO", "memory"))["used_memory"])

    async def backlog(self, namespace: str, names: Sequence[str]) -> int:
        """Entries in the agents' inboxes, and entries delivered but not acked."""
        total = 0
        for name in names:
            key = inbox(namespace, name)
            total += int(await self.execute("XLEN", key))
            with contextlib.suppress(ReplyError):  # no inbox (yet): nothing pending either
                total += int((await self.execute("XPENDING", key, GROUP))[0])
        return total

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    async def aclose(self) -> None:
        self.close()
        if self.conn is not None:
            await self.conn.closed.wait()


def _rss_bytes(pid: int) -> int:
    """VmRSS from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"no VmRSS for pid {pid}")
