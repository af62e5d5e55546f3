"""Tracing: each agent's bounded ring of spans, the timeline gathered from every live
worker (real processes, one Redis), a stuck step's trace, and `asyncgrad trace`.

The clock alignment across simulated hosts is tested in test_trace_clock.py; the picture
in test_trace_picture.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import asyncgrad as ag
from asyncgrad import dist_autograd, optim, rpc
from asyncgrad.tracing import Spans, timeline, tracing_enabled
from tests.conftest import WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
STAGE = "asyncgrad.workloads.pipeline"

Trace = list[dict[str, Any]]


def spans_of(trace: Trace) -> list[dict[str, Any]]:
    return [e for e in trace if e["ph"] == "X"]


def rows(trace: Trace) -> dict[int, dict[str, Any]]:
    """pid -> the args of its row's title (name, worker, clock_error_us)."""
    return {e["pid"]: e["args"] for e in trace if e["ph"] == "M" and e["name"] == "process_name"}


def assert_lanes_nest(trace: Trace) -> None:
    """Within each lane, spans nest or follow each other: what a trace viewer can draw."""
    lanes: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for e in spans_of(trace):
        lanes.setdefault((e["pid"], e["tid"]), []).append(e)
    for lane in lanes.values():
        lane.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[float] = []
        for e in lane:
            while stack and stack[-1] <= e["ts"]:
                stack.pop()
            end = e["ts"] + e["dur"]
            assert not stack or end <= stack[-1] + 1e-6, f"{e} overlaps its lane"
            stack.append(end)


# *** the ring, and the timeline made of rings ***


def test_the_ring_keeps_the_latest_spans_and_no_more() -> None:
    spans = Spans("w", capacity=100)
    for i in range(10_000):
        spans.add(f"s{i}", "serve", i, i + 1)
    kept = spans.spans()
    assert len(kept) == 100 and spans.recorded == 10_000
    assert [s.name for s in kept] == [f"s{i}" for i in range(9_900, 10_000)]


def test_an_open_span_is_shown_unfinished_until_it_ends() -> None:
    spans = Spans("w")
    call = spans.begin("forward → ps", "call", context=7)
    trace = timeline.events([{**spans.dump(), "id": 1}])
    (event,) = spans_of(trace)
    assert event["name"] == "forward → ps (unfinished)" and event["args"]["unfinished"]
    assert event["args"]["context_id"] == 7 and event["args"]["worker"] == "w"
    spans.end(call, error="RPCTimeout")
    (event,) = spans_of(timeline.events([{**spans.dump(), "id": 1}]))
    assert event["name"] == "forward → ps" and "unfinished" not in event["args"]
    assert event["args"]["error"] == "RPCTimeout"


def test_a_span_says_how_long_its_thread_waited_for_a_core() -> None:
    spans = Spans("w")
    span = spans.begin("backward", "backward", cpu=True)
    # Runnable threads outnumbering the cores make this one wait its turn now and then.
    busy = [threading.Thread(target=sum, args=(range(3_000_000),)) for _ in range(4)]
    for thread in busy:
        thread.start()
    for thread in busy:
        thread.join()
    spans.end(span)
    plain = spans.begin("forward → ps", "call")
    spans.end(plain)
    assert span is not None and plain is not None and plain.args is None
    if not Path("/proc/thread-self/schedstat").exists():
        pytest.skip("no schedstat: not Linux")
    assert span.args is not None and span.args["cpu_wait_us"] >= 0
    spans.close()


def test_tracing_off_records_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    off = Spans("w", enabled=False)
    off.end(off.begin("x", "call"))
    off.add("y", "redis", 1, 2)
    assert off.spans() == [] and off.recorded == 0
    assert tracing_enabled() and not tracing_enabled(False)
    for value in ("0", "off", "false"):
        monkeypatch.setenv("ASYNCGRAD_TRACE", value)
        assert not tracing_enabled()
    monkeypatch.setenv("ASYNCGRAD_TRACE", "1")
    assert tracing_enabled()


def test_lanes_nest_and_each_message_is_one_arrow_from_writer_to_handler() -> None:
    rng = random.Random(1)
    dumps = []
    for worker_id, name in enumerate(("a", "b"), start=1):
        spans = Spans(name, capacity=1000)
        for _ in range(300):
            start = rng.randrange(0, 100_000_000)
            cat = rng.choice(["call", "serve", "backward", "redis"])
            spans.add(cat, cat, start, start + rng.randrange(1, 5_000_000))
        dumps.append({**spans.dump(), "id": worker_id, "error_ns": 0})
    # `a` wrote message 99 at 1 ms; `b` handled it at 3 ms (on Redis's clock, each
    # agent's offset applied: b's monotonic clock runs 1 ms behind a's).
    dumps[0]["spans"].append(["XADD → b", "redis", 1_000_000, 1_500_000, 5, 0, [99], {}])
    dumps[1]["spans"].append(["GRAD ← a", "message", 2_000_000, 2_100_000, 5, 99, [], {}])
    dumps[1]["offset_ns"] = 1_000_000
    trace = timeline.events(dumps)
    assert_lanes_nest(trace)
    arrows = [e for e in trace if e["ph"] in ("s", "f")]
    assert [e["ph"] for e in arrows] == ["s", "f"] and len({e["id"] for e in arrows}) == 1
    start, finish = arrows
    assert (start["pid"], finish["pid"]) == (1, 2) and finish["ts"] - start["ts"] == 2000
    handled = next(e for e in spans_of(trace) if e["name"] == "GRAD ← a")
    assert handled["args"]["transit_us"] == 2000


def test_window_keeps_the_last_steps_and_what_ran_meanwhile() -> None:
    spans = Spans("driver")
    for step in range(5):
        t = step * 10_000_000
        spans.add("context", "step", t, t + 8_000_000, context=step + 1)
        spans.add("forward → ps", "call", t + 1_000_000, t + 2_000_000, context=step + 1)
    spans.add("unrelated", "serve", 0, 1_000)
    trace = timeline.window(timeline.events([{**spans.dump(), "id": 1}]), 2)
    kept = spans_of(trace)
    assert {e["args"]["context_id"] for e in kept} == {4, 5}
    assert min(e["ts"] for e in kept) == 0


# *** real agents ***


async def pipeline_step(
    driver: rpc.Agent, names: list[str]
) -> tuple[int, list[rpc.RRef[Any]], optim.DistributedOptimizer]:
    """A step through stages on `names`: forward, backward, an optimizer step."""
    stages = [
        await driver.remote(name, "pipeline.Stage", args=(8, 8, i)) for i, name in enumerate(names)
    ]
    params = [p for stage in stages for p in await stage.rpc_async().parameter_rrefs()]
    opt = optim.DistributedOptimizer(optim.SGD, params, lr=0.1)
    x = ag.tensor(np.ones((2, 8), dtype=np.float32))
    async with dist_autograd.context() as ctx:
        h = x
        for stage in stages:
            h = await stage.rpc_async().forward(h)
        await dist_autograd.backward(ctx, [h.sum()])
        await opt.step(ctx)
    return ctx, stages, opt


@pytest.mark.timeout(30)
async def test_a_distributed_step_is_traced_on_every_worker_on_one_clock(
    spawn_worker: Callable[..., WorkerProcess], redis_url: str, namespace: str
) -> None:
    names = ["stage1", "stage2"]
    for name in names:
        spawn_worker(name, STAGE)
    async with rpc.Agent("driver", redis_url, namespace) as driver:
        ctx, _, _ = await pipeline_step(driver, names)
        trace = await rpc.trace(ctx)
        whole = await driver.trace()

    # One row per worker, each titled with its name and its clock's error bound.
    titles = rows(trace)
    assert sorted(r["worker"] for r in titles.values()) == ["driver", *names]
    assert all(0 <= r["clock_error_us"] < 50_000 for r in titles.values())
    spans = spans_of(trace)
    assert spans and all(e["args"]["context_id"] == ctx for e in spans)
    kinds = {w: {e["cat"] for e in spans if e["args"]["worker"] == w} for w in ["driver", *names]}
    assert kinds["driver"] >= {"step", "call", "backward", "optim", "message", "redis"}
    for name in names:
        assert kinds[name] >= {"serve", "backward", "optim", "message", "redis"}, kinds[name]
    # Forward work: each stage served `forward`; backward: a pass and runs of its engine.
    for name in names:
        own = [e for e in spans if e["args"]["worker"] == name]
        assert any(e["name"] == "forward" and e["cat"] == "serve" for e in own)
        assert {e["name"] for e in own if e["cat"] == "backward"} >= {"backward", "graph"}
        assert any(e["name"] == "SGD step" for e in own)
    assert_lanes_nest(trace)

    # Every message is an arrow from the span that wrote it to the one that handled it;
    # on one clock the handling never comes before the write (within both clocks' error).
    error = {pid: r["clock_error_us"] for pid, r in titles.items()}
    starts = {e["id"]: e for e in trace if e["ph"] == "s"}
    finishes = [e for e in trace if e["ph"] == "f"]
    assert len(finishes) >= 2 * len(names) * 2  # at least a call, a reply, a grad per stage
    for finish in finishes:
        start = starts[finish["id"]]
        assert finish["pid"] != start["pid"]
        assert finish["ts"] >= start["ts"] - error[start["pid"]] - error[finish["pid"]], (
            start,
            finish,
        )
    # Without a context: the same step and the setup around it.
    assert len(spans_of(whole)) > len(spans)


@pytest.mark.timeout(30)
async def test_a_stuck_step_shows_what_waits_and_who_did_not_answer(
    spawn_worker: Callable[..., WorkerProcess], redis_url: str, namespace: str
) -> None:
    """At 3 a.m.: a worker is frozen mid-step. The trace comes back within its timeout,
    says which worker gave nothing and why, and shows the call still waiting on it."""
    stuck = spawn_worker("stuck", STAGE)
    async with rpc.Agent("driver", redis_url, namespace, failure_timeout=20.0) as driver:
        stage = await driver.remote("stuck", "pipeline.Stage", args=(8, 8, 0))
        x = ag.tensor(np.ones((2, 8), dtype=np.float32))
        os.kill(stuck.pid, signal.SIGSTOP)
        try:
            # It starts (and its span opens) while `trace` waits for Redis's list of workers.
            waiting = asyncio.ensure_future(stage.rpc_async().forward(x))
            started = time.monotonic()
            trace = await driver.trace(timeout=1.0)
            took = time.monotonic() - started
        finally:
            os.kill(stuck.pid, signal.SIGCONT)
        await waiting
    assert 1.0 <= took < 10.0  # its timeout, not the 20 s failure window
    (title,) = [r["name"] for r in rows(trace).values() if r["worker"] == "stuck"]
    assert title == "stuck (no answer within 1 s)"
    unfinished = [e for e in spans_of(trace) if e["args"].get("unfinished")]
    assert [e["name"] for e in unfinished] == ["forward → stuck (unfinished)"]
    assert unfinished[0]["args"]["worker"] == "driver"


async def test_an_agent_with_tracing_off_gives_an_empty_row(
    make_agent: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    quiet = await make_agent("quiet", trace=False)
    monkeypatch.setenv("ASYNCGRAD_TRACE", "0")
    silent = await make_agent("silent")
    monkeypatch.delenv("ASYNCGRAD_TRACE")
    loud = await make_agent("loud")
    for agent in (quiet, silent):
        await loud.rpc_async(agent.name, "asyncgrad.unanswered", args=("loud",))
    trace = await loud.trace()
    traced = {e["args"]["worker"] for e in spans_of(trace)}
    assert traced == {"loud"}
    assert {r["worker"] for r in rows(trace).values()} == {"quiet", "silent", "loud"}


async def test_trace_refuses_a_context_id_that_is_not_an_int(
    make_agent: Callable[..., Any],
) -> None:
    agent = await make_agent("a")
    with pytest.raises(TypeError, match="context_id"):
        await agent.trace("7")  # type: ignore[arg-type]


# *** the command ***


def asyncgrad(*args: str) -> list[str]:
    return [sys.executable, "-m", "asyncgrad", *args]


@pytest.mark.timeout(40)
async def test_the_trace_command_writes_a_trace_file_and_a_picture(
    spawn_worker: Callable[..., WorkerProcess], redis_url: str, namespace: str, tmp_path: Path
) -> None:
    spawn_worker("stage1", STAGE)
    async with rpc.Agent("driver", redis_url, namespace) as driver:
        ctx, _, _ = await pipeline_step(driver, ["stage1"])
        out, png = tmp_path / "t.json", tmp_path / "t.png"
        argv = ["trace", "--redis", redis_url, "--namespace", namespace, "--context", hex(ctx)]
        done = await asyncio.to_thread(
            subprocess.run,
            asyncgrad(*argv, "--out", str(out), "--png", str(png)),
            capture_output=True, text=True, timeout=30, cwd=ROOT,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: " in done.stdout and "ui.perfetto.dev" in done.stdout
    trace = json.loads(out.read_text())["traceEvents"]
    assert {e["args"]["worker"] for e in spans_of(trace)} == {"driver", "stage1"}
    assert all(e["args"]["context_id"] == ctx for e in spans_of(trace))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (["--context", "seven"], 2, "not a context id"),
        (["--steps", "0"], 2, "--steps"),
        ([], 1, "no live agents"),
    ],
)
def test_the_trace_command_fails_in_one_clear_line(
    redis_url: str, namespace: str, tmp_path: Path, argv: list[str], code: int, says: str
) -> None:
    done = subprocess.run(
        asyncgrad("trace", "--redis", redis_url, "--namespace", namespace, *argv),
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == code
    assert says in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "trace.json").exists()


async def test_a_large_array_shows_its_fetch_in_its_context(
    make_agent: Callable[..., Any], redis_url: str, namespace: str
) -> None:
    """Waiting on the data path: the receiver's span of the fetch names the context of
    the message whose frame it fetched, how many bytes, and by which path."""
    from tests import dist_funcs  # noqa: F401 - exposes dt.requires_grad

    await make_agent("big", inline_limit=1024)
    x = ag.tensor(np.ones(64 * 1024, dtype=np.float32), requires_grad=True)
    async with rpc.Agent("driver", redis_url, namespace, inline_limit=1024) as driver:
        async with dist_autograd.context() as ctx:
            assert await driver.rpc_async("big", "dt.requires_grad", args=(x,))
        fetches = [e for e in spans_of(await driver.trace(ctx)) if e["cat"] == "data"]
    assert [e["args"]["worker"] for e in fetches] == ["big"]
    assert fetches[0]["args"]["bytes"] >= x.data.nbytes
    assert fetches[0]["args"]["path"] in ("local", "offered", "tcp", "redis")


async def test_gathering_a_trace_inside_a_context_does_not_join_the_agents_to_it(
    make_agent: Callable[..., Any], redis_url: str, namespace: str
) -> None:
    """The built-in calls are about agents, not the step: an agent only traced is no peer
    of the context, so a backward neither waits for it nor tells it anything."""
    from tests import dist_funcs  # noqa: F401 - exposes dt.layer

    await make_agent("w")
    bystander = await make_agent("bystander")
    driver = rpc.Agent("driver", redis_url, namespace)
    async with driver, dist_autograd.context() as ctx:
        h = await driver.rpc_async("w", "dt.layer", args=(ag.tensor(np.ones((2, 4))), 0))
        await driver.trace(ctx)
        await dist_autograd.backward(ctx, [h.sum()])
        assert bystander.autograd.open_contexts() == 0


async def test_a_backward_that_fails_in_the_engine_leaves_no_span_open(
    make_agent: Callable[..., Any],
    redis_url: str,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asyncgrad.dist_autograd.nodes import SendRpcBackward
    from tests import dist_funcs  # noqa: F401 - exposes dt.layer

    def refuse(self: SendRpcBackward, grads: Any) -> Any:
        raise ValueError("a gradient that does not fit")

    await make_agent("w")
    async with rpc.Agent("driver", redis_url, namespace) as driver:
        async with dist_autograd.context() as ctx:
            h = await driver.rpc_async("w", "dt.layer", args=(ag.tensor(np.ones((2, 4))), 0))
            monkeypatch.setattr(SendRpcBackward, "check", refuse)
            with pytest.raises(ag.RemoteError, match="does not fit"):
                await dist_autograd.backward(ctx, [h.sum()])
        trace = await driver.trace(ctx)
    assert not [e for e in spans_of(trace) if e["args"].get("unfinished")]
    failed = [e for e in spans_of(trace) if e["name"] == "backward" and "error" in e["args"]]
    assert {e["args"]["worker"] for e in failed} == {"w", "driver"}
