"""Functions ``findings.py`` runs on every rank (module level, so ranks import them by name)."""

from __future__ import annotations

import time
from typing import Any

from pytest_mnnvl.model.layers import LayerSpec


def superseded_bytes(ctx: Any, factory: Any, layers: list[LayerSpec]) -> dict[str, Any]:
    """Initialize ``layers`` in order on a fresh manager; after each call read FlashInfer's own records:
    cached workspaces, mapped allocations and their bytes on this rank."""
    import gc

    from pytest_mnnvl.backends import records
    from pytest_mnnvl.conformance.rank import evict_workspaces

    evict_workspaces()
    manager = factory(ctx.cpu_group)
    adapter = factory.adapter(manager)
    rows = []
    for index, layer in enumerate(layers):
        adapter.initialize(layer)
        gc.collect()
        snap = records.snapshot()
        state = adapter.state()
        size = int(state.size_per_rank or 0)
        # The allocation behind the live handle, rounded up as FlashInfer allocated it; the rest is superseded.
        current = [w.aligned_size or 0 for w in snap.workspaces if w.workspace_size_per_rank == size]
        rows.append(
            {
                "layer": index,
                "name": layer.name,
                "size_per_rank": state.size_per_rank,
                "cached_workspaces": snap.workspace_count,
                "mapped_allocations": sum(1 for a in snap.allocations if a.mapped),
                "live_bytes_per_rank": snap.live_bytes_per_rank,
                "superseded_bytes_per_rank": snap.live_bytes_per_rank - (current[-1] if current else 0),
            }
        )
        del state
    try:
        adapter.cleanup()
    finally:
        evict_workspaces()
    gc.collect()
    after = records.snapshot()
    return {"rank": ctx.rank, "rows": rows, "after_cleanup_and_evict_bytes": after.live_bytes_per_rank}


def _local_tokens(rank: int, tokens: int, skew: bool) -> int:
    """Rank 0 carries the full batch, the others one token: the fast ranks race ahead."""
    return tokens if (rank == 0 or not skew) else 1


def layout_race(
    ctx: Any, first: LayerSpec, second: LayerSpec, tokens: int, iterations: int, barrier: bool, skew: bool
) -> dict[str, Any]:
    """Round trip ``first`` (combine of ones) then at once dispatch ``second``, ``iterations`` times, on one
    workspace that covers both; count combines of ``first`` whose sums are wrong on this rank.

    The hazard (TensorRT-LLM #19312): the combine region starts after the *current* dispatch payloads, so a
    fast peer's next dispatch with a larger layout writes where a slow rank may still be reading its combine.
    ``barrier`` puts a device sync + EP-group barrier between the rounds (the safe way)."""
    import torch
    import torch.distributed as dist

    from pytest_mnnvl.conformance.roundtrip import build_alltoall, distinct_owner_counts, make_inputs

    ep, rank = ctx.ep_size, ctx.ep_rank
    need = max(first.need(ep), second.need(ep))
    a2a = build_alltoall(
        ctx, max_num_tokens=tokens, top_k=first.top_k, num_experts=first.num_experts, size_per_rank=need
    )
    local = _local_tokens(rank, tokens, skew)
    experts_a, payloads_a = make_inputs(first, rank, local, ctx.device)
    experts_b, payloads_b = make_inputs(second, rank, local, ctx.device)
    expected = distinct_owner_counts(first, rank, local, ep)
    ones = torch.ones((ep, tokens, first.hidden_size), dtype=torch.bfloat16, device=ctx.device)
    zeros_b = torch.zeros((ep, tokens, second.hidden_size), dtype=torch.bfloat16, device=ctx.device)
    bad_iterations = 0
    bad_tokens = 0
    offsets: set[int] = set()
    t0 = time.perf_counter()
    outputs = []
    # This experiment measures the corruption itself: the sim's race detector would stop it first.
    from pytest_mnnvl.backends import _hazards

    with _hazards.allowed():
        for _ in range(iterations):
            a2a.dispatch(experts_a, payloads_a, tokens)
            offsets.add(int(a2a._state.combine_payload_offset))
            combined = a2a.combine(ones, tokens)
            # Keep the result alive on the device; compare after the next round so no host sync sits between.
            outputs.append(combined)
            if barrier:
                if ctx.device != "cpu":
                    torch.cuda.synchronize()
                dist.barrier(group=ctx.cpu_group)
            a2a.dispatch(experts_b, payloads_b, tokens)
            offsets.add(int(a2a._state.combine_payload_offset))
            a2a.combine(zeros_b, tokens)
        if ctx.device != "cpu":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    for combined in outputs:
        got = combined.float().cpu()
        wrong = (got != expected.unsqueeze(1)).any(dim=1)
        if bool(wrong.any()):
            bad_iterations += 1
            bad_tokens += int(wrong.sum())
    dist.barrier(group=ctx.cpu_group)
    a2a._reset_workspace()
    return {
        "rank": ctx.rank,
        "local_tokens": local,
        "bad_iterations": bad_iterations,
        "bad_tokens": bad_tokens,
        "combine_payload_offsets": sorted(offsets),
        "workspace_size_per_rank": need,
        "seconds": round(seconds, 4),
    }
