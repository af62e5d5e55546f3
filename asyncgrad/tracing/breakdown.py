"""Where a step's time goes, per worker, in numbers: a trace summed up (`asyncgrad trace
--summary`, README's "Tracing").

For each worker, over the trace's window, the time covered by each kind of work (the
union of its spans, so nested and overlapping ones count once), divided by the number of
steps (distributed autograd contexts) the window holds:

- `serve`: calls served, from the function's start to its reply leaving (forward work);
- `backward`: runs of the local engine ("graph"), the backward's compute;
- `optim`: optimizer steps (on a parameter's owner: the update itself);
- `handling`: messages handled (decoded, dispatched) outside the three above: the cost
  of a message itself;
- `redis`: a write waiting for Redis's answer (asynchronous: the worker may do other
  work meanwhile);
- `messages`: messages handled, and `transit`: their median time from the sender's queue
  to the start of their handling (the write, the time in the stream, the read);
- `cpu_wait`: how long the worker's event loop was runnable but waited for a core, over
  its outermost spans that measure it (steps, calls, calls served, backward passes).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

from asyncgrad.tracing.timeline import span_events

__all__ = ["COLUMNS", "breakdown", "table"]

COLUMNS = ("serve", "backward", "optim", "handling", "redis", "messages", "transit", "cpu_wait")
_WORK = ("serve", "backward", "optim")

Interval = tuple[float, float]


def breakdown(trace: Iterable[dict[str, Any]]) -> tuple[int, dict[str, dict[str, float]]]:
    """(steps in the trace, worker → column → ms per step (`messages`: a count per step,
    `transit`: the median in ms)). A trace without steps counts as one."""
    spans = span_events(trace)
    # Whole steps only: one cut by a window's edge is counted by the window before it.
    steps = sum(1 for e in spans if e["cat"] == "step" and "clipped_us" not in e["args"])
    per = max(steps, 1)
    workers = sorted({e["args"]["worker"] for e in spans})
    out: dict[str, dict[str, float]] = {}
    for worker in workers:
        own = [e for e in spans if e["args"]["worker"] == worker]
        kinds: dict[str, list[Interval]] = {k: [] for k in (*_WORK, "message", "redis")}
        for e in own:
            kind = e["cat"]
            if kind == "backward" and e["name"] != "graph":
                continue  # a pass: its engine runs are the work, the rest waiting
            if kind in kinds:
                kinds[kind].append((e["ts"], e["ts"] + e["dur"]))
        work = _union([i for k in _WORK for i in kinds[k]])
        handled = _union(kinds["message"])
        row = {k: _length(_union(kinds[k])) / 1000 / per for k in _WORK}
        row["handling"] = (_length(handled) - _overlap(handled, work)) / 1000 / per
        row["redis"] = _length(_union(kinds["redis"])) / 1000 / per
        row["messages"] = len(kinds["message"]) / per
        transits = [e["args"]["transit_us"] for e in own if "transit_us" in e["args"]]
        row["transit"] = statistics.median(transits) / 1000 if transits else 0.0
        row["cpu_wait"] = _outermost_sum(own, "cpu_wait_us") / 1000 / per
        out[worker] = row
    return steps, out


def table(trace: Iterable[dict[str, Any]]) -> str:
    """The breakdown as a text table."""
    steps, rows = breakdown(trace)
    unit = f"ms per step, over {steps} steps" if steps else "ms in all (no steps in the trace)"
    header = ["worker", *COLUMNS]
    lines = [header]
    for worker, row in rows.items():
        lines.append(
            [worker, *(f"{row[c]:.2f}" if c != "messages" else f"{row[c]:.1f}" for c in COLUMNS)]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [f"{unit}; transit: median ms from a sender's queue to the handling"]
    for line in lines:
        cells = [
            line[0].ljust(widths[0]),
            *(c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)),
        ]
        text.append("  ".join(cells))
    return "\n".join(text)


def _outermost_sum(spans: list[dict[str, Any]], key: str) -> float:
    """The sum of `key` over the spans that have it and lie in no other such span."""
    total, covered_to = 0.0, float("-inf")
    for e in sorted((e for e in spans if key in e["args"]), key=lambda e: (e["ts"], -e["dur"])):
        if e["ts"] + e["dur"] <= covered_to:
            continue  # inside one counted already
        total += e["args"][key]
        covered_to = max(covered_to, e["ts"] + e["dur"])
    return total


def _union(intervals: list[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(intervals: list[Interval]) -> float:
    return sum(end - start for start, end in intervals)


def _overlap(a: list[Interval], b: list[Interval]) -> float:
    """How long two unions of intervals overlap."""
    total, j = 0.0, 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            total += max(0.0, min(end, b[k][1]) - max(start, b[k][0]))
            k += 1
    return total
