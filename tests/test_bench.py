"""`asyncgrad bench` writes results in the anchor script's shape."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from asyncgrad.cli import main


@pytest.mark.timeout(60)
def test_b6_quick_writes_anchor_shaped_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--only", "B6", "--quick", "--json", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    doc = json.loads(out.read_text())
    (record,) = doc["results"]
    assert line["name"] == record["name"] == "B6_local_autograd"
    assert record["ok"] is True
    assert set(record["figures"]) == {
        "steps_per_s_threads1",
        "steps_per_s_default_threads",
        "first10_loss",
        "last10_loss",
    }
    assert record["figures"]["steps_per_s_threads1"] > 0
    assert record["params"]["batch"] == 64


def test_unknown_workload_is_bad_usage() -> None:
    assert main(["bench", "--only", "B9"]) == 2


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_scale_quick_writes_one_record_per_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str
) -> None:
    out = tmp_path / "scale.json"
    argv = ["bench", "--scale", "--quick", "--json", str(out)]
    assert main([*argv, "--redis", redis_url, "--namespace", namespace]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    records = json.loads(out.read_text())["results"]
    assert [r["name"] for r in lines] == [r["name"] for r in records]
    workers = {
        name: [r["params"]["workers"] for r in records if r["name"] == name]
        for name in ("B2_throughput_scale", "B4_dist_backward_chain_scale")
    }
    assert workers == {
        "B2_throughput_scale": [1, 2, 4, 8],
        "B4_dist_backward_chain_scale": [2, 4, 8],
    }
    for record in records:
        assert record["ok"] is True, record.get("error")
        figures = record["figures"]
        if record["name"] == "B2_throughput_scale":
            assert figures["calls_per_s"] > 0
            cpu = figures["cpu_us_per_call"]
        else:
            assert figures["steps_per_s"] > 0
            assert len(figures["grad_norms"]) == record["params"]["workers"]
            assert figures["grad_norm_max_rel_err_vs_local"] < 1e-4
            assert figures["compute_ms_per_step"] > 0
            cpu = figures["cpu_ms_per_step"]
        assert len(cpu["each_worker"]) == record["params"]["workers"]
        # Every process of the run did work in the timed section, and no more than the
        # machine's cores can: the meter reads the right processes over the right span.
        assert min(cpu["driver"], cpu["redis"], *cpu["each_worker"]) > 0
        assert 0 < cpu["cores_busy"] <= (os.cpu_count() or 1) * 1.05
        assert cpu["redis_commands"] > 0


def test_scale_covers_b2_and_b4_only() -> None:
    assert main(["bench", "--scale", "--only", "B1"]) == 2
    assert main(["bench", "--scale", "--only", "B1,B2"]) == 2
    assert main(["bench", "--scale", "--soak"]) == 2
