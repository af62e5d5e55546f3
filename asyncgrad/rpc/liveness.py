"""Failure detection: suspicion from heartbeats, and evidence of a new incarnation.

Each agent's heartbeat carries its incarnation (`run`, new at every start) and Redis's
clock at the beat (`t`). Another agent is *suspected* when its latest beat is older than
the window (`failure_timeout * 0.6`, the heartbeat's TTL), or missing — but only if this
agent could tell: it reached Redis without a gap for a whole window, and its writer has
not reconnected within one. A Redis that stalled, restarted or failed over, or this
process frozen, is then nobody's suspicion: every agent's beats stopped alike, and each
beats again within a heartbeat interval once it can (a fraction of the window).

Suspicion is not death (README): the watch reports `suspect(name, away)` every check
while an agent it watches stays suspected, with `away` the seconds it has been suspected
while this agent could tell; and every check reports `born(name, ms)`, when (on Redis's
clock) the incarnation now under that name began: one that began after some event proves
that whoever held the name then is dead. What follows is the agent's to decide.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from asyncgrad.errors import TransportError, WorkerUnavailable
from asyncgrad.transport import Transport

__all__ = ["Liveness"]

logger = logging.getLogger(__name__)


class Liveness:
    """One agent's view of the others' heartbeats, checked every `failure_timeout / 5`.

    `watched()` names the agents to watch. Set `wanted` when there is something to
    watch; the watch sleeps while there is not.
    """

    def __init__(
        self,
        transport: Transport,
        failure_timeout: float,
        watched: Callable[[], set[str]],
        suspect: Callable[[str, float], None],
        born: Callable[[str, int], None],
    ) -> None:
        self._transport = transport
        self._watched, self._suspect, self._born = watched, suspect, born
        self._window = failure_timeout * 0.6
        self._check_every = failure_timeout * 0.2
        self._alive_at: dict[str, float] = {}
        self._incarnations: dict[str, str] = {}
        self._away: dict[str, float] = {}  # seconds suspected while this agent could tell
        self.wanted = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    def seen_alive(self, name: str) -> bool:
        """Whether `name` was seen alive within the check period."""
        return time.monotonic() - self._alive_at.get(name, -1e9) < self._check_every

    def incarnation(self, name: str) -> str:
        """The incarnation of `name` last seen ("" if none was)."""
        return self._incarnations.get(name, "")

    def can_tell(self) -> bool:
        """Whether a stale heartbeat means that its agent stopped (see the module's doc)."""
        reconnected = time.monotonic() - self._transport.reconnected_at
        return min(self._transport.reachable_for(), reconnected) >= self._window

    async def ensure_alive(self, name: str) -> None:
        """Raise `WorkerUnavailable` if `name` is suspected (unless seen alive lately)."""
        if self.seen_alive(name):
            return
        if await self._check([name]):
            raise WorkerUnavailable(
                f"no live worker named {name!r} in namespace {self._transport.namespace!r}"
            )

    async def gone(self, names: list[str]) -> set[str]:
        """Those of `names` suspected now."""
        return await self._check(names)

    def forget(self, name: str) -> None:
        """`name` left: the next call to it checks again."""
        self._alive_at.pop(name, None)
        self._away.pop(name, None)

    async def _check(self, names: list[str]) -> set[str]:
        """Read the heartbeats of `names`; those suspected. Notes who is alive, and
        reports when each one's incarnation began."""
        beats = await self._transport.heartbeats(names)
        now_ms, now = self._transport.redis_now_ms(), time.monotonic()
        can_tell = self.can_tell()
        suspected = set()
        for name, beat in zip(names, beats, strict=True):
            if beat is not None:
                self._incarnations[name] = beat.get("run", "")
                if (born := beat.get("born", "")).isdigit() and int(born):
                    self._born(name, int(born))
            if _fresh(beat, now_ms, self._window):
                self._alive_at[name] = now
            elif can_tell:
                suspected.add(name)
        return suspected

    def start(self) -> None:
        """Start the watch (a task, until `stop`)."""
        self._watcher = asyncio.create_task(self._watch(), name=f"{self._transport.name}-watch")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)

    async def _watch(self) -> None:
        """Report each watched agent suspected, with how long it has been away."""
        last = time.monotonic()
        while True:
            await self.wanted.wait()
            await asyncio.sleep(self._check_every)  # the checking period, not a wait for an event
            names = sorted(self._watched())
            now, elapsed = time.monotonic(), time.monotonic() - last
            last = now
            if not names:
                self.wanted.clear()
                self._away.clear()
                continue
            try:
                suspected = await self._check(names)
            except TransportError as e:
                name = self._transport.name
                logger.warning("event=liveness_check_failed agent=%s error=%s", name, e)
                continue
            for name in names:
                if name not in suspected:
                    if (was := self._away.pop(name, None)) is not None:
                        logger.info(
                            "event=unsuspected agent=%s who=%s away=%.1fs",
                            self._transport.name, name, was,
                        )  # fmt: skip
                    continue
                if name not in self._away:
                    logger.info("event=suspected agent=%s who=%s", self._transport.name, name)
                # Only time this agent could tell counts (a check just after a gap of its
                # own adds one check period, not the whole gap).
                away = self._away[name] = self._away.get(name, 0.0) + min(
                    elapsed, 2 * self._check_every
                )
                self._suspect(name, away)


def _fresh(beat: dict[str, str] | None, now_ms: float | None, window: float) -> bool:
    """Whether a heartbeat is within `window` s of Redis's clock `now_ms`."""
    if beat is None:
        return False
    t = beat.get("t", "")
    if not t.isdigit() or now_ms is None:
        return True  # set at start, before the first beat: the key's TTL vouches for it
    return now_ms - int(t) <= window * 1000
