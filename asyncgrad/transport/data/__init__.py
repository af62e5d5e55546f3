"""The data plane: frames above a size limit travel directly between agents, not through
Redis, which carries the message and a reference to them (`plane.DataPlane` composes the
parts: `reference`, `memory`, `held`, `server`, `fetch`, `protocol`)."""

from asyncgrad.transport.data.plane import (
    DEFAULT_INLINE_LIMIT,
    DataPlane,
    DataSettings,
    RefField,
)

__all__ = ["DEFAULT_INLINE_LIMIT", "DataPlane", "DataSettings", "RefField"]
