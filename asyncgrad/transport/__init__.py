"""Redis as the wire: key names, inbox streams, acks, dead letters, heartbeats, registry.

One agent's `Transport` owns three parts, each with a connection of its own:

- `reader`: the inbox, read through a consumer group (`XREADGROUP ... BLOCK`);
- `writer`: messages out (one stream entry per inbox and loop tick), acks, dead letters,
  and resends after a reconnect;
- `heartbeats`: the heartbeat key, which also holds the agent's name, refreshed by a
  thread so that a busy event loop never looks dead.

`keys` builds every key name (each carries the namespace) and holds the scripts about
names; `connections` has the timings, and opens and names each connection; over a Redis
Cluster each of them is a `cluster.ClusterConnection`, which sends every command to the
master of its key's hash slot (`slots`; all of one agent's keys share one).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from asyncgrad.errors import TransportError
from asyncgrad.tracing import Spans
from asyncgrad.transport.cluster import RedisLink, connect
from asyncgrad.transport.connections import Endpoint, TransportSettings
from asyncgrad.transport.data import DEFAULT_INLINE_LIMIT, DataPlane, DataSettings
from asyncgrad.transport.data.reference import TOKEN_BYTES
from asyncgrad.transport.heartbeats import Heartbeat, heartbeat_fields
from asyncgrad.transport.keys import (
    GROUP,
    HEARTBEATS,
    LEAVE,
    REGISTER,
    UNREGISTER,
    WITHDRAW,
    check_name,
    dead_letters,
    heartbeat,
    inbox,
    namespace_of,
    registered,
    registry,
    seen,
)
from asyncgrad.transport.reader import Inbound, Reader
from asyncgrad.transport.resp import DEFAULT_URL, Arg, ConnectionLost, RedisAddress, ReplyError
from asyncgrad.transport.writer import InboxMissing, Stored, Writer

__all__ = [
    "DEFAULT_INLINE_LIMIT",
    "DEFAULT_URL",
    "DataSettings",
    "GROUP",
    "Inbound",
    "InboxMissing",
    "RedisAddress",
    "ReplyError",
    "Stored",
    "Transport",
    "TransportSettings",
    "check_name",
    "dead_letters",
    "forget",
    "heartbeat",
    "heartbeat_fields",
    "inbox",
    "live_namespaces",
    "registered",
    "registry",
    "seen",
]

logger = logging.getLogger(__name__)

# A connection lost under a read-only query: it is asked again, at most this often in all.
_READ_ATTEMPTS = 3
# `live_namespaces` looks at this many keys at most (SCAN ... COUNT 1000, 50 times).
_SCAN_BATCH, _SCAN_ROUNDS = 1000, 50


class Transport:
    """One agent's inbox, heartbeat and outgoing streams. `deliver` gets each batch read.

    `start` claims the agent's name and refuses with `AgentNameTaken` while a live agent
    holds it. `open_contexts`, if given, is asked at every heartbeat (from the heartbeat's
    thread) for the number published as `contexts=N`, which `asyncgrad status` shows,
    as it shows `received=N`, the messages read from the inbox so far (`received`).
    `on_inbox_lost` hears when Redis lost the inbox (see `Reader`). `spans` records the
    waits on Redis (each write until stored) and on the data path, and its clock learns
    its offset to Redis's at every heartbeat.
    """

    def __init__(
        self,
        address: RedisAddress,
        namespace: str,
        name: str,
        deliver: Callable[[list[Inbound]], None],
        settings: TransportSettings | None = None,
        open_contexts: Callable[[], int] | None = None,
        on_inbox_lost: Callable[[], None] | None = None,
        data: DataSettings | None = None,
        spans: Spans | None = None,
    ) -> None:
        self.address = address
        self.namespace = check_name("namespace", namespace)
        self.name = check_name("agent name", name)
        self.settings = settings or TransportSettings()
        self.id = -1
        self.received = 0
        endpoint = Endpoint(address, namespace, name, self.settings)
        self.spans = spans or Spans(name, enabled=False)
        self._writer = Writer(endpoint, self.spans)
        self.data = DataPlane(
            name,
            address,
            data or DataSettings(),
            self._alive_one,
            self._writer.control,
            check_every=self.settings.heartbeat_interval,
        )

        def count(batch: list[Inbound]) -> None:
            self.received += len(batch)
            deliver(batch)

        self._reader = Reader(
            endpoint,
            self._writer,
            count,
            self._register,
            on_inbox_lost,
            self.data,
            self._on_data_entry,
            self.spans,
        )
        self._heartbeat = Heartbeat(
            endpoint,
            lambda: self.id,
            open_contexts or (lambda: 0),
            lambda: self.received,
            self.spans.clock,
        )
        self._claimed = False
        self._closing = False  # close() began: no new sends, no more reading

    # *** lifecycle ***

    async def start(self) -> int:
        """Connect, claim the name, register, create the inbox and its group, start
        heartbeats and reading; returns the agent's id."""
        try:
            # Redis first: an agent that cannot reach it fails with that one error, having
            # opened (and logged) nothing else; the data plane before the registry entry.
            await self._writer.connect()
            await self.data.start()
            self._heartbeat.data_address = self.data.endpoints.tcp_address
            await self._reader.start()
        except ReplyError as e:
            if e.code == "NOPERM":
                raise self._not_permitted(e) from e
            raise
        self._heartbeat.start()
        self._reader.read()
        return self.id

    def _not_permitted(self, error: ReplyError) -> ReplyError:
        """Redis's NOPERM names neither the user nor the key: say who may not do what."""
        detail = str(error).partition(" ")[2]
        return ReplyError(
            f"NOPERM Redis user {self.address.username or 'default'!r} at {self.address} may "
            f"not use namespace {self.namespace!r}: {detail} (an agent needs the keys "
            f"~{self.namespace}:* and the commands SECURITY.md lists)"
        )

    async def _register(self, conn: RedisLink) -> int:
        """The registry entry (the reader reruns this after every reconnect); the first
        time, the name's claim too."""
        # The id it had, if free: after a Redis restart lost the registry, ids stay stable.
        args = (registry(self.namespace), self.name, self.id)
        self.id = int(await conn.execute("EVAL", REGISTER, 1, *args))
        if not self._claimed:
            # Before the inbox is touched: a duplicate refused here must not reclaim (and
            # dead-letter) the pending entries of the agent that holds the name.
            await self._heartbeat.claim(conn)
            self._claimed = True
        return self.id

    async def close(self) -> None:
        """Stop reading, flush acks, stop heartbeats; the inbox goes if nothing waits in it."""
        if self._closing:
            return
        # Frames held for receivers are served until fetched (within the heartbeat's TTL:
        # past it, receivers count this agent as gone anyway); `q` entries are still read.
        await self.data.drain(self.settings.heartbeat_ttl)
        self._closing = True
        await self._reader.close()
        # The heartbeat stops before its key is deleted, so no late beat brings it back.
        await self._heartbeat.stop()
        if self._writer.conn is not None:  # else it never connected: nothing to clean up
            await self._clean_up()
        await self._writer.close()
        await self.data.close()

    async def _clean_up(self) -> None:
        """Acks, replies and the cleanup still leave if the writer is, or comes, back in time
        (writes lost with a connection are resent until the writer is closed).

        In time: within the heartbeat's TTL, after which peers count this agent as gone and
        have failed what waited for it anyway.
        """
        try:
            async with asyncio.timeout(
                min(self.settings.connect_timeout, self.settings.heartbeat_ttl)
            ):
                for attempt in itertools.count(1):
                    try:
                        writer = await self._writer.ready()
                        self._writer.flush()
                        await self._leave(writer)
                        return
                    except ConnectionLost:
                        if attempt == 2:
                            raise
        except (TransportError, TimeoutError) as e:
            error = str(e) or "Redis unreachable until the heartbeat's TTL ran out"
            logger.warning("event=close_cleanup_failed agent=%s error=%s", self.name, error)

    async def _leave(self, writer: RedisLink) -> None:
        """Out of the registry (a clean stop leaves nothing behind: `asyncgrad status` lists
        it no more), then the heartbeat and the empty inbox go."""
        entry = (registry(self.namespace), self.name, self.id)
        # While this run still holds the heartbeat, so the name is still its own.
        if self.id >= 0:
            await writer.execute("EVAL", UNREGISTER, 1, *entry)
        keys = (self._heartbeat.key, inbox(self.namespace, self.name), self._heartbeat.seen_key)
        left = await writer.execute("EVAL", LEAVE, 3, *keys, self._heartbeat.token)
        if not left and self.id >= 0:
            # Another run holds the name now (its heartbeat lapsed here): its entry, with
            # the same id, was the one just removed.
            await writer.execute("EVAL", REGISTER, 1, *entry)

    # *** messages ***

    def send(
        self,
        dest: str,
        frames: list[bytes | memoryview],
        withdrawable: bool = False,
        traced: tuple[int, int] = (0, 0),
    ) -> Stored:
        """Queue a message for `dest`'s inbox; the future resolves to its stream entry's id
        once Redis stored it (see `withdraw` for `withdrawable`). `traced`: what the span of
        its write records of it, (a context, a message id) as the layer above numbers them.

        It fails with `InboxMissing` if `dest` has no inbox (never started, or left). While
        the writer reconnects, the message waits and leaves once it is back (the layer above
        bounds that wait with its timeouts); after `close()` it raises `TransportError`.
        """
        if self._closing:
            raise TransportError(f"the transport of agent {self.name!r} is closed")
        frames, tokens = self.data.outgoing(dest, frames)
        stored = self._writer.send(dest, frames, withdrawable, traced)
        if tokens:
            stored.add_done_callback(lambda s: self.data.stored(tokens, _outcome(s)))
        return stored

    async def withdraw(self, dest: str, entry_id: bytes) -> bool:
        """Delete the stream entry of withdrawable messages sent to `dest`, unless `dest`
        has read it already: whether they were withdrawn (they will never be read)."""
        stream = inbox(self.namespace, dest)
        withdrawn = bool(await self.execute("EVAL", WITHDRAW, 1, stream, GROUP, entry_id))
        if withdrawn:
            self.data.withdrawn(dest, entry_id)
        return withdrawn

    def post(
        self, dest: str, frames: list[bytes | memoryview], traced: tuple[int, int] = (0, 0)
    ) -> None:
        """`send`, for a message nobody waits for: a failure to store it is only logged."""
        self.send(dest, frames, traced=traced).add_done_callback(_log_unstored)

    def done(self, message: Inbound) -> None:
        """The message is handled; its entry is acked and deleted when all of it is."""
        self._reader.done(message)

    def dead_letter(self, message: Inbound, reason: str) -> None:
        """Keep a message that could not be handled in the bounded dead-letter stream."""
        self._reader.dead_letter(message, reason)

    def _on_data_entry(self, fields: list[bytes]) -> None:
        """A `q` (a receiver asks for a frame by Redis) or `d` (a sender's answer) entry;
        `ValueError` if malformed."""
        if len(fields) % 2 or len(fields[1]) != TOKEN_BYTES:
            raise ValueError("not a token and field pairs")
        token, pairs = fields[1], dict(zip(fields[2::2], fields[3::2], strict=True))
        if fields[0] == b"q":
            requester = check_name("agent name", pairs.get(b"a", b"").decode(errors="replace"))
            unreachable, drop = pairs.get(b"u") == b"1", pairs.get(b"drop") == b"1"
            answer = self.data.on_request(requester, token, unreachable, drop)
            if answer is not None:
                self._writer.control(requester, answer).add_done_callback(_log_unstored)
        else:
            error = pairs.get(b"x", b"the sender sent no bytes").decode(errors="replace")
            self.data.on_data(token, pairs.get(b"b"), error)

    async def _alive_one(self, name: str) -> bool:
        return (await self.alive([name]))[0]

    # *** queries ***

    @property
    def reconnected_at(self) -> float:
        """`time.monotonic()` when the connection `alive` asks on was last made again (-inf:
        never): a heartbeat missing from a Redis just reached again may not be set again
        yet (a Redis restarted without persistence lost them all)."""
        return self._writer.reconnected_at

    async def execute(self, *args: Arg) -> Any:
        """One command on the writer connection (for liveness checks and the like)."""
        return await (await self._writer.ready()).execute(*args)

    @property
    def incarnation(self) -> str:
        """This run of the agent: a new one whenever an agent starts under the name."""
        return self._heartbeat.incarnation

    @property
    def started_ms(self) -> int:
        """Redis's clock when this incarnation started (0 before it did)."""
        return self._heartbeat.started_ms

    def redis_now_ms(self) -> float | None:
        """Redis's clock now, in ms (every agent estimates it alike), from the heartbeats."""
        return self._heartbeat.redis_now_ms()

    def reachable_for(self) -> float:
        """Seconds this agent has reached Redis without a gap (0 while it cannot)."""
        return self._heartbeat.reachable_for()

    async def heartbeats(self, names: Sequence[str]) -> list[dict[str, str] | None]:
        """Each agent's heartbeat fields (`run`, `t`, ...), or None where there is none."""
        replies = await self._read([("GET", heartbeat(self.namespace, n)) for n in names])
        return [None if r is None else heartbeat_fields(r) for r in replies]

    async def alive(self, names: Sequence[str]) -> list[bool]:
        """Whether each agent's heartbeat is current."""
        replies = await self._read([("EXISTS", heartbeat(self.namespace, n)) for n in names])
        return [bool(r) for r in replies]

    async def agents(self) -> dict[str, int]:
        """Every agent ever registered in the namespace, with its id."""
        (flat,) = await self._read([("HGETALL", registry(self.namespace))])
        return registered(flat)

    async def _read(self, commands: list[tuple[Arg, ...]]) -> list[Any]:
        """Read-only commands, asked again once the writer is back if its connection
        dropped under them (a failover does that): the question stands, and its answer
        does not depend on which connection carried it."""
        for attempt in range(1, _READ_ATTEMPTS + 1):
            writer = await self._writer.ready()
            try:
                return list(await asyncio.gather(*(writer.execute(*c) for c in commands)))
            except ConnectionLost:
                if attempt == _READ_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")


async def forget(address: RedisAddress, namespace: str, names: Sequence[str]) -> None:
    """Delete what the named agents left in Redis once stopped (an inbox that messages
    reached while it closed, dead letters, the registry entry): for a caller that started
    every agent of `namespace` itself and reads nothing of theirs again (`asyncgrad demo`).
    An agent that is live again under one of the names keeps everything."""
    conn = await connect(address, name=f"asyncgrad:{namespace}:forget")
    try:
        for name in names:
            if await conn.execute("EXISTS", heartbeat(namespace, name)):
                continue
            agent_id = await conn.execute("HGET", registry(namespace), f"n:{name}")
            if agent_id is not None:
                await conn.execute("EVAL", UNREGISTER, 1, registry(namespace), name, agent_id)
            # One slot (the name's hash tag), so one command also on a Redis Cluster.
            keys = (inbox(namespace, name), dead_letters(namespace, name), seen(namespace, name))
            await conn.execute("DEL", *keys)
    finally:
        conn.close()


async def live_namespaces(address: RedisAddress) -> list[str] | None:
    """The namespaces with a live agent on that Redis (a hint for a mistyped one), from a
    bounded SCAN of the heartbeat keys; None if this Redis user may not SCAN."""
    conn = await connect(address, name="asyncgrad:namespaces")
    found: set[str] = set()
    try:
        cursor: bytes | int = 0
        for _ in range(_SCAN_ROUNDS):
            try:
                cursor, keys = await conn.execute(
                    "SCAN", cursor, "MATCH", HEARTBEATS, "COUNT", _SCAN_BATCH
                )
            except ReplyError as e:
                if e.code == "NOPERM":  # an ACL user limited to its namespace
                    return None
                raise
            found.update(namespace_of(k.decode(errors="replace")) for k in keys)
            if int(cursor) == 0:
                break
    finally:
        conn.close()
    return sorted(found)


def _outcome(stored: Stored) -> bytes | BaseException:
    if stored.cancelled():
        return asyncio.CancelledError()
    return stored.exception() or stored.result()


def _log_unstored(stored: Stored) -> None:
    if stored.cancelled() or (error := stored.exception()) is None:
        return
    # A receiver that left needs nobody's answer or notice: expected, so not a warning.
    level = logging.DEBUG if isinstance(error, InboxMissing) else logging.WARNING
    logger.log(level, "event=send_failed error=%s", error)
