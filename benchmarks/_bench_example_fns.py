"""Functions ``bench_example.py`` runs in ranks and in spawned children (imported by name)."""

from __future__ import annotations

import time
from typing import Any


def bare_plan(ctx: Any, factory: Any, plan_json: str, repeats: int) -> list[float]:
    """The manager's own work, no harness: a fresh manager, ``initialize`` + one round trip per layer,
    the earlier layers' round trips again on the final handle, ``cleanup``; timed from an EP barrier to
    an EP barrier (the slowest rank), ``repeats`` times."""
    import torch
    import torch.distributed as dist

    from pytest_mnnvl.conformance.rank import evict_workspaces
    from pytest_mnnvl.conformance.roundtrip import round_trip
    from pytest_mnnvl.model.layers import ModelPlan

    plan = ModelPlan.from_json(plan_json)
    layers = plan.layers_of_stage(ctx.pp_stage)
    gpu = ctx.device != "cpu"
    times = []
    for _ in range(repeats):
        evict_workspaces()
        dist.barrier(group=ctx.cpu_group)
        t0 = time.perf_counter()
        manager = factory(ctx.cpu_group)
        adapter = factory.adapter(manager)
        # Between round trips of different layouts a barrier is required (TensorRT-LLM #19312: without it a
        # fast peer's next dispatch overwrites a combine still being read; this loop hit it at ws 4).
        for layer in layers:
            adapter.initialize(layer)
            round_trip(adapter.moe_alltoall(), layer, ctx.ep_rank, ctx.ep_size, layer.max_num_tokens, ctx.device)
            dist.barrier(group=ctx.cpu_group)
        for layer in layers[:-1]:  # earlier layers again on the final handle, as run_plan does
            round_trip(adapter.moe_alltoall(), layer, ctx.ep_rank, ctx.ep_size, layer.max_num_tokens, ctx.device)
            dist.barrier(group=ctx.cpu_group)
        adapter.cleanup()
        if gpu:
            torch.cuda.synchronize()
        dist.barrier(group=ctx.cpu_group)
        times.append(time.perf_counter() - t0)
        del adapter, manager
    evict_workspaces()
    return times


def spawn_example_worker(rank: int, boot: dict[str, Any], factory: Any, plan_json: str, results: Any) -> None:
    """One child of a world spawned for a single example (vLLM's ``_spawn_workers`` shape): start the
    world the way a pool rank does, run the example, tear down, exit."""
    import traceback

    import torch.distributed as dist

    from pytest_mnnvl.conformance.rank import run_plan
    from pytest_mnnvl.worlds.rank import _start_world

    try:
        ctx = _start_world({**boot, "rank": rank, "status_path": f"{boot['dir']}/status-{rank}.txt"})
        run_plan(ctx, factory, plan_json)
        results.put((rank, "ok", None))
    except Exception:
        results.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
