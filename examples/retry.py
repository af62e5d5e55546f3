# examples/retry.py: an optimizer step that survives failures on the way
import asyncio

import asyncgrad as ag


async def apply(opt, context_id, attempts=5):
    """Step every owner once for this context, however often a step fails on the way."""
    for attempt in range(attempts):
        try:
            return await opt.step(context_id)
        except (ag.OutcomeUnknown, ag.RPCTimeout, ag.WorkerUnavailable):
            if attempt == attempts - 1:
                raise  # same context: owners that applied it do not again
            await asyncio.sleep(0.05 * 2**attempt)
