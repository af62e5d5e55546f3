"""What only a Redis Cluster has: its URLs, hash slots, redirections and nodes.

Every test here runs on the session's local cluster (`cluster_url`). The `cluster` mark
also runs the distributed autograd tests and parts of the RPC and worker tests there.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aredis

from asyncgrad.embedded import EmbeddedRedis
from asyncgrad.rpc import Agent
from asyncgrad.transport import dead_letters, heartbeat, inbox
from asyncgrad.transport.cluster import ClusterConnection, SyncClusterConnection, connect
from asyncgrad.transport.resp import ConnectionLost, RedisAddress
from asyncgrad.transport.slots import analyse_command, key_slot
from tests import rpc_funcs as f
from tests.conftest import DEADLINE, LogEvents, kill_clients

MakeAgent = Any
Node = tuple[str, int]


@pytest.fixture
def redis_url(cluster_url: str) -> str:
    """Agents, namespaces and redis-py clients of this file use the cluster."""
    return cluster_url


class Masters:
    """A direct redis-py client to each master, to see where keys are and move slots."""

    def __init__(self, url: str) -> None:
        seeds = RedisAddress.from_url(url).seeds
        self.clients = {node: aredis.Redis(host=node[0], port=node[1]) for node in seeds}

    async def owner(self, slot: int) -> Node:
        client = next(iter(self.clients.values()))
        for start, end, master, *_ in await client.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return (master[0].decode(), int(master[1]))
        raise AssertionError(f"nobody serves slot {slot}")

    async def other_than(self, node: Node) -> Node:
        return next(n for n in self.clients if n != node)

    async def name_elsewhere(self, namespace: str, node: Node) -> str:
        """A new agent name whose keys are in a slot that `node` does not serve."""
        while await self.owner(key_slot(inbox(namespace, name := uuid.uuid4().hex[:12]))) == node:
            pass
        return name

    async def begin_migration(self, slot: int, source: Node, target: Node) -> None:
        await self._setslot(target, slot, "IMPORTING", source)
        await self._setslot(source, slot, "MIGRATING", target)

    async def move_keys(self, slot: int, source: Node, target: Node) -> None:
        client = self.clients[source]
        while keys := await client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            await client.execute_command("MIGRATE", *target, "", 0, 5000, "KEYS", *keys)

    async def finish_migration(self, slot: int, target: Node) -> None:
        """The target first, as the cluster tutorial says; then every other master."""
        for node in sorted(self.clients, key=lambda n: n != target):
            await self._setslot(node, slot, "NODE", target)

    async def migrate(self, slot: int, source: Node, target: Node) -> None:
        await self.begin_migration(slot, source, target)
        try:
            await self.move_keys(slot, source, target)
        finally:
            await self.finish_migration(slot, target)

    async def _setslot(self, node: Node, slot: int, state: str, other: Node) -> None:
        other_id = await self.clients[other].execute_command("CLUSTER", "MYID")
        await self.clients[node].execute_command("CLUSTER", "SETSLOT", slot, state, other_id)

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()


@pytest.fixture
async def masters(cluster_url: str) -> AsyncIterator[Masters]:
    m = Masters(cluster_url)
    yield m
    await m.aclose()


class Traffic:
    """Calls from `caller` to `callee`, one after another, each checked, until stopped."""

    def __init__(self, caller: Agent, callee: str) -> None:
        self.caller, self.callee = caller, callee
        self.done = 0
        self._progress = asyncio.Event()
        self._stop = False

    async def run(self) -> None:
        while not self._stop:
            assert await self.caller.rpc_async(self.callee, f.echo, args=(self.done,)) == self.done
            self.done += 1
            self._progress.set()

    async def more(self, n: int = 5) -> None:
        """Until `n` more calls have come back."""
        target = self.done + n
        async with asyncio.timeout(DEADLINE):
            while self.done < target:
                self._progress.clear()
                await self._progress.wait()

    def stop(self) -> None:
        self._stop = True


# *** URLs ***


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+cluster://127.0.0.1:7000",
            RedisAddress(port=7000, seeds=(("127.0.0.1", 7000),)),
        ),
        (
            "redis+cluster://u:p%40ss@h1:7000,h2:7001,h3",
            RedisAddress(
                host="h1",
                port=7000,
                username="u",
                password="p@ss",
                seeds=(("h1", 7000), ("h2", 7001), ("h3", 6379)),
            ),
        ),
        (
            "rediss+cluster://h:7000?ssl_ca_certs=/ca.pem&ssl_cert_reqs=none",
            RedisAddress(
                host="h",
                port=7000,
                tls={"ssl_ca_certs": "/ca.pem", "ssl_cert_reqs": "none"},
                seeds=(("h", 7000),),
            ),
        ),
        (
            "redis+cluster://[::1]:7000,[fe80::1]/0",
            RedisAddress(host="::1", port=7000, seeds=(("::1", 7000), ("fe80::1", 6379))),
        ),
    ],
)
def test_cluster_urls(url: str, expected: RedisAddress) -> None:
    address = RedisAddress.from_url(url)
    assert address == expected
    assert address.tls == expected.tls
    assert " " not in str(address)  # it goes into key=value log lines


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("redis+cluster://h:7000/2", "only database 0"),
        ("redis+cluster://h:7000?db=1", "only database 0"),
        ("redis+cluster://h:x", "not host:port"),
        ("redis+cluster://h:1,,h:2", "not host:port"),
    ],
)
def test_bad_cluster_urls(url: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        RedisAddress.from_url(url)


# *** hash slots ***


def test_key_slots_of_the_cluster_spec() -> None:
    assert key_slot("123456789") == 0x31C3  # the CRC16 check value
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")
    assert key_slot("foo{}{bar}") == key_slot(b"foo{}{bar}")  # empty tag: all of it
    assert key_slot("foo{{bar}}zap") == key_slot("{bar")
    assert key_slot("foo{bar}{zap}") == key_slot("bar")


async def test_key_slots_match_the_servers(masters: Masters) -> None:
    client = next(iter(masters.clients.values()))
    keys = [
        "",
        "a",
        "ns:{w1}:inbox",
        "{}",
        "x{y",
        "y}x{",
        "é{ü}",
        *(uuid.uuid4().hex for _ in range(50)),
    ]
    for key in keys:
        assert key_slot(key) == await client.execute_command("CLUSTER", "KEYSLOT", key), key


def test_the_slot_of_a_command_is_its_keys_and_blocking_reads_are_known() -> None:
    k = key_slot("k")
    assert analyse_command(("XADD", "k", "*", "m", "v")) == (k, False)
    assert analyse_command(("EVAL", "return 1", 2, "k", "j", "arg")) == (k, False)
    assert analyse_command(("EVAL", "return 1", 0)) == (None, False)
    assert analyse_command(("XGROUP", "CREATE", "k", "g", "0")) == (k, False)
    read = ("XREADGROUP", "GROUP", "g", "c", "COUNT", 1, "BLOCK", 1, "STREAMS", "k", ">")
    assert analyse_command(read) == (k, True)
    assert analyse_command(("XREADGROUP", "GROUP", "g", "c", "STREAMS", "k", ">")) == (k, False)
    assert analyse_command(("BLPOP", "k", 0)) == (k, True)
    assert analyse_command(("CLIENT", "SETNAME", "x")) == (None, False)


async def test_an_agents_keys_share_one_slot_on_one_master(
    make_agent: MakeAgent, namespace: str, masters: Masters
) -> None:
    await make_agent("w")
    keys = [inbox(namespace, "w"), heartbeat(namespace, "w"), dead_letters(namespace, "w")]
    client = next(iter(masters.clients.values()))
    slots = {await client.execute_command("CLUSTER", "KEYSLOT", key) for key in keys}
    assert len(slots) == 1
    owner = masters.clients[await masters.owner(slots.pop())]
    assert await owner.exists(inbox(namespace, "w"), heartbeat(namespace, "w")) == 2


# *** routing ***


async def test_agents_on_every_master_talk_through_one_seed(
    make_agent: MakeAgent, cluster_url: str, namespace: str, masters: Masters
) -> None:
    """One agent per master; the driver is given one node and learns the others."""
    names: dict[Node, str] = {}
    for i in range(1000):
        name = f"w{i}"
        names.setdefault(await masters.owner(key_slot(inbox(namespace, name))), name)
        if len(names) == len(masters.clients):
            break
    for name in names.values():
        await make_agent(name)
    one_seed = "redis+cluster://{}:{}".format(*RedisAddress.from_url(cluster_url).seeds[-1])
    async with Agent("driver", one_seed, namespace) as driver:
        for name in names.values():
            assert await driver.rpc_async(name, f.add, args=(name, "!")) == name + "!"
        assert {w.name for w in await driver.workers()} == {"driver", *names.values()}


async def test_ask_during_a_migration_then_moved_after_it(
    cluster_url: str, namespace: str, masters: Masters
) -> None:
    """ASK sends one command to the importing node; MOVED remaps the slot and reloads the
    whole map, so a second slot moved meanwhile is known before it is used."""
    key = f"{namespace}:{{{uuid.uuid4().hex}}}"
    slot = key_slot(key)
    source = await masters.owner(slot)
    target = await masters.other_than(source)
    other = inbox(namespace, await masters.name_elsewhere(namespace, source))
    conn = await connect(RedisAddress.from_url(cluster_url), name="asyncgrad:test:cluster")
    assert isinstance(conn, ClusterConnection)
    try:
        await conn.execute("SET", key, "v")
        await masters.begin_migration(slot, source, target)
        try:
            await masters.move_keys(slot, source, target)
            assert await conn.execute("GET", key) == b"v"  # asked the target
            assert conn.node_of(key) == source  # ASK is for one command only
            await conn.execute("SET", key, "w")
        finally:
            await masters.finish_migration(slot, target)
        await masters.migrate(key_slot(other), await masters.owner(key_slot(other)), source)
        assert await conn.execute("GET", key) == b"w"  # MOVED by the source
        assert conn.node_of(key) == target
        await conn.execute("GET", key)  # after the map reload, on the same node connection
        assert conn.node_of(other) == source
    finally:
        conn.close()
        await conn.closed.wait()


async def test_tryagain_while_a_slots_keys_are_split_is_retried(
    cluster_url: str, namespace: str, masters: Masters
) -> None:
    a, b = f"{namespace}:{{t}}:a", f"{namespace}:{{t}}:b"
    source = await masters.owner(key_slot(a))
    target = await masters.other_than(source)
    conn = await connect(RedisAddress.from_url(cluster_url))
    try:
        await conn.execute("SET", a, "1")
        await conn.execute("SET", b, "2")
        await masters.begin_migration(key_slot(a), source, target)
        try:
            await masters.clients[source].migrate(*target, [a], 0, 5000)  # the keys are split
            both = conn.execute("MGET", a, b)
            assert await conn.execute("GET", b) == b"2"  # answered after MGET's TRYAGAIN
            assert not both.done()
            await masters.move_keys(key_slot(a), source, target)
        finally:
            await masters.finish_migration(key_slot(a), target)
        assert await both == [b"1", b"2"]
    finally:
        conn.close()
        await conn.closed.wait()


def test_the_heartbeats_blocking_connection_follows_moved(cluster_url: str, namespace: str) -> None:
    key = f"{namespace}:{{hb}}:alive"
    address = RedisAddress.from_url(cluster_url)
    for seed in address.seeds:  # whichever node it starts on, it ends where the key lives
        conn = SyncClusterConnection(RedisAddress.from_url(f"redis+cluster://{seed[0]}:{seed[1]}"))
        try:
            assert conn.execute("SET", key, seed[1], "PX", 10_000) == b"OK"
            assert conn.execute("GET", key) == str(seed[1]).encode()
        finally:
            conn.close()


# *** traffic while the cluster changes ***


@pytest.mark.timeout(30)
async def test_calls_go_on_while_the_workers_slot_migrates(
    make_agent: MakeAgent, namespace: str, masters: Masters, log_events: LogEvents
) -> None:
    """Its inbox, heartbeat and dead letters move to another master while a caller calls
    it: ASK, then MOVED, are followed by both agents and by the worker's heartbeat thread."""
    name = f"m-{uuid.uuid4().hex[:8]}"  # a slot of its own: no other test uses it
    await make_agent(name, failure_timeout=1.0)  # heartbeat TTL 0.6 s
    caller = await make_agent("caller", failure_timeout=1.0)
    slot = key_slot(inbox(namespace, name))
    source = await masters.owner(slot)
    target = await masters.other_than(source)
    traffic = Traffic(caller, name)
    async with asyncio.TaskGroup() as tasks:
        running = tasks.create_task(traffic.run())
        try:
            await traffic.more()
            await masters.begin_migration(slot, source, target)
            await traffic.more()
            await masters.move_keys(slot, source, target)
            await traffic.more()
            await masters.finish_migration(slot, target)
            await traffic.more()
            # Long enough for the TTL to run out twice, had the heartbeat not followed.
            until = asyncio.get_running_loop().time() + 1.2
            while asyncio.get_running_loop().time() < until:
                await traffic.more(1)
        finally:
            traffic.stop()
    running.result()
    assert traffic.done > 20
    assert log_events.count("event=slot_map_refreshed") >= 1
    assert await masters.clients[target].pttl(heartbeat(namespace, name)) > 0
    assert await masters.clients[target].exists(inbox(namespace, name)) == 1
    assert name in {w.name for w in await caller.workers()}


async def test_replies_redirected_to_the_workers_own_node_are_not_held_back(
    make_agent: MakeAgent, namespace: str, masters: Masters
) -> None:
    """The caller's slot moved to the master where the worker's reader waits in XREADGROUP
    BLOCK: the worker's first reply goes to the old master, whose MOVED sends it to that
    one. It must not queue behind the read (2 s) on the reader's connection there."""
    await make_agent("w")
    node = await masters.owner(key_slot(inbox(namespace, "w")))
    caller_name = await masters.name_elsewhere(namespace, node)
    caller = await make_agent(caller_name)
    slot = key_slot(inbox(namespace, caller_name))
    await masters.migrate(slot, await masters.owner(slot), node)
    for i in range(3):
        async with asyncio.timeout(1.0):  # less than a read's BLOCK
            assert await caller.rpc_async("w", f.echo, args=(i,)) == i


@pytest.mark.timeout(30)
async def test_a_node_dropping_an_agents_connections_is_survived(
    make_agent: MakeAgent, namespace: str, masters: Masters, log_events: LogEvents
) -> None:
    """Killing the worker's connections on the master of its slot takes its whole cluster
    connections down; the transport reconnects, as after a single Redis dropped them."""
    await make_agent("w")
    caller = await make_agent("caller")
    node = masters.clients[await masters.owner(key_slot(inbox(namespace, "w")))]
    traffic = Traffic(caller, "w")
    async with asyncio.TaskGroup() as tasks:
        running = tasks.create_task(traffic.run())
        try:
            await traffic.more()
            roles = [f"asyncgrad:{namespace}:w:{role}" for role in ("reader", "writer")]
            assert await kill_clients(node, *roles) == 2
            await log_events.wait("event=reader_recovered agent=w")
            await log_events.wait("event=reconnected agent=w role=writer")
            await traffic.more()
        finally:
            traffic.stop()
    running.result()
    assert log_events.count("event=cluster_connection_lost") >= 2


# *** not a cluster ***


async def test_a_cluster_url_for_a_single_redis_is_refused_clearly() -> None:
    with EmbeddedRedis(port=0) as server:
        single = RedisAddress.from_url(server.url)
        url = f"redis+cluster://{single.host}:{single.port}"
        with pytest.raises(ConnectionLost, match=r"not a cluster node.*use redis://"):
            await connect(RedisAddress.from_url(url))


async def test_no_seed_answering_is_a_connection_lost(unused_tcp_port: int) -> None:
    address = RedisAddress.from_url(f"redis+cluster://127.0.0.1:{unused_tcp_port}")
    with pytest.raises(ConnectionLost, match="no node of the Redis Cluster"):
        await connect(address, connect_timeout=DEADLINE)
    with pytest.raises(ConnectionLost, match="no node of the Redis Cluster"):
        SyncClusterConnection(address)
