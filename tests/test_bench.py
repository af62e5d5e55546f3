"""`asyncgrad bench` writes results in the anchor script's shape."""

from __future__ import annotations

import importlib.util
import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from asyncgrad.bench import redis_memory
from asyncgrad.cli import main
from asyncgrad.embedded import EmbeddedRedis
from asyncgrad.simulated_hosts import HostsUnavailable, SimulatedHosts
from tests.conftest import redis_py


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


TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.skipif(not TORCH, reason="PyTorch is not installed: pip install -e '.[torch]'")
@pytest.mark.timeout(90)
def test_against_torch_runs_both_sides_and_prints_their_ratio(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str
) -> None:
    out = tmp_path / "both.json"
    argv = ["bench", "--against", "torch", "--only", "B1", "--quick", "--repeat", "1"]
    argv += ["--json", str(out), "--redis", redis_url, "--namespace", namespace]
    assert main(argv) == 0
    *records, last = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # Alternately: asyncgrad's run, then PyTorch's.
    assert [(r["name"], r["side"]) for r in records] == [
        ("B1_latency", "asyncgrad"),
        ("B1_latency", "torch"),
    ]
    ours, theirs = (r["figures"]["median_us"] for r in records)
    assert ours > 0
    assert theirs > 0
    assert records[1]["params"]["calls"] == records[0]["params"]["calls"] == 500
    median = next(c for c in last["comparison"] if c["key"] == "B1_latency.median_us")
    assert median["better"] == "lower"
    assert median["asyncgrad_over_torch"] == pytest.approx(ours / theirs)
    doc = json.loads(out.read_text())
    assert [r["name"] for r in doc["results"]] == ["B1_latency"]
    assert doc["torch"]["version"].startswith("2.")
    assert [r["figures"]["median_us"] for r in doc["torch"]["results"]] == [theirs]
    assert doc["comparison"] == last["comparison"]


@pytest.mark.timeout(30)
def test_against_torch_without_torch_says_how_to_install_it() -> None:
    # torch made unimportable in this interpreter only, the way Python spells "absent".
    code = (
        "import sys; sys.modules['torch'] = None; from asyncgrad.cli import main; "
        "sys.exit(main(['bench', '--against', 'torch', '--only', 'B1', '--quick']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=25, check=False
    )
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert "pip install -e '.[torch]'" in line


@pytest.mark.timeout(60)
def test_b3_says_what_its_echoes_cost_redis(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--only", "B3", "--quick"]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    # How much depends on the path the tensors take (through Redis or beside it); how the
    # figure was read is said either way.
    assert record["params"]["redis_peak"] in (redis_memory.EXACT, redis_memory.SAMPLED)
    assert record["figures"]["redis_peak_MiB"] >= 0


@pytest.mark.timeout(30)
async def test_redis_memory_peak_is_exact_when_set_during_the_span_else_a_lower_bound() -> None:
    # SETRANGE far out: Redis allocates the string itself, so no client buffer of the size
    # comes and goes with it.
    mib16 = (16 << 20) - 1
    with EmbeddedRedis(os.environ.get("ASYNCGRAD_REDIS_SERVER")) as server:
        client = redis_py(server.url, asynchronous=True)
        try:
            async with redis_memory.MemoryPeak(server.url) as peak:
                await client.setrange("held", mib16, "x")
                await client.delete("held")  # gone before the span ends: only the peak saw it
            assert peak.method == redis_memory.EXACT
            assert peak.mib is not None
            assert peak.mib >= 16
            await client.setrange("held", 4 * mib16, "x")
            await client.delete("held")
            # Redis once held more than the next span will: its peak cannot tell.
            async with redis_memory.MemoryPeak(server.url) as peak:
                await client.setrange("kept", mib16, "x")
            assert peak.method == redis_memory.SAMPLED
            assert peak.mib is not None
            assert peak.mib >= 16
        finally:
            await client.aclose()


@pytest.mark.timeout(120)
def test_b3x_echoes_between_two_simulated_hosts_beside_raw_tcp(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "b3x.json"
    sides = ["--against", "torch", "--repeat", "1"] if TORCH else []
    code = main(["bench", "--only", "B3x", "--quick", *sides, "--json", str(out)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # PyTorch has no side of B3x: asyncgrad's record only, also with --against torch.
    records = [line for line in lines if "name" in line]
    assert [(r["name"], r.get("side", "asyncgrad")) for r in records] == [
        ("B3x_bandwidth_hosts", "asyncgrad")
    ]
    (record,) = records
    doc = json.loads(out.read_text())
    assert [r["name"] for r in doc["results"]] == ["B3x_bandwidth_hosts"]
    assert doc.get("torch", {}).get("results", []) == []
    try:
        with SimulatedHosts(2):
            unavailable = None
    except HostsUnavailable as e:
        unavailable = str(e)
    if unavailable is not None:
        assert code == 1
        assert record["ok"] is False
        unnamed = re.compile(r"asyncgrad-[\w-]+")  # the namespace names: each run its own
        said = f"HostsUnavailable: {unavailable}"
        assert unnamed.sub("N", record["error"]) == unnamed.sub("N", said)
        return
    assert code == 0, record.get("error")
    figures = record["figures"]
    for key in ("GBps_1MiB", "GBps_64MiB", "raw_tcp_GBps_1MiB", "raw_tcp_GBps_64MiB"):
        assert figures[key] > 0
    assert figures["vs_raw_tcp_64MiB"] == figures["GBps_64MiB"] / figures["raw_tcp_GBps_64MiB"]


def test_against_anything_but_torch_is_bad_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["bench", "--against", "foo"])
    assert caught.value.code == 2
    assert "invalid choice: 'foo'" in capsys.readouterr().err
    assert main(["bench", "--against", "torch", "--soak"]) == 2
    assert main(["bench", "--against", "torch", "--scale"]) == 2


@pytest.mark.timeout(60)
def test_on_a_terminal_a_table_and_progress_instead_of_json(tmp_path: Path) -> None:
    primary, secondary = pty.openpty()
    argv = [sys.executable, "-m", "asyncgrad", "bench", "--only", "B6", "--quick"]
    with subprocess.Popen(argv, stdout=secondary, stderr=subprocess.PIPE, text=True) as child:
        os.close(secondary)
        shown = _read_all(primary)
        stderr = child.stderr.read() if child.stderr else ""
    assert child.returncode == 0, stderr
    assert "B6 local MLP step" in shown
    assert re.search(r"steps/s, 1 thread +│ higher +│ +[\d,]+ │", shown)
    assert "{" not in shown  # no JSON
    assert "bench: [1/1] B6_local_autograd ..." in stderr
    assert re.search(r"bench: \[1/1\] B6_local_autograd: [\d,]+ steps/s, 1 thread", stderr)


def _read_all(fd: int) -> str:
    """What a terminal showed, until its last writer closed it."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the other side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_soak_names_each_fault_before_the_warnings_it_causes() -> None:
    argv = [sys.executable, "-m", "asyncgrad", "bench", "--soak", "--only", "S2"]
    done = subprocess.run(
        [*argv, "--soak-steps", "300"], capture_output=True, text=True, timeout=110, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    kill = _index(lines, "S2: injecting at step ")
    assert "ps killed (SIGKILL) and started again" in lines[kill]
    restart = _index(lines, "S2: injecting at step ", kill + 1)
    assert "Redis stopped for 1 s" in lines[restart]
    assert "reconnect_failed" in lines[restart]  # the warnings to expect, by name
    # No warning of the run comes before a fault was named; the restart's come after it.
    warnings = [i for i, line in enumerate(lines) if "level=WARNING" in line]
    assert min(warnings) > kill
    assert any("reconnect_failed" in lines[i] for i in warnings if i > restart)
    assert lines[_index(lines, "S2: fault over (redis", restart)]


def _index(lines: list[str], start: str, after: int = 0) -> int:
    return next(i for i, line in enumerate(lines) if i >= after and line.startswith(start))
