"""`asyncgrad demo` and `asyncgrad run`, as a user runs them: real processes, real output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

from asyncgrad.transport.resp import RedisAddress
from tests.conftest import _live_children, redis_py

ROOT = Path(__file__).resolve().parent.parent


def asyncgrad(*args: str) -> list[str]:
    return [sys.executable, "-m", "asyncgrad", *args]


@pytest.mark.timeout(60)
def test_demo_trains_and_exits_0(tmp_path: Path) -> None:
    trace = tmp_path / "demo.json"
    done = subprocess.run(
        asyncgrad("demo", "--steps", "150", "--trace", str(trace)),
        capture_output=True, text=True, timeout=55, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    # Its last steps' trace: the trainers' steps, and the parameter server's work in them.
    events = json.loads(trace.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    steps = {e["args"]["worker"] for e in spans if e["cat"] == "step"}
    assert steps and steps <= {"trainer1", "trainer2"}
    assert {e["cat"] for e in spans if e["args"]["worker"] == "ps"} >= {"serve", "backward"}
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
        # It says what it stopped, in one line (after the log lines of -v).
        last = demo.stderr.read().decode().splitlines()[-1]
        assert last == (
            "asyncgrad: interrupted: stopped the demo's job, its workers ps, trainer1, "
            "trainer2 and its Redis"
        )
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


@pytest.mark.parametrize(
    ("job", "says"),
    [
        ("no_colon_here", "expected MODULE:FUNCTION, e.g. mypackage.train:main, not "
         "'no_colon_here'"),
        ("tests.job_funcs:notfound", "module 'tests.job_funcs' has no 'notfound'; its functions: "),
        ("no_such_module:main", "cannot import 'no_such_module': ModuleNotFoundError: No module "
         "named 'no_such_module' (run from the directory that holds it, or install it)"),
        ("tests.worker_broken:main", "cannot import 'tests.worker_broken': RuntimeError: broken "
         "on purpose"),
        ("tests.job_funcs:NOT_A_FUNCTION", "tests.job_funcs:NOT_A_FUNCTION is a int, not a "
         "function"),
    ],
)  # fmt: skip
def test_run_rejects_what_is_not_a_job_as_bad_usage_in_one_line(
    job: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from asyncgrad.cli import main

    # Found before anything starts: no Redis is asked (this one would not answer).
    assert main(["run", job, "--redis", "unix:///nonexistent/redis.sock"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"asyncgrad run: error: {says}")


@pytest.mark.timeout(20)
def test_run_calls_a_plain_function_with_the_agent_and_exits_with_what_it_returns(
    redis_url: str, namespace: str
) -> None:
    where = ("--redis", redis_url, "--namespace", namespace)
    done = subprocess.run(
        asyncgrad("run", "tests.job_funcs:sync_job", *where),
        capture_output=True, text=True, timeout=15, cwd=ROOT,
    )  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (3, "plain job on agent job\n", "")


@pytest.mark.timeout(20)
def test_run_refuses_a_result_that_is_not_an_exit_code(redis_url: str, namespace: str) -> None:
    where = ("--redis", redis_url, "--namespace", namespace)
    done = subprocess.run(
        asyncgrad("run", "tests.job_funcs:returns_text", *where),
        capture_output=True, text=True, timeout=15, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == (
        "asyncgrad run: error: job tests.job_funcs:returns_text returned str 'done': return an "
        "int (the exit code) or None\n"
    )


@pytest.mark.timeout(20)
def test_run_says_at_once_which_workers_it_waits_for_where_and_then_where_agents_are(
    redis_url: str, namespace: str, spawn_worker: Callable[..., object]
) -> None:
    """The wait (of `wait_for_workers`, as the demo's job waits) is said as it begins; when
    it ends, the namespaces that do have live agents are named: a mistyped one shows."""
    spawn_worker("nobody-here", "tests.worker_funcs")  # live, in `namespace`
    elsewhere = namespace + "-typo"
    run = asyncgrad("run", "tests.job_funcs:waits_for_nobody", "--namespace", elsewhere)
    done = subprocess.run(
        run, capture_output=True, text=True, timeout=15, cwd=ROOT,
        env={**os.environ, "ASYNCGRAD_REDIS_URL": redis_url},
    )  # fmt: skip
    address = RedisAddress.from_url(redis_url)
    where = f"namespace {elsewhere!r} at {address}"
    waiting, failed = done.stderr.splitlines()
    assert waiting == f"waiting up to 0.5 s for workers nobody, noone to be live in {where}"
    assert done.returncode == 1
    assert failed.startswith(
        f"asyncgrad: error: workers nobody, noone not live after 0.5 s in {where}: start them "
        f"(asyncgrad worker NAME --namespace {elsewhere} ...); namespaces with live agents "
        "there: "
    )
    assert namespace in failed.split("there: ")[1].split(", ") or failed.endswith("more")
    assert "secret" not in done.stderr


@pytest.mark.timeout(60)
def test_demo_on_a_given_redis_leaves_nothing_behind(redis_url: str, namespace: str) -> None:
    with redis_py(redis_url) as client:
        assert client.keys(f"{namespace}:*") == []
        done = subprocess.run(
            asyncgrad("demo", "--redis", redis_url, "--namespace", namespace, "--steps", "20"),
            capture_output=True, text=True, timeout=55, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert client.keys(f"{namespace}:*") == []
