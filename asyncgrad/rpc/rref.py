"""`RRef`: a reference to a value that lives on one worker, its owner.

An RRef object holds its agent's `References` (its count, and the value on the owner)
and `Calls` (what it asks of the owner); references.py draws the counting protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from asyncgrad.messages import Call
from asyncgrad.rpc.calls import Calls
from asyncgrad.rpc.current import running_agent
from asyncgrad.rpc.references import References

__all__ = ["RRef"]

T = TypeVar("T")


class RRef(Generic[T]):
    """A reference to a value that lives on one worker, its owner.

    `RRef(value)` wraps a local value, owned by the current agent. RRefs travel as
    arguments and results; the owner keeps the value while any RRef to it exists.

        >>> rref = await agent.remote("ps", ParameterServer, args=(784,))
        >>> weights = await rref.rpc_async().get_weights()
        >>> server = await rref.to_here()       # a copy of the value, over the wire
    """

    __slots__ = ("__weakref__", "_calls", "_references", "_released", "id", "owner")

    def __init__(self, value: T) -> None:
        agent = running_agent()
        references = agent.references
        self._bind(references, agent.calls, references.name, references.owned.own(value))

    @classmethod
    def owned(cls, references: References, calls: Calls, value: Any) -> RRef[Any]:
        """A new reference to `value`, owned by the agent of `references`."""
        rref: RRef[Any] = cls.__new__(cls)
        rref._bind(references, calls, references.name, references.owned.own(value))
        return rref

    @classmethod
    def held(cls, references: References, calls: Calls, owner: str, rref_id: int) -> RRef[Any]:
        """A reference that arrived in a message; its count was added by the sender."""
        rref: RRef[Any] = cls.__new__(cls)
        rref._bind(references, calls, owner, rref_id, counted=True)
        return rref

    def _bind(
        self,
        references: References,
        calls: Calls,
        owner: str,
        rref_id: int,
        counted: bool = False,
    ) -> None:
        self._references, self._calls = references, calls
        self.owner, self.id, self._released = owner, rref_id, False
        references.bind(owner, rref_id, counted)

    def is_owner(self) -> bool:
        return self.owner == self._references.name

    def local_value(self) -> T:
        """The value itself; only on the owner."""
        if not self.is_owner():
            raise RuntimeError(
                f"local_value() of an RRef owned by {self.owner}, on {self._references.name}"
            )
        value: T = self._references.owned.get(self.id)
        return value

    async def to_here(self, timeout: float | None = None) -> T:
        """The value (a copy sent over the wire, unless this is the owner)."""
        if self.is_owner():
            return self.local_value()
        value: T = await self._calls.make(self.owner, Call("", target=self.id), timeout)
        return value

    def rpc_async(self, timeout: float | None = None) -> _Proxy:
        """`await rref.rpc_async().method(*args)` runs `value.method(*args)` on the owner."""
        return _Proxy(self._calls, self, make_rref=False, timeout=timeout)

    def remote(self, timeout: float | None = None) -> _Proxy:
        """`await rref.remote().method(*args)` is an RRef to the result, left on the owner."""
        return _Proxy(self._calls, self, make_rref=True, timeout=timeout)

    def __repr__(self) -> str:
        return f"RRef(owner={self.owner!r}, id={self.id}, held_by={self._references.name!r})"

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
            self._references.release(self.owner, self.id)


class _Proxy:
    """`rref.rpc_async()` and `rref.remote()`: any method name is a call to the owner."""

    __slots__ = ("_calls", "_make_rref", "_rref", "_timeout")

    def __init__(
        self, calls: Calls, rref: RRef[Any], *, make_rref: bool, timeout: float | None
    ) -> None:
        self._calls, self._rref = calls, rref
        self._make_rref, self._timeout = make_rref, timeout

    def __getattr__(self, method: str) -> Callable[..., Coroutine[Any, Any, Any]]:
        if method.startswith("_"):
            raise AttributeError(f"private method {method!r} cannot be called remotely")
        calls, rref, make_rref, timeout = self._calls, self._rref, self._make_rref, self._timeout

        async def call(*args: Any, **kwargs: Any) -> Any:
            what = Call("", args, kwargs, target=rref.id, method=method, make_rref=make_rref)
            return await calls.make(rref.owner, what, timeout)

        call.__name__ = method
        return call
