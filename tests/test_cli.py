from __future__ import annotations

import http.server
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
import redis

from asyncgrad.cli import main
from tests.conftest import ROOT

URL = re.compile(r"redis://127\.0\.0\.1:\d+/0")


def _server_pid(url: str) -> int:
    with redis.Redis.from_url(url) as client:
        assert client.ping()
        return int(client.info("server")["process_id"])


class _SignalOnceServing(io.StringIO):
    """Stands in for stdout: when `up` prints its URL, checks the server, then sends `signum`."""

    def __init__(self, signum: signal.Signals) -> None:
        super().__init__()
        self.signum, self.server_pid = signum, 0

    def write(self, s: str) -> int:
        n = super().write(s)
        if "\n" in s and not self.server_pid:
            self.server_pid = _server_pid(self.getvalue().splitlines()[0])
            signal.raise_signal(self.signum)
        return n


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("argv", [[], ["nope"], ["up", "--port", "x"], ["up", "extra"]])
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert "usage: asyncgrad" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_up_prints_its_url_and_stops_on_a_signal(
    signum: signal.Signals, monkeypatch: pytest.MonkeyPatch
) -> None:
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stdout = _SignalOnceServing(signum)
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["up", "--port", "0"]) == 0
    assert URL.fullmatch(stdout.getvalue().splitlines()[0])
    with pytest.raises(ProcessLookupError):  # stopped and reaped
        os.kill(stdout.server_pid, 0)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def test_up_on_a_busy_port_fails_in_one_line(
    busy_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["up", "--port", str(busy_port)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"asyncgrad: error: port {busy_port} is already in use; pass --port 0 to pick a free port\n"
    )


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_adds_the_traceback(
    where: str, busy_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    up = ["up", "--port", str(busy_port)]
    assert main(["--debug", *up] if where == "before" else [*up, "--debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback")
    assert err.endswith("pass --port 0 to pick a free port\n")


def test_up_uses_asyncgrad_redis_server(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ASYNCGRAD_REDIS_SERVER", "/nonexistent/redis-server")
    assert main(["up", "--port", "0"]) == 1
    assert "'/nonexistent/redis-server' is not executable" in capsys.readouterr().err


def test_python_m_asyncgrad_up_serves_until_sigint(
    read_line: Callable[[IO[bytes]], str], wait_exit: Callable[[int], None]
) -> None:
    command = [sys.executable, "-m", "asyncgrad", "up", "--port", "0"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as cli:
        try:
            assert cli.stdout is not None
            url = read_line(cli.stdout)
            assert URL.fullmatch(url)
            redis_fd = os.pidfd_open(_server_pid(url))
            cli.send_signal(signal.SIGINT)
            _, err = cli.communicate(timeout=5)
        finally:
            cli.kill()
    assert cli.returncode == 0, err
    wait_exit(redis_fd)


# *** bad usage found at once: numbers that make no sense, URLs that are not ***


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["demo", "--steps", "-5"], "argument --steps: must be a positive whole number, not '-5'"),
        (["demo", "--steps", "0"], "argument --steps: must be a positive whole number, not '0'"),
        (["demo", "--steps", "x"], "argument --steps: must be a positive whole number, not 'x'"),
        (["worker", "w", "--failure-timeout", "0"], "argument --failure-timeout: must be a"),
        (["worker", "w", "--failure-timeout", "nan"], "argument --failure-timeout: must be a"),
        (["worker", "w", "--rref-lease", "-1"], "argument --rref-lease: must be a positive"),
        (["status", "--interval", "0"], "argument --interval: must be a positive number"),
        (["status", "--gone-for", "inf"], "argument --gone-for: must be a positive number"),
        (["up", "--port", "70000"], "argument --port: must be a TCP port, 0-65535"),
    ],
)
def test_numbers_that_make_no_sense_are_bad_usage(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert (
        capsys.readouterr().err.splitlines()[-1].startswith(f"asyncgrad {argv[0]}: error: {says}")
    )


@pytest.mark.parametrize(
    "command", [["status"], ["run", "tests.job_funcs:sync_job"], ["worker", "w"]]
)
@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://user:secret@host:port/0", "'redis://user:***@host:port/0' is not a Redis URL: "),
        ("http://127.0.0.1:6379", "'http://127.0.0.1:6379' is not a Redis URL: unsupported scheme"),
        ("redis://127.0.0.1:6379/zero", "'redis://127.0.0.1:6379/zero' is not a Redis URL: "),
    ],
)
def test_a_malformed_redis_url_is_bad_usage_in_one_line(
    command: list[str], url: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*command, "--redis", url]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"asyncgrad {command[0]}: error: --redis {says}")
    assert "secret" not in line


def test_a_malformed_url_in_the_environment_is_named_as_such(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ASYNCGRAD_REDIS_URL", "redis//127.0.0.1")
    assert main(["status"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("asyncgrad status: error: $ASYNCGRAD_REDIS_URL 'redis//127.0.0.1' is")


# *** wrong Redis targets: real sockets, one line each, in bounded time ***


@pytest.fixture
def mute_port() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


@pytest.fixture
def http_port() -> Iterator[int]:
    """A tiny HTTP server, which answers a Redis command with `400 Bad Request`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        default_request_version = "HTTP/1.1"  # a status line even for a garbled request

        def log_message(self, *args: object) -> None:  # keep the test's output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


COMMANDS = {
    "status": ["status"],
    "run": ["run", "tests.job_funcs:sync_job"],
    "worker": ["worker", "w", "--import", "tests.worker_funcs"],
}


def _run_all(port: int, timeout: float) -> dict[str, subprocess.CompletedProcess[str]]:
    """Each command against redis://127.0.0.1:PORT/0, all at once (each takes as long)."""
    url = f"redis://127.0.0.1:{port}/0"
    started = {
        name: subprocess.Popen(
            [sys.executable, "-m", "asyncgrad", *argv, "--redis", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for name, argv in COMMANDS.items()
    }
    done: dict[str, subprocess.CompletedProcess[str]] = {}
    for name, process in started.items():
        try:
            out, err = process.communicate(timeout=timeout)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        # A worker logs its lifecycle (INFO lines): the error is the one line beside them.
        err = "".join(li for li in err.splitlines(True) if " level=INFO " not in li)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return done


@pytest.mark.timeout(30)
def test_a_port_that_never_answers_says_so_in_one_line(mute_port: int) -> None:
    started = time.monotonic()
    for name, done in _run_all(mute_port, timeout=25).items():
        assert done.returncode == 1, (name, done.stderr)
        (line,) = done.stderr.splitlines()
        assert line == (
            f"asyncgrad: error: connected to 127.0.0.1:{mute_port}/0 but got no answer within "
            "10 s (not a Redis server?); check the URL's host and port"
        ), name
    assert time.monotonic() - started < 20


@pytest.mark.timeout(20)
def test_an_http_port_says_what_answered_in_one_line(http_port: int) -> None:
    for name, done in _run_all(http_port, timeout=15).items():
        assert done.returncode == 1, (name, done.stderr)
        (line,) = done.stderr.splitlines()  # no asyncio "Fatal error on transport" traceback
        start = f"asyncgrad: error: 127.0.0.1:{http_port}/0 answered with something that is not "
        assert line.startswith(start + 'Redis: "HTTP/1.0 400 Bad request syntax'), (name, line)
        assert line.endswith("; check the URL's host and port"), line


# *** Ctrl-C ***


@pytest.mark.parametrize("entry", ["module", "script"])
def test_ctrl_c_while_the_command_imports_exits_130_in_one_line(entry: str) -> None:
    """Python's import log (-X importtime) says when numpy is imported: a Ctrl-C then
    lands inside the package's imports, where it used to print a traceback from numpy."""
    script = Path(sys.executable).with_name("asyncgrad")
    command = ["-m", "asyncgrad"] if entry == "module" else [str(script)]
    with subprocess.Popen(
        [sys.executable, "-X", "importtime", *command, "demo", "--steps", "5"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT,
    ) as cli:  # fmt: skip
        try:
            assert cli.stderr is not None
            for line in cli.stderr:
                if line.split("|")[-1].strip() == "numpy":
                    cli.send_signal(signal.SIGINT)
                    break
            rest = [li for li in cli.stderr if not li.startswith("import time:")]
            assert cli.wait(5) == 130
        finally:
            cli.kill()
    assert rest == ["asyncgrad: interrupted while starting\n"]
