"""The public names, pinned (README.md shows them)."""

from __future__ import annotations

import importlib
import pkgutil
import re

import asyncgrad as ag
from asyncgrad import errors


def test_top_level_all() -> None:
    assert sorted(ag.__all__) == sorted(
        [
            "AgentNameTaken",
            "AsyncgradError",
            "CodecError",
            "ContextError",
            "NotExposedError",
            "OutcomeUnknown",
            "RPCTimeout",
            "RRefReleased",
            "RemoteError",
            "RpcError",
            "Tensor",
            "TransportError",
            "WorkerUnavailable",
            "cat",
            "dist_autograd",
            "is_grad_enabled",
            "nn",
            "no_grad",
            "ones",
            "optim",
            "randn",
            "rpc",
            "stack",
            "tensor",
            "zeros",
        ]
    )
    for name in ag.__all__:
        assert getattr(ag, name) is not None


def test_nn_and_optim_names() -> None:
    for name in ["Module", "Parameter", "Linear", "Sequential", "ReLU", "Tanh", "functional"]:
        assert hasattr(ag.nn, name)
    for name in ["relu", "tanh", "sigmoid", "softmax", "log_softmax", "cross_entropy", "mse_loss"]:
        assert callable(getattr(ag.nn.functional, name))
    for name in ["SGD", "Adam", "DistributedOptimizer"]:
        assert hasattr(ag.optim, name)
    for name in [
        "Agent", "RRef", "WorkerInfo", "expose", "init", "current_agent",
        "rpc_async", "remote", "get_worker_info", "shutdown",
    ]:  # fmt: skip
        assert hasattr(ag.rpc, name)
    for name in ["context", "backward", "get_gradients"]:
        assert callable(getattr(ag.dist_autograd, name))


def test_exception_tree() -> None:
    assert issubclass(ag.RPCTimeout, TimeoutError)
    for exc in (ag.RPCTimeout, ag.RemoteError, ag.WorkerUnavailable, ag.NotExposedError):
        assert issubclass(exc, ag.RpcError)
    for exc in (ag.CodecError, ag.TransportError, ag.RpcError, ag.ContextError):
        assert issubclass(exc, ag.AsyncgradError)
    err = ag.RemoteError("ValueError", "bad", worker="ps", remote_traceback="tb")
    assert (err.remote_type, err.worker, err.remote_traceback) == ("ValueError", "ps", "tb")
    assert "ValueError on ps: bad" in str(err)


def _subclasses(cls: type) -> set[type]:
    return {c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))}


def test_the_drawn_exception_tree_names_every_error() -> None:
    # Every module imported, so that every subclass defined anywhere exists.
    for module in pkgutil.walk_packages(ag.__path__, "asyncgrad."):
        if module.name != "asyncgrad.__main__":
            importlib.import_module(module.name)
    drawn = errors.__doc__ or ""
    ours = {c for c in _subclasses(ag.AsyncgradError) if c.__module__.startswith("asyncgrad.")}
    assert {"MessageError", "ConnectionLost", "ReplyError", "InboxMissing"} <= {
        c.__name__ for c in ours
    }
    for cls in ours:
        assert re.search(rf"── {cls.__name__}\b", drawn), f"errors.py does not draw {cls}"
