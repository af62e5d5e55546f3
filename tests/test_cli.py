from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import IO

import pytest
import redis

from asyncgrad.cli import main

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
