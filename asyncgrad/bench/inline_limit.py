"""Where the data plane starts to pay: B3's echo at sizes around the default `inline_limit`.

    python -m asyncgrad.bench.inline_limit [--reps N] [--runs N]

For each size, the echo (a driver and a worker process, as in B3) runs with every array
through Redis (`data_plane="redis"`) and with every array by the data plane
(`inline_limit=8192`), alternately, `--runs` times each; the table shows the median time per
echo of each and their ratio. The default limit (docs/BENCH.md, "inline_limit") is set
where the two cross.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

from asyncgrad.local_cluster import LocalCluster
from asyncgrad.rpc import Agent
from asyncgrad.tensor import tensor
from asyncgrad.worker import run_loop

SIZES = (16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 4 << 20)
MODES: dict[str, dict[str, Any]] = {
    "redis": {"data_plane": "redis"},
    # Above the message body's few bytes, below every size measured.
    "direct": {"data_plane": "direct", "inline_limit": 8192},
}


def per_echo_us(mode: str, reps: int) -> dict[int, float]:
    """Median µs per echo at each size, with every array sent the `mode` way."""
    kwargs = MODES[mode]
    limit = str(kwargs.get("inline_limit", 0))
    args = ["--data-plane", kwargs["data_plane"], "--inline-limit", limit]
    with LocalCluster({"worker1": ["asyncgrad.workloads.echo"]}, worker_args=args) as cluster:

        async def main() -> dict[int, float]:
            async with Agent("driver", cluster.redis_url, cluster.namespace, **kwargs) as agent:
                out = {}
                for size in SIZES:
                    x = tensor(np.ones(size // 4, dtype=np.float32))
                    for _ in range(5):
                        await agent.rpc_async("worker1", "echo", args=(x,))
                    times = []
                    for _ in range(reps):
                        t0 = time.perf_counter_ns()
                        await agent.rpc_async("worker1", "echo", args=(x,))
                        times.append(time.perf_counter_ns() - t0)
                    out[size] = statistics.median(times) / 1e3
                return out

        result: dict[int, float] = run_loop(main())
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200, help="echoes per size and run")
    parser.add_argument("--runs", type=int, default=3, help="runs of each mode, alternated")
    args = parser.parse_args()
    runs: dict[str, list[dict[int, float]]] = {mode: [] for mode in MODES}
    for _ in range(args.runs):
        for mode in MODES:
            runs[mode].append(per_echo_us(mode, args.reps))
    print(f"{'size':>8}  {'redis us':>9}  {'direct us':>9}  direct/redis  direct faster in")
    for size in SIZES:
        redis = [r[size] for r in runs["redis"]]
        direct = [r[size] for r in runs["direct"]]
        wins = sum(d < r for d, r in zip(direct, redis, strict=True))
        r, d = statistics.median(redis), statistics.median(direct)
        print(f"{size >> 10:>6} K  {r:>9.0f}  {d:>9.0f}  {d / r:>12.2f}  {wins}/{len(redis)} runs")


if __name__ == "__main__":
    main()
