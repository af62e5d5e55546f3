"""`asyncgrad run` and `asyncgrad demo`: a job function on its own agent, local workers too.

A job is `MODULE:FUNCTION`, called with the agent: a coroutine function (`async def`, the
usual kind: it awaits remote calls) or a plain function, which runs on the agent's event
loop (so it must not block for long). What it returns is the exit code: an int, or None
for 0.
"""

from __future__ import annotations

import importlib
import inspect
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from asyncgrad import transport
from asyncgrad.local_cluster import LocalCluster
from asyncgrad.rpc import Agent
from asyncgrad.transport.resp import RedisAddress
from asyncgrad.worker import import_modules, run_loop

__all__ = ["DEMO_WORKERS", "JobError", "parse_spawns", "resolve_job", "run_demo", "run_job"]

DEMO_WORKERS = {
    "ps": ["asyncgrad.workloads.param_server"],
    "trainer1": ["asyncgrad.workloads.demo"],
    "trainer2": ["asyncgrad.workloads.demo"],
}

Job = Callable[..., Any]


class JobError(ValueError):
    """The job named is not one (no such module or function, not callable), or it returned
    something that is not an exit code: bad usage."""


def parse_spawns(specs: Sequence[str]) -> dict[str, list[str]]:
    """`["ps=asyncgrad.workloads.param_server", "t1=a,b"]` -> `{"ps": [...], "t1": ["a", "b"]}`."""
    spawns: dict[str, list[str]] = {}
    for spec in specs:
        name, _, modules = spec.partition("=")
        if not name or not modules:
            raise JobError(f"--spawn takes NAME=MODULE[,MODULE], not {spec!r}")
        spawns[name] = [m for m in modules.split(",") if m]
    return spawns


def resolve_job(spec: str) -> Job:
    """The function `MODULE:FUNCTION` names (the working directory is importable)."""
    module, _, function = spec.partition(":")
    if not module or not function:
        raise JobError(f"expected MODULE:FUNCTION, e.g. mypackage.train:main, not {spec!r}")
    try:
        import_modules([module])
    except ImportError as e:
        cause = e.__cause__
        missing = isinstance(cause, ModuleNotFoundError) and f"{module}.".startswith(
            f"{cause.name}."
        )
        hint = " (run from the directory that holds it, or install it)" if missing else ""
        raise JobError(f"{e}{hint}") from e
    loaded = importlib.import_module(module)
    target: Any = loaded
    for part in function.split("."):
        if not hasattr(target, part):
            functions = sorted(n for n, v in vars(loaded).items() if inspect.isfunction(v))
            shown = f"; its functions: {', '.join(functions[:8])}" if functions else ""
            raise JobError(f"module {module!r} has no {function!r}{shown}")
        target = getattr(target, part)
    if not callable(target):
        raise JobError(
            f"{spec} is a {type(target).__name__}, not a function: a job is "
            "`async def FUNCTION(agent)` (or a plain function of the agent)"
        )
    return target  # type: ignore[no-any-return]


def run_job(
    job: Job,
    redis_url: str | None,
    namespace: str | None,
    name: str,
    spawns: Mapping[str, Sequence[str]],
    **job_kwargs: Any,
) -> int:
    """Start the spawned workers, run `job(agent, **job_kwargs)`, stop everything.

    The exit code is what the job returns: an int, or None for 0 (else `JobError`).
    """
    cluster = LocalCluster(spawns, redis_url)
    if namespace:
        cluster.namespace = namespace
    with cluster:

        async def main() -> Any:
            async with Agent(name, cluster.redis_url, cluster.namespace) as agent:
                result = job(agent, **job_kwargs)
                return await result if inspect.isawaitable(result) else result

        result = run_loop(main())
    if result is None:
        return 0
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    raise JobError(
        f"job {_name_of(job)} returned {type(result).__name__} {result!r:.60}: "
        "return an int (the exit code) or None"
    )


def _name_of(job: Job) -> str:
    return f"{getattr(job, '__module__', '?')}:{getattr(job, '__qualname__', '?')}"


def run_demo(
    redis_url: str | None, namespace: str | None, steps: int, trace: str | None = None
) -> int:
    """The whole main job on an embedded Redis, or on `redis_url`, where it leaves no key
    once it ends: it started every agent of its namespace (a fresh one by default).
    `trace`: where to write the trace of its last steps."""
    from asyncgrad.workloads import demo

    namespace = namespace or f"demo-{uuid.uuid4().hex[:8]}"
    code = run_job(
        demo.main, redis_url, namespace, "job", DEMO_WORKERS, steps=steps, trace_to=trace
    )
    if redis_url is not None:
        # Messages that reached a worker while it closed (releases, goodbyes) kept its
        # inbox: nobody reads them now.
        address = RedisAddress.from_url(redis_url)
        run_loop(transport.forget(address, namespace, [*DEMO_WORKERS, "job"]))
    return code
