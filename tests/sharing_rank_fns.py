"""Functions tests/test_sharing.py runs inside every rank (module level, so ranks can import them by name)."""

from __future__ import annotations

from typing import Any


def shared_world_groups(ctx: Any) -> dict[str, Any]:
    """Build the groups a world of ranks sharing a GPU builds (``gpu=True, shared=True``) on these CPU ranks
    and use each: NCCL would refuse two ranks on one device, so all of them must be gloo."""
    import torch
    import torch.distributed as dist

    from pytest_mnnvl.worlds.layout import Layout, build_groups

    ep_group, cpu_group, world_group = build_groups(Layout(ctx.world_size, ctx.pp_size), ctx.rank, True, shared=True)
    total = torch.tensor([ctx.rank])
    dist.all_reduce(total, group=ep_group)
    dist.barrier(group=cpu_group)
    dist.barrier(group=world_group)
    return {
        "ranks_per_gpu": ctx.ranks_per_gpu,
        "answered": ctx.answered_queries,
        "backends": (dist.get_backend(ep_group), dist.get_backend(cpu_group), dist.get_backend(world_group)),
        "twin": ep_group is not cpu_group,
        "ep_sum": int(total.item()),
    }
