"""The wire: the lean RESP client, and inbox streams with their acks, dead letters,
reconnects and heartbeats, against a real Redis whose connections the tests kill."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aredis

from asyncgrad import rpc
from asyncgrad.embedded import EmbeddedRedis
from asyncgrad.errors import AgentNameTaken, AsyncgradError, RPCTimeout, TransportError
from asyncgrad.transport import (
    GROUP,
    Inbound,
    InboxMissing,
    Transport,
    TransportSettings,
    check_name,
    dead_letters,
    forget,
    heartbeat,
    inbox,
    registry,
    seen,
)
from asyncgrad.transport.resp import (
    Connection,
    ConnectionLost,
    RedisAddress,
    ReplyError,
    SyncConnection,
)
from asyncgrad.transport.writer import DEAD_LETTER_BYTES
from tests import rpc_funcs as f
from tests.conftest import DEADLINE, LogEvents, eventually, gone_pid, here, kill_clients

# *** the RESP client ***


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", RedisAddress()),
        ("redis://h:7000/3", RedisAddress(host="h", port=7000, db=3)),
        ("redis://:s%40cret@h/2", RedisAddress(host="h", db=2, password="s@cret")),
        ("redis://u:p@h:1/0", RedisAddress(host="h", port=1, username="u", password="p")),
        ("redis://h?db=4", RedisAddress(host="h", db=4)),
        (
            "unix:///tmp/r.sock?db=5&password=p",
            RedisAddress(path="/tmp/r.sock", db=5, password="p"),
        ),
        ("rediss://h", RedisAddress(host="h", tls={})),
    ],
)
def test_address_from_url(url: str, expected: RedisAddress) -> None:
    address = RedisAddress.from_url(url)
    assert address == expected
    assert address.tls == expected.tls


@pytest.mark.parametrize("url", ["http://h", "unix://", "redis://h/x"])
def test_address_rejects_bad_urls(url: str) -> None:
    with pytest.raises(ValueError, match=r"h|unix|scheme|invalid literal"):
        RedisAddress.from_url(url)


@pytest.fixture
async def conn(redis_url: str) -> AsyncIterator[Connection]:
    c = await Connection.open(RedisAddress.from_url(redis_url), name="asyncgrad:test:conn")
    yield c
    c.close()
    await c.closed.wait()


async def test_commands_of_one_tick_pipeline_in_order(conn: Connection, namespace: str) -> None:
    key = f"{namespace}:counter"
    replies = await asyncio.gather(*(conn.execute("INCR", key) for _ in range(1000)))
    assert replies == list(range(1, 1001))
    # A large buffer is written as its own chunk, uncopied; it must arrive intact.
    big = memoryview(bytes(range(256)) * 4096)
    assert await conn.execute("SET", f"{namespace}:big", big) == b"OK"
    assert await conn.execute("GET", f"{namespace}:big") == bytes(big)
    with pytest.raises(ReplyError) as caught:
        await conn.execute("XLEN", key)
    assert caught.value.code == "WRONGTYPE"
    assert await conn.execute("PING") == b"PONG"  # an error reply keeps the order


async def test_killed_connection_fails_its_commands_and_refuses_more(
    conn: Connection, namespace: str, redis_client: aredis.Redis
) -> None:
    lost: list[Connection] = []
    conn.on_lost = lost.append
    blocked = conn.execute("BLPOP", f"{namespace}:never", 0)
    conn.flush()
    assert await kill_clients(redis_client, "asyncgrad:test:conn") == 1
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(blocked, DEADLINE)
    assert not conn.is_open
    assert lost == [conn]
    with pytest.raises(ConnectionLost):
        await conn.execute("PING")


async def test_closed_connection_refuses_commands_at_once(conn: Connection) -> None:
    conn.close()
    assert not conn.is_open  # before the loop has even seen the socket go
    with pytest.raises(ConnectionLost):
        await conn.execute("PING")
    await conn.closed.wait()


async def test_failed_connects_raise_connection_lost_and_leak_nothing(
    redis_url: str, tmp_path: Any, redis_client: aredis.Redis
) -> None:
    nowhere = RedisAddress(path=str(tmp_path / "no.sock"))
    with pytest.raises(ConnectionLost, match="cannot connect"):
        await Connection.open(nowhere)
    with pytest.raises(ConnectionLost, match="cannot connect"):
        SyncConnection(nowhere)
    # A server without that user (or any password) refuses the login: the connections
    # it accepted must be closed again.
    clients = len(await redis_client.client_list())
    wrong = RedisAddress.from_url(redis_url)
    wrong = RedisAddress(wrong.host, wrong.port, wrong.path, wrong.db, "nobody", "wrong")
    with pytest.raises(ConnectionLost, match="refused the login"):
        await Connection.open(wrong)
    with pytest.raises(ConnectionLost, match="refused the login"):
        SyncConnection(wrong)
    gc.collect()  # an unclosed socket would warn now, which filterwarnings makes an error

    async def closed_again() -> bool:
        return len(await redis_client.client_list()) == clients

    await eventually(closed_again, "the refused connections closed")


def test_sync_connection_round_trip(redis_url: str, namespace: str) -> None:
    conn = SyncConnection(RedisAddress.from_url(redis_url), name="asyncgrad:test:sync")
    try:
        assert conn.execute("SET", f"{namespace}:k", "v", "PX", 60000) == b"OK"
        assert conn.execute("GET", f"{namespace}:k") == b"v"
        with pytest.raises(ReplyError):
            conn.execute("NOSUCHCOMMAND")
    finally:
        conn.close()


# *** inbox streams ***


class Mailbox:
    """A transport's `deliver`: keeps what arrives, and wakes whoever waits for more."""

    def __init__(self) -> None:
        self.messages: list[Inbound] = []
        self._changed = asyncio.Event()

    def __call__(self, batch: list[Inbound]) -> None:
        self.messages += batch
        self._changed.set()

    async def wait(self, n: int) -> None:
        try:
            async with asyncio.timeout(DEADLINE):
                while len(self.messages) < n:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            pytest.fail(f"{len(self.messages)} of {n} messages within {DEADLINE} s")

    def frames(self) -> list[list[bytes]]:
        return [m.frames for m in self.messages]


MakeTransport = Callable[..., Awaitable[Transport]]


@pytest.fixture
async def make_transport(redis_url: str, namespace: str) -> AsyncIterator[MakeTransport]:
    """`await make_transport(name, deliver, **settings)`: a started Transport, closed after."""
    made: list[Transport] = []

    async def make(
        name: str, deliver: Callable[[list[Inbound]], None], **settings: Any
    ) -> Transport:
        address = RedisAddress.from_url(redis_url)
        t = Transport(address, namespace, name, deliver, TransportSettings(**settings))
        made.append(t)
        await t.start()
        return t

    yield make
    for t in made:
        await t.close()


async def pending_count(client: aredis.Redis, stream: str) -> int:
    return int((await client.xpending(stream, GROUP))["pending"])


async def test_send_delivers_once_and_done_acks_and_deletes(
    make_transport: MakeTransport, redis_client: aredis.Redis, namespace: str
) -> None:
    box = Mailbox()
    a = await make_transport("a", Mailbox())
    b = await make_transport("b", box)
    # One tick's messages to one inbox share an entry; big frames travel uncopied.
    big = memoryview(bytes(200_000))
    await asyncio.gather(a.send("b", [b"h1", b"p1"]), a.send("b", [b"h2", big, b"x"]))
    await box.wait(2)
    assert box.frames() == [[b"h1", b"p1"], [b"h2", bytes(big), b"x"]]
    b_inbox = inbox(namespace, "b")
    assert await pending_count(redis_client, b_inbox) == 1
    b.done(box.messages[0])
    assert await pending_count(redis_client, b_inbox) == 1  # half of the entry is done
    b.done(box.messages[1])
    await eventually(lambda: _settled(redis_client, b_inbox), "the entry acked and deleted")


async def _settled(client: aredis.Redis, stream: str) -> bool:
    return await client.xlen(stream) == 0 and await pending_count(client, stream) == 0


async def test_send_to_an_agent_with_no_inbox_fails(make_transport: MakeTransport) -> None:
    a = await make_transport("a", Mailbox())
    with pytest.raises(InboxMissing, match="'ghost' has no inbox"):
        await a.send("ghost", [b"h", b"p"])


def test_names_are_checked_and_keys_carry_namespace_and_hash_tag() -> None:
    for bad in ["", "a:b", "a b", "{x}", "x" * 101, "é"]:
        with pytest.raises(ValueError, match="must be 1-100"):
            check_name("agent name", bad)
    keys = [inbox("ns", "w"), heartbeat("ns", "w"), dead_letters("ns", "w")]
    assert all(k.startswith("ns:{w}:") for k in keys)
    assert len(set(keys)) == 3
    assert registry("ns").startswith("ns:")


async def test_writer_killed_while_idle_sends_and_queries_still_work(
    make_transport: MakeTransport, redis_client: aredis.Redis, namespace: str
) -> None:
    box = Mailbox()
    a = await make_transport("a", Mailbox())
    await make_transport("b", box)
    assert await kill_clients(redis_client, f"asyncgrad:{namespace}:a:writer") == 1
    await a.alive(["b"])  # a query waits for the writer to come back
    assert await a.alive(["b", "nobody"]) == [True, False]
    await a.send("b", [b"h", b"p"])  # no TransportError while it reconnects
    await box.wait(1)


async def test_a_send_while_the_writer_cannot_reconnect_leaves_once_it_can(
    namespace: str, log_events: LogEvents
) -> None:
    with EmbeddedRedis() as server:
        address = RedisAddress.from_url(server.url)
        assert address.path is not None
        settings = TransportSettings(reconnect_max_delay=0.05)
        box = Mailbox()
        a = Transport(address, namespace, "a", Mailbox(), settings)
        b = Transport(address, namespace, "b", box, settings)
        client = aredis.Redis.from_url(server.url)
        try:
            await a.start()
            await b.start()
            await client.ping()
            # With its socket file moved away the server serves the connections it has and
            # refuses new ones: a's writer, once killed, cannot come back for now.
            os.rename(address.path, address.path + ".away")
            assert await kill_clients(client, f"asyncgrad:{namespace}:a:writer") == 1
            await log_events.wait("event=reconnect_failed agent=a role=writer")
            stored = a.send("b", [b"h", b"while away"])
            alive = asyncio.ensure_future(a.alive(["b"]))
            await log_events.wait("event=reconnect_failed agent=a role=writer", 2)
            assert not stored.done() and not alive.done()
            os.rename(address.path + ".away", address.path)
            await asyncio.wait_for(stored, DEADLINE)
            assert await asyncio.wait_for(alive, DEADLINE) == [True]
            await box.wait(1)
            assert box.frames() == [[b"h", b"while away"]]
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.rename(address.path + ".away", address.path)
            await client.aclose()
            await a.close()
            await b.close()


async def test_reader_killed_keeps_a_message_in_flight_pending_and_delivers_it_once(
    make_transport: MakeTransport,
    redis_client: aredis.Redis,
    namespace: str,
    log_events: LogEvents,
) -> None:
    box = Mailbox()
    a = await make_transport("a", Mailbox())
    b = await make_transport("b", box)
    await a.send("b", [b"h", b"slow"])
    await box.wait(1)
    b_inbox = inbox(namespace, "b")
    # Three reconnects would count as three deliveries of a message that kills us.
    for n in range(1, 4):
        assert await kill_clients(redis_client, f"asyncgrad:{namespace}:b:reader") == 1
        await log_events.wait("event=reader_recovered agent=b", n)
    await a.send("b", [b"h", b"after"])  # reading goes on
    await box.wait(2)
    # Still being handled: still pending (acked only when done), and delivered once.
    assert box.frames() == [[b"h", b"slow"], [b"h", b"after"]]
    assert await pending_count(redis_client, b_inbox) == 2
    assert await redis_client.xlen(dead_letters(namespace, "b")) == 0
    for message in box.messages:
        b.done(message)
    await eventually(lambda: _settled(redis_client, b_inbox), "both entries acked and deleted")


async def test_reader_reconnect_rereads_entries_delivered_but_never_received(
    make_transport: MakeTransport,
    redis_client: aredis.Redis,
    namespace: str,
    log_events: LogEvents,
) -> None:
    box = Mailbox()
    await make_transport("b", box)
    b_inbox = inbox(namespace, "b")
    # Stored and delivered to consumer b in one transaction, so b's own blocked read
    # never sees it: as if the reply carrying it had been lost with the connection.
    async with redis_client.pipeline(transaction=True) as tx:
        tx.xadd(b_inbox, {"m": b"h", "f": b"lost"})
        tx.xreadgroup(GROUP, "b", {b_inbox: ">"})
        await tx.execute()
    assert await pending_count(redis_client, b_inbox) == 1
    assert box.messages == []
    assert await kill_clients(redis_client, f"asyncgrad:{namespace}:b:reader") == 1
    await box.wait(1)
    assert box.frames() == [[b"h", b"lost"]]
    await log_events.wait("event=reclaimed agent=b pending=1 dead_lettered=0")


async def test_an_entry_delivered_three_times_is_dead_lettered_at_start(
    make_transport: MakeTransport, redis_client: aredis.Redis, namespace: str
) -> None:
    b_inbox = inbox(namespace, "b")
    await redis_client.xgroup_create(b_inbox, GROUP, id="0", mkstream=True)
    poison = await redis_client.xadd(b_inbox, {"m": b"h", "f": b"crashes us"})
    # Three incarnations of b read it (the first as new, the others as their own
    # pending entries) and died before acking.
    for start in (">", "0", "0"):
        await redis_client.xreadgroup(GROUP, "b", {b_inbox: start})
    box = Mailbox()
    b = await make_transport("b", box)
    await eventually(lambda: _settled(redis_client, b_inbox), "the poison acked and deleted")
    (dead,) = await redis_client.xrange(dead_letters(namespace, "b"))
    fields = dead[1]
    assert fields[b"entry"] == poison
    assert b"delivered 3 times" in fields[b"reason"]
    assert fields[b"orig-m"] == b"h"
    assert fields[b"orig-f"] == b"crashes us"
    assert box.messages == []
    assert b.id >= 0


@pytest.mark.parametrize(
    "fields",
    [
        {b"\xff\x00junk": b"\x93\x01"},  # not m/f
        {b"f": b"first", b"m": b"second"},  # f before any m
        {b"m": b"h", b"x": b"y"},  # an unknown field
        {b"m": b"h", b"N" * 1_000_000: b"v" * 1_000_000},  # huge name and value
    ],
    ids=["random", "f-first", "unknown-field", "huge"],
)
async def test_an_entry_that_does_not_parse_is_dead_lettered_acked_and_deleted(
    fields: dict[bytes, bytes],
    make_transport: MakeTransport,
    redis_client: aredis.Redis,
    namespace: str,
) -> None:
    box = Mailbox()
    a = await make_transport("a", Mailbox())
    await make_transport("b", box)
    b_inbox = inbox(namespace, "b")
    entry = await redis_client.xadd(b_inbox, fields)  # type: ignore[arg-type]
    await a.send("b", [b"h", b"fine"])
    await box.wait(1)  # the next entry arrives: the bad one was read first
    assert box.frames() == [[b"h", b"fine"]]
    (dead,) = await redis_client.xrange(dead_letters(namespace, "b"))
    kept = dead[1]
    assert kept[b"entry"] == entry
    assert kept[b"reason"] == b"entry is not a list of m/f fields"
    assert int(kept[b"fields"]) == len(fields)
    # Kept in order, cut short: a dead letter stays within its byte bound.
    originals = {k: v for k, v in kept.items() if k.startswith(b"orig-")}
    assert sum(map(len, originals.values())) + sum(map(len, originals)) <= DEAD_LETTER_BYTES
    first_name, first_value = next(iter(fields.items()))
    first = b"orig-" + first_name[:64]
    assert kept[first] == first_value[: DEAD_LETTER_BYTES - len(first)]
    assert await redis_client.xlen(b_inbox) == 1  # only the good one, still being handled


async def test_a_blocked_reader_gets_a_large_write_in_entries_of_32(
    make_transport: MakeTransport, redis_client: aredis.Redis, namespace: str
) -> None:
    """33 messages of one tick leave in one write as two entries (32 + 1), and a reader
    blocked on its inbox gets the first entry alone: it can start on it while the sender
    goes on (the overlap behind B2's throughput)."""
    batches: list[list[Inbound]] = []
    box = Mailbox()
    a = await make_transport("a", Mailbox())
    await make_transport("b", lambda batch: (batches.append(batch), box(batch)))
    reader_name = f"asyncgrad:{namespace}:b:reader"

    async def blocked() -> bool:
        clients = await redis_client.client_list()
        return any(c["name"] == reader_name and "b" in c["flags"] for c in clients)

    await eventually(blocked, "b's reader blocked on its inbox")
    await asyncio.gather(*(a.send("b", [b"h", str(i).encode()]) for i in range(33)))
    await box.wait(33)
    assert [m.frames[1] for m in box.messages] == [str(i).encode() for i in range(33)]
    assert [len(batch) for batch in batches][:1] == [32]
    assert len({id(m.entry) for m in box.messages}) == 2
    assert await redis_client.xlen(inbox(namespace, "b")) == 2  # never acked by this box


async def test_a_message_dead_lettered_above_keeps_all_its_frames(
    make_transport: MakeTransport, redis_client: aredis.Redis, namespace: str, conn: Connection
) -> None:
    box = Mailbox()
    a = await make_transport("a", Mailbox())
    b = await make_transport("b", box)
    await a.send("b", [b"head", b"payload", b"buffer"])
    await box.wait(1)
    b.dead_letter(box.messages[0], "bad header: test")
    b_inbox = inbox(namespace, "b")
    await eventually(lambda: _settled(redis_client, b_inbox), "the entry acked and deleted")
    # The frames, in order, as the m/f fields they travelled in.
    ((_, fields),) = await conn.execute("XRANGE", dead_letters(namespace, "b"), "-", "+")
    assert fields == [
        b"reason", b"bad header: test", b"entry", box.messages[0].entry.id, b"fields", b"3",
        b"orig-m", b"head", b"orig-f", b"payload", b"orig-f", b"buffer",
    ]  # fmt: skip


async def test_dead_letters_are_bounded(
    make_transport: MakeTransport, redis_client: aredis.Redis, namespace: str
) -> None:
    box = Mailbox()
    a = await make_transport("a", Mailbox())
    await make_transport("b", box)
    b_inbox = inbox(namespace, "b")
    async with redis_client.pipeline(transaction=False) as pipe:
        for i in range(1500):
            pipe.xadd(b_inbox, {b"junk": str(i)})
        await pipe.execute()
    await a.send("b", [b"h", b"after the junk"])
    await box.wait(1)
    # MAXLEN ~ 1000 trims whole stream nodes (100 entries each by default).
    assert 1000 <= await redis_client.xlen(dead_letters(namespace, "b")) <= 1100


async def test_refusals_while_recovering_back_off_and_recovery_follows(
    make_transport: MakeTransport,
    redis_client: aredis.Redis,
    namespace: str,
    log_events: LogEvents,
) -> None:
    box = Mailbox()
    a = await make_transport("a", Mailbox())
    await make_transport("b", box, reconnect_max_delay=0.2)
    b_inbox = inbox(namespace, "b")
    started = time.monotonic()
    # The inbox is clobbered by a key of the wrong type: every retry is refused. (Redis 7
    # fails the blocked read at once; 6.2 would wait for its BLOCK to end: kill it.)
    async with redis_client.pipeline(transaction=True) as tx:
        tx.delete(b_inbox)
        tx.set(b_inbox, "not a stream")
        await tx.execute()
    await kill_clients(redis_client, f"asyncgrad:{namespace}:b:reader")
    await log_events.wait("event=prepare_failed agent=b", 4)
    # Backoff 0.05 + 0.1 + 0.2 s between the four attempts, not a tight loop.
    assert time.monotonic() - started >= 0.3
    assert log_events.count("event=prepare_failed agent=b") <= 5
    await redis_client.delete(b_inbox)
    await log_events.wait("event=reader_recovered agent=b")
    await a.send("b", [b"h", b"back"])
    await box.wait(1)


async def test_heartbeat_survives_its_connection_being_killed(
    make_transport: MakeTransport,
    redis_client: aredis.Redis,
    namespace: str,
    log_events: LogEvents,
) -> None:
    await make_transport("b", Mailbox(), heartbeat_interval=0.05, heartbeat_ttl=1.0)
    assert await kill_clients(redis_client, f"asyncgrad:{namespace}:b:heartbeat") == 1
    await log_events.wait("event=heartbeat_failed agent=b")
    await log_events.wait("event=reconnected agent=b role=heartbeat")
    assert await redis_client.pttl(heartbeat(namespace, "b")) > 0
    value = (await redis_client.get(heartbeat(namespace, "b"))).decode()
    assert f"id=0 pid={os.getpid()}" in value


@pytest.mark.parametrize(
    "holder",
    ["another host", "another pid namespace", "this process", "no pid"],
)
async def test_a_name_whose_holder_may_be_alive_is_refused_and_left_alone(
    holder: str, redis_url: str, redis_client: aredis.Redis, namespace: str
) -> None:
    value = {
        "another host": f"run=x id=0 pid={gone_pid()} host=not-{socket.gethostname()}",
        # Another container with host networking: the same host name, other pids.
        "another pid namespace": f"run=x id=0 pid={gone_pid()} host={socket.gethostname()} pidns=1",
        "this process": f"run=x id=0 pid={os.getpid()} {here()}",
        "no pid": "id=0",
    }[holder]
    key = heartbeat(namespace, "b")
    await redis_client.set(key, value, px=int(DEADLINE * 1000))
    t = Transport(RedisAddress.from_url(redis_url), namespace, "b", Mailbox())
    try:
        with pytest.raises(AgentNameTaken, match="agent name 'b' is taken in namespace"):
            await t.start()
    finally:
        await t.close()
    # The refused transport touched neither the holder's heartbeat nor its inbox.
    assert (await redis_client.get(key)).decode() == value
    assert await redis_client.exists(inbox(namespace, "b")) == 0


async def test_a_name_left_by_a_gone_process_of_this_host_is_taken_over(
    make_transport: MakeTransport,
    redis_client: aredis.Redis,
    namespace: str,
    log_events: LogEvents,
) -> None:
    crashed = gone_pid()
    key = heartbeat(namespace, "b")
    fake = f"run=x id=0 pid={crashed} {here()} ttl_ms=60000"
    await redis_client.set(key, fake, px=60_000)
    await make_transport("b", Mailbox())
    await log_events.wait(f"event=name_taken_over agent=b pid={crashed}")
    assert f"pid={os.getpid()} " in (await redis_client.get(key)).decode()


def _heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("asyncgrad-heartbeat-")]


async def test_close_leaves_no_thread_task_or_key_behind(
    redis_url: str, redis_client: aredis.Redis, namespace: str
) -> None:
    threads = set(threading.enumerate())
    box = Mailbox()
    t = Transport(RedisAddress.from_url(redis_url), namespace, "b", box)
    await t.start()
    assert len(_heartbeat_threads()) == 1
    await t.send("b", [b"h", b"to myself"])
    await box.wait(1)
    t.done(box.messages[0])
    assert await kill_clients(redis_client, f"asyncgrad:{namespace}:b:writer") == 1
    await t.close()
    assert set(threading.enumerate()) <= threads
    assert asyncio.all_tasks() == {asyncio.current_task()}
    # The acks went out before the end, so the inbox was empty and went too.
    keys = (inbox(namespace, "b"), heartbeat(namespace, "b"), seen(namespace, "b"))
    assert await redis_client.exists(*keys) == 0
    # Nor its registry entry: `asyncgrad status` lists it no more.
    assert await redis_client.exists(registry(namespace)) == 0
    with pytest.raises(TransportError, match="closed"):
        t.send("b", [b"h", b"p"])


async def test_close_keeps_the_registry_entry_of_the_run_that_holds_the_name_now(
    redis_url: str, redis_client: aredis.Redis, namespace: str
) -> None:
    t = Transport(RedisAddress.from_url(redis_url), namespace, "b", Mailbox())
    agent_id = await t.start()
    # Its heartbeat lapsed (say, Redis was out of reach) and a new run of "b" took the name
    # (with the same id, from the registry) before this run's cleanup.
    await redis_client.set(heartbeat(namespace, "b"), f"run=other id={agent_id} t=1", px=60_000)
    await t.close()
    assert await redis_client.hget(registry(namespace), "n:b") == str(agent_id).encode()
    assert await redis_client.hget(registry(namespace), f"i:{agent_id}") == b"b"
    assert (await redis_client.get(heartbeat(namespace, "b"))).startswith(b"run=other ")


async def test_forget_deletes_what_stopped_agents_left_and_keeps_a_live_ones_keys(
    redis_url: str, redis_client: aredis.Redis, namespace: str
) -> None:
    address = RedisAddress.from_url(redis_url)
    live = Transport(address, namespace, "live", Mailbox())
    await live.start()
    gone = Transport(address, namespace, "gone", Mailbox())
    await gone.start()
    await gone.close()
    # A message reached "gone" while it closed: its inbox stayed; a dead letter too.
    await redis_client.xadd(inbox(namespace, "gone"), {b"late": b"release"})
    await redis_client.xadd(dead_letters(namespace, "gone"), {b"why": b"test"})
    await redis_client.hset(registry(namespace), mapping={"n:gone": 7, "i:7": "gone"})
    await forget(address, namespace, ["gone", "live"])
    assert await redis_client.keys(f"{namespace}:{{gone}}:*") == []
    assert set(await redis_client.hkeys(registry(namespace))) == {b"n:live", b"i:0"}
    assert await redis_client.exists(heartbeat(namespace, "live"), inbox(namespace, "live")) == 2
    await live.close()
    assert await redis_client.keys(f"{namespace}:*") == []


async def test_close_while_redis_is_gone_fails_what_waits_and_leaves_nothing(
    namespace: str, log_events: LogEvents
) -> None:
    threads = set(threading.enumerate())
    with EmbeddedRedis() as server:
        address = RedisAddress.from_url(server.url)
        settings = TransportSettings(
            heartbeat_interval=0.05, heartbeat_ttl=0.5, reconnect_max_delay=0.05
        )
        t = Transport(address, namespace, "b", Mailbox(), settings)
        await t.start()
    # The server is gone: the reader retries with backoff, and a send waits for it.
    await log_events.wait("event=reconnect_failed agent=b role=reader", 2)
    unsent = t.send("b", [b"h", b"p"])
    await log_events.wait("event=reconnect_failed agent=b role=writer", 2)
    await log_events.wait("event=heartbeat_failed agent=b")
    async with asyncio.timeout(DEADLINE):
        await t.close()
    with pytest.raises(TransportError):
        await unsent
    assert set(threading.enumerate()) <= threads
    assert asyncio.all_tasks() == {asyncio.current_task()}


# *** agents under connection kills ***


async def test_a_message_stored_twice_runs_once(
    make_agent: Any, redis_client: aredis.Redis, namespace: str, conn: Connection
) -> None:
    """A resend after a lost reply stores a message twice; the copy must not run again.

    The copy is made at the wire: "w" looks alive while nobody reads its inbox, the call
    is stored there, copied, and only then does "w" start."""
    runs: collections.Counter[int] = collections.Counter()

    @rpc.expose(name=f"{namespace}.count")
    def count(x: int) -> int:
        runs[x] += 1
        return x

    w_inbox = inbox(namespace, "w")
    await redis_client.xgroup_create(w_inbox, GROUP, id="0", mkstream=True)
    # Left by a process of this host that is gone: the real "w" takes the name over.
    fake = f"id=0 pid={gone_pid()} {here()}"
    await redis_client.set(heartbeat(namespace, "w"), fake, px=int(DEADLINE * 1000))
    caller = await make_agent("caller")
    call = asyncio.create_task(caller.rpc_async("w", count, args=(1,)))
    await eventually(lambda: _has_entries(redis_client, w_inbox, 1), "the call stored")
    ((_, fields),) = await conn.execute("XRANGE", w_inbox, "-", "+")
    await conn.execute("XADD", w_inbox, "*", *fields)
    await make_agent("w")
    assert await asyncio.wait_for(call, DEADLINE) == 1
    assert await caller.rpc_async("w", count, args=(2,)) == 2
    assert runs == {1: 1, 2: 1}
    await eventually(lambda: _settled(redis_client, w_inbox), "both copies acked and deleted")


async def test_the_timeout_bounds_the_whole_call_while_redis_is_unreachable(
    namespace: str, log_events: LogEvents
) -> None:
    """The liveness check, and the announcement of an RRef passed on, wait for a writer
    that cannot reconnect: the call's timeout ends them too, and the count added for
    the RRef is taken back."""
    with EmbeddedRedis() as server:
        address = RedisAddress.from_url(server.url)
        assert address.path is not None
        # failure_timeout 30 s: a liveness check a has made holds for 6 s.
        a, b, c = (
            rpc.Agent(name, redis_url=server.url, namespace=namespace, failure_timeout=30.0)
            for name in "abc"
        )
        client = aredis.Redis.from_url(server.url)
        try:
            for agent in (a, b, c):
                await agent.start()
            theirs = await a.remote("b", f.Box)  # a has just seen b alive
            await a.rpc_async("c", f.echo, args=(None,))  # and c
            await client.ping()
            os.rename(address.path, address.path + ".away")
            assert await kill_clients(client, f"asyncgrad:{namespace}:a:writer") == 1
            await log_events.wait("event=reconnect_failed agent=a role=writer")
            started = time.monotonic()
            with pytest.raises(RPCTimeout, match=r"echo on 'nobody' got no reply within 0.5 s"):
                await asyncio.wait_for(
                    a.rpc_async("nobody", f.echo, args=(1,), timeout=0.5), DEADLINE
                )
            assert time.monotonic() - started < 2.0  # not the writer's connect timeout
            started = time.monotonic()
            with pytest.raises(RPCTimeout, match=r"echo on 'c' got no reply within 0.5 s"):
                await asyncio.wait_for(
                    a.rpc_async("c", f.echo, args=(theirs,), timeout=0.5), DEADLINE
                )
            assert time.monotonic() - started < 2.0
            os.rename(address.path + ".away", address.path)
            # The +1 for c and its -1 reach b first, in order: only a still holds the box.
            assert await a.rpc_async("b", f.echo, args=(1,), timeout=DEADLINE) == 1
            assert b.references.owned.holders() == {"a"}
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.rename(address.path + ".away", address.path)
            await client.aclose()
            for agent in (a, b, c):
                await agent.shutdown(graceful=False)


async def _has_entries(client: aredis.Redis, stream: str, n: int) -> bool:
    return bool(await client.xlen(stream) >= n)


ROLES = [("reader",), ("writer",), ("reader", "writer")]


@pytest.mark.parametrize("roles", ROLES, ids="+".join)
@pytest.mark.parametrize("side", ["caller", "worker"])
async def test_client_kill_during_traffic(
    side: str,
    roles: tuple[str, ...],
    make_agent: Any,
    redis_url: str,
    redis_client: aredis.Redis,
    namespace: str,
    log_events: LogEvents,
) -> None:
    """Kill connections of one side in the middle of 900 calls, 300 at a time in flight:
    each call ends quickly, with its result or an asyncgrad error, and runs at most once."""
    lanes, per_lane = 300, 3
    total = lanes * per_lane
    names = [f"asyncgrad:{namespace}:{side}:{role}" for role in roles]
    runs: collections.Counter[int] = collections.Counter()
    killer = await Connection.open(RedisAddress.from_url(redis_url))
    ids: list[str] = []

    @rpc.expose(name=f"{namespace}.traffic")
    def traffic(x: int) -> int:
        runs[x] += 1
        if sum(runs.values()) == total // 2:
            # Written at once, in the middle of a batch: Redis kills while we are busy.
            for client_id in ids:
                killer.command("CLIENT", "KILL", "ID", client_id)
            killer.flush()
        return x

    caller = await make_agent("caller")
    await make_agent("worker")
    ids += [c["id"] for c in await redis_client.client_list() if c["name"] in names]
    assert len(ids) == len(roles)

    async def lane(i: int) -> list[Any]:
        results: list[Any] = []
        for j in range(per_lane):
            x = i * per_lane + j
            try:
                results.append(await caller.rpc_async("worker", traffic, args=(x,)) == x)
            except AsyncgradError as e:
                results.append(e)
        return results

    try:
        tasks = [asyncio.create_task(lane(i)) for i in range(lanes)]
        done, hanging = await asyncio.wait(tasks, timeout=DEADLINE)
        for task in hanging:
            task.cancel()
        assert not hanging, f"{len(hanging)} of {lanes} lanes still waiting after {DEADLINE} s"
        results = [r for task in done for r in task.result()]
        assert all(r is True or isinstance(r, AsyncgradError) for r in results)
        assert sum(r is True for r in results) >= total // 2
        assert max(runs.values()) == 1, "a call ran twice"
        for role in roles:
            event = "reader_recovered" if role == "reader" else "reconnected"
            await log_events.wait(f"event={event} agent={side}")
        assert await caller.rpc_async("worker", traffic, args=(-1,), timeout=DEADLINE) == -1
        for agent in ("caller", "worker"):
            stream = inbox(namespace, agent)
            await eventually(lambda s=stream: _settled(redis_client, s), f"{stream} drained")
    finally:
        killer.close()
        await killer.closed.wait()
