# examples/rpc_driver.py: the driver, run once worker1 serves
import asyncio

import asyncgrad as ag
from asyncgrad import rpc
from examples.rpc_basics import Counter, scale  # the module worker1 imported


async def main():
    async with rpc.Agent("driver") as agent:  # Redis: $ASYNCGRAD_REDIS_URL
        y = await agent.rpc_async("worker1", scale, args=(ag.tensor([1.0, 2.0]),))
        print(y)  # tensor([2., 4.]), computed on worker1
        counter = await agent.remote("worker1", Counter, args=(10,))  # an RRef
        print(await counter.rpc_async().add(5))  # 15: the Counter lives on worker1
        kept = await agent.remote("worker1", scale, args=(ag.tensor([3.0]),))
        print(await kept.to_here())  # tensor([6.]): a copy of the value worker1 keeps
        print(await agent.workers())  # [WorkerInfo(name='worker1', id=0), ...]


asyncio.run(main())
