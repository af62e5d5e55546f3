"""The two ends of an autograd edge that crosses the network.

`SendRpcBackward` sits on the sender, over the tensors a message carried: the gradient
message that comes back for it is its input. `RecvRpcBackward` sits on the receiver, as
the `grad_fn` of the tensors it received (output `i` for tensor `i`): it `exits` the
local graph, so the engine hands what reaches it to the pass, which ships it to the sender.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from asyncgrad.graph import Array, Node
from asyncgrad.tensor import Tensor

__all__ = ["RecvRpcBackward", "SendRpcBackward"]


class SendRpcBackward(Node):
    """The sender's record of message `message_id` to `peer`; its edges lead to the tensors."""

    def __init__(self, peer: str, message_id: int, tensors: Sequence[Tensor]) -> None:
        self.peer, self.message_id = peer, message_id
        self.edges = tuple(t.edge for t in tensors)
        self.meta = tuple((t.shape, t.dtype) for t in tensors)

    def backward_edges(self, grad: Any) -> Sequence[Array | None]:
        grads: list[Array | None] = grad
        return grads

    def check(self, grads: Any) -> list[Array | None]:
        """The gradients a peer sent, if they fit this message's tensors; else ValueError."""
        if not isinstance(grads, tuple | list) or len(grads) != len(self.meta):
            raise ValueError(f"{self.name}: expected {len(self.meta)} gradients")
        checked: list[Array | None] = []
        for g, (shape, dtype) in zip(grads, self.meta, strict=True):
            if g is not None and (not isinstance(g, np.ndarray) or g.shape != shape):
                raise ValueError(f"{self.name}: a gradient does not match shape {shape}")
            checked.append(None if g is None else g.astype(dtype, copy=False))
        return checked


class RecvRpcBackward(Node):
    """The receiver's record of message `message_id` from `peer`, shared by its tensors."""

    exits = True

    def __init__(self, peer: str, message_id: int, count: int) -> None:
        self.peer, self.message_id = peer, message_id
        self.num_outputs = count

    def no_exit(self) -> Exception:
        # A local backward (`loss.backward()`, `gradients`) reached a tensor received in
        # a context: its gradient belongs to another worker, which only a pass can ship.
        return RuntimeError(
            f"this graph crosses workers: it holds a tensor received from {self.peer!r} "
            "in a dist_autograd context, so loss.backward() cannot run through it; call "
            "`await dist_autograd.backward(context_id, [loss])` inside that context"
        )
