"""The soak job's trainer: B5's step, thousands of times, each attempt bounded, failures retried.

A step is B5's: forward on the parameter server by RPC, cross-entropy here, a distributed
backward, a `DistributedOptimizer` SGD step on the server. Every attempt has a deadline;
an attempt that fails with an error of asyncgrad's tree (`WorkerUnavailable`,
`TransportError`, `RPCTimeout`, `ContextError`, a `RemoteError`...) is logged and tried
again, a bounded number of times, after a backoff that `bind()` cuts short:

    trainer = await agent.remote("trainer1", Trainer, args=(seed,))
    await trainer.rpc_async().bind(ps)            # and again whenever the server is replaced
    report = await trainer.rpc_async(timeout=600).run(5000, board)

`asyncgrad bench --soak` drives it (asyncgrad/bench/soak.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import Any

from asyncgrad import dist_autograd, optim, rpc
from asyncgrad.errors import ContextError, RpcError, RPCTimeout, TransportError
from asyncgrad.nn import functional as F
from asyncgrad.tensor import tensor
from asyncgrad.workloads.demo import BATCH, Task
from asyncgrad.workloads.param_server import ParameterServer

RETRYABLE = (RpcError, TransportError, ContextError)
APPLY_ATTEMPTS = 120  # retries of one step's update, about two minutes
GAP = 0.25  # seconds without a finished step that count as an interruption
_KINDS = 50  # distinct error messages kept


@dataclass
class RunLog:
    """What one run went through: losses, failed attempts, interruptions."""

    first_losses: list[float] = field(default_factory=list)
    last_losses: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=10)
    )
    steps: int = 0
    failed_attempts: int = 0
    retried_steps: int = 0
    most_attempts: int = 1
    slowest_step_s: float = 0.0  # first attempt to success, backoff included
    slowest_attempt_s: float = 0.0  # the attempt that succeeded
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    # (time of the step before, time of the step after, failed attempts between): wall
    # clock, so the job can line them up with the faults it injected.
    gaps: list[tuple[float, float, int]] = field(default_factory=list)
    progress_reports_lost: int = 0
    last_done: float = field(default_factory=time.time)
    failed_since: int = 0

    def failed(self, error: BaseException) -> None:
        self.failed_attempts += 1
        self.failed_since += 1
        self._count(error)

    def report_lost(self, error: BaseException) -> None:
        self.progress_reports_lost += 1
        self._count(error, "progress report: ")

    def _count(self, error: BaseException, what: str = "") -> None:
        # Ids and timings differ per failure: count the kinds of message, not each one.
        text = re.sub(r"\d+(\.\d+)?", "N", str(error).splitlines()[0] if str(error) else "")
        kind = f"{what}{type(error).__name__}: {text[:200]}"
        if kind in self.errors or len(self.errors) < _KINDS:
            self.errors[kind] += 1

    def done(self, loss: float, attempts: int, step_s: float, attempt_s: float) -> None:
        now = time.time()
        if now - self.last_done > GAP or self.failed_since:
            self.gaps.append((self.last_done, now, self.failed_since))
        self.last_done, self.failed_since = now, 0
        self.steps += 1
        if len(self.first_losses) < 10:
            self.first_losses.append(loss)
        self.last_losses.append(loss)
        self.retried_steps += attempts > 1
        self.most_attempts = max(self.most_attempts, attempts)
        self.slowest_step_s = max(self.slowest_step_s, step_s)
        self.slowest_attempt_s = max(self.slowest_attempt_s, attempt_s)

    def report(self, started: float) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "wall_s": time.time() - started,
            "first10_loss": sum(self.first_losses) / max(len(self.first_losses), 1),
            "last10_loss": sum(self.last_losses) / max(len(self.last_losses), 1),
            "failed_attempts": self.failed_attempts,
            "retried_steps": self.retried_steps,
            "most_attempts": self.most_attempts,
            "slowest_step_s": self.slowest_step_s,
            "slowest_attempt_s": self.slowest_attempt_s,
            "errors": dict(self.errors),
            "gaps": self.gaps[:100],
            "progress_reports_lost": self.progress_reports_lost,
        }


@rpc.expose(name="soak.Trainer")
class Trainer:
    """One trainer: `batches` fixed batches of B5's task, cycled, and an optimizer over the
    parameters of the server it is bound to."""

    def __init__(self, seed: int, lr: float = 0.05, batches: int = 16) -> None:
        self.x, self.y = Task().sample(batches * BATCH, seed)
        self.batches, self.lr = batches, lr
        self.ps: rpc.RRef[ParameterServer] | None = None
        self.opt: optim.DistributedOptimizer | None = None
        self.step = 0  # steps done, over all runs
        self._generation = 0  # bind() calls so far
        self._bound = asyncio.Event()
        self._succeeded: collections.Counter[str] = collections.Counter()  # per optimizer

    async def bind(self, ps: rpc.RRef[ParameterServer]) -> None:
        """Train the parameters of `ps` from now on; a retry waiting to start, starts now."""
        params = await ps.rpc_async().parameter_rrefs()
        self.ps, self.opt = ps, optim.DistributedOptimizer(optim.SGD, params, lr=self.lr)
        self._generation += 1
        self._bound.set()

    async def run(
        self,
        steps: int,
        board: rpc.RRef[Any] | None = None,
        report_every: int = 50,
        step_timeout: float = 10.0,
        attempts: int = 30,
        max_delay: float = 1.0,
    ) -> dict[str, Any]:
        """`steps` steps; each attempt within `step_timeout` s, at most `attempts` per step
        (then the last error is raised). Reports the steps done to `board.report(name, n)`
        every `report_every` steps, and at the end the run's report, which it also returns,
        to `board.report(name, steps, report)`: a caller whose wait for the reply ended
        (this trainer was frozen past the failure window: `OutcomeUnknown`) finds it there."""
        log, started = RunLog(), time.time()
        name = rpc.current_agent().name
        for done in range(1, steps + 1):
            await self._step_retrying(log, step_timeout, attempts, max_delay)
            if board is not None and done % report_every == 0 and done < steps:
                try:
                    await board.rpc_async(timeout=step_timeout).report(name, done)
                except RETRYABLE as e:
                    log.report_lost(e)  # the next report says the same, and more
        report = log.report(started)
        if board is not None:
            for attempt in range(1, attempts + 1):
                try:
                    await board.rpc_async(timeout=step_timeout).report(name, steps, report)
                    break
                except RETRYABLE as e:
                    if attempt == attempts:
                        raise
                    log.report_lost(e)
                    await asyncio.sleep(max_delay)  # backoff timer, as between attempts
        return report

    async def _step_retrying(
        self, log: RunLog, timeout: float, attempts: int, max_delay: float
    ) -> None:
        first, delay = time.monotonic(), 0.05
        for attempt in range(1, attempts + 1):
            generation, began = self._generation, time.monotonic()
            try:
                loss = await self._step(log, timeout)
            except RETRYABLE as e:
                log.failed(e)
                if attempt == attempts:
                    raise
                await self._backoff(delay, generation)
                delay = min(delay * 2, max_delay)
                continue
            now = time.monotonic()
            log.done(loss, attempt, now - first, now - began)
            self.step += 1
            return

    async def applied(self) -> dict[str, int]:
        """Steps that succeeded here, and steps the server applied, with the optimizer of
        the current binding: equal unless a step was applied twice (or lost)."""
        if self.opt is None:
            raise ContextError("the trainer is not bound to a parameter server: call bind()")
        local = self.opt.remote_optimizers["ps"]
        applied: int = await local.rpc_async().applied_steps()
        return {"succeeded": self._succeeded[self.opt.id], "applied": applied}

    async def _step(self, log: RunLog, timeout: float) -> float:
        if self.ps is None or self.opt is None:
            raise ContextError("the trainer is not bound to a parameter server: call bind()")
        ps, opt = self.ps, self.opt  # a bind() meanwhile counts from the next attempt
        generation = self._generation
        batch = slice((self.step % self.batches) * BATCH, (self.step % self.batches + 1) * BATCH)
        async with dist_autograd.context() as ctx:
            deadline = asyncio.timeout(timeout)
            try:
                async with deadline:
                    logits = await ps.rpc_async(timeout=timeout).forward(tensor(self.x[batch]))
                    loss = F.cross_entropy(logits, self.y[batch])
                    await dist_autograd.backward(ctx, [loss], timeout=timeout)
            except TimeoutError:
                if deadline.expired():
                    raise RPCTimeout(f"step {self.step} took over {timeout} s") from None
                raise
            await self._apply(log, opt, ctx, timeout, generation)
        self._succeeded[opt.id] += 1
        return float(loss.item())

    async def _apply(
        self,
        log: RunLog,
        opt: optim.DistributedOptimizer,
        ctx: int,
        timeout: float,
        generation: int,
    ) -> None:
        """`opt.step(ctx)` until it answers: a step that may have run is completed in its
        own context (the server applies each context once), never redone in a new one.
        Only a new server (a `bind()` meanwhile) voids it."""
        delay = 0.05
        for attempt in range(1, APPLY_ATTEMPTS + 1):
            deadline = asyncio.timeout(timeout)
            try:
                async with deadline:
                    await opt.step(ctx)
                return
            except TimeoutError:
                if not deadline.expired():
                    raise
                # Also when this trainer was the one frozen past its deadline: which of
                # the timer and the reply waiting in its socket comes first on waking is
                # a toss-up. Said as the step's own timeout, not a bare TimeoutError.
                error: Exception = RPCTimeout(f"step {self.step}'s update took over {timeout} s")
            except RETRYABLE as e:
                error = e
            if self._generation != generation or attempt == APPLY_ATTEMPTS:
                raise error
            log.failed(error)
            await asyncio.sleep(delay)  # the retry timer
            delay = min(delay * 2, 1.0)

    async def _backoff(self, delay: float, generation: int) -> None:
        """The retry timer: `delay` s, or less if `bind()` replaced the server meanwhile."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                while self._generation == generation:
                    self._bound.clear()
                    await self._bound.wait()
