"""`asyncgrad bench`: which workloads run, in what order, and where their records go.

The workloads are docs/BENCH.md's. Each run gives one record (`name`, `ok`, `params`,
`figures`), the shape PyTorch's side gives too (bench/torch_side.py), so a script can
pair them. Where the records go:
- stdout a terminal: progress on stderr while they run, then a table (bench/report.py);
- stdout not a terminal: one JSON line per record as it ends (and, with `--against`, a
  last line with the comparison);
- `--json PATH`, either way: `{"machine", "quick", "argv", "total_wall_s", "results"}`,
  with `--against torch` also `"torch"` (its version and records) and `"comparison"`.
`--scale` runs B2 and B4 at several worker counts instead (bench/scale.py), `--soak` the
soak, chaos and fault runs (bench/soak.py), in the same shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from asyncgrad.bench import autograd, hosts, local, report, rpc, scale, soak
from asyncgrad.bench.options import TORCH_HINT, Options, Progress, check
from asyncgrad.bench.torch_side import WORKLOADS as TORCH_WORKLOADS

__all__ = ["SOAK", "WORKLOADS", "jobs", "machine_facts", "run_command", "run_jobs", "select"]

Workload = Callable[[Options], dict[str, Any]]

WORKLOADS: dict[str, Workload] = {
    "B1_latency": rpc.b1_latency,
    "B2_throughput": rpc.b2_throughput,
    "B3_bandwidth": rpc.b3_bandwidth,
    "B3x_bandwidth_hosts": hosts.b3x_bandwidth_hosts,  # asyncgrad only: PyTorch has no side
    "B4_dist_backward_chain": autograd.b4_dist_backward_chain,
    "B5_param_server": autograd.b5_param_server,
    "B6_local_autograd": local.b6_local_autograd,
}
# `--soak`: not among the above, so a plain `asyncgrad bench` never runs them.
SOAK: dict[str, Workload] = {
    "S1_soak": soak.soak,
    "S2_chaos": soak.chaos,
    "S3_faults": soak.faults,
}
TORCH_TIMEOUT_S = 900.0


def select(only: str | None, pool: dict[str, Workload] = WORKLOADS) -> list[str]:
    """Workload names of `pool` matching `--only` ("B1,B6" or full names); all when None."""
    if not only:
        return list(pool)
    wanted = {s.strip() for s in only.split(",") if s.strip()}
    chosen = [name for name in pool if name in wanted or name.split("_")[0] in wanted]
    unknown = wanted - {n for n in chosen} - {n.split("_")[0] for n in chosen}
    if unknown:
        raise ValueError(f"unknown workload(s) {sorted(unknown)}; available: {', '.join(pool)}")
    return chosen


def jobs(names: list[str]) -> list[tuple[str, Workload]]:
    """The named workloads (of WORKLOADS or SOAK) as `(record name, workload)` pairs."""
    pool = {**WORKLOADS, **SOAK}
    return [(name, pool[name]) for name in names]


def run_command(args: argparse.Namespace) -> int:
    """`asyncgrad bench` with the parsed `args`: its exit code (2: bad usage)."""
    try:
        check(args)
        if args.scale:
            chosen = scale.jobs(select(args.only or ",".join(scale.SCALED)))
        else:
            chosen = jobs(select(args.only, SOAK if args.soak else WORKLOADS))
        if args.against == "torch" and importlib.util.find_spec("torch") is None:
            raise ValueError(TORCH_HINT)
    except ValueError as e:
        print(f"asyncgrad bench: {e}", file=sys.stderr)
        return 2
    terminal = sys.stdout.isatty()
    options = Options(
        quick=args.quick,
        redis_url=args.redis,
        soak_steps=args.soak_steps,
        failure_timeout=args.failure_timeout,
        progress=Progress(interactive=terminal or sys.stderr.isatty()),
        trace=args.trace,
    )
    if args.namespace:
        options = dataclasses.replace(options, namespace=args.namespace)
    sides = ("asyncgrad", args.against) if args.against else ("asyncgrad",)
    ok = run_jobs(chosen, options, args.json, sides=sides, repeat=args.repeat, table=terminal)
    return 0 if ok else 1


def run_jobs(
    jobs: list[tuple[str, Workload]],
    options: Options,
    json_path: Path | None = None,
    sides: tuple[str, ...] = ("asyncgrad",),
    repeat: int = 1,
    table: bool = False,
) -> bool:
    """Run each `(record name, workload)` `repeat` times on each side, the sides taking
    turns (A, T, A, T, ...); True when every run succeeded.

    `table`: a table at the end on stdout, instead of a JSON line per record.
    """
    started = time.perf_counter()
    runs: list[tuple[str, dict[str, Any]]] = []
    total, count = sum(len(_sides_of(name, sides)) for name, _ in jobs) * repeat, 0
    for name, workload in jobs:
        for run in range(1, repeat + 1):
            for side in _sides_of(name, sides):
                count += 1
                which = f"{name}, {side}" if len(sides) > 1 else name
                of = f" (run {run} of {repeat})" if repeat > 1 else ""
                options.progress.step(f"bench: [{count}/{total}] {which}{of} ...")
                if side == "asyncgrad":
                    record = _run_ours(name, workload, options)
                else:
                    record = _run_torch(name, options.quick)
                if len(sides) > 1:
                    record["side"] = side
                if repeat > 1:
                    record["run"] = run
                seconds = record["workload_wall_s"]
                outcome = report.headline(record) if record["ok"] else "FAILED"
                options.progress.step(
                    f"bench: [{count}/{total}] {which}: {outcome} ({seconds:.1f} s)"
                )
                if not table:
                    # The long texts of a failure stay in the --json file.
                    shown = {k: v for k, v in record.items() if k not in ("traceback", "stderr")}
                    print(json.dumps(shown), flush=True)
                runs.append((side, record))
    compared = report.compare(runs)
    if table:
        report.render(compared, sides, Console())
    elif len(sides) > 1:
        print(json.dumps({"comparison": [c.to_json(sides) for c in compared]}), flush=True)
    if json_path is not None:
        doc: dict[str, Any] = {
            "machine": machine_facts(),
            "quick": options.quick,
            "argv": sys.argv,
            "total_wall_s": time.perf_counter() - started,
            "results": [record for side, record in runs if side == "asyncgrad"],
        }
        for other in sides[1:]:
            theirs = [record for side, record in runs if side == other]
            doc[other] = {
                "version": next((r.get(other) for r in theirs if r.get(other)), None),
                "results": theirs,
            }
        if len(sides) > 1:
            doc["comparison"] = [c.to_json(sides) for c in compared]
        json_path.write_text(json.dumps(doc, indent=1))
        options.progress.step(f"bench: wrote {json_path}")
    return all(record["ok"] for _, record in runs)


def _sides_of(name: str, sides: tuple[str, ...]) -> tuple[str, ...]:
    """The `sides` that have workload `name`: PyTorch's has B1-B6, not B3x."""
    return tuple(side for side in sides if side == "asyncgrad" or name in TORCH_WORKLOADS)


def _run_ours(name: str, workload: Workload, options: Options) -> dict[str, Any]:
    if options.trace is not None:
        options.trace.mkdir(parents=True, exist_ok=True)
        options = dataclasses.replace(options, trace=options.trace / name)
    t0 = time.perf_counter()
    try:
        record: dict[str, Any] = {"name": name, "ok": True, **workload(options)}
    except Exception as e:  # the record says it failed; the other workloads still run
        record = {"name": name, "ok": False, "error": f"{type(e).__name__}: {e}"}
        record["traceback"] = traceback.format_exc()
    record["workload_wall_s"] = time.perf_counter() - t0
    return record


def _run_torch(name: str, quick: bool) -> dict[str, Any]:
    """One run of `name` on PyTorch, in an interpreter of its own (the only one that
    imports torch, so asyncgrad's processes never carry it)."""
    t0 = time.perf_counter()
    argv = [sys.executable, "-m", "asyncgrad.bench.torch_side", name, *(["--quick"] * quick)]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=TORCH_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        error = f"PyTorch's side did not finish within {TORCH_TIMEOUT_S:.0f} s"
        return {"name": name, "ok": False, "error": error, "workload_wall_s": TORCH_TIMEOUT_S}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        said = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        return {
            "name": name,
            "ok": False,
            "error": f"PyTorch's side failed: {said[-1]}",
            "stderr": done.stderr[-4000:],
            "workload_wall_s": time.perf_counter() - t0,
        }
    record: dict[str, Any] = json.loads(lines[-1])
    return record


def machine_facts() -> dict[str, Any]:
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }
