"""The agent a task runs for: the latest of the one `rpc.init` started in it and the one
of the `async with Agent(...)` block or exposed function it runs in, else the one
`rpc.init` started for the process.

The agent module sets it; the modules below the agent (an `RRef(value)` made by user
code, distributed autograd's functions) read it, and see the agent as `Current`: the
parts they need of it, nothing more.
"""

from __future__ import annotations

import contextvars
from typing import Protocol

from asyncgrad.rpc.calls import Calls
from asyncgrad.rpc.references import References
from asyncgrad.rpc.seam import AutogradSeam

__all__ = ["Current", "current", "process_default", "running_agent"]


class Current(Protocol):
    """What the modules below `Agent` need of the agent a task runs for."""

    @property
    def name(self) -> str: ...

    @property
    def references(self) -> References: ...

    @property
    def calls(self) -> Calls: ...

    @property
    def autograd(self) -> AutogradSeam: ...


# The agent of this task (and of the tasks it creates).
current: contextvars.ContextVar[Current | None] = contextvars.ContextVar(
    "asyncgrad_current_agent", default=None
)
# What `rpc.init` started: current for every task of the process that has no agent of its own.
process_default: list[Current] = []


def running_agent() -> Current:
    """The agent of this task (or of the exposed function running), else `rpc.init`'s."""
    agent = current.get()
    if agent is None and process_default:
        agent = process_default[-1]
    if agent is None:
        raise RuntimeError(
            "no current agent: use `async with Agent(...)` or `await asyncgrad.rpc.init(...)`"
        )
    return agent
