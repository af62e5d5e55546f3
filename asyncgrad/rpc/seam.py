"""RPC knows distributed autograd only through `AutogradSeam`, kept small and visible here.

Each `Agent` gets its own seam from `Agent.seam_factory`, which `asyncgrad.dist_autograd`
sets on import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from asyncgrad.rpc.messages import Header
from asyncgrad.tensor import Tensor

if TYPE_CHECKING:
    from asyncgrad.rpc.agent import Agent

__all__ = ["AutogradSeam"]


class AutogradSeam(Protocol):
    """How distributed autograd sees RPC: the seam between the two layers (DESIGN.md).

    `outgoing` sees every call and reply about to leave with the tensors in it that
    require grad, and returns the record to put in its header (None: nothing to record);
    `incoming` sees each record that arrives (`call`: it runs in the call's own context);
    `unsent` hears of a recorded call that never reached its callee; `handle` gets the
    autograd message kinds; `inbox_lost` hears that Redis lost this agent's inbox (its
    messages in flight may be gone); `open_contexts` is asked, from the heartbeat's
    thread, how many contexts are open here (published for `asyncgrad status`).
    """

    def outgoing(self, agent: Agent, dest: str, tensors: list[Tensor]) -> Any: ...

    def incoming(
        self, agent: Agent, sender: str, record: Any, tensors: list[Tensor], call: bool
    ) -> None: ...

    def unsent(self, agent: Agent, dest: str, record: Any) -> None: ...

    def handle(self, agent: Agent, header: Header, payload: Any) -> None: ...

    def inbox_lost(self, agent: Agent) -> None: ...

    def open_contexts(self) -> int: ...

    def close(self) -> None: ...
