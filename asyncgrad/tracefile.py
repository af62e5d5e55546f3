"""`asyncgrad trace`: gather the recent spans of a namespace's live workers and write them
as a Chrome/Perfetto trace file, or draw them (README, "Tracing")."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from asyncgrad.rpc import Agent
from asyncgrad.tracing import timeline

__all__ = ["collect", "report", "summary", "unanswered"]


async def collect(
    url: str, namespace: str, context_id: int | None, timeout: float
) -> list[dict[str, Any]]:
    """The trace of every live agent of `namespace` but the one that gathers it."""
    name = f"trace-{socket.gethostname()}-{os.getpid()}"[:64]
    # Large dumps come by Redis: this short-lived agent opens no data port.
    async with Agent(name, url, namespace, trace=False, data_plane="redis") as agent:
        trace = await agent.trace(context_id, timeout)
        own = agent.id
    return [e for e in trace if e.get("pid") != own]


def summary(trace: list[dict[str, Any]], path: str) -> str:
    """One line: what was written where, and how to look at it."""
    spans = timeline.span_events(trace)
    names = sorted(set(timeline.workers_of(trace).values()))
    length = max((e["ts"] + e["dur"] for e in spans), default=0.0) / 1000
    line = f"wrote {path}: {len(spans)} spans of {len(names)} workers ({', '.join(names)})"
    line += f" over {length:.1f} ms"
    if not path.lower().endswith(".png"):
        line += "; open it in https://ui.perfetto.dev or chrome://tracing"
    return line


def unanswered(trace: list[dict[str, Any]]) -> list[str]:
    """Titles of the rows of workers that gave no spans because they did not answer."""
    return [
        e["args"]["name"]
        for e in trace
        if e.get("ph") == "M" and e.get("name") == "process_name" and e["args"].get("missing")
    ]


def report(trace: list[dict[str, Any]], paths: list[str]) -> None:
    for path in paths:
        print(summary(trace, path))
    for row in unanswered(trace):
        print(f"asyncgrad trace: nothing from {row}", file=sys.stderr)
