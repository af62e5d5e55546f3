"""Every message kind, defined once: a small header and a payload, each a msgpack map.

A message travels as frames: `[header, payload, *buffers]`. The header (`Header`) is
decoded first and alone, so a duplicate is dropped before its payload (which may hold
RRefs that count as references) is ever decoded. `MessageCodec` makes and reads them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from asyncgrad.codec import Codec, Extension
from asyncgrad.errors import CodecError
from asyncgrad.rpc.rref import RRef
from asyncgrad.tensor import Tensor

__all__ = [
    "Call",
    "Header",
    "Kind",
    "MessageCodec",
    "MessageError",
    "Reply",
    "RRefUpdates",
    "require",
]

_HEADER_LIMIT = 64 * 1024
_TENSOR, _PARAMETER, _RREF = 16, 17, 18  # extension codes: append only, never reorder


class MessageError(CodecError):
    """A message decoded, but its fields are not what its kind requires."""


class Kind(enum.IntEnum):
    CALL = 1  # run a function (or a method of an RRef's value) and reply
    REPLY = 2  # the result of a CALL, or its error
    RREF_UPDATES = 3  # reference count changes for RRefs owned by the receiver
    LEAVING = 4  # the sender is going away: drop every reference it holds
    # Distributed autograd (asyncgrad.dist_autograd handles these).
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


@dataclass(frozen=True, slots=True)
class Header:
    """Kind, message id (unique per sender incarnation), sender, the call replied to, and
    distributed autograd's record of the message (plain ints; None outside a context)."""

    kind: Kind
    id: int
    sender: str
    reply_to: int = 0
    context: Any = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"k": int(self.kind), "i": self.id, "s": self.sender}
        if self.reply_to:
            wire["r"] = self.reply_to
        if self.context is not None:
            wire["c"] = self.context
        return wire

    @classmethod
    def from_wire(cls, wire: Any) -> Header:
        # Every header passes here: the common, well-formed one is checked with exact
        # types (msgpack decodes ints as int, never bool), anything else the long way.
        if type(wire) is dict:
            kind, i, sender, r = wire.get("k"), wire.get("i"), wire.get("s"), wire.get("r", 0)
            if type(i) is int and type(sender) is str and type(r) is int and type(kind) is int:
                known = _KINDS.get(kind)
                if known is not None:
                    return cls(known, i, sender, r, wire.get("c"))
        require(wire, dict, "header")
        try:
            kind = Kind(require(wire.get("k"), int, "k"))
        except ValueError as e:
            raise MessageError(f"unknown message kind {wire.get('k')!r}") from e
        return cls(
            kind,
            require(wire.get("i"), int, "i"),
            require(wire.get("s"), str, "s"),
            require(wire.get("r", 0), int, "r"),
            wire.get("c"),
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
    """A result (`value`) or an error: (type name, message, remote traceback)."""

    value: Any = None
    error: tuple[str, str, str] | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"v": self.value} if self.error is None else {"e": self.error}

    @classmethod
    def from_wire(cls, wire: Any) -> Reply:
        require(wire, dict, "reply")
        if "e" in wire:
            error = require(wire["e"], tuple, "e")
            if len(error) != 3 or not all(isinstance(x, str) for x in error):
                raise MessageError("an error reply needs (type, message, traceback)")
            return cls(error=error)
        return cls(wire.get("v"))


@dataclass(frozen=True, slots=True)
class RRefUpdates:
    """(rref id, holder, +n or -n) changes to the receiver's reference counts."""

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


class MessageCodec:
    """One agent's headers and payloads to frames and back.

    Tensors (and parameters) travel as `(array, requires_grad)`; RRefs as what the agent's
    `rref_to_wire` makes of them. While one payload is encoded or decoded (both
    synchronous), the tensors in it that require grad are collected for autograd's seam.
    """

    def __init__(
        self,
        max_size: int,
        rref_to_wire: Callable[[RRef[Any]], Any],
        rref_from_wire: Callable[[Any], RRef[Any]],
    ) -> None:
        to_wire, from_wire = self._tensor_to_wire, self._tensor_from_wire
        self._payloads = Codec(
            max_size=max_size,
            extensions=[
                Extension(_TENSOR, Tensor, to_wire, from_wire),
                Extension(_PARAMETER, _parameter_type(), to_wire, from_wire),
                Extension(_RREF, RRef, rref_to_wire, rref_from_wire),
            ],
        )
        self._headers = Codec(max_size=_HEADER_LIMIT)
        self._tensors: list[Tensor] = []

    def encode_header(self, header: Header) -> bytes:
        return self._headers.encode_plain(header.to_wire())

    def decode_header(self, frame: bytes) -> Header:
        return Header.from_wire(self._headers.decode_plain(frame))

    def encode_payload(self, payload: Any) -> tuple[list[bytes | memoryview], list[Tensor]]:
        """The payload's frames, and the tensors in it that require grad."""
        self._tensors = []
        try:
            return self._payloads.encode_frames(payload), self._tensors
        finally:
            self._tensors = []

    def decode_payload(self, frames: Sequence[bytes | memoryview]) -> tuple[Any, list[Tensor]]:
        """The payload, and the tensors in it that require grad."""
        self._tensors = []
        try:
            return self._payloads.decode_frames(frames), self._tensors
        finally:
            self._tensors = []

    def _tensor_to_wire(self, t: Tensor) -> tuple[Any, bool]:
        if t.requires_grad:
            self._tensors.append(t)
        return (t.data, t.requires_grad)

    def _tensor_from_wire(self, wire: Any) -> Tensor:
        if not (isinstance(wire, tuple) and len(wire) == 2 and isinstance(wire[1], bool)):
            raise MessageError("a tensor is (array, requires_grad)")
        data, requires_grad = wire
        t = Tensor._make(data)
        if requires_grad:
            t.requires_grad_(True)
            self._tensors.append(t)
        return t


def _parameter_type() -> type:
    from asyncgrad.nn import Parameter

    return Parameter
