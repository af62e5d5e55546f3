"""The model-parallel example trains: its two stages on real worker processes, the driver's
`main` on an agent of the test's, and both stages' parameters move while the loss falls.

(tests/test_readme.py runs every example as README says; this checks what it does.)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from asyncgrad import rpc
from examples.model_parallel import train
from examples.model_parallel.stages import Stage1, Stage2
from tests.conftest import WorkerProcess


@pytest.mark.timeout(60)
async def test_the_model_parallel_example_lowers_the_loss_on_both_stages(
    redis_url: str,
    namespace: str,
    spawn_worker: Callable[..., WorkerProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    spawn_worker("stage1", "examples.model_parallel.stages")
    spawn_worker("stage2", "examples.model_parallel.stages")
    async with rpc.Agent("driver", redis_url, namespace) as agent:  # as `asyncgrad run` does
        await check_training(agent, capsys)


async def check_training(agent: rpc.Agent, capsys: pytest.CaptureFixture[str]) -> None:
    made: dict[
        str, Any
    ] = {}  # the stages main() makes, by worker: a spy on agent.remote, the real call
    remote = agent.remote

    async def spy(to: str, *args: Any, **kwargs: Any) -> Any:
        made[to] = await remote(to, *args, **kwargs)
        return made[to]

    agent.remote = spy  # type: ignore[method-assign]

    assert await train.main(agent, steps=100) == 0

    printed = capsys.readouterr().out
    first, last = map(float, re.search(r"loss (\S+) -> (\S+)", printed).groups())  # type: ignore[union-attr]
    assert last < 0.5 * first, printed
    # Each stage stepped its own parameters, on its worker: none is as it was made.
    assert set(made) == {"stage1", "stage2"}
    for name, stage in (("stage1", Stage1()), ("stage2", Stage2())):
        rrefs = await made[name].rpc_async().parameter_rrefs()
        assert len(rrefs) == len(list(stage.module.parameters())) > 0
        for rref, initial in zip(rrefs, stage.module.parameters(), strict=True):
            trained = await rref.to_here()
            assert not np.allclose(trained.data, initial.data), name
