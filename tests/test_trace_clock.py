"""The trace clock (`asyncgrad.tracing.RedisClock`): each agent's estimate of the offset
from its monotonic clock to Redis's, checked against the truth.

The truth is known here: every process of this machine, on every simulated host, shares
one kernel, so Redis's `TIME` (CLOCK_REALTIME) minus an agent's `time.monotonic_ns()` is
`time.time_ns() - time.monotonic_ns()` in that agent's process (`tests.host_funcs
.clock_truth`, which a worker serves as `hosts.clock_truth`). The estimate's real error is
estimate minus truth; it must stay within the error bound the agent reports (`error_ns` of
its trace dump), whatever the delays are and however they split between the two ways.

Link delays: this kernel has no `netem` qdisc (CONFIG_NET_SCH_NETEM is not set, and there
are no modules to load), so a delayed link is `tests.delay_proxy` on Redis's host, which
holds each way of a worker host's connections for its own time.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import IO, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncgrad import rpc
from asyncgrad.embedded import EmbeddedRedis
from asyncgrad.local_cluster import LocalCluster
from asyncgrad.rpc.server import TRACE
from asyncgrad.simulated_hosts import SimulatedHost
from asyncgrad.tracing import RedisClock
from asyncgrad.tracing.clock import _KEPT, DRIFT
from asyncgrad.transport import resp
from asyncgrad.transport.resp import RedisAddress, SyncConnection
from tests.conftest import ROOT
from tests.host_funcs import clock_truth
from tests.test_hosts import MODULES, SPAWN_TIMEOUT_S

MS = 1_000_000  # ns
US = 1_000
TRUE_OFFSET = 1_796_610_822_632_742_913  # Redis's clock minus the local one, ns


def timed(clock: RedisClock, t0: int, out: int, back: int, offset: int = TRUE_OFFSET) -> None:
    """One `TIME` round trip sent at local `t0`: `out` ns to Redis, which reads its clock
    (in µs, truncated) on arrival, and `back` ns for the answer."""
    clock.sample(t0, (t0 + out + offset) // US, t0 + out + back)


def error(clock: RedisClock, offset: int = TRUE_OFFSET) -> int:
    return clock.offset_ns - offset


# *** the estimator, on made-up round trips ***


def test_before_any_sample_the_offset_is_unknown() -> None:
    clock = RedisClock()
    assert (clock.known, clock.offset_ns, clock.error_ns, clock.samples) == (False, 0, -1, 0)
    assert clock.redis_ns(12345) == 12345
    timed(clock, 10 * MS, 50 * US, 50 * US)
    assert (clock.known, clock.samples) == (True, 1)


def test_symmetric_delays_give_the_offset_to_the_microsecond() -> None:
    clock = RedisClock()
    timed(clock, 10 * MS, 2 * MS, 2 * MS)
    assert abs(error(clock)) <= US  # TIME's resolution
    assert clock.error_ns == 2 * MS + US  # half the round trip, and the resolution


def test_asymmetric_delays_stay_within_the_bound_which_is_then_tight() -> None:
    clock = RedisClock()
    timed(clock, 10 * MS, 3 * MS, 100 * US)  # 3 ms out, 0.1 ms back
    assert abs(error(clock)) <= clock.error_ns == 1550 * US + US
    # Off by half the difference of the two ways: nothing in one sample can tell.
    assert abs(error(clock) - 1450 * US) <= US
    timed(clock, 20 * MS, 0, 4 * MS)  # and the other way round, longer: it loses
    assert abs(error(clock) - 1450 * US) <= US


def test_a_slow_sample_does_not_displace_a_fast_one_either_way_round() -> None:
    fast_first, slow_first = RedisClock(), RedisClock()
    timed(fast_first, 10 * MS, 40 * US, 60 * US)
    timed(fast_first, 20 * MS, 30 * MS, 100 * US)  # a GIL-delayed or queued sample
    timed(slow_first, 10 * MS, 30 * MS, 100 * US)
    timed(slow_first, 50 * MS, 40 * US, 60 * US)
    for clock in (fast_first, slow_first):
        # Half the fast round trip, TIME's resolution, and drift over the sample's age.
        assert 50 * US + US <= clock.error_ns <= 50 * US + US + int(40 * MS * DRIFT)
        assert abs(error(clock)) <= 11 * US


def test_the_estimate_picks_from_the_latest_samples_only() -> None:
    clock = RedisClock()
    timed(clock, 0, 10 * US, 10 * US)
    for i in range(1, _KEPT):
        timed(clock, i * MS, 300 * US, 300 * US)
    assert 10 * US + US <= clock.error_ns <= 10 * US + US + int(_KEPT * MS * DRIFT)
    timed(clock, _KEPT * MS, 300 * US, 300 * US)  # the fast one is the oldest: it goes
    assert clock.error_ns == 300 * US + US
    assert clock.samples == _KEPT + 1


@settings(max_examples=300, deadline=None)
@given(
    rounds=st.lists(
        st.tuples(st.integers(0, 10**12), st.integers(0, 50 * MS), st.integers(0, 50 * MS)),
        min_size=1,
        max_size=2 * _KEPT,
    ),
    offset=st.integers(-(10**18), 10**18),
)
def test_whatever_the_delays_the_error_stays_within_the_bound(
    rounds: list[tuple[int, int, int]], offset: int
) -> None:
    clock = RedisClock()
    for t0, out, back in rounds:
        timed(clock, t0, out, back, offset)
        assert abs(error(clock, offset)) <= clock.error_ns


def test_a_step_of_redis_s_clock_starts_the_estimate_over() -> None:
    """After a failover to another Redis (or an NTP step there), the first sample that
    contradicts the estimate replaces it, not 30 beats later."""
    clock = RedisClock()
    for i in range(10):
        timed(clock, i * MS, 20 * US, 20 * US)
    stepped = TRUE_OFFSET + 3_000 * MS
    timed(clock, 20 * MS, 300 * US, 300 * US, stepped)
    assert abs(error(clock, stepped)) <= clock.error_ns <= 301 * US
    clock.restart()
    timed(clock, 30 * MS, 40 * US, 40 * US)
    assert clock.error_ns <= 41 * US and abs(error(clock)) <= clock.error_ns


# *** one host: an agent's estimate against the truth ***


@pytest.fixture
def loopback_url() -> Iterator[str]:
    """A Redis of this test's own on TCP loopback: the session's may be a unix socket, or
    on another machine, whose clock is not this one's."""
    with EmbeddedRedis(port=0, host="127.0.0.1") as server:
        yield server.url


def test_a_tcp_connection_tells_when_an_answer_arrived_a_unix_one_cannot(
    loopback_url: str,
) -> None:
    if not resp._STAMPED:
        pytest.skip("no kernel receive stamps (SO_TIMESTAMPNS) on this platform")
    with EmbeddedRedis() as unix:
        for url, stamped in ((loopback_url, True), (unix.url, False)):
            conn = SyncConnection(RedisAddress.from_url(url))
            answers = []
            try:
                # The kernel turns stamping on a moment after the first socket asks for it
                # (a deferred static key): the first answers may come unstamped.
                give_up = time.monotonic() + 2.0  # for a stamp, while answers keep coming
                while time.monotonic() < give_up:
                    t0 = time.monotonic_ns()
                    (seconds, _), arrived = conn.execute_timed("TIME")
                    answers.append((t0, arrived, time.monotonic_ns()))
                    assert int(seconds) > 0
                    if arrived is not None or (not stamped and len(answers) >= 50):
                        break
            finally:
                conn.close()
            t0, arrived, t1 = answers[-1]
            if stamped:
                assert arrived is not None and t0 < arrived <= t1
            else:
                assert all(a is None for _, a, _ in answers)


@pytest.mark.timeout(15)
async def test_an_agent_on_loopback_knows_the_offset_within_its_bound_also_when_busy(
    loopback_url: str,
) -> None:
    # Beats every 75 ms: the estimate picks from the last 2.4 s.
    namespace = "t-" + uuid.uuid4().hex[:12]
    async with rpc.Agent("solo", loopback_url, namespace, failure_timeout=0.5) as agent:
        dump = agent._dump_spans(1)  # what its trace tells, right after start
        assert dump["clock_samples"] >= 5
        assert abs(dump["offset_ns"] - clock_truth()) <= dump["error_ns"] < 2 * MS
        # The event loop computes, in pure Python, until every sample the estimate picks
        # from was taken meanwhile: the heartbeat's thread times each against the GIL.
        deadline = time.monotonic() + 8.0
        until = dump["clock_samples"] + _KEPT
        while agent._dump_spans(1)["clock_samples"] < until:
            assert time.monotonic() < deadline, "the heartbeat stopped sampling"
            spin(0.05)
            await asyncio.sleep(0)
        dump = agent._dump_spans(1)
        assert abs(dump["offset_ns"] - clock_truth()) <= dump["error_ns"] < 2 * MS


def spin(seconds: float) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        pass


# *** simulated hosts: workers on hosts of their own, links with and without delays ***

HEARTBEAT_S = 0.3  # the workers' and the driver's beat (failure timeout 2 s)
STILL_FOR = 8  # samples without a better one: the estimate has settled


@pytest.fixture
def delayed_url(
    hosts: dict[str, SimulatedHost],
    redis_on_host: EmbeddedRedis,
    read_line: Callable[[IO[bytes]], str],
    delays: dict[str, tuple[float, float]],
) -> Iterator[str]:
    """Redis's URL through `tests.delay_proxy` on Redis's host, each worker host's link
    delayed as the test's `delays` says: {role: (ms out, ms back)}."""
    address = RedisAddress.from_url(redis_on_host.url)
    specs = [f"{hosts[role].address}={out}/{back}" for role, (out, back) in delays.items()]
    argv = [*hosts["redis"].prefix, sys.executable, "-m", "tests.delay_proxy"]
    argv += [hosts["redis"].address, f"{address.host}:{address.port}", *specs]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=ROOT) as proxy:
        assert proxy.stdout is not None
        try:
            listening = read_line(proxy.stdout)
            assert listening.startswith("listening ")
            yield f"redis://{listening.split()[1]}/0"
        finally:
            proxy.kill()
            proxy.wait()


@pytest.fixture
async def agents(
    hosts: dict[str, SimulatedHost],
    redis_on_host: EmbeddedRedis,
    on_driver_host: None,
    delays: dict[str, tuple[float, float]],
    request: pytest.FixtureRequest,
) -> AsyncIterator[rpc.Agent]:
    """Workers w1 and w2 on their hosts (through the delaying proxy when `delays` has any),
    and the driver, this test's loop on its own host, straight to Redis."""
    url = request.getfixturevalue("delayed_url") if delays else redis_on_host.url
    workers = ("w1", "w2")
    with LocalCluster(
        dict.fromkeys(workers, MODULES),
        url,
        "clock-" + uuid.uuid4().hex[:8],
        ready_timeout=SPAWN_TIMEOUT_S,
        worker_args=("--failure-timeout", str(HEARTBEAT_S / 0.15)),
        command_prefix={name: hosts[name].prefix for name in workers},
    ) as cluster:
        async with rpc.Agent(
            "driver", redis_on_host.url, cluster.namespace, failure_timeout=HEARTBEAT_S / 0.15
        ) as driver:
            yield driver


async def settled(driver: rpc.Agent, name: str, within: float) -> dict[str, Any]:
    """Agent `name`'s trace dump once its error bound stopped shrinking (no better sample
    in `STILL_FOR`) or the estimate picks from a full window, with `truth` added: the
    true offset in its process. Polled once a beat; fails after `within` s."""
    deadline = time.monotonic() + within
    best, since = -1, 0
    while True:
        if name == driver.name:
            dump, truth = driver._dump_spans(1), clock_truth()
        else:
            dump = await driver.rpc_async(name, TRACE, args=(1,))
            truth = await driver.rpc_async(name, "hosts.clock_truth")
        samples, bound = dump["clock_samples"], dump["error_ns"]
        if bound < best or best < 0:
            best, since = bound, samples
        if samples - since >= STILL_FOR or samples >= _KEPT:
            return {**dump, "truth": truth}
        if time.monotonic() > deadline:
            pytest.fail(f"{name}'s clock estimate not settled within {within} s: {dump}")
        await asyncio.sleep(HEARTBEAT_S)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "delays",
    [{}, {"w1": (1, 1), "w2": (4, 0)}],
    ids=["plain-links", "w1-1ms-each-way-w2-4ms-out-0-back"],
)
async def test_agents_on_hosts_agree_on_redis_clock_within_their_bounds(
    agents: rpc.Agent, delays: dict[str, tuple[float, float]]
) -> None:
    names = ("driver", "w1", "w2")
    dumps = dict(
        zip(names, await asyncio.gather(*(settled(agents, n, 12.0) for n in names)), strict=True)
    )
    # One kernel: one truth, whichever process reads it.
    truths = [d["truth"] for d in dumps.values()]
    assert max(truths) - min(truths) <= US
    for name, dump in dumps.items():
        bound, error = dump["error_ns"], dump["offset_ns"] - dump["truth"]
        assert abs(error) <= bound, (name, error, bound)
        out, back = delays.get(name, (0, 0))
        # Half the round trip: at least the delays' half, at most a LAN's worth more (the
        # proxy's threads, a busy 2-core machine).
        assert (out + back) / 2 * MS <= bound <= (out + back) / 2 * MS + MS, (name, bound)
        # An asymmetric link does put the estimate off, by ~half the difference.
        if out != back:
            assert abs(error) >= abs(out - back) / 4 * MS, (name, error)
    for (a, da), (b, db) in itertools.combinations(dumps.items(), 2):
        gap = da["offset_ns"] - db["offset_ns"]
        assert abs(gap) <= da["error_ns"] + db["error_ns"], (a, b, gap)
