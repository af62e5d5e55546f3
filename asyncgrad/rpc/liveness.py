"""Failure detection: which agents were seen alive lately, and a watch over the agents
this one waits for (the callees of its calls) or counts (the holders of its RRefs).

Liveness comes from heartbeats: a call to an agent that is not registered, or whose
heartbeat lapsed, fails with `WorkerUnavailable` at once, and within the failure window
for calls in flight; the references a lost agent held are dropped.

After a reconnect, a missing heartbeat counts only once the failure window has passed: a
Redis restarted without persistence has lost every heartbeat, and each live agent sets its
own again within one heartbeat interval of reaching it (a fraction of the window, if agents
share it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from asyncgrad.errors import TransportError, WorkerUnavailable

if TYPE_CHECKING:
    from asyncgrad.rpc.agent import Agent

__all__ = ["Liveness"]

logger = logging.getLogger(__name__)


class Liveness:
    """One agent's view of the others' heartbeats, checked every `failure_timeout / 5`.

    Set `wanted` when there is something to watch; the watch sleeps while there is not.
    """

    def __init__(self, agent: Agent, failure_timeout: float) -> None:
        self._agent = agent
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
        (alive,) = await self._agent._transport.alive([name])
        if alive:
            self._alive_at[name] = time.monotonic()
        elif self.can_tell():
            raise WorkerUnavailable(
                f"no live worker named {name!r} in namespace {self._agent.namespace!r}"
            )

    def can_tell(self) -> bool:
        """Whether a missing heartbeat means that its agent is gone (see the module's doc)."""
        since = time.monotonic() - self._agent._transport.reconnected_at
        return since >= self._failure_timeout

    async def gone(self, names: list[str]) -> set[str]:
        """Those of `names` whose heartbeat lapsed, once this agent can tell."""
        alive = await self._agent._transport.alive(names)
        if not self.can_tell():
            return set()
        return {name for name, ok in zip(names, alive, strict=True) if not ok}

    def forget(self, name: str) -> None:
        """`name` left: the next call to it checks again."""
        self._alive_at.pop(name, None)

    def start(self) -> None:
        """Start the watch (a task, until `stop`)."""
        self._watcher = asyncio.create_task(self._watch(), name=f"{self._agent.name}-watch")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)

    async def _watch(self) -> None:
        """Fail calls to, and drop references held by, agents whose heartbeat lapsed."""
        agent = self._agent
        while True:
            await self.wanted.wait()
            await asyncio.sleep(self._check_every)  # the checking period, not a wait for an event
            names = sorted(agent._calls.callees() | agent._rrefs.holders())
            if not names:
                self.wanted.clear()
                continue
            try:
                alive = await agent._transport.alive(names)
            except TransportError as e:
                logger.warning("event=liveness_check_failed agent=%s error=%s", agent.name, e)
                continue
            now, can_tell = time.monotonic(), self.can_tell()
            for name, ok in zip(names, alive, strict=True):
                if ok:
                    self._alive_at[name] = now
                elif can_tell:
                    self._lost(name)

    def _lost(self, name: str) -> None:
        self.forget(name)
        self._agent._calls.fail(WorkerUnavailable(f"worker {name!r} stopped heartbeating"), name)
        freed = self._agent._rrefs.drop_holder(name)
        logger.info(
            "event=worker_lost agent=%s lost=%s rrefs_freed=%d", self._agent.name, name, freed
        )
