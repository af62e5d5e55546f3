"""`RedisClock`: one agent's estimate of the offset from its monotonic clock to Redis's.

Each sample is one `TIME` round trip: the local clock before it was sent (`t0`), Redis's
answer, the local clock once the answer was read (`t1`). Redis answered somewhere in
`[t0, t1]`; taking the midpoint is wrong by at most half the round trip, and exactly by
half the difference of the two directions' delays. So the estimate is the sample with the
shortest round trip among the recent ones (a slow sample, one delayed by a busy GIL or a
queue, carries a wide interval and loses), and its half round trip is a hard bound on the
error, whatever the asymmetry. Recent only: the two clocks drift apart (NTP slews the
wall clock Redis reads, on another host also against this one's), so a sample's bound
grows with its age, by `DRIFT` (15 µs per second, an NTP-disciplined clock's usual
worst), and a fresher sample wins over an older, slightly tighter one. A sample that
contradicts the estimate (their intervals do not overlap: Redis's clock was stepped, or
this agent now reaches another Redis, after a failover) starts the estimate over
(`restart` does that too, when the heartbeat's connection changed).

Written from the heartbeat's thread, read from the event loop's: the estimate is one
tuple, replaced whole.
"""

from __future__ import annotations

import collections
import time

__all__ = ["RedisClock"]

_KEPT = 32  # samples the estimate picks from (one per heartbeat: ~25 s at the default)
_RESOLUTION_NS = 1000  # TIME answers in microseconds
DRIFT = 15e-6  # how fast the two clocks may drift apart (s per s) while a sample ages


class RedisClock:
    """The offset from `time.monotonic_ns()` to Redis's clock (ns since the epoch)."""

    def __init__(self) -> None:
        # (half round trip, offset, when taken), ns
        self._samples: collections.deque[tuple[int, int, int]] = collections.deque(maxlen=_KEPT)
        # (offset ns, error bound ns), or None before the first sample.
        self._estimate: tuple[int, int] | None = None
        self.samples = 0  # taken since start (the estimate picks from the latest _KEPT)

    def sample(self, t0_ns: int, redis_us: int, t1_ns: int) -> None:
        """One `TIME` round trip: sent at local `t0_ns`, answered `redis_us`, read at `t1_ns`."""
        half = max(t1_ns - t0_ns, 0) // 2
        offset = redis_us * 1000 - (t0_ns + half)
        estimate = self._estimate
        if estimate is not None and abs(offset - estimate[0]) > half + estimate[1]:
            self._samples.clear()
        self._samples.append((half, offset, t1_ns))
        bound, offset = min((h + int(max(t1_ns - t, 0) * DRIFT), o) for h, o, t in self._samples)
        self._estimate = (offset, bound + _RESOLUTION_NS)
        self.samples += 1

    def restart(self) -> None:
        """Forget the samples: the next one starts the estimate over."""
        self._samples.clear()

    @property
    def estimate(self) -> tuple[int, int] | None:
        """(offset ns, error bound ns) as one pair, or None before the first sample."""
        return self._estimate

    @property
    def known(self) -> bool:
        return self._estimate is not None

    @property
    def offset_ns(self) -> int:
        """Redis's clock minus the local monotonic clock (0 before the first sample)."""
        estimate = self._estimate
        return 0 if estimate is None else estimate[0]

    @property
    def error_ns(self) -> int:
        """A bound on how far `offset_ns` is from the truth (-1 before the first sample)."""
        estimate = self._estimate
        return -1 if estimate is None else estimate[1]

    def redis_ns(self, local_ns: int | None = None) -> int:
        """A local monotonic time (default: now) on Redis's clock."""
        return (time.monotonic_ns() if local_ns is None else local_ns) + self.offset_ns
