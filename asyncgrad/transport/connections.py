"""One agent's connections to Redis: their timings, their names, and how they are opened.

Each connection is named `asyncgrad:NAMESPACE:AGENT:ROLE` (role: reader, writer or
heartbeat), which `CLIENT LIST` shows, so an operator (or a test) can find and kill it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from asyncgrad.transport.cluster import RedisLink, SyncRedisLink, connect, connect_sync
from asyncgrad.transport.resp import ConnectionLost, RedisAddress

__all__ = ["FIRST_RETRY_DELAY", "Endpoint", "Flapping", "TransportSettings"]

logger = logging.getLogger(__name__)

FIRST_RETRY_DELAY = 0.05
# A connection that lived less than this before it was lost was not a recovery.
_STABLE_AFTER = 1.0


@dataclass(frozen=True)
class TransportSettings:
    """Timings of one agent's link to Redis."""

    heartbeat_ttl: float = 3.0
    heartbeat_interval: float = 0.75
    block_ms: int = 2000
    read_count: int = 16  # entries per read: up to 16 x 32 messages before replies leave
    reconnect_max_delay: float = 2.0
    connect_timeout: float = 10.0


@dataclass(frozen=True)
class Endpoint:
    """One agent at one Redis: which agent, where, with which timings; opens its connections."""

    address: RedisAddress
    namespace: str
    name: str
    settings: TransportSettings

    def client_name(self, role: str) -> str:
        return f"asyncgrad:{self.namespace}:{self.name}:{role}"

    async def open(
        self,
        role: str,
        on_lost: Callable[[RedisLink], None] | None = None,
        spill: Callable[[], RedisLink | None] | None = None,
    ) -> RedisLink:
        """A connection (to a cluster, if the address is one; `spill`: see
        `ClusterConnection.open`), or `ConnectionLost` within `connect_timeout`."""
        return await connect(
            self.address,
            name=self.client_name(role),
            connect_timeout=self.settings.connect_timeout,
            on_lost=on_lost,
            spill=spill,
        )

    async def open_with_backoff(
        self,
        role: str,
        on_lost: Callable[[RedisLink], None] | None = None,
        spill: Callable[[], RedisLink | None] | None = None,
    ) -> RedisLink:
        """A connection, however long Redis takes to come back (the caller bounds it)."""
        delay = FIRST_RETRY_DELAY
        for attempt in itertools.count(1):
            try:
                return await self.open(role, on_lost, spill)
            except ConnectionLost as e:
                logger.warning(
                    "event=reconnect_failed agent=%s role=%s attempt=%d retry_in=%.2fs error=%s",
                    self.name, role, attempt, delay, e,
                )  # fmt: skip
                # Backoff timer between attempts, not a wait for an event.
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.reconnect_max_delay)
        raise AssertionError("unreachable")

    def open_sync(self, role: str) -> SyncRedisLink:
        """A blocking connection, for a thread that must not depend on the event loop."""
        return connect_sync(self.address, name=self.client_name(role))


class Flapping:
    """Paces the reconnects of one connection: the first after a connection that held is
    at once; while each new one is lost again at once, they back off.

    Over a cluster, a connection opens from the slot map and loses itself on its first
    command to a master that died but is not yet replaced: until a replica is promoted,
    reconnecting at once would spin.
    """

    def __init__(self, max_delay: float) -> None:
        self._max_delay = max_delay
        self._delay = FIRST_RETRY_DELAY
        self._since = -math.inf

    def connected(self) -> None:
        self._since = time.monotonic()

    async def pause(self) -> None:
        """Before reconnecting: wait if the lost connection had not held."""
        if time.monotonic() - self._since >= _STABLE_AFTER:
            self._delay = FIRST_RETRY_DELAY
            return
        await asyncio.sleep(self._delay)  # backoff timer: there is no event to wait on
        self._delay = min(self._delay * 2, self._max_delay)
