"""Spans gathered from several agents → one Chrome/Perfetto trace (trace-event JSON).

One process row per worker (its agent id as `pid`, its name as the row's title, rows in
id order); within it, one thread lane per kind of span (`CATEGORIES`, in that order), and
more lanes of a kind where its spans overlap without nesting (calls in flight together).
Every span is a complete event (`"ph": "X"`), placed on Redis's clock (each worker's
spans shifted by its own estimate of its offset) and counted in microseconds from the
earliest span of the trace. A message is an arrow (flow events `s` → `f`) from the span
that wrote it to Redis to the span that handled it on its receiver; the receiver's span
says how long the message took from its sender's queue to its handling (`transit_us`: the
write to Redis, its time in the stream, the read, and its wait behind the messages read
with it, `queued_us`).

`events(dumps)` takes what each agent's `Spans.dump()` gave, with its agent `id`, and
returns the list of events; `window` keeps the last steps of a trace; `save` writes it as
the file Perfetto opens (or, to a `.png` path, as a picture).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from asyncgrad.tracing.spans import CATEGORIES

__all__ = ["check_save", "events", "save", "span_events", "trace_file", "window", "workers_of"]

_ORDER = {cat: i for i, cat in enumerate(CATEGORIES)}


class _Placed:
    __slots__ = ("args", "cat", "context", "end", "message", "name", "open", "sent", "start")

    def __init__(self, wire: list[Any], offset: int, now: int) -> None:
        name, cat, start, end, context, message, sent, args = wire
        self.name, self.cat, self.context = str(name), str(cat), int(context)
        self.message, self.sent, self.args = int(message), list(sent), dict(args)
        self.open = not end
        self.start = int(start) + offset
        self.end = max(int(now if self.open else end) + offset, self.start)


def events(
    dumps: Sequence[dict[str, Any]], missing: Iterable[tuple[str, int, str]] = ()
) -> list[dict[str, Any]]:
    """The trace events of the workers' dumps (each with `id`, its agent id); `missing`:
    (name, id, why) of workers that gave none, shown as empty rows that say why."""
    placed: list[tuple[dict[str, Any], list[_Placed]]] = []
    ordered = sorted(dumps, key=lambda d: int(d["id"]))
    # A worker with no estimate of its offset yet (error -1, offset 0: no TIME sample) has
    # its spans on its bare monotonic clock (since its host booted), decades before the
    # others' (since the epoch): one such worker would stretch the whole trace over them.
    # It is placed as if dumped at the same instant as the others (the median of the
    # aligned ones' dump times, else the first dump's), off by how far apart the dumps were.
    aligned = sorted(
        int(d["now"]) + int(d["offset_ns"]) for d in ordered if int(d["error_ns"]) >= 0
    )
    reference = aligned[len(aligned) // 2] if aligned else int(ordered[0]["now"]) if ordered else 0
    for dump in ordered:
        now = int(dump["now"])
        offset = int(dump["offset_ns"]) if int(dump["error_ns"]) >= 0 else reference - now
        spans = [_Placed(wire, offset, now) for wire in dump["spans"]]
        spans.sort(key=lambda s: (s.start, -s.end))
        placed.append((dump, spans))
    starts = [s.start for _, spans in placed for s in spans]
    origin = min(starts) if starts else 0
    out: list[dict[str, Any]] = []
    # message id -> where its writer's span began (pid, lane, ts), and when (ns)
    written: dict[int, tuple[int, int, float, int]] = {}
    handled: list[tuple[int, int, int, _Placed]] = []
    for dump, spans in placed:
        pid, worker = int(dump["id"]), str(dump["worker"])
        error_us = int(dump["error_ns"]) / 1000
        clock = f"clock ±{error_us:.0f} µs" if error_us >= 0 else "clock not aligned"
        if not dump.get("enabled", True):
            clock = "tracing off"
        out += _process(pid, worker, f"{worker} ({clock})", error_us)
        lanes = _lanes(spans)
        for lane, (cat, k) in enumerate(lanes.names, start=1):
            title = cat if not k else f"{cat} {k + 1}"
            out.append(_meta("thread_name", pid, {"name": title}, lane))
            out.append(_meta("thread_sort_index", pid, {"sort_index": lane}, lane))
        for span, lane in zip(spans, lanes.of, strict=True):
            event = _complete(span, pid, lane, worker, origin)
            out.append(event)
            for message in span.sent:
                written[message] = (pid, lane, event["ts"], span.start)
            if span.message:
                handled.append((pid, lane, span.message, span))
    for pid, lane, message, span in handled:
        source = written.get(message)
        if source is None:
            continue
        flow = {"name": span.name.split(" ")[0], "cat": "message", "id": f"{message:#x}"}
        out.append({**flow, "ph": "s", "pid": source[0], "tid": source[1], "ts": source[2]})
        ts = (span.start - origin) / 1000
        out.append({**flow, "ph": "f", "bp": "e", "pid": pid, "tid": lane, "ts": ts})
    transit = {
        (pid, message): (span.start - written[message][3]) / 1000
        for pid, _, message, span in handled
        if message in written
    }
    for event in out:
        key = (event.get("pid"), event.get("args", {}).get("_message"))
        event.get("args", {}).pop("_message", None)
        if key in transit:
            event["args"]["transit_us"] = round(transit[key], 1)
    for name, pid, why in missing:
        out += _process(pid, name, f"{name} ({why})", missing=why)
    return _rows_in_order(out)


def span_events(trace: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The complete events (spans) of a trace, without its metadata and arrows."""
    return [e for e in trace if e.get("ph") == "X"]


def workers_of(trace: Iterable[dict[str, Any]]) -> dict[int, str]:
    """pid → worker name, from a trace's metadata."""
    return {
        e["pid"]: e["args"]["worker"]
        for e in trace
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }


def trace_file(trace: list[dict[str, Any]], **other: Any) -> dict[str, Any]:
    """The JSON object of a trace file (`chrome://tracing`, ui.perfetto.dev)."""
    return {"traceEvents": trace, "displayTimeUnit": "ms", "otherData": other}


def save(trace: list[dict[str, Any]], path: str | os.PathLike[str], **other: Any) -> None:
    """Write the trace to `path`: a trace-event JSON file, or a picture if it ends `.png`
    (needs matplotlib: `pip install 'asyncgrad[png]'`); `other`: the file's `otherData`."""
    if _picture(path):
        from asyncgrad.tracing import picture

        picture.draw(trace, path, title=other.get("title"))
        return
    Path(path).write_text(json.dumps(trace_file(trace, **other)))


def check_save(path: str | os.PathLike[str]) -> None:
    """Raise now what `save(path)` would for want of matplotlib (before a run, not after)."""
    if _picture(path):
        from asyncgrad.tracing import picture

        picture.require()


def _picture(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(".png")


def window(trace: list[dict[str, Any]], steps: int) -> list[dict[str, Any]]:
    """The last `steps` steps of a trace: from the start of the latest `steps` contexts
    (their "step" spans) to the end of the last, with every span and message of any worker
    that overlaps that time, counted from its start (a span begun before is cut there, and
    says so: `"clipped_us"`, how much of it is cut). A trace without steps is kept whole."""
    spans = span_events(trace)
    last = sorted((e for e in spans if e["cat"] == "step"), key=lambda e: e["ts"])[-steps:]
    if not last or steps <= 0:
        return trace
    low = min(e["ts"] for e in last)
    high = max(e["ts"] + e["dur"] for e in last)
    kept = []
    for e in spans:
        if e["ts"] < high and e["ts"] + e["dur"] > low:
            if e["ts"] < low:
                cut = low - e["ts"]
                e = {
                    **e,
                    "ts": low,
                    "dur": e["dur"] - cut,
                    "args": {**e["args"], "clipped_us": cut},
                }
            kept.append(e)
    origin = low
    lanes = {(e["pid"], e["tid"]) for e in kept}
    out = [
        e
        for e in trace
        if e.get("ph") == "M"
        and (not e["name"].startswith("thread_") or (e["pid"], e["tid"]) in lanes)
    ]
    flows = [e for e in trace if e.get("ph") in ("s", "f") and low <= e["ts"] <= high]
    ends: dict[str, set[str]] = {}
    for e in flows:
        ends.setdefault(e["id"], set()).add(e["ph"])
    for e in [*kept, *(f for f in flows if ends[f["id"]] == {"s", "f"})]:
        out.append({**e, "ts": e["ts"] - origin})
    return _rows_in_order(out)


def _rows_in_order(trace: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows sorted by when each worker's first span began (a step reads top to bottom as
    it went from worker to worker); rows without spans last, by id."""
    first: dict[int, float] = {}
    for e in trace:
        if e.get("ph") == "X":
            first[e["pid"]] = min(first.get(e["pid"], e["ts"]), e["ts"])
    pids = {e["pid"] for e in trace if "pid" in e}
    order = sorted(pids, key=lambda pid: (pid not in first, first.get(pid, 0.0), pid))
    rank = {pid: i for i, pid in enumerate(order)}
    return [
        {**e, "args": {"sort_index": rank[e["pid"]]}}
        if e.get("ph") == "M" and e.get("name") == "process_sort_index"
        else e
        for e in trace
    ]


class _Lanes:
    """Each span's lane: kinds in `CATEGORIES` order; within a kind, the first lane where
    the span nests in, or comes after, what the lane holds (a trace viewer draws a lane
    as properly nested slices)."""

    def __init__(self) -> None:
        self.names: list[tuple[str, int]] = []
        self.of: list[int] = []


def _lanes(spans: list[_Placed]) -> _Lanes:
    stacks: dict[str, list[list[int]]] = {}
    chosen: list[tuple[str, int]] = []
    for span in spans:
        lanes = stacks.setdefault(span.cat, [])
        for k, stack in enumerate(lanes):
            while stack and stack[-1] <= span.start:
                stack.pop()
            if not stack or span.end <= stack[-1]:
                stack.append(span.end)
                chosen.append((span.cat, k))
                break
        else:
            lanes.append([span.end])
            chosen.append((span.cat, len(lanes) - 1))
    result = _Lanes()
    order = sorted(stacks, key=lambda cat: (_ORDER.get(cat, len(_ORDER)), cat))
    number: dict[tuple[str, int], int] = {}
    for cat in order:
        for k in range(len(stacks[cat])):
            result.names.append((cat, k))
            number[(cat, k)] = len(result.names)
    result.of = [number[c] for c in chosen]
    return result


def _complete(span: _Placed, pid: int, lane: int, worker: str, origin: int) -> dict[str, Any]:
    args: dict[str, Any] = {"worker": worker, "context_id": span.context or None, **span.args}
    if span.message:
        args["message_id"] = f"{span.message:#x}"
        args["_message"] = span.message
    if span.open:
        args["unfinished"] = True
    return {
        "name": span.name + (" (unfinished)" if span.open else ""),
        "cat": span.cat,
        "ph": "X",
        "ts": (span.start - origin) / 1000,
        "dur": (span.end - span.start) / 1000,
        "pid": pid,
        "tid": lane,
        "args": args,
    }


def _process(
    pid: int, worker: str, title: str, error_us: float | None = None, missing: str = ""
) -> list[dict[str, Any]]:
    """A worker's row: its title, and how far its spans may be off on the common clock
    (`clock_error_us`: None when it gave none, -1 when it could not tell); `missing`:
    why it gave no spans, if it did not answer."""
    args: dict[str, Any] = {"name": title, "worker": worker, "clock_error_us": error_us}
    if missing:
        args["missing"] = missing
    return [
        _meta("process_name", pid, args),
        _meta("process_sort_index", pid, {"sort_index": pid}),
    ]


def _meta(name: str, pid: int, args: dict[str, Any], tid: int = 0) -> dict[str, Any]:
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": args}
