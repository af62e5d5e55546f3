"""One agent's messages, in and out: ids, frames, sending, posting, resending, and routing
what arrives to the part that handles its kind.

`MessageCodec` turns a header and a payload into frames and back. Tensors (and
parameters) travel as `(array, requires_grad)` and arrive as constants: only a message
recorded in a distributed autograd context makes them require grad. RRefs travel as
`(owner, id)`. While one payload is encoded or decoded (both synchronous), the tensors
in it that require grad, and the RRefs it passes on, are collected for the caller
(autograd's seam records the tensors; the references count the RRefs).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from asyncgrad.codec import Codec, Extension
from asyncgrad.errors import CodecError, MessageError, RpcError
from asyncgrad.messages import (
    AUTOGRAD_RECORDS,
    AutogradRecord,
    ContextRecord,
    Header,
    Kind,
)
from asyncgrad.nn import Parameter
from asyncgrad.rpc.lifecycle import Lifecycle
from asyncgrad.tensor import Tensor, from_numpy
from asyncgrad.transport import Inbound, InboxMissing, ReplyError, Stored, Transport

__all__ = ["MessageCodec", "Payload", "Wire"]

logger = logging.getLogger(__name__)

_HEADER_LIMIT = 64 * 1024
_TENSOR, _PARAMETER, _RREF = 16, 17, 18  # extension codes: append only, never reorder
_RECENT = 20_000  # message ids remembered to drop duplicates (resends after a reconnect)
# Posted again while their receiver has no inbox (`Wire.post`); not count updates, whose
# order matters, nor a goodbye.
_RESENT = frozenset({Kind.REPLY, Kind.PASS_DONE, Kind.PASS_ABORT, Kind.CONTEXT_RELEASE})

Passed = list[tuple[str, int]]  # (owner, id) of the RRefs a payload holds


class OneWay(Protocol):
    """A record that travels on its own (not a call or reply): it knows its kind."""

    @property
    def kind(self) -> Kind: ...

    def to_wire(self) -> Any: ...


@dataclass(slots=True)
class Payload:
    """An encoded payload: its frames, the tensors in it that require grad, its RRefs."""

    frames: list[bytes | memoryview]
    tensors: list[Tensor] = field(default_factory=list)
    rrefs: Passed = field(default_factory=list)


class MessageCodec:
    """One agent's headers and payloads to frames and back.

    `rref_type` is the class of RRefs (encoded as `(owner, id)`), `rref_from_wire` makes
    one of those back into an RRef held here.
    """

    def __init__(
        self,
        max_size: int,
        rref_type: type[Any],
        rref_from_wire: Callable[[str, int], Any],
    ) -> None:
        to_wire, from_wire = self._tensor_to_wire, self._tensor_from_wire
        self._rref_from_wire = rref_from_wire
        self._payloads = Codec(
            max_size=max_size,
            extensions=[
                Extension(_TENSOR, Tensor, to_wire, from_wire),
                Extension(_PARAMETER, Parameter, to_wire, from_wire),
                Extension(_RREF, rref_type, self._rref_to_wire, self._rref_from_tuple),
            ],
        )
        self._headers = Codec(max_size=_HEADER_LIMIT)
        self._tensors: list[Tensor] = []
        self._rrefs: Passed = []

    def encode_header(self, header: Header) -> bytes:
        return self._headers.encode_plain(header.to_wire())

    def decode_header(self, frame: bytes | memoryview) -> Header:
        return Header.from_wire(self._headers.decode_plain(frame))

    def encode_payload(self, payload: Any) -> Payload:
        self._tensors, self._rrefs = [], []
        try:
            return Payload(self._payloads.encode_frames(payload), self._tensors, self._rrefs)
        finally:
            self._tensors, self._rrefs = [], []

    def decode_payload(self, frames: Sequence[bytes | memoryview]) -> tuple[Any, list[Tensor]]:
        """The payload, and the tensors in it that required grad on the sender (they arrive
        as constants until autograd's seam records them)."""
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
        t = from_numpy(data)
        if requires_grad:
            # It arrives a constant; autograd's seam makes it require grad, with its
            # `RecvRpcBackward`, only if the message was recorded in a context.
            self._tensors.append(t)
        return t

    def _rref_to_wire(self, rref: Any) -> tuple[str, int]:
        wire = (rref.owner, rref.id)
        self._rrefs.append(wire)
        return wire

    def _rref_from_tuple(self, wire: Any) -> Any:
        if not (
            isinstance(wire, tuple)
            and len(wire) == 2
            and isinstance(wire[0], str)
            and isinstance(wire[1], int)
        ):
            raise MessageError("an rref is (owner, id)")
        return self._rref_from_wire(wire[0], wire[1])


@dataclass(slots=True)
class _Posting:
    """A message posted again while its receiver has no inbox or Redis is out of memory
    (`Wire.post_frames`)."""

    dest: str
    frames: list[Any]
    over: Callable[[BaseException | None], None] | None
    deadline: float
    traced: tuple[int, int]
    delay: float = 0.05


Handler = Callable[[Header, Inbound], None]


class Wire:
    """Agent `transport.name`'s messages over its transport.

    What arrives goes, by kind, to the handlers given to `route` (calls, replies, count
    updates, goodbyes: each decodes its own payload) or, as a checked record, to the
    autograd handler. A message read twice (resent after a reconnect) is handled once.

    Each message handled is a span ("message": from its read to the end of its handler,
    with its context), and each message sent names its context and id to the span of its
    write, so that a timeline can draw it from one to the other.
    """

    def __init__(
        self,
        transport: Transport,
        codec: MessageCodec,
        lifecycle: Lifecycle,
        resend_for: float,
    ) -> None:
        self.transport = transport
        self.spans = transport.spans
        self.name = transport.name
        self._codec = codec
        self._lifecycle = lifecycle
        self.resend_for = resend_for
        self._ids = itertools.count(secrets.randbits(40) << 20)
        self._recent: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()
        self._handlers: dict[Kind, Handler] = {}
        self._autograd: Callable[[str, AutogradRecord], None] | None = None

    @property
    def agent_id(self) -> int:
        """The agent's id in its namespace (known once the transport started)."""
        return self.transport.id

    def route(
        self, handlers: dict[Kind, Handler], autograd: Callable[[str, AutogradRecord], None]
    ) -> None:
        """Who handles each kind that arrives (set once, before the transport starts)."""
        self._handlers, self._autograd = handlers, autograd

    # *** out ***

    def encode(self, payload: Any) -> Payload:
        """A payload's frames, with the tensors that require grad and the RRefs in it."""
        return self._codec.encode_payload(payload)

    def frames(
        self,
        kind: Kind,
        payload: Payload,
        reply_to: int = 0,
        context: ContextRecord | None = None,
        *,
        to_run: str = "",
        deadline: int = 0,
    ) -> tuple[int, list[Any]]:
        """A new message id, and the frames of the message with that header."""
        message_id = next(self._ids)
        header = Header(kind, message_id, self.name, reply_to, context, to_run, deadline)
        return message_id, [self._codec.encode_header(header), *payload.frames]

    def send_call(self, dest: str, frames: list[Any], traced: tuple[int, int]) -> Stored:
        """Queue a call; the future resolves to its entry's id once Redis stored it. Its
        entry holds only calls, so that `withdraw` takes nothing else. `traced`: its
        (context, message id)."""
        return self.transport.send(dest, frames, withdrawable=True, traced=traced)

    async def withdraw(self, dest: str, entry_id: bytes) -> bool:
        """Withdraw the calls of an entry unless `dest` took them: whether it did not."""
        return await self.transport.withdraw(dest, entry_id)

    def send(self, dest: str, record: OneWay) -> Stored:
        """Send a one-way record; the future resolves once Redis stored it."""
        traced, frames = self._one_way(record)
        return self.transport.send(dest, frames, traced=traced)

    def post(self, dest: str, record: OneWay) -> None:
        """`send`, for a record nobody waits for: a failure to store it is only logged."""
        traced, frames = self._one_way(record)
        if record.kind in _RESENT:
            self.post_frames(dest, frames, traced=traced)
        else:
            self.transport.post(dest, frames, traced)

    def _one_way(self, record: OneWay) -> tuple[tuple[int, int], list[Any]]:
        payload = self.encode(record.to_wire())
        if payload.rrefs:
            raise TypeError("RRefs cannot travel in one-way messages")
        message_id, frames = self.frames(record.kind, payload)
        return (getattr(record, "context", 0), message_id), frames

    def post_frames(
        self,
        dest: str,
        frames: list[Any],
        over: Callable[[BaseException | None], None] | None = None,
        resend_for: float | None = None,
        traced: tuple[int, int] = (0, 0),
    ) -> None:
        """Post; while `dest` has no inbox, or Redis refuses writes for want of memory,
        post again for up to `resend_for` seconds (default: the wire's): after a Redis
        restart lost every inbox,
        a live agent's comes back within a reconnect, and memory comes back as entries are
        acked. (The receiver drops a duplicate by its message id.) `over(error)` runs once
        the message is stored (None) or given up (why). `traced`: its (context, message id).
        """
        limit = self.resend_for if resend_for is None else resend_for
        self._repost(_Posting(dest, frames, over, time.monotonic() + limit, traced))

    def _repost(self, posting: _Posting) -> None:
        stored = self.transport.send(posting.dest, posting.frames, traced=posting.traced)
        stored.add_done_callback(functools.partial(self._posted, posting))

    def _posted(self, posting: _Posting, stored: Stored) -> None:
        error = None if stored.cancelled() else stored.exception()
        transient = isinstance(error, InboxMissing) or (
            isinstance(error, ReplyError) and error.code == "OOM"
        )
        if transient and time.monotonic() + posting.delay < posting.deadline:
            asyncio.get_running_loop().call_later(posting.delay, self._repost_later, posting)
            posting.delay = min(posting.delay * 2, 1.0)  # retry timer
            return
        if posting.over is not None:
            posting.over(error)
        if error is not None:
            # A receiver that left needs nobody's answer or notice: expected, not a warning.
            level = logging.DEBUG if isinstance(error, InboxMissing) else logging.WARNING
            logger.log(
                level, "event=send_failed agent=%s to=%s error=%s", self.name, posting.dest, error
            )

    def _repost_later(self, posting: _Posting) -> None:
        if self._lifecycle.running:
            self._repost(posting)
        elif posting.over is not None:
            posting.over(RpcError(f"agent {self.name!r} shut down"))

    # *** in ***

    def decode(self, message: Inbound) -> tuple[Any, list[Tensor]]:
        """A message's payload, and the tensors in it that required grad on the sender;
        `TransferLost` if a frame of it could not be fetched."""
        if message.error is not None:
            raise message.error
        return self._codec.decode_payload(message.frames[1:])

    def done(self, message: Inbound) -> None:
        self.transport.done(message)

    def dead_letter(self, message: Inbound, reason: str) -> None:
        self.transport.dead_letter(message, reason)

    def receive(self, batch: list[Inbound]) -> None:
        """Each message of a batch read, to its handler (the transport's `deliver`)."""
        for message in batch:
            try:
                header = self._codec.decode_header(message.frames[0])
                if len(message.frames) < 2:
                    raise MessageError("a message has a header and a payload")
            except CodecError as e:
                self.dead_letter(message, f"bad header: {e}")
                continue
            key = (header.sender, header.id)
            if key in self._recent:
                self.done(message)
                continue
            self._recent[key] = None
            if len(self._recent) > _RECENT:
                self._recent.popitem(last=False)
            context = 0 if header.context is None else header.context.context
            begun = time.monotonic_ns()
            try:
                handler = self._handlers.get(header.kind)
                if handler is not None:
                    handler(header, message)
                else:
                    context = self._receive_autograd(header, message)
            except Exception as e:
                # The one place a failure to handle a message ends: that message is
                # dead-lettered alone, and the rest of the batch goes on.
                logger.exception("event=handle_failed agent=%s kind=%s", self.name, header.kind)
                self.dead_letter(message, f"failed to handle {header.kind.name}: {e!r}")
            if self.spans.enabled:
                self._handled(header, message, context, begun)

    def _handled(self, header: Header, message: Inbound, context: int, begun: int) -> None:
        """The message's span (its handling; `queued_us`: how long it waited for that since
        it was read), and its context named on the span of its fetch."""
        if message.fetched is not None:
            message.fetched.context = context
        name = f"{header.kind.name} ← {header.sender}"
        queued = begun - message.read_ns if message.read_ns else 0
        end = time.monotonic_ns()
        self.spans.add(name, "message", begun, end, context, header.id, None, None, queued)

    def _receive_autograd(self, header: Header, message: Inbound) -> int:
        """Hand the record to autograd; its context (0: none, or it did not decode)."""
        try:
            payload, _ = self.decode(message)
            record = AUTOGRAD_RECORDS[header.kind].from_wire(payload)
        except CodecError as e:
            self.dead_letter(message, f"bad {header.kind.name}: {e}")
            return 0
        self.done(message)
        if self._autograd is None:
            raise RuntimeError("Wire.route was not called: autograd messages have no handler")
        self._autograd(header.sender, record)
        return getattr(record, "context", 0)
