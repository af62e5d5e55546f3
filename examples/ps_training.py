# examples/ps_training.py: a trainer for the parameter server of workers/param_server.py
import asyncio

import numpy as np

import asyncgrad as ag
from asyncgrad import dist_autograd, optim, rpc
from asyncgrad.nn import functional as F
from workers.param_server import ParameterServer  # exposed as "ps.ParameterServer"


async def main():
    async with rpc.Agent("trainer") as agent:
        ps = await agent.remote("ps", ParameterServer, args=((784, 256, 10),))  # an RRef
        params = await ps.rpc_async().parameter_rrefs()  # [RRef(p) for p in model.parameters()]
        opt = optim.DistributedOptimizer(optim.SGD, params, lr=0.05, momentum=0.9)
        rng = np.random.default_rng(0)
        for step in range(1, 51):
            x = rng.standard_normal((64, 784), dtype=np.float32)
            y = x[:, :10].argmax(axis=1)  # to learn: which of the first 10 inputs is largest
            async with dist_autograd.context() as context_id:
                logits = await ps.rpc_async().forward(ag.tensor(x))  # recorded: send/recv
                loss = F.cross_entropy(logits, y)  # computed here
                await dist_autograd.backward(context_id, [loss])  # runs on every worker
                await opt.step(context_id)  # steps the owner's optimizer
            if step % 10 == 0:
                print(f"step {step}: loss {loss.item():.3f}")


asyncio.run(main())
