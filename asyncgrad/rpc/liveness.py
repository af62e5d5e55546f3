"""Failure detection: which agents were seen alive lately, and a watch over the agents
this one waits for (the callees of its calls) or counts (the holders of its RRefs).

Liveness comes from heartbeats: a call to an agent that is not registered, or whose
heartbeat lapsed, fails with `WorkerUnavailable` at once. The watch tells the agent (by
`lost`) about each watched agent whose heartbeat lapsed; what follows is the agent's to
decide.

After a reconnect, a missing heartbeat counts only once the failure window has passed: a
Redis restarted without persistence has lost every heartbeat, and each live agent sets its
own again within one heartbeat interval of reaching it (a fraction of the window, if agents
share it).
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

    `watched()` names the agents to watch; `lost(name)` hears of each whose heartbeat
    lapsed. Set `wanted` when there is something to watch; the watch sleeps while there
    is not.
    """

    def __init__(
        self,
        transport: Transport,
        failure_timeout: float,
        watched: Callable[[], set[str]],
        lost: Callable[[str], None],
    ) -> None:
        self._transport = transport
        self._watched, self._lost = watched, lost
        self._failure_timeout = failure_timeout
        self._check_every = failure_timeout * 0.2
        self._alive_at: dict[str, float] = {}
        self.wanted = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    def seen_alive(self, name: str) -> bool:
        """Whether `name` was seen alive within the check period."""
        return time.monotonic() - self._alive_at.get(name, -1e9) < self._check_every

    async def ensure_alive(self, name: str) -> None:
        """Raise `WorkerUnavailable` unless `name` was seen alive within the check period."""
        if self.seen_alive(name):
            return
        (alive,) = await self._transport.alive([name])
        if alive:
            self._alive_at[name] = time.monotonic()
        elif self.can_tell():
            raise WorkerUnavailable(
                f"no live worker named {name!r} in namespace {self._transport.namespace!r}"
            )

    def can_tell(self) -> bool:
        """Whether a missing heartbeat means that its agent is gone (see the module's doc)."""
        since = time.monotonic() - self._transport.reconnected_at
        return since >= self._failure_timeout

    async def gone(self, names: list[str]) -> set[str]:
        """Those of `names` whose heartbeat lapsed, once this agent can tell."""
        alive = await self._transport.alive(names)
        if not self.can_tell():
            return set()
        return {name for name, ok in zip(names, alive, strict=True) if not ok}

    def forget(self, name: str) -> None:
        """`name` left: the next call to it checks again."""
        self._alive_at.pop(name, None)

    def start(self) -> None:
        """Start the watch (a task, until `stop`)."""
        self._watcher = asyncio.create_task(self._watch(), name=f"{self._transport.name}-watch")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)

    async def _watch(self) -> None:
        """Tell `lost` of each watched agent whose heartbeat lapsed."""
        while True:
            await self.wanted.wait()
            await asyncio.sleep(self._check_every)  # the checking period, not a wait for an event
            names = sorted(self._watched())
            if not names:
                self.wanted.clear()
                continue
            try:
                alive = await self._transport.alive(names)
            except TransportError as e:
                name = self._transport.name
                logger.warning("event=liveness_check_failed agent=%s error=%s", name, e)
                continue
            now, can_tell = time.monotonic(), self.can_tell()
            for name, ok in zip(names, alive, strict=True):
                if ok:
                    self._alive_at[name] = now
                elif can_tell:
                    self.forget(name)
                    self._lost(name)
