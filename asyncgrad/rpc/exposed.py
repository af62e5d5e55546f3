"""The functions and classes this process lets other workers call, by name.

Nothing else can be called remotely: a name is looked up here and nowhere else (no
imports by name, no attribute walks), so `"os:system"` names nothing unless someone
exposed it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar, overload

from asyncgrad.errors import NotExposedError

__all__ = ["expose", "is_exposed_class", "lookup", "name_of", "names"]

T = TypeVar("T")
_ATTR = "__asyncgrad_name__"
# The route table of this process: filled at import time by @expose, read by every agent.
_EXPOSED: dict[str, Any] = {}


@overload
def expose(obj: T, /) -> T: ...
@overload
def expose(*, name: str | None = None) -> Callable[[T], T]: ...


def expose(obj: Any = None, /, *, name: str | None = None) -> Any:
    """Make a function (sync or async) or a class callable by other workers.

    Its name is `name`, or `"module:qualname"`. Use as `@expose` or `@expose(name=...)`.
    """

    def register(target: Any) -> Any:
        if not callable(target):
            raise TypeError(f"only functions and classes can be exposed, not {target!r}")
        key = name or f"{target.__module__}:{target.__qualname__}"
        if not isinstance(key, str) or not key:
            raise ValueError(f"an exposed name must be a non-empty string, not {key!r}")
        _EXPOSED[key] = target
        # Builtins and the like keep no attributes; name_of falls back to module:qualname.
        with contextlib.suppress(AttributeError, TypeError):
            setattr(target, _ATTR, key)
        return target

    return register if obj is None else register(obj)


def name_of(fn: Any) -> str:
    """The wire name for `fn`: a name as given, an exposed object's name, or module:qualname."""
    if isinstance(fn, str):
        return fn
    # Its own attribute only: a subclass of an exposed class inherits the attribute but
    # is not exposed, and must not be called as its base.
    exposed = getattr(fn, "__dict__", {}).get(_ATTR)
    if isinstance(exposed, str):
        return exposed
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname:
        raise TypeError(f"cannot name {fn!r} for a remote call: pass its exposed name")
    return f"{module}:{qualname}"


def is_exposed_class(cls: type) -> bool:
    """Whether `cls` itself (not merely a base of it) was exposed."""
    name = cls.__dict__.get(_ATTR)
    return isinstance(name, str) and _EXPOSED.get(name) is cls


def names() -> list[str]:
    """Every name exposed in this process."""
    return sorted(_EXPOSED)


def lookup(name: str, worker: str = "NAME") -> Any:
    """The object exposed under `name`, or `NotExposedError` saying how to expose it on
    `worker` (the name of the agent asked)."""
    try:
        return _EXPOSED[name]
    except KeyError:
        raise NotExposedError(
            f"{name!r} is not exposed on this worker: {_how(name, worker)}"
        ) from None


def _how(name: str, worker: str) -> str:
    module, colon, _ = name.partition(":")
    if module == "__main__":
        # The caller's script runs as __main__ there and nowhere else: no worker imports it.
        return (
            "functions defined in the script being run cannot be called remotely; put them "
            "in a module both sides import, and start the worker with "
            f"`asyncgrad worker {worker} --import MODULE`"
        )
    module = module if colon and module else "MODULE"
    return (
        "decorate it with @rpc.expose in a module the worker imports "
        f"(`asyncgrad worker {worker} --import {module}`)"
    )
