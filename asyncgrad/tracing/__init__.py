"""Tracing: what each agent did, when, for which distributed autograd context.

Every agent records spans (`Spans`) in a bounded ring, on its own monotonic clock, and
keeps an estimate of that clock's offset to Redis's (`RedisClock`), so that spans of
agents on different hosts line up. `timeline` turns the spans gathered from several agents
into Chrome/Perfetto trace events; `picture` draws them as a PNG.

This package knows nothing of Redis, RPC or autograd: the layers above record into it.
"""

from asyncgrad.tracing.clock import RedisClock
from asyncgrad.tracing.spans import CATEGORIES, Span, Spans, tracing_enabled

__all__ = ["CATEGORIES", "RedisClock", "Span", "Spans", "tracing_enabled"]
