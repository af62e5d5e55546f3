"""The worker daemon: import the modules that expose functions, then serve until told to stop.

    >>> Worker("ps", imports=["asyncgrad.workloads.param_server"]).run()  # `asyncgrad worker`

`serve()` is the async loop (for tests and embedding, with `handle_signals=False`);
`run()` is the sync entry of the CLI. The first SIGINT/SIGTERM drains (calls being served
and made finish) and exits 0; a second one stops at once, without draining, and exits
128 + its number (143 for SIGTERM, 130 for SIGINT), like a process killed by it.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from asyncgrad.rpc import Agent

__all__ = ["Worker", "import_modules", "run_loop"]

logger = logging.getLogger(__name__)


def import_modules(modules: Sequence[str]) -> None:
    """Import each module (which exposes its functions); the working directory comes first."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as e:  # whatever the module raised: say which module it was
            raise ImportError(f"cannot import {module!r}: {type(e).__name__}: {e}") from e
        logger.info("event=imported module=%s", module)


def run_loop(main: Any) -> Any:
    """Run a coroutine on uvloop when it is installed (faster I/O), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


class Worker:
    """One agent serving exposed functions until stopped."""

    def __init__(
        self,
        name: str,
        *,
        imports: Sequence[str] = (),
        handle_signals: bool = True,
        **agent_kwargs: Any,
    ) -> None:
        self.name = name
        self.imports = list(imports)
        self.handle_signals = handle_signals
        self.agent_kwargs = agent_kwargs
        self.agent: Agent | None = None
        self.started = asyncio.Event()
        self._stop: asyncio.Event | None = None
        self._graceful = True
        self.forced_by: signal.Signals | None = None  # the signal that cut the drain short
        self._draining: asyncio.Future[None] | None = None
        self._hurry: asyncio.Future[None] | None = None

    async def serve(self) -> None:
        """Serve until `stop()` (or a signal); then shut the agent down."""
        import_modules(self.imports)
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if self.handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            async with Agent(self.name, **self.agent_kwargs) as agent:
                self.agent = agent
                logger.info(
                    "event=worker_serving worker=%s id=%d pid=%d", self.name, agent.id, os.getpid()
                )
                self.started.set()
                await self._stop.wait()
                logger.info(
                    "event=worker_draining worker=%s graceful=%s", self.name, self._graceful
                )
                self._draining = asyncio.ensure_future(agent.shutdown(graceful=self._graceful))
                await self._draining
        finally:
            if self.handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
        if self._graceful:
            logger.info("event=worker_stopped worker=%s", self.name)
        else:
            # Calls being served or made were cut short: an operator should know.
            signame = self.forced_by.name if self.forced_by else "-"
            logger.warning(
                "event=worker_stopped worker=%s drained=False signal=%s", self.name, signame
            )

    def stop(self, graceful: bool = True) -> None:
        """Ask `serve()` to return: after draining, or (graceful=False) at once."""
        self._graceful = self._graceful and graceful
        if self._stop is not None:
            self._stop.set()
        if not graceful and self.agent is not None and self._draining is not None:
            # Cuts the drain short; returns when the agent is closed, like the drain itself.
            self._hurry = asyncio.ensure_future(self.agent.shutdown(graceful=False))

    def _on_signal(self, sig: signal.Signals) -> None:
        again = self._stop is not None and self._stop.is_set()
        logger.info("event=signal worker=%s signal=%s", self.name, sig.name)
        if again and self.forced_by is None:
            self.forced_by = sig
        self.stop(graceful=not again)

    def run(self) -> int:
        """Serve in a new event loop; the exit code: 0 after a clean stop (drained), else
        128 + the number of the signal that cut the drain short."""
        run_loop(self.serve())
        if self.forced_by is not None:
            return 128 + int(self.forced_by)
        return 0
