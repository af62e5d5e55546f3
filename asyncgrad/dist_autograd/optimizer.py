"""`DistributedOptimizer`: one local optimizer per parameter owner, stepped by context."""

from __future__ import annotations

import asyncio
import collections
import inspect
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from asyncgrad import optimizers as optim
from asyncgrad.messages import Call
from asyncgrad.rpc.current import running_agent
from asyncgrad.rpc.exposed import expose, lookup, name_of
from asyncgrad.rpc.rref import RRef
from asyncgrad.tensor import Tensor

from .functions import current_contexts

__all__ = ["DistributedOptimizer"]

_OPTIMIZERS = {cls.__name__: cls for cls in (optim.SGD, optim.Adam)}
_REMEMBERED = 100_000  # contexts whose step is remembered (a retry comes within seconds)


def _optimizer_class(name: str) -> type[optim.Optimizer]:
    """asyncgrad's optimizers by name, or an exposed Optimizer subclass: nothing else runs."""
    cls = _OPTIMIZERS.get(name) or lookup(name)
    if not (isinstance(cls, type) and issubclass(cls, optim.Optimizer)):
        raise TypeError(f"{name!r} is not an optimizer class")
    return cls


# Every worker exposes it (SECURITY.md): the owner's side of a DistributedOptimizer.
LOCAL_OPTIMIZER = "asyncgrad.dist_optim.Local"


@expose(name=LOCAL_OPTIMIZER)
class _LocalOptimizer:
    """Lives on an owner: its optimizer over its parameters, kept across steps.

    A step applies at most once per context: a caller that lost the answer
    (`OutcomeUnknown`, `RPCTimeout`) asks again, and finds it done.
    """

    def __init__(self, class_name: str, params: list[RRef[Tensor]], defaults: dict[str, Any]):
        self.params = [p.local_value() for p in params]
        self.optimizer = _optimizer_class(class_name)(self.params, **defaults)
        self._applied: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.steps = 0

    def step(self, context_id: int) -> bool:
        """Apply the context's gradients unless that was done; whether it is done now."""
        if context_id in self._applied:
            return False
        contexts = current_contexts()
        ctx = contexts.get(context_id)
        name, args = f"{type(self.optimizer).__name__} step", {"params": len(self.params)}
        with contexts.spans.ending(contexts.spans.begin(name, "optim", context_id, args=args)):
            self.optimizer.step({p: ctx.grads[p] for p in self.params if p in ctx.grads})
        self._applied[context_id] = None
        if len(self._applied) > _REMEMBERED:
            self._applied.popitem(last=False)
        self.steps += 1
        return True

    def applied_steps(self) -> int:
        """How many steps this optimizer applied (each context once)."""
        return self.steps


_HOW = (
    "wrap local parameters as `[rpc.RRef(p) for p in model.parameters()]`, or get a "
    "remote model's from a method of it that returns them, as `await "
    "ps.rpc_async().parameter_rrefs()` does in README's example"
)


def _parameter_rrefs(params_rref: Any) -> list[RRef[Tensor]]:
    """`params_rref` as a list, if it is a non-empty collection of RRefs; else what to do."""
    if inspect.isawaitable(params_rref):
        raise TypeError(
            f"params_rref is {type(params_rref).__name__!r}, not a list of parameter RRefs: "
            "a missing `await`?"
        )
    if isinstance(params_rref, RRef | Tensor | str | bytes) or not isinstance(
        params_rref, Iterable
    ):
        raise TypeError(
            "DistributedOptimizer wants a list of parameter RRefs, not "
            f"{type(params_rref).__name__!r}: {_HOW}"
        )
    rrefs = list(params_rref)
    if not rrefs:
        raise ValueError("DistributedOptimizer got an empty list of parameter RRefs")
    for i, rref in enumerate(rrefs):
        if not isinstance(rref, RRef):
            raise TypeError(
                f"DistributedOptimizer wants parameter RRefs, but params_rref[{i}] is a "
                f"{type(rref).__name__}: {_HOW}"
            )
    return rrefs


class DistributedOptimizer:
    """`await opt.step(context_id)` steps, on every owner of a parameter RRef, one optimizer
    of `optimizer_class` over the gradients that context holds there.

    Each owner keeps its optimizer across steps, so momentum and Adam state persist.

        >>> opt = DistributedOptimizer(optim.SGD, param_rrefs, lr=0.05)
        >>> async with dist_autograd.context() as ctx:
        ...     ...
        ...     await opt.step(ctx)
    """

    def __init__(
        self,
        optimizer_class: type[optim.Optimizer],
        params_rref: Sequence[RRef[Tensor]],
        **defaults: Any,
    ) -> None:
        rrefs = _parameter_rrefs(params_rref)
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, optim.Optimizer)):
            raise TypeError(
                "DistributedOptimizer(optimizer_class, ...) wants an optimizer class such as "
                f"optim.SGD, not {optimizer_class!r:.60}"
            )
        self.class_name = (
            optimizer_class.__name__
            if optimizer_class in _OPTIMIZERS.values()
            else name_of(optimizer_class)
        )
        self.defaults = defaults
        self.by_owner: dict[str, list[RRef[Tensor]]] = {}
        for rref in rrefs:
            self.by_owner.setdefault(rref.owner, []).append(rref)
        self.id = uuid.uuid4().hex
        # The owner side of each owner, once made (`torch.distributed.optim` has this too).
        self.remote_optimizers: dict[str, RRef[_LocalOptimizer]] = {}

    async def step(self, context_id: int) -> None:
        """One optimizer step on every owner, concurrently, with this context's gradients.

        It applies at most once per context and owner: after `OutcomeUnknown` or
        `RPCTimeout`, call it again with the same context to complete it where it is
        missing (owners that applied it already do nothing)."""
        spans = current_contexts().spans
        args = {"owners": len(self.by_owner)}
        with spans.ending(spans.begin("optimizer step", "optim", context_id, args=args)):
            await asyncio.gather(*(self._step(owner, context_id) for owner in self.by_owner))

    async def _step(self, owner: str, context_id: int) -> None:
        local = self.remote_optimizers.get(owner)
        if local is None:
            args = (self.class_name, self.by_owner[owner], self.defaults)
            make = Call(LOCAL_OPTIMIZER, args, make_rref=True)
            local = self.remote_optimizers[owner] = await running_agent().calls.make(
                owner, make, None
            )
        await local.rpc_async().step(context_id)
