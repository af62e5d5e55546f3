"""Worker processes on this machine, with a Redis of their own if none is given.

Used by `asyncgrad demo`, `asyncgrad run --spawn` and the benchmarks. Nothing outlives it:
workers get SIGTERM (and drain) when it closes, also on an error or Ctrl-C, and the kernel
kills them if this process dies without closing (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from asyncgrad.embedded import EmbeddedRedis, die_with_parent

__all__ = ["THREAD_VARS", "LocalCluster", "WorkerStartFailed", "one_thread_env"]

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_READY = b"event=worker_serving"

logger = logging.getLogger(__name__)


class WorkerStartFailed(RuntimeError):
    """A worker process exited, or did not serve within the deadline."""


def one_thread_env() -> dict[str, str]:
    """The environment for a process that computes on one thread (docs/BENCH.md's rule)."""
    return {**os.environ, **dict.fromkeys(THREAD_VARS, "1"), "PYTHONUNBUFFERED": "1"}


@dataclass
class LocalCluster:
    """`asyncgrad worker NAME --import MODULE...` for each `workers` entry, on `redis_url`.

    `redis_url=None` starts an embedded Redis (`server`). Entering returns once every
    worker serves. For chaos tests, `kill` a worker and `spawn` it again.
    """

    workers: Mapping[str, Sequence[str]]
    redis_url: str | None = None
    namespace: str = field(default_factory=lambda: "local-" + uuid.uuid4().hex[:8])
    ready_timeout: float = 60.0
    one_thread: bool = True
    worker_args: Sequence[str] = ()  # more `asyncgrad worker` options, e.g. --failure-timeout
    server_options: tuple[str, ...] = ()  # more redis-server options, for an embedded one
    # worker name -> argv its command runs under, e.g. SimulatedHost.prefix to start it on
    # a simulated host (that must exec the command: the pid must stay the worker's)
    command_prefix: Mapping[str, Sequence[str]] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    server: EmbeddedRedis | None = None
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _logs: dict[str, threading.Thread] = field(default_factory=dict)

    def __enter__(self) -> LocalCluster:
        try:
            if self.redis_url is None:
                self.server = EmbeddedRedis(
                    os.environ.get("ASYNCGRAD_REDIS_SERVER"), options=self.server_options
                )
                self.redis_url = self._stack.enter_context(self.server).url
            self._stack.callback(self._stop_workers)
            for name in self.workers:
                self.spawn(name)
            deadline = time.monotonic() + self.ready_timeout
            for name in self.processes:
                self.wait_ready(name, deadline)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def spawn(self, name: str) -> None:
        """Start worker `name` (again, after `kill`); `wait_ready` waits until it serves.

        Call it from the thread that entered the cluster: the kernel stops the worker when
        the thread that started it ends (`die_with_parent`).
        """
        running = self.processes.get(name)
        if running is not None and running.poll() is None:
            raise RuntimeError(f"worker {name!r} is already running (pid {running.pid})")
        self.processes[name] = self._spawn(name, self.workers[name])

    def wait_ready(self, name: str, deadline: float | None = None) -> None:
        """Block until worker `name` serves (by its log), or raise `WorkerStartFailed`."""
        if deadline is None:
            deadline = time.monotonic() + self.ready_timeout
        self._logs[name] = _wait_ready(name, self.processes[name], deadline)

    def kill(self, name: str) -> None:
        """SIGKILL worker `name` and reap it: no drain, no goodbye (a crash)."""
        process = self.processes[name]
        process.kill()
        process.wait()
        log = self._logs.pop(name, None)
        if log is not None:
            log.join(5.0)  # the pipe's writer is gone: its reader reaches the end at once
        if process.stderr is not None:
            process.stderr.close()

    def _spawn(self, name: str, modules: Sequence[str]) -> subprocess.Popen[bytes]:
        assert self.redis_url is not None
        argv = [sys.executable, "-m", "asyncgrad", "worker", name, "--namespace", self.namespace]
        for module in modules:
            argv += ["--import", module]
        argv += self.worker_args
        env = one_thread_env() if self.one_thread else {**os.environ, "PYTHONUNBUFFERED": "1"}
        # Not `--redis`: a command line is visible to every local user, and the URL may
        # carry a password.
        env["ASYNCGRAD_REDIS_URL"] = self.redis_url
        return subprocess.Popen(
            [*self.command_prefix.get(name, ()), *argv],
            stderr=subprocess.PIPE,
            env=env,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )

    def _stop_workers(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stderr is not None:
                process.stderr.close()


def _wait_ready(name: str, process: subprocess.Popen[bytes], deadline: float) -> threading.Thread:
    """Read the worker's log until it serves; then keep draining it so it never blocks."""
    assert process.stderr is not None
    fd, seen = process.stderr.fileno(), b""
    while _READY not in seen:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        chunk = os.read(fd, 65536) if ready else b""
        if not chunk:
            code = process.poll()
            tail = seen.decode(errors="replace").strip().splitlines()[-3:]
            why = f"exited with code {code}" if code is not None else "did not serve in time"
            raise WorkerStartFailed(f"worker {name!r} {why}: " + " | ".join(tail))
        seen = seen[-4096:] + chunk
    stream = process.stderr

    def forward() -> None:
        # A full pipe would block the worker: keep reading, into our log (visible with -v).
        with contextlib.suppress(ValueError, OSError):  # the pipe closes at teardown
            for line in stream:
                logger.debug("worker=%s %s", name, line.decode(errors="replace").rstrip())

    thread = threading.Thread(target=forward, daemon=True, name=f"log-{name}")
    thread.start()
    return thread
