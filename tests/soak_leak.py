"""A parameter server that leaks: it keeps every input it is sent (about 200 KB a step).

Imported by the `ps` worker of tests/test_soak.py after asyncgrad.workloads.param_server, to
show that the soak's RSS check fails on a real leak.
"""

from __future__ import annotations

from asyncgrad.tensor import Tensor
from asyncgrad.workloads.param_server import ParameterServer

KEPT: list[Tensor] = []
_forward = ParameterServer.forward


def _forward_keeping(self: ParameterServer, x: Tensor) -> Tensor:
    KEPT.append(x)
    return _forward(self, x)


ParameterServer.forward = _forward_keeping  # type: ignore[method-assign]
