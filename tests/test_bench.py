"""`asyncgrad bench` writes results in the anchor script's shape."""

from __future__ import annotations

import json
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
