"""Functions the pool benchmark runs on ranks (here, not in ``bench_pool.py``, so ranks can import them by name).

``World.run`` refuses functions from ``__main__``: a rank imports the function's module by name, and the
spawn baseline's children unpickle their target the same way. Keep this module import-light: torch is
imported inside the functions, where the rank or child already has it.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

#: Elements of the float32 tensor all-reduced per call (4 KiB, a small routing-metadata-sized message).
NUMEL = 1024


def step(rank: int, group: Any) -> float:
    """The work of one call: an all-reduce then a barrier in the EP group; returns the reduced value."""
    import torch
    import torch.distributed as dist

    t = torch.full((NUMEL,), float(rank + 1))
    dist.all_reduce(t, group=group)
    dist.barrier(group=group)
    return float(t[0])


# -- warm pool (fn(ctx, ...) on every rank of a pytest_mnnvl World) ------------------------------


def pool_step(ctx: Any) -> float:
    """One benchmark call on a warm world."""
    return step(ctx.rank, ctx.ep_group)


def pool_noop(ctx: Any) -> int:
    """No collective at all: the pool's own round trip (send the call, collect every rank's result)."""
    return int(ctx.rank)


def pool_kill_self(ctx: Any, victim: int, stamp_path: str) -> None:
    """``victim`` records the time and SIGKILLs itself; the other ranks wait in a barrier meanwhile."""
    import torch.distributed as dist

    if ctx.rank == victim:
        with open(stamp_path, "w", encoding="utf-8") as f:
            f.write(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # not reached
    dist.barrier(group=ctx.ep_group)


def pool_skip_barrier(ctx: Any) -> int:
    """Rank 0 returns at once; every other rank enters a barrier rank 0 never joins (a deadlock)."""
    import torch.distributed as dist

    if ctx.rank != 0:
        dist.barrier(group=ctx.ep_group)
    return int(ctx.rank)


# -- spawn-per-call baseline (the shape of vLLM's _spawn_workers / _run_worker) -------------------


def spawn_worker(rank: int, world_size: int, port: int, results: Any) -> None:
    """One child of a freshly spawned world: join over TCP, build the EP group, run the step, leave."""
    import traceback

    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        group = dist.new_group(list(range(world_size)))  # the EP group (pp=1: every rank)
        value = step(rank, group)
        results.put((rank, "ok", value))
    except Exception:
        results.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
