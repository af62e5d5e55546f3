"""A parameter server: `asyncgrad worker ps --import workers.param_server`.

Exposes `ParameterServer` ("ps.ParameterServer"): an MLP that trainers run forward on by
RPC and step with a `DistributedOptimizer` (see asyncgrad/workloads/param_server.py).
"""

from asyncgrad.workloads.param_server import ParameterServer, mlp

__all__ = ["ParameterServer", "mlp"]
