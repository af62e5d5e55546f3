"""Redis ACL users and TLS, end to end, on Redis servers these tests start themselves.

ACL: an agent's user gets the rules SECURITY.md documents (its namespace's keys, the
commands asyncgrad issues, nothing else); agents with it work, and cannot reach another
namespace. TLS: a Redis that listens only on TLS and requires client certificates, which
the tests generate; agents, a worker process and `status` work over it, and clients
without a trusted certificate are refused at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pytest
import redis
import redis.asyncio as aredis

import asyncgrad as ag
from asyncgrad import rpc, status
from asyncgrad.cli import main
from asyncgrad.local_cluster import LocalCluster
from asyncgrad.transport import heartbeat, inbox, registry
from asyncgrad.transport.resp import (
    Connection,
    ConnectionLost,
    RedisAddress,
    ReplyError,
    SyncConnection,
)
from tests import dist_funcs  # noqa: F401 - exposes the dt.* functions
from tests.conftest import DEADLINE, ROOT, eventually
from tests.security_fixtures import (
    Certificates,
    RedisServer,
    documented_acl,
    make_certificates,
    start_tls_server,
    tls_url,
)
from tests.test_dist_autograd import chain_backward

ADMIN_PASSWORD = "admin-secret"
PASSWORDS = {"agent-ns1": "s3cret/ns1", "agent-ns2": "s3cret/ns2", "status-ns1": "look"}


async def heartbeat_refreshed(admin: aredis.Redis, namespace: str, agent: str) -> None:
    """Until the agent's heartbeat thread has refreshed its key at least once: the key's
    time to live goes up again (it only runs down between refreshes)."""
    key = heartbeat(namespace, agent)
    least = [await admin.pttl(key)]

    async def beaten() -> bool:
        ttl = await admin.pttl(key)
        least[0] = min(least[0], ttl)
        return bool(ttl > least[0])

    await eventually(beaten, f"a heartbeat refresh by {agent}")


# *** ACL ***


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    """A Redis whose default user needs a password, with one ACL user per role, each
    given the rules SECURITY.md documents for it."""
    server = RedisServer(["--requirepass", ADMIN_PASSWORD])
    try:
        with redis.Redis(port=server.port, password=ADMIN_PASSWORD) as admin:
            for user, password in PASSWORDS.items():
                role, _, ns = user.partition("-")
                rules = documented_acl(f"{role}-ns1")
                rules = [f">{password}" if r == ">PASSWORD" else r for r in rules]
                rules = [r.replace("ns1:", f"{ns}:") for r in rules]
                admin.execute_command("ACL", "SETUSER", user, "reset", *rules)
        yield server
    finally:
        server.stop()


def acl_url(server: RedisServer, user: str) -> str:
    """The user's URL; the `/` in its password percent-encoded, as a URL needs it."""
    return f"redis://{user}:{PASSWORDS[user].replace('/', '%2F')}@127.0.0.1:{server.port}/0"


@pytest.fixture
async def admin(acl_server: RedisServer) -> AsyncIterator[aredis.Redis]:
    """The default user (all keys, all commands), with an empty ACL LOG to begin with."""
    client = aredis.Redis(port=acl_server.port, password=ADMIN_PASSWORD)
    await client.acl_log_reset()
    yield client
    await client.aclose()


@pytest.mark.timeout(20)
async def test_acl_user_of_one_namespace_runs_rpc_and_a_distributed_backward(
    acl_server: RedisServer, admin: aredis.Redis
) -> None:
    url = acl_url(acl_server, "agent-ns1")
    # The driver enters last: it is the current agent, whose contexts chain_backward opens.
    async with rpc.Agent("w1", url, "ns1"), rpc.Agent("driver", url, "ns1") as driver:
        assert await driver.rpc_async("w1", "dt.context_count") == 0
        rref = await driver.remote("w1", "dt.param_rrefs", args=(0,))
        assert len(await rref.to_here()) == 1
        await chain_backward(driver, ["w1"])
        assert [w.name for w in await driver.workers()] == ["w1", "driver"]
        await heartbeat_refreshed(admin, "ns1", "w1")
        # `asyncgrad status` with a user that may only read the namespace.
        rows = await status.collect(acl_url(acl_server, "status-ns1"), "ns1")
        assert [(r.name, r.alive) for r in rows] == [("w1", True), ("driver", True)]
    # Nothing asyncgrad did was refused, the leaving agents' cleanup included.
    assert await admin.acl_log() == []


@pytest.mark.timeout(20)
async def test_acl_user_cannot_reach_another_namespace(
    acl_server: RedisServer, admin: aredis.Redis
) -> None:
    ns1_url = acl_url(acl_server, "agent-ns1")
    async with rpc.Agent("victim", acl_url(acl_server, "agent-ns2"), "ns2") as victim:
        keys_before = sorted(await admin.keys("ns2:*"))
        # An agent of ns1's user cannot join ns2, so it can call nothing there.
        async with asyncio.timeout(DEADLINE):
            with pytest.raises(ReplyError) as refused:
                await rpc.Agent("intruder", ns1_url, "ns2").start()
        assert refused.value.code == "NOPERM"
        assert "user 'agent-ns1'" in str(refused.value)
        assert "namespace 'ns2'" in str(refused.value)
        # In its own namespace, ns2's agents are not there to be called.
        async with rpc.Agent("caller", ns1_url, "ns1") as caller:
            with pytest.raises(ag.WorkerUnavailable, match="'victim'"):
                await caller.rpc_async("victim", "dt.context_count", timeout=DEADLINE)
        # Nor, with the same credentials, read, write or delete ns2's keys directly.
        conn = await Connection.open(RedisAddress.from_url(ns1_url), name="asyncgrad:intruder")
        try:
            victim_inbox = inbox("ns2", "victim")
            for command in [
                ("HGETALL", registry("ns2")),
                ("GET", heartbeat("ns2", "victim")),
                ("XRANGE", victim_inbox, "-", "+"),
                ("XREADGROUP", "GROUP", "asyncgrad", "thief", "STREAMS", victim_inbox, ">"),
                ("XADD", victim_inbox, "*", "m", b"forged"),
                ("DEL", registry("ns2"), victim_inbox),
                ("EVAL", "return redis.call('GET', KEYS[1])", 1, heartbeat("ns2", "victim")),
            ]:
                with pytest.raises(ReplyError) as denied:
                    await conn.execute(*command)
                assert denied.value.code == "NOPERM", command
            # A script may run, but only with the user's own rights.
            with pytest.raises(ReplyError, match="can't access"):
                await conn.execute("EVAL", f"return redis.call('GET', '{registry('ns2')}')", 0)
            for command in [("KEYS", "*"), ("SCAN", 0), ("FLUSHALL",), ("CONFIG", "GET", "*")]:
                with pytest.raises(ReplyError, match=r"NOPERM .* no permissions to run"):
                    await conn.execute(*command)
        finally:
            conn.close()
        assert sorted(await admin.keys("ns2:*")) == keys_before
        assert await admin.xlen(victim_inbox) == 0
        assert await victim.rpc_async("victim", "dt.context_count") == 0  # still serving


@pytest.mark.timeout(20)
async def test_acl_status_user_reads_but_cannot_run_an_agent(acl_server: RedisServer) -> None:
    url = acl_url(acl_server, "status-ns1")
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(ReplyError, match=r"NOPERM Redis user 'status-ns1' .* 'eval'"):
            await rpc.Agent("reader", url, "ns1").start()
    assert all(not row.alive for row in await status.collect(url, "ns1"))


@pytest.mark.timeout(20)
async def test_acl_user_without_xreadgroup_fails_at_start(
    acl_server: RedisServer, admin: aredis.Redis
) -> None:
    rules = [r for r in documented_acl("agent-ns1") if r != "+xreadgroup"]
    rules = ["><PASSWORD>" if r == ">PASSWORD" else r for r in rules]
    await admin.execute_command("ACL", "SETUSER", "no-read", "reset", *rules)
    url = f"redis://no-read:<PASSWORD>@127.0.0.1:{acl_server.port}/0"
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(ReplyError, match=r"NOPERM Redis user 'no-read' .* 'xreadgroup'"):
            await rpc.Agent("deaf", url, "ns1").start()


@pytest.mark.timeout(60)
async def test_spawned_workers_get_the_password_outside_their_command_line(
    acl_server: RedisServer,
) -> None:
    url = acl_url(acl_server, "agent-ns1")
    workers = {"w1": ["tests.dist_funcs"], "w2": ["tests.dist_funcs"]}

    def start() -> tuple[LocalCluster, list[bytes]]:
        cluster = LocalCluster(workers, url, "ns1").__enter__()
        pids = [process.pid for process in cluster.processes.values()]
        return cluster, [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in pids]

    # Entering blocks until the workers serve: off the event loop.
    cluster, cmdlines = await asyncio.to_thread(start)
    try:
        assert len(cmdlines) == 2
        for cmdline in cmdlines:
            assert b"s3cret" not in cmdline and b"agent-ns1" not in cmdline
        async with rpc.Agent("driver", url, "ns1") as driver:
            await chain_backward(driver, ["w1", "w2"])
    finally:
        await asyncio.to_thread(cluster.__exit__, None, None, None)


@pytest.mark.parametrize(
    ("login", "answer"),
    [
        ("agent-ns1:wrong@", "WRONGPASS"),
        ("nobody:s3cret%2Fns1@", "WRONGPASS"),
        ("", "NOAUTH"),  # no credentials: the default user, which needs a password here
    ],
)
def test_wrong_credentials_fail_at_start_with_one_clear_line(
    acl_server: RedisServer, login: str, answer: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://{login}127.0.0.1:{acl_server.port}/0"
    for command in (["worker", "w"], ["status"]):
        started = time.monotonic()
        assert main([*command, "--redis", url, "--namespace", "ns1"]) == 1
        assert time.monotonic() - started < DEADLINE
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("asyncgrad: error: Redis at 127.0.0.1:")
        assert f"refused the login: {answer}" in line


# *** TLS ***


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_server(certs: Certificates) -> Iterator[RedisServer]:
    server = start_tls_server(certs)
    yield server
    server.stop()


@pytest.fixture
async def tls_admin(tls_server: RedisServer, certs: Certificates) -> AsyncIterator[aredis.Redis]:
    client = aredis.Redis(
        port=tls_server.port,
        ssl=True,
        ssl_ca_certs=str(certs.ca),
        ssl_certfile=str(certs.client_cert),
        ssl_keyfile=str(certs.client_key),
    )
    yield client
    await client.aclose()


@pytest.fixture
def tls_worker(
    tls_server: RedisServer, certs: Certificates, read_line: Callable[[IO[bytes]], str]
) -> Iterator[Callable[[str, str], subprocess.Popen[bytes]]]:
    """`spawn(name, namespace)`: `asyncgrad worker` over TLS in a subprocess, once it serves."""
    spawned: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, namespace: str) -> subprocess.Popen[bytes]:
        url = tls_url(tls_server, certs.ca, certs.client_cert, certs.client_key)
        argv = [sys.executable, "-m", "asyncgrad", "worker", name, "--redis", url]
        argv += ["--namespace", namespace, "--import", "tests.dist_funcs"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(argv, stderr=subprocess.PIPE, env=env, cwd=ROOT)
        spawned.append(process)
        assert process.stderr is not None
        while "event=worker_serving" not in read_line(process.stderr):
            pass
        return process

    yield spawn
    for process in spawned:
        if process.poll() is None:
            process.kill()
        process.wait(DEADLINE)
        if process.stderr is not None:
            process.stderr.close()


@pytest.mark.timeout(30)
async def test_tls_agents_worker_process_and_status_with_client_certificates(
    tls_server: RedisServer,
    certs: Certificates,
    tls_admin: aredis.Redis,
    tls_worker: Callable[[str, str], subprocess.Popen[bytes]],
    read_line: Callable[[IO[bytes]], str],
) -> None:
    url = tls_url(tls_server, certs.ca, certs.client_cert, certs.client_key)
    worker = tls_worker("p", "tls")
    async with rpc.Agent("b", url, "tls"), rpc.Agent("driver", url, "tls") as driver:
        big = np.arange(1 << 20, dtype=np.float64)  # 8 MiB: many TLS records each way
        assert np.array_equal(await driver.rpc_async("p", "dt.product", args=(big, big)), big * big)
        await chain_backward(driver, ["b", "p"])
        await heartbeat_refreshed(tls_admin, "tls", "p")  # the worker's heartbeat thread
        await heartbeat_refreshed(tls_admin, "tls", "b")
        rows = await status.collect(url, "tls")
        assert [(r.name, r.alive) for r in rows] == [("p", True), ("b", True), ("driver", True)]
    worker.send_signal(signal.SIGTERM)
    assert worker.stderr is not None
    while "event=worker_stopped" not in read_line(worker.stderr):
        pass
    assert worker.wait(DEADLINE) == 0


@pytest.mark.parametrize(
    ("client", "refusal"),
    [
        ("no client certificate", "CERTIFICATE_REQUIRED|HANDSHAKE_FAILURE|reset by peer"),
        ("client certificate of an untrusted CA", "UNKNOWN_CA|reset by peer"),
        ("server certificate not trusted", "CERTIFICATE_VERIFY_FAILED"),
        ("plain TCP to the TLS port", "reset by peer|closed|lost"),
    ],
)
async def test_tls_refuses_a_client_without_trusted_certificates(
    tls_server: RedisServer, certs: Certificates, client: str, refusal: str
) -> None:
    url = {
        "no client certificate": tls_url(tls_server, certs.ca, None, None),
        "client certificate of an untrusted CA": tls_url(
            tls_server, certs.ca, certs.other_client_cert, certs.other_client_key
        ),
        "server certificate not trusted": tls_url(
            tls_server, certs.other_ca, certs.client_cert, certs.client_key
        ),
        "plain TCP to the TLS port": f"redis://127.0.0.1:{tls_server.port}/0",
    }[client]
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(ConnectionLost, match=f"cannot connect to Redis at .*({refusal})"):
            await rpc.Agent("a", url, "tls-refused").start()
    # The heartbeat thread's blocking connection is refused too. NOTE: under TLS 1.3 the
    # server judges a client certificate after the handshake; its alert reaches a blocking
    # socket only if the login was sent before the server hung up, else this reads "EOF".
    with pytest.raises(ConnectionLost, match=f"{refusal}|EOF occurred"):
        SyncConnection(RedisAddress.from_url(url), name="asyncgrad:tls-refused", timeout=DEADLINE)


async def test_tls_connection_closes_at_once_when_redis_stops_answering(
    tls_server: RedisServer, certs: Certificates
) -> None:
    url = tls_url(tls_server, certs.ca, certs.client_cert, certs.client_key)
    conn = await Connection.open(RedisAddress.from_url(url), name="asyncgrad:tls-close")
    assert await conn.execute("PING") == b"PONG"
    os.kill(tls_server.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        conn.close()
        # Without a bound, asyncio waits 30 s for the close_notify of a frozen server.
        async with asyncio.timeout(DEADLINE):
            await conn.closed.wait()
        assert time.monotonic() - started < 2
    finally:
        os.kill(tls_server.process.pid, signal.SIGCONT)


def test_security_md_lists_every_name_a_worker_exposes_by_itself() -> None:
    # A fresh interpreter: only what importing asyncgrad (as every worker does) exposes.
    probe = (
        "import asyncgrad; from asyncgrad.rpc import exposed; from asyncgrad.rpc.server "
        "import TRACE, UNANSWERED; print(*exposed.names(), UNANSWERED, TRACE)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    section = (ROOT / "SECURITY.md").read_text().split("## What every worker exposes")[1]
    table = section.split("\n## ")[0]
    listed = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `")}
    assert listed == set(out)


async def test_an_rref_reaches_methods_of_the_class_not_callable_attributes(
    redis_url: str, namespace: str
) -> None:
    from tests import fault_funcs  # noqa: F401 - exposes fault.Counter

    async with rpc.Agent("a", redis_url, namespace) as a, rpc.Agent("b", redis_url, namespace):
        counter = await a.remote("b", "fault.Counter", args=(1,))
        assert await counter.rpc_async().add(1) == 2
        with pytest.raises(ag.RemoteError) as raised:
            await counter.rpc_async().helper()
        assert raised.value.remote_type == "NotExposedError"
        assert "not a method of the exposed class" in str(raised.value)
