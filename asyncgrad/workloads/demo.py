"""The demo job: a parameter server and two trainers learn a synthetic classification task.

Each trainer (a `Trainer`, exposed here) runs forward on the parameter server by RPC, the loss
locally, a distributed backward, a `DistributedOptimizer` step on the server; they report
progress to the job, which shows it live and finally measures held-out accuracy.

    asyncgrad run asyncgrad.workloads.demo:main \\
        --spawn ps=asyncgrad.workloads.param_server \\
        --spawn trainer1=asyncgrad.workloads.demo --spawn trainer2=asyncgrad.workloads.demo
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from asyncgrad import dist_autograd, optim, rpc
from asyncgrad import errors as rpc_errors
from asyncgrad.graph import Array
from asyncgrad.nn import functional as F
from asyncgrad.tensor import Tensor, tensor
from asyncgrad.tracing import timeline
from asyncgrad.transport import DEFAULT_URL, RedisAddress, live_namespaces
from asyncgrad.workloads.param_server import ParameterServer, mlp

SIZES = (784, 256, 10)
BATCH = 64
TEACHER_SEED = 4242
TRACED_STEPS = 4  # `asyncgrad demo --trace`: the last steps written (two per trainer)
REPORT_EVERY = 10


@dataclass(frozen=True)
class Task:
    """Inputs are standard normal; the label is the argmax of a fixed random linear map."""

    dim: int = SIZES[0]
    classes: int = SIZES[-1]

    def teacher(self) -> Array:
        rng = np.random.default_rng(TEACHER_SEED)
        return rng.standard_normal((self.dim, self.classes)).astype(np.float32)

    def sample(self, n: int, seed: int) -> tuple[Array, Array]:
        x = np.random.default_rng(seed).standard_normal((n, self.dim), dtype=np.float32)
        return x, (x @ self.teacher()).argmax(axis=1)


@rpc.expose(name="demo.Trainer")
class Trainer:
    """One trainer: its own data, and an optimizer stepping the server's parameters.

    Made with `agent.remote(...)`, then `prepare()`d and `run()`: setup (data, parameter
    references) stays out of the timed part, as in the PyTorch benchmark.
    """

    def __init__(self, ps: rpc.RRef[ParameterServer], seed: int, steps: int, lr: float) -> None:
        self.ps, self.steps, self.lr = ps, steps, lr
        self.x, self.y = Task().sample(steps * BATCH, seed)
        self.opt: optim.DistributedOptimizer | None = None

    async def prepare(self) -> None:
        params = await self.ps.rpc_async().parameter_rrefs()
        self.opt = optim.DistributedOptimizer(optim.SGD, params, lr=self.lr)

    async def run(self, report_to: str | None = None) -> dict[str, list[float]]:
        """`steps` SGD steps; each step's loss and duration (ms)."""
        if self.opt is None:
            await self.prepare()
        assert self.opt is not None
        agent = rpc.current_agent()
        losses: list[float] = []
        step_ms: list[float] = []
        for step in range(self.steps):
            batch = slice(step * BATCH, (step + 1) * BATCH)
            began = time.perf_counter()
            async with dist_autograd.context() as ctx:
                logits: Tensor = await self.ps.rpc_async().forward(tensor(self.x[batch]))
                loss = F.cross_entropy(logits, self.y[batch])
                await dist_autograd.backward(ctx, [loss])
                await self.opt.step(ctx)
            step_ms.append((time.perf_counter() - began) * 1000)
            losses.append(loss.item())
            if report_to and ((step + 1) % REPORT_EVERY == 0 or step + 1 == self.steps):
                recent = float(np.mean(losses[-REPORT_EVERY:]))
                await agent.rpc_async(
                    report_to, "demo.progress", args=(agent.name, step + 1, recent)
                )
        return {"losses": losses, "step_ms": step_ms}


@dataclass
class _Display:
    progress: Progress
    bars: dict[str, TaskID]
    started: float


# The job process shows the progress that trainers report (one display per job agent).
_DISPLAYS: dict[str, _Display] = {}


@rpc.expose(name="demo.progress")
def progress(trainer: str, step: int, loss: float) -> None:
    shown = _DISPLAYS[rpc.current_agent().name]
    rate = step / max(time.perf_counter() - shown.started, 1e-9)
    shown.progress.update(
        shown.bars[trainer], completed=step, loss=f"{loss:.3f}", rate=f"{rate:5.0f} steps/s"
    )


async def wait_for_workers(agent: rpc.Agent, names: Sequence[str], timeout: float = 60.0) -> None:
    """Return once every named worker is live (under docker compose they start in any order).

    If one is not live yet, says at once (on stderr) what it waits for, where, and how long.
    """
    deadline = time.monotonic() + timeout
    where = f"namespace {agent.namespace!r} at {RedisAddress.from_url(agent.redis_url)}"
    told = False
    while missing := set(names) - {w.name for w in await agent.workers()}:
        if not told:
            print(
                f"waiting up to {timeout:g} s for {_names(missing)} to be live in {where}",
                file=sys.stderr, flush=True,
            )  # fmt: skip
            told = True
        if time.monotonic() > deadline:
            live = await live_namespaces(RedisAddress.from_url(agent.redis_url))
            others = [n for n in live or () if n != agent.namespace]
            hint = f"; namespaces with live agents there: {', '.join(others)}" if others else ""
            if agent.redis_url == DEFAULT_URL and not os.environ.get("ASYNCGRAD_REDIS_URL"):
                hint += "; this is the default Redis: pass --redis URL or set ASYNCGRAD_REDIS_URL"
            raise rpc_errors.WorkerUnavailable(
                f"{_names(missing)} not live after {timeout:g} s in {where}: start "
                f"them (asyncgrad worker NAME --namespace {agent.namespace} ...){hint}"
            )
        # Registration publishes no event to wait on: poll the registry, with a deadline.
        await asyncio.sleep(0.2)


def _names(names: set[str]) -> str:
    listed = ", ".join(sorted(names))
    return f"worker {listed}" if len(names) == 1 else f"workers {listed}"


def accuracy(state: dict[str, Array], x: Array, y: Array) -> float:
    model = mlp(SIZES)
    model.load_state_dict(state)
    predicted = model(tensor(x)).data.argmax(axis=1)
    return float((predicted == y).mean())


async def main(
    agent: rpc.Agent,
    trainers: Sequence[str] = ("trainer1", "trainer2"),
    steps: int = 300,
    lr: float = 0.05,
    console: Console | None = None,
    trace_to: str | None = None,
) -> int:
    """Train on the `ps` worker with `trainers`; print final loss and held-out accuracy;
    `trace_to`: write the trace of the last steps there (a picture if it ends `.png`)."""
    console = console or Console()
    await wait_for_workers(agent, ["ps", *trainers])
    ps = await agent.remote("ps", ParameterServer, args=(SIZES, 0))
    x_test, y_test = Task().sample(2000, seed=999)
    before = accuracy(await ps.rpc_async().state_dict(), x_test, y_test)
    display = Progress(
        TextColumn("{task.description:>9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
    )
    bars = {t: display.add_task(t, total=steps, loss="-", rate="") for t in trainers}
    started = time.perf_counter()
    _DISPLAYS[agent.name] = _Display(display, bars, started)
    try:
        with display:
            runners = [
                await agent.remote(t, Trainer, args=(ps, 100 + i, steps, lr))
                for i, t in enumerate(trainers)
            ]
            runs = [r.rpc_async(timeout=600).run(agent.name) for r in runners]
            results: list[dict[str, list[float]]] = await asyncio.gather(*runs)
    finally:
        _DISPLAYS.pop(agent.name, None)
    elapsed = time.perf_counter() - started
    if trace_to is not None:
        traced = timeline.window(await agent.trace(), TRACED_STEPS)
        timeline.save(traced, trace_to, title=f"asyncgrad demo: the last {TRACED_STEPS} steps")
        console.print(f"trace of the last {TRACED_STEPS} steps: {trace_to}")
    after = accuracy(await ps.rpc_async().state_dict(), x_test, y_test)
    total = steps * len(trainers)
    for name, result in zip(trainers, results, strict=True):
        first, last = np.mean(result["losses"][:10]), np.mean(result["losses"][-10:])
        console.print(f"{name}: loss {first:.3f} -> {last:.3f} (mean of first/last 10 steps)")
    console.print(
        f"{total} steps in {elapsed:.1f} s ({total / elapsed:.0f} steps/s); "
        f"held-out accuracy {before:.1%} -> {after:.1%}"
    )
    return 0
