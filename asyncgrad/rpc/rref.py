"""Remote references: `RRef`, and the owner's table of values and who holds them.

Counting: the owner keeps, per value, a count per holder. Every RRef object anywhere is
one count, under its own agent's name. Whoever puts an RRef in a message adds a count for
the receiver *before* the message leaves: the owner directly, anyone else by an update
to the owner that Redis has stored first (so the receiver's later release can never
overtake it); a message that never leaves (it did not encode, its sender was cancelled,
an owner could not be told) takes its counts back. An RRef object released
(garbage-collected) takes its count away. The owner frees a value when its counts sum to
zero, and drops the counts of a holder that left or stopped heartbeating.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from asyncgrad.rpc.agent import Agent

__all__ = ["RRef", "RRefTable"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RRefTable:
    """The values this agent owns, and how many references each holder has to each."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._values: dict[int, Any] = {}
        self._counts: dict[int, Counter[str]] = {}
        # Random start: RRefs to an earlier run of this owner (killed and restarted under
        # the same name) must not name, count or free the values of this one.
        self._first = self._next = secrets.randbits(40) << 16

    def own(self, value: Any) -> int:
        rref_id, self._next = self._next, self._next + 1
        self._values[rref_id] = value
        self._counts[rref_id] = Counter()
        return rref_id

    def get(self, rref_id: int) -> Any:
        try:
            return self._values[rref_id]
        except KeyError:
            why = (
                "it was freed"
                if self._first <= rref_id < self._next
                else f"the RRef is older than this run of {self.owner} (it restarted?)"
            )
            raise LookupError(f"no value {rref_id} owned by {self.owner}: {why}") from None

    def add(self, rref_id: int, holder: str, delta: int) -> None:
        counts = self._counts.get(rref_id)
        if counts is None:
            logger.debug("event=rref_update_unknown owner=%s rref=%d", self.owner, rref_id)
            return
        counts[holder] += delta
        if counts[holder] == 0:
            del counts[holder]
        if sum(counts.values()) <= 0:
            self._free(rref_id)

    def drop_holder(self, holder: str) -> int:
        """Forget every reference `holder` had; how many values that freed."""
        freed = 0
        for rref_id in [i for i, c in self._counts.items() if holder in c]:
            self.add(rref_id, holder, -self._counts[rref_id][holder])
            freed += rref_id not in self._values
        return freed

    def holders(self) -> set[str]:
        """Other agents holding references to values owned here."""
        return {h for c in self._counts.values() for h in c if h != self.owner}

    def _free(self, rref_id: int) -> None:
        del self._values[rref_id], self._counts[rref_id]

    def __len__(self) -> int:
        return len(self._values)


class RRef(Generic[T]):
    """A reference to a value that lives on one worker, its owner.

    `RRef(value)` wraps a local value, owned by the current agent. RRefs travel as
    arguments and results; the owner keeps the value while any RRef to it exists.

        >>> rref = await agent.remote("ps", ParameterServer, args=(784,))
        >>> weights = await rref.rpc_async().get_weights()
        >>> server = await rref.to_here()       # a copy of the value, over the wire
    """

    __slots__ = ("__weakref__", "_agent", "_released", "id", "owner")

    def __init__(self, value: T) -> None:
        from asyncgrad.rpc.agent import current_agent

        agent = current_agent()
        self._bind(agent, agent.name, agent._rrefs.own(value))

    @classmethod
    def _owned(cls, agent: Agent, value: Any) -> RRef[Any]:
        """A new reference to `value`, owned by `agent`."""
        rref: RRef[Any] = cls.__new__(cls)
        rref._bind(agent, agent.name, agent._rrefs.own(value))
        return rref

    @classmethod
    def _held(cls, agent: Agent, owner: str, rref_id: int) -> RRef[Any]:
        """A reference that arrived in a message; its count was added by the sender."""
        rref: RRef[Any] = cls.__new__(cls)
        rref._bind(agent, owner, rref_id, counted=True)
        return rref

    def _bind(self, agent: Agent, owner: str, rref_id: int, counted: bool = False) -> None:
        self._agent, self.owner, self.id, self._released = agent, owner, rref_id, False
        if owner == agent.name and not counted:
            agent._rrefs.add(rref_id, owner, +1)
        elif owner != agent.name:
            agent._references.held_from[owner] += 1

    def is_owner(self) -> bool:
        return self.owner == self._agent.name

    def local_value(self) -> T:
        """The value itself; only on the owner."""
        if not self.is_owner():
            raise RuntimeError(
                f"local_value() of an RRef owned by {self.owner}, on {self._agent.name}"
            )
        value: T = self._agent._rrefs.get(self.id)
        return value

    async def to_here(self, timeout: float | None = None) -> T:
        """The value (a copy sent over the wire, unless this is the owner)."""
        if self.is_owner():
            return self.local_value()
        value: T = await self._agent._call_rref(self, "", (), None, False, timeout)
        return value

    def rpc_async(self, timeout: float | None = None) -> _Proxy:
        """`await rref.rpc_async().method(*args)` runs `value.method(*args)` on the owner."""
        return _Proxy(self, make_rref=False, timeout=timeout)

    def remote(self, timeout: float | None = None) -> _Proxy:
        """`await rref.remote().method(*args)` is an RRef to the result, left on the owner."""
        return _Proxy(self, make_rref=True, timeout=timeout)

    def __repr__(self) -> str:
        return f"RRef(owner={self.owner!r}, id={self.id}, held_by={self._agent.name!r})"

    # A copy would be a second object releasing the one count this object holds.
    def __copy__(self) -> RRef[T]:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> RRef[T]:
        return self

    def __reduce__(self) -> Any:
        raise TypeError("an RRef cannot be pickled: pass it as an RPC argument or result")

    def __del__(self) -> None:
        if not getattr(self, "_released", True):
            self._released = True
            self._agent._references.release(self.owner, self.id)


class _Proxy:
    __slots__ = ("_make_rref", "_rref", "_timeout")

    def __init__(self, rref: RRef[Any], *, make_rref: bool, timeout: float | None) -> None:
        self._rref, self._make_rref, self._timeout = rref, make_rref, timeout

    def __getattr__(self, method: str) -> Callable[..., Coroutine[Any, Any, Any]]:
        if method.startswith("_"):
            raise AttributeError(f"private method {method!r} cannot be called remotely")
        rref, make_rref, timeout = self._rref, self._make_rref, self._timeout

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await rref._agent._call_rref(rref, method, args, kwargs, make_rref, timeout)

        call.__name__ = method
        return call
