"""`asyncgrad bench`: the workloads of BENCH.md, reported like PyTorch's anchor script.

Each workload prints one JSON line (`name`, `ok`, `params`, `figures`); `--json PATH`
writes `{"machine": ..., "results": [...]}`, the shape `torch_rpc_bench.py --out` writes,
so one script can pair the two. `--scale` runs B2 and B4 at several worker counts
instead (bench/scale.py), one record per configuration, in the same shape.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from asyncgrad.bench import autograd, local, rpc, soak
from asyncgrad.bench.options import Options

Workload = Callable[[Options], dict[str, Any]]

WORKLOADS: dict[str, Workload] = {
    "B1_latency": rpc.b1_latency,
    "B2_throughput": rpc.b2_throughput,
    "B3_bandwidth": rpc.b3_bandwidth,
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


def run_jobs(
    jobs: list[tuple[str, Workload]], options: Options, json_path: Path | None = None
) -> bool:
    """Run `(record name, workload)` pairs one after another; True when all succeeded."""
    results = []
    started = time.perf_counter()
    for name, workload in jobs:
        t0 = time.perf_counter()
        try:
            record: dict[str, Any] = {"name": name, "ok": True, **workload(options)}
        except Exception as e:
            record = {"name": name, "ok": False, "error": f"{type(e).__name__}: {e}"}
            record["traceback"] = traceback.format_exc()
        record["workload_wall_s"] = time.perf_counter() - t0
        print(json.dumps({k: v for k, v in record.items() if k != "traceback"}), flush=True)
        results.append(record)
    if json_path is not None:
        doc = {
            "machine": machine_facts(),
            "quick": options.quick,
            "argv": sys.argv,
            "total_wall_s": time.perf_counter() - started,
            "results": results,
        }
        json_path.write_text(json.dumps(doc, indent=1))
    return all(r["ok"] for r in results)


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
