"""How RPC sees distributed autograd: the seam between the two layers (README, "Layout"), kept
small and visible here. The agent builds the other side (`dist_autograd.Contexts`) and
hands it to the parts that make and serve calls.
"""

from __future__ import annotations

from typing import Protocol

from asyncgrad.messages import ContextRecord
from asyncgrad.tensor import Tensor

__all__ = ["AutogradSeam"]


class AutogradSeam(Protocol):
    """`outgoing` sees every call and reply about to leave for `dest`, with the tensors in
    it that require grad, and returns the record for its header (None: nothing to record);
    `incoming` sees each record that arrives, with the tensors that required grad on the
    sender, which arrive as constants: it may make them require grad (`call`: it runs in
    the call's own context, so the context becomes current there); `unsent` hears of a
    recorded message that never reached its receiver.
    """

    def outgoing(self, dest: str, tensors: list[Tensor]) -> ContextRecord | None: ...

    def incoming(
        self, sender: str, record: ContextRecord, tensors: list[Tensor], call: bool
    ) -> None: ...

    def unsent(self, dest: str, record: ContextRecord) -> None: ...
