# examples/model_parallel/train.py: the driver, a job for `asyncgrad run`
import numpy as np

import asyncgrad as ag
from asyncgrad import dist_autograd, optim
from asyncgrad.nn import functional as F
from examples.model_parallel.stages import Stage1, Stage2
from examples.retry import apply  # opt.step(context_id), retried safely


def batches(steps, size=64, seed=0):
    """Inputs 16 normal floats; the label is the argmax of a fixed linear map to 4 classes."""
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((16, 4))
    for _ in range(steps):
        x = rng.standard_normal((size, 16), dtype=np.float32)
        yield x, (x @ teacher).argmax(axis=1)


async def main(agent, steps=200):
    stage1 = await agent.remote("stage1", Stage1)  # an RRef: the Stage1 lives on stage1
    stage2 = await agent.remote("stage2", Stage2)
    params = await stage1.rpc_async().parameter_rrefs()  # RRefs to both stages' parameters
    params += await stage2.rpc_async().parameter_rrefs()
    opt = optim.DistributedOptimizer(optim.SGD, params, lr=0.1, momentum=0.9)
    losses = []
    for x, y in batches(steps):
        async with dist_autograd.context() as context_id:
            hidden = await stage1.rpc_async().forward(ag.tensor(x))  # runs on stage1
            logits = await stage2.rpc_async().forward(hidden)  # runs on stage2
            loss = F.cross_entropy(logits, y)  # here, in the driver
            await dist_autograd.backward(context_id, [loss])  # back through stage2, stage1
            await apply(opt, context_id)  # each stage steps its own parameters
        losses.append(loss.item())
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"loss {first:.3f} -> {last:.3f} (mean of the first and last 10 of {steps} steps)")
    return 0 if last < first else 1  # the exit code of `asyncgrad run`
