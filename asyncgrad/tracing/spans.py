"""`Spans`: one agent's recent spans, in a ring of fixed size, plus the spans still open.

A span is a piece of work or of waiting on one agent: its name, its category (one of
`CATEGORIES`), start and end on the agent's monotonic clock (ns), the distributed autograd
context it belongs to (0: none), the message it handles (0: none) and the messages it sent
(their ids: a timeline draws each message as an arrow from the span that sent it to the
span that handled it), and a few arguments. Finished spans go to the ring, which drops the
oldest when full, so memory stays flat however long an agent runs; an open span (a call
waiting for its reply, a backward pass not finished) is kept aside until it ends, so that
a trace of a stuck step shows what is still waiting, and on what.

Everything runs on the event loop's thread, except `add`, which threads may call (a
`deque.append` is atomic).
"""

from __future__ import annotations

import collections
import os
import sys
import time
from types import TracebackType
from typing import Any

from asyncgrad.tracing.clock import RedisClock
from asyncgrad.tracing.cpu import RunQueue

__all__ = ["CATEGORIES", "DEFAULT_CAPACITY", "Span", "Spans", "tracing_enabled"]

# What a span is, in the order a timeline shows them within one worker.
CATEGORIES = (
    "step",  # a distributed autograd context, opened to released (on its opener)
    "call",  # an RPC made, until its reply (the caller waits)
    "serve",  # an RPC served: the function's run (forward work), until its reply leaves
    "backward",  # this worker's part of a backward pass, and each run of its local engine
    "optim",  # an optimizer step
    "message",  # a message read from the inbox, handled
    "redis",  # waiting on Redis: a write until Redis stored it
    "data",  # waiting on the data path: a large frame fetched from its sender
)
DEFAULT_CAPACITY = 20_000  # spans kept per agent (~210-270 bytes each: ~5 MB when full)
_OPEN_LIMIT = 4096  # open spans kept: only a bug leaves more than the work in flight open

_OFF = frozenset({"0", "false", "no", "off"})


def tracing_enabled(requested: bool = True) -> bool:
    """Whether an agent that asked for `requested` records: `$ASYNCGRAD_TRACE=0` turns
    recording off for every agent of the process."""
    return requested and os.environ.get("ASYNCGRAD_TRACE", "1").strip().lower() not in _OFF


class Span:
    """One span; `end` is 0 while it is open. `queued`: how long (ns) the work waited
    before it began (a message, behind those read with it), shown as `queued_us`: kept
    apart from `args`, as an int is a fraction of a dict's size."""

    __slots__ = (
        "args", "cat", "context", "end", "message", "name", "queued", "ran_queue", "sent", "start"
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        cat: str,
        start: int,
        end: int = 0,
        context: int = 0,
        message: int = 0,
        sent: list[int] | None = None,
        args: dict[str, Any] | None = None,
        queued: int = 0,
    ) -> None:
        self.name, self.cat, self.start, self.end = name, cat, start, end
        self.context, self.message, self.sent, self.args = context, message, sent, args
        self.queued = queued
        self.ran_queue: int | None = None  # the thread's run-queue wait when it began

    def to_wire(self) -> list[Any]:
        args = self.args or {}
        if self.queued:
            args = {**args, "queued_us": self.queued // 1000}
        return [
            self.name,
            self.cat,
            self.start,
            self.end,
            self.context,
            self.message,
            self.sent or [],
            args,
        ]

    def belongs_to(self, context: int) -> bool:
        if self.context == context:
            return True
        contexts = self.args.get("contexts") if self.args else None
        return contexts is not None and context in contexts

    def __repr__(self) -> str:
        return f"Span({self.name!r}, {self.cat!r}, {self.start}..{self.end}, ctx={self.context})"


class Spans:
    """Agent `worker`'s spans. Disabled (`enabled=False`), it records nothing: `begin`
    returns None, and `end(None)` and `add` do nothing."""

    def __init__(self, worker: str, enabled: bool = True, capacity: int = DEFAULT_CAPACITY) -> None:
        self.worker = worker
        self.enabled = enabled
        self.clock = RedisClock()
        self._run_queue = RunQueue()
        self._ring: collections.deque[Span] = collections.deque(maxlen=capacity)
        self._open: dict[int, Span] = {}
        self.recorded = 0  # spans finished since start (the ring keeps the latest)

    @property
    def capacity(self) -> int:
        return self._ring.maxlen or 0

    def begin(
        self,
        name: str,
        cat: str,
        context: int = 0,
        message: int = 0,
        args: dict[str, Any] | None = None,
        start: int = 0,
        cpu: bool = False,
    ) -> Span | None:
        """Open a span now (or at `start`); `end` finishes it. With `cpu`, it also says how
        long this thread waited for a core meanwhile (`cpu_wait_us`)."""
        if not self.enabled:
            return None
        # Names repeat (a kind and a peer, a function): one copy of each, not one a span.
        name = sys.intern(name)
        span = Span(name, cat, start or time.monotonic_ns(), 0, context, message, None, args)
        if cpu:
            span.ran_queue = self._run_queue.waited_ns()
        self._open[id(span)] = span
        if len(self._open) > _OPEN_LIMIT:
            del self._open[next(iter(self._open))]
        return span

    def end(self, span: Span | None, **args: Any) -> None:
        """Finish `span` now, adding `args` to its arguments."""
        if span is None or span.end:
            return
        span.end = time.monotonic_ns()
        if span.ran_queue is not None and (waited := self._run_queue.waited_ns()) is not None:
            args["cpu_wait_us"] = (waited - span.ran_queue) // 1000
        if args:
            span.args = {**span.args, **args} if span.args else args
        self._open.pop(id(span), None)
        self._ring.append(span)
        self.recorded += 1

    def ending(self, span: Span | None) -> _Ending:
        """`with spans.ending(spans.begin(...)) as span:` ends the span with the block,
        naming the exception that ended it (`error`), if one did."""
        return _Ending(self, span)

    def add(
        self,
        name: str,
        cat: str,
        start: int,
        end: int,
        context: int = 0,
        message: int = 0,
        sent: list[int] | None = None,
        args: dict[str, Any] | None = None,
        queued: int = 0,
    ) -> None:
        """Record a span that has finished already."""
        if self.enabled:
            name = sys.intern(name)
            self._ring.append(Span(name, cat, start, end, context, message, sent, args, queued))
            self.recorded += 1

    def close(self) -> None:
        """Let go of what it holds open (the run-queue counter's file)."""
        self._run_queue.close()

    def spans(self, context: int | None = None) -> list[Span]:
        """The spans kept, finished ones first, then open ones (`context`: only its own)."""
        spans = [*self._ring, *self._open.values()]
        if context is None:
            return spans
        return [s for s in spans if s.belongs_to(context)]

    def dump(self, context: int | None = None) -> dict[str, Any]:
        """What a timeline needs of this agent, as plain values (they travel by RPC):
        its spans (open ones with end 0), its clock now, and the offset to Redis's (with
        its error bound, and how many samples it was estimated from so far)."""
        offset, error = self.clock.estimate or (0, -1)  # one pair: the thread swaps it whole
        return {
            "worker": self.worker,
            "now": time.monotonic_ns(),
            "offset_ns": offset,
            "error_ns": error,
            "clock_samples": self.clock.samples,
            "recorded": self.recorded,
            "kept": len(self._ring),
            "open": len(self._open),
            "capacity": self.capacity,
            "enabled": self.enabled,
            "spans": [s.to_wire() for s in self.spans(context)],
        }


class _Ending:
    """What `Spans.ending` returns: a span's end with a block (no contextlib: calls use it)."""

    __slots__ = ("_span", "_spans")

    def __init__(self, spans: Spans, span: Span | None) -> None:
        self._spans, self._span = spans, span

    def __enter__(self) -> Span | None:
        return self._span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self._spans.end(self._span)
        else:
            self._spans.end(self._span, error=exc_type.__name__)
