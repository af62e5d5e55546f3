"""The writing side of one agent's transport: messages out, acks, dead letters, resends.

Messages are lists of frames; the messages sent to one inbox in one event-loop tick leave
in one write, up to 32 to a stream entry (fields `m` for a message's first frame, `f` for
each further frame, `r` for a reference to a frame that goes by the data plane). A write
lost with its connection is sent again once the writer is back, which may store a
message twice: the layer above drops such duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from asyncgrad.errors import TransportError
from asyncgrad.tracing import Spans
from asyncgrad.transport.cluster import RedisLink
from asyncgrad.transport.connections import Endpoint, Flapping
from asyncgrad.transport.data import RefField
from asyncgrad.transport.keys import GROUP, dead_letters, inbox
from asyncgrad.transport.resp import Arg, ConnectionLost

__all__ = ["DEAD_LETTER_BYTES", "DEAD_LETTER_MAXLEN", "InboxMissing", "Stored", "Writer"]

logger = logging.getLogger(__name__)

# Messages per stream entry. Redis answers a blocked XREADGROUP right after the first
# XADD of a write, so the receiver gets that entry alone, and while it handles it (and
# sends its replies) the sender goes on: small entries let the two work at once. With
# 256, a window of calls travelled as one entry and the two took turns (B2, one worker,
# alternated runs: 8.4-9.5k calls/s at 256, 17.8-22.7k at 32; 70 us of CPU per call and
# 1.03 -> 1.72 cores busy in a metered pair of runs).
_MAX_PER_ENTRY = 32
# Dead letters are bounded in count and in bytes: at most ~1000 letters of at most 8 KiB
# of the message each (what an operator needs to see what arrived), so ~8 MiB per agent
# whatever a namespace member writes into its inbox (SECURITY.md).
DEAD_LETTER_MAXLEN = 1000
DEAD_LETTER_BYTES = 8 * 1024
_DEAD_LETTER_NAME_BYTES = 64


Stored = asyncio.Future[bytes]  # resolves to a message's stream entry id once stored
# A message queued: its frames, its future, and what the trace records of it.
_Queued = tuple[list[bytes | memoryview], Stored, tuple[int, int]]


class InboxMissing(TransportError):
    """The destination's inbox does not exist: that agent never started or left."""


class Writer:
    """The writer connection and what goes over it; reconnects at once when it is lost.

    While a batch just read is handled, `via` is the reader connection: it is idle until
    its next XREADGROUP, so what the handlers write goes ahead of that, in the same write.

    Each entry written is a span of `spans` ("redis"): from the first of its messages
    queued to Redis's answer, with the ids of the messages it holds.
    """

    def __init__(self, endpoint: Endpoint, spans: Spans) -> None:
        self._endpoint = endpoint
        self._spans = spans
        self._inbox = inbox(endpoint.namespace, endpoint.name)
        self.conn: RedisLink | None = None
        self.via: RedisLink | None = None
        self.closed = False  # gave up on the writer: no more resends
        self.reconnected_at = -math.inf  # time.monotonic() of the latest reconnection
        # Per (destination, withdrawable): the messages queued this tick, and their futures.
        self._outbox: dict[tuple[str, bool], list[_Queued]] = {}
        self._queued_ns = 0  # when the first message of this tick was queued
        self._acks: list[bytes] = []
        self._backlog: list[tuple[tuple[Arg, ...], Callable[[Any], None] | None]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._flapping = Flapping(endpoint.settings.reconnect_max_delay)

    async def connect(self) -> None:
        """The first connection: `ConnectionLost` if Redis cannot be reached now."""
        self.conn = await self._endpoint.open("writer", self._on_lost)
        self._flapping.connected()

    async def close(self) -> None:
        """Give up: what still waits for the writer fails now, with the futures of its sends."""
        self.closed = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            await asyncio.gather(self._reconnecting, return_exceptions=True)
        self.flush()
        backlog, self._backlog = self._backlog, []
        for _, on_reply in backlog:
            if on_reply is not None:
                on_reply(ConnectionLost("transport closed before Redis was reachable again"))
        # A reconnect cancelled above may have opened a connection just before.
        if self.conn is not None:
            self.conn.close()
            await self.conn.closed.wait()

    # *** what goes out ***

    def send(
        self,
        dest: str,
        frames: list[bytes | memoryview],
        withdrawable: bool = False,
        traced: tuple[int, int] = (0, 0),
    ) -> Stored:
        """Queue a message for `dest`'s inbox; the future resolves to the id of its stream
        entry once Redis stored it. A `withdrawable` message shares its entry only with
        other withdrawable ones: withdrawing the entry takes nothing else with it."""
        future: Stored = asyncio.get_running_loop().create_future()
        if not self._outbox:
            self._queued_ns = time.monotonic_ns()
        self._outbox.setdefault((dest, withdrawable), []).append((frames, future, traced))
        self._schedule_flush()
        return future

    def control(self, dest: str, fields: list[Arg]) -> Stored:
        """An entry of the data plane's own (`q`, `d`) in `dest`'s inbox, alone."""
        future: Stored = asyncio.get_running_loop().create_future()
        stream = inbox(self._endpoint.namespace, dest)
        self._write(("XADD", stream, "NOMKSTREAM", "*", *fields), self._stored(dest, [future]))
        self._schedule_flush()
        return future

    def ack(self, entry_id: bytes) -> None:
        """Ack and delete an entry of this agent's inbox."""
        self._acks.append(entry_id)
        self._schedule_flush()

    def dead_letter(self, entry_id: bytes, fields: list[bytes], reason: str) -> None:
        self._write(self.dead_letter_command(entry_id, fields, reason), self._log_failure)

    def dead_letter_command(
        self, entry_id: bytes, fields: list[bytes], reason: str
    ) -> tuple[Arg, ...]:
        """Fields keep their order as `orig-NAME VALUE`, cut short so that all of them
        take at most `DEAD_LETTER_BYTES`; `fields` says how many there were."""
        logger.warning(
            "event=dead_letter agent=%s entry=%s reason=%s", self._endpoint.name, entry_id, reason
        )
        pairs = len(fields) // 2
        kept: list[Arg] = []
        budget = DEAD_LETTER_BYTES
        for i in range(0, 2 * pairs, 2):
            name = b"orig-" + bytes(fields[i][:_DEAD_LETTER_NAME_BYTES])
            value = bytes(fields[i + 1][: max(budget - len(name), 0)])
            budget -= len(name) + len(value)
            if budget < 0:
                break
            kept += [name, value]
        key = dead_letters(self._endpoint.namespace, self._endpoint.name)
        args = ("XADD", key, "MAXLEN", "~", DEAD_LETTER_MAXLEN, "*", "reason", reason[:512])
        return (*args, "entry", entry_id, "fields", pairs, *kept)

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write what is queued now, instead of at the end of this loop tick."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        outbox, self._outbox = self._outbox, {}
        for (dest, _), queued in outbox.items():
            for start in range(0, len(queued), _MAX_PER_ENTRY):
                batch = queued[start : start + _MAX_PER_ENTRY]
                stream = inbox(self._endpoint.namespace, dest)
                args: list[Arg] = ["XADD", stream, "NOMKSTREAM", "*"]
                for frames, _, _ in batch:
                    args += [b"m", frames[0]]
                    for frame in frames[1:]:
                        args += [b"r" if type(frame) is RefField else b"f", frame]
                on_reply = self._stored(dest, [f for _, f, _ in batch])
                if self._spans.enabled:
                    on_reply = self._timed(dest, batch, on_reply)
                self._write(tuple(args), on_reply)
        if self._acks:
            ids, self._acks = self._acks, []
            self._write(("XACK", self._inbox, GROUP, *ids), self._log_failure)
            self._write(("XDEL", self._inbox, *ids), self._log_failure)
        if self.conn is not None and self.via is None:
            self.conn.flush()

    def _stored(self, dest: str, futures: list[Stored]) -> Callable[[Any], None]:
        namespace = self._endpoint.namespace

        def on_reply(reply: Any) -> None:
            error: Exception | None = None
            if reply is None:
                error = InboxMissing(f"agent {dest!r} has no inbox in namespace {namespace!r}")
            elif isinstance(reply, Exception):
                error = reply
            for future in futures:
                if not future.done():
                    if error is None:
                        future.set_result(reply)
                    else:
                        future.set_exception(error)

        return on_reply

    def _timed(
        self, dest: str, batch: list[_Queued], on_reply: Callable[[Any], None]
    ) -> Callable[[Any], None]:
        """`on_reply`, recording the entry's span first."""
        start, spans = self._queued_ns, self._spans
        sent = [traced[1] for _, _, traced in batch]
        contexts = sorted({traced[0] for _, _, traced in batch} - {0})
        context = contexts[0] if len(contexts) == 1 else 0
        # (Its destination is in its name, its messages' ids in `sent`.)
        args: dict[str, Any] | None = {"contexts": contexts} if len(contexts) > 1 else None

        def timed(reply: Any) -> None:
            extra = args
            if reply is None or isinstance(reply, Exception):
                error = "no such inbox" if reply is None else str(reply)
                extra = {**(args or {}), "error": error}
            spans.add(
                f"XADD → {dest}", "redis", start, time.monotonic_ns(), context, 0, sent, extra
            )
            on_reply(reply)

        return timed

    def _write(self, args: tuple[Arg, ...], on_reply: Callable[[Any], None] | None) -> None:
        """Send a command; if the connection drops first, send it again after reconnecting.

        Resending may store a message twice; receivers drop duplicates by message id.
        """

        def retry_on_loss(reply: Any) -> None:
            if isinstance(reply, ConnectionLost) and not self.closed:
                self._write(args, on_reply)
            elif on_reply is not None:
                on_reply(reply)

        conn = self.via if self.via is not None and self.via.is_open else self.conn
        if conn is not None and conn.is_open:
            conn.command(*args, waiter=retry_on_loss)
        elif self.closed:
            retry_on_loss(ConnectionLost("transport closed"))
        else:
            self._backlog.append((args, retry_on_loss))
            self._reconnect()

    def _log_failure(self, reply: Any) -> None:
        if isinstance(reply, Exception):
            logger.warning("event=write_failed agent=%s error=%s", self._endpoint.name, reply)

    # *** the connection ***

    async def ready(self) -> RedisLink:
        """The writer; while it reconnects, waits for it (up to `connect_timeout`)."""
        if self.closed:
            raise TransportError(f"the transport of agent {self._endpoint.name!r} is closed")
        if self.conn is None or not self.conn.is_open:
            self._reconnect()
            if (reconnecting := self._reconnecting) is not None:
                timeout = self._endpoint.settings.connect_timeout
                await asyncio.wait({reconnecting}, timeout=timeout)
        if self.conn is None or not self.conn.is_open:
            address = self._endpoint.address
            raise TransportError(f"Redis at {address} is unreachable (reconnecting)")
        return self.conn

    def _on_lost(self, conn: RedisLink) -> None:
        # Reconnect at once, not at the next write: queries wait for the writer too.
        if conn is self.conn:
            self._reconnect()

    def _reconnect(self) -> None:
        if self._reconnecting is None and not self.closed:
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect_writer())

    async def _reconnect_writer(self) -> None:
        try:
            conn = None
            while conn is None or not conn.is_open:  # lost again before it was used
                await self._flapping.pause()
                conn = self.conn = await self._endpoint.open_with_backoff("writer", self._on_lost)
                self._flapping.connected()
            self.reconnected_at = time.monotonic()
            logger.info(
                "event=reconnected agent=%s role=writer resend=%d",
                self._endpoint.name, len(self._backlog),
            )  # fmt: skip
            backlog, self._backlog = self._backlog, []
            for args, on_reply in backlog:
                conn.command(*args, waiter=on_reply)
        finally:
            self._reconnecting = None
