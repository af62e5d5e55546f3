"""What a workload costs Redis in memory: its peak above its level at the start (B3's
`redis_peak_MiB`).

Redis 7.0 keeps one `used_memory_peak` for its whole life: `CONFIG RESETSTAT` does not
reset it (tried on 7.0.15), and a Redis shared with others (`--redis URL`) is not ours to
reset anyway. So `MemoryPeak` reads `used_memory` at the start, then the peak one of two
ways, named by `method`:
- `used_memory_peak` at the end, when it rose during the span: the span set Redis's
  all-time peak, which Redis records as it runs each command: exact;
- else (a Redis that once held more than the span did): the highest `used_memory` that
  `INFO memory`, read from a thread every 5 ms, showed: a lower bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType
from typing import Self

from asyncgrad.bench.driver import parse_info
from asyncgrad.transport.resp import RedisAddress, SyncConnection

__all__ = ["MemoryPeak"]

MiB = 1 << 20
EXACT = "used_memory_peak (it rose during the workload: exact)"
SAMPLED = "INFO memory every 5 ms (used_memory_peak was higher before: a lower bound)"
CLUSTER = "not measured: a Redis Cluster spreads the streams over its nodes"


class MemoryPeak:
    """`async with MemoryPeak(url) as peak:` around a workload, then `peak.mib` (None for
    a Redis Cluster) and `peak.method`."""

    def __init__(self, redis_url: str, interval: float = 0.005) -> None:
        self.address = RedisAddress.from_url(redis_url)
        self.interval = interval
        self.mib: float | None = None
        self.method = CLUSTER if self.address.seeds else ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = self._peak_before = self._highest = 0
        self._failure: Exception | None = None

    async def __aenter__(self) -> Self:
        # Blocking reads, off the event loop: the workload's loop must not wait on them.
        if not self.address.seeds:
            await asyncio.to_thread(self._begin)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.address.seeds:
            await asyncio.to_thread(self._end)

    def _begin(self) -> None:
        with self._connect() as connection:
            start = _memory(connection)
        self._base, self._peak_before = start["used_memory"], start["used_memory_peak"]
        self._highest = self._base
        self._thread = threading.Thread(target=self._sample, name="redis-memory", daemon=True)
        self._thread.start()

    def _end(self) -> None:
        assert self._thread is not None, "use MemoryPeak in `async with`"
        self._stop.set()
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        with self._connect() as connection:
            end = _memory(connection)
        highest = max(self._highest, end["used_memory"])
        if end["used_memory_peak"] > self._peak_before:
            highest, self.method = max(highest, end["used_memory_peak"]), EXACT
        else:
            self.method = SAMPLED
        self.mib = (highest - self._base) / MiB

    def _sample(self) -> None:
        try:
            with self._connect() as connection:
                while not self._stop.wait(self.interval):
                    self._highest = max(self._highest, _memory(connection)["used_memory"])
        except Exception as e:  # raised again by _end, in the workload's thread
            self._failure = e

    def _connect(self) -> contextlib.closing[SyncConnection]:
        return contextlib.closing(SyncConnection(self.address, name="asyncgrad:bench-memory"))


def _memory(connection: SyncConnection) -> dict[str, int]:
    fields = parse_info(connection.execute("INFO", "memory"))
    return {key: int(fields[key]) for key in ("used_memory", "used_memory_peak")}
