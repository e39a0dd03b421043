"""Rank functions for tests/test_hazards.py: two round trips on one workspace, ordered or not."""

from __future__ import annotations

from typing import Any

from pytest_mnnvl.model.layers import LayerSpec

#: How the two round trips are separated.
SYNCS = ("none", "barrier", "all_gather", "harness_gather", "broadcast")


def two_round_trips(ctx: Any, first: LayerSpec, second: LayerSpec, sync: str, repeats: int = 1) -> dict[str, Any]:
    """``first`` then ``second`` on one workspace that holds both, separated by ``sync``, ``repeats`` times
    on fresh workspaces; the error either round trip raised on this rank in each repetition (or None)."""
    import torch.distributed as dist

    from pytest_mnnvl.backends import _hazards
    from pytest_mnnvl.conformance.roundtrip import build_alltoall, round_trip

    errors: list[str | None] = []
    for _ in range(repeats):
        a2a = build_alltoall(
            ctx,
            max_num_tokens=max(first.max_num_tokens, second.max_num_tokens),
            top_k=first.top_k,
            num_experts=first.num_experts,
            size_per_rank=max(first.need(ctx.ep_size), second.need(ctx.ep_size)),
        )
        # Without order the race may surface in a slow rank's *first* round trip: a fast peer's second dispatch
        # overwrites the combine region the slow rank is still reading, and the sim poisons the workspace.
        error: str | None = None
        try:
            round_trip(a2a, first, ctx.ep_rank, ctx.ep_size, first.max_num_tokens, ctx.device)
        except RuntimeError as exc:
            error = f"{type(exc).__name__}: {exc}"
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
        if error is None:
            try:
                round_trip(a2a, second, ctx.ep_rank, ctx.ep_size, second.max_num_tokens, ctx.device)
            except RuntimeError as exc:
                error = f"{type(exc).__name__}: {exc}"
        errors.append(error)
        dist.barrier(group=ctx.cpu_group)
        a2a._reset_workspace()
    return {"errors": errors}


def _sync(ctx: Any, sync: str) -> None:
    import torch.distributed as dist

    if sync == "barrier":
        dist.barrier(group=ctx.cpu_group)
    elif sync != "none":
        raise ValueError(f"sync={sync!r}: allowed 'none', 'barrier'")


def _error(fn: Any) -> str | None:
    try:
        fn()
    except RuntimeError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def v074_two_layouts(ctx: Any, first: LayerSpec, second: LayerSpec, repeats: int = 1) -> list[str | None]:
    """On FlashInfer 0.7.4: ``first`` then ``second`` (another payload layout) on one union handle with no
    order between them, ``repeats`` times; the error each second round trip raised (or None)."""
    import torch.distributed as dist

    from pytest_mnnvl.conformance.roundtrip import build_union_alltoall, round_trip

    errors = []
    for _ in range(repeats):
        a2a = build_union_alltoall(ctx, [first, second])
        round_trip(a2a, first, ctx.ep_rank, ctx.ep_size, first.max_num_tokens, ctx.device)
        try:
            round_trip(a2a, second, ctx.ep_rank, ctx.ep_size, second.max_num_tokens, ctx.device)
            errors.append(None)
        except RuntimeError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        dist.barrier(group=ctx.cpu_group)
        a2a.destroy()
    return errors


def v074_reinitialize(ctx: Any, layer: LayerSpec, sync: str) -> str | None:
    """On FlashInfer 0.7.4: a round trip, ``sync``, then ``moe_a2a_initialize`` on the live workspace again (as
    the mutant ``reinitializes_live_workspace`` does); what the re-initialize raised on this rank (or None)."""
    import torch.distributed as dist

    from pytest_mnnvl.conformance.roundtrip import build_union_alltoall, round_trip
    from pytest_mnnvl.managers import handles

    a2a = build_union_alltoall(ctx, [layer])
    try:
        round_trip(a2a, layer, ctx.ep_rank, ctx.ep_size, layer.max_num_tokens, ctx.device)
        _sync(ctx, sync)
        error = _error(lambda: handles.api().reinitialize(a2a))
        dist.barrier(group=ctx.cpu_group)
        return error
    finally:
        a2a.destroy()
