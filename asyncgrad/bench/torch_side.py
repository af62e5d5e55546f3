"""PyTorch's side of the workloads of docs/BENCH.md, for `asyncgrad bench --against torch`.

It imports torch, so nothing imports it but the process it runs in: `asyncgrad bench`
starts `python -m asyncgrad.bench.torch_side WORKLOAD [--quick]` once per run, which
prints one record (`name`, `ok`, `params`, `figures`, as asyncgrad's side has them) as a
JSON line. That process only coordinates: each workload runs in fresh processes (spawned,
on loopback, `torch.distributed.rpc` over TensorPipe), rank 0 the driver, and every RPC
process computes on one thread, as the asyncgrad side's do.

PyTorch finds a remote function by its qualified name, so everything called remotely lives
at module level here, with the state it needs (`_STATE`). torch is imported inside the
functions: the module itself imports without it (the package must work without torch).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import queue
import socket
import statistics
import sys
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from asyncgrad.bench.records import b1_record, b2_params, b5_record, percentile

if TYPE_CHECKING:
    import torch

__all__ = ["WORKLOADS", "run_workload"]

WORKER_THREADS = 16  # TensorPipe's pool per process
RPC_TIMEOUT_S = 60
TIMEOUT_S = 600.0  # one workload, all its processes

# workload -> the names of its ranks; rank 0 drives (B6 has no RPC)
RANKS: dict[str, list[str]] = {
    "B1_latency": ["driver", "worker1"],
    "B2_throughput": ["driver", "worker1"],
    "B3_bandwidth": ["driver", "worker1"],
    "B4_dist_backward_chain": ["driver", "worker1", "worker2", "worker3", "worker4"],
    "B5_param_server": ["driver", "ps", "trainer1", "trainer2"],
}
WORKLOADS = [*RANKS, "B6_local_autograd"]

_STATE: dict[str, Any] = {}  # what a rank holds for a workload: W (B4), model (B5), trainer


def scale(n: int, quick: bool, minimum: int = 1) -> int:
    """`n`, or about a tenth of it with `--quick`, as asyncgrad's side scales."""
    return max(minimum, n // 10) if quick else n


def _quiet() -> None:
    """Silence torch's own deprecation notes from inside init_rpc, shutdown and
    DistributedOptimizer (in the processes that run it, not in whoever imports this)."""
    warnings.filterwarnings("ignore", message=".*as a ProcessGroup.*")
    warnings.filterwarnings("ignore", message=".*TorchScript. support for functional optim.*")


# *** called remotely ***


def echo(t: torch.Tensor) -> torch.Tensor:
    return t


def stage_forward(h: torch.Tensor) -> torch.Tensor:
    return (h @ _STATE["W"]).tanh()


def stage_grad_norm(context_id: int) -> float:
    import torch.distributed.autograd as dist_autograd

    return float(dist_autograd.get_gradients(context_id)[_STATE["W"]].norm())


def ps_forward(x: torch.Tensor) -> torch.Tensor:
    # Two trainers share this model. Saving its live weights for backward would let one
    # trainer's in-place SGD step break the other's backward ("modified by an inplace
    # operation"), so each forward works on a differentiable copy: gradients still reach
    # the real parameters, in this trainer's context.
    import torch.nn.functional as F

    first, second = _STATE["model"][0], _STATE["model"][2]
    h = F.relu(F.linear(x, first.weight.clone(), first.bias.clone()))
    return F.linear(h, second.weight.clone(), second.bias.clone())


def ps_parameter_rrefs() -> list[Any]:
    import torch.distributed.rpc as rpc

    return [rpc.RRef(p) for p in _STATE["model"].parameters()]


def trainer_prepare(index: int, steps: int, lr: float) -> bool:
    import torch
    import torch.distributed.rpc as rpc
    from torch.distributed.optim import DistributedOptimizer

    xs, ys = make_batches(steps, seed=100 + index, teacher=make_teacher())
    rrefs = rpc.rpc_sync("ps", ps_parameter_rrefs)
    _STATE["trainer"] = (xs, ys, DistributedOptimizer(torch.optim.SGD, rrefs, lr=lr), steps)
    return True


def trainer_run() -> dict[str, Any]:
    import torch.distributed.autograd as dist_autograd
    import torch.distributed.rpc as rpc
    import torch.nn.functional as F

    xs, ys, opt, steps = _STATE["trainer"]
    losses, step_ns = [], []
    for s in range(steps):
        t0 = time.perf_counter_ns()
        with dist_autograd.context() as context_id:
            logits = rpc.rpc_sync("ps", ps_forward, args=(xs[s],))
            loss = F.cross_entropy(logits, ys[s])
            dist_autograd.backward(context_id, [loss])
            opt.step(context_id)
        step_ns.append(time.perf_counter_ns() - t0)
        losses.append(float(loss.detach()))
    return {"losses": losses, "step_ns": step_ns}


# *** the model and data, seeded as on asyncgrad's side (same shapes, torch's generator) ***


def make_weight(i: int) -> torch.Tensor:
    import torch

    generator = torch.Generator().manual_seed(1000 + i)
    return (torch.randn(512, 512, generator=generator) / math.sqrt(512.0)).requires_grad_(True)


def make_mlp() -> torch.nn.Sequential:
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))


def make_teacher() -> torch.Tensor:
    import torch

    return torch.randn(784, 10, generator=torch.Generator().manual_seed(4242))


def make_batches(
    n: int, seed: int, teacher: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`n` batches of 64 inputs labelled by a fixed random linear teacher: learnable."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    xs = [torch.randn(64, 784, generator=generator) for _ in range(n)]
    return xs, [(x @ teacher).argmax(dim=1) for x in xs]


# *** the drivers: rank 0 of each workload ***


def drive_b1(quick: bool) -> dict[str, Any]:
    import torch
    import torch.distributed.rpc as rpc

    calls, warmup = scale(5000, quick), scale(200, quick)
    x = torch.arange(16, dtype=torch.float32)
    for _ in range(warmup):
        rpc.rpc_sync("worker1", echo, args=(x,))
    latencies = []
    clock = time.perf_counter_ns
    for _ in range(calls):
        t0 = clock()
        out = rpc.rpc_sync("worker1", echo, args=(x,))
        latencies.append(clock() - t0)
    assert torch.equal(out, x)
    return b1_record(calls, warmup, latencies)


def drive_b2(quick: bool) -> dict[str, Any]:
    import torch
    import torch.distributed.rpc as rpc

    calls, window, warmup = scale(20000, quick), 256, scale(1000, quick)
    x = torch.arange(16, dtype=torch.float32)

    def run(count: int) -> None:
        inflight: deque[Any] = deque()
        for _ in range(count):
            if len(inflight) >= window:
                inflight.popleft().wait()
            inflight.append(rpc.rpc_async("worker1", echo, args=(x,)))
        while inflight:
            inflight.popleft().wait()

    run(warmup)
    t0 = time.perf_counter()
    run(calls)
    elapsed = time.perf_counter() - t0
    return {
        "params": b2_params(calls, window, warmup),
        "figures": {"calls_per_s": calls / elapsed, "elapsed_s": elapsed},
    }


def drive_b3(quick: bool) -> dict[str, Any]:
    import torch
    import torch.distributed.rpc as rpc

    params: dict[str, Any] = {
        "sizes": {},
        "GB": "1e9 bytes; GB/s = 2*size*reps/total_time",
        "warmup_reps": 1,
    }
    figures: dict[str, Any] = {}
    for label, nbytes, reps in (
        ("1MiB", 1 << 20, scale(20, quick, 2)),
        ("64MiB", 64 << 20, scale(5, quick, 1)),
    ):
        x = torch.randn(nbytes // 4, dtype=torch.float32)
        out = rpc.rpc_sync("worker1", echo, args=(x,))  # warm-up
        per = []
        started = time.perf_counter_ns()
        for _ in range(reps):
            t0 = time.perf_counter_ns()
            out = rpc.rpc_sync("worker1", echo, args=(x,))
            per.append(time.perf_counter_ns() - t0)
        total = (time.perf_counter_ns() - started) / 1e9
        assert torch.equal(out, x)
        params["sizes"][label] = {"bytes": nbytes, "reps": reps}
        figures[f"GBps_{label}"] = 2 * nbytes * reps / total / 1e9
        figures[f"median_ms_per_echo_{label}"] = statistics.median(per) / 1e6
    return {"params": params, "figures": figures}


def drive_b4(quick: bool) -> dict[str, Any]:
    import torch
    import torch.distributed.autograd as dist_autograd
    import torch.distributed.rpc as rpc

    warmup, timed = scale(10, quick), scale(50, quick)
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    stages = RANKS["B4_dist_backward_chain"][1:]

    def step() -> tuple[float, list[float]]:
        with dist_autograd.context() as context_id:
            h = x
            for stage in stages:
                h = rpc.rpc_sync(stage, stage_forward, args=(h,))
            loss = h.sum()
            dist_autograd.backward(context_id, [loss])
            norms = [rpc.rpc_sync(s, stage_grad_norm, args=(context_id,)) for s in stages]
        return float(loss.detach()), norms

    for _ in range(warmup):
        step()
    times = []
    started = time.perf_counter_ns()
    for _ in range(timed):
        t0 = time.perf_counter_ns()
        loss, norms = step()
        times.append(time.perf_counter_ns() - t0)
    total = (time.perf_counter_ns() - started) / 1e9
    # The same chain with local autograd: the distributed gradients must equal it.
    weights = [make_weight(i) for i in range(1, len(stages) + 1)]
    h = x
    for w in weights:
        h = torch.tanh(h @ w)
    h.sum().backward()
    reference = [float(w.grad.norm()) for w in weights]
    ms = [t / 1e6 for t in times]
    return {
        "params": {
            "workers": len(stages),
            "W": "512x512 f32",
            "x": "64x512 f32",
            "warmup_steps": warmup,
            "timed_steps": timed,
        },
        "figures": {
            "steps_per_s": timed / total,
            "median_ms_per_step": percentile(ms, 50),
            "p90_ms_per_step": percentile(ms, 90),
            "loss": loss,
            "grad_norms": norms,
            "grad_norm_max_rel_err_vs_local": max(
                abs(a - b) / max(abs(b), 1e-12) for a, b in zip(norms, reference, strict=True)
            ),
        },
    }


def drive_b5(quick: bool) -> dict[str, Any]:
    import torch.distributed.rpc as rpc

    steps, lr = scale(200, quick, 20), 0.05
    trainers = RANKS["B5_param_server"][2:]
    # Data, parameter references and optimizers before the clock starts.
    for future in [
        rpc.rpc_async(t, trainer_prepare, args=(i, steps, lr)) for i, t in enumerate(trainers)
    ]:
        future.wait()
    started = time.perf_counter()
    runs = [rpc.rpc_async(t, trainer_run, timeout=0) for t in trainers]
    results = [future.wait() for future in runs]
    wall = time.perf_counter() - started
    return b5_record(
        trainers,
        steps,
        lr,
        wall,
        [r["losses"] for r in results],
        [[ns / 1e9 for ns in r["step_ns"]] for r in results],
    )


DRIVERS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "B1_latency": drive_b1,
    "B2_throughput": drive_b2,
    "B3_bandwidth": drive_b3,
    "B4_dist_backward_chain": drive_b4,
    "B5_param_server": drive_b5,
}


def b6_steps(threads: int | None, quick: bool) -> dict[str, Any]:
    """B6 in this process: the MLP, batch 64, forward + cross-entropy + backward + SGD."""
    import torch
    import torch.nn.functional as F

    if threads is not None:
        torch.set_num_threads(threads)
    warmup, timed = scale(20, quick, 5), scale(500, quick)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    xs, ys = make_batches(50, seed=7, teacher=make_teacher())

    def step(i: int) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xs[i % len(xs)]), ys[i % len(ys)])
        loss.backward()
        opt.step()
        return loss.detach()

    for i in range(warmup):
        step(i)
    t0 = time.perf_counter()
    kept = [step(i) for i in range(timed)]
    elapsed = time.perf_counter() - t0
    losses = [float(v) for v in kept]
    return {
        "steps_per_s": timed / elapsed,
        "threads": torch.get_num_threads(),
        "warmup": warmup,
        "timed": timed,
        "first10_loss": float(np.mean(losses[:10])),
        "last10_loss": float(np.mean(losses[-10:])),
    }


# *** processes ***


def _rank(workload: str, rank: int, port: int, quick: bool, results: mp.Queue[Any]) -> None:
    """One process of an RPC workload; rank 0 puts the driver's record on `results`."""
    _quiet()
    import torch
    import torch.distributed.rpc as rpc

    names = RANKS[workload]
    name = names[rank]
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # every RPC process computes on one thread
    if workload == "B4_dist_backward_chain" and name != "driver":
        _STATE["W"] = make_weight(int(name.removeprefix("worker")))
    if workload == "B5_param_server" and name == "ps":
        _STATE["model"] = make_mlp()
    options = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=WORKER_THREADS, rpc_timeout=RPC_TIMEOUT_S
    )
    rpc.init_rpc(name, rank=rank, world_size=len(names), rpc_backend_options=options)
    try:
        if rank == 0:
            try:
                record = {"ok": True, **DRIVERS[workload](quick)}
            except Exception as e:  # reported as the record; the processes still shut down
                record = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                record["traceback"] = traceback.format_exc()
            results.put(record)
    finally:
        rpc.shutdown()


def _local(threads: int | None, quick: bool, results: mp.Queue[Any]) -> None:
    _quiet()
    try:
        results.put({"ok": True, "run": b6_steps(threads, quick)})
    except Exception as e:  # reported as the record
        results.put({"ok": False, "error": f"{type(e).__name__}: {e}"})


def _processes(target: Callable[..., None], arglists: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Start one spawned process per argument tuple; rank 0's record, once all have ended."""
    context = mp.get_context("spawn")
    results: mp.Queue[Any] = context.Queue()
    processes = [context.Process(target=target, args=(*args, results)) for args in arglists]
    for process in processes:
        process.start()
    deadline = time.monotonic() + TIMEOUT_S
    record: dict[str, Any] | None = None
    while record is None:
        try:
            record = results.get(timeout=1.0)
        except queue.Empty:
            if time.monotonic() > deadline:
                record = {"ok": False, "error": f"no result after {TIMEOUT_S:.0f} s"}
            elif all(p.exitcode is not None for p in processes) or processes[0].exitcode:
                codes = [p.exitcode for p in processes]
                record = {"ok": False, "error": f"processes ended without a result: {codes}"}
    for process in processes:
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
            process.join()
    record["exitcodes"] = [p.exitcode for p in processes]
    return record


def run_workload(workload: str, quick: bool) -> dict[str, Any]:
    """One run of `workload` on PyTorch: its record."""
    started = time.perf_counter()
    if workload == "B6_local_autograd":
        one = _processes(_local, [(1, quick)])
        default = _processes(_local, [(None, quick)])
        bad = next((r for r in (one, default) if not r["ok"]), None)
        if bad is not None:
            record = bad
        else:
            a, b = one["run"], default["run"]
            record = {
                "ok": True,
                "params": {
                    "model": "Linear(784,256)-ReLU-Linear(256,10)",
                    "batch": 64,
                    "warmup_steps": a["warmup"],
                    "timed_steps": a["timed"],
                    "optimizer": "SGD lr=0.05",
                    "default_threads": b["threads"],
                },
                "figures": {
                    "steps_per_s_threads1": a["steps_per_s"],
                    "steps_per_s_default_threads": b["steps_per_s"],
                    "first10_loss": a["first10_loss"],
                    "last10_loss": a["last10_loss"],
                },
            }
    else:
        os.environ.setdefault("TP_SOCKET_IFNAME", "lo")  # TensorPipe's sockets on loopback
        port = _free_port()
        ranks = [(workload, r, port, quick) for r in range(len(RANKS[workload]))]
        record = _processes(_rank, ranks)
        if record["ok"]:
            record["params"].update(torch_num_threads=1, rpc="TensorPipe, default transports")
    record = {"name": workload, **record}
    record["workload_wall_s"] = time.perf_counter() - started
    return record


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one run of a workload on PyTorch RPC")
    parser.add_argument("workload", choices=WORKLOADS)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    _quiet()
    import torch

    record = run_workload(args.workload, args.quick)
    record["torch"] = torch.__version__
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    # Through the package's name, so the spawned processes and RPC find these functions
    # as asyncgrad.bench.torch_side.*, not __main__.*.
    from asyncgrad.bench import torch_side

    sys.exit(torch_side.main())
