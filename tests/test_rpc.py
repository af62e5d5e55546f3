"""The RPC contract (README.md, "RPC"), in process: several agents in one event loop, real Redis.

Each test makes its agents with `make_agent` (or `async with Agent(...)` where entering
the block is the point) in its own namespace. A call is held in flight with a `Gate`
(an `asyncio.Event` the served function waits on), never with a timer; every wait has a
deadline. Reference counting is observed on the owner's table (`agent.references.owned`,
whose len() is the number of values it owns) after round trips to the owner, which order the
release messages sent before them.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import itertools
import os
import pickle
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import asyncgrad as ag
from asyncgrad import rpc
from asyncgrad.errors import AgentNameTaken
from asyncgrad.messages import Call
from asyncgrad.rpc import Agent, RRef, WorkerInfo
from tests import rpc_funcs as f
from tests.conftest import own_namespace
from tests.rpc_funcs import CALLS, Box, Gate, Holder

DEADLINE = 5.0  # seconds any single wait in this file may take before the test fails
# Exposed names, for calls made from inside served functions.
WHOAMI, INSPECT, GATED = (f"tests.rpc_funcs:{n}" for n in ("whoami", "inspect_rref", "gated"))
MakeAgent = Callable[..., Any]


@pytest.fixture(autouse=True)
def _fresh_funcs_state() -> Iterator[None]:
    yield
    Gate.gates.clear()
    CALLS.clear()


def gate() -> Gate:
    return Gate(uuid.uuid4().hex)


def key() -> str:
    return uuid.uuid4().hex


async def until(condition: Callable[[], bool], caller: Agent, to: str) -> None:
    """Round trips from `caller` to `to` until `condition()` holds, within DEADLINE.

    Collects garbage first, so RRefs nobody references are released; each round trip
    lets the messages queued before it (releases, leave notices) reach `to` first.
    """
    async with asyncio.timeout(DEADLINE):
        while True:
            gc.collect()
            if condition():
                return
            await caller.rpc_async(to, f.echo, args=(None,))


async def gated_call(
    caller: Agent, to: str, g: Gate, value: Any = None, timeout: float | None = None
) -> asyncio.Task[Any]:
    """A call to `gated` on `to`, once it is being served there."""
    call = asyncio.create_task(caller.rpc_async(to, f.gated, args=(g.key, value), timeout=timeout))
    async with asyncio.timeout(DEADLINE):
        await g.entered.wait()
    return call


def same(a: Any, b: Any) -> bool:
    """Equal values of exactly the same types, all the way down (tuples stay tuples)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and bool(a == b)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


# *** expose ***


@pytest.mark.cluster
async def test_sync_function(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    assert await a.rpc_async("b", f.add, args=(2, 3)) == 5


@pytest.mark.cluster
async def test_async_function(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    assert await a.rpc_async("b", f.mul, args=(6, 7)) == 42


@pytest.mark.cluster
async def test_exposed_class_made_remotely(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    box = await a.remote("b", Box, args=(5,))
    assert await box.rpc_async().get() == 5


async def test_expose_under_a_given_name(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    assert await a.rpc_async("b", f.forward, args=(1,)) == ("forward", 1)
    assert await a.rpc_async("b", "ps.forward", args=(2,)) == ("forward", 2)


async def test_call_by_default_name_module_qualname(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    assert await a.rpc_async("b", "tests.rpc_funcs:add", args=(1, 2)) == 3
    box = await a.remote("b", "tests.rpc_funcs:Box", args=("x",))
    assert await box.rpc_async().get() == "x"


def test_expose_returns_the_object_unchanged() -> None:
    assert f.add(1, 2) == 3
    assert isinstance(Box(1), Box)
    with pytest.raises(TypeError):
        rpc.expose(42)  # type: ignore[call-overload]


@pytest.mark.parametrize("name", ["os:system", "builtins:eval", "builtins:exec"])
@pytest.mark.cluster
async def test_unexposed_name_runs_nothing(
    make_agent: MakeAgent, tmp_path: Path, name: str
) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    marker = tmp_path / "ran"
    payload = {
        "os:system": f"touch {marker}",
        "builtins:eval": f"open({str(marker)!r}, 'w')",
        "builtins:exec": f"open({str(marker)!r}, 'w')",
    }[name]
    with pytest.raises(ag.RemoteError) as raised:
        await a.rpc_async("b", name, args=(payload,))
    assert raised.value.remote_type == "NotExposedError"
    assert raised.value.worker == "b"
    assert not marker.exists()


@pytest.mark.parametrize(
    "name",
    ["tests.rpc_funcs:Box.get", "tests.rpc_funcs:Box._secret", "tests.rpc_funcs:CALLS.clear"],
)
async def test_names_are_looked_up_never_walked(make_agent: MakeAgent, name: str) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    CALLS["untouched"] = 1
    with pytest.raises(ag.RemoteError) as raised:
        await a.rpc_async("b", name, args=(None,))
    assert raised.value.remote_type == "NotExposedError"
    assert CALLS == {"untouched": 1}


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        (
            "mymodule:scale",
            "decorate it with @rpc.expose in a module the worker imports "
            "(`asyncgrad worker b --import mymodule`)",
        ),
        (
            "ps.scale",
            "decorate it with @rpc.expose in a module the worker imports "
            "(`asyncgrad worker b --import MODULE`)",
        ),
        (
            "__main__:scale",
            "functions defined in the script being run cannot be called remotely; put them in "
            "a module both sides import, and start the worker with "
            "`asyncgrad worker b --import MODULE`",
        ),
    ],
)
async def test_not_exposed_says_how_to_expose(make_agent: MakeAgent, name: str, hint: str) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    with pytest.raises(ag.RemoteError) as raised:
        await a.rpc_async("b", name)
    assert raised.value.remote_type == "NotExposedError"
    assert raised.value.message == f"{name!r} is not exposed on this worker: {hint}"


async def test_importable_but_unexposed_class_runs_nothing(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    with pytest.raises(ag.RemoteError) as raised:
        await a.remote("b", f.NotExposed)
    assert raised.value.remote_type == "NotExposedError"
    assert CALLS["NotExposed"] == 0


async def test_subclass_of_an_exposed_class_is_not_exposed(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    with pytest.raises(ag.RemoteError) as raised:
        await a.remote("b", f.Derived)
    assert raised.value.remote_type == "NotExposedError"
    base = await a.remote("b", f.Base)
    assert await base.rpc_async().kind() == "base"


# *** arguments and results ***


@pytest.mark.cluster
async def test_args_and_kwargs(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    got = await a.rpc_async("b", f.describe, args=(1, "two"), kwargs={"three": 3.0, "four": None})
    assert got["args"] == (1, "two")
    assert got["kwargs"] == {"three": 3.0, "four": None}
    assert await a.rpc_async("b", f.add, kwargs={"a": 1, "b": 2}) == 3
    assert await a.rpc_async("b", f.add, args=[1], kwargs={"b": 2}) == 3  # any sequence


TRAVELLING = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    1.5,
    -0.0,
    float("inf"),
    "",
    "héllo ✓",
    b"",
    b"\x00\xff" * 100,
    [],
    [1, "a", None],
    (),
    (1,),
    (1, (2, (3,)), [4, (5,)]),
    {},
    {"a": 1, 2: "b", (1, 2): [3], None: b"x", True: ()},
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array([True, False]),
    np.arange(5, dtype=np.int8),
    np.arange(5, dtype=np.uint16),
    np.arange(5, dtype=np.int64),
    np.linspace(0, 1, 7, dtype=np.float64),
    np.ones((2, 0, 3), dtype=np.float16),
    np.array(3.5),
    np.array([1 + 2j], dtype=np.complex64),
    np.arange(20, dtype=np.float64)[::3],  # not contiguous
    np.float32(1.5),
    np.float64(-2.25),
    np.int64(7),
    np.uint8(255),
    np.bool_(True),
    np.complex128(1 - 1j),
    {"nested": [({"arr": np.eye(2)},), [np.int32(3), (b"z", [None])]]},
]


@pytest.mark.parametrize("value", TRAVELLING, ids=lambda v: type(v).__name__)
async def test_values_that_travel_both_ways(make_agent: MakeAgent, value: Any) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    back = await a.rpc_async("b", f.echo, args=(value,))
    assert same(back, value), (back, value)


async def test_tuple_arguments_stay_tuples_on_the_callee(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    got = await a.rpc_async("b", f.describe, args=((1, 2), [3], {"k": (4,)}))
    assert got["types"] == ["tuple", "list", "dict"]
    assert same(got["args"], ((1, 2), [3], {"k": (4,)}))


@pytest.mark.cluster
async def test_tensors_keep_data_and_dtype_and_arrive_as_constants(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    leaf = ag.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    plain = ag.tensor(np.arange(3, dtype=np.int32))
    param = ag.nn.Parameter(np.zeros(2, dtype=np.float64))
    back = await a.rpc_async("b", f.echo, args=([leaf, plain, param, (leaf * 2).sum()],))
    assert all(isinstance(t, ag.Tensor) for t in back)
    (t1, t2, t3, t4) = back
    assert t1.dtype == np.float32 and np.array_equal(t1.data, leaf.data)
    assert t2.dtype == np.int32
    assert t3.dtype == np.float64
    assert t4.item() == 20.0
    # Only arrays travel, never graphs, and outside a dist_autograd context nothing is
    # recorded: what arrives is a constant (tests/test_dist_autograd.py: inside one).
    assert all(t.is_leaf and not t.requires_grad for t in back)


async def test_tensor_arithmetic_on_the_callee(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    x, y = ag.tensor([1.0, 2.0]), ag.tensor([10.0, 20.0])
    out = await a.rpc_async("b", f.add, args=(x, y))
    assert isinstance(out, ag.Tensor) and out.data.tolist() == [11.0, 22.0]


UNSERIALISABLE = [
    {1, 2},
    frozenset(),
    object(),
    lambda: None,
    Box(1),
    np.array([object()], dtype=object),
    np.datetime64("2024-01-01"),
    2**64,
    {"deep": [1, (2, {"x": {3}})]},
]


@pytest.mark.parametrize("bad", UNSERIALISABLE, ids=lambda v: type(v).__name__)
async def test_unserialisable_argument_raises_before_sending(
    make_agent: MakeAgent, bad: Any
) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    k = key()
    with pytest.raises(TypeError):
        await a.rpc_async("b", f.count, args=(k, bad))
    with pytest.raises(TypeError):
        await a.rpc_async("b", f.count, args=(k,), kwargs={"x": bad})
    with pytest.raises(TypeError):
        await a.remote("b", f.count, args=(k, bad))
    # b serves its inbox in order: had anything been sent, it would have been counted first.
    assert await a.rpc_async("b", f.count, args=(k,)) == 1


ALLOWED = "allowed types are None, bool, int"


async def test_unserialisable_argument_is_placed_in_the_callers_values(
    make_agent: MakeAgent,
) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    model = {"layers": [1, 2, {3}]}
    set_at = r"cannot encode a value of type 'set' at args\[0\]\['layers'\]\[2\]: " + ALLOWED
    with pytest.raises(TypeError, match=set_at):
        await a.rpc_async("b", f.echo, args=(model,))
    with pytest.raises(TypeError, match=set_at):
        await a.remote("b", f.echo, args=(model,))
    box = await a.remote("b", Box, args=(1,))
    with pytest.raises(TypeError, match=set_at):
        await box.rpc_async().set(model)
    with pytest.raises(TypeError, match=r"type 'object' at kwargs\['w'\]\['seed'\]: " + ALLOWED):
        await a.rpc_async("b", f.describe, kwargs={"w": {"seed": object()}})
    with pytest.raises(TypeError, match=r"type 'Box' at args\[1\]\['k'\]\[0\]: "):
        await a.rpc_async("b", f.describe, args=(1, {"k": [Box()]}))
    with pytest.raises(TypeError, match=r"type 'frozenset' at args\[0\]<key frozenset\(\)>: "):
        await a.rpc_async("b", f.describe, args=({frozenset(): 1},))


async def test_a_coroutine_passed_by_mistake_hints_at_a_missing_await(
    make_agent: MakeAgent,
) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    pending = f.mul(2, 3)  # a coroutine: `await` was forgotten
    try:
        message = r"^cannot encode a value of type 'coroutine' at args\[0\]: .*a missing `await`\?$"
        with pytest.raises(TypeError, match=message):
            await a.rpc_async("b", f.echo, args=(pending,))
    finally:
        pending.close()
    task = asyncio.ensure_future(asyncio.sleep(0))
    with pytest.raises(TypeError, match=r"'Task' at kwargs\['t'\]: .*a missing `await`\?$"):
        await a.rpc_async("b", f.describe, kwargs={"t": task})
    await task


async def test_keyword_names_must_be_strings(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    k = key()
    with pytest.raises(TypeError):
        await a.rpc_async("b", f.count, args=(k,), kwargs={1: 2})
    assert await a.rpc_async("b", f.count, args=(k,)) == 1


async def test_unserialisable_result_is_a_remote_type_error(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    with pytest.raises(ag.RemoteError) as raised:
        await a.rpc_async("b", f.unserialisable_result)
    assert raised.value.remote_type == "TypeError"
    assert raised.value.worker == "b"
    assert raised.value.message.startswith(
        "cannot encode a value of type 'set' in the return value of "
        "'tests.rpc_funcs:unserialisable_result', at ['not fine']: " + ALLOWED
    )
    # An exposed class called with rpc_async returns an instance, which cannot travel.
    with pytest.raises(ag.RemoteError) as raised:
        await a.rpc_async("b", Box, args=(1,))
    assert raised.value.remote_type == "TypeError"
    assert raised.value.message == (
        "cannot encode a value of type 'Box' in the return value of 'tests.rpc_funcs:Box': "
        "an instance of an exposed class stays on the worker that made it: `remote()` makes "
        "one there and returns an RRef to it"
    )
    box = await a.remote("b", Box, args=(1,))
    with pytest.raises(ag.RemoteError) as raised:
        await box.rpc_async().child(2)
    assert raised.value.message.startswith(
        "cannot encode a value of type 'Box' in the return value of Box.child(): an instance "
    )


# *** errors ***


@pytest.mark.cluster
async def test_remote_error_carries_worker_type_and_traceback(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    with pytest.raises(ag.RemoteError) as raised:
        await a.rpc_async("b", f.fail, args=("boom",))
    err = raised.value
    assert isinstance(err, ag.RpcError) and isinstance(err, ag.AsyncgradError)
    assert (err.worker, err.remote_type) == ("b", "ValueError")
    assert "boom" in str(err)
    assert "raise ValueError(message)" in err.remote_traceback
    assert "rpc_funcs.py" in err.remote_traceback


async def test_wrong_arguments_are_a_remote_type_error(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    with pytest.raises(ag.RemoteError) as raised:
        await a.rpc_async("b", f.add, args=(1, 2, 3))
    assert raised.value.remote_type == "TypeError"


async def test_error_in_async_function_and_in_method(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    box = await a.remote("b", Box, args=("text",))
    with pytest.raises(ag.RemoteError) as raised:
        await box.rpc_async().add(1)  # "text" + 1
    assert (raised.value.remote_type, raised.value.worker) == ("TypeError", "b")
    with pytest.raises(ag.RemoteError) as raised:
        await box.rpc_async().no_such_method()
    assert raised.value.remote_type == "AttributeError"
    assert await box.rpc_async().get() == "text"  # the value survived both failures


@pytest.mark.cluster
async def test_rpc_timeout_with_explicit_timeout(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    g = gate()
    started = time.monotonic()
    call = await gated_call(a, "b", g, timeout=0.3)
    with pytest.raises(ag.RPCTimeout) as raised:
        await call
    assert isinstance(raised.value, TimeoutError)
    assert 0.25 < time.monotonic() - started < 2.0
    assert "tests.rpc_funcs:gated" in str(raised.value) and "'b'" in str(raised.value)
    # The late reply is dropped; the agent keeps working.
    g.opened.set()
    assert await a.rpc_async("b", f.add, args=(1, 1)) == 2


async def test_rpc_timeout_default_is_the_agents(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a", rpc_timeout=0.3), await make_agent("b")
    g = gate()
    started = time.monotonic()
    with pytest.raises(ag.RPCTimeout):
        await (await gated_call(a, "b", g))
    assert 0.25 < time.monotonic() - started < 2.0
    with pytest.raises(ag.RPCTimeout):
        await a.remote("b", f.gated, args=(g.key,))
    g.opened.set()


async def test_rref_calls_time_out(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    g = gate()
    box = await a.remote("b", Box)
    with pytest.raises(ag.RPCTimeout):
        await box.rpc_async(timeout=0.2).wait(g.key)
    with pytest.raises(ag.RPCTimeout):
        await box.remote(timeout=0.2).wait(g.key)
    with pytest.raises(ag.RPCTimeout):
        await box.to_here(timeout=1e-6)  # shorter than any round trip through Redis
    g.opened.set()


@pytest.mark.cluster
async def test_unknown_worker_is_unavailable_at_once(make_agent: MakeAgent) -> None:
    a = await make_agent("a")
    started = time.monotonic()
    with pytest.raises(ag.WorkerUnavailable):
        await a.rpc_async("nobody", f.add, args=(1, 2))
    with pytest.raises(ag.WorkerUnavailable):
        await a.remote("nobody", Box)
    with pytest.raises(ag.WorkerUnavailable):
        await a.get_worker_info("nobody")
    assert time.monotonic() - started < 1.0


@pytest.mark.cluster
async def test_worker_that_shut_down_is_unavailable(make_agent: MakeAgent) -> None:
    a, b, c = await make_agent("a"), await make_agent("b"), await make_agent("c")
    assert await a.rpc_async("b", f.add, args=(1, 2)) == 3  # a has just seen b alive
    await b.shutdown()
    await c.shutdown()
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(ag.WorkerUnavailable):
            await a.rpc_async("b", f.add, args=(1, 2))
        with pytest.raises(ag.WorkerUnavailable):
            await a.rpc_async("c", f.add, args=(1, 2))
    with pytest.raises(ag.WorkerUnavailable):
        await a.get_worker_info("b")


@pytest.mark.cluster
async def test_call_in_flight_to_a_worker_that_stops_is_unavailable(
    make_agent: MakeAgent,
) -> None:
    a, b = await make_agent("a", failure_timeout=1.0), await make_agent("b")
    call = await gated_call(a, "b", gate())
    started = time.monotonic()
    await b.shutdown(graceful=False)
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(ag.WorkerUnavailable):
            await call
    assert time.monotonic() - started < 2.0  # the failure window, not the rpc timeout


async def test_calls_from_a_stopped_agent_fail(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    await a.shutdown()
    with pytest.raises(ag.RpcError):
        await a.rpc_async("b", f.add, args=(1, 2))


# *** RRef ***


@pytest.mark.cluster
async def test_remote_returns_an_rref_held_here(make_agent: MakeAgent) -> None:
    a, b = await make_agent("a"), await make_agent("b")
    box = await a.remote("b", Box, args=(np.arange(3),))
    assert isinstance(box, RRef)
    assert box.owner == "b" and not box.is_owner()
    with pytest.raises(RuntimeError):
        box.local_value()
    assert len(b.references.owned) == 1
    # to_here() sends the value itself, which must be able to travel: a Box cannot.
    with pytest.raises(ag.RemoteError) as raised:
        await box.to_here()
    assert raised.value.remote_type == "TypeError"
    assert raised.value.message.startswith(
        "cannot encode a value of type 'Box' in the value to_here() fetches: to_here() copies "
        "the value to the caller, so only values that travel can be fetched (" + ALLOWED
    )
    assert raised.value.message.endswith(
        "call the value's methods with `rref.rpc_async().method(...)` instead"
    )


async def test_remote_of_a_function_keeps_its_result_there(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    total = await a.remote("b", f.add, args=(np.ones(2), np.ones(2)))
    assert total.owner == "b"
    assert same(await total.to_here(), np.full(2, 2.0))
    assert same(await total.to_here(timeout=DEADLINE), np.full(2, 2.0))


@pytest.mark.cluster
async def test_rref_method_calls(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    box = await a.remote("b", Box, kwargs={"value": 1})
    assert await box.rpc_async().add(2) == 3  # async method
    await box.rpc_async().set(10)  # sync method
    assert await box.rpc_async(timeout=DEADLINE).get() == 10
    child = await box.remote().child(7)
    assert isinstance(child, RRef) and child.owner == "b"
    assert await child.rpc_async().get() == 7
    got = await box.remote().get()  # a plain result, left on the owner
    assert await got.to_here() == 10


async def test_private_methods_are_refused(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    box = await a.remote("b", Box)
    with pytest.raises(AttributeError):
        await box.rpc_async()._secret()
    with pytest.raises(AttributeError):
        await box.remote()._secret()
    # The owner refuses too, whatever a caller puts on the wire.
    for method in ("_secret", "__class__", "__init__", "__reduce__"):
        with pytest.raises(ag.RemoteError) as raised:
            await a.calls.make("b", Call("", target=box.id, method=method), None)
        assert raised.value.remote_type == "NotExposedError"
    assert CALLS["Box._secret"] == 0


async def test_only_an_exposed_class_has_its_methods_called(
    make_agent: MakeAgent, tmp_path: Path
) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    array = await a.remote("b", f.echo, args=(np.zeros(4),))  # an RRef to an ndarray
    target = tmp_path / "written-by-the-owner"
    with pytest.raises(ag.RemoteError) as raised:
        await array.rpc_async().tofile(str(target))
    assert raised.value.remote_type == "NotExposedError"
    assert not target.exists()
    np.testing.assert_array_equal(await array.to_here(), np.zeros(4))  # fetching is fine
    box = await a.remote("b", Box, args=(7,))  # an exposed class: its methods are callable
    assert await box.rpc_async().get() == 7


async def test_rref_of_a_local_value_is_owned_here(
    redis_url: str, namespace: str, make_agent: MakeAgent
) -> None:
    await make_agent("b")
    async with Agent("a", redis_url=redis_url, namespace=namespace) as a:
        value = {"w": np.zeros(2)}
        rref = RRef(value)
        assert rref.owner == "a" and rref.is_owner()
        assert rref.local_value() is value
        assert await rref.to_here() is value
        owner, is_owner, remote_value = await a.rpc_async("b", f.inspect_rref, args=(rref,))
        assert (owner, is_owner) == ("a", False) and same(remote_value, value)


def test_rref_needs_a_current_agent() -> None:
    with pytest.raises(RuntimeError):
        RRef(1)


async def test_rref_passed_to_its_owner_is_local_there(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    box = await a.remote("b", Box, args=(3,))
    assert await a.rpc_async("b", f.rref_owner_value, args=(box,)) == ("b", True, 3)
    wrapped = await a.rpc_async("b", f.wrap, args=(4,))
    assert await a.rpc_async("b", f.inspect_rref, args=(wrapped,)) == ("b", True, 4)


@pytest.mark.cluster
async def test_rref_as_argument_and_result(make_agent: MakeAgent) -> None:
    a, b, c = await make_agent("a"), await make_agent("b"), await make_agent("c")
    box = await a.remote("b", Box, args=(41,))
    # a passes b's RRefs to c, which uses them; c sends one back inside a result.
    array = await a.remote("b", f.echo, args=(np.arange(3),))
    owner, is_owner, value = await a.rpc_async("c", f.inspect_rref, args=(array,))
    assert (owner, is_owner) == ("b", False) and same(value, np.arange(3))
    back = await a.rpc_async("c", f.echo, args=({"r": [box]},))
    again = back["r"][0]
    assert isinstance(again, RRef) and again.owner == "b" and again.id == box.id
    assert await again.rpc_async().add(1) == 42
    assert len(b.references.owned) == 2 and len(c.references.owned) == 0


async def test_rref_made_inside_a_served_call_is_owned_by_the_server(
    make_agent: MakeAgent,
) -> None:
    a, b = await make_agent("a"), await make_agent("b")
    rref = await a.rpc_async("b", f.wrap, args=([1, 2],))
    assert rref.owner == "b" and not rref.is_owner()
    assert await rref.to_here() == [1, 2]
    assert len(b.references.owned) == 1


@pytest.mark.cluster
async def test_third_agent_forwards_an_rref_it_does_not_own(make_agent: MakeAgent) -> None:
    agents = [await make_agent(name) for name in ("a", "b", "c", "d")]
    a, b = agents[:2]
    holder = await a.remote("c", Holder)
    value = await a.remote("b", f.echo, args=("v",))
    await holder.rpc_async().keep(value)
    # c hands the RRef (owned by b) back to a, in a result...
    forwarded = await holder.rpc_async().give()
    assert forwarded.owner == "b" and await forwarded.to_here() == "v"
    # ...and passes it on as an argument of its own calls: to d, and to b, its owner.
    assert await holder.rpc_async().pass_on("d", INSPECT) == ("b", False, "v")
    assert await holder.rpc_async().pass_on("b", INSPECT) == ("b", True, "v")
    del value, forwarded
    await holder.rpc_async().drop()
    await until(lambda: len(b.references.owned) == 0, a, "b")


# *** distributed reference counting ***


@pytest.mark.cluster
async def test_owner_frees_when_the_last_reference_is_collected(make_agent: MakeAgent) -> None:
    a, b = await make_agent("a"), await make_agent("b")
    box = await a.remote("b", Box)
    back = await a.rpc_async("b", f.rref_back, args=(box,))
    assert len(b.references.owned) == 1
    del box
    await a.rpc_async("b", f.echo, args=(None,))
    gc.collect()
    assert len(b.references.owned) == 1  # `back` still refers to it
    del back
    await until(lambda: len(b.references.owned) == 0, a, "b")


async def test_local_rref_is_freed_when_collected(
    redis_url: str, namespace: str, make_agent: MakeAgent
) -> None:
    await make_agent("b")
    async with Agent("a", redis_url=redis_url, namespace=namespace) as a:
        rref = RRef({"x": 1})
        assert await a.rpc_async("b", f.inspect_rref, args=(rref,)) == ("a", False, {"x": 1})
        assert len(a.references.owned) == 1
        del rref
        await until(lambda: len(a.references.owned) == 0, a, "b")


async def test_value_lives_while_a_third_agent_holds_it(make_agent: MakeAgent) -> None:
    a, b, c = await make_agent("a"), await make_agent("b"), await make_agent("c")
    holder = await a.remote("c", Holder)
    box = await a.remote("b", Box, args=(1,))
    await holder.rpc_async().keep(box, box)
    del box
    await a.rpc_async("b", f.echo, args=(None,))
    await c.rpc_async("b", f.echo, args=(None,))
    gc.collect()
    assert len(b.references.owned) == 1
    assert await (await holder.rpc_async().give()).rpc_async().get() == 1
    await holder.rpc_async().drop()
    await until(lambda: len(b.references.owned) == 0, c, "b")


@pytest.mark.cluster
async def test_owner_frees_when_the_holder_leaves(make_agent: MakeAgent) -> None:
    a, b, c = await make_agent("a"), await make_agent("b"), await make_agent("c")
    kept = [await a.remote("b", Box, args=(i,)) for i in range(3)]
    assert len(b.references.owned) == 3
    await a.shutdown()
    # a's leave notice was stored before a's shutdown returned, so it is served before
    # this round trip.
    await c.rpc_async("b", f.echo, args=(None,))
    assert len(b.references.owned) == 0
    assert all(r.owner == "b" for r in kept)


async def test_owner_frees_when_a_forwarding_holder_leaves(make_agent: MakeAgent) -> None:
    a, b, c = await make_agent("a"), await make_agent("b"), await make_agent("c")
    holder = await a.remote("c", Holder)
    box = await a.remote("b", Box)
    await holder.rpc_async().keep(box)
    del box
    await until(lambda: b.references.owned.holders() == {"c"}, a, "b")
    await c.shutdown()
    await until(lambda: len(b.references.owned) == 0, a, "b")
    del holder


async def test_a_failed_send_passes_on_no_reference(
    redis_url: str, namespace: str, make_agent: MakeAgent
) -> None:
    b, c = await make_agent("b"), await make_agent("c")
    async with Agent("a", redis_url=redis_url, namespace=namespace) as a:
        mine = RRef(Box())
        theirs = await a.remote("b", Box)
        for _ in range(3):
            with pytest.raises(TypeError):
                await a.rpc_async("c", f.echo, args=([mine, theirs, {1}],))
        # A call that does travel must not carry the failed ones' references along.
        await a.rpc_async("c", f.echo, args=(None,))
        del mine, theirs
        await until(lambda: len(a.references.owned) == 0 and len(b.references.owned) == 0, a, "b")
    assert c.references.owned.holders() == set()


async def test_a_cancelled_send_passes_on_no_reference(make_agent: MakeAgent) -> None:
    a, b, _ = await make_agent("a"), await make_agent("b"), await make_agent("c")
    mine = await a.rpc_async("a", f.wrap, args=(1,))  # owned by a
    theirs = await a.remote("b", Box)
    await a.rpc_async("c", f.echo, args=(None,))  # a has just seen c alive: no check now
    call = asyncio.create_task(a.rpc_async("c", f.echo, args=([mine, theirs],)))
    # Runs once the call waits for b to store that c holds `theirs`.
    asyncio.get_running_loop().call_soon(call.cancel)
    with pytest.raises(asyncio.CancelledError):
        await call
    del mine, theirs
    await until(lambda: len(a.references.owned) == 0 and len(b.references.owned) == 0, a, "b")


async def test_release_and_forward_in_the_same_tick(make_agent: MakeAgent) -> None:
    """A served async function drops RRefs and returns another in the next tick: the
    release (a one-way message) and the reply's fork are pending together."""
    a, b, c = await make_agent("a"), await make_agent("b"), await make_agent("c")
    holder = await a.remote("c", Holder)
    boxes = [await a.remote("b", Box, args=(i,)) for i in range(3)]
    await holder.rpc_async().keep(*boxes)
    del boxes
    await until(lambda: b.references.owned.holders() == {"c"}, a, "b")
    last = await holder.rpc_async().pop_after_dropping_the_rest()
    await until(lambda: len(b.references.owned) == 1, c, "b")
    assert await last.rpc_async().get() == 2  # not freed early
    del last
    await until(lambda: len(b.references.owned) == 0, a, "b")


async def test_owner_frees_what_a_holder_released_just_before_leaving(
    make_agent: MakeAgent,
) -> None:
    a, b, c = await make_agent("a"), await make_agent("b"), await make_agent("c")
    boxes = [await a.remote("b", Box) for _ in range(3)]
    del boxes
    gc.collect()
    await a.shutdown()
    await c.rpc_async("b", f.echo, args=(None,))
    assert len(b.references.owned) == 0


async def test_owner_frees_what_a_crashed_holder_held_once_its_lease_ran_out(
    make_agent: MakeAgent, spawn_worker: Callable[..., Any]
) -> None:
    """A holder that dies without a word (SIGKILL) is suspected by the owner's liveness
    check, even on an owner that never made a call of its own; what it held is freed once
    it stayed away for the owner's `rref_lease` (suspicion alone frees nothing)."""
    a = await make_agent("a")
    b = await make_agent("b", failure_timeout=1.0, rref_lease=1.0)
    worker = spawn_worker("w", "tests.rpc_funcs")
    assert await a.rpc_async("w", f.hold_remote, args=("b", "tests.rpc_funcs:Box")) == "b"
    assert len(b.references.owned) == 1
    worker.process.kill()
    await until(lambda: len(b.references.owned) == 0, a, "b")  # suspicion, then the lease


async def test_owner_frees_what_a_holder_held_when_a_new_incarnation_takes_its_name(
    make_agent: MakeAgent, spawn_worker: Callable[..., Any]
) -> None:
    a, b = await make_agent("a"), await make_agent("b")  # a lease of 300 s
    worker = spawn_worker("w", "tests.rpc_funcs")
    assert await a.rpc_async("w", f.hold_remote, args=("b", "tests.rpc_funcs:Box")) == "b"
    assert len(b.references.owned) == 1
    worker.process.kill()
    worker.process.wait(DEADLINE)
    spawn_worker("w", "tests.rpc_funcs")  # evidence of death: the old run is gone for good
    await until(lambda: len(b.references.owned) == 0, a, "b")


async def test_references_released_while_draining_reach_the_owner(make_agent: MakeAgent) -> None:
    a, b, c = await make_agent("a"), await make_agent("b"), await make_agent("c")
    kept = [await a.remote("b", Box)]
    g = gate()
    call = await gated_call(a, "c", g, value="late")
    stopping = asyncio.create_task(a.shutdown())
    asyncio.get_running_loop().call_soon(kept.clear)  # once a drains
    await until(lambda: len(b.references.owned) == 0, c, "b")
    assert not stopping.done()
    g.opened.set()
    async with asyncio.timeout(DEADLINE):
        assert await call == "late"
        await stopping


async def test_copies_of_an_rref_are_the_same_reference(make_agent: MakeAgent) -> None:
    a, b = await make_agent("a"), await make_agent("b")
    box = await a.remote("b", Box, args=(1,))
    copies = [copy.copy(box), copy.deepcopy({"r": box})["r"]]
    assert all(c is box for c in copies)
    with pytest.raises(TypeError):
        pickle.dumps(box)
    del box
    await a.rpc_async("b", f.echo, args=(None,))
    gc.collect()
    assert await copies[0].rpc_async().get() == 1
    del copies
    await until(lambda: len(b.references.owned) == 0, a, "b")


async def test_passing_on_an_rref_whose_owner_left(make_agent: MakeAgent) -> None:
    agents = [await make_agent(name) for name in ("a", "b", "c", "d")]
    a, b, c, _ = agents
    alive = await a.remote("b", Box)
    gone = await a.remote("c", Box)
    holder = await a.remote("d", Holder)
    await holder.rpc_async().keep(gone)
    await c.shutdown()
    with pytest.raises(ag.WorkerUnavailable):
        await a.rpc_async("d", f.echo, args=([alive, gone],))
    with pytest.raises(ag.RemoteError) as raised:
        await holder.rpc_async().give()
    assert raised.value.remote_type == "WorkerUnavailable"
    # The failed call took back the count it had added on b for d.
    del alive
    await until(lambda: len(b.references.owned) == 0, a, "b")


async def test_remote_that_timed_out_leaves_nothing_on_the_owner(make_agent: MakeAgent) -> None:
    a, b = await make_agent("a"), await make_agent("b")
    g = gate()
    with pytest.raises(ag.RPCTimeout):
        await a.remote("b", f.gated, args=(g.key, "made late"), timeout=0.2)
    g.opened.set()  # the value is made now, and its RRef sent to a, who no longer waits
    await until(lambda: len(b.references.owned) == 0 and g.entered.is_set(), a, "b")


async def test_many_rrefs_all_freed(make_agent: MakeAgent) -> None:
    a, b = await make_agent("a"), await make_agent("b")
    rrefs = await asyncio.gather(*(a.remote("b", Box, args=(i,)) for i in range(200)))
    values = await asyncio.gather(*(r.rpc_async().get() for r in rrefs))
    assert values == list(range(200))
    assert len(b.references.owned) == 200
    del rrefs
    await until(lambda: len(b.references.owned) == 0, a, "b")


# *** module level and the current agent ***


async def test_init_makes_the_process_agent_current(redis_url: str, namespace: str) -> None:
    agent = await ag.rpc.init("a", redis_url=redis_url, namespace=namespace)
    try:
        assert isinstance(agent, ag.rpc.Agent) and agent.name == "a"
        assert ag.rpc.current_agent() is agent
        assert await asyncio.create_task(_current_name()) == "a"
        assert await ag.rpc.rpc_async("a", f.add, args=(1, 2)) == 3
        assert await ag.rpc.rpc_async("a", f.add, kwargs={"a": 1, "b": 2}, timeout=DEADLINE) == 3
        box = await ag.rpc.remote("a", Box, args=(4,))
        assert box.is_owner() and box.local_value().value == 4
        assert ag.rpc.RRef("mine").owner == "a"
        assert await ag.rpc.get_worker_info() == ag.rpc.WorkerInfo("a", agent.id)
        assert await ag.rpc.get_worker_info("a") == ag.rpc.WorkerInfo("a", agent.id)
        await ag.rpc.shutdown()
        with pytest.raises(RuntimeError):
            ag.rpc.current_agent()
    finally:
        await agent.shutdown(graceful=False)


async def test_init_inside_async_with_makes_its_agent_current(
    redis_url: str, namespace: str
) -> None:
    async with Agent("a", redis_url=redis_url, namespace=namespace) as a:
        b = await rpc.init("b", redis_url=redis_url, namespace=namespace)
        try:
            assert rpc.current_agent() is b
            assert await asyncio.create_task(_current_name()) == "b"
            assert rpc.RRef("mine").owner == "b"
            await rpc.shutdown()  # shuts b down, not a
            with pytest.raises(ag.RpcError, match="'b' is closed"):
                await b.rpc_async("a", f.whoami)
            assert rpc.current_agent() is a
            assert await rpc.rpc_async("a", f.whoami) == (namespace, "a")
        finally:
            await b.shutdown(graceful=False)
    with pytest.raises(RuntimeError):
        rpc.current_agent()


@pytest.fixture
async def entered_agent(redis_url: str, namespace: str) -> AsyncIterator[Agent]:
    """An agent the fixture entered with `async with`, as a test's setup may."""
    async with Agent("a", redis_url=redis_url, namespace=namespace) as a:
        yield a


async def test_init_in_a_test_whose_fixture_entered_an_agent(
    entered_agent: Agent, redis_url: str, namespace: str
) -> None:
    assert rpc.current_agent() is entered_agent
    b = await rpc.init("b", redis_url=redis_url, namespace=namespace)
    try:
        assert rpc.current_agent() is b
        assert await rpc.get_worker_info() == rpc.WorkerInfo("b", b.id)
    finally:
        await rpc.shutdown()
    assert rpc.current_agent() is entered_agent


async def test_shutdown_of_an_init_agent_shut_down_elsewhere_gives_back_the_current(
    redis_url: str, namespace: str
) -> None:
    async with Agent("a", redis_url=redis_url, namespace=namespace) as a:
        b = await rpc.init("b", redis_url=redis_url, namespace=namespace)
        await asyncio.create_task(b.shutdown())  # another task: this one still has b
        assert rpc.current_agent() is b
        await rpc.shutdown()  # b is closed already: it only stops being current here
        assert rpc.current_agent() is a


async def test_init_twice_then_shutdown_in_reverse(redis_url: str, namespace: str) -> None:
    a = await rpc.init("a", redis_url=redis_url, namespace=namespace)
    b = await rpc.init("b", redis_url=redis_url, namespace=namespace)
    try:
        assert rpc.current_agent() is b
        await rpc.shutdown()
        assert rpc.current_agent() is a
        await rpc.shutdown()
        with pytest.raises(RuntimeError):
            rpc.current_agent()
    finally:
        await b.shutdown(graceful=False)
        await a.shutdown(graceful=False)


async def _current_name() -> str:
    return rpc.current_agent().name


async def test_no_current_agent(namespace: str) -> None:
    with pytest.raises(RuntimeError):
        rpc.current_agent()
    with pytest.raises(RuntimeError):
        await rpc.rpc_async("a", f.add, args=(1, 2))


async def test_async_with_makes_the_agent_current_for_its_tasks(
    redis_url: str, namespace: str
) -> None:
    async with Agent("a", redis_url=redis_url, namespace=namespace) as a:
        assert rpc.current_agent() is a
        assert await asyncio.create_task(_current_name()) == "a"
        async with Agent("b", redis_url=redis_url, namespace=namespace) as b:
            assert rpc.current_agent() is b
            assert await rpc.rpc_async("a", f.whoami) == (namespace, "a")
        assert rpc.current_agent() is a
    with pytest.raises(RuntimeError):
        rpc.current_agent()


async def test_current_agent_inside_a_served_function(make_agent: MakeAgent) -> None:
    a, _, _ = await make_agent("a"), await make_agent("b"), await make_agent("c")
    assert await a.rpc_async("b", f.whoami) == (a.namespace, "b")
    assert await a.rpc_async("c", f.whoami) == (a.namespace, "c")


async def test_served_calls_start_from_a_clean_context(make_agent: MakeAgent) -> None:
    a = await make_agent("a")
    with ag.no_grad():
        await make_agent("b")
    assert await a.rpc_async("b", f.grad_enabled) is True
    with ag.no_grad():  # nor does the caller's context travel
        assert await a.rpc_async("b", f.grad_enabled) is True


@pytest.mark.cluster
async def test_nested_call_goes_out_as_the_serving_agent(
    redis_url: str, namespace: str, make_agent: MakeAgent
) -> None:
    await make_agent("b")
    await make_agent("c")
    async with Agent("a", redis_url=redis_url, namespace=namespace) as a:
        # The call from a reaches b, whose function calls c: as b, not as a (the current
        # agent of this task).
        assert await a.rpc_async("b", f.relay, args=("c", WHOAMI)) == ("b", (namespace, "c"))
        # The nested `remote` answers to b: the RRef it gets is held by b.
        assert await a.rpc_async("b", f.remote_from_here, args=("c", 9)) == ("c", False, 9)
        assert await a.rpc_async("b", f.remote_from_here, args=("b", 9)) == ("b", True, 9)


async def test_nested_call_uses_the_serving_agents_timeout(make_agent: MakeAgent) -> None:
    a = await make_agent("a", rpc_timeout=30.0)
    await make_agent("b", rpc_timeout=0.3)
    await make_agent("c")
    g = gate()
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(ag.RemoteError) as raised:
            await a.rpc_async("b", f.relay, args=("c", GATED, g.key))
    assert raised.value.remote_type == "RPCTimeout" and raised.value.worker == "b"
    g.opened.set()


# *** agents ***


@pytest.mark.cluster
async def test_names_ids_and_worker_info(make_agent: MakeAgent) -> None:
    agents = [await make_agent(name) for name in ("a", "b", "c")]
    assert [x.name for x in agents] == ["a", "b", "c"]
    ids = [x.id for x in agents]
    assert len(set(ids)) == 3 and all(0 <= i < 2**16 for i in ids)
    a = agents[0]
    assert await a.get_worker_info() == WorkerInfo("a", a.id)
    info = await a.get_worker_info("c")
    assert info == WorkerInfo("c", agents[2].id) and (info.name, info.id) == ("c", agents[2].id)
    by_id = sorted(agents, key=lambda x: x.id)
    assert await a.workers() == [WorkerInfo(x.name, x.id) for x in by_id]
    await agents[1].shutdown()
    assert [w.name for w in await a.workers()] == ["a", "c"]


async def test_an_agent_name_keeps_its_id(make_agent: MakeAgent) -> None:
    a, b = await make_agent("a"), await make_agent("b")
    await b.shutdown()
    again = await make_agent("b")
    assert again.id == b.id
    assert (await make_agent("c")).id not in (a.id, b.id)
    assert await a.get_worker_info("b") == WorkerInfo("b", b.id)


@pytest.mark.cluster
async def test_a_name_held_by_a_live_agent_is_refused_and_the_holder_keeps_working(
    make_agent: MakeAgent, namespace: str
) -> None:
    a, b = await make_agent("a"), await make_agent("b")
    says = f"agent name 'a' is taken in namespace '{namespace}': a live agent holds it"
    with pytest.raises(AgentNameTaken, match=f"{says} \\(pid {os.getpid()} on host"):
        await make_agent("a")
    # The refused agent left the holder's heartbeat, inbox and id alone.
    assert await b.alive(["a"]) == [True]
    assert await b.rpc_async("a", f.add, args=(1, 2)) == 3
    assert await a.rpc_async("a", f.add, args=(2, 2)) == 4
    assert await b.workers() == [WorkerInfo("a", a.id), WorkerInfo("b", b.id)]


async def test_rpc_to_self(make_agent: MakeAgent) -> None:
    a = await make_agent("a")
    assert await a.rpc_async("a", f.add, args=(1, 2)) == 3
    assert await a.rpc_async("a", f.whoami) == (a.namespace, "a")
    box = await a.remote("a", Box, args=(5,))
    assert box.is_owner() and box.local_value().value == 5
    assert await box.rpc_async().add(1) == 6
    del box
    await until(lambda: len(a.references.owned) == 0, a, "a")


def test_names_and_namespaces_are_checked() -> None:
    for name in ("", "a b", "a:b", "x" * 101):
        with pytest.raises(ValueError, match="agent name"):
            Agent(name)
    with pytest.raises(ValueError, match="namespace"):
        Agent("a", namespace="x{y}")


async def test_redis_url_defaults_to_the_environment(
    redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASYNCGRAD_REDIS_URL", redis_url)
    async with Agent("a", namespace=namespace) as a:
        assert a.redis_url == redis_url
        assert await a.rpc_async("a", f.add, args=(1, 1)) == 2
    monkeypatch.delenv("ASYNCGRAD_REDIS_URL")
    assert Agent("x").redis_url == "redis://127.0.0.1:6379/0"
    assert Agent("x").namespace == "asyncgrad"


@pytest.mark.cluster
async def test_graceful_shutdown_finishes_the_calls_being_served(make_agent: MakeAgent) -> None:
    a, b = await make_agent("a"), await make_agent("b")
    g = gate()
    call = await gated_call(a, "b", g, value="done")
    stopping = asyncio.create_task(b.shutdown())
    # Runs after the shutdown's first step: the gate opens while b drains.
    asyncio.get_running_loop().call_soon(g.opened.set)
    async with asyncio.timeout(DEADLINE):
        assert await call == "done"
        await stopping
    assert CALLS[f"{g.key}:cancelled"] == 0


async def test_graceful_shutdown_finishes_the_calls_made(make_agent: MakeAgent) -> None:
    a, _ = await make_agent("a"), await make_agent("b")
    g = gate()
    call = await gated_call(a, "b", g, value="done")
    stopping = asyncio.create_task(a.shutdown())
    asyncio.get_running_loop().call_soon(g.opened.set)
    async with asyncio.timeout(DEADLINE):
        assert await call == "done"
        await stopping


async def test_graceful_shutdown_lets_served_calls_make_calls(make_agent: MakeAgent) -> None:
    a, b, _ = await make_agent("a"), await make_agent("b"), await make_agent("c")
    g = gate()
    call = asyncio.create_task(
        a.rpc_async("b", f.gated_relay, args=(g.key, "c", "tests.rpc_funcs:add", 2, 3))
    )
    async with asyncio.timeout(DEADLINE):
        await g.entered.wait()
    stopping = asyncio.create_task(b.shutdown())
    asyncio.get_running_loop().call_soon(g.opened.set)
    async with asyncio.timeout(DEADLINE):
        assert await call == 5
        await stopping


async def test_graceful_shutdown_delivers_a_result_holding_a_forwarded_rref(
    make_agent: MakeAgent,
) -> None:
    a, b, _ = await make_agent("a"), await make_agent("b"), await make_agent("c")
    box = await a.remote("c", Box, args=("kept",))
    g = gate()
    call = await gated_call(a, "b", g, value=box)
    stopping = asyncio.create_task(b.shutdown())
    asyncio.get_running_loop().call_soon(g.opened.set)
    async with asyncio.timeout(DEADLINE):
        back = await call
        await stopping
        assert back.owner == "c" and await back.rpc_async().get() == "kept"


async def test_graceful_shutdown_serves_calls_arriving_while_it_drains(
    make_agent: MakeAgent,
) -> None:
    a, b = await make_agent("a"), await make_agent("b")
    first, second = gate(), gate()
    call1 = await gated_call(a, "b", first, value=1)
    stopping = asyncio.create_task(b.shutdown())
    call2 = await gated_call(a, "b", second, value=2)
    first.opened.set()
    async with asyncio.timeout(DEADLINE):
        assert await call1 == 1
    second.opened.set()
    async with asyncio.timeout(DEADLINE):
        assert await call2 == 2
        await stopping


async def test_non_graceful_shutdown_does_not_wait(make_agent: MakeAgent) -> None:
    a, b = await make_agent("a", failure_timeout=1.0), await make_agent("b")
    being_served, being_made = gate(), gate()
    served = await gated_call(a, "b", being_served)
    made = await gated_call(b, "a", being_made)
    async with asyncio.timeout(DEADLINE):
        await b.shutdown(graceful=False)
        with pytest.raises(ag.RpcError):
            await made  # the call b made fails at once
        with pytest.raises(ag.WorkerUnavailable):
            await served  # a learns b is gone within its failure window
    assert CALLS[f"{being_served.key}:cancelled"] == 1
    being_made.opened.set()


async def test_graceful_shutdown_waits_at_most_rpc_timeout(make_agent: MakeAgent) -> None:
    a, b = await make_agent("a"), await make_agent("b", rpc_timeout=0.3)
    g = gate()
    await gated_call(a, "b", g)
    async with asyncio.timeout(DEADLINE):
        await b.shutdown()
    assert CALLS[f"{g.key}:cancelled"] == 1
    g.opened.set()


async def test_non_graceful_shutdown_cuts_a_graceful_one_short(make_agent: MakeAgent) -> None:
    a, b = await make_agent("a"), await make_agent("b")
    g = gate()
    call = await gated_call(a, "b", g)
    stopping = asyncio.create_task(b.shutdown())
    async with asyncio.timeout(DEADLINE):
        await b.shutdown(graceful=False)
        await stopping
    assert not g.opened.is_set()
    call.cancel()
    g.opened.set()


async def test_shutdown_twice_and_exit_on_error(redis_url: str, namespace: str) -> None:
    a = await Agent("a", redis_url=redis_url, namespace=namespace).start()
    await a.shutdown()
    await a.shutdown()
    with pytest.raises(KeyError):
        async with Agent("b", redis_url=redis_url, namespace=namespace):
            raise KeyError("leaves the block")
    with pytest.raises(RuntimeError):
        rpc.current_agent()


# *** namespaces ***


@pytest.fixture
def other_namespace(redis_url: str) -> Iterator[str]:
    with own_namespace(redis_url) as ns:
        yield ns


@pytest.mark.cluster
async def test_namespaces_are_isolated(
    redis_url: str, namespace: str, other_namespace: str, make_agent: MakeAgent
) -> None:
    a1, _ = await make_agent("a"), await make_agent("b")
    a2 = await make_agent("a", namespace=other_namespace)
    await make_agent("b", namespace=other_namespace)
    await make_agent("only-here", namespace=other_namespace)
    calls = [(a, ns) for a, ns in ((a1, namespace), (a2, other_namespace)) for _ in range(50)]
    got = await asyncio.gather(*(a.rpc_async("b", f.whoami) for a, _ in calls))
    assert got == [(ns, "b") for _, ns in calls]
    with pytest.raises(ag.WorkerUnavailable):
        await a1.rpc_async("only-here", f.whoami)
    assert {w.name for w in await a1.workers()} == {"a", "b"}
    assert {w.name for w in await a2.workers()} == {"a", "b", "only-here"}
    box = await a2.remote("b", Box, args=(1,))
    assert await box.rpc_async().get() == 1


# *** concurrency ***


@pytest.mark.cluster
async def test_many_concurrent_calls(make_agent: MakeAgent) -> None:
    a, _, _ = await make_agent("a"), await make_agent("b"), await make_agent("c")
    n = 2000
    targets = itertools.cycle(["b", "c"])
    calls = [a.rpc_async(next(targets), f.mul if i % 2 else f.add, args=(i, i)) for i in range(n)]
    async with asyncio.timeout(DEADLINE):
        got = await asyncio.gather(*calls)
    assert got == [i * i if i % 2 else i + i for i in range(n)]


@pytest.mark.cluster
async def test_concurrent_calls_between_agents_both_ways(make_agent: MakeAgent) -> None:
    a, b = await make_agent("a"), await make_agent("b")
    arrays = [np.full(64, i, dtype=np.float32) for i in range(200)]
    pairs = [(a, "b"), (b, "a")]
    async with asyncio.timeout(DEADLINE):
        got = await asyncio.gather(
            *(x.rpc_async(y, f.echo, args=(arr,)) for arr in arrays for x, y in pairs)
        )
    assert all(same(g, arrays[i // 2]) for i, g in enumerate(got))
