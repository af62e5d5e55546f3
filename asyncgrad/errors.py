"""The one exception tree of asyncgrad.

    AsyncgradError
    ├── CodecError            a value cannot be encoded, or bytes cannot be decoded
    │   ├── MessageError      a message decoded, but its fields are not what its kind needs
    │   └── TransferLost      a large frame of a message could not be fetched from its sender
    ├── TransportError        Redis is unreachable or answered with an error
    │   ├── AgentNameTaken    a live agent already holds the name in its namespace
    │   ├── ConnectionLost    the connection to Redis closed or could not be made
    │   ├── ReplyError        Redis answered a command with an error (`.code`: "NOPERM", ...)
    │   └── InboxMissing      the receiver of a message has no inbox (never started, or left)
    ├── RpcError              every error a call raises says `.may_have_run`
    │   ├── RPCTimeout        also a builtin TimeoutError
    │   ├── RemoteError       the remote function raised; carries its type and traceback
    │   │   └── RRefReleased  also a LookupError: the owner freed the value (lease ran out)
    │   ├── NotExposedError   the name asked for is not exposed on the callee
    │   ├── WorkerUnavailable the call did not run and never will (not registered, withdrawn
    │   │                     before the target took it, refused by a new incarnation)
    │   └── OutcomeUnknown    the target took the call, then went silent: it may have run
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
    "OutcomeUnknown",
    "RPCTimeout",
    "RRefReleased",
    "RemoteError",
    "RpcError",
    "TransferLost",
    "TransportError",
    "WorkerUnavailable",
]


class AsyncgradError(Exception):
    """Root of every error asyncgrad raises on its own account.

    `may_have_run`: whether the call that raised it may have run on its target (README.md,
    "When things fail"); True unless the error proves that it did not.
    """

    may_have_run: bool = True

    def __init__(self, *args: object, may_have_run: bool | None = None) -> None:
        super().__init__(*args)
        if may_have_run is not None:
            self.may_have_run = may_have_run


class CodecError(AsyncgradError):
    """Bytes that are not a valid message, or a value over the size limit."""


class MessageError(CodecError):
    """A message decoded, but its fields are not what its kind requires."""


class TransferLost(CodecError):
    """A message's large frame could not be fetched from its sender (it died or stopped
    answering mid-transfer, or no longer held it): the message cannot be handled."""


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
    """The call did not run and never will: the target is not registered, the call was
    withdrawn before the target took it, or a new incarnation of the target refused it."""

    may_have_run = False


class OutcomeUnknown(RpcError):
    """The target took the call and then stopped answering (killed, frozen, partitioned):
    it may have run, or may still run."""


class RRefReleased(RemoteError, LookupError):
    """The owner freed the value: its holder was unreachable for longer than `rref_lease`.

    The call did not run."""

    may_have_run = False

    def __init__(self, message: str, *, worker: str = "") -> None:
        super().__init__("RRefReleased", message, worker=worker)


class ContextError(AsyncgradError):
    """A distributed autograd context or backward pass failed."""
