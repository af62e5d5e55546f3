"""Exposed functions and classes for the in-process RPC tests (tests/test_rpc.py).

Every agent of a test lives in the test's own process and event loop, so a function
served by one agent can wait on an `asyncio.Event` the test controls: `Gate` is how a
test holds a call in flight and lets it go, without a timer. `CALLS` counts what ran, so
a test can prove that a call never reached its callee.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, ClassVar

import asyncgrad as ag
from asyncgrad import rpc

# What ran, by the key the caller chose; a test reads it after a round trip.
CALLS: collections.Counter[str] = collections.Counter()


class Gate:
    """`entered` is set once the gated call runs; the call returns once `opened` is set."""

    gates: ClassVar[dict[str, Gate]] = {}

    def __init__(self, key: str) -> None:
        self.key = key
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()
        Gate.gates[key] = self


# *** functions ***


@rpc.expose
def add(a: Any, b: Any) -> Any:
    return a + b


@rpc.expose
async def mul(a: Any, b: Any) -> Any:
    await asyncio.sleep(0)  # a real suspension: the reply comes from a task
    return a * b


@rpc.expose(name="ps.forward")
async def forward(x: Any) -> Any:
    return ("forward", x)


@rpc.expose
def echo(value: Any) -> Any:
    return value


@rpc.expose
def describe(*args: Any, **kwargs: Any) -> Any:
    """What arrived, with each value's type name, to check that types survive the trip."""
    return {
        "args": args,
        "kwargs": kwargs,
        "types": [type(a).__name__ for a in args],
    }


@rpc.expose
def count(key: str, *args: Any) -> int:
    CALLS[key] += 1
    return CALLS[key]


@rpc.expose
def fail(message: str) -> None:
    raise ValueError(message)  # the raising line: tests look for it in remote_traceback


@rpc.expose
def unserialisable_result() -> Any:
    return {"fine": 1, "not fine": {1, 2, 3}}


@rpc.expose
async def gated(key: str, value: Any = None) -> Any:
    gate = Gate.gates[key]
    gate.entered.set()
    try:
        await gate.opened.wait()
    except asyncio.CancelledError:
        CALLS[f"{key}:cancelled"] += 1
        raise
    return value


@rpc.expose
def whoami() -> tuple[str, str]:
    agent = rpc.current_agent()
    return agent.namespace, agent.name


@rpc.expose
async def relay(to: str, fn: str, *args: Any) -> tuple[str, Any]:
    """Call `fn` on `to` from inside a served call: it must go out as the serving agent."""
    return rpc.current_agent().name, await rpc.rpc_async(to, fn, args=args)


@rpc.expose
async def gated_relay(key: str, to: str, fn: str, *args: Any) -> Any:
    """Wait at the gate, then make a nested call: used while the server drains."""
    gate = Gate.gates[key]
    gate.entered.set()
    await gate.opened.wait()
    return await rpc.rpc_async(to, fn, args=args)


@rpc.expose
async def remote_from_here(to: str, value: Any) -> tuple[str, bool, Any]:
    """An RRef made by a nested `remote`, seen from the agent serving this call."""
    rref = await rpc.remote(to, echo, args=(value,))
    return rref.owner, rref.is_owner(), await rref.to_here()


@rpc.expose
def wrap(value: Any) -> rpc.RRef[Any]:
    """`RRef(value)` made inside a served call: owned by the serving agent."""
    return rpc.RRef(value)


@rpc.expose
async def inspect_rref(rref: rpc.RRef[Any]) -> tuple[str, bool, Any]:
    """How an RRef that arrived as an argument looks on this agent."""
    value = rref.local_value() if rref.is_owner() else await rref.to_here()
    return rref.owner, rref.is_owner(), value


@rpc.expose
def rref_owner_value(rref: rpc.RRef[Box]) -> tuple[str, bool, Any]:
    """On the owner: the Box's value, read through `local_value()`."""
    return rref.owner, rref.is_owner(), rref.local_value().value


@rpc.expose
def rref_back(rref: rpc.RRef[Any]) -> rpc.RRef[Any]:
    return rref


@rpc.expose
class Box:
    """A value held on its owner, reached through RRefs."""

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value

    def set(self, value: Any) -> None:
        self.value = value

    async def add(self, n: Any) -> Any:
        await asyncio.sleep(0)
        self.value = self.value + n
        return self.value

    def child(self, value: Any) -> Box:
        return Box(value)

    async def wait(self, key: str) -> Any:
        await Gate.gates[key].opened.wait()
        return self.value

    def _secret(self) -> str:
        CALLS["Box._secret"] += 1
        return "private"


@rpc.expose
class Holder:
    """Keeps RRefs (or anything) alive on the agent it lives on, until `drop`."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def keep(self, *items: Any) -> int:
        self.items.extend(items)
        return len(self.items)

    def give(self, index: int = -1) -> Any:
        return self.items[index]

    def drop(self) -> None:
        self.items.clear()

    async def pass_on(self, to: str, fn: str) -> Any:
        """Call `fn` on `to` with the last item: an RRef forwarded by this agent."""
        return await rpc.rpc_async(to, fn, args=(self.items[-1],))

    async def pop_after_dropping_the_rest(self) -> Any:
        """Return the last item after dropping the others: their releases and the fork of
        the returned RRef are both pending in the same tick."""
        kept = self.items.pop()
        self.items.clear()
        await asyncio.sleep(0)  # one tick: the releases are queued before the reply is made
        return kept


# RRefs a worker process keeps until it dies (tests kill it to see the owner free them).
HELD: list[Any] = []


@rpc.expose
async def hold_remote(owner: str, fn: str) -> str:
    """Make a value on `owner` with `remote` and keep the RRef for good."""
    HELD.append(await rpc.remote(owner, fn))
    return str(HELD[-1].owner)


class NotExposed:
    """A class that is importable but not exposed: calling it remotely must fail."""

    def __init__(self) -> None:
        CALLS["NotExposed"] += 1


@rpc.expose
class Base:
    def kind(self) -> str:
        return "base"


class Derived(Base):
    """Inherits from an exposed class but is not exposed itself."""

    def kind(self) -> str:
        return "derived"


@rpc.expose
def grad_enabled() -> bool:
    """Whether the served call records graphs (it must not inherit the agent's start-up
    context, such as a `no_grad` block the agent was started in)."""
    return ag.is_grad_enabled()
