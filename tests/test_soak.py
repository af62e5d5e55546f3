"""The soak and the chaos run of `asyncgrad bench --soak`, in a short form CI runs.

B5's job (a parameter server and two trainers as `asyncgrad worker` processes) on a Redis
of its own (the chaos run restarts it; the soak measures its memory, which a shared Redis
would blur). `ASYNCGRAD_SOAK_STEPS=10000 pytest -m slow tests/test_soak.py -s` runs the
long form and prints the figures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from asyncgrad.bench.soak import TRAINERS, WORKERS, soak_job
from asyncgrad.cli import main

STEPS = int(os.environ.get("ASYNCGRAD_SOAK_STEPS", "600"))
MiB = 1 << 20
# Errors a step may see while a worker or Redis is away, each retried (workers/soak.py).
CLEAR = (
    "WorkerUnavailable",
    "OutcomeUnknown",
    "TransportError",
    "RPCTimeout",
    "ContextError",
    "RemoteError",
)


def bench_soak(only: str, tmp_path: Path) -> dict[str, Any]:
    """`asyncgrad bench --soak --only ONLY`: its record, as the JSON file has it."""
    out = tmp_path / "soak.json"
    argv = ["bench", "--soak", "--only", only, "--soak-steps", str(STEPS), "--json", str(out)]
    code = main(argv)
    (record,) = json.loads(out.read_text())["results"]
    print(json.dumps(record))
    assert code == (0 if record["ok"] else 1)
    return dict(record)


@pytest.mark.slow
@pytest.mark.timeout(180 + STEPS // 10)
def test_soak_leaves_redis_and_the_workers_as_it_found_them(tmp_path: Path) -> None:
    record = bench_soak("S1", tmp_path)
    figures = record["figures"]
    assert record["name"] == "S1_soak"
    assert record["violations"] == []
    assert figures["steps_done"] == STEPS
    assert figures["failed_attempts"] == 0
    assert abs(figures["redis_used_memory_delta_bytes"]) <= MiB
    assert set(figures["rss_growth_mib"]) == {"ps", *TRAINERS}
    assert all(growth < 20 for growth in figures["rss_growth_mib"].values())
    # Tracing was on: every worker recorded spans, and at rest none is left open.
    spans = figures["spans"]
    assert set(spans) >= {"ps", *TRAINERS}
    assert all(spans[w]["recorded"] > 0 and spans[w]["open"] == 0 for w in ("ps", *TRAINERS))
    assert figures["loss_fell"]


@pytest.mark.slow
@pytest.mark.timeout(180 + STEPS // 10)
def test_chaos_every_step_finishes_after_a_kill_and_a_redis_restart(tmp_path: Path) -> None:
    record = bench_soak("S2", tmp_path)
    figures = record["figures"]
    assert record["name"] == "S2_chaos"
    assert record["violations"] == []
    assert figures["steps_done"] == STEPS
    assert [(f["kind"], f["target"]) for f in figures["faults"]] == [("kill", "ps"), ("redis", "")]
    # The parameter server's model was replaced: both trainers saw it (a stale RRef).
    assert figures["retried_steps"] >= 2
    assert all(kind.startswith(CLEAR) for kind in figures["errors"]), figures["errors"]
    for fault in figures["faults"]:
        # Back well within one step timeout (10 s): nothing waited for a lost message.
        assert fault["recovered_after_s"] is not None
        assert fault["recovered_after_s"] < 10, fault


@pytest.mark.slow
@pytest.mark.timeout(180 + STEPS // 10)
def test_faults_free_nothing_and_apply_no_step_twice(tmp_path: Path) -> None:
    # S3: each trainer's and the server's 10 s freeze, a write pause, DEBUG SLEEP, a full
    # Redis, garbage in every inbox. Every step finishes; the soak's checks (its
    # violations) hold the steps applied to the steps that succeeded.
    record = bench_soak("S3", tmp_path)
    figures = record["figures"]
    assert record["name"] == "S3_faults"
    assert record["violations"] == []
    assert figures["steps_done"] == STEPS
    kinds = ["stop", "stop", "pause", "sleep", "oom", "garbage"]
    assert [f["kind"] for f in figures["faults"]] == kinds
    for name, counts in figures["steps_applied"].items():
        assert counts["applied"] == counts["succeeded"] > 0, (name, counts)
    # A write Redis refused while full: `ReplyError` (a `TransportError`) with its reason.
    clear = (*CLEAR, "ReplyError: OOM")
    kinds_seen = [kind.removeprefix("progress report: ") for kind in figures["errors"]]
    assert all(kind.startswith(clear) for kind in kinds_seen), figures["errors"]
    # (That a Redis stall is nobody's death, fault by fault: tests/test_faults.py.)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_leaking_worker_fails_the_soak() -> None:
    leaky = {**WORKERS, "ps": ["asyncgrad.workloads.param_server", "tests.soak_leak"]}
    record = soak_job(200, workers=leaky)
    assert not record["ok"]
    assert [v.split(" RSS")[0] for v in record["violations"]] == ["ps"], record["violations"]


@pytest.mark.parametrize(
    "argv",
    [["--soak-steps", "100"], ["--soak", "--soak-steps", "1"], ["--soak", "--only", "B5"]],
)
def test_soak_options_misused_are_bad_usage(argv: list[str]) -> None:
    assert main(["bench", *argv]) == 2
