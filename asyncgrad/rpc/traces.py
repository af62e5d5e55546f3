"""Gathering a trace: the recent spans of every live agent of the namespace, as one
timeline (`Agent.trace`).

Each agent serves its own spans (the built-in function `TRACE`); the agent that gathers
asks all of them at once, each within `timeout`. One that does not answer (frozen, its
event loop blocked, gone meanwhile) is not an error: it shows as an empty row saying why,
while the others' open spans show what waits on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from asyncgrad.errors import RemoteError, RpcError, RPCTimeout, TransportError
from asyncgrad.messages import Call, require
from asyncgrad.rpc.calls import Calls
from asyncgrad.rpc.server import TRACE
from asyncgrad.tracing import timeline

__all__ = ["gather"]

Dump = dict[str, Any]


async def gather(
    calls: Calls,
    here: tuple[str, Callable[[int | None], Dump]],
    workers: list[tuple[str, int]],
    context_id: int | None,
    timeout: float,
) -> list[dict[str, Any]]:
    """The trace events of `workers` ((name, id) each); `here` is the gathering agent's
    name and its own dump."""
    name_here, dump_here = here

    async def one(name: str, agent_id: int) -> Dump:
        if name == name_here:
            dump = dump_here(context_id)
        else:
            dump = require(
                await calls.make(name, Call(TRACE, (context_id,)), timeout), dict, "trace"
            )
        return {**dump, "id": agent_id}

    answers = await asyncio.gather(*(one(*w) for w in workers), return_exceptions=True)
    dumps: list[Dump] = []
    missing: list[tuple[str, int, str]] = []
    for (name, agent_id), answer in zip(workers, answers, strict=True):
        if isinstance(answer, RpcError | TransportError):
            missing.append((name, agent_id, _why(answer, timeout)))
        elif isinstance(answer, BaseException):
            raise answer
        else:
            dumps.append(answer)
    return timeline.events(dumps, missing)


def _why(error: RpcError | TransportError, timeout: float) -> str:
    """Why a worker gave no spans, in a few words (a row's title)."""
    if isinstance(error, RPCTimeout):
        return f"no answer within {timeout:g} s"
    if isinstance(error, RemoteError) and error.remote_type == "NotExposedError":
        return "serves no traces: an older asyncgrad"
    return f"{type(error).__name__}: {str(error)[:80]}"
