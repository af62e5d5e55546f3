"""Restarts: of Redis without persistence (every key and message lost), and of an owner
under its name. Agents recover by themselves; what was lost fails fast, with a clear error.

Each test runs a Redis of its own (the session's is shared, and not ours to restart) and
its agents in process; waits are on log events, replies and futures, each with a deadline.
"""

from __future__ import annotations

import asyncio
import gc
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from asyncgrad.embedded import EmbeddedRedis
from asyncgrad.errors import RemoteError, TransportError
from asyncgrad.rpc import Agent
from asyncgrad.transport import GROUP, heartbeat, inbox
from tests import rpc_funcs as f
from tests.conftest import LogEvents, eventually
from tests.rpc_funcs import Box, Gate

DEADLINE = 5.0
MakeAgent = Callable[..., Any]


@pytest.fixture
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(os.environ.get("ASYNCGRAD_REDIS_SERVER")) as own:
        yield own


@pytest.fixture
async def agents(server: EmbeddedRedis) -> AsyncIterator[MakeAgent]:
    """`await agents(name, **kwargs)`: a started Agent on this test's Redis."""
    made: list[Agent] = []
    namespace = "r-" + uuid.uuid4().hex[:8]

    async def make(name: str, **kwargs: Any) -> Agent:
        kwargs.setdefault("failure_timeout", 1.0)
        agent = await Agent(name, server.url, namespace, **kwargs).start()
        made.append(agent)
        return agent

    yield make
    for agent in reversed(made):
        await agent.shutdown(graceful=False)
    Gate.gates.clear()


def restart(server: EmbeddedRedis) -> None:
    """Stop Redis and start an empty one at the same address."""
    server.stop(keep_address=True)
    server.start()


async def test_references_ids_and_calls_survive_a_redis_restart(
    server: EmbeddedRedis, agents: MakeAgent, log_events: LogEvents
) -> None:
    a, b = await agents("a"), await agents("b")
    ids = (a.id, b.id)
    box = await a.remote("b", Box, args=(1,))
    restart(server)
    await log_events.wait("event=inbox_lost", 2)
    assert await box.rpc_async(timeout=DEADLINE).add(1) == 2
    # The watches (every failure_timeout / 5) must not take the heartbeats Redis lost
    # for deaths: nothing happening for a failure window is the condition measured.
    await asyncio.sleep(a.failure_timeout * 1.5)
    assert await box.rpc_async(timeout=DEADLINE).add(1) == 3
    assert log_events.count("event=worker_lost") == 0
    assert (a.id, b.id) == ids
    assert await a._transport.agents() == {"a": ids[0], "b": ids[1]}


async def test_ids_stay_when_redis_loses_the_registry(
    server: EmbeddedRedis, agents: MakeAgent, log_events: LogEvents
) -> None:
    made = [await agents(name) for name in "abcd"]
    assert [agent.id for agent in made] == [0, 1, 2, 3]
    restart(server)
    await log_events.wait("event=inbox_lost", 4)
    # Whichever registered again first, each got back the id it had.
    assert [agent.id for agent in made] == [0, 1, 2, 3]
    assert await made[0]._transport.agents() == {"a": 0, "b": 1, "c": 2, "d": 3}


async def test_a_call_whose_request_redis_lost_fails_at_once(
    server: EmbeddedRedis, agents: MakeAgent, log_events: LogEvents
) -> None:
    a = await agents("a", rpc_timeout=60.0)
    # A callee alive but reading nothing yet: the request waits in its inbox, and Redis
    # loses it.
    b_inbox = inbox(a.namespace, "b")
    await a._transport.execute("XGROUP", "CREATE", b_inbox, GROUP, "$", "MKSTREAM")
    await a._transport.execute("SET", heartbeat(a.namespace, "b"), "run=x pid=0", "PX", 60_000)
    call = asyncio.ensure_future(a.rpc_async("b", f.echo, args=(1,)))

    async def stored() -> bool:
        return bool(await a._transport.execute("XLEN", b_inbox))

    await eventually(stored, "the call's request is in b's inbox")
    restart(server)
    await agents("b")
    with pytest.raises(TransportError, match=r"Redis lost its data while the call was in fl"):
        async with asyncio.timeout(DEADLINE):  # not the call's 60 s
            await call
    await log_events.wait("event=rechecked agent=a callee=b calls=1 lost=1")


async def test_a_call_still_served_across_a_redis_restart_returns(
    server: EmbeddedRedis, agents: MakeAgent, log_events: LogEvents
) -> None:
    a, _ = await agents("a"), await agents("b")
    gate = Gate(uuid.uuid4().hex)
    call = asyncio.ensure_future(a.rpc_async("b", f.gated, args=(gate.key, "done")))
    async with asyncio.timeout(DEADLINE):
        await gate.entered.wait()
    restart(server)
    await log_events.wait("event=rechecked agent=a callee=b calls=1 lost=0")
    gate.opened.set()
    async with asyncio.timeout(DEADLINE):
        assert await call == "done"


async def test_an_rref_from_before_its_owner_restarted_names_nothing(agents: MakeAgent) -> None:
    a, b = await agents("a"), await agents("b")
    old = await a.remote("b", Box, args=(1,))
    await b.shutdown()
    b = await agents("b")
    new = await a.remote("b", Box, args=(10,))
    with pytest.raises(RemoteError, match="older than this run of b"):
        await old.rpc_async(timeout=DEADLINE).add(1)
    # Releasing the old reference must not count down, or free, a value of the new run.
    del old
    gc.collect()
    assert await new.rpc_async(timeout=DEADLINE).add(1) == 11
    assert len(b.references.owned) == 1
