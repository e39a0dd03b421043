"""Rank functions for tests/test_hazards.py: two round trips on one workspace, ordered or not."""

from __future__ import annotations

from typing import Any

from pytest_mnnvl.layers import LayerSpec

#: How the two round trips are separated.
SYNCS = ("none", "barrier", "all_gather", "harness_gather", "broadcast")


def two_round_trips(ctx: Any, first: LayerSpec, second: LayerSpec, sync: str, repeats: int = 1) -> dict[str, Any]:
    """``first`` then ``second`` on one workspace that holds both, separated by ``sync``, ``repeats`` times
    on fresh workspaces; the error each second round trip raised on this rank (or None)."""
    import torch.distributed as dist

    from pytest_mnnvl.backends import _hazards
    from pytest_mnnvl.roundtrip import build_alltoall, round_trip

    errors: list[str | None] = []
    for _ in range(repeats):
        a2a = build_alltoall(
            ctx,
            max_num_tokens=max(first.max_num_tokens, second.max_num_tokens),
            top_k=first.top_k,
            num_experts=first.num_experts,
            size_per_rank=max(first.need(ctx.ep_size), second.need(ctx.ep_size)),
        )
        round_trip(a2a, first, ctx.ep_rank, ctx.ep_size, first.max_num_tokens, ctx.device)
        box: list[Any] = [None] * ctx.ep_size
        if sync == "barrier":
            dist.barrier(group=ctx.cpu_group)
        elif sync == "all_gather":
            dist.all_gather_object(box, ctx.ep_rank, group=ctx.cpu_group)
        elif sync == "harness_gather":
            with _hazards.harness_only():
                dist.all_gather_object(box, ctx.ep_rank, group=ctx.cpu_group)
        elif sync == "broadcast":
            dist.broadcast_object_list(box, src=ctx.ep_group_ranks[0], group=ctx.cpu_group)
        try:
            round_trip(a2a, second, ctx.ep_rank, ctx.ep_size, second.max_num_tokens, ctx.device)
            errors.append(None)
        except RuntimeError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        dist.barrier(group=ctx.cpu_group)
        a2a._reset_workspace()
    return {"errors": errors}
