"""Redis as the wire: key names, inbox streams, acks, dead letters, heartbeats, registry.

Every key asyncgrad uses is built by the functions under `keys`, and each carries the
namespace and, for one agent's keys, a `{agent}` hash tag so that a Redis Cluster keeps
them in one slot.

An agent reads its inbox stream through a consumer group on a dedicated connection
(`XREADGROUP ... BLOCK`) and writes on another. Messages are lists of frames; all the
messages sent to one inbox in one event-loop tick travel in one stream entry (fields
`m` for a message's first frame, `f` for each further frame). An entry is acked and
deleted once every message in it is `done`, so streams stay near empty. An entry that
does not parse goes to a bounded dead-letter stream. After a reconnect the agent first
re-reads its own pending entries (delivered but never acked), except those it is still
handling; a write lost with its connection is sent again, which may store a message
twice: the layer above drops such duplicates. A thread refreshes the heartbeat key, so
a busy event loop never looks dead.

The heartbeat key also holds the agent's name: `start` claims it (SET NX) and refuses
with `AgentNameTaken` while a live agent holds it; a holder that was a process of this
host and is gone (a worker killed and restarted at once) is taken over. Its value starts
with a token of this run, so that a run refreshes and deletes only its own heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import secrets
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from asyncgrad.errors import AgentNameTaken, TransportError
from asyncgrad.resp import Arg, Connection, ConnectionLost, RedisAddress, ReplyError, SyncConnection

__all__ = [
    "GROUP",
    "Inbound",
    "InboxMissing",
    "Transport",
    "TransportSettings",
    "check_name",
    "dead_letters",
    "heartbeat",
    "heartbeat_fields",
    "inbox",
    "registry",
]

logger = logging.getLogger(__name__)

GROUP = "asyncgrad"
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,100}")
_MAX_PER_ENTRY = 256
_DEAD_LETTER_MAXLEN = 1000
_DEAD_LETTER_FIELD_BYTES = 64 * 1024
_DEAD_LETTER_NAME_BYTES = 256
_DEAD_LETTER_FIELDS = 64
_MAX_DELIVERIES = 3
_FIRST_RETRY_DELAY = 0.05
_CLAIM_ATTEMPTS = 3


def check_name(kind: str, value: str) -> str:
    """Agent names and namespaces: letters, digits, `_ . -` (they are part of key names)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"{kind} {value!r} must be 1-100 of the characters A-Z a-z 0-9 _ . -")
    return value


# *** keys ***


def inbox(namespace: str, agent: str) -> str:
    return f"{namespace}:{{{agent}}}:inbox"


def heartbeat(namespace: str, agent: str) -> str:
    return f"{namespace}:{{{agent}}}:alive"


def dead_letters(namespace: str, agent: str) -> str:
    return f"{namespace}:{{{agent}}}:dead"


def registry(namespace: str) -> str:
    return f"{namespace}:registry"


# Gives `name` the id it had before, else the smallest free one (ids stay below 2**16).
_REGISTER = """
local id = redis.call('HGET', KEYS[1], 'n:' .. ARGV[1])
if id then return tonumber(id) end
for i = 0, 65535 do
  if redis.call('HSETNX', KEYS[1], 'i:' .. i, ARGV[1]) == 1 then
    redis.call('HSET', KEYS[1], 'n:' .. ARGV[1], i)
    return i
  end
end
return redis.error_reply('ERR no free agent id in this namespace')
"""
# Sets the heartbeat KEYS[1] if nobody holds it or its value starts with ARGV[1]: the
# run's own token (a refresh), or the whole value of a holder found gone (a takeover).
_SET_HEARTBEAT = """
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, #ARGV[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""
# Leaving: unless another run holds the name now, its heartbeat goes, and its inbox too
# if nothing waits in it (so a late message is never lost silently).
_LEAVE = """
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, #ARGV[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if redis.call('XLEN', KEYS[2]) == 0 then redis.call('DEL', KEYS[2]) end
return 1
"""


def heartbeat_fields(value: bytes | None) -> dict[str, str]:
    """A heartbeat's value (`run=... id=... pid=... host=... ttl_ms=... contexts=...`)
    as a dict."""
    parts = (value or b"").decode(errors="replace").split()
    return dict(part.split("=", 1) for part in parts if "=" in part)


class InboxMissing(TransportError):
    """The destination's inbox does not exist: that agent never started or left."""


@dataclass(frozen=True)
class TransportSettings:
    """Timings of one agent's link to Redis."""

    heartbeat_ttl: float = 3.0
    heartbeat_interval: float = 0.75
    block_ms: int = 2000
    read_count: int = 512
    reconnect_max_delay: float = 2.0
    connect_timeout: float = 10.0


class _Entry:
    __slots__ = ("id", "remaining")

    def __init__(self, entry_id: bytes, remaining: int) -> None:
        self.id, self.remaining = entry_id, remaining


class Inbound:
    """One received message: its frames, and the stream entry it came in."""

    __slots__ = ("entry", "frames")

    def __init__(self, frames: list[bytes], entry: _Entry) -> None:
        self.frames, self.entry = frames, entry


class Transport:
    """One agent's inbox, heartbeat and outgoing streams. `deliver` gets each batch read.

    `open_contexts`, if given, is asked at every heartbeat (from the heartbeat's thread)
    for the number published as `contexts=N`, which `asyncgrad status` shows.
    """

    def __init__(
        self,
        address: RedisAddress,
        namespace: str,
        name: str,
        deliver: Callable[[list[Inbound]], None],
        settings: TransportSettings | None = None,
        open_contexts: Callable[[], int] | None = None,
    ) -> None:
        self.address = address
        self.namespace = check_name("namespace", namespace)
        self.name = check_name("agent name", name)
        self.settings = settings or TransportSettings()
        self.id = -1
        self._deliver = deliver
        self._open_contexts = open_contexts or (lambda: 0)
        self._inbox = inbox(namespace, name)
        self._reader: Connection | None = None
        self._writer: Connection | None = None
        self._outbox: dict[str, list[tuple[list[bytes | memoryview], asyncio.Future[None]]]] = {}
        self._acks: list[bytes] = []
        self._backlog: list[tuple[tuple[Arg, ...], Callable[[Any], None] | None]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._closing = False  # close() began: no new sends, no more reading
        self._closed = False  # close() gave up on the writer: no more retries
        self._last_id = b"0"  # own pending entries first: delivered before, never acked
        self._in_read = False  # handling a batch inside the reader's callback
        # Entries delivered to the layer above and not yet done: a re-read of the pending
        # entries after a reconnect must not hand them over (or ack them) a second time.
        self._in_flight: set[bytes] = set()
        self._recovering: asyncio.Task[None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self._beat_done: asyncio.Future[None] | None = None
        # Starts the heartbeat's value: whose it is, among runs under this name.
        self._run = f"run={secrets.token_hex(8)} "
        self._claimed = False

    # *** lifecycle ***

    async def start(self) -> int:
        """Connect, create the inbox and its group, register, start heartbeats and reading."""
        self._writer = await self._connect("writer")
        self._reader = await self._connect("reader")
        await self._prepare(self._reader)
        beat = SyncConnection(self.address, name=self._client_name("heartbeat"))
        self._beat_done = asyncio.get_running_loop().create_future()
        self._beat_thread = threading.Thread(
            target=self._beat_forever,
            args=(beat, self._beat_done),
            name=f"asyncgrad-heartbeat-{self.name}",
        )
        self._beat_thread.daemon = True
        self._beat_thread.start()
        self._read_next()
        return self.id

    async def _prepare(self, conn: Connection) -> None:
        """Registry entry, inbox and group: idempotent, rerun after every reconnect; the
        first time, the name is claimed too.

        Runs on the reader connection, which is idle between two reads.
        """
        self.id = int(await conn.execute("EVAL", _REGISTER, 1, registry(self.namespace), self.name))
        if not self._claimed:
            # Before the inbox is touched: a duplicate refused here must not reclaim (and
            # dead-letter) the pending entries of the agent that holds the name.
            await self._claim(conn)
            self._claimed = True
        try:
            await conn.execute("XGROUP", "CREATE", self._inbox, GROUP, "0", "MKSTREAM")
        except ReplyError as e:
            if e.code != "BUSYGROUP":
                raise
        await self._reclaim(conn)

    async def _claim(self, conn: Connection) -> None:
        """Set the heartbeat if nobody holds the name, or its holder is gone; else raise."""
        key, value = heartbeat(self.namespace, self.name), self._beat_value()
        ttl_ms = int(self.settings.heartbeat_ttl * 1000)
        for _ in range(_CLAIM_ATTEMPTS):
            if await conn.execute("SET", key, value, "NX", "PX", ttl_ms) is not None:
                return
            held = await conn.execute("GET", key)
            if held is None:
                continue  # it lapsed between the two commands
            holder = heartbeat_fields(held)
            if not _gone(holder):
                raise AgentNameTaken(
                    f"agent name {self.name!r} is taken in namespace {self.namespace!r}: "
                    f"a live agent holds it (pid {holder.get('pid', '?')} on host "
                    f"{holder.get('host', '?')}); stop it or pick another name"
                )
            # Unless the name changed hands again meanwhile.
            if await conn.execute("EVAL", _SET_HEARTBEAT, 1, key, held, value, ttl_ms):
                logger.warning(
                    "event=name_taken_over agent=%s pid=%s host=%s",
                    self.name, holder["pid"], holder["host"],
                )  # fmt: skip
                return
        raise AgentNameTaken(
            f"agent name {self.name!r} in namespace {self.namespace!r} changed hands "
            f"{_CLAIM_ATTEMPTS} times while this agent claimed it"
        )

    async def close(self) -> None:
        """Stop reading, flush acks, stop heartbeats; the inbox goes if nothing waits in it."""
        if self._closing:
            return
        self._closing = True
        self._beat_stop.set()
        if self._reader is not None:
            self._reader.close()
        if self._recovering is not None:
            self._recovering.cancel()
            await asyncio.gather(self._recovering, return_exceptions=True)
        # The heartbeat stops before its key is deleted, so no late beat brings it back.
        await self._stop_heartbeat()
        if self._writer is not None:  # else it never connected: nothing to clean up
            await self._clean_up()
        self._closed = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            await asyncio.gather(self._reconnecting, return_exceptions=True)
        # What still waits for a writer fails now, and the futures of its sends with it.
        self._flush()
        backlog, self._backlog = self._backlog, []
        for _, on_reply in backlog:
            if on_reply is not None:
                on_reply(ConnectionLost("transport closed before Redis was reachable again"))
        # A reconnect cancelled above may have opened a connection just before: close all.
        for conn in (self._reader, self._writer):
            if conn is not None:
                conn.close()
                await conn.closed.wait()

    async def _clean_up(self) -> None:
        """Acks, replies and the cleanup still leave if the writer is, or comes, back in time
        (writes lost with a connection are resent until `_closed`).

        In time: within the heartbeat's TTL, after which peers count this agent as gone and
        have failed what waited for it anyway.
        """
        try:
            async with asyncio.timeout(
                min(self.settings.connect_timeout, self.settings.heartbeat_ttl)
            ):
                for attempt in itertools.count(1):
                    try:
                        writer = await self._ready_writer()
                        self._flush()
                        key = heartbeat(self.namespace, self.name)
                        await writer.execute("EVAL", _LEAVE, 2, key, self._inbox, self._run)
                        return
                    except ConnectionLost:
                        if attempt == 2:
                            raise
        except (TransportError, TimeoutError) as e:
            error = str(e) or "Redis unreachable until the heartbeat's TTL ran out"
            logger.warning("event=close_cleanup_failed agent=%s error=%s", self.name, error)

    async def _stop_heartbeat(self) -> None:
        thread, done = self._beat_thread, self._beat_done
        if thread is None or done is None:
            return
        # The thread resolves `done` as its last step; joining it then returns at once.
        await asyncio.wait({done}, timeout=self.settings.connect_timeout)
        if done.done():
            thread.join()
        else:
            logger.warning("event=heartbeat_stop_timeout agent=%s", self.name)

    # *** sending ***

    def send(self, dest: str, frames: list[bytes | memoryview]) -> asyncio.Future[None]:
        """Queue a message for `dest`'s inbox; the future resolves once Redis stored it.

        It fails with `InboxMissing` if `dest` has no inbox (never started, or left). While
        the writer reconnects, the message waits and leaves once it is back (the layer above
        bounds that wait with its timeouts); after `close()` it raises `TransportError`.
        """
        if self._closing:
            raise TransportError(f"the transport of agent {self.name!r} is closed")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outbox.setdefault(dest, []).append((frames, future))
        self._schedule_flush()
        return future

    def done(self, message: Inbound) -> None:
        """The message is handled; its entry is acked and deleted when all of it is."""
        entry = message.entry
        entry.remaining -= 1
        if entry.remaining == 0:
            self._in_flight.discard(entry.id)
            self._acks.append(entry.id)
            self._schedule_flush()

    def dead_letter(self, message: Inbound, reason: str) -> None:
        """Keep a message that could not be handled in the bounded dead-letter stream."""
        fields = [b"m", message.frames[0]]
        for frame in message.frames[1:]:
            fields += [b"f", frame]
        self._dead_letter(message.entry.id, fields, reason)
        self.done(message)

    def _dead_letter(self, entry_id: bytes, fields: list[bytes], reason: str) -> None:
        self._write(self._dead_letter_command(entry_id, fields, reason), self._log_failure)

    def _dead_letter_command(
        self, entry_id: bytes, fields: list[bytes], reason: str
    ) -> tuple[Arg, ...]:
        """Fields keep their order as `orig-NAME VALUE`, each cut short, and at most 64."""
        logger.warning("event=dead_letter agent=%s entry=%s reason=%s", self.name, entry_id, reason)
        pairs = len(fields) // 2
        kept: list[Arg] = []
        for i in range(0, 2 * min(pairs, _DEAD_LETTER_FIELDS), 2):
            name, value = fields[i][:_DEAD_LETTER_NAME_BYTES], fields[i + 1]
            kept += [b"orig-" + bytes(name), bytes(value[:_DEAD_LETTER_FIELD_BYTES])]
        key = dead_letters(self.namespace, self.name)
        args = ("XADD", key, "MAXLEN", "~", _DEAD_LETTER_MAXLEN, "*", "reason", reason[:1024])
        return (*args, "entry", entry_id, "fields", pairs, *kept)

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        outbox, self._outbox = self._outbox, {}
        for dest, queued in outbox.items():
            for start in range(0, len(queued), _MAX_PER_ENTRY):
                batch = queued[start : start + _MAX_PER_ENTRY]
                args: list[Arg] = ["XADD", inbox(self.namespace, dest), "NOMKSTREAM", "*"]
                for frames, _ in batch:
                    args += [b"m", frames[0]]
                    for frame in frames[1:]:
                        args += [b"f", frame]
                self._write(tuple(args), self._stored(dest, [f for _, f in batch]))
        if self._acks:
            ids, self._acks = self._acks, []
            self._write(("XACK", self._inbox, GROUP, *ids), self._log_failure)
            self._write(("XDEL", self._inbox, *ids), self._log_failure)
        if self._writer is not None and not self._in_read:
            self._writer.flush()

    def _stored(self, dest: str, futures: list[asyncio.Future[None]]) -> Callable[[Any], None]:
        def on_reply(reply: Any) -> None:
            error: Exception | None = None
            if reply is None:
                error = InboxMissing(f"agent {dest!r} has no inbox in namespace {self.namespace!r}")
            elif isinstance(reply, Exception):
                error = reply
            for future in futures:
                if not future.done():
                    if error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(error)

        return on_reply

    def _write(self, args: tuple[Arg, ...], on_reply: Callable[[Any], None] | None) -> None:
        """Send a command; if the connection drops first, send it again after reconnecting.

        Resending may store a message twice; receivers drop duplicates by message id.
        """

        def retry_on_loss(reply: Any) -> None:
            if isinstance(reply, ConnectionLost) and not self._closed:
                self._write(args, on_reply)
            elif on_reply is not None:
                on_reply(reply)

        # While a batch just read is handled, the reader connection is idle until the next
        # XREADGROUP: what the handlers send goes ahead of it, in the same write.
        writer = self._reader if self._in_read else self._writer
        if writer is None or not writer.is_open:
            writer = self._writer
        if writer is not None and writer.is_open:
            writer.command(*args, waiter=retry_on_loss)
        elif self._closed:
            retry_on_loss(ConnectionLost("transport closed"))
        else:
            self._backlog.append((args, retry_on_loss))
            self._reconnect()

    def _log_failure(self, reply: Any) -> None:
        if isinstance(reply, Exception):
            logger.warning("event=write_failed agent=%s error=%s", self.name, reply)

    # *** queries ***

    async def execute(self, *args: Arg) -> Any:
        """One command on the writer connection (for liveness checks and the like)."""
        return await (await self._ready_writer()).execute(*args)

    async def alive(self, names: Sequence[str]) -> list[bool]:
        """Whether each agent's heartbeat is current."""
        writer = await self._ready_writer()
        replies = [writer.execute("EXISTS", heartbeat(self.namespace, n)) for n in names]
        return [bool(r) for r in await asyncio.gather(*replies)]

    async def agents(self) -> dict[str, int]:
        """Every agent ever registered in the namespace, with its id."""
        flat = await self.execute("HGETALL", registry(self.namespace))
        pairs = zip(flat[::2], flat[1::2], strict=True)
        return {k[2:].decode(): int(v) for k, v in pairs if k.startswith(b"n:")}

    async def _ready_writer(self) -> Connection:
        """The writer; while it reconnects, waits for it (up to `connect_timeout`)."""
        if self._closed:
            raise TransportError(f"the transport of agent {self.name!r} is closed")
        if self._writer is None or not self._writer.is_open:
            self._reconnect()
            if (reconnecting := self._reconnecting) is not None:
                await asyncio.wait({reconnecting}, timeout=self.settings.connect_timeout)
        if self._writer is None or not self._writer.is_open:
            raise TransportError(f"Redis at {self.address} is unreachable (reconnecting)")
        return self._writer

    # *** reading ***

    def _read_next(self) -> None:
        """Ask for the next entries; the reply arrives in `_on_read` (no task hop)."""
        reader = self._reader
        if self._closing:
            return
        if reader is None or not reader.is_open:
            self._recover(ConnectionLost("reader not connected"))
            return
        reader.command(
            "XREADGROUP", "GROUP", GROUP, self.name, "COUNT", self.settings.read_count,
            "BLOCK", self.settings.block_ms, "STREAMS", self._inbox, self._last_id,
            waiter=self._on_read,
        )  # fmt: skip
        reader.flush()

    def _on_read(self, reply: Any) -> None:
        if isinstance(reply, Exception):
            self._recover(reply)
            return
        entries = reply[0][1] if reply else []
        if self._last_id != b">":
            self._last_id = entries[-1][0] if entries else b">"
        if entries:
            self._in_read = True
            try:
                self._receive(entries)
                # Replies and acks the batch produced leave with the next read: one write.
                if self._flush_handle is not None:
                    self._flush_handle.cancel()
                self._flush()
            except Exception:
                # The one place a failure to handle a batch ends: report it, keep serving.
                logger.exception("event=receive_failed agent=%s", self.name)
            finally:
                self._in_read = False
        self._read_next()

    def _recover(self, error: Exception) -> None:
        if self._closing or self._recovering is not None:
            return
        self._recovering = asyncio.get_running_loop().create_task(self._recover_reader(error))

    async def _recover_reader(self, error: Exception) -> None:
        """Reconnect the reader (or recreate a lost inbox), then read pending entries again."""
        try:
            if isinstance(error, ReplyError):
                # NOGROUP: Redis lost the inbox (restarted without persistence). Anything
                # else (LOADING, MISCONF, ...) is transient or needs an operator: retry.
                logger.warning("event=read_failed agent=%s error=%s", self.name, error)
                # UNBLOCKED: the inbox was deleted under a blocked read (Redis 7).
                if error.code not in ("NOGROUP", "UNBLOCKED"):
                    await asyncio.sleep(self.settings.reconnect_max_delay)  # retry timer
            delay = _FIRST_RETRY_DELAY
            while not self._closing:
                reader = self._reader
                if reader is None or not reader.is_open:
                    reader = self._reader = await self._connect_with_backoff("reader")
                try:
                    await self._prepare(reader)
                    break
                except (ReplyError, ConnectionLost) as e:
                    logger.warning(
                        "event=prepare_failed agent=%s retry_in=%.2fs error=%s",
                        self.name, delay, e,
                    )  # fmt: skip
                    reader.close()
                    # Backoff timer: a Redis that keeps refusing is not asked in a tight loop.
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.settings.reconnect_max_delay)
            logger.info("event=reader_recovered agent=%s id=%d", self.name, self.id)
        finally:
            self._recovering = None
        self._last_id = b"0"
        self._read_next()

    def _receive(self, entries: list[list[Any]]) -> None:
        batch: list[Inbound] = []
        for entry_id, fields in entries:
            if entry_id in self._in_flight:
                continue  # re-read after a reconnect while the layer above still handles it
            messages = _split(fields) if fields else None
            if messages is None:
                if fields:  # a deleted entry still pending has no fields: just ack it
                    self._dead_letter(entry_id, fields, "entry is not a list of m/f fields")
                self._acks.append(entry_id)
                self._schedule_flush()
                continue
            entry = _Entry(entry_id, len(messages))
            self._in_flight.add(entry_id)
            batch += [Inbound(frames, entry) for frames in messages]
        if batch:
            self._deliver(batch)

    async def _reclaim(self, conn: Connection) -> None:
        """Dead-letter own pending entries delivered too often (a message that crashes us).

        Entries this transport is still handling count as delivered once, however often a
        reconnect re-read them.
        """
        pending = await conn.execute("XPENDING", self._inbox, GROUP, "-", "+", 1000, self.name)
        poisoned = [
            p[0] for p in pending if int(p[3]) >= _MAX_DELIVERIES and p[0] not in self._in_flight
        ]
        for entry_id in poisoned:
            found = await conn.execute("XRANGE", self._inbox, entry_id, entry_id)
            fields = found[0][1] if found and found[0][1] else []
            reason = f"delivered {_MAX_DELIVERIES} times, never acked"
            # Acked here, before the pending entries are read again, so none comes back.
            await conn.execute(*self._dead_letter_command(entry_id, fields, reason))
            await conn.execute("XACK", self._inbox, GROUP, entry_id)
            await conn.execute("XDEL", self._inbox, entry_id)
        if pending:
            logger.info(
                "event=reclaimed agent=%s pending=%d dead_lettered=%d",
                self.name, len(pending), len(poisoned),
            )  # fmt: skip

    # *** connections ***

    def _client_name(self, role: str) -> str:
        return f"asyncgrad:{self.namespace}:{self.name}:{role}"

    async def _connect(self, role: str) -> Connection:
        return await Connection.open(
            self.address,
            name=self._client_name(role),
            connect_timeout=self.settings.connect_timeout,
            on_lost=self._on_writer_lost if role == "writer" else None,
        )

    def _on_writer_lost(self, conn: Connection) -> None:
        # Reconnect at once, not at the next write: queries wait for the writer too.
        if conn is self._writer:
            self._reconnect()

    async def _connect_with_backoff(self, role: str) -> Connection:
        delay = _FIRST_RETRY_DELAY
        for attempt in itertools.count(1):
            try:
                return await self._connect(role)
            except ConnectionLost as e:
                logger.warning(
                    "event=reconnect_failed agent=%s role=%s attempt=%d retry_in=%.2fs error=%s",
                    self.name, role, attempt, delay, e,
                )  # fmt: skip
                # Backoff timer between attempts, not a wait for an event.
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.reconnect_max_delay)
        raise AssertionError("unreachable")

    def _reconnect(self) -> None:
        if self._reconnecting is None and not self._closed:
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect_writer())

    async def _reconnect_writer(self) -> None:
        try:
            writer = None
            while writer is None or not writer.is_open:  # lost again before it was used
                writer = self._writer = await self._connect_with_backoff("writer")
            logger.info(
                "event=reconnected agent=%s role=writer resend=%d", self.name, len(self._backlog)
            )
            backlog, self._backlog = self._backlog, []
            for args, on_reply in backlog:
                writer.command(*args, waiter=on_reply)
        finally:
            self._reconnecting = None

    # *** heartbeat ***

    def _beat_value(self) -> str:
        ttl_ms = int(self.settings.heartbeat_ttl * 1000)
        host, contexts = socket.gethostname(), self._open_contexts()
        return (
            f"{self._run}id={self.id} pid={os.getpid()} host={host} ttl_ms={ttl_ms} "
            f"contexts={contexts}"
        )

    def _beat(self, conn: SyncConnection) -> bool:
        """Refresh the heartbeat; False if another run holds the name now."""
        key, ttl_ms = heartbeat(self.namespace, self.name), int(self.settings.heartbeat_ttl * 1000)
        return bool(
            conn.execute("EVAL", _SET_HEARTBEAT, 1, key, self._run, self._beat_value(), ttl_ms)
        )

    def _beat_forever(self, conn: SyncConnection | None, done: asyncio.Future[None]) -> None:
        loop = done.get_loop()
        ours = True
        try:
            while not self._beat_stop.wait(self.settings.heartbeat_interval):
                try:
                    reconnected = conn is None
                    if conn is None:
                        conn = SyncConnection(self.address, name=self._client_name("heartbeat"))
                    was_ours, ours = ours, self._beat(conn)
                    if reconnected:
                        logger.info("event=reconnected agent=%s role=heartbeat", self.name)
                    if was_ours and not ours:
                        # The heartbeat lapsed (Redis out of reach) and another agent took
                        # the name meanwhile; its heartbeat is left alone until it leaves.
                        logger.error("event=name_lost agent=%s", self.name)
                except TransportError as e:
                    logger.warning("event=heartbeat_failed agent=%s error=%s", self.name, e)
                    if conn is not None:
                        conn.close()
                    conn = None
            if conn is not None:
                conn.close()
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve, done)


def _gone(holder: dict[str, str]) -> bool:
    """Whether a heartbeat's holder was a process of this host that no longer exists."""
    pid = holder.get("pid", "")
    if holder.get("host") != socket.gethostname() or not pid.isdigit() or int(pid) <= 0:
        return False  # elsewhere, or not ours to tell: only its TTL can say it is gone
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, as another user's process
        return False
    return False


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _split(fields: list[bytes]) -> list[list[bytes]] | None:
    """The messages of one entry, or None if the fields are not `m`/`f` pairs."""
    if len(fields) % 2 or fields[0] != b"m":
        return None
    messages: list[list[bytes]] = []
    for i in range(0, len(fields), 2):
        kind, value = fields[i], fields[i + 1]
        if kind == b"m":
            messages.append([value])
        elif kind == b"f":
            messages[-1].append(value)
        else:
            return None
    return messages
