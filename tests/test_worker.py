"""Real `asyncgrad worker` processes: killed, signalled, fed garbage, measured; and the
`worker` and `status` commands."""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import msgpack
import pytest
import redis
import redis.asyncio as aredis
from rich.console import Console

from asyncgrad import dist_autograd, rpc, status
from asyncgrad.cli import main
from asyncgrad.codec import decode
from asyncgrad.errors import AsyncgradError, OutcomeUnknown, RemoteError, WorkerUnavailable
from asyncgrad.rpc import Agent
from asyncgrad.transport import (
    GROUP,
    Inbound,
    Transport,
    dead_letters,
    heartbeat,
    inbox,
    registry,
    seen,
)
from asyncgrad.transport.resp import RedisAddress
from tests import worker_funcs  # noqa: F401  (exposes test.echo in this process too)
from tests.conftest import DEADLINE, ROOT, WorkerProcess, eventually, own_namespace, redis_py

FUNCS = "tests.worker_funcs"
LIFECYCLE = [
    "imported",
    "agent_started",
    "worker_serving",
    "signal",
    "worker_draining",
    "agent_stopped",
    "worker_stopped",
]


def fields_of(line: str) -> dict[str, str]:
    """A log line as the dict its key=value fields make; fails on anything else."""
    pairs = [token.split("=", 1) for token in line.split()]
    assert all(len(p) == 2 for p in pairs), f"not key=value: {line!r}"
    return dict(pairs)


async def line_with(worker: WorkerProcess, read_line: Callable[[IO[bytes]], str], text: str) -> str:
    """The worker's next log line containing `text` (each read fails after DEADLINE s)."""
    assert worker.process.stderr is not None
    while True:
        line = await asyncio.to_thread(read_line, worker.process.stderr)
        worker.log.append(line)
        if text in line:
            return line


def exit_code(worker: WorkerProcess) -> int:
    return worker.process.wait(DEADLINE)


def rest_of_log(worker: WorkerProcess) -> list[str]:
    """All the worker's log lines, once it has exited."""
    assert worker.process.stderr is not None
    return worker.log + worker.process.stderr.read().decode().splitlines()


async def settled(client: aredis.Redis, stream: str) -> bool:
    if await client.xlen(stream):
        return False
    return int((await client.xpending(stream, GROUP))["pending"]) == 0


@pytest.fixture
def keep_log_level() -> Iterator[None]:
    """`main()` configures logging; put the asyncgrad logger's level back afterwards."""
    import logging

    logger = logging.getLogger("asyncgrad")
    level = logger.level
    yield
    logger.setLevel(level)


# *** failure detection ***


async def test_sigkill_fails_a_call_in_flight_within_the_detection_window(
    spawn_worker: Callable[..., WorkerProcess],
    make_agent: Any,
    redis_client: aredis.Redis,
    namespace: str,
) -> None:
    worker = spawn_worker("w", FUNCS)
    caller = await make_agent("caller")  # rpc_timeout 60 s: that must not be what ends it
    started = f"{namespace}:started"
    call = asyncio.create_task(caller.rpc_async("w", "test.hold", args=(started, None)))
    assert await redis_client.blpop([started], timeout=DEADLINE) is not None
    killed_at = time.monotonic()
    worker.process.kill()
    # It took the call, then died: the call may have run.
    with pytest.raises(OutcomeUnknown, match="took the call, then stopped heartbeating"):
        await asyncio.wait_for(call, 2 * DEADLINE)
    assert time.monotonic() - killed_at < 5.0
    with pytest.raises(WorkerUnavailable) as raised:  # and a new call fails at once
        await caller.rpc_async("w", "test.echo", args=(1,))
    assert raised.value.may_have_run is False


async def test_a_worker_killed_and_restarted_at_once_takes_its_name_back(
    spawn_worker: Callable[..., WorkerProcess], make_agent: Any
) -> None:
    first = spawn_worker("w", FUNCS)
    first.process.kill()
    exit_code(first)  # reaped, as by any supervisor: its pid is gone
    # Its heartbeat has not lapsed yet (3 s): the new one takes the name over at once.
    again = spawn_worker("w", FUNCS)
    assert any(f"event=name_taken_over agent=w pid={first.pid} " in line for line in again.log)
    caller = await make_agent("caller")
    assert await caller.rpc_async("w", "test.whoami", timeout=DEADLINE) == (
        caller.namespace, "w", again.pid,
    )  # fmt: skip


def test_a_second_worker_under_a_live_name_exits_1_with_one_line(
    spawn_worker: Callable[..., WorkerProcess], redis_url: str, namespace: str
) -> None:
    first = spawn_worker("w", FUNCS)
    argv = [sys.executable, "-m", "asyncgrad", "worker", "w", "--redis", redis_url]
    argv += ["--namespace", namespace, "--import", FUNCS]
    done = subprocess.run(argv, capture_output=True, timeout=DEADLINE, cwd=ROOT, check=False)
    assert done.returncode == 1
    errors = [line for line in done.stderr.decode().splitlines() if "error" in line]
    assert errors == [
        f"asyncgrad: error: agent name 'w' is taken in namespace {namespace!r}: a live agent "
        f"holds it (pid {first.pid} on host {socket.gethostname()}); stop it or pick another name"
    ]
    # The first one is untouched: still serving, still the holder of the name.
    with redis.Redis.from_url(redis_url) as client:
        assert f"pid={first.pid} " in client.get(heartbeat(namespace, "w")).decode()
    assert first.process.poll() is None


# *** signals and the lifecycle ***


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
@pytest.mark.cluster
async def test_a_signal_drains_the_call_in_flight_then_exits_0(
    signum: signal.Signals,
    spawn_worker: Callable[..., WorkerProcess],
    make_agent: Any,
    redis_client: aredis.Redis,
    namespace: str,
    read_line: Callable[[IO[bytes]], str],
) -> None:
    worker = spawn_worker("w", FUNCS)
    caller = await make_agent("caller")
    started, release = f"{namespace}:started", f"{namespace}:release"
    call = asyncio.create_task(caller.rpc_async("w", "test.hold", args=(started, release, 42)))
    assert await redis_client.blpop([started], timeout=DEADLINE) is not None
    worker.process.send_signal(signum)
    await line_with(worker, read_line, "event=worker_draining")
    assert not call.done()
    await redis_client.rpush(release, 1)
    assert await asyncio.wait_for(call, DEADLINE) == 42
    assert await asyncio.to_thread(exit_code, worker) == 0
    lines = [fields_of(line) for line in rest_of_log(worker)]
    # One line per lifecycle event, in order (other INFO lines may come between).
    assert [f["event"] for f in lines if f["event"] in LIFECYCLE] == LIFECYCLE
    assert {f["level"] for f in lines} == {"INFO"}
    by_event = {f["event"]: f for f in lines}
    assert by_event["imported"]["module"] == FUNCS
    assert by_event["worker_serving"]["pid"] == str(worker.pid)
    assert by_event["signal"]["signal"] == signum.name
    assert by_event["worker_draining"]["graceful"] == "True"
    # It left cleanly: no heartbeat, no inbox, no registry entry (status lists it no more).
    keys = (inbox(namespace, "w"), heartbeat(namespace, "w"), seen(namespace, "w"))
    assert await redis_client.exists(*keys) == 0
    assert set(await redis_client.hkeys(registry(namespace))) == {b"n:caller", b"i:1"}
    assert [i.name for i in await caller.workers()] == ["caller"]


async def test_a_second_signal_stops_without_waiting_for_the_drain(
    spawn_worker: Callable[..., WorkerProcess],
    make_agent: Any,
    redis_client: aredis.Redis,
    namespace: str,
    read_line: Callable[[IO[bytes]], str],
) -> None:
    worker = spawn_worker("w", FUNCS)
    caller = await make_agent("caller")
    started = f"{namespace}:started"
    call = asyncio.create_task(caller.rpc_async("w", "test.hold", args=(started, None)))
    assert await redis_client.blpop([started], timeout=DEADLINE) is not None
    worker.process.send_signal(signal.SIGTERM)
    await line_with(worker, read_line, "event=worker_draining")
    stopping_at = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    # It did not drain: not a clean stop, so not 0 (128 + SIGTERM, as if killed by it).
    assert await asyncio.to_thread(exit_code, worker) == 128 + signal.SIGTERM
    assert time.monotonic() - stopping_at < DEADLINE
    lines = [fields_of(line) for line in rest_of_log(worker)]
    expected = [*LIFECYCLE[:5], "signal", "agent_stopped", "worker_stopped"]
    assert [f["event"] for f in lines if f["event"] in LIFECYCLE] == expected
    stopped = next(f for f in lines if f["event"] == "worker_stopped")
    assert (stopped["level"], stopped["drained"], stopped["signal"]) == (
        "WARNING", "False", "SIGTERM",
    )  # fmt: skip
    with pytest.raises(WorkerUnavailable):  # its heartbeat is gone: the caller learns at once
        await asyncio.wait_for(call, DEADLINE)


@pytest.mark.parametrize(
    ("module", "says"),
    [
        ("tests.no_such_module", "ModuleNotFoundError: No module named 'tests.no_such_module'"),
        ("tests.worker_broken", "RuntimeError: broken on purpose"),
    ],
)
def test_a_bad_import_exits_1_with_one_clear_line(
    module: str, says: str, redis_url: str, namespace: str
) -> None:
    argv = [sys.executable, "-m", "asyncgrad", "worker", "w", "--redis", redis_url]
    argv += ["--namespace", namespace, "--import", module]
    done = subprocess.run(argv, capture_output=True, timeout=DEADLINE, cwd=ROOT, check=False)
    assert done.returncode == 1
    assert done.stderr.decode().splitlines() == [
        f"asyncgrad: error: cannot import {module!r}: {says}"
    ]


def test_a_bad_import_in_process(
    redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str], keep_log_level: None
) -> None:
    argv = ["worker", "w", "--redis", redis_url, "--namespace", namespace]
    assert main([*argv, "--import", "tests.no_such_module"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "asyncgrad: error: cannot import 'tests.no_such_module': "
        "ModuleNotFoundError: No module named 'tests.no_such_module'"
    ]


def test_a_worker_with_redis_unreachable_exits_1_with_one_line(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "asyncgrad", "worker", "w", "--redis"]
    argv += [f"unix://{tmp_path}/no.sock"]
    done = subprocess.run(argv, capture_output=True, timeout=DEADLINE, cwd=ROOT, check=False)
    assert done.returncode == 1
    (line,) = done.stderr.decode().splitlines()
    assert line.startswith("asyncgrad: error: cannot connect to Redis at unix://")


def _cpu_seconds(pid: int) -> float:
    # Fields after the command name, which ends at the last ")": utime and stime are
    # fields 14 and 15 of /proc/PID/stat, in clock ticks.
    after = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(after[11]) + int(after[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
def test_an_idle_worker_uses_no_measurable_cpu(
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    worker = spawn_worker("w", FUNCS)
    pidfd = os.pidfd_open(worker.pid)
    try:
        before, started = _cpu_seconds(worker.pid), time.monotonic()
        # Idleness is the condition measured: this waits out a deadline on purpose, and
        # fails at once if the worker exits meanwhile.
        exited, _, _ = select.select([pidfd], [], [], 2.5)
        used, elapsed = _cpu_seconds(worker.pid) - before, time.monotonic() - started
    finally:
        os.close(pidfd)
    assert not exited, "the worker exited while idle"
    print(f"idle worker: {used * 1000:.0f} ms of CPU in {elapsed:.2f} s")
    assert used / elapsed < 0.01


# *** garbage in the inbox ***


def _header(kind: int, message_id: int, sender: str = "forger", **more: Any) -> bytes:
    return msgpack.packb({"k": kind, "i": message_id, "s": sender, **more})


_ARRAY_HEAD = struct.Struct("<BBB5s2Q")
_TUPLE = msgpack.ExtType(1, b"")


def _call(*args: Any) -> bytes:
    return msgpack.packb({"f": "test.echo", "a": [_TUPLE, *args]})


_RANDOM = random.Random(20261126)
# Each is the fields of one stream entry; every one must end as one dead letter.
GARBAGE: dict[str, dict[bytes, bytes]] = {
    "random fields": {_RANDOM.randbytes(16): _RANDOM.randbytes(64)},
    "random frames": {b"m": _RANDOM.randbytes(64), b"f": _RANDOM.randbytes(64)},
    "truncated header": {b"m": _header(1, 11)[:-3], b"f": _call(1)},
    "header fields of wrong types": {b"m": msgpack.packb({"k": "1", "i": 1, "s": 5}), b"f": b""},
    "header fields of wrong names": {b"m": msgpack.packb({"kind": 1, "id": 1}), b"f": b""},
    "unknown kind": {b"m": _header(99, 12), b"f": _call(1)},
    "header alone": {b"m": _header(1, 13)},
    "header declaring 4 GiB": {b"m": b"\xc6\xff\xff\xff\xff" + bytes(16), b"f": _call(1)},
    "context record not a list": {b"m": _header(1, 15, c="context"), b"f": _call(1)},
    "reply of garbage": {b"m": _header(2, 14, r=1), b"f": b"\xc1\xc1"},
    "gradient without its fields": {b"m": _header(16, 16), b"f": msgpack.packb({"c": 1})},
    "pass start of wrong types": {b"m": _header(17, 17), b"f": msgpack.packb({"c": 1, "p": "2"})},
}
# These headers are valid CALLs from "forger": it must get a CodecError reply to each.
BAD_CALLS: dict[str, dict[bytes, bytes]] = {
    "truncated payload": {b"m": _header(1, 21), b"f": _call(1)[:-2]},
    "absurd tensor shape": {
        b"m": _header(1, 22),
        b"f": _call(msgpack.ExtType(0, _ARRAY_HEAD.pack(0, 10, 2, bytes(5), 2**40, 2**40))),
    },
    "out-of-band frame that is not there": {
        b"m": _header(1, 23),
        b"f": _call(msgpack.ExtType(0, _ARRAY_HEAD.pack(1, 10, 2, bytes(5), 2, 2) + b"\x05\0\0\0")),
    },
    "payload declaring 4 GiB": {
        b"m": _header(1, 24),
        b"f": b"\x82\xa1f\xa9test.echo\xa1a\xc6\xff\xff\xff\xff" + bytes(16),
    },
    "map declaring 2**32 entries": {b"m": _header(1, 25), b"f": b"\xdf\xff\xff\xff\xff"},
    "arguments not a tuple": {
        b"m": _header(1, 26),
        b"f": msgpack.packb({"f": "test.echo", "a": 1}),
    },
}


class Inbox:
    """The forger's own inbox, read through a Transport: the replies it gets."""

    def __init__(self) -> None:
        self.replies: list[tuple[dict[str, Any], Any]] = []
        self._changed = asyncio.Event()

    def __call__(self, batch: list[Inbound]) -> None:
        for message in batch:
            self.replies.append((msgpack.unpackb(message.frames[0]), decode(message.frames[1])))
        self._changed.set()

    async def wait(self, n: int) -> None:
        async with asyncio.timeout(DEADLINE):
            while len(self.replies) < n:
                self._changed.clear()
                await self._changed.wait()


@pytest.mark.timeout(20)
async def test_garbage_in_a_worker_inbox_is_dead_lettered_and_it_keeps_serving(
    spawn_worker: Callable[..., WorkerProcess],
    make_agent: Any,
    redis_client: aredis.Redis,
    redis_url: str,
    namespace: str,
) -> None:
    worker = spawn_worker("w", FUNCS)
    caller = await make_agent("caller")
    forger_inbox = Inbox()
    forger = Transport(RedisAddress.from_url(redis_url), namespace, "forger", forger_inbox)
    await forger.start()
    w_inbox, dead = inbox(namespace, "w"), dead_letters(namespace, "w")
    try:
        cases = {**GARBAGE, **BAD_CALLS}
        for n, (case, fields) in enumerate(cases.items(), start=1):
            entry = await redis_client.xadd(w_inbox, fields)  # type: ignore[arg-type]
            await eventually(lambda n=n: _has(redis_client, dead, n), f"{case}: dead-lettered")
            await eventually(lambda: settled(redis_client, w_inbox), f"{case}: acked, deleted")
            *_, (_, letter) = await redis_client.xrange(dead)
            assert letter[b"entry"] == entry, case
            assert await caller.rpc_async("w", "test.echo", args=(n,)) == n, case
        await forger_inbox.wait(len(BAD_CALLS))
    finally:
        await forger.close()
    assert worker.process.poll() is None
    # Each malformed call with a valid header got an error reply, naming the codec.
    replied_to = sorted(header["r"] for header, _ in forger_inbox.replies)
    assert replied_to == [21, 22, 23, 24, 25, 26]
    for header, payload in forger_inbox.replies:
        assert header["k"] == 2 and header["s"] == "w"
        kind, text, _ = payload["e"]
        assert kind == "CodecError", text
    reasons = [letter[b"reason"].decode() for _, letter in await redis_client.xrange(dead)]
    expected = ["entry is not a list of m/f fields", *["bad header"] * 8, "bad reply"]
    expected += ["bad GRAD", "bad PASS_START", *["bad call"] * len(BAD_CALLS)]
    assert len(reasons) == len(expected)
    for reason, start in zip(reasons, expected, strict=True):
        assert reason.startswith(start), (reason, start)


async def _has(client: aredis.Redis, stream: str, n: int) -> bool:
    return bool(await client.xlen(stream) >= n)


# *** Redis keeps no trace of traffic ***


async def _snapshot(client: aredis.Redis, namespace: str) -> tuple[list[bytes], int]:
    keys = sorted([k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)])
    return keys, int((await client.info("memory"))["used_memory"])


@pytest.mark.timeout(40)
async def test_ten_thousand_calls_leave_no_growth_in_redis(
    spawn_worker: Callable[..., WorkerProcess],
    make_agent: Any,
    redis_client: aredis.Redis,
    namespace: str,
) -> None:
    spawn_worker("w", FUNCS)
    caller = await make_agent("caller")
    inboxes = [inbox(namespace, "w"), inbox(namespace, "caller")]
    payload = {"x": list(range(16)), "s": "y" * 64}
    assert await caller.rpc_async("w", "test.echo", args=(payload,)) == payload
    for stream in inboxes:
        await eventually(lambda s=stream: settled(redis_client, s), f"{stream} drained")
    keys_before, memory_before = await _snapshot(redis_client, namespace)
    started = time.monotonic()
    for _ in range(20):
        replies = await asyncio.gather(
            *(caller.rpc_async("w", "test.echo", args=(payload,)) for _ in range(500))
        )
        assert replies == [payload] * 500
    elapsed = time.monotonic() - started
    for stream in inboxes:
        await eventually(lambda s=stream: settled(redis_client, s), f"{stream} drained")
    keys_after, memory_after = await _snapshot(redis_client, namespace)
    print(
        f"10,000 calls in {elapsed:.2f} s; used_memory {memory_before} -> {memory_after} "
        f"({memory_after - memory_before:+d} bytes); keys {len(keys_before)}"
    )
    assert keys_after == keys_before
    assert memory_after - memory_before < 256 * 1024


# *** namespaces and what may be called ***


@pytest.fixture
def other_namespace(redis_url: str) -> Iterator[str]:
    with own_namespace(redis_url) as ns:
        yield ns


async def test_namespaces_are_isolated(
    spawn_worker: Callable[..., WorkerProcess],
    make_agent: Any,
    namespace: str,
    other_namespace: str,
    redis_client: aredis.Redis,
) -> None:
    mine = spawn_worker("w", FUNCS)
    theirs = spawn_worker("w", FUNCS, extra_args=("--namespace", other_namespace))
    caller = await make_agent("caller")
    other_caller = await make_agent("caller", namespace=other_namespace)
    await make_agent("only-theirs", namespace=other_namespace)
    assert await caller.rpc_async("w", "test.whoami") == (namespace, "w", mine.pid)
    assert await other_caller.rpc_async("w", "test.whoami") == (other_namespace, "w", theirs.pid)
    with pytest.raises(WorkerUnavailable, match="only-theirs"):
        await caller.rpc_async("only-theirs", "test.echo", args=(1,))
    assert sorted(i.name for i in await caller.workers()) == ["caller", "w"]
    assert sorted(i.name for i in await other_caller.workers()) == ["caller", "only-theirs", "w"]
    keys = [k async for k in redis_client.scan_iter(match=f"{namespace}:*")]
    assert keys and not any(other_namespace.encode() in k for k in keys)


async def test_unexposed_names_never_run_anything(
    spawn_worker: Callable[..., WorkerProcess], make_agent: Any, tmp_path: Path
) -> None:
    spawn_worker("w", FUNCS)
    caller = await make_agent("caller")
    marker = tmp_path / "ran"
    touch = f"touch {marker}"
    attempts: list[tuple[Any, tuple[Any, ...]]] = [
        ("os:system", (touch,)),
        ("posix:system", (touch,)),
        (os.system, (touch,)),
        ("os.system", (touch,)),
        ("subprocess:getoutput", (touch,)),
        ("subprocess:Popen", (["touch", str(marker)],)),
        ("builtins:exec", (f"import os; os.system({touch!r})",)),
        ("builtins:eval", (f"__import__('os').system({touch!r})",)),
        ("tests.worker_funcs:os.system", (touch,)),
        ("tests.worker_funcs:asyncio.subprocess.create_subprocess_shell", (touch,)),
        ("test.echo.__globals__", (touch,)),
    ]
    for fn, args in attempts:
        with pytest.raises(RemoteError) as caught:
            await caller.rpc_async("w", fn, args=args)
        assert caught.value.remote_type == "NotExposedError", fn
    assert not marker.exists()
    assert await caller.rpc_async("w", "test.echo", args=(touch,)) == touch


# *** connections killed under a worker process ***


@pytest.mark.parametrize("roles", [("reader",), ("writer",), ("reader", "writer")], ids="+".join)
async def test_client_kill_of_a_worker_process_during_traffic(
    roles: tuple[str, ...],
    spawn_worker: Callable[..., WorkerProcess],
    make_agent: Any,
    redis_client: aredis.Redis,
    namespace: str,
) -> None:
    """300 lanes of calls; the worker's connections die twice while they run."""
    worker = spawn_worker("w", FUNCS)
    caller = await make_agent("caller")
    names = [f"asyncgrad:{namespace}:w:{role}" for role in roles]
    lanes, per_lane = 300, 4
    total = lanes * per_lane
    finished = 0
    quarter, half = asyncio.Event(), asyncio.Event()

    async def kill_twice() -> list[int]:
        """Kill at a quarter of the calls; again at half, once new connections are up."""
        await quarter.wait()
        first = [c["id"] for c in await redis_client.client_list() if c["name"] in names]
        for client_id in first:
            await redis_client.client_kill_filter(_id=client_id)
        await half.wait()
        while True:  # each check is a round trip to Redis
            listed = await redis_client.client_list()
            second = [c["id"] for c in listed if c["name"] in names and c["id"] not in first]
            if len(second) == len(names):
                break
        for client_id in second:
            await redis_client.client_kill_filter(_id=client_id)
        return [len(first), len(second)]

    async def lane(i: int) -> list[Any]:
        nonlocal finished
        results: list[Any] = []
        for j in range(per_lane):
            try:
                results.append(await caller.rpc_async("w", "test.echo", args=((i, j),)))
            except AsyncgradError as e:
                results.append(e)
            finished += 1
            if finished == total // 4:
                quarter.set()
            elif finished == total // 2:
                half.set()
        return results

    killer = asyncio.create_task(kill_twice())
    tasks = [asyncio.create_task(lane(i)) for i in range(lanes)]
    _, hanging = await asyncio.wait(tasks, timeout=DEADLINE)
    for task in hanging:
        task.cancel()
    assert not hanging, f"{len(hanging)} of {lanes} lanes still waiting after {DEADLINE} s"
    assert await asyncio.wait_for(killer, DEADLINE) == [len(roles), len(roles)]
    results = [r for task in tasks for r in task.result()]
    expected = [(i, j) for i in range(lanes) for j in range(per_lane)]
    for got, wanted in zip(results, expected, strict=True):
        assert got == wanted or isinstance(got, AsyncgradError), (got, wanted)
    assert await caller.rpc_async("w", "test.echo", args=("after",), timeout=DEADLINE) == "after"
    for stream in (inbox(namespace, "w"), inbox(namespace, "caller")):
        await eventually(lambda s=stream: settled(redis_client, s), f"{stream} drained")
    assert worker.process.poll() is None


# *** asyncgrad status ***


@pytest.mark.cluster
async def test_status_collects_a_live_worker_its_backlog_pending_and_dead_letters(
    spawn_worker: Callable[..., WorkerProcess],
    make_agent: Any,
    redis_client: aredis.Redis,
    redis_url: str,
    namespace: str,
) -> None:
    spawn_worker("w", FUNCS)
    caller = await make_agent("caller")
    started, release = f"{namespace}:started", f"{namespace}:release"
    call = asyncio.create_task(caller.rpc_async("w", "test.hold", args=(started, release, 1)))
    assert await redis_client.blpop([started], timeout=DEADLINE) is not None
    await redis_client.xadd(inbox(namespace, "w"), {b"junk": b"\xff"})
    await eventually(lambda: _has(redis_client, dead_letters(namespace, "w"), 1), "dead letter")
    rows = {r.name: r for r in await status.collect(redis_url, namespace)}
    assert set(rows) == {"caller", "w"}
    w = rows["w"]
    assert w.alive and w.id == 0
    assert w.heartbeat_age_s is not None and 0 <= w.heartbeat_age_s < 3.0
    # The held call's entry is still there, delivered and not acked.
    assert (w.backlog, w.pending, w.dead_letters) == (1, 1, 1)
    await redis_client.rpush(release, 1)
    assert await asyncio.wait_for(call, DEADLINE) == 1
    await eventually(lambda: settled(redis_client, inbox(namespace, "w")), "drained")
    w = next(r for r in await status.collect(redis_url, namespace) if r.name == "w")
    assert (w.backlog, w.pending, w.dead_letters) == (0, 0, 1)


@pytest.mark.cluster
async def test_status_shows_the_contexts_open_on_each_agent(
    make_agent: Any, redis_url: str, namespace: str
) -> None:
    """Each agent publishes its count at every heartbeat (every 0.15 s here); leaving a
    context releases it on the worker it reached too. An agent that stopped cleanly is
    not listed."""
    await make_agent("w", failure_timeout=1.0)
    gone = await make_agent("gone", failure_timeout=1.0)
    await gone.shutdown()

    async def contexts_are(expected: dict[str, int | None]) -> None:
        async def probe() -> bool:
            rows = await status.collect(redis_url, namespace)
            return {r.name: r.contexts for r in rows} == expected

        await eventually(probe, f"contexts {expected}")

    async with Agent("trainer", redis_url=redis_url, namespace=namespace, failure_timeout=1.0):
        await contexts_are({"w": 0, "trainer": 0})
        async with dist_autograd.context(), dist_autograd.context():
            # A call made in a context opens it on the callee too.
            assert await rpc.rpc_async("w", "test.echo", args=(1,)) == 1
            await contexts_are({"w": 1, "trainer": 2})
        await contexts_are({"w": 0, "trainer": 0})


def _table_rows(out: str) -> dict[str, list[str]]:
    """The rows of `status` printed to a pipe: plain columns, two spaces or more apart."""
    lines = out.splitlines()
    assert lines[0].startswith("asyncgrad namespace ") and lines[1].startswith("worker  ")
    assert "│" not in out
    return {cells[0]: cells[1:] for line in lines[2:] if (cells := re.split(r"\s{2,}", line))}


LONG = "trainer-with-a-name-longer-than-the-rest"


@pytest.mark.timeout(20)
def test_status_json_lists_live_and_recently_gone_workers_and_gone_for_drops_them(
    spawn_worker: Callable[..., WorkerProcess],
    redis_url: str,
    namespace: str,
    capsys: pytest.CaptureFixture[str],
    keep_log_level: None,
) -> None:
    spawn_worker(LONG, FUNCS)
    crashed = spawn_worker("crashed", FUNCS, extra_args=("--failure-timeout", "1"))
    crashed.process.kill()  # no goodbye: its heartbeat lapses (0.6 s), its entry stays
    crashed.process.wait(DEADLINE)
    argv = ["status", "--redis", redis_url, "--namespace", namespace, "--json"]

    def reading(*extra: str) -> dict[str, Any]:
        assert main([*argv, *extra]) == 0
        out = capsys.readouterr().out
        assert out.count("\n") == 1  # one JSON object, on one line
        parsed: dict[str, Any] = json.loads(out)
        assert list(parsed) == ["namespace", "workers"]
        assert parsed["namespace"] == namespace
        return parsed

    deadline = time.monotonic() + DEADLINE
    while (gone := {w["name"]: w for w in reading()["workers"]})["crashed"]["alive"]:
        assert time.monotonic() < deadline, "the killed worker's heartbeat did not lapse"
    live = gone[LONG]
    assert (live["id"], live["alive"], live["gone_for_s"]) == (0, True, None)
    assert 0 <= live["heartbeat_age_s"] < 3.0
    assert (live["contexts"], live["backlog"], live["pending"], live["dead_letters"]) == (0,) * 4
    assert isinstance(live["received"], int)
    dead = gone["crashed"]
    assert (dead["id"], dead["alive"], dead["heartbeat_age_s"], dead["contexts"]) == (
        1, False, None, None,
    )  # fmt: skip
    assert 0 <= dead["gone_for_s"] < DEADLINE
    # Gone longer than --gone-for: not listed.
    assert [w["name"] for w in reading("--gone-for", "0.001")["workers"]] == [LONG]
    # The same, for people: the name whole, the gone one said so.
    assert main(argv[:-1]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert rows[LONG][:2] == ["0", "yes"]
    assert re.fullmatch(r"gone \d+ s", rows["crashed"][1])


@pytest.mark.parametrize("width", [60, 200])
async def test_status_table_never_cuts_a_name_on_a_narrow_terminal(
    width: int, make_agent: Any, redis_url: str, namespace: str
) -> None:
    await make_agent(LONG)
    await make_agent(LONG.replace("trainer", "another"))
    rows = await status.collect(redis_url, namespace)
    console = Console(file=io.StringIO(), force_terminal=True, width=width, color_system=None)
    status.render(rows, namespace, console)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert LONG in out and LONG.replace("trainer", "another") in out
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= width
    assert ("┃" in out) == (width == 200)  # the narrow one: one paragraph per agent


def test_status_of_an_empty_namespace_names_those_that_have_agents(
    spawn_worker: Callable[..., WorkerProcess],
    redis_url: str,
    namespace: str,
    capsys: pytest.CaptureFixture[str],
    keep_log_level: None,
) -> None:
    spawn_worker("w", FUNCS)
    typo = namespace + "-typo"
    assert main(["status", "--redis", redis_url, "--namespace", typo]) == 0
    out, err = capsys.readouterr()
    assert _table_rows(out) == {}
    (line,) = err.splitlines()
    address = RedisAddress.from_url(redis_url)
    assert line.startswith(f"asyncgrad status: no agents in namespace {typo!r} at {address}")
    listed = line.split("namespaces with live agents there: ")[1].split(", ")
    assert namespace in listed or listed[-1].endswith("more")


@pytest.mark.timeout(20)
async def test_status_watch_shows_rates_and_ctrl_c_ends_it_with_0(
    spawn_worker: Callable[..., WorkerProcess], make_agent: Any, redis_url: str, namespace: str
) -> None:
    spawn_worker("w", FUNCS)
    caller = await make_agent("caller")
    argv = ["status", "--redis", redis_url, "--namespace", namespace]
    watch = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncgrad", *argv, "--watch", "--json", "--interval", "0.2",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    assert watch.stdout is not None and watch.stderr is not None
    readings: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def read() -> None:
        assert watch.stdout is not None
        while line := await watch.stdout.readline():
            await readings.put(json.loads(line))

    reader = asyncio.create_task(read())
    try:
        rates: dict[str, float | None] = {}
        while not rates.get("w"):  # until a reading has a rate of messages w received
            for _ in range(20):
                assert await caller.rpc_async("w", "test.echo", args=(1,)) == 1
            while not readings.empty():
                reading = readings.get_nowait()
                rates = {w["name"]: w["received_per_s"] for w in reading["workers"]}
        watch.send_signal(signal.SIGINT)
        async with asyncio.timeout(DEADLINE):
            err = await watch.stderr.read()
            assert await watch.wait() == 0, err
    finally:
        if watch.returncode is None:
            watch.kill()
            await watch.wait()
        await reader
    assert err == b""
    assert (rates["w"] or 0) > 0


@pytest.mark.cluster
def test_status_command_shows_the_worker_and_counts_a_dead_letter(
    spawn_worker: Callable[..., WorkerProcess],
    redis_url: str,
    namespace: str,
    capsys: pytest.CaptureFixture[str],
    keep_log_level: None,
    read_line: Callable[[IO[bytes]], str],
) -> None:
    worker = spawn_worker("w", FUNCS)
    argv = ["status", "--redis", redis_url, "--namespace", namespace]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert namespace in out
    (worker_id, alive, age, backlog, pending, dead, contexts) = _table_rows(out)["w"]
    assert (worker_id, alive, backlog, pending, dead, contexts) == ("0", "yes", "0", "0", "0", "0")
    assert age.endswith(" s") and float(age[:-2]) < 3.0
    with redis_py(redis_url) as client:
        client.xadd(inbox(namespace, "w"), {b"\xff": b"\x00"})
        # Wait on the worker's own report of it, not on a timer.
        assert worker.process.stderr is not None
        while "event=dead_letter" not in (line := read_line(worker.process.stderr)):
            worker.log.append(line)
    assert main(argv) == 0
    assert _table_rows(capsys.readouterr().out)["w"][-2] == "1"
    # The real entry point, once.
    done = subprocess.run(
        [sys.executable, "-m", "asyncgrad", *argv],
        capture_output=True,
        timeout=DEADLINE,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (worker_id, alive, _, backlog, pending, dead, _) = _table_rows(done.stdout.decode())["w"]
    assert (worker_id, alive, backlog, pending, dead) == ("0", "yes", "0", "0", "1")


def test_status_with_redis_unreachable_exits_1_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keep_log_level: None
) -> None:
    assert main(["status", "--redis", f"unix://{tmp_path}/no.sock"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("asyncgrad: error: cannot connect to Redis")
