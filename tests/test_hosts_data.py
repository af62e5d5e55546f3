"""The data plane between simulated hosts (asyncgrad.simulated_hosts, as in
tests/test_hosts.py): TCP from host to host, TLS when the control plane has it, Redis
when a data port cannot be reached, and a transfer cut by SIGKILL on a slow link.

Needs root: skipped, with the reason, where network namespaces cannot be made.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

import asyncgrad as ag
from asyncgrad import rpc
from asyncgrad.embedded import EmbeddedRedis
from asyncgrad.local_cluster import LocalCluster
from asyncgrad.simulated_hosts import SimulatedHost
from tests.conftest import LogEvents
from tests.security_fixtures import make_certificates, start_tls_server
from tests.test_hosts import MODULES, SPAWN_TIMEOUT_S

MiB = 1 << 20
FAILURE_S = 2.0  # every agent's failure_timeout here: a dead peer is found within it


def workers_on(
    hosts: dict[str, SimulatedHost], url: str, env: dict[str, str] | None = None
) -> LocalCluster:
    """w1 and w2 on their hosts (with `env` set for w1), failure timeout FAILURE_S."""
    prefix = {name: hosts[name].prefix for name in ("w1", "w2")}
    if env:
        prefix["w1"] = (*prefix["w1"], "env", *(f"{k}={v}" for k, v in env.items()))
    return LocalCluster(
        dict.fromkeys(prefix, MODULES),
        url,
        "hostsdata-" + uuid.uuid4().hex[:8],
        ready_timeout=SPAWN_TIMEOUT_S,
        worker_args=["--failure-timeout", str(FAILURE_S)],
        command_prefix=prefix,
    )


def memfds(pid: str = "self") -> int:
    """How many memfds of the data plane the process has open."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            count += "memfd:asyncgrad-frame" in os.readlink(f"/proc/{pid}/fd/{fd}")
    return count


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "advertised",
    [
        pytest.param("127.0.0.1", id="refused"),  # the driver's own loopback: nothing there
        pytest.param("192.0.2.1", id="unreachable"),  # TEST-NET-1: no route from any host
    ],
)
async def test_a_data_port_out_of_reach_falls_back_to_redis(
    hosts: dict[str, SimulatedHost],
    redis_on_host: EmbeddedRedis,
    on_driver_host: None,
    advertised: str,
) -> None:
    """w1 advertises a data address the driver cannot reach: the driver gets w1's large
    results through Redis, exactly, at once (no connect timeout: refused, or no route),
    and w1 sends it later ones inline. Never an error."""
    with workers_on(hosts, redis_on_host.url, {"ASYNCGRAD_DATA_HOST": advertised}) as cluster:
        async with rpc.Agent("driver", cluster.redis_url, cluster.namespace) as driver:
            x = np.random.default_rng(0).standard_normal(MiB // 4).astype(np.float32)
            started = time.monotonic()
            np.testing.assert_array_equal(await driver.rpc_async("w1", "echo", args=(x,)), x)
            assert time.monotonic() - started < 1.0
            for _ in range(2):
                got = await driver.rpc_async("w1", "echo", args=(x,))
                np.testing.assert_array_equal(got, x)
            assert driver.data_plane_stats()["fetched_redis"] == 1
            w1 = await driver.rpc_async("w1", "hosts.data_plane_stats")
            # w1 fetched the driver's arguments by TCP; its results went by Redis once,
            # then inline.
            assert w1["fetched_tcp"] == 3 and w1["served_redis"] == 1 and w1["sent_inline"] == 2


@pytest.mark.timeout(60)
async def test_with_tls_redis_the_data_connections_use_tls(
    hosts: dict[str, SimulatedHost], on_driver_host: None, tmp_path: Path
) -> None:
    """rediss:// with a client certificate: frames cross hosts by TCP, in TLS. The data
    port speaks nothing but TLS to a plain client, and the driver checked the port's
    certificate against the fingerprint its reference named."""
    certs = make_certificates(tmp_path)
    redis_host = hosts["redis"]
    with redis_host.entered():
        # Not protected mode: no password, and clients come from other hosts.
        server = start_tls_server(certs, ["--bind", redis_host.address, "--protected-mode", "no"])
    try:
        url = (
            f"rediss://{redis_host.address}:{server.port}/0?ssl_ca_certs={certs.ca}"
            f"&ssl_certfile={certs.client_cert}&ssl_keyfile={certs.client_key}"
            "&ssl_check_hostname=false"  # the server's certificate names 127.0.0.1
        )
        with workers_on(hosts, url) as cluster:
            async with rpc.Agent("driver", url, cluster.namespace) as driver:
                x = np.random.default_rng(1).standard_normal(MiB).astype(np.float32)
                np.testing.assert_array_equal(await driver.rpc_async("w1", "echo", args=(x,)), x)
                assert driver.data_plane_stats()["fetched_tcp"] == 1
                w1 = await driver.rpc_async("w1", "hosts.data_plane_stats")
                assert w1["fetched_tcp"] == w1["served_tcp"] == 1
                host, _, port = (await w1_data_address(driver)).rpartition(":")
                with socket.create_connection((host, int(port)), timeout=5) as plain:
                    plain.sendall(b"AGD1" + bytes(16))
                    with contextlib.suppress(ConnectionResetError):  # or a clean close
                        assert plain.recv(64) == b""  # nothing for a request outside TLS
    finally:
        server.stop()


async def w1_data_address(driver: rpc.Agent) -> str:
    beat = await driver._transport.heartbeats(["w1"])  # its heartbeat names its data port
    assert beat[0] is not None
    return beat[0]["data"]


def throttle(host: SimulatedHost, mbit: int) -> None:
    """Limit what `host` sends to `mbit` Mbit/s: a transfer of 64 MiB then takes seconds."""
    subprocess.run(
        [*host.prefix, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate",
         f"{mbit}mbit", "burst", "64kb", "latency", "5s"],
        check=True, capture_output=True, timeout=10,
    )  # fmt: skip


def sent_bytes(host: SimulatedHost) -> int:
    out = subprocess.run(
        [*host.prefix, "tc", "-s", "qdisc", "show", "dev", "eth0"],
        check=True, capture_output=True, text=True, timeout=10,
    ).stdout  # fmt: skip
    return int(out.split("Sent ", 1)[1].split()[0])


@pytest.mark.timeout(60)
async def test_a_sender_killed_mid_transfer_fails_the_call_within_the_failure_window(
    hosts: dict[str, SimulatedHost], redis_on_host: EmbeddedRedis, on_driver_host: None
) -> None:
    """w1's 64 MiB result crawls to the driver over a 100 Mbit/s link; w1 is SIGKILLed
    with part of it sent: the call fails with OutcomeUnknown (it ran) within the failure
    window, the driver keeps nothing of the transfer and goes on working."""
    throttle(hosts["w1"], 100)
    with workers_on(hosts, redis_on_host.url) as cluster:
        async with rpc.Agent(
            "driver", cluster.redis_url, cluster.namespace, failure_timeout=FAILURE_S
        ) as driver:
            before = sent_bytes(hosts["w1"])
            call = asyncio.ensure_future(driver.rpc_async("w1", "hosts.ones", args=(16 * MiB,)))
            # Needs ~5.4 s on this link: not done in 1 s, so the bytes are on their way.
            done, _ = await asyncio.wait({call}, timeout=1.0)
            assert not done
            assert sent_bytes(hosts["w1"]) - before > 2 * MiB  # part of the frame left
            cluster.kill("w1")
            killed = time.monotonic()
            with pytest.raises(ag.OutcomeUnknown, match="result was lost"):
                await call
            assert time.monotonic() - killed < FAILURE_S + 1.0
            assert memfds() == 0  # the half-received frame's file is gone
            np.testing.assert_array_equal(
                await driver.rpc_async("w2", "echo", args=(np.ones(MiB),)), np.ones(MiB)
            )


@pytest.mark.timeout(60)
async def test_a_receiver_killed_mid_transfer_fails_the_call_and_frees_the_frame(
    hosts: dict[str, SimulatedHost],
    redis_on_host: EmbeddedRedis,
    on_driver_host: None,
    log_events: LogEvents,
) -> None:
    """The driver's 64 MiB argument crawls to w1 over a 100 Mbit/s link; w1 is SIGKILLed
    with part of it received: the call fails within the failure window as one w1 took
    (OutcomeUnknown), the driver stops holding the frame (no memfd left) and serves on."""
    throttle(hosts["driver"], 100)
    with workers_on(hosts, redis_on_host.url) as cluster:
        async with rpc.Agent(
            "driver", cluster.redis_url, cluster.namespace, failure_timeout=FAILURE_S
        ) as driver:
            x = np.ones(16 * MiB, dtype=np.float32)
            before = sent_bytes(hosts["driver"])
            call = asyncio.ensure_future(driver.rpc_async("w1", "echo", args=(x,)))
            done, _ = await asyncio.wait({call}, timeout=1.0)
            assert not done
            assert sent_bytes(hosts["driver"]) - before > 2 * MiB
            assert memfds() == 1  # the frame, held for w1
            cluster.kill("w1")
            killed = time.monotonic()
            with pytest.raises(ag.OutcomeUnknown):
                await call
            assert time.monotonic() - killed < FAILURE_S + 1.0
            await log_events.wait("event=data_dropped")  # the sweep found w1 gone
            assert driver.data_plane_stats()["held"] == 0
            assert memfds() == 0
            small = np.arange(10)
            np.testing.assert_array_equal(
                await driver.rpc_async("w2", "echo", args=(small,)), small
            )
