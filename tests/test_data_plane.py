"""The data plane on one host: large arrays skip Redis, arrive exactly as sent, and fall
back to Redis whenever the direct path is not to be used (in-process agents: the local
socket and memfds; tests/test_hosts.py crosses network namespaces over TCP)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import asyncgrad as ag
from asyncgrad import dist_autograd, rpc
from asyncgrad.transport import DataSettings, RedisAddress
from asyncgrad.transport.data import DataPlane, RefField
from tests import data_funcs  # noqa: F401 - exposes the dp.* functions

pytestmark = pytest.mark.cluster

MiB = 1 << 20
LIMIT = 64 * 1024  # the tests' inline_limit: small arrays stay in the message


def arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    big = rng.standard_normal((256, 1024))
    return [
        big.astype(np.float32),
        big.astype(np.float64).T,  # not C-contiguous
        big.astype(">f4"),  # big-endian: arrives little-endian, as through Redis
        (big > 0),
        rng.integers(-100, 100, (3, 5, 70_000), dtype=np.int8),
        (big[:128] + 1j * big[128:]).astype(np.complex64),
        np.arange(10, dtype=np.uint16),  # small: stays inline
    ]


async def test_large_arrays_arrive_exactly_as_through_redis(
    make_agent: Callable[..., Any],
) -> None:
    """Values, dtypes, shapes and read-only views: the same by the data plane as through
    Redis; the large ones went direct (local socket), the small one did not."""
    direct = await make_agent("w", inline_limit=LIMIT)
    driver = await make_agent("d", inline_limit=LIMIT)
    via_redis = await make_agent("r", data_plane="redis")
    sent = arrays()
    got = await driver.rpc_async("w", "dp.echo", args=(sent,))
    reference = await driver.rpc_async("r", "dp.echo", args=(sent,))
    for a, b, want in zip(got, reference, sent, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape == want.shape
        np.testing.assert_array_equal(a, want)
        np.testing.assert_array_equal(a, b)
        assert not a.flags.writeable
        with pytest.raises(ValueError, match="WRITEABLE"):
            a.flags.writeable = True
    seen = await driver.rpc_async("w", "dp.describe", args=(sent,))
    assert seen == await driver.rpc_async("r", "dp.describe", args=(sent,))
    assert all(not writeable for _, _, writeable, _ in seen)
    large = sum(a.nbytes > LIMIT for a in sent)
    stats = driver.data_plane_stats()
    # To w: the echo and describe; to r: the first message only, which r asked for by
    # Redis (it sends through Redis only), after which the driver sent it frames inline.
    assert stats["sent_direct"] == 3 * large
    assert stats["served_redis"] == large and stats["sent_inline"] == 1
    assert stats["fetched_local"] == large  # the echo's reply
    assert direct.data_plane_stats()["fetched_local"] == 2 * large
    assert via_redis.data_plane_stats() == {"fetched_redis": large, "held": 0}


async def test_small_arrays_keep_the_redis_path(make_agent: Callable[..., Any]) -> None:
    await make_agent("w")
    driver = await make_agent("d")
    x = np.ones(1000, dtype=np.float32)
    np.testing.assert_array_equal(await driver.rpc_async("w", "dp.echo", args=(x,)), x)
    assert driver.data_plane_stats() == {"held": 0}


async def test_what_arrives_is_the_value_when_sent() -> None:
    """The sender changes its array after the send, before the receiver fetched it: the
    receiver gets the value at the send (a sealed snapshot), as through Redis. (Two data
    planes, no Redis: the local socket and memfds alone.)"""
    sender, receiver = data_plane("s"), data_plane("r")
    await sender.start()
    await receiver.start()
    try:
        x = np.zeros(MiB, dtype=np.float32)
        frames, tokens = sender.outgoing("r", [b"header", memoryview(x).cast("B")])
        assert type(frames[1]) is RefField and len(tokens) == 1
        x += 1
        await receiver.resolve(frames)
        assert not np.frombuffer(frames[1], np.float32).any()
        assert len(sender.held) == 0  # fetched once: no longer held
    finally:
        await sender.close()
        await receiver.close()


def data_plane(name: str) -> DataPlane:
    """A data plane with no Redis behind it: nobody is ever gone, nothing goes by Redis."""

    async def alive(agent: str) -> bool:
        return True

    def control(agent: str, fields: list[Any]) -> asyncio.Future[Any]:
        raise AssertionError("nothing should go through Redis here")

    settings = DataSettings(inline_limit=LIMIT)
    return DataPlane(name, RedisAddress(), settings, alive, control, check_every=0.5)


async def test_a_received_array_is_sent_on_without_a_copy(
    make_agent: Callable[..., Any],
) -> None:
    """The echo returns what it received: the worker sends back the file it got, and the
    frames held on both sides are gone once fetched."""
    worker = await make_agent("w")
    driver = await make_agent("d")
    x = np.random.default_rng(2).standard_normal(MiB)
    for _ in range(3):
        np.testing.assert_array_equal(await driver.rpc_async("w", "dp.echo", args=(x,)), x)
    assert worker.data_plane_stats()["sent_shared"] == 3
    assert "sent_shared" not in driver.data_plane_stats()
    # Each receiver took its frame as offered, and acked it; a round trip later both
    # senders have read the acks.
    await driver.rpc_async("w", "dp.stats")
    assert worker.data_plane_stats()["held"] == driver.data_plane_stats()["held"] == 0


async def test_a_receiver_on_the_redis_data_plane_gets_frames_through_redis(
    make_agent: Callable[..., Any],
) -> None:
    """Its first frame is asked for by Redis (one round trip more); its sender then sends
    it frames inline: exact values both ways, never an error."""
    await make_agent("w", data_plane="redis")
    driver = await make_agent("d")
    x = np.random.default_rng(3).standard_normal(MiB // 8)
    for _ in range(3):
        np.testing.assert_array_equal(await driver.rpc_async("w", "dp.echo", args=(x,)), x)
    stats = driver.data_plane_stats()
    assert stats["sent_direct"] == stats["served_redis"] == 1
    assert stats["sent_inline"] == 2
    worker_stats = await driver.rpc_async("w", "dp.stats")
    assert worker_stats == {"fetched_redis": 1, "held": 0}


async def test_a_sender_on_the_redis_data_plane_sends_inline(
    make_agent: Callable[..., Any],
) -> None:
    await make_agent("w")
    driver = await make_agent("d", data_plane="redis")
    x = np.random.default_rng(4).standard_normal(MiB // 8)
    np.testing.assert_array_equal(await driver.rpc_async("w", "dp.echo", args=(x,)), x)
    # The worker's reply went direct: the driver, which never serves, still fetches.
    assert driver.data_plane_stats() == {"fetched_redis": 1, "held": 0}
    worker = await driver.rpc_async("w", "dp.stats")
    assert "fetched_local" not in worker and worker["served_redis"] == 1


async def test_a_message_over_the_receivers_limit_is_refused_unfetched(
    make_agent: Callable[..., Any],
) -> None:
    """The receiver refuses by the reference's declared size, before fetching a byte, with
    the codec's error as through Redis; the sender drops the frame it held."""
    await make_agent("w", max_message_size=MiB)
    driver = await make_agent("d")
    x = np.ones(MiB, dtype=np.float32)  # 4 MiB
    with pytest.raises(ag.RemoteError) as caught:
        await driver.rpc_async("w", "dp.echo", args=(x,))
    assert caught.value.remote_type == "CodecError"
    assert "exceeds the limit" in str(caught.value)
    assert "fetched_local" not in await driver.rpc_async("w", "dp.stats")
    assert driver.data_plane_stats()["held"] == 0


async def test_a_distributed_backward_sends_large_gradients_direct(
    make_agent: Callable[..., Any], redis_url: str, namespace: str
) -> None:
    """2 MiB activations forward and 2 MiB gradients backward, by the data plane; the
    gradients equal the local engine's."""
    await make_agent("w")
    x = ag.tensor(np.random.default_rng(5).standard_normal((1024, 512)).astype(np.float32))
    x.requires_grad_()
    async with rpc.Agent("d", redis_url, namespace) as driver, dist_autograd.context() as ctx:
        y = await driver.rpc_async("w", "dp.layer", args=(x,))
        await dist_autograd.backward(ctx, [(y * y).sum()])
        dx = dist_autograd.get_gradients(ctx)[x]
        w, dw = await driver.rpc_async("w", "dp.weight_and_grad", args=(ctx,))
        worker = await driver.rpc_async("w", "dp.stats")
        fetched = driver.data_plane_stats()["fetched_local"]
    xl, wl = ag.tensor(x.data, requires_grad=True), ag.tensor(w, requires_grad=True)
    yl = (xl @ wl).tanh()
    (yl * yl).sum().backward()
    np.testing.assert_allclose(dx, xl.grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw, wl.grad, rtol=1e-5, atol=1e-5)
    assert worker["fetched_local"] >= 2  # x forward, dy backward
    assert fetched >= 2  # y, dx


@pytest.mark.parametrize("limit", [0, 1])
async def test_any_limit_works(make_agent: Callable[..., Any], limit: int) -> None:
    """Even message bodies go direct at limit 0 or 1: only the header never does."""
    await make_agent("w", inline_limit=limit)
    driver = await make_agent("d", inline_limit=limit)
    value = {"a": np.arange(5), "s": "text", "n": [1, 2.5, None]}
    got = await driver.rpc_async("w", "dp.echo", args=(value,))
    np.testing.assert_array_equal(got["a"], value["a"])
    assert got["s"] == "text" and got["n"] == [1, 2.5, None]
    assert driver.data_plane_stats()["sent_direct"] >= 1


def test_bad_settings_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="data_plane"):
        rpc.Agent("a", data_plane="tcp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="inline_limit"):
        rpc.Agent("a", inline_limit=-1)
    with pytest.raises(ValueError, match="data_port"):
        rpc.Agent("a", data_port=70000)
