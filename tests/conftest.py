"""Shared fixtures: one real Redis per session, a namespace per test, no leftover processes.

Tests marked `cluster` run twice: on that Redis, and on a local Redis Cluster (started on
first use) as `redis_url`, so everything built on `redis_url` (agents, worker processes,
the redis-py clients below) meets a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import redis
import redis.asyncio as aredis
import redis.asyncio.cluster as aredis_cluster
import redis.cluster

from asyncgrad.embedded import EmbeddedRedis
from asyncgrad.rpc import Agent
from asyncgrad.simulated_hosts import HostsUnavailable, SimulatedHost, SimulatedHosts
from asyncgrad.transport.resp import RedisAddress
from tests.cluster_servers import ClusterServers, ClusterUnsupported, find_binaries

ROOT = Path(__file__).resolve().parent.parent

DEADLINE = 5.0  # seconds a test waits for a child process before failing


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("cluster") and "redis_url" in metafunc.fixturenames:
        metafunc.parametrize("redis_url", ["redis", "cluster"], indirect=True)


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    """`server_url`, or `cluster_url` for the `cluster` variant of a test marked `cluster`."""
    which = getattr(request, "param", "redis")
    return str(request.getfixturevalue("cluster_url" if which == "cluster" else "server_url"))


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """$ASYNCGRAD_TEST_REDIS_URL, else a session-wide embedded Redis on a unix socket."""
    if url := os.environ.get("ASYNCGRAD_TEST_REDIS_URL"):
        yield url
        return
    # $ASYNCGRAD_REDIS_SERVER picks the binary, as for `asyncgrad up` (e.g. another version).
    with EmbeddedRedis(os.environ.get("ASYNCGRAD_REDIS_SERVER")) as server:
        yield server.url


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    """A Redis Cluster of three masters on loopback ports, for the whole session."""
    try:
        binaries = find_binaries(os.environ.get("ASYNCGRAD_REDIS_SERVER"))
    except ClusterUnsupported as e:
        pytest.skip(f"no redis-server/redis-cli with cluster support: {e}")
    with ClusterServers(*binaries) as cluster:
        yield cluster.url


def redis_py(url: str, *, asynchronous: bool = False) -> Any:
    """A redis-py client for `url`; for a `redis+cluster://` URL a `RedisCluster`, which has
    the same commands."""
    address = RedisAddress.from_url(url)
    if not address.seeds:
        return (aredis.Redis if asynchronous else redis.Redis).from_url(url)
    api = aredis_cluster if asynchronous else redis.cluster
    return api.RedisCluster(
        startup_nodes=[api.ClusterNode(host, port) for host, port in address.seeds],
        username=address.username,
        password=address.password,
    )


@contextlib.contextmanager
def own_namespace(redis_url: str) -> Iterator[str]:
    """A namespace of its own, so tests share one Redis without flushing it.

    Its keys are deleted afterwards, so a shared Redis (CI's) does not fill up.
    """
    ns = "t-" + uuid.uuid4().hex[:12]
    yield ns
    with redis_py(redis_url) as client:
        keys = list(client.scan_iter(match=f"{ns}:*", count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture(autouse=True)
def young_heap() -> Iterator[None]:
    """Within a test, `gc.collect()` scans only what the test made.

    Tests collect garbage to release RRefs nobody holds, often in a loop. A full collection
    of the whole suite's heap (torch included) holds the GIL for hundreds of ms, so the
    agents' heartbeat threads in this process beat late, and an agent that cannot beat on
    time rightly refuses to count anyone's heartbeat as missed (a test waiting for a
    suspicion then waits in vain). Unfrozen after the test: its garbage goes as usual.
    """
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A namespace of this test's own (see `own_namespace`)."""
    with own_namespace(redis_url) as ns:
        yield ns


@pytest.fixture
async def make_agent(redis_url: str, namespace: str) -> AsyncIterator[Callable[..., Any]]:
    """`await make_agent(name, **kwargs)`: a started Agent in this test's namespace.

    Every agent made is shut down at teardown (non-gracefully, so a failed test never
    waits for calls that will not come).
    """
    agents: list[Agent] = []

    async def make(name: str, **kwargs: Any) -> Agent:
        kwargs.setdefault("redis_url", redis_url)
        kwargs.setdefault("namespace", namespace)
        agent = await Agent(name, **kwargs).start()
        agents.append(agent)
        return agent

    yield make
    for agent in reversed(agents):
        await agent.shutdown(graceful=False)


@dataclass
class WorkerProcess:
    """A real `asyncgrad worker` child process."""

    name: str
    process: subprocess.Popen[bytes]
    log: list[str]

    @property
    def pid(self) -> int:
        return self.process.pid


@pytest.fixture
def spawn_worker(
    redis_url: str, namespace: str, read_line: Callable[[IO[bytes]], str]
) -> Iterator[Callable[..., WorkerProcess]]:
    """`spawn_worker(name, *modules)`: `asyncgrad worker` in a subprocess, once it serves.

    Waits for its `event=worker_serving` log line (never a sleep); kills what is left at
    teardown.
    """
    spawned: list[WorkerProcess] = []

    def spawn(name: str, *modules: str, extra_args: tuple[str, ...] = ()) -> WorkerProcess:
        argv = [sys.executable, "-m", "asyncgrad", "worker", name, "--redis", redis_url]
        argv += ["--namespace", namespace, *extra_args]
        for module in modules:
            argv += ["--import", module]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(argv, stderr=subprocess.PIPE, env=env, cwd=ROOT)
        worker = WorkerProcess(name, process, [])
        spawned.append(worker)
        assert process.stderr is not None
        while True:
            line = read_line(process.stderr)
            worker.log.append(line)
            if "event=worker_serving" in line:
                return worker

    yield spawn
    for worker in spawned:
        if worker.process.poll() is None:
            worker.process.kill()
        worker.process.wait(DEADLINE)
        if worker.process.stderr is not None:
            worker.process.stderr.close()


def gone_pid() -> int:
    """The pid of a process of this host that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait(DEADLINE)
    return child.pid


def here() -> str:
    """The `host=... pidns=...` of a heartbeat set by a process of this host, as in ours."""
    return f"host={socket.gethostname()} pidns={os.stat('/proc/self/ns/pid').st_ino}"


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


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aredis.Redis]:
    """An independent async client (redis-py) to look at and poke at Redis with."""
    client = redis_py(redis_url, asynchronous=True)
    yield client
    await client.aclose()


async def kill_clients(client: aredis.Redis, *names: str) -> int:
    """CLIENT KILL every connection named one of `names` (see CLIENT LIST); how many died."""
    killed = 0
    for entry in await client.client_list():
        if entry["name"] in names:
            killed += int(await client.client_kill_filter(_id=entry["id"]))
    return killed


async def eventually(
    probe: Callable[[], Awaitable[bool]], what: str, within: float = DEADLINE
) -> None:
    """Ask `probe` (a query to Redis) again until it holds; fail after `within` s.

    Each check is a round trip to Redis, which paces the loop: no sleep. The deadline is
    checked between probes too, in case a client swallows the timeout's cancellation.
    """
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline - time.monotonic()):
                if await probe():
                    return
    pytest.fail(f"not within {within} s: {what}")


class LogEvents(logging.Handler):
    """The `asyncgrad` log lines so far, from any thread; `await wait(text)` for one more."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(logging.INFO)
        self.loop = loop
        self.lines: list[str] = []
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(RuntimeError):  # the test's loop is closed: nobody waits
            self.loop.call_soon_threadsafe(self._add, record.getMessage())

    def _add(self, line: str) -> None:
        self.lines.append(line)
        self._changed.set()

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    async def wait(self, text: str, n: int = 1, within: float = DEADLINE) -> None:
        """Until `n` lines containing `text` were logged; fails after `within` s."""
        try:
            async with asyncio.timeout(within):
                while self.count(text) < n:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            pytest.fail(f"no {n} log lines with {text!r} within {within} s: {self.lines}")


@pytest.fixture
async def log_events() -> AsyncIterator[LogEvents]:
    """What asyncgrad logs at INFO and above during the test (lifecycle events)."""
    logger = logging.getLogger("asyncgrad")
    handler, level = LogEvents(asyncio.get_running_loop()), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


# *** simulated hosts (tests/test_hosts.py, tests/test_hosts_data.py) ***

ROLES = ("redis", "driver", "w1", "w2")


def listed() -> set[str]:
    """The network namespaces `ip netns list` names."""
    out = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=DEADLINE, check=True
    ).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def namespaces() -> None:
    """Skip, with the reason, where simulated hosts cannot be made."""
    try:
        with SimulatedHosts(2):
            pass
    except HostsUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture
def hosts(namespaces: None) -> Iterator[dict[str, SimulatedHost]]:
    """Four simulated hosts by role; afterwards none of the run's namespaces is listed."""
    run = SimulatedHosts(len(ROLES))
    with run as made:
        yield dict(zip(ROLES, made, strict=True))
    assert {name for name in listed() if name.startswith(run.stem)} == set()


@pytest.fixture
def redis_on_host(hosts: dict[str, SimulatedHost]) -> Iterator[EmbeddedRedis]:
    with hosts["redis"].redis(os.environ.get("ASYNCGRAD_REDIS_SERVER")) as server:
        yield server


@pytest.fixture
def on_driver_host(hosts: dict[str, SimulatedHost]) -> Iterator[None]:
    """This thread, the test's event loop's, on the driver's host for the test."""
    with hosts["driver"].entered():
        yield
