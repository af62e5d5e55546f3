"""The failure semantics (README.md, "When things fail"), tried on real processes and a
Redis of this module's own.

Each test does the fault to real things (SIGSTOP/SIGCONT, SIGKILL, `DEBUG SLEEP`,
`CLIENT PAUSE`, `maxmemory`, garbage written into an inbox) and states what the caller
saw, how fast, and that nothing was freed, lost or applied twice. Agents run with
`failure_timeout=1.0`: suspicion in about 0.8 s. The Redis is this module's own, started
with `--enable-debug-command local`, because the faults change its configuration.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aredis

import asyncgrad as ag
from asyncgrad import dist_autograd, optim, rpc
from asyncgrad.transport import dead_letters, inbox
from asyncgrad.transport.writer import DEAD_LETTER_BYTES
from tests import fault_funcs
from tests.conftest import DEADLINE, WorkerProcess, eventually
from tests.security_fixtures import start_server_taking

FUNCS = "tests.fault_funcs"
FAST = ("--failure-timeout", "1")

pytestmark = pytest.mark.timeout(40)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """This module's own Redis: the tests pause it, fill it and sleep it."""
    server = start_server_taking(["--enable-debug-command", "local"])
    try:
        yield f"redis://127.0.0.1:{server.port}/0"
    finally:
        server.stop()


def wait_for_line(worker: WorkerProcess, read_line: Callable[..., str], text: str) -> str:
    """The next line of the worker's log holding `text` (fails after DEADLINE s per line)."""
    assert worker.process.stderr is not None
    while True:
        line = read_line(worker.process.stderr)
        worker.log.append(line)
        if text in line:
            return line


def logged(worker: WorkerProcess, text: str) -> bool:
    """Whether the worker logged `text` so far (its lines already written are read)."""
    assert worker.process.stderr is not None
    fd = worker.process.stderr.fileno()
    while select.select([fd], [], [], 0)[0] and (chunk := os.read(fd, 65536)):
        worker.log += chunk.decode(errors="replace").splitlines()
    return any(text in line for line in worker.log)


async def once_back(driver: rpc.Agent, to: str, fn: str, *args: Any) -> Any:
    """The call, once `to` beats again: until then it is suspected, and each attempt fails
    at once with `WorkerUnavailable` (it did not run: safe to repeat)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            return await driver.rpc_async(to, fn, args=args)
        except ag.WorkerUnavailable as e:
            if e.may_have_run or time.monotonic() > deadline:
                raise


async def holder_setup(
    spawn_worker: Callable[..., WorkerProcess], make_agent: Any, *ps_args: str
) -> tuple[WorkerProcess, WorkerProcess, rpc.Agent]:
    """`ps` owns a Counter that `holder` holds (and has used once)."""
    ps = spawn_worker("ps", FUNCS, extra_args=(*FAST, *ps_args))
    holder = spawn_worker("holder", FUNCS, extra_args=FAST)
    driver = await make_agent("driver", failure_timeout=1.0)
    await driver.rpc_async("holder", "fault.keep", args=("ps",))
    assert await driver.rpc_async("holder", "fault.use") == ("ok", 1)
    assert await driver.rpc_async("ps", "fault.owned") == 1
    return ps, holder, driver


# *** suspicion is not death ***


async def test_a_paused_holder_keeps_what_it_holds(
    spawn_worker: Callable[..., WorkerProcess], make_agent: Any, read_line: Callable[..., str]
) -> None:
    ps, holder, driver = await holder_setup(spawn_worker, make_agent)
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        # ps suspects it (a GC pause, a container freeze, a debugger look the same)...
        wait_for_line(ps, read_line, "event=suspected")
        # ...and keeps its value for as long as the pause lasts: 3 s, five windows.
        await asyncio.sleep(3.0)  # the fault's length, not a wait for an event
        assert await driver.rpc_async("ps", "fault.owned") == 1
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    assert await once_back(driver, "holder", "fault.use") == ("ok", 2)
    wait_for_line(ps, read_line, "event=unsuspected")
    assert not logged(ps, "event=holder_released")


async def test_a_holder_away_longer_than_its_lease_hears_rref_released(
    spawn_worker: Callable[..., WorkerProcess], make_agent: Any, read_line: Callable[..., str]
) -> None:
    ps, holder, driver = await holder_setup(spawn_worker, make_agent, "--rref-lease", "1.5")
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        line = wait_for_line(ps, read_line, "event=holder_released")
        assert "holder=holder rrefs_freed=1" in line
        assert await driver.rpc_async("ps", "fault.owned") == 0
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    kind, message, may_have_run, is_lookup_error = await once_back(driver, "holder", "fault.use")
    assert (kind, may_have_run, is_lookup_error) == ("released", False, True)
    assert "rref_lease (1.5 s)" in message and "unreachable for" in message


@pytest.mark.parametrize(
    "stall",
    [
        pytest.param(("DEBUG", "SLEEP", "3"), id="debug-sleep-3s"),
        pytest.param(("CLIENT", "PAUSE", "4000", "WRITE"), id="client-pause-4s-write"),
    ],
)
async def test_a_redis_stall_is_nobodys_death(
    stall: tuple[str, ...],
    spawn_worker: Callable[..., WorkerProcess],
    make_agent: Any,
    redis_client: aredis.Redis,
    namespace: str,
) -> None:
    ps, holder, driver = await holder_setup(spawn_worker, make_agent)
    began = time.monotonic()
    await redis_client.execute_command(*stall)
    # A write waits out a write pause: when it returns, the stall is over.
    await redis_client.set(f"{namespace}:after-stall", 1)
    assert time.monotonic() - began >= 2.9
    # Every agent missed beats, all alike: nothing is freed, nobody is suspected for it.
    assert await driver.rpc_async("holder", "fault.use") == ("ok", 2)
    assert await driver.rpc_async("ps", "fault.owned") == 1
    # Nor later, when every agent can tell again (a window and a check after the stall).
    await asyncio.sleep(1.0)  # an observation period, not a wait for an event
    assert not logged(ps, "event=suspected") and not logged(holder, "event=suspected")
    assert not logged(ps, "event=holder_released")
    assert ps.process.poll() is None and holder.process.poll() is None


# *** every call error says whether the call may have run ***


async def test_a_killed_worker_fails_a_call_made_at_once_as_not_run_within_1_5_s(
    spawn_worker: Callable[..., WorkerProcess], make_agent: Any, redis_client: aredis.Redis,
    namespace: str,
) -> None:  # fmt: skip
    worker = spawn_worker("w", FUNCS, extra_args=FAST)
    driver = await make_agent("driver", failure_timeout=1.0)
    ran = f"{namespace}:ran"
    assert await driver.rpc_async("w", "fault.record", args=(ran, 1)) == 1
    worker.process.kill()
    worker.process.wait(DEADLINE)
    began = time.monotonic()
    with pytest.raises(ag.WorkerUnavailable) as raised:
        await driver.rpc_async("w", "fault.record", args=(ran, 2))
    elapsed = time.monotonic() - began
    assert raised.value.may_have_run is False
    assert elapsed < 1.5, elapsed
    # It was withdrawn: the worker started again under the name never runs it.
    spawn_worker("w", FUNCS, extra_args=FAST)
    assert await driver.rpc_async("w", "fault.record", args=(ran, 3)) == 3
    assert await redis_client.lrange(ran, 0, -1) == [b"1", b"3"]


async def test_a_new_incarnation_refuses_a_call_for_the_one_before(
    spawn_worker: Callable[..., WorkerProcess], make_agent: Any, redis_client: aredis.Redis,
    namespace: str,
) -> None:  # fmt: skip
    # Slow detection, so the call waits in the inbox for the restarted worker.
    worker = spawn_worker("w", FUNCS)
    driver = await make_agent("driver")
    ran = f"{namespace}:ran"
    assert await driver.rpc_async("w", "fault.record", args=(ran, 1)) == 1
    worker.process.kill()
    worker.process.wait(DEADLINE)
    # Once Redis saw its connections close: else a read still blocked on a dead socket
    # may take the call (and the new incarnation would rightly say it may have run).
    gone = {f"asyncgrad:{namespace}:w:{role}" for role in ("reader", "writer", "heartbeat")}
    while gone & {c["name"] for c in await redis_client.client_list()}:
        pass
    call = asyncio.ensure_future(driver.rpc_async("w", "fault.record", args=(ran, 2)))
    # It waits in the inbox, addressed to the killed incarnation, when the new one starts.
    while not await redis_client.xlen(inbox(namespace, "w")):
        assert not call.done(), call
    spawn_worker("w", FUNCS)
    with pytest.raises(ag.WorkerUnavailable, match="was started again") as raised:
        await call
    assert raised.value.may_have_run is False
    assert await redis_client.lrange(ran, 0, -1) == [b"1"]


async def test_a_worker_that_took_the_call_and_froze_gives_outcome_unknown(
    spawn_worker: Callable[..., WorkerProcess], make_agent: Any, redis_client: aredis.Redis,
    namespace: str,
) -> None:  # fmt: skip
    worker = spawn_worker("w", FUNCS, extra_args=FAST)
    driver = await make_agent("driver", failure_timeout=1.0)
    started, release = f"{namespace}:started", f"{namespace}:release"
    call = asyncio.ensure_future(driver.rpc_async("w", "fault.hold", args=(started, release)))
    await redis_client.blpop([started], DEADLINE)
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        with pytest.raises(ag.OutcomeUnknown) as raised:
            await call
        assert raised.value.may_have_run is True
        assert time.monotonic() - began < 1.5
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    await redis_client.rpush(release, 1)


async def test_a_late_call_is_dropped_never_run(
    spawn_worker: Callable[..., WorkerProcess], make_agent: Any, redis_client: aredis.Redis,
    namespace: str,
) -> None:  # fmt: skip
    worker = spawn_worker("w", FUNCS)
    driver = await make_agent("driver")
    ran = f"{namespace}:ran"
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        with pytest.raises(ag.RPCTimeout) as raised:
            await driver.rpc_async("w", "fault.record", args=(ran, 1), timeout=0.5)
        assert raised.value.may_have_run is True
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    # The worker reads it on waking, past its deadline: it drops it.
    assert await driver.rpc_async("w", "fault.record", args=(ran, 2)) == 2
    assert await redis_client.lrange(ran, 0, -1) == [b"2"]


# *** exactly-once optimizer steps ***


async def test_a_step_retried_after_outcome_unknown_applies_once(
    spawn_worker: Callable[..., WorkerProcess], redis_client: aredis.Redis, namespace: str,
    redis_url: str,
) -> None:  # fmt: skip
    ps = spawn_worker("ps", FUNCS, "asyncgrad.workloads.param_server", extra_args=FAST)
    async with rpc.Agent("driver", redis_url, namespace, failure_timeout=1.0) as driver:
        await step_once_through_a_freeze(driver, ps, redis_client, namespace)


async def step_once_through_a_freeze(
    driver: rpc.Agent, ps: WorkerProcess, redis_client: aredis.Redis, namespace: str
) -> None:
    server = await driver.remote("ps", "ps.ParameterServer", args=((4, 3), 0))
    params = await server.rpc_async().parameter_rrefs()
    opt = optim.DistributedOptimizer(fault_funcs.GatedSGD, params, lr=0.1)
    x = ag.tensor(np.ones((2, 4), dtype=np.float32))
    async with dist_autograd.context() as ctx:
        out = await server.rpc_async().forward(x)
        await dist_autograd.backward(ctx, [out.sum()])
        step = asyncio.ensure_future(opt.step(ctx))
        await redis_client.blpop([f"{namespace}:gate:started"], DEADLINE)
        os.kill(ps.pid, signal.SIGSTOP)  # it took the step, and freezes in it
        try:
            with pytest.raises(ag.OutcomeUnknown):
                await step
        finally:
            os.kill(ps.pid, signal.SIGCONT)
        await redis_client.rpush(f"{namespace}:gate:release", 1, 1)

        # Until then it is rightly suspected (`WorkerUnavailable`): its beats stopped.
        async def beats_again() -> bool:
            return not await driver.gone(["ps"])

        await eventually(beats_again, "ps heartbeats again after SIGCONT")
        await opt.step(ctx)  # completes it where missing: nowhere, it ran meanwhile
    local = opt.remote_optimizers["ps"]
    assert await local.rpc_async().applied_steps() == 1


# *** nothing lost in silence ***


async def test_a_reply_redis_refuses_fails_the_call_with_redis_reason(
    spawn_worker: Callable[..., WorkerProcess], make_agent: Any, redis_client: aredis.Redis,
    namespace: str, read_line: Callable[..., str],
) -> None:  # fmt: skip
    worker = spawn_worker("w", FUNCS, extra_args=FAST)
    driver = await make_agent("driver", failure_timeout=1.0)
    started, release = f"{namespace}:started", f"{namespace}:release"
    value = np.zeros(256 * 1024, dtype=np.uint8)
    call = asyncio.ensure_future(
        driver.rpc_async("w", "fault.hold", args=(started, release, value))
    )
    await redis_client.blpop([started], DEADLINE)
    used = int((await redis_client.info("memory"))["used_memory"])
    await redis_client.config_set("maxmemory", used // 2)  # Redis is full: writes refused
    try:
        began = time.monotonic()
        (client,) = [c for c in await redis_client.client_list() if c["name"] == release]
        await redis_client.execute_command("CLIENT", "UNBLOCK", client["id"])
        wait_for_line(worker, read_line, "event=reply_refused")
    finally:
        await redis_client.config_set("maxmemory", 0)
    with pytest.raises(ag.RemoteError, match="OOM") as raised:
        await call
    assert raised.value.remote_type == "ReplyError" and raised.value.may_have_run is True
    assert time.monotonic() - began < 1.5


async def test_a_call_redis_refuses_fails_at_once_as_not_run(
    spawn_worker: Callable[..., WorkerProcess], make_agent: Any, redis_client: aredis.Redis
) -> None:
    spawn_worker("w", FUNCS, extra_args=FAST)
    driver = await make_agent("driver", failure_timeout=1.0)
    assert await driver.rpc_async("w", "fault.echo", args=(1,)) == 1
    await redis_client.config_set("maxmemory", 1)
    try:
        with pytest.raises(ag.TransportError, match="OOM") as raised:
            await driver.rpc_async("w", "fault.record", args=("x", 1))
        assert raised.value.may_have_run is False
    finally:
        await redis_client.config_set("maxmemory", 0)


async def test_a_malformed_message_affects_no_other_message_of_its_read(
    spawn_worker: Callable[..., WorkerProcess], make_agent: Any, redis_client: aredis.Redis,
    namespace: str,
) -> None:  # fmt: skip
    worker = spawn_worker("w", FUNCS)
    driver = await make_agent("driver")
    w_inbox = inbox(namespace, "w")
    assert await driver.rpc_async("w", "fault.echo", args=(0,)) == 0

    def echo(i: int) -> asyncio.Future[Any]:
        return asyncio.ensure_future(driver.rpc_async("w", "fault.echo", args=(i,)))

    # A busy worker (here: a stopped one) reads the bad message with the good calls.
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        calls = [echo(i) for i in range(5)]
        while await redis_client.xlen(w_inbox) < 1:
            pass
        bad = b"\x84\xa1k\x02\xa1i\x01\xa1s\xa1x\xa1c\xa7context"  # a REPLY, its record a str
        await redis_client.xadd(w_inbox, {b"m": bad, b"f": b"\x80"})
        calls += [echo(i) for i in range(5, 10)]
        while await redis_client.xlen(w_inbox) < 3:
            pass
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert await asyncio.gather(*calls) == list(range(10))
    assert await redis_client.xlen(dead_letters(namespace, "w")) == 1
    pending = await redis_client.xpending(w_inbox, "asyncgrad")
    assert pending["pending"] == 0


async def test_dead_letters_are_bounded_in_bytes(
    spawn_worker: Callable[..., WorkerProcess], make_agent: Any, redis_client: aredis.Redis,
    namespace: str,
) -> None:  # fmt: skip
    spawn_worker("w", FUNCS)
    driver = await make_agent("driver")
    big = os.urandom(256 << 10)
    for _ in range(8):  # 16 fields of 256 KiB: a letter once kept 4 MiB of such an entry
        await redis_client.xadd(inbox(namespace, "w"), {f"x{i}".encode(): big for i in range(16)})
    assert await driver.rpc_async("w", "fault.echo", args=(1,)) == 1
    dead = dead_letters(namespace, "w")
    assert await redis_client.xlen(dead) == 8
    usage = await redis_client.memory_usage(dead)
    # Each letter's bytes, with the stream's overhead: not the 4 MiB of each entry.
    assert usage < 8 * 2 * DEAD_LETTER_BYTES, usage
