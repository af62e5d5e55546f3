"""The scene: a trace's events placed, without matplotlib: its bands (workers), lanes
(threads), bars and arrows (messages), in ms across and sub-rows down; what `render` draws."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from asyncgrad.tracing.spans import CATEGORIES

PAD = 0.3  # sub-rows above and below a band's lanes
_EPS_US = 1e-3  # timestamps closer than this (1 ns) are the same instant


@dataclass
class Lane:
    tid: int
    title: str
    sort: float
    rows: int = 1  # levels of nesting
    y: float = 0.0  # its top, in sub-rows from the top of the picture


@dataclass
class Band:
    pid: int
    name: str
    note: str  # the rest of the worker's title: its clock, or why it gave no spans
    sort: float
    lanes: dict[int, Lane] = field(default_factory=dict)
    spans: int = 0
    top: float = 0.0
    bottom: float = 0.0


@dataclass
class Bar:
    left: float  # ms
    right: float  # ms
    row: float  # the top of its sub-row
    cat: str
    name: str
    open: bool


@dataclass
class Scene:
    """What to draw, in ms across and sub-rows down (0: the top), matplotlib aside."""

    bands: list[Band]
    bars: list[Bar]
    arrows: list[tuple[float, float, float, float]]  # from (ms, row) to (ms, row)
    lo: float  # the window, ms
    hi: float
    rows: float  # the height, in sub-rows
    cats: list[str]
    unfinished: int
    cropped: bool


def scene(trace: Sequence[dict[str, Any]], start_us: float | None, end_us: float | None) -> Scene:
    if start_us is not None and end_us is not None and end_us <= start_us:
        raise ValueError(f"the window ends ({end_us} µs) before it starts ({start_us} µs)")
    bands: dict[int, Band] = {}
    titles: dict[tuple[int, int], tuple[str, float]] = {}
    spans: list[dict[str, Any]] = []
    flows: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}

    def band(pid: int) -> Band:
        if pid not in bands:
            bands[pid] = Band(pid, f"pid {pid}", "", float(pid))
        return bands[pid]

    for event in trace:
        kind, pid = event.get("ph"), event.get("pid")
        if not isinstance(pid, int):
            continue
        args = event.get("args") or {}
        if kind == "X":
            if _finite(event.get("ts")) and _finite(event.get("dur", 0)):
                spans.append(event)
        elif kind == "M" and event.get("name") == "process_name":
            b = band(pid)
            b.name, b.note = _split_title(str(args.get("name", "")), args.get("worker"), pid)
        elif kind == "M" and event.get("name") == "process_sort_index":
            band(pid).sort = float(args.get("sort_index", pid))
        elif kind == "M" and event.get("name") in ("thread_name", "thread_sort_index"):
            key = (pid, int(event.get("tid", 0)))
            name, sort = titles.get(key, ("", float(key[1])))
            if event["name"] == "thread_name":
                name = str(args.get("name", ""))
            else:
                sort = float(args.get("sort_index", key[1]))
            titles[key] = (name, sort)
        elif kind in ("s", "f") and "id" in event:
            pair = flows.setdefault(str(event["id"]), ([], []))
            pair[0 if kind == "s" else 1].append(event)
    if not spans:
        raise ValueError("the trace has no spans to draw (no complete events, ph 'X')")

    # The window: the spans' extent, or what was asked.
    first = min(float(e["ts"]) for e in spans)
    last = max(float(e["ts"]) + max(float(e.get("dur", 0)), 0.0) for e in spans)
    lo = first if start_us is None else float(start_us)
    hi = last + max((last - first) * 0.015, 1.0) if end_us is None else float(end_us)
    if hi <= lo:
        raise ValueError(f"no spans to draw after {lo / 1000:g} ms (the trace ends sooner)")

    # Lanes, and each span's level of nesting within its lane.
    for (pid, tid), (name, sort) in titles.items():
        band(pid).lanes[tid] = Lane(tid, name, sort)
    by_lane: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for event in spans:
        key = (int(event["pid"]), int(event.get("tid", 0)))
        by_lane.setdefault(key, []).append(event)
    depth: dict[int, int] = {}  # id(event) -> level
    for (pid, tid), lane_spans in by_lane.items():
        b = band(pid)
        lane = b.lanes.setdefault(tid, Lane(tid, str(lane_spans[0].get("cat", "")), tid))
        lane_spans.sort(key=lambda e: (float(e["ts"]), -_end(e)))
        ends: list[float] = []
        for event in lane_spans:
            ts = float(event["ts"])
            while ends and ends[-1] <= ts + _EPS_US:
                ends.pop()
            depth[id(event)] = len(ends)
            ends.append(_end(event))
            lane.rows = max(lane.rows, len(ends))

    # Rows, top to bottom.
    ordered = sorted(bands.values(), key=lambda b: (b.sort, b.pid))
    y = 0.0
    for b in ordered:
        b.top = y
        y += PAD
        in_order = sorted(b.lanes.values(), key=lambda lane: (lane.sort, lane.tid))
        b.lanes = {lane.tid: lane for lane in in_order}
        for lane in b.lanes.values():
            lane.y = y
            y += lane.rows
        if not b.lanes:
            y += 1  # an empty band: one row, that says why
        y += PAD
        b.bottom = y

    # Bars in the window, and where each span is (an arrow's ends).
    bars: list[Bar] = []
    at: dict[tuple[int, int, float], tuple[float, float]] = {}  # (pid, tid, ts) -> end, row
    cats: set[str] = set()
    unfinished = 0
    for event in spans:
        pid, tid = int(event["pid"]), int(event.get("tid", 0))
        b = bands[pid]
        row = b.lanes[tid].y + depth[id(event)]
        ts, end = float(event["ts"]), _end(event)
        where = (pid, tid, ts)
        if where not in at or at[where][1] < row:  # the innermost of those starting together
            at[where] = (end, row)
        is_open = bool((event.get("args") or {}).get("unfinished"))
        if is_open:
            end = max(end, hi)  # what a stuck step waits on runs to the right edge
        if not (ts < hi and end > lo) and not (ts == end and lo <= ts <= hi):
            continue
        cat = str(event.get("cat", ""))
        bars.append(Bar(ts / 1000, end / 1000, row, cat, str(event.get("name", "")), is_open))
        cats.add(cat)
        unfinished += is_open
        b.spans += 1
    if not bars:
        raise ValueError(f"no spans to draw between {lo / 1000:g} ms and {hi / 1000:g} ms")

    # Messages: from when Redis had it (its writer's span's end) to its handler's start.
    arrows: list[tuple[float, float, float, float]] = []
    for sources, targets in flows.values():
        for s, f in zip(sources, targets, strict=False):
            if not _finite(s.get("ts")) or not _finite(f.get("ts")):
                continue
            s_key = (int(s["pid"]), int(s.get("tid", 0)), float(s["ts"]))
            f_key = (int(f["pid"]), int(f.get("tid", 0)), float(f["ts"]))
            s_end, s_row = at.get(s_key, (s_key[2], _lane_row(bands, s_key)))
            f_row = at.get(f_key, (0.0, _lane_row(bands, f_key)))[1]
            x0 = s_end if s_end <= f_key[2] else s_key[2]
            x1 = f_key[2]
            if max(x0, x1) < lo or min(x0, x1) > hi:
                continue
            arrows.append((x0 / 1000, s_row, x1 / 1000, f_row))

    known = [c for c in CATEGORIES if c in cats]
    return Scene(
        bands=ordered,
        bars=bars,
        arrows=arrows,
        lo=lo / 1000,
        hi=hi / 1000,
        rows=y,
        cats=known + sorted(cats - set(known)),
        unfinished=unfinished,
        cropped=start_us is not None or end_us is not None,
    )


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _end(event: dict[str, Any]) -> float:
    return float(event["ts"]) + max(float(event.get("dur", 0)), 0.0)


def _lane_row(bands: dict[int, Band], key: tuple[int, int, float]) -> float:
    band = bands.get(key[0])
    lane = band.lanes.get(key[1]) if band else None
    return lane.y if lane else (band.top + PAD if band else 0.0)


def _split_title(title: str, worker: Any, pid: int) -> tuple[str, str]:
    """A worker's title, "name (note)", as its name and its note."""
    name = str(worker) if worker else title.split(" (")[0] or f"pid {pid}"
    rest = title[len(name) :].strip() if title.startswith(name) else title
    if rest.startswith("(") and rest.endswith(")"):
        rest = rest[1:-1]
    return name, rest
