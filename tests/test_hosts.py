"""Across simulated hosts (asyncgrad.simulated_hosts): Redis on one network namespace, the
driver (this test's thread, entered there) on another, a worker on each of two more, one
LAN between them; and the hosts themselves: gone after a failure or a SIGKILL, and a
clear reason where they cannot be made.

Needs root: skipped, with the reason, where network namespaces cannot be made. Each test
holds the driver agent and names the workers it used, so that a check of the path the
bytes took (the data plane's counters, the driver's and, through tests.host_funcs, the
workers') is one more line.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import IO

import numpy as np
import pytest

import asyncgrad as ag
from asyncgrad import dist_autograd, rpc
from asyncgrad.embedded import EmbeddedRedis
from asyncgrad.local_cluster import LocalCluster
from asyncgrad.simulated_hosts import (
    NETNS_DIR,
    SimulatedHost,
    SimulatedHosts,
    remove_leftovers,
)
from tests.conftest import DEADLINE, ROOT, listed, redis_py
from tests.test_dist_autograd import X, chain_backward, local_chain

WORKERS = ("w1", "w2")
MODULES = ["asyncgrad.workloads.echo", "tests.dist_funcs", "tests.host_funcs"]
SPAWN_TIMEOUT_S = 30.0  # the workers' start, on a busy 2-core machine


def network(pid: str) -> int:
    """The network namespace of a process (`thread-self`: this thread's), by its inode."""
    path = "/proc/thread-self/ns/net" if pid == "thread-self" else f"/proc/{pid}/ns/net"
    return os.stat(path).st_ino


@pytest.fixture
def workers(
    hosts: dict[str, SimulatedHost], redis_on_host: EmbeddedRedis
) -> Iterator[LocalCluster]:
    """Worker processes w1 and w2, each on its own host, serving once this returns."""
    prefix = {name: hosts[name].prefix for name in WORKERS}
    with LocalCluster(
        dict.fromkeys(prefix, MODULES),
        redis_on_host.url,
        "hosts-" + uuid.uuid4().hex[:8],
        ready_timeout=SPAWN_TIMEOUT_S,
        command_prefix=prefix,
    ) as cluster:
        yield cluster


@pytest.fixture
async def driver(on_driver_host: None, workers: LocalCluster) -> AsyncIterator[rpc.Agent]:
    async with rpc.Agent("driver", workers.redis_url, workers.namespace) as agent:
        yield agent


@pytest.mark.timeout(60)
async def test_an_rpc_crosses_hosts(
    hosts: dict[str, SimulatedHost], redis_on_host: EmbeddedRedis, driver: rpc.Agent
) -> None:
    x = ag.tensor(np.arange(16, dtype=np.float32))
    echoed = await driver.rpc_async("w1", "echo", args=(x,))
    assert np.array_equal(echoed.data, x.data)
    where = {name: await driver.rpc_async(name, "hosts.network") for name in WORKERS}
    where |= {"driver": network("thread-self"), "redis": network(str(redis_on_host.pid))}
    assert where == {role: os.stat(NETNS_DIR / host.name).st_ino for role, host in hosts.items()}
    # Every connection to Redis comes over the LAN, from its own host's address.
    client = redis_py(redis_on_host.url, asynchronous=True)
    try:
        peers = {entry["addr"].rpartition(":")[0] for entry in await client.client_list()}
    finally:
        await client.aclose()
    assert peers == {hosts[role].address for role in ("driver", *WORKERS)}


@pytest.mark.timeout(60)
async def test_a_distributed_backward_crosses_hosts(driver: rpc.Agent) -> None:
    # w1 calls w2 itself: the backward goes driver -> w1 -> w2, host to host.
    seeds = list(enumerate(WORKERS))
    async with dist_autograd.context() as ctx:
        h = await driver.rpc_async("w1", "dt.forward_to", args=(ag.tensor(X), 0, "w2"))
        await dist_autograd.backward(ctx, [h.sum()])
        got = [await driver.rpc_async(w, "dt.weight_grad", args=(ctx, i)) for i, w in seeds]
    weights = [await driver.rpc_async(w, "dt.weight_data", args=(i,)) for i, w in seeds]
    _, want = local_chain(weights)
    for grad, expected in zip(got, want, strict=True):
        np.testing.assert_allclose(grad, expected, rtol=1e-12)
    # The driver calls each: the gradients come back through the driver's host.
    await chain_backward(driver, list(WORKERS))


@pytest.mark.timeout(90)
async def test_a_64MiB_float32_echo_crosses_hosts_exactly(driver: rpc.Agent) -> None:
    sent = ag.tensor(np.random.default_rng(0).standard_normal(16 << 20, dtype=np.float32))
    echoed = await driver.rpc_async("w1", "echo", args=(sent,))
    assert echoed.data.dtype == np.float32
    assert echoed.data.shape == (16 << 20,)
    assert np.array_equal(echoed.data, sent.data)
    # By TCP from host to host, not through Redis nor shared memory (other hosts).
    assert driver.data_plane_stats() == {
        "sent_direct": 1, "served_tcp": 1, "fetched_tcp": 1, "held": 0
    }  # fmt: skip
    # On from w1 to w2 and back: worker to worker, each on its host.
    passed = await driver.rpc_async("w1", "hosts.pass_on", args=(sent, "w2"))
    assert np.array_equal(passed.data, sent.data)
    w2 = await driver.rpc_async("w2", "hosts.data_plane_stats")
    assert w2["fetched_tcp"] == w2["served_tcp"] == 1 and "fetched_local" not in w2


class Boom(Exception):
    """What the body of a test's `with SimulatedHosts` raises."""


def test_hosts_are_removed_also_when_the_body_raises(namespaces: None) -> None:
    run = SimulatedHosts(3)

    def body() -> None:
        with run as made:
            assert {h.name for h in made} | {run.switch} <= listed()
            raise Boom

    with pytest.raises(Boom):
        body()
    assert {name for name in listed() if name.startswith(run.stem)} == set()


def test_leftovers_of_a_killed_run_go_and_a_live_runs_stay(
    namespaces: None, read_line: Callable[[IO[bytes]], str]
) -> None:
    code = (
        "from asyncgrad.simulated_hosts import SimulatedHosts\n"
        "with SimulatedHosts(3) as made:\n"
        "    print(made[0].name, flush=True)\n"
        "    input()\n"
    )
    argv = [sys.executable, "-c", code]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT) as child:
        assert child.stdout is not None
        try:
            stem = read_line(child.stdout).rpartition("-")[0]
        finally:
            child.kill()
            child.wait(DEADLINE)
    dead = {name for name in listed() if name.startswith(stem + "-")}
    assert len(dead) == 4  # three hosts and their switch, left behind by the SIGKILL
    with SimulatedHosts(2) as live:  # entering removes what dead runs left
        assert listed().isdisjoint(dead)
        remove_leftovers()
        assert {host.name for host in live} <= listed()


def test_where_namespaces_cannot_be_made_the_reason_says_why() -> None:
    code = "from asyncgrad.simulated_hosts import SimulatedHosts\nSimulatedHosts(2).__enter__()"
    argv = [sys.executable, "-c", code]
    if os.geteuid() != 0:
        why = "need root"
    elif shutil.which("setpriv"):
        # root, but without the capability namespaces need (as in an unprivileged container)
        argv = ["setpriv", "--bounding-set=-sys_admin", *argv]
        why = "cannot make a network namespace: .*Operation not permitted"
    else:
        pytest.skip("root without CAP_SYS_ADMIN needs setpriv (util-linux), not found")
    before = listed() if shutil.which("ip") else set()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT, check=False)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert re.match(rf"asyncgrad\.simulated_hosts\.HostsUnavailable: simulated hosts.*{why}", last)
    if shutil.which("ip"):
        assert listed() == before
