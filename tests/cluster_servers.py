"""A real Redis Cluster for the tests: masters on free loopback ports, and replicas if asked.

`redis-cli --cluster create` assigns the slots; the cluster is ready once every node's
`CLUSTER INFO` says `cluster_state:ok`. Redis announces neither event, so both are polled
against a deadline.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import redis

from asyncgrad.embedded import (
    EmbeddedRedisError,
    RedisServerNotFound,
    die_with_parent,
    find_redis_server,
    redis_version,
)

_POLL = 0.02  # seconds between two probes of a server that announces nothing


class ClusterUnsupported(RuntimeError):
    """No redis-server and redis-cli that can make a cluster (Redis 5 or later)."""


def find_binaries(server_override: str | None = None) -> tuple[str, str]:
    """redis-server and the redis-cli next to it (else on PATH), both Redis 5 or later."""
    try:
        server = find_redis_server(server_override)
    except RedisServerNotFound as e:
        raise ClusterUnsupported(str(e)) from e
    beside = Path(server).with_name("redis-cli")
    cli = str(beside) if os.access(beside, os.X_OK) else shutil.which("redis-cli")
    if cli is None:
        raise ClusterUnsupported(f"no redis-cli next to {server} nor on PATH")
    for binary in (server, cli):
        try:
            version = redis_version(binary)
        except EmbeddedRedisError as e:
            raise ClusterUnsupported(str(e)) from e
        if version < (5, 0):
            raise ClusterUnsupported(f"{binary} is Redis {version[0]}.{version[1]}, not 5 or later")
    return server, cli


class ClusterServers:
    """`masters` redis-server processes, each with `replicas` replicas, joined into one
    cluster; `url` is its seeds' URL. With replicas, a master that dies is replaced by one
    of its replicas after `node_timeout_ms`."""

    def __init__(
        self,
        server: str,
        cli: str,
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 15000,
    ) -> None:
        self._server, self._cli, self._masters = server, cli, masters
        self._replicas, self._node_timeout_ms = replicas, node_timeout_ms
        self._dir: str | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self.by_port: dict[int, subprocess.Popen[bytes]] = {}
        self.ports: list[int] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self, timeout: float = 30.0) -> Self:
        deadline = time.monotonic() + timeout
        try:
            self._dir = tempfile.mkdtemp(prefix="asyncgrad-cluster-")
            self.ports = _free_ports(self._masters * (1 + self._replicas))
            for port in self.ports:
                self._procs.append(self._spawn(port))
                self.by_port[port] = self._procs[-1]
            for port in self.ports:
                _until(deadline, f"redis-server on port {port} answers", lambda p=port: _ping(p))
            create = [self._cli, "--cluster", "create"]
            create += [f"127.0.0.1:{p}" for p in self.ports]
            create += ["--cluster-replicas", str(self._replicas), "--cluster-yes"]
            done = subprocess.run(
                create, capture_output=True, text=True, timeout=deadline - time.monotonic()
            )
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout}{done.stderr}")
            for port in self.ports:
                _until(deadline, f"node {port}: cluster_state:ok", lambda p=port: _ok(p))
            for port in self.replica_ports():
                _until(deadline, f"replica {port} in sync", lambda p=port: _synced(p))
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        assert self._dir is not None
        args = [self._server, "--port", str(port), "--bind", "127.0.0.1"]
        args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
        args += ["--cluster-node-timeout", str(self._node_timeout_ms)]
        args += ["--save", "", "--appendonly", "no", "--dir", self._dir, "--daemonize", "no"]
        args += ["--logfile", f"{self._dir}/redis-{port}.log"]
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            process_group=0,
            preexec_fn=die_with_parent(),
        )

    def master_ports(self) -> list[int]:
        return [p for p in self.ports if self.alive(p) and _role(p) == b"master"]

    def replica_ports(self) -> list[int]:
        return [p for p in self.ports if self.alive(p) and _role(p) == b"slave"]

    def alive(self, port: int) -> bool:
        return self.by_port[port].poll() is None

    def kill(self, port: int) -> None:
        """SIGKILL one node (a crash: no failover is arranged)."""
        self.by_port[port].kill()
        self.by_port[port].wait()

    def stop(self, timeout: float = 5.0) -> None:
        procs, self._procs = self._procs, []
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir)
            self._dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _free_ports(n: int) -> list[int]:
    """Ports free now whose cluster bus port (port + 10000) is free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 < 65536 and port not in ports:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            ports.append(port)
    return ports


def _until(deadline: float, what: str, probe: Callable[[], bool]) -> None:
    while not probe():
        if time.monotonic() > deadline:
            raise RuntimeError(f"Redis Cluster not ready: {what}")
        time.sleep(_POLL)  # nothing to wait on: the servers announce neither event


def _ping(port: int) -> bool:
    try:
        with redis.Redis(port=port, socket_timeout=1) as client:
            return bool(client.ping())
    except redis.ConnectionError:
        return False


def _role(port: int) -> bytes:
    with redis.Redis(port=port, socket_timeout=1) as client:
        return bytes(client.execute_command("ROLE")[0])


def _synced(port: int) -> bool:
    with redis.Redis(port=port, socket_timeout=1) as client:
        return client.info("replication").get("master_link_status") == "up"


def _ok(port: int) -> bool:
    with redis.Redis(port=port, socket_timeout=1) as client:
        return b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO")
