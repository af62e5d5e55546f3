"""What `asyncgrad bench` shows a person: each record's headline figures, and a table of
them over runs (and over both sides with `--against torch`), medians and ratios.

Machines get the records themselves (JSON lines, `--json PATH`); this module only reads
them.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["Row", "compare", "headline", "render", "rows"]


@dataclass(frozen=True)
class Row:
    """One figure of one record: `value` a number, or a word for a check (`loss fell`).
    `higher_is_better`: None for a check or a count that is not a speed."""

    workload: str
    figure: str
    value: float | str
    higher_is_better: bool | None = None
    key: str = ""  # the record's name and figure key, for machines: B1_latency.median_us


# record name -> (label, [(figure key, label, higher is better)])
_HEADLINES: dict[str, tuple[str, list[tuple[str, str, bool]]]] = {
    "B1_latency": (
        "B1 latency, 16-float echo",
        [("median_us", "median µs", False), ("p99_us", "p99 µs", False)],
    ),
    "B2_throughput": ("B2 throughput, 256 in flight", [("calls_per_s", "calls/s", True)]),
    "B3_bandwidth": (
        "B3 bandwidth, echo",
        [
            ("GBps_1MiB", "GB/s, 1 MiB", True),
            ("GBps_64MiB", "GB/s, 64 MiB", True),
            ("redis_peak_MiB", "Redis memory peak, MiB", False),
        ],
    ),
    "B3x_bandwidth_hosts": (
        "B3x bandwidth, 2 simulated hosts",
        [
            ("GBps_1MiB", "GB/s, 1 MiB", True),
            ("GBps_64MiB", "GB/s, 64 MiB", True),
            ("raw_tcp_GBps_64MiB", "raw TCP GB/s, 64 MiB", True),
            ("vs_raw_tcp_64MiB", "÷ raw TCP, 64 MiB", True),
        ],
    ),
    "B4_dist_backward_chain": (
        "B4 backward through 4 workers",
        [("steps_per_s", "steps/s", True), ("median_ms_per_step", "median ms per step", False)],
    ),
    "B5_param_server": (
        "B5 parameter server, 2 trainers",
        [("total_steps_per_s", "steps/s", True)],
    ),
    "B6_local_autograd": (
        "B6 local MLP step",
        [
            ("steps_per_s_threads1", "steps/s, 1 thread", True),
            ("steps_per_s_default_threads", "steps/s, default threads", True),
        ],
    ),
    "B2_throughput_scale": ("B2 throughput", [("calls_per_s", "calls/s", True)]),
    "B4_dist_backward_chain_scale": ("B4 backward", [("steps_per_s", "steps/s", True)]),
}
_SOAK = {"S1_soak": "S1 soak", "S2_chaos": "S2 chaos", "S3_faults": "S3 faults"}


def rows(record: dict[str, Any]) -> list[Row]:
    """The figures of `record` worth a person's look, checks included."""
    name = record["name"]
    label = _HEADLINES.get(name, (_SOAK.get(name, name), []))[0]
    if "workers" in record.get("params", {}) and name.endswith("_scale"):
        label = f"{label}, {record['params']['workers']} workers"
    if not record.get("ok") and "figures" not in record:
        return [Row(label, "failed", str(record.get("error", "?")).splitlines()[0][:120])]
    figures = record["figures"]
    found = [
        Row(label, text, float(figures[key]), higher, f"{name}.{key}")
        for key, text, higher in _HEADLINES.get(name, (name, []))[1]
        if key in figures
    ]
    if name in _SOAK:
        found += [
            Row(label, "steps done", f"{figures['steps_done']:,} of {figures['steps']:,}"),
            Row(label, "steps/s", float(figures["total_steps_per_s"]), True),
            Row(label, "failed attempts (retried)", f"{figures['failed_attempts']:,}"),
            Row(label, "slowest step, s", float(figures["slowest_step_s"]), False),
        ]
        for fault in figures.get("faults", []):
            after = fault.get("recovered_after_s")
            text = "not held up" if after is None else f"{after:.2f} s"
            found.append(Row(label, f"back after {_fault_name(fault)}", text))
    if "grad_norm_max_rel_err_vs_local" in figures:
        error = figures["grad_norm_max_rel_err_vs_local"]
        found.append(Row(label, "gradients = a local run", "yes" if error < 1e-4 else "NO"))
    if "loss_fell" in figures:
        found.append(Row(label, "loss fell", "yes" if figures["loss_fell"] else "NO"))
    if "violations" in record:
        found.append(Row(label, "checks", "; ".join(record["violations"]) or "all held"))
    if not record.get("ok") and "error" in record:
        found.append(Row(label, "failed", str(record["error"]).splitlines()[0][:120]))
    return found


def _fault_name(fault: dict[str, Any]) -> str:
    kind, target = fault["kind"], fault.get("target") or ""
    return f"{kind} {target}".strip()


def headline(record: dict[str, Any]) -> str:
    """A record's first figure, for a progress line: `17,257 calls/s`."""
    found = rows(record)
    if not found:
        return "done"
    first = found[0]
    if isinstance(first.value, str):
        return f"{first.figure}: {first.value}"
    return f"{number(first.value)} {first.figure}"


def number(value: float) -> str:
    """Three significant digits or so, thousands separated."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


@dataclass(frozen=True)
class Compared:
    """One figure over the runs of each side: the medians, and asyncgrad's ÷ the other's."""

    workload: str
    figure: str
    higher_is_better: bool | None
    key: str
    values: dict[str, list[float | str]]

    def median(self, side: str) -> float | str | None:
        values = self.values.get(side, [])
        if not values:
            return None
        if all(isinstance(v, float) for v in values):
            return statistics.median(float(v) for v in values)
        return ", ".join(dict.fromkeys(str(v) for v in values))

    def ratio(self, side: str, other: str) -> float | None:
        a, b = self.median(side), self.median(other)
        if isinstance(a, float) and isinstance(b, float) and b != 0:
            return a / b
        return None

    def to_json(self, sides: Sequence[str]) -> dict[str, Any]:
        doc: dict[str, Any] = {"workload": self.workload, "figure": self.figure}
        if self.key:
            doc["key"] = self.key
        doc["better"] = {True: "higher", False: "lower", None: None}[self.higher_is_better]
        for side in sides:
            doc[side] = {"median": self.median(side), "runs": self.values.get(side, [])}
        if len(sides) == 2:
            doc[f"{sides[0]}_over_{sides[1]}"] = self.ratio(sides[0], sides[1])
        return doc


def compare(records: Iterable[tuple[str, dict[str, Any]]]) -> list[Compared]:
    """`(side, record)` pairs, any number of runs each, as one entry per figure."""
    table: dict[tuple[str, str], Compared] = {}
    for side, record in records:
        for row in rows(record):
            key = (row.workload, row.figure)
            if key not in table:
                table[key] = Compared(row.workload, row.figure, row.higher_is_better, row.key, {})
            table[key].values.setdefault(side, []).append(row.value)
    return list(table.values())


_SIDE_TITLES = {"asyncgrad": "asyncgrad", "torch": "PyTorch RPC"}


def render(compared: list[Compared], sides: Sequence[str], console: Console) -> None:
    """The table README's "Measured" shows: medians, the runs below them when several."""
    table = Table()
    table.add_column("workload")
    table.add_column("figure")
    table.add_column("better", no_wrap=True)
    for side in sides:
        table.add_column(_SIDE_TITLES.get(side, side), justify="right")
    if len(sides) == 2:
        table.add_column("asyncgrad ÷\nPyTorch", justify="right", no_wrap=True)
    previous = None
    for entry in compared:
        better = {True: "higher", False: "lower", None: ""}[entry.higher_is_better]
        cells = [entry.workload if entry.workload != previous else "", entry.figure, better]
        previous = entry.workload
        cells += [_cell(entry, side) for side in sides]
        if len(sides) == 2:
            ratio = entry.ratio(sides[0], sides[1])
            cells.append("" if ratio is None else f"{ratio:.2f}\N{MULTIPLICATION SIGN}")
        table.add_row(*cells)
    console.print(table)
    several = any(len(v) > 1 for entry in compared for v in entry.values.values())
    notes = ["Medians of the runs below them."] if several else []
    if len(sides) == 2:
        notes.insert(
            0,
            "asyncgrad ÷ PyTorch: above 1 favours asyncgrad where higher is better, below 1 "
            "where lower is better.",
        )
    if notes:
        console.print(" ".join(notes), highlight=False)


def _cell(entry: Compared, side: str) -> str:
    values = entry.values.get(side, [])
    median = entry.median(side)
    if median is None:
        return "—"
    if isinstance(median, str):
        return median
    text = number(median)
    if len(values) > 1:
        text += "\n(" + ", ".join(number(float(v)) for v in values) + ")"
    return text
