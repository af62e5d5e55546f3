"""An agent's state, and the tasks it waits for while draining and cancels once closing.

    new ──start──► running ──shutdown──► draining ──► closing ──► closed

While draining the agent still serves and calls: a call being served may need nested
calls, or a reply task, to finish. From `closing` on, nothing new is served.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine
from typing import Any

from asyncgrad.errors import RpcError

__all__ = ["Lifecycle"]


class Lifecycle:
    """The state of agent `name`, shared by its parts, and the tasks they spawned."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = "new"
        # The agent's loop, from `start` on (an RRef may be released in another thread).
        self.loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        if self.state != "new":
            raise RuntimeError(f"agent {self.name!r} was already started")
        self.loop = asyncio.get_running_loop()
        self.state = "running"

    @property
    def running(self) -> bool:
        """Whether the agent serves and calls (running, or draining)."""
        return self.state in ("running", "draining")

    def check_running(self) -> None:
        if not self.running:
            raise RpcError(f"agent {self.name!r} is {self.state}, not running")

    def spawn(
        self, work: Coroutine[Any, Any, None], context: contextvars.Context | None = None
    ) -> None:
        """A task the agent waits for while draining, and cancels once it closes."""
        task = asyncio.get_running_loop().create_task(work, context=context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def unfinished(self) -> list[asyncio.Task[Any]]:
        return [t for t in self._tasks if not t.done()]

    def cancel_tasks(self) -> list[asyncio.Task[Any]]:
        """Cancel every task spawned; the tasks, to wait for."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return tasks
