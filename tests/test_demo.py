"""`asyncgrad demo` and `asyncgrad run`, as a user runs them: real processes, real output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

from tests.conftest import _live_children

ROOT = Path(__file__).resolve().parent.parent


def asyncgrad(*args: str) -> list[str]:
    return [sys.executable, "-m", "asyncgrad", *args]


@pytest.mark.timeout(60)
def test_demo_trains_and_exits_0() -> None:
    done = subprocess.run(
        asyncgrad("demo", "--steps", "150"), capture_output=True, text=True, timeout=55, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "held-out accuracy" in out
    # The loss fell for both trainers, and the model learned something.
    for trainer in ("trainer1", "trainer2"):
        line = next(li for li in out.splitlines() if li.startswith(f"{trainer}: loss"))
        first, last = (float(v) for v in line.split("loss ")[1].split(" (")[0].split(" -> "))
        assert last < first
    accuracy = float(out.rsplit("-> ", 1)[1].rstrip().rstrip("%")) / 100
    assert accuracy > 0.4


@pytest.mark.timeout(60)
def test_ctrl_c_stops_everything(
    read_line: Callable[[IO[bytes]], str], wait_exit: Callable[[int], None]
) -> None:
    demo = subprocess.Popen(
        asyncgrad("-v", "demo", "--steps", "1000000"), stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    assert demo.stderr is not None
    try:
        while "event=agent_started agent=job" not in read_line(demo.stderr):
            pass
        children = _live_children(demo.pid)  # the Redis server and three workers
        assert len(children) == 4, children
        pidfds = {pid: os.pidfd_open(pid) for pid in children}
        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 130
        for pidfd in pidfds.values():
            wait_exit(pidfd)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        demo.stderr.close()


@pytest.mark.timeout(60)
def test_run_spawns_workers_and_runs_the_job(redis_url: str, namespace: str) -> None:
    done = subprocess.run(
        asyncgrad(
            "run", "tests.job_funcs:sum_on_workers", "--redis", redis_url,
            "--namespace", namespace, "--spawn", "a=asyncgrad.workloads.echo",
            "--spawn", "b=asyncgrad.workloads.echo",
        ),
        capture_output=True, text=True, timeout=55, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 7, done.stderr
    assert "echoed 3 values" in done.stdout


def test_run_rejects_a_bad_target(capsys: pytest.CaptureFixture[str]) -> None:
    from asyncgrad.cli import main

    assert main(["run", "no_colon_here"]) == 1
    assert "MODULE:FUNCTION" in capsys.readouterr().err
