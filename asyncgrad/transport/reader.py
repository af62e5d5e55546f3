"""The reading side of one agent's transport: its inbox, read through a consumer group.

The reader connection waits in `XREADGROUP ... BLOCK`; each reply is handled in its
callback (no task hop), and the next read leaves with what handling it wrote. An entry
is acked and deleted once every message in it is `done`, so streams stay near empty; an
entry that does not parse goes to the bounded dead-letter stream. After a reconnect the
reader first re-reads its own pending entries (delivered but never acked), except those
it is still handling, and dead-letters those delivered too often (a message that crashes
us).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from asyncgrad.errors import CodecError, TransferLost
from asyncgrad.tracing import Span, Spans
from asyncgrad.transport.cluster import RedisLink
from asyncgrad.transport.connections import Endpoint, Flapping
from asyncgrad.transport.data import DataPlane, RefField
from asyncgrad.transport.keys import GROUP, inbox
from asyncgrad.transport.resp import ConnectionLost, ReplyError
from asyncgrad.transport.writer import Writer

__all__ = ["Inbound", "Reader"]

logger = logging.getLogger(__name__)

_MAX_DELIVERIES = 3
# Messages read and held back behind one whose frames are on their way (order is kept):
# past this many, reading waits.
_MAX_WAITING = 10_000
_CONTROL = (b"q", b"d")  # entries of the data plane (`DataPlane`): a request, an answer
# Past every pending entry: a read of history from here returns none. (Not the greatest
# id, 2**64-1 - 2**64-1: Redis takes that one for `>`, and would deliver a new entry.)
_LAST_ID = b"18446744073709551615-18446744073709551614"


class _Entry:
    __slots__ = ("id", "remaining")

    def __init__(self, entry_id: bytes, remaining: int) -> None:
        self.id, self.remaining = entry_id, remaining


class Inbound:
    """One received message: its frames, and the stream entry it came in. `redelivered`:
    the entry was delivered to this name before (to this run before a reconnect, or to an
    earlier run of the agent) and never acked. `error`: why the frames that went by the
    data plane are not here (`TransferLost`, or a `CodecError` for a message over the size
    limit or a malformed reference): the message cannot be decoded. `read_ns`: when it was
    read (monotonic clock); `fetched`: the span of the wait for its frames, if it had any
    to fetch (the layer above names the span's context once it decoded the header)."""

    __slots__ = ("entry", "error", "fetched", "frames", "read_ns", "redelivered")

    def __init__(
        self, frames: list[Any], entry: _Entry, redelivered: bool = False, read_ns: int = 0
    ) -> None:
        self.frames, self.entry, self.redelivered = frames, entry, redelivered
        self.read_ns = read_ns
        self.error: CodecError | None = None
        self.fetched: Span | None = None

    @property
    def stored_ms(self) -> int:
        """When Redis stored the message, on its clock (its stream entry's id says)."""
        return int(self.entry.id.partition(b"-")[0])


class Reader:
    """Reads the inbox and hands each batch to `deliver`; `done` acks what was handled.

    `register` puts the agent in the registry (and returns its id) before the inbox is
    touched, at start and after every reconnect. `on_inbox_lost` hears when a reconnect
    finds the inbox gone (Redis restarted without persistence): messages sent to this
    agent, or by it and not yet read, may be lost.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        writer: Writer,
        deliver: Callable[[list[Inbound]], None],
        register: Callable[[RedisLink], Awaitable[int]],
        on_inbox_lost: Callable[[], None] | None = None,
        data: DataPlane | None = None,
        on_control: Callable[[list[bytes]], None] | None = None,
        spans: Spans | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._data = data
        self._spans = spans or Spans(endpoint.name, enabled=False)
        self._on_control = on_control
        # Messages read behind one whose frames are being fetched: delivered in order.
        self._waiting: collections.deque[tuple[Inbound, asyncio.Task[None] | None]] = (
            collections.deque()
        )
        self._paused = False  # too many waiting: the next read waits for them
        self._writer = writer
        self._deliver = deliver
        self._register = register
        self._on_inbox_lost = on_inbox_lost
        self._prepared = False
        self._inbox = inbox(endpoint.namespace, endpoint.name)
        settings = endpoint.settings
        self._read_args = (
            "XREADGROUP", "GROUP", GROUP, endpoint.name, "COUNT", settings.read_count,
            "BLOCK", settings.block_ms, "STREAMS", self._inbox,
        )  # fmt: skip
        self.conn: RedisLink | None = None
        self._closing = False
        self._last_id = b"0"  # own pending entries first: delivered before, never acked
        # Entries delivered to the layer above and not yet done: a re-read of the pending
        # entries after a reconnect must not hand them over (or ack them) a second time.
        self._in_flight: set[bytes] = set()
        self._recovering: asyncio.Task[None] | None = None
        self._flapping = Flapping(endpoint.settings.reconnect_max_delay)

    async def start(self) -> None:
        """Connect and prepare the inbox; reading begins with `read`."""
        self.conn = await self._endpoint.open("reader", spill=self._writer_conn)
        self._flapping.connected()
        await self._prepare(self.conn)

    async def close(self) -> None:
        """Stop reading; unacked entries stay pending, for the next run under this name."""
        self._closing = True
        fetching = [task for _, task in self._waiting if task is not None]
        for task in fetching:
            task.cancel()
        await asyncio.gather(*fetching, return_exceptions=True)
        self._waiting.clear()
        if self.conn is not None:
            self.conn.close()
        if self._recovering is not None:
            self._recovering.cancel()
            await asyncio.gather(self._recovering, return_exceptions=True)
        # A recovery cancelled above may have opened a connection just before.
        if self.conn is not None:
            self.conn.close()
            await self.conn.closed.wait()

    def done(self, message: Inbound) -> None:
        """The message is handled; its entry is acked and deleted when all of it is."""
        entry = message.entry
        entry.remaining -= 1
        if entry.remaining == 0:
            self._in_flight.discard(entry.id)
            self._writer.ack(entry.id)

    def dead_letter(self, message: Inbound, reason: str) -> None:
        """Keep a message that could not be handled in the bounded dead-letter stream."""
        fields = [b"m", message.frames[0]]
        for frame in message.frames[1:]:
            fields += [b"f", frame]
        self._writer.dead_letter(message.entry.id, fields, reason)
        self.done(message)

    def _writer_conn(self) -> RedisLink | None:
        # Over a cluster, it takes what would wait behind this reader's blocking read.
        return self._writer.conn

    # *** reading ***

    def read(self) -> None:
        """Ask for the next entries; the reply arrives in `_on_read` (no task hop)."""
        reader = self.conn
        if self._closing:
            return
        if len(self._waiting) >= _MAX_WAITING:
            self._paused = True  # `_release` reads again
            return
        if reader is None or not reader.is_open:
            self._recover(ConnectionLost("reader not connected"))
            return
        reader.command(*self._read_args, self._last_id, waiter=self._on_read)
        reader.flush()

    def _on_read(self, reply: Any) -> None:
        if isinstance(reply, Exception):
            self._recover(reply)
            return
        entries = reply[0][1] if reply else []
        redelivered = self._last_id != b">"
        if redelivered:
            self._last_id = entries[-1][0] if entries else b">"
        if not entries:
            self.read()
            return
        conn = self.conn
        self._writer.via = conn
        if conn is not None:
            conn.held = True
        try:
            self._receive(entries, redelivered)
        except Exception:
            # The one place a failure to handle a batch ends: report it, keep serving.
            logger.exception("event=receive_failed agent=%s", self._endpoint.name)
        # The reader stays idle until its next XREADGROUP. The tasks this batch woke run
        # first (call_soon keeps the order): their calls join the batch's replies and acks,
        # and the next read, in one write.
        asyncio.get_running_loop().call_soon(self._finish_batch, conn)

    def _finish_batch(self, conn: RedisLink | None) -> None:
        try:
            self._writer.flush()
        finally:
            self._writer.via = None
            if conn is not None:
                conn.held = False
        self.read()

    def _receive(self, entries: list[list[Any]], redelivered: bool = False) -> None:
        batch: list[Inbound] = []
        read_ns = time.monotonic_ns()
        for entry_id, fields in entries:
            if entry_id in self._in_flight:
                continue  # re-read after a reconnect while the layer above still handles it
            if fields and fields[0] in _CONTROL:
                self._control(entry_id, fields)
                continue
            messages = _split(fields) if fields else None
            if messages is None:
                if fields:  # a deleted entry still pending has no fields: just ack it
                    reason = "entry is not a list of m/f fields"
                    self._writer.dead_letter(entry_id, fields, reason)
                self._writer.ack(entry_id)
                continue
            entry = _Entry(entry_id, len(messages))
            self._in_flight.add(entry_id)
            for frames in messages:
                message = Inbound(frames, entry, redelivered, read_ns)
                refers = self._data is not None and _refers(frames)
                if not self._waiting and (not refers or self._resolved_now(message)):
                    batch.append(message)  # nothing to fetch, or offered: here already
                else:
                    self._hold(message, refers)
        if batch:
            self._deliver(batch)

    def _control(self, entry_id: bytes, fields: list[bytes]) -> None:
        """A data plane entry: handled at once, and acked (a `d` holds a whole frame)."""
        try:
            if self._on_control is None:
                raise ValueError("this agent has no data plane")
            self._on_control(fields)
        except ValueError as e:
            self._writer.dead_letter(entry_id, fields, f"bad data plane entry: {e}")
        self._writer.ack(entry_id)

    # *** frames fetched by the data plane ***

    def _resolved_now(self, message: Inbound) -> bool:
        assert self._data is not None
        start = time.monotonic_ns()
        done = self._data.resolve_now(message.frames)
        if done is False:
            return False  # to be fetched: `_fetch`'s span says how long it took
        span = message.fetched = self._spans.begin("fetch", "data", start=start)
        if isinstance(done, CodecError):
            message.error = done
            self._spans.end(span, error=str(done))
            return True
        self._fetched(message, "offered")  # every frame was offered before it was read
        return True

    def _hold(self, message: Inbound, refers: bool) -> None:
        """Keep a message until it, and every message read before it, can be delivered;
        `refers`: it has frames to fetch."""
        task = None
        if refers:
            task = asyncio.get_running_loop().create_task(self._fetch(message))
            task.add_done_callback(self._release)
        self._waiting.append((message, task))

    async def _fetch(self, message: Inbound) -> None:
        assert self._data is not None
        span = message.fetched = self._spans.begin("fetch", "data")
        # (A copy: the data plane's threads add to the counts; a copy is one C call.)
        before = self._data.counts.copy() if span is not None else None
        try:
            await self._data.resolve(message.frames)
        except CodecError as e:
            self._spans.end(span, error=str(e))
            message.error = e
            logger.warning(
                "event=transfer_failed agent=%s entry=%s error=%s",
                self._endpoint.name, message.entry.id, e,
            )  # fmt: skip
        except Exception as e:
            logger.exception("event=fetch_failed agent=%s", self._endpoint.name)
            message.error = TransferLost(f"fetching its frames failed: {e!r}")
            self._spans.end(span, error=repr(e))
        else:
            if before is not None:
                after = self._data.counts.copy()
                # (Fetches running meanwhile add to the counts too: "path" may name theirs.)
                paths = [k[8:] for k, n in after.items() if k[:8] == "fetched_" and n > before[k]]
                self._fetched(message, ",".join(paths) or "offered")
        finally:
            self._spans.end(span)  # cancelled: the reader closed

    def _fetched(self, message: Inbound, path: str) -> None:
        """End the span of a message's fetch: how many bytes, and by which path."""
        if message.fetched is not None:
            size = sum(len(f) for f in message.frames[1:])
            self._spans.end(message.fetched, bytes=size, path=path)

    def _release(self, _: object = None) -> None:
        """Deliver the waiting messages that are ready, in the order they were read."""
        batch: list[Inbound] = []
        while self._waiting:
            message, task = self._waiting[0]
            if task is not None and not task.done():
                break
            self._waiting.popleft()
            if task is not None and task.cancelled():
                continue  # the reader closed: it stays pending, for the next run
            batch.append(message)
        if batch and not self._closing:
            try:
                self._deliver(batch)
            except Exception:
                logger.exception("event=receive_failed agent=%s", self._endpoint.name)
        if self._paused and len(self._waiting) < _MAX_WAITING:
            self._paused = False
            self.read()

    # *** recovery ***

    async def _prepare(self, conn: RedisLink) -> int:
        """Registry entry, inbox and group: idempotent, rerun after every reconnect (a
        Redis restarted without persistence lost them); returns the agent's id.

        Runs on the reader connection, which is idle between two reads.
        """
        agent_id = await self._register(conn)
        try:
            await conn.execute("XGROUP", "CREATE", self._inbox, GROUP, "0", "MKSTREAM")
        except ReplyError as e:
            if e.code != "BUSYGROUP":
                raise
        else:
            # Created again: Redis lost the inbox, and with it what was sent to us meanwhile.
            if self._prepared and self._on_inbox_lost is not None:
                self._on_inbox_lost()
        self._prepared = True
        await self._reclaim(conn)
        # The reads to come are the agent's first XREADGROUP: if its ACL user may not run
        # it, say so now, at start, instead of in a warning per retry. From the last
        # possible id it returns nothing and counts no delivery.
        await conn.execute(
            "XREADGROUP", "GROUP", GROUP, self._endpoint.name, "COUNT", 1,
            "STREAMS", self._inbox, _LAST_ID,
        )  # fmt: skip
        return agent_id

    def _recover(self, error: Exception) -> None:
        if self._closing or self._recovering is not None:
            return
        self._recovering = asyncio.get_running_loop().create_task(self._recover_reader(error))

    async def _recover_reader(self, error: Exception) -> None:
        """Reconnect the reader (or recreate a lost inbox), then read pending entries again."""
        name, settings = self._endpoint.name, self._endpoint.settings
        try:
            if isinstance(error, ReplyError):
                # NOGROUP: Redis lost the inbox (restarted without persistence). Anything
                # else (LOADING, MISCONF, ...) is transient or needs an operator: retry.
                logger.warning("event=read_failed agent=%s error=%s", name, error)
                # UNBLOCKED: the inbox was deleted under a blocked read (Redis 7), or its
                # master became a replica (a failover), which then closes the connection:
                # read again from a fresh one, at once.
                if error.code == "UNBLOCKED" and self.conn is not None:
                    self.conn.close()
                elif error.code != "NOGROUP":
                    await asyncio.sleep(settings.reconnect_max_delay)  # retry timer
            agent_id = -1
            while not self._closing:
                reader = self.conn
                if reader is None or not reader.is_open:
                    await self._flapping.pause()
                    reader = self.conn = await self._endpoint.open_with_backoff(
                        "reader", spill=self._writer_conn
                    )
                    self._flapping.connected()
                try:
                    agent_id = await self._prepare(reader)
                    break
                except (ReplyError, ConnectionLost) as e:
                    logger.warning("event=prepare_failed agent=%s error=%s", name, e)
                    # Opened again after a pause that grows while it keeps failing: a Redis
                    # that keeps refusing is not asked in a tight loop.
                    reader.close()
            logger.info("event=reader_recovered agent=%s id=%d", name, agent_id)
        finally:
            self._recovering = None
        self._last_id = b"0"
        self.read()

    async def _reclaim(self, conn: RedisLink) -> None:
        """Dead-letter own pending entries delivered too often (a message that crashes us).

        Entries this reader is still handling count as delivered once, however often a
        reconnect re-read them.
        """
        pending = await conn.execute(
            "XPENDING", self._inbox, GROUP, "-", "+", 1000, self._endpoint.name
        )
        poisoned = [
            p[0] for p in pending if int(p[3]) >= _MAX_DELIVERIES and p[0] not in self._in_flight
        ]
        for entry_id in poisoned:
            found = await conn.execute("XRANGE", self._inbox, entry_id, entry_id)
            fields = found[0][1] if found and found[0][1] else []
            reason = f"delivered {_MAX_DELIVERIES} times, never acked"
            # Acked here, before the pending entries are read again, so none comes back.
            await conn.execute(*self._writer.dead_letter_command(entry_id, fields, reason))
            await conn.execute("XACK", self._inbox, GROUP, entry_id)
            await conn.execute("XDEL", self._inbox, entry_id)
        if pending:
            logger.info(
                "event=reclaimed agent=%s pending=%d dead_lettered=%d",
                self._endpoint.name, len(pending), len(poisoned),
            )  # fmt: skip


def _split(fields: list[bytes]) -> list[list[Any]] | None:
    """The messages of one entry, or None if the fields are not `m`/`f`/`r` pairs."""
    if len(fields) % 2 or fields[0] != b"m":
        return None
    messages: list[list[Any]] = []
    for i in range(0, len(fields), 2):
        kind, value = fields[i], fields[i + 1]
        if kind == b"m":
            messages.append([value])
        elif kind == b"f":
            messages[-1].append(value)
        elif kind == b"r":
            messages[-1].append(RefField(value))
        else:
            return None
    return messages


def _refers(frames: list[Any]) -> bool:
    return RefField in map(type, frames)
