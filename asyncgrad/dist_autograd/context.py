"""`Context`: what one agent recorded in one distributed autograd context, and the
gradients its passes accumulated there.

Inside a context every message carries the context id; one carrying tensors that require
grad also gets a message id, a `SendRpcBackward` on the sender and a `RecvRpcBackward` on
the receiver. A context remembers the peers it reached, so a pass, a release or an abort
can follow it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from asyncgrad.graph import Array
from asyncgrad.tensor import Tensor
from asyncgrad.tracing import Span

from .nodes import RecvRpcBackward, SendRpcBackward

__all__ = ["Context"]


@dataclass(eq=False)
class Context:
    """One context as this agent sees it."""

    id: int
    peers: set[str] = field(default_factory=set)
    sends: dict[tuple[str, int], SendRpcBackward] = field(default_factory=dict)
    recvs: dict[tuple[str, int], RecvRpcBackward] = field(default_factory=dict)
    grads: dict[Tensor, Array] = field(default_factory=dict)
    touched: float = field(default_factory=time.monotonic)
    span: Span | None = None  # on the agent that opened it: its span ("step"), until released
    # The latest pass's gradients, kept until the next pass so an abort can undo them.
    _latest: tuple[int, dict[Tensor, Array]] | None = None

    def touch(self) -> None:
        self.touched = time.monotonic()

    def apply(self, pass_id: int, grads: dict[Tensor, Array]) -> None:
        """Add a finished pass's gradients; only the latest pass can still be undone."""
        self._latest = (pass_id, grads)
        self._add(grads, +1)

    def undo(self, pass_id: int) -> None:
        """Take back the gradients of `pass_id`, if it is the latest pass applied."""
        if self._latest is not None and self._latest[0] == pass_id:
            self._add(self._latest[1], -1)
            self._latest = None

    def _add(self, grads: dict[Tensor, Array], sign: int) -> None:
        for leaf, grad in grads.items():
            total = self.grads.get(leaf)
            if sign > 0:
                self.grads[leaf] = grad if total is None else total + grad
            elif total is not None:
                self.grads[leaf] = total - grad
