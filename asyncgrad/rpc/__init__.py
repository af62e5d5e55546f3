"""RPC over Redis streams, named as in `torch.distributed.rpc` and asyncio-native.

    @ag.rpc.expose
    async def forward(x): ...

    async with ag.rpc.Agent("trainer") as agent:
        y = await agent.rpc_async("ps", forward, args=(x,))

The module-level functions use the current agent: the one of the `async with` block or
exposed function this task runs in, else the one `init` started.
"""

from __future__ import annotations

from typing import Any

from asyncgrad.rpc.agent import Agent, WorkerInfo, current_agent, init
from asyncgrad.rpc.exposed import expose
from asyncgrad.rpc.rref import RRef

__all__ = [
    "Agent",
    "RRef",
    "WorkerInfo",
    "current_agent",
    "expose",
    "get_worker_info",
    "init",
    "remote",
    "rpc_async",
    "shutdown",
    "trace",
]


async def rpc_async(
    to: str,
    fn: Any,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    timeout: float | None = None,
) -> Any:
    """`current_agent().rpc_async(...)`."""
    return await current_agent().rpc_async(to, fn, args, kwargs, timeout)


async def remote(
    to: str,
    fn: Any,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    timeout: float | None = None,
) -> RRef[Any]:
    """`current_agent().remote(...)`."""
    return await current_agent().remote(to, fn, args, kwargs, timeout)


async def get_worker_info(name: str | None = None) -> WorkerInfo:
    """`current_agent().get_worker_info(name)`."""
    return await current_agent().get_worker_info(name)


async def trace(
    context_id: int | None = None, timeout: float | None = None
) -> list[dict[str, Any]]:
    """`current_agent().trace(context_id)`: the recent spans of every live agent of the
    namespace as Chrome/Perfetto trace events."""
    return await current_agent().trace(context_id, timeout)


async def shutdown(graceful: bool = True) -> None:
    """Shut the current agent down; if `init` made it current, what it displaced is again."""
    await current_agent().shutdown(graceful)
