"""`asyncgrad.tracing.picture`: a trace drawn as a PNG.

The traces are built the way a real one is: hand-made `Spans.dump()`s (each with its agent
`id`) through `timeline.events`. `pipeline_step()` is one training step of a 4-stage
pipeline and its driver, the trace of the README's figure.
"""

from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from asyncgrad.tracing import timeline
from asyncgrad.tracing.picture import PictureUnavailable, draw
from asyncgrad.tracing.timeline import events

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib (the png extra)"
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EPOCH_NS = 1_767_225_600_000_000_000  # Redis's clock at the trace's start


class Agent:
    """One agent's spans, written in µs on Redis's clock, dumped on the agent's own."""

    def __init__(self, agent_id: int, worker: str, error_ns: int = 12_000) -> None:
        self.id, self.worker, self.error_ns = agent_id, worker, error_ns
        # each agent's monotonic clock started at its own time
        self.offset_ns = EPOCH_NS - 1_000_000_000 * (agent_id * 1000 + 37)
        self.spans: list[list[Any]] = []

    def span(
        self,
        name: str,
        cat: str,
        start_us: float,
        end_us: float | None,
        *,
        context: int = 7,
        message: int = 0,
        sent: tuple[int, ...] = (),
        **args: Any,
    ) -> None:
        start = round(start_us * 1000) + EPOCH_NS - self.offset_ns
        end = 0 if end_us is None else round(end_us * 1000) + EPOCH_NS - self.offset_ns
        self.spans.append([name, cat, start, end, context, message, list(sent), args])

    def dump(self, now_us: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "worker": self.worker,
            "now": round(now_us * 1000) + EPOCH_NS - self.offset_ns,
            "offset_ns": self.offset_ns,
            "error_ns": self.error_ns,
            "recorded": len(self.spans),
            "capacity": 20_000,
            "enabled": True,
            "spans": self.spans,
        }


def pipeline_step(stuck: bool = False) -> list[dict[str, Any]]:
    """The trace of one step: the driver calls stage0..stage3 in turn (forward), then the
    gradients flow back stage3..stage0 (backward), then each stage steps its optimizer.
    `stuck`: stage2's backward never ends (it waits on a fetch from stage3), and stage1
    does not answer the trace's request."""
    driver = Agent(1, "driver", error_ns=3_000)
    stages = [Agent(2 + i, f"stage{i}", error_ns=9_000 + 4_000 * i) for i in range(4)]
    message = iter(range(0x1000, 0x2000))
    t = 40.0
    driver_step_start = t

    def send(agent: Agent, name: str, at: float, took: float = 140.0) -> tuple[int, float]:
        """`agent` writes a message to Redis at `at`: its id, and when Redis had it."""
        m = next(message)
        agent.span(f"XADD {name}", "redis", at, at + took, sent=(m,))
        return m, at + took

    def handle(agent: Agent, name: str, m: int, at: float, took: float = 25.0) -> float:
        agent.span(name, "message", at, at + took, message=m)
        return at + took

    # forward: each stage's output is the next one's input, through the driver
    works = [2300.0, 3100.0, 2700.0, 1900.0]
    for i, (stage, work) in enumerate(zip(stages, works, strict=True)):
        call_start = t
        request, stored = send(driver, f"CALL stage{i}", t + 15)
        begun = handle(stage, "CALL stage_forward", request, stored + 60)
        serve_start = begun
        if i == 2:  # a large activation, fetched on the data path
            stage.span("fetch 4.2 MB from driver", "data", begun + 5, begun + 480)
            begun += 480
        reply, stored = send(stage, "REPLY driver", begun + work, took=170)
        stage.span("serve stage_forward", "serve", serve_start, stored + 8)
        done = handle(driver, "REPLY from " + stage.worker, reply, stored + 45, took=30)
        driver.span(f"call stage{i}.stage_forward", "call", call_start, done + 5)
        t = done + 40

    # backward: the loss's gradient to stage3, then from stage to stage
    backward_start = t
    driver.span("engine run", "backward", t + 10, t + 260)
    grad, stored = send(driver, "GRAD stage3", t + 265)
    backward_ends: dict[int, float] = {}
    for i in reversed(range(4)):
        stage = stages[i]
        begun = handle(
            stage, "GRAD from " + ("driver" if i == 3 else f"stage{i + 1}"), grad, stored + 50
        )
        work = [1700.0, 2900.0, 2400.0, 2100.0][i]
        if stuck and i == 2:
            stage.span("backward ctx 7", "backward", begun, None)
            stage.span("fetch 8.0 MB from stage3", "data", begun + 30, None)
            break
        stage.span("engine run", "backward", begun + 5, begun + 5 + work)
        if i > 0:
            grad, stored = send(stage, f"GRAD stage{i - 1}", begun + 10 + work)
            end = stored + 5
        else:
            grad, stored = send(stage, "DONE driver", begun + 10 + work, took=120)
            end = stored + 5
        stage.span("backward ctx 7", "backward", begun, end)
        backward_ends[i] = end
    if stuck:
        driver.span("backward ctx 7", "backward", backward_start, None)
        driver.span("step ctx 7", "step", driver_step_start, None)
        now = t + 9000
        dumps = [driver.dump(now)] + [s.dump(now) for s in stages if s.worker != "stage1"]
        return events(dumps, missing=[("stage1", 3, "did not answer: timed out after 2.0 s")])

    done = handle(driver, "DONE from stage0", grad, stored + 40)
    driver.span("backward ctx 7", "backward", backward_start, done + 10)
    t = done + 30

    # optimizer: one call per stage, all in flight together
    optim_start = t
    replies = []
    for i, stage in enumerate(stages):
        request, stored = send(driver, f"CALL stage{i}", t + 5 + 150 * i)
        begun = handle(stage, "CALL optimizer_step", request, stored + 55)
        work = [600.0, 900.0, 750.0, 500.0][i]
        stage.span("optim SGD.step", "optim", begun + 3, begun + 3 + work)
        reply, stored = send(stage, "REPLY driver", begun + 8 + work, took=150)
        replies.append((stored, reply, i, request))
    ends: list[float] = []
    for stored, reply, i, _ in sorted(replies):
        at = max([stored + 40, *ends])
        ends.append(handle(driver, f"REPLY from stage{i}", reply, at, took=25))
        driver.span(
            f"call stage{i}.optimizer_step", "call", optim_start + 5 + 150 * i, ends[-1] + 3
        )
    t = max(ends) + 30
    driver.span("step ctx 7", "step", driver_step_start, t)
    return events([driver.dump(t + 50)] + [s.dump(t + 50) for s in stages])


def many_spans(n: int, workers: int = 8) -> list[dict[str, Any]]:
    """`n` spans over `workers` agents, busy with short calls, serves and Redis writes."""
    agents = [Agent(i + 1, f"w{i}") for i in range(workers)]
    cats = ["call", "serve", "redis", "message", "backward"]
    sent = iter(range(1, n + 1))
    for k in range(n):
        agent = agents[k % workers]
        start = (k // workers) * 37.0 + (k % 5) * 3
        m = next(sent)
        cat = cats[k % len(cats)]
        if cat == "redis":
            agent.span(f"XADD w{k % workers}", cat, start, start + 20 + k % 50, sent=(m,))
        elif cat == "message":
            agent.span("GRAD from w1", cat, start, start + 5 + k % 7, message=m - 1)
        else:
            agent.span(f"{cat} {k}", cat, start, start + 5 + (k * 7919) % 400)
    end = (n // workers) * 37.0 + 1000
    return events([a.dump(end) for a in agents])


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR"
    ihdr = data[16 : 16 + length]
    assert zlib.crc32(kind + ihdr) == struct.unpack(">I", data[16 + length : 20 + length])[0]
    width, height = struct.unpack(">II", ihdr[:8])
    return width, height


@needs_matplotlib
def test_a_pipeline_step_is_drawn(tmp_path: Path) -> None:
    path = tmp_path / "step.png"
    draw(pipeline_step(), path, title="one training step")
    width, height = png_size(path)
    assert 1600 <= width <= 2000  # ~12 in at ~150 dpi
    assert 600 <= height <= 2700
    assert path.stat().st_size > 20_000  # something was drawn


@needs_matplotlib
def test_the_same_trace_gives_the_same_bytes(tmp_path: Path) -> None:
    trace = pipeline_step()
    draw(trace, tmp_path / "a.png")
    draw(trace, str(tmp_path / "b.png"))
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


@needs_matplotlib
def test_a_stuck_step_and_a_worker_that_did_not_answer(tmp_path: Path) -> None:
    trace = pipeline_step(stuck=True)
    assert any(e.get("args", {}).get("unfinished") for e in trace)
    assert not any(e["pid"] == 3 for e in trace if e["ph"] == "X")  # stage1: metadata only
    path = tmp_path / "stuck.png"
    draw(trace, path)
    assert png_size(path)[0] > 1000


@needs_matplotlib
def test_a_window_crops(tmp_path: Path) -> None:
    trace = pipeline_step()
    whole, window = tmp_path / "whole.png", tmp_path / "window.png"
    draw(trace, whole)
    draw(trace, window, start_us=9_000, end_us=14_000)  # the start of the backward pass
    assert png_size(window) == png_size(whole)  # same rows, same size
    assert window.read_bytes() != whole.read_bytes()
    only_start = tmp_path / "start.png"
    draw(trace, only_start, start_us=20_000)
    assert png_size(only_start)[0] > 1000


def test_a_window_without_spans_is_an_error(tmp_path: Path) -> None:
    trace = pipeline_step()
    with pytest.raises(ValueError, match="no spans"):
        draw(trace, tmp_path / "late.png", start_us=10_000_000)
    with pytest.raises(ValueError, match="before"):
        draw(trace, tmp_path / "backwards.png", start_us=2_000, end_us=1_000)
    assert not list(tmp_path.iterdir())


def test_an_empty_trace_is_an_error_not_a_blank_picture(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no spans"):
        draw([], tmp_path / "empty.png")
    only_missing = events([], missing=[("w0", 1, "did not answer")])
    with pytest.raises(ValueError, match="no spans"):
        draw(only_missing, tmp_path / "missing.png")
    assert not list(tmp_path.iterdir())


@needs_matplotlib
def test_instant_and_open_spans(tmp_path: Path) -> None:
    agent = Agent(1, "w0")
    agent.span("long", "call", 0, 50_000)
    agent.span("instant", "redis", 10_000, 10_000)  # zero duration
    agent.span("waiting", "call", 20_000, None)
    agent.span("inner", "call", 20_100, 20_200)  # nested in the open one
    path = tmp_path / "w0.png"
    draw(events([agent.dump(30_000)]), path)
    assert png_size(path)[0] > 1000


def test_a_worker_without_a_clock_estimate_stays_beside_the_others() -> None:
    # Before its first TIME sample an agent dumps offset 0, error -1: its spans are on its
    # bare monotonic clock, decades from the others'. They stay within the trace.
    aligned, fresh = Agent(1, "aligned"), Agent(2, "fresh", error_ns=-1)
    aligned.span("x", "call", 0, 1000)
    fresh.span("y", "call", 500, 1000)
    dumps = [aligned.dump(2000), {**fresh.dump(2000), "offset_ns": 0}]  # dumped together
    spans = {e["pid"]: e for e in events(dumps) if e["ph"] == "X"}
    assert (spans[1]["ts"], spans[1]["dur"]) == (0.0, 1000.0)
    assert (spans[2]["ts"], spans[2]["dur"]) == (500.0, 500.0)
    titles = [e["args"]["name"] for e in events(dumps) if e.get("name") == "process_name"]
    assert titles == ["aligned (clock ±12 µs)", "fresh (clock not aligned)"]


def test_importing_the_module_does_not_import_matplotlib() -> None:
    code = "import sys, asyncgrad.tracing.picture; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@needs_matplotlib
def test_drawing_leaves_matplotlib_as_it_found_it(tmp_path: Path) -> None:
    import matplotlib

    pyplot_before = "matplotlib.pyplot" in sys.modules
    with matplotlib.rc_context({"font.size": 13.0, "hatch.color": "blue"}):
        draw(pipeline_step(), tmp_path / "step.png")
        assert matplotlib.rcParams["font.size"] == 13.0
        assert matplotlib.rcParams["hatch.color"] == "blue"
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_before  # no backend chosen


def test_without_matplotlib_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace = pipeline_step()
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PictureUnavailable, match=r"pip install 'asyncgrad\[png\]'") as raised:
        draw(trace, tmp_path / "step.png")
    assert "\n" not in str(raised.value)
    assert isinstance(raised.value, RuntimeError)
    assert not list(tmp_path.iterdir())
    # What `demo --trace X.png` and `trace --png` ask before any work: the same refusal.
    with pytest.raises(PictureUnavailable, match=r"pip install 'asyncgrad\[png\]'"):
        timeline.check_save(tmp_path / "step.png")
    timeline.check_save(tmp_path / "step.json")  # a trace file needs nothing more


@needs_matplotlib
@pytest.mark.timeout(60)
def test_twenty_thousand_spans_draw_in_a_few_seconds(tmp_path: Path) -> None:
    trace = many_spans(20_000)
    assert sum(e["ph"] == "X" for e in trace) == 20_000
    draw(trace[:50], tmp_path / "warm.png")  # matplotlib's import and font cache
    began = time.perf_counter()
    draw(trace, tmp_path / "many.png")
    took = time.perf_counter() - began
    assert png_size(tmp_path / "many.png")[0] > 1000
    assert took < 10.0, f"{took:.2f} s"  # ~1 s on a quiet 2-core VM: linear, not quadratic
