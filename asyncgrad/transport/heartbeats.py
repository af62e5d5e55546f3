"""The heartbeat key: an agent's liveness, and its hold on its name.

`claim` sets the key at start (SET NX) and refuses with `AgentNameTaken` while a live
agent holds the name; a holder that was a process of this host and is gone (a worker
killed and restarted at once) is taken over instead of waited out. A thread then
refreshes the key, so a busy event loop never looks dead. Its value,
`run=TOKEN id=.. pid=.. host=.. pidns=.. ttl_ms=.. contexts=N received=N born=MS
[data=HOST:PORT] t=MS`,
starts with a token of this run (its incarnation), so that a run refreshes (and, leaving,
deletes) only its own heartbeat; `born` is Redis's clock when this run began (0 until its
first beat), `t` at the beat; `data` is where the agent's data port listens for other
hosts (the data plane; absent without one).

Each beat also tells this agent about itself: Redis's clock (`redis_now_ms`, for
deadlines every agent reads alike) and how long it has reached Redis without a gap
(`reachable_for`): an agent that could not reach Redis (Redis stalled, failed over, or
this process was frozen) cannot tell whether another agent's beats stopped, and says so.
Each beat also times one `TIME` for the agent's trace clock (`RedisClock`): a few at
start, then one per beat, from the heartbeat's thread and connection; the answer counts
as read when the kernel stamped its arrival (plain TCP on Linux), not when this thread got
the GIL back to read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable

from asyncgrad.errors import AgentNameTaken, TransportError
from asyncgrad.tracing import RedisClock
from asyncgrad.transport.cluster import RedisLink, SyncRedisLink
from asyncgrad.transport.connections import Endpoint
from asyncgrad.transport.keys import SET_HEARTBEAT, heartbeat, seen

__all__ = ["Heartbeat", "heartbeat_fields"]

logger = logging.getLogger(__name__)

_CLAIM_ATTEMPTS = 3
_CLOCK_SAMPLES_AT_START = 5


def heartbeat_fields(value: bytes | None) -> dict[str, str]:
    """A heartbeat's value (`run=... id=... pid=... host=... contexts=...`) as a dict."""
    parts = (value or b"").decode(errors="replace").split()
    return dict(part.split("=", 1) for part in parts if "=" in part)


class Heartbeat:
    """One agent's heartbeat key. `agent_id`, `open_contexts` and `received` (messages read
    so far) are asked at every beat, from the heartbeat's thread."""

    def __init__(
        self,
        endpoint: Endpoint,
        agent_id: Callable[[], int],
        open_contexts: Callable[[], int],
        received: Callable[[], int] = lambda: 0,
        clock: RedisClock | None = None,
    ) -> None:
        self._endpoint = endpoint
        self.clock = clock or RedisClock()
        self._agent_id = agent_id
        self._open_contexts = open_contexts
        self._received = received
        self.key = heartbeat(endpoint.namespace, endpoint.name)
        self.seen_key = seen(endpoint.namespace, endpoint.name)
        self.incarnation = secrets.token_hex(8)
        self.token = f"run={self.incarnation} "  # starts the value: whose it is
        self._ttl_ms = int(endpoint.settings.heartbeat_ttl * 1000)
        # A beat later than this after the one before is a gap: Redis was out of reach.
        self._max_gap = endpoint.settings.heartbeat_ttl * 2 / 3
        # (Redis ms at the latest beat, monotonic then, monotonic when the beats without
        # a gap began); written by the beating thread, read by the event loop's.
        self._clock: tuple[float, float, float] | None = None
        self.started_ms = 0  # Redis's clock at the first beat: this incarnation began then
        self.data_address = ""  # HOST:PORT of the data port, once it listens
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._done: asyncio.Future[None] | None = None

    def value(self) -> str:
        """What the key holds now."""
        agent_id, contexts = self._agent_id(), self._open_contexts()
        return (
            f"{self.token}id={agent_id} pid={os.getpid()} host={socket.gethostname()} "
            f"pidns={_pid_namespace()} ttl_ms={self._ttl_ms} contexts={contexts} "
            f"received={self._received()} born={self.started_ms}"
            + (f" data={self.data_address}" if self.data_address else "")
        )

    async def claim(self, conn: RedisLink) -> None:
        """Set the key if nobody holds the name, or its holder is gone; else raise."""
        name, namespace = self._endpoint.name, self._endpoint.namespace
        for _ in range(_CLAIM_ATTEMPTS):
            value = self.value()
            if await conn.execute("SET", self.key, value, "NX", "PX", self._ttl_ms) is not None:
                return
            held = await conn.execute("GET", self.key)
            if held is None:
                continue  # it lapsed between the two commands
            holder = heartbeat_fields(held)
            if not _gone(holder):
                raise AgentNameTaken(
                    f"agent name {name!r} is taken in namespace {namespace!r}: "
                    f"a live agent holds it (pid {holder.get('pid', '?')} on host "
                    f"{holder.get('host', '?')}); stop it or pick another name"
                )
            # Unless the name changed hands again meanwhile.
            if await conn.execute("EVAL", SET_HEARTBEAT, 1, self.key, held, value, self._ttl_ms):
                logger.warning(
                    "event=name_taken_over agent=%s pid=%s host=%s",
                    name, holder["pid"], holder["host"],
                )  # fmt: skip
                return
        raise AgentNameTaken(
            f"agent name {name!r} in namespace {namespace!r} changed hands "
            f"{_CLAIM_ATTEMPTS} times while this agent claimed it"
        )

    def redis_now_ms(self) -> float | None:
        """Redis's clock now, in ms (None before the first beat).

        From the `TIME` samples with the shortest round trip, not from the latest beat: a
        beat's answer read late (this process frozen, or descheduled, between Redis's
        answer and its reading) would put Redis's clock behind by that delay, and a call
        past its deadline would look on time."""
        if self.clock.known:
            return self.clock.redis_ns() / 1e6
        clock = self._clock
        if clock is None:
            return None
        return clock[0] + (time.monotonic() - clock[1]) * 1000

    def reachable_for(self) -> float:
        """Seconds this agent has reached Redis without a gap (0 in a gap)."""
        clock, now = self._clock, time.monotonic()
        if clock is None or now - clock[1] > self._max_gap:
            return 0.0
        return now - clock[2]

    def start(self) -> None:
        """Beat once, then refresh the key from a thread of its own, on a connection of
        its own."""
        conn = self._endpoint.open_sync("heartbeat")
        # At start this agent has no gap to account for: it can tell at once.
        self._beat(conn, since=time.monotonic() - self._endpoint.settings.heartbeat_ttl)
        self.started_ms = int(self.redis_now_ms() or 0)
        for _ in range(_CLOCK_SAMPLES_AT_START - 1):
            self._time(conn)
        self._done = asyncio.get_running_loop().create_future()
        self._thread = threading.Thread(
            target=self._beat_forever,
            args=(conn, self._done),
            name=f"asyncgrad-heartbeat-{self._endpoint.name}",
        )
        self._thread.daemon = True
        self._thread.start()

    async def stop(self) -> None:
        """Stop refreshing (the key stays until it lapses or is deleted)."""
        self._stop.set()
        thread, done = self._thread, self._done
        if thread is None or done is None:
            return
        # The thread resolves `done` as its last step; joining it then returns at once.
        await asyncio.wait({done}, timeout=self._endpoint.settings.connect_timeout)
        if done.done():
            thread.join()
        else:
            logger.warning("event=heartbeat_stop_timeout agent=%s", self._endpoint.name)

    def _beat(self, conn: SyncRedisLink, since: float | None = None) -> bool:
        """Refresh the key; False if another run holds the name now."""
        args = (self.key, self.seen_key, self.token, self.value(), self._ttl_ms)
        ms = conn.execute("EVAL", SET_HEARTBEAT, 2, *args)
        if not ms:
            return False
        now, clock = time.monotonic(), self._clock
        if since is None:
            gap = clock is None or now - clock[1] > self._max_gap
            since = now if gap or clock is None else clock[2]
        self._clock = (float(ms), now, since)
        self._time(conn)
        return True

    def _time(self, conn: SyncRedisLink) -> None:
        """One sample of the offset to Redis's clock. A sample that fails costs the clock
        that sample, never the beat: the beat has been made."""
        t0 = time.monotonic_ns()
        try:
            (seconds, micros), arrived = conn.execute_timed("TIME")
        except (TransportError, ValueError, TypeError) as e:
            logger.debug("event=clock_sample_failed agent=%s error=%r", self._endpoint.name, e)
            return
        t1 = time.monotonic_ns()
        # When the answer arrived, not when this thread got to read it: a busy event loop
        # holds the GIL for up to the switch interval (5 ms) after the answer came.
        if arrived is not None and t0 <= arrived < t1:
            t1 = arrived
        self.clock.sample(t0, int(seconds) * 1_000_000 + int(micros), t1)

    def _beat_forever(self, conn: SyncRedisLink | None, done: asyncio.Future[None]) -> None:
        loop, name = done.get_loop(), self._endpoint.name
        ours = True
        try:
            while not self._stop.wait(self._endpoint.settings.heartbeat_interval):
                try:
                    reconnected = conn is None
                    if conn is None:
                        conn = self._endpoint.open_sync("heartbeat")
                        # Perhaps another Redis now (a failover), with a clock of its own.
                        self.clock.restart()
                    was_ours, ours = ours, self._beat(conn)
                    if reconnected:
                        logger.info("event=reconnected agent=%s role=heartbeat", name)
                    if was_ours and not ours:
                        # The key lapsed (Redis out of reach) and another agent took the
                        # name meanwhile; its heartbeat is left alone until it leaves.
                        logger.error("event=name_lost agent=%s", name)
                except TransportError as e:
                    logger.warning("event=heartbeat_failed agent=%s error=%s", name, e)
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
    # Containers may share a host name (host networking) but not their pids.
    here = holder.get("host") == socket.gethostname() and holder.get("pidns") == _pid_namespace()
    if not here or not pid.isdigit() or int(pid) <= 0:
        return False  # elsewhere, or not ours to tell: only its TTL can say it is gone
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, as another user's process
        return False
    return False


@functools.cache
def _pid_namespace() -> str:
    """The pid namespace of this process (Linux; elsewhere "", one namespace per host)."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
