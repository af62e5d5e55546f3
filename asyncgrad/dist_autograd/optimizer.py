"""`DistributedOptimizer`: one local optimizer per parameter owner, stepped by context."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
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
    """Lives on an owner: its optimizer over its parameters, kept across steps."""

    def __init__(self, class_name: str, params: list[RRef[Tensor]], defaults: dict[str, Any]):
        self.params = [p.local_value() for p in params]
        self.optimizer = _optimizer_class(class_name)(self.params, **defaults)

    def step(self, context_id: int) -> None:
        ctx = current_contexts().get(context_id)
        self.optimizer.step({p: ctx.grads[p] for p in self.params if p in ctx.grads})


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
        self.class_name = (
            optimizer_class.__name__
            if optimizer_class in _OPTIMIZERS.values()
            else name_of(optimizer_class)
        )
        self.defaults = defaults
        self.by_owner: dict[str, list[RRef[Tensor]]] = {}
        for rref in params_rref:
            self.by_owner.setdefault(rref.owner, []).append(rref)
        self.id = uuid.uuid4().hex
        self._remote: dict[str, RRef[_LocalOptimizer]] = {}

    async def step(self, context_id: int) -> None:
        """One optimizer step on every owner, concurrently, with this context's gradients."""
        await asyncio.gather(*(self._step(owner, context_id) for owner in self.by_owner))

    async def _step(self, owner: str, context_id: int) -> None:
        local = self._remote.get(owner)
        if local is None:
            args = (self.class_name, self.by_owner[owner], self.defaults)
            make = Call(LOCAL_OPTIMIZER, args, make_rref=True)
            local = self._remote[owner] = await running_agent().calls.make(owner, make, None)
        await local.rpc_async().step(context_id)
