"""Every message kind, defined once, as a typed record: RPC's and distributed autograd's.

A message travels as frames: `[header, payload, *buffers]`. The header (`Header`) is
decoded first and alone, so a duplicate is dropped before its payload (which may hold
RRefs that count as references) is ever decoded. Each record checks its own fields in
`from_wire`; a near miss is a `MessageError`, which the receiver dead-letters. Nothing
here knows Redis, the codec, or autograd's graph: records hold plain values and arrays.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

from asyncgrad.errors import MessageError

__all__ = [
    "AUTOGRAD_RECORDS",
    "AutogradRecord",
    "Call",
    "ContextRecord",
    "ContextRelease",
    "Grad",
    "Header",
    "Kind",
    "Leaving",
    "PassAbort",
    "PassDone",
    "PassStart",
    "RRefUpdates",
    "Reply",
    "require",
]


class Kind(enum.IntEnum):
    CALL = 1  # run a function (or a method of an RRef's value) and reply
    REPLY = 2  # the result of a CALL, or its error
    RREF_UPDATES = 3  # reference count changes for RRefs owned by the receiver
    LEAVING = 4  # the sender is going away: drop every reference it holds
    # Distributed autograd's (asyncgrad.dist_autograd handles these).
    GRAD = 16  # the gradient (or "none") for one recorded send
    PASS_START = 17  # a backward pass begins in a context
    PASS_DONE = 18  # a worker's part of the pass has finished
    PASS_ABORT = 19  # a pass failed somewhere: drop it
    CONTEXT_RELEASE = 20  # a context is over: free it


_KINDS = {int(kind): kind for kind in Kind}


def require(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """`value` if it has the expected type, else `MessageError` naming the field."""
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise MessageError(f"message field {what} is {type(value).__name__}, not as required")
    return value


def _ints(value: Any, what: str) -> tuple[int, ...]:
    items = require(value, (list, tuple), what)
    return tuple(require(i, int, f"{what} item") for i in items)


# *** RPC ***


@dataclass(frozen=True, slots=True)
class ContextRecord:
    """What a call or reply carries for distributed autograd: its context (0: none), the
    id of its recorded send (0: no tensor that requires grad), and contexts released
    meanwhile on the sender, which ride along instead of travelling alone."""

    context: int
    message: int = 0
    released: tuple[int, ...] = ()

    def to_wire(self) -> list[Any]:
        return [self.context, self.message, list(self.released)]

    @classmethod
    def from_wire(cls, wire: Any) -> ContextRecord:
        if not (isinstance(wire, list) and len(wire) == 3):
            raise MessageError("a context record is [context id, message id, released ids]")
        return cls(
            require(wire[0], int, "context"),
            require(wire[1], int, "message"),
            _ints(wire[2], "released"),
        )


@dataclass(frozen=True, slots=True)
class Header:
    """Kind, message id (unique per sender incarnation), sender, the call replied to, and
    distributed autograd's record of the message (None outside a context).

    A call also names the incarnation of its receiver it is for (`to_run`, "" if the
    sender knew none) and the time after which it must not start (`deadline`, in ms of
    Redis's clock; 0: none).
    """

    kind: Kind
    id: int
    sender: str
    reply_to: int = 0
    context: ContextRecord | None = None
    to_run: str = ""
    deadline: int = 0

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"k": int(self.kind), "i": self.id, "s": self.sender}
        if self.reply_to:
            wire["r"] = self.reply_to
        if self.context is not None:
            wire["c"] = self.context.to_wire()
        if self.to_run:
            wire["n"] = self.to_run
        if self.deadline:
            wire["d"] = self.deadline
        return wire

    @classmethod
    def from_wire(cls, wire: Any) -> Header:
        # Every header passes here: the common, well-formed one is checked with exact
        # types (msgpack decodes ints as int, never bool), anything else the long way.
        if type(wire) is dict:
            kind, i, sender, r = wire.get("k"), wire.get("i"), wire.get("s"), wire.get("r", 0)
            if type(i) is int and type(sender) is str and type(r) is int and type(kind) is int:
                known = _KINDS.get(kind)
                to_run, deadline = wire.get("n", ""), wire.get("d", 0)
                if known is not None and type(to_run) is str and type(deadline) is int:
                    c = wire.get("c")
                    record = None if c is None else ContextRecord.from_wire(c)
                    return cls(known, i, sender, r, record, to_run, deadline)
        require(wire, dict, "header")
        try:
            kind = Kind(require(wire.get("k"), int, "k"))
        except ValueError as e:
            raise MessageError(f"unknown message kind {wire.get('k')!r}") from e
        c = wire.get("c")
        return cls(
            kind,
            require(wire.get("i"), int, "i"),
            require(wire.get("s"), str, "s"),
            require(wire.get("r", 0), int, "r"),
            None if c is None else ContextRecord.from_wire(c),
            require(wire.get("n", ""), str, "n"),
            require(wire.get("d", 0), int, "d"),
        )


@dataclass(frozen=True, slots=True)
class Call:
    """Run `fn(*args, **kwargs)`, or `method` of the value of owned RRef `target`.

    With `make_rref` the result stays on the callee and an RRef to it is returned.
    """

    fn: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None
    target: int = 0
    method: str = ""
    make_rref: bool = False
    # The wire fields that hold the caller's values, by the names the caller gave them.
    VALUE_FIELDS: ClassVar[dict[str, str]] = {"a": "args", "w": "kwargs"}

    @property
    def label(self) -> str:
        """What it runs, in short (a timeline's name for it): `forward` for `mod:forward`."""
        if self.target:
            return self.method or "to_here"
        return self.fn.rpartition(":")[2]

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"f": self.fn, "a": self.args}
        if self.kwargs:
            wire["w"] = self.kwargs
        if self.target:
            wire["t"], wire["m"] = self.target, self.method
        if self.make_rref:
            wire["o"] = True
        return wire

    @classmethod
    def from_wire(cls, wire: Any) -> Call:
        if type(wire) is dict and "w" not in wire:  # the common call, checked by exact types
            fn, args, target = wire.get("f"), wire.get("a", ()), wire.get("t", 0)
            method, make_rref = wire.get("m", ""), wire.get("o", False)
            if (
                type(fn) is str
                and type(args) is tuple
                and type(target) is int
                and type(method) is str
                and type(make_rref) is bool
            ):
                return cls(fn, args, {}, target, method, make_rref)
        require(wire, dict, "call")
        kwargs = require(wire.get("w", {}), dict, "kwargs")
        if not all(isinstance(k, str) for k in kwargs):
            raise MessageError("keyword argument names must be strings")
        return cls(
            require(wire.get("f"), str, "f"),
            require(wire.get("a", ()), tuple, "args"),
            kwargs,
            require(wire.get("t", 0), int, "t"),
            require(wire.get("m", ""), str, "m"),
            require(wire.get("o", False), bool, "o"),
        )


@dataclass(frozen=True, slots=True)
class Reply:
    """A result (`value`) or an error: (type name, message, remote traceback).

    `refused`: the callee did not serve the call, and the error's type names what the
    caller raises: `WorkerUnavailable` (it did not run: it was for an earlier
    incarnation), `OutcomeUnknown` (an earlier incarnation took it, and may have run
    it), `RRefReleased` (its RRef's value was released)."""

    value: Any = None
    error: tuple[str, str, str] | None = None
    refused: bool = False
    VALUE_FIELD: ClassVar[str] = "v"  # the wire field that holds the value

    def to_wire(self) -> dict[str, Any]:
        if self.error is None:
            return {"v": self.value}
        return {"e": self.error, "x": True} if self.refused else {"e": self.error}

    @classmethod
    def from_wire(cls, wire: Any) -> Reply:
        require(wire, dict, "reply")
        if "e" in wire:
            refused = require(wire.get("x", False), bool, "x")
            return cls(error=_error_fields(wire["e"], "an error reply"), refused=refused)
        return cls(wire.get("v"))


def _error_fields(wire: Any, what: str) -> tuple[str, str, str]:
    error = require(wire, tuple, "error")
    if len(error) != 3 or not all(isinstance(x, str) for x in error):
        raise MessageError(f"{what} needs (type, message, worker or traceback)")
    return (error[0], error[1], error[2])


@dataclass(frozen=True, slots=True)
class RRefUpdates:
    """(rref id, holder, +n or -n) changes to the receiver's reference counts."""

    kind: ClassVar[Kind] = Kind.RREF_UPDATES
    updates: tuple[tuple[int, str, int], ...]

    def to_wire(self) -> dict[str, Any]:
        return {"u": self.updates}

    @classmethod
    def from_wire(cls, wire: Any) -> RRefUpdates:
        require(wire, dict, "rref updates")
        updates = require(wire.get("u"), tuple, "u")
        for u in updates:
            if not (
                isinstance(u, tuple)
                and len(u) == 3
                and isinstance(u[0], int)
                and isinstance(u[1], str)
                and isinstance(u[2], int)
            ):
                raise MessageError("an rref update is (id, holder, delta)")
        return cls(updates)


@dataclass(frozen=True, slots=True)
class Leaving:
    """The sender leaves: its references are dropped."""

    kind: ClassVar[Kind] = Kind.LEAVING

    def to_wire(self) -> dict[str, Any]:
        return {}


# *** distributed autograd ***


@dataclass(frozen=True, slots=True)
class Grad:
    """The gradients for the tensors of recorded send `message` (None: none is coming)."""

    kind: ClassVar[Kind] = Kind.GRAD
    context: int
    pass_id: int
    message: int
    grads: tuple[Any, ...] | None

    def to_wire(self) -> dict[str, Any]:
        return {"c": self.context, "p": self.pass_id, "m": self.message, "g": self.grads}

    @classmethod
    def from_wire(cls, wire: Any) -> Grad:
        context, pass_id = _pass_fields(wire)
        grads = wire.get("g")
        if grads is not None:
            grads = tuple(require(grads, (list, tuple), "g"))
        return cls(context, pass_id, require(wire.get("m"), int, "m"), grads)


@dataclass(frozen=True, slots=True)
class PassStart:
    """Pass `pass_id` of the context begins: take part, and answer `PassDone` when done."""

    kind: ClassVar[Kind] = Kind.PASS_START
    context: int
    pass_id: int
    retain: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"c": self.context, "p": self.pass_id, "r": self.retain}

    @classmethod
    def from_wire(cls, wire: Any) -> PassStart:
        context, pass_id = _pass_fields(wire)
        return cls(context, pass_id, require(wire.get("r", False), bool, "r"))


@dataclass(frozen=True, slots=True)
class PassDone:
    """The sender's part of the pass has finished (or it has none)."""

    kind: ClassVar[Kind] = Kind.PASS_DONE
    context: int
    pass_id: int

    def to_wire(self) -> dict[str, Any]:
        return {"c": self.context, "p": self.pass_id}

    @classmethod
    def from_wire(cls, wire: Any) -> PassDone:
        return cls(*_pass_fields(wire))


@dataclass(frozen=True, slots=True)
class PassAbort:
    """The pass failed: `error` is (type name, message, worker where it happened)."""

    kind: ClassVar[Kind] = Kind.PASS_ABORT
    context: int
    pass_id: int
    error: tuple[str, str, str]

    def to_wire(self) -> dict[str, Any]:
        return {"c": self.context, "p": self.pass_id, "e": self.error}

    @classmethod
    def from_wire(cls, wire: Any) -> PassAbort:
        context, pass_id = _pass_fields(wire)
        return cls(context, pass_id, _error_fields(wire.get("e"), "a pass abort"))


@dataclass(frozen=True, slots=True)
class ContextRelease:
    """The sender released these contexts: free them, and tell the peers they reached."""

    kind: ClassVar[Kind] = Kind.CONTEXT_RELEASE
    contexts: tuple[int, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"c": 0, "r": list(self.contexts)}

    @classmethod
    def from_wire(cls, wire: Any) -> ContextRelease:
        require(wire, dict, "context release")
        return cls(_ints(wire.get("r"), "r"))


def _pass_fields(wire: Any) -> tuple[int, int]:
    require(wire, dict, "autograd message")
    return require(wire.get("c"), int, "c"), require(wire.get("p"), int, "p")


AutogradRecord: TypeAlias = Grad | PassStart | PassDone | PassAbort | ContextRelease
# How each autograd kind's payload becomes its record (the one place they are checked).
AUTOGRAD_RECORDS: dict[Kind, type[AutogradRecord]] = {
    record.kind: record for record in (Grad, PassStart, PassDone, PassAbort, ContextRelease)
}
