"""Shared fixtures: one real Redis per session, a namespace per test, no leftover processes."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from asyncgrad.embedded import EmbeddedRedis

DEADLINE = 5.0  # seconds a test waits for a child process before failing


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """$ASYNCGRAD_TEST_REDIS_URL, else a session-wide embedded Redis on a unix socket."""
    if url := os.environ.get("ASYNCGRAD_TEST_REDIS_URL"):
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def namespace() -> str:
    """A namespace of this test's own, so tests share one Redis without flushing it."""
    return "t-" + uuid.uuid4().hex[:12]


@pytest.fixture
def read_line() -> Callable[[IO[bytes]], str]:
    """Read one line from a child's pipe, failing after DEADLINE s instead of hanging."""

    def read(pipe: IO[bytes]) -> str:
        fd, data = pipe.fileno(), b""
        while not data.endswith(b"\n"):
            readable, _, _ = select.select([fd], [], [], DEADLINE)
            chunk = os.read(fd, 1) if readable else b""
            if not chunk:
                pytest.fail(f"no line from the child within {DEADLINE} s; got {data!r}")
            data += chunk
        return data.decode().rstrip("\n")

    return read


@pytest.fixture
def wait_exit() -> Callable[[int], None]:
    """Wait until the process behind a pidfd exits (it need not be our child), then close it.

    Open the pidfd with `os.pidfd_open(pid)` while the process is known to be alive, so a
    process that is already gone fails the test (ProcessLookupError) rather than passing it.
    """

    def wait(pidfd: int) -> None:
        try:
            readable, _, _ = select.select([pidfd], [], [], DEADLINE)
        finally:
            os.close(pidfd)
        if not readable:
            pytest.fail(f"process still running after {DEADLINE} s")

    return wait


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_children() -> Iterator[None]:
    """Kill, and fail on, any child process the tests left running."""
    yield
    leftovers = _live_children(os.getpid())
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if leftovers:
        pytest.fail(f"tests left child processes running (now killed): {leftovers}")


def _live_children(parent: int) -> dict[int, str]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name in parentheses may contain spaces: split after the last ")".
            state, ppid = stat.read_text().rpartition(")")[2].split()[:2]
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(ppid) == parent and state != "Z":
            children[int(stat.parent.name)] = cmdline.decode(errors="replace").strip()
    return children
