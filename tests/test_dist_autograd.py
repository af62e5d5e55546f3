"""Distributed autograd: backward passes that cross agents, against local computations.

Every test runs on a single Redis and on a Redis Cluster (the `cluster` mark).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

import asyncgrad as ag
from asyncgrad import dist_autograd, rpc
from asyncgrad.tensor import gradients
from tests import dist_funcs  # noqa: F401 - exposes the dt.* functions
from tests.conftest import redis_py

pytestmark = pytest.mark.cluster

X = np.random.default_rng(0).standard_normal((3, 4))


def local_chain(weights: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
    """The same chain, on the local engine: the reference for every distributed result."""
    ws = [ag.tensor(w, requires_grad=True) for w in weights]
    h = ag.tensor(X)
    for w in ws:
        h = (h @ w).tanh()
    loss = h.sum()
    loss.backward()
    return loss.item(), [w.grad for w in ws]


async def chain_backward(driver: rpc.Agent, workers: list[str]) -> None:
    """X through `dt.layer` on each worker in turn, a distributed backward, and the
    workers' gradients checked against the local engine's."""
    async with dist_autograd.context() as ctx:
        h = ag.tensor(X)
        for seed, name in enumerate(workers):
            h = await driver.rpc_async(name, "dt.layer", args=(h, seed))
        await dist_autograd.backward(ctx, [h.sum()])
        weights_and_grads = [
            (
                await driver.rpc_async(name, "dt.weight_data", args=(seed,)),
                await driver.rpc_async(name, "dt.weight_grad", args=(ctx, seed)),
            )
            for seed, name in enumerate(workers)
        ]
    _, want = local_chain([weight for weight, _ in weights_and_grads])
    for (_, got), expected in zip(weights_and_grads, want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.fixture
async def driver(redis_url: str, namespace: str) -> AsyncIterator[rpc.Agent]:
    async with rpc.Agent("driver", redis_url, namespace) as agent:
        yield agent


@pytest.fixture
async def workers(make_agent: Callable[..., Any]) -> list[rpc.Agent]:
    return [await make_agent(f"w{i}") for i in range(1, 4)]


async def settle(driver: rpc.Agent, agents: list[rpc.Agent]) -> None:
    """Round trips to every agent: messages they were sent before are handled by then."""
    for agent in agents:
        await driver.rpc_async(agent.name, "dt.context_count")


async def test_chain_through_three_workers_matches_local(
    driver: rpc.Agent, workers: list[rpc.Agent]
) -> None:
    async with dist_autograd.context() as ctx:
        assert ctx >> 48 == driver.id
        h = ag.tensor(X)
        for i, w in enumerate(workers):
            h = await rpc.rpc_async(w.name, "dt.layer", args=(h, i))
        assert h.requires_grad
        assert type(h.grad_fn).__name__ == "RecvRpcBackward"
        loss = h.sum()
        await dist_autograd.backward(ctx, [loss])
        grads = [
            await rpc.rpc_async(w.name, "dt.weight_grad", args=(ctx, i))
            for i, w in enumerate(workers)
        ]
        weights = [
            await rpc.rpc_async(w.name, "dt.weight_data", args=(i,)) for i, w in enumerate(workers)
        ]
        assert dist_autograd.get_gradients(ctx) == {}  # the driver holds no leaves
    ref_loss, ref_grads = local_chain(weights)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    # .grad is never touched by a distributed backward
    for i, w in enumerate(workers):
        assert await driver.rpc_async(w.name, "dt.weight_dot_grad", args=(i,)) is None


async def test_leaf_on_the_driver_gets_its_gradient(
    driver: rpc.Agent, workers: list[rpc.Agent]
) -> None:
    x = ag.tensor(X, requires_grad=True)
    async with dist_autograd.context() as ctx:
        y = await rpc.rpc_async("w1", "dt.layer", args=(x, 0))
        await dist_autograd.backward(ctx, [y.sum()])
        grads = dist_autograd.get_gradients(ctx)
        w = await rpc.rpc_async("w1", "dt.weight_data", args=(0,))
    xl = ag.tensor(X, requires_grad=True)
    (xl @ ag.tensor(w)).tanh().sum().backward()
    np.testing.assert_allclose(grads[x], xl.grad, rtol=1e-12)
    assert x.grad is None


async def test_a_local_backward_through_a_received_tensor_says_what_to_call(
    driver: rpc.Agent, workers: list[rpc.Agent]
) -> None:
    x = ag.tensor(X, requires_grad=True)
    async with dist_autograd.context() as ctx:
        y = await rpc.rpc_async("w1", "dt.layer", args=(x, 0))
        assert isinstance(y.grad_fn, dist_autograd.RecvRpcBackward)
        message = (
            r"^this graph crosses workers: it holds a tensor received from 'w1' in a "
            r"dist_autograd context, so loss.backward\(\) cannot run through it; call "
            r"`await dist_autograd.backward\(context_id, \[loss\]\)` inside that context$"
        )
        with pytest.raises(RuntimeError, match=message):
            (y.sum() * 2).backward()
        with pytest.raises(RuntimeError, match=message):
            gradients([(y * x).sum()])  # x is a local leaf too: still refused, not half done
        assert x.grad is None
        await dist_autograd.backward(ctx, [y.sum()])  # the context is still usable
        assert x in dist_autograd.get_gradients(ctx)


async def test_nested_rpc(driver: rpc.Agent, workers: list[rpc.Agent]) -> None:
    async with dist_autograd.context() as ctx:
        h = await rpc.rpc_async("w1", "dt.forward_to", args=(ag.tensor(X), 0, "w2"))
        await dist_autograd.backward(ctx, [h.sum()])
        g0 = await rpc.rpc_async("w1", "dt.weight_grad", args=(ctx, 0))
        g1 = await rpc.rpc_async("w2", "dt.weight_grad", args=(ctx, 1))
        weights = [await rpc.rpc_async("w1", "dt.weight_data", args=(0,)),
                   await rpc.rpc_async("w2", "dt.weight_data", args=(1,))]  # fmt: skip
    _, ref = local_chain(weights)
    np.testing.assert_allclose(g0, ref[0], rtol=1e-12)
    np.testing.assert_allclose(g1, ref[1], rtol=1e-12)


async def test_rpc_to_self(driver: rpc.Agent) -> None:
    x = ag.tensor(X, requires_grad=True)
    async with dist_autograd.context() as ctx:
        y = await rpc.rpc_async("driver", "dt.product", args=(x, x))
        await dist_autograd.backward(ctx, [y.sum()])
        np.testing.assert_allclose(dist_autograd.get_gradients(ctx)[x], 2 * X)


async def test_one_tensor_sent_twice_and_used_twice(
    driver: rpc.Agent, workers: list[rpc.Agent]
) -> None:
    x = ag.tensor(X, requires_grad=True)
    async with dist_autograd.context() as ctx:
        a = await rpc.rpc_async("w1", "dt.product", args=(x, x))  # x twice in one message
        b = await rpc.rpc_async("w2", "dt.product", args=(x, a))  # and again, in another
        loss = (b * x).sum() + a.sum()
        await dist_autograd.backward(ctx, [loss])
        # loss = sum(x^4 + x^2): d/dx = 4x^3 + 2x
        np.testing.assert_allclose(
            dist_autograd.get_gradients(ctx)[x], 4 * X**3 + 2 * X, rtol=1e-12
        )


async def test_several_outputs_and_several_roots(
    driver: rpc.Agent, workers: list[rpc.Agent]
) -> None:
    async with dist_autograd.context() as ctx:
        y, z = await rpc.rpc_async("w1", "dt.two_outputs", args=(ag.tensor(X), 0))
        assert y.grad_fn is z.grad_fn and (y.output_nr, z.output_nr) == (0, 1)
        await dist_autograd.backward(ctx, [y.sum(), (z * z).sum()])
        got = await rpc.rpc_async("w1", "dt.weight_grad", args=(ctx, 0))
        w = ag.tensor(await rpc.rpc_async("w1", "dt.weight_data", args=(0,)), requires_grad=True)
    y = (ag.tensor(X) @ w).tanh()
    (y.sum() + ((y * 2) * (y * 2)).sum()).backward()
    np.testing.assert_allclose(got, w.grad, rtol=1e-12)


async def test_retain_graph_twice_doubles_gradients(
    driver: rpc.Agent, workers: list[rpc.Agent]
) -> None:
    async with dist_autograd.context() as ctx:
        y = await rpc.rpc_async("w1", "dt.layer", args=(ag.tensor(X), 0))
        loss = y.sum()
        await dist_autograd.backward(ctx, [loss], retain_graph=True)
        once = await rpc.rpc_async("w1", "dt.weight_grad", args=(ctx, 0))
        await dist_autograd.backward(ctx, [loss], retain_graph=True)
        twice = await rpc.rpc_async("w1", "dt.weight_grad", args=(ctx, 0))
    np.testing.assert_allclose(twice, 2 * once, rtol=1e-12)


async def test_second_backward_without_retain_graph_fails(
    driver: rpc.Agent, workers: list[rpc.Agent]
) -> None:
    async with dist_autograd.context() as ctx:
        y = await rpc.rpc_async("w1", "dt.layer", args=(ag.tensor(X), 0))
        loss = (y * 1.0).sum()
        await dist_autograd.backward(ctx, [loss])
        with pytest.raises(RuntimeError, match="retain_graph"):
            await dist_autograd.backward(ctx, [loss])


async def test_unused_result_does_not_hang(driver: rpc.Agent, workers: list[rpc.Agent]) -> None:
    async with dist_autograd.context() as ctx:
        used = await rpc.rpc_async("w1", "dt.layer", args=(ag.tensor(X), 0))
        unused = await rpc.rpc_async("w2", "dt.layer", args=(ag.tensor(X), 1))
        assert unused.requires_grad
        async with asyncio.timeout(5):
            await dist_autograd.backward(ctx, [used.sum()])
        assert await rpc.rpc_async("w1", "dt.weight_grad", args=(ctx, 0)) is not None
        assert await rpc.rpc_async("w2", "dt.weight_grad", args=(ctx, 1)) is None


async def test_remote_error_in_backward_reaches_the_caller(
    driver: rpc.Agent, workers: list[rpc.Agent]
) -> None:
    async with dist_autograd.context() as ctx:
        good = await rpc.rpc_async("w1", "dt.layer", args=(ag.tensor(X), 0))
        bad = await rpc.rpc_async("w2", "dt.explode", args=(good,))
        with pytest.raises(ag.RemoteError) as caught:
            await dist_autograd.backward(ctx, [bad.sum()])
        assert caught.value.remote_type == "ValueError"
        assert caught.value.worker == "w2"
        await settle(driver, workers)
        for agent in [driver, *workers]:
            assert agent.autograd.running() == []
        # No gradient from the failed pass stays anywhere
        assert await rpc.rpc_async("w1", "dt.weight_grad", args=(ctx, 0)) is None
        # and the context works again afterwards
        y = await rpc.rpc_async("w1", "dt.layer", args=(ag.tensor(X), 0))
        await dist_autograd.backward(ctx, [y.sum()])
        assert await rpc.rpc_async("w1", "dt.weight_grad", args=(ctx, 0)) is not None


async def test_concurrent_contexts_from_two_drivers(
    redis_url: str, namespace: str, workers: list[rpc.Agent]
) -> None:
    weights = [None, None, None]

    async def one_driver(name: str) -> list[tuple[np.ndarray, list[Any]]]:
        async with rpc.Agent(name, redis_url, namespace):

            async def one(scale: float) -> tuple[np.ndarray, list[Any]]:
                async with dist_autograd.context() as ctx:
                    h = ag.tensor(X * scale)
                    for i, w in enumerate(workers):
                        h = await rpc.rpc_async(w.name, "dt.layer", args=(h, i))
                    await dist_autograd.backward(ctx, [h.sum()])
                    grads = [
                        await rpc.rpc_async(w.name, "dt.weight_grad", args=(ctx, i))
                        for i, w in enumerate(workers)
                    ]
                    return X * scale, grads

            return await asyncio.gather(*(one(1 + k / 10) for k in range(10)))

    async with asyncio.timeout(30):
        results = [r for rs in await asyncio.gather(one_driver("da"), one_driver("db")) for r in rs]
        async with rpc.Agent("reader", redis_url, namespace) as reader:
            for i, w in enumerate(workers):
                weights[i] = await reader.rpc_async(w.name, "dt.weight_data", args=(i,))
    assert len(results) == 20
    for x, grads in results:
        ws = [ag.tensor(w, requires_grad=True) for w in weights]
        h = ag.tensor(x)
        for w in ws:
            h = (h @ w).tanh()
        h.sum().backward()
        for got, w in zip(grads, ws, strict=True):
            np.testing.assert_allclose(got, w.grad, rtol=1e-12)


@pytest.mark.timeout(60)
async def test_many_contexts_leave_nothing_behind(
    redis_url: str, driver: rpc.Agent, workers: list[rpc.Agent], namespace: str
) -> None:
    client = redis_py(redis_url)
    try:

        async def step() -> None:
            async with dist_autograd.context() as ctx:
                h = ag.tensor(X)
                for i, w in enumerate(workers):
                    h = await rpc.rpc_async(w.name, "dt.layer", args=(h, i))
                await dist_autograd.backward(ctx, [h.sum()])

        await step()
        await settle(driver, workers)
        keys_before = sorted(client.scan_iter(match=f"{namespace}:*"))
        for _ in range(1000):
            await step()
        await settle(driver, workers)
        await settle(driver, workers)
        for agent in [driver, *workers]:
            assert agent.autograd.by_id == {}
        assert sorted(client.scan_iter(match=f"{namespace}:*")) == keys_before
        for key in keys_before:
            if client.type(key) == b"stream":
                assert client.xlen(key) <= 2  # at most the settle round trips still in flight
    finally:
        client.close()


async def test_get_gradients_of_unknown_context(driver: rpc.Agent) -> None:
    with pytest.raises(LookupError):
        dist_autograd.get_gradients(12345)
    async with dist_autograd.context() as ctx:
        pass
    with pytest.raises(LookupError):
        dist_autograd.get_gradients(ctx)


async def test_nothing_is_recorded_outside_a_context(
    driver: rpc.Agent, workers: list[rpc.Agent]
) -> None:
    x = ag.tensor(X, requires_grad=True)
    y = await rpc.rpc_async("w1", "dt.layer", args=(x, 0))  # w1's weight requires grad
    assert y.grad_fn is None and not y.requires_grad  # a constant, as if made in no_grad
    # so a local backward cannot "work" and train nothing: it says nothing was recorded
    with pytest.raises(RuntimeError, match=r"does not require grad .* nothing recorded"):
        ag.nn.functional.mse_loss(y, ag.zeros(3, 4)).backward()
    assert x.grad is None
    assert await rpc.rpc_async("w1", "dt.weight_dot_grad", args=(0,)) is None
    # nor do a call's arguments arrive requiring grad on the callee
    assert await rpc.rpc_async("w1", "dt.requires_grad", args=(x,)) is False


async def test_a_call_not_recorded_inside_a_context_sends_constants(
    driver: rpc.Agent, workers: list[rpc.Agent]
) -> None:
    x = ag.tensor(X, requires_grad=True)
    async with dist_autograd.context():
        assert await rpc.rpc_async("w1", "dt.requires_grad", args=(x,)) is True
        with ag.no_grad():  # the sender records nothing: the callee gets a constant
            assert await rpc.rpc_async("w1", "dt.requires_grad", args=(x,)) is False
            y = await rpc.rpc_async("w1", "dt.layer", args=(x, 0))
        # w1 runs the call with grad enabled, in the context: its reply is recorded
        assert isinstance(y.grad_fn, dist_autograd.RecvRpcBackward)


async def test_abandoned_contexts_expire(driver: rpc.Agent, workers: list[rpc.Agent]) -> None:
    contexts = workers[0].autograd
    contexts.expiry = 0.2
    async with dist_autograd.context() as ctx:
        await rpc.rpc_async("w1", "dt.layer", args=(ag.tensor(X), 0))
        assert ctx in contexts.by_id
        # the driver "forgets" to release: drop its own record so no release is sent
        driver.autograd.by_id.pop(ctx)
    deadline = time.monotonic() + 5
    while ctx in contexts.by_id:
        assert time.monotonic() < deadline, "context never expired"
        await driver.rpc_async("w1", "dt.context_count")


@pytest.mark.parametrize(
    ("cls", "kw"),
    [(ag.optim.SGD, {"lr": 0.1, "momentum": 0.9}), (ag.optim.Adam, {"lr": 0.05})],
)
async def test_distributed_optimizer_steps_the_owner_and_keeps_its_state(
    driver: rpc.Agent, workers: list[rpc.Agent], cls: type, kw: dict[str, float]
) -> None:
    rrefs = await rpc.rpc_async("w1", "dt.param_rrefs", args=(0,))
    start = await rpc.rpc_async("w1", "dt.weight_data", args=(0,))
    opt = ag.optim.DistributedOptimizer(cls, rrefs, **kw)
    for _ in range(3):
        async with dist_autograd.context() as ctx:
            y = await rpc.rpc_async("w1", "dt.layer", args=(ag.tensor(X), 0))
            await dist_autograd.backward(ctx, [y.sum()])
            await opt.step(ctx)
    got = await rpc.rpc_async("w1", "dt.weight_data", args=(0,))
    w = ag.tensor(start, requires_grad=True)
    local = cls([w], **kw)
    for _ in range(3):
        local.zero_grad()
        (ag.tensor(X) @ w).tanh().sum().backward()
        local.step()
    np.testing.assert_allclose(got, w.data, rtol=1e-12)


async def _params() -> list[Any]:
    return []


# Each case makes its value anew: a generator would be used up by the first run.
@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        (
            lambda: [ag.tensor([1.0])],
            TypeError,
            r"^DistributedOptimizer wants parameter RRefs, but params_rref\[0\] is a Tensor: "
            r"wrap local parameters as `\[rpc.RRef\(p\) for p in model.parameters\(\)\]`, "
            r"or get a remote model's",
        ),
        (lambda: [None], TypeError, r"params_rref\[0\] is a NoneType: wrap"),
        (lambda: ag.nn.Linear(2, 2).parameters(), TypeError, r"params_rref\[0\] is a Parameter"),
        (lambda: ag.tensor([1.0]), TypeError, r"a list of parameter RRefs, not 'Tensor'"),
        (lambda: [], ValueError, "an empty list of parameter RRefs"),
    ],
)
async def test_distributed_optimizer_wants_parameter_rrefs(
    driver: rpc.Agent, params: Callable[[], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        ag.optim.DistributedOptimizer(ag.optim.SGD, params(), lr=0.1)


async def test_distributed_optimizer_hints_at_a_missing_await(driver: rpc.Agent) -> None:
    pending = _params()
    try:
        with pytest.raises(TypeError, match=r"params_rref is 'coroutine'.* a missing `await`"):
            ag.optim.DistributedOptimizer(ag.optim.SGD, pending, lr=0.1)  # type: ignore[arg-type]
    finally:
        pending.close()


async def test_distributed_optimizer_wants_an_optimizer_class(driver: rpc.Agent) -> None:
    param = ag.nn.Parameter([1.0])
    local = ag.optim.SGD([param], lr=0.1)
    with pytest.raises(TypeError, match=r"wants an optimizer class such as optim\.SGD, not <"):
        ag.optim.DistributedOptimizer(local, [rpc.RRef(param)])  # type: ignore[arg-type]


@pytest.mark.timeout(30)
async def test_a_worker_process_sends_constants_outside_a_context(
    driver: rpc.Agent, spawn_worker: Callable[..., Any]
) -> None:
    spawn_worker("p1", "tests.dist_funcs")
    x = ag.tensor(X, requires_grad=True)
    y = await rpc.rpc_async("p1", "dt.layer", args=(x, 0))
    assert not y.requires_grad and y.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()
    async with dist_autograd.context() as ctx:
        y = await rpc.rpc_async("p1", "dt.layer", args=(x, 0))
        assert isinstance(y.grad_fn, dist_autograd.RecvRpcBackward)
        await dist_autograd.backward(ctx, [y.sum()])
        assert await rpc.rpc_async("p1", "dt.weight_grad", args=(ctx, 0)) is not None
        assert x in dist_autograd.get_gradients(ctx)


@pytest.mark.timeout(30)
async def test_worker_killed_before_backward_fails_within_5_s(
    driver: rpc.Agent, spawn_worker: Callable[..., Any]
) -> None:
    worker = spawn_worker("doomed", "tests.dist_funcs")
    async with dist_autograd.context() as ctx:
        y = await rpc.rpc_async("doomed", "dt.layer", args=(ag.tensor(X), 0))
        os.kill(worker.pid, signal.SIGKILL)
        worker.process.wait(5)
        started = time.monotonic()
        with pytest.raises(ag.WorkerUnavailable):
            await dist_autograd.backward(ctx, [y.sum()])
        assert time.monotonic() - started < 5


@pytest.mark.timeout(30)
async def test_chain_through_worker_processes(
    driver: rpc.Agent, spawn_worker: Callable[..., Any]
) -> None:
    names = ["p1", "p2", "p3"]
    for name in names:
        spawn_worker(name, "tests.dist_funcs")
    await chain_backward(driver, names)
