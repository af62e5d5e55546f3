"""Training through a real Redis Cluster failover: 3 masters with a replica each.

The soak's job (a parameter server and two trainers as worker processes) runs on the
cluster while a replica takes over its master (`CLUSTER FAILOVER`), then while a master is
SIGKILLed and its replica is promoted by the cluster (`cluster-node-timeout` 1 s). Every
step must finish, nothing be freed, and no step be applied twice; the record says how long
after each fault the trainers finished a step again.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from asyncgrad.bench.soak import Fault, soak_job
from asyncgrad.transport.cluster import connect
from asyncgrad.transport.resp import RedisAddress
from asyncgrad.transport.slots import key_slot
from tests.cluster_servers import ClusterServers, ClusterUnsupported, find_binaries

STEPS = int(os.environ.get("ASYNCGRAD_FAILOVER_STEPS", "1500"))
FAULTS = (Fault(0.3, "failover"), Fault(0.65, "kill-master"))
# Errors a step may see while a master is replaced, each retried.
CLEAR = ("WorkerUnavailable", "TransportError", "RPCTimeout", "ContextError", "OutcomeUnknown")


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterServers]:
    try:
        binaries = find_binaries(os.environ.get("ASYNCGRAD_REDIS_SERVER"))
    except ClusterUnsupported as e:
        pytest.skip(f"no redis-server/redis-cli with cluster support: {e}")
    with ClusterServers(*binaries, masters=3, replicas=1, node_timeout_ms=1000) as servers:
        yield servers


def _promoted(cluster: ClusterServers, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while port not in cluster.master_ports():
        if time.monotonic() > deadline:
            raise AssertionError(f"replica {port} was not promoted within {timeout} s")
        time.sleep(0.05)  # the cluster announces no event: poll its roles


def _master_of(cluster: ClusterServers, slot: int) -> int:
    with redis.Redis(port=cluster.master_ports()[0], socket_timeout=1) as client:
        for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
    raise AssertionError(f"no master serves slot {slot}")


def _replica_of(cluster: ClusterServers, master: int) -> int:
    for port in cluster.replica_ports():
        with redis.Redis(port=port, socket_timeout=1) as client:
            if client.info("replication")["master_port"] == master:
                return port
    raise AssertionError(f"master {master} has no replica")


@pytest.mark.timeout(30)
async def test_a_replica_as_first_seed_is_passed_over(cluster: ClusterServers) -> None:
    # After a failover the URL's first seed is often a replica: a connection must still
    # open, and stay open, from what it says about the masters.
    replica = cluster.replica_ports()[0]
    others = [p for p in cluster.ports if p != replica]
    address = RedisAddress.from_url(
        "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in [replica, *others])
    )
    conn = await connect(address, name="asyncgrad:test:replica-seed")
    try:
        for i in range(50):  # keys on every master
            await conn.execute("SET", f"seed-test-{i}", i)
        assert await conn.execute("GET", "seed-test-7") == b"7"
        assert conn.is_open
    finally:
        conn.close()
    await asyncio.wait_for(conn.closed.wait(), 5)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_training_goes_on_through_a_failover_and_a_killed_master(
    cluster: ClusterServers,
) -> None:
    async def inject(fault: Fault) -> dict[str, Any]:
        # The parameter server's master: its inbox, heartbeat and every step live there.
        master = _master_of(cluster, key_slot("ps"))
        replica = _replica_of(cluster, master)
        if fault.kind == "failover":
            with redis.Redis(port=replica, socket_timeout=5) as client:
                client.execute_command("CLUSTER", "FAILOVER")
        else:
            cluster.kill(master)
        began = time.monotonic()
        await asyncio.to_thread(_promoted, cluster, replica)
        return {"master": master, "replica": replica, "promoted_after_s": time.monotonic() - began}

    record = soak_job(STEPS, FAULTS, cluster.url, failure_timeout=5.0, inject=inject)
    print(json.dumps(record))
    figures = record["figures"]
    assert record["violations"] == [], record["violations"]
    assert figures["steps_done"] == STEPS
    assert [f["kind"] for f in figures["faults"]] == ["failover", "kill-master"]
    assert all(kind.startswith(CLEAR) for kind in figures["errors"]), figures["errors"]
    for fault in figures["faults"]:
        # None: the fault never held a step up long enough to count as an interruption.
        assert fault["recovered_after_s"] is None or fault["recovered_after_s"] < 30, fault
