"""The one exception tree of asyncgrad.

    AsyncgradError
    ├── CodecError            a value cannot be encoded, or bytes cannot be decoded
    │   └── MessageError      a message decoded, but its fields are not what its kind needs
    ├── TransportError        Redis is unreachable or answered with an error
    │   ├── AgentNameTaken    a live agent already holds the name in its namespace
    │   ├── ConnectionLost    the connection to Redis closed or could not be made
    │   ├── ReplyError        Redis answered a command with an error (`.code`: "NOPERM", ...)
    │   └── InboxMissing      the receiver of a message has no inbox (never started, or left)
    ├── RpcError
    │   ├── RPCTimeout        also a builtin TimeoutError
    │   ├── RemoteError       the remote function raised; carries its type and traceback
    │   ├── NotExposedError   the name asked for is not exposed on the callee
    │   └── WorkerUnavailable the target is not registered or stopped heartbeating
    └── ContextError          a distributed autograd context or pass failed

`ConnectionLost` and `ReplyError` are defined beside the Redis client
(`asyncgrad.transport.resp`), `InboxMissing` beside the writer that raises it
(`asyncgrad.transport.writer`); the rest here.

A value of a type that cannot travel raises the builtin `TypeError` (as `json` does), and
autograd misuse raises `RuntimeError` (as PyTorch does): callers already expect those.
"""

from __future__ import annotations

__all__ = [
    "AgentNameTaken",
    "AsyncgradError",
    "CodecError",
    "ContextError",
    "MessageError",
    "NotExposedError",
    "RPCTimeout",
    "RemoteError",
    "RpcError",
    "TransportError",
    "WorkerUnavailable",
]


class AsyncgradError(Exception):
    """Root of every error asyncgrad raises on its own account."""


class CodecError(AsyncgradError):
    """Bytes that are not a valid message, or a value over the size limit."""


class MessageError(CodecError):
    """A message decoded, but its fields are not what its kind requires."""


class TransportError(AsyncgradError):
    """Redis could not be reached, or rejected a command."""


class AgentNameTaken(TransportError):
    """Another live agent holds this name in the namespace: an agent cannot start under it."""


class RpcError(AsyncgradError):
    """A remote call did not produce a result."""


class RPCTimeout(RpcError, TimeoutError):
    """No reply arrived within the call's timeout."""


class RemoteError(RpcError):
    """The remote side raised; `remote_type` and `remote_traceback` say what and where."""

    def __init__(
        self, remote_type: str, message: str, *, worker: str = "", remote_traceback: str = ""
    ) -> None:
        where = f" on {worker}" if worker else ""
        super().__init__(f"{remote_type}{where}: {message}")
        self.remote_type = remote_type
        self.message = message
        self.worker = worker
        self.remote_traceback = remote_traceback


class NotExposedError(RpcError):
    """A caller asked for a function or class the worker does not expose."""


class WorkerUnavailable(RpcError):
    """The target worker is not registered, or its heartbeat lapsed."""


class ContextError(AsyncgradError):
    """A distributed autograd context or backward pass failed."""
