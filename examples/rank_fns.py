"""Functions the demo runs on every rank (module level, so each rank imports them by name)."""

from __future__ import annotations

from typing import Any

from pytest_mnnvl.model.layers import LayerSpec


def build_moe_alltoall(ctx: Any, sized_for: LayerSpec) -> Any:
    """FlashInfer's own ``MoeAlltoAll`` on this rank's EP group, sized for one layer only."""
    from pytest_mnnvl.conformance.roundtrip import build_alltoall

    return build_alltoall(
        ctx,
        max_num_tokens=sized_for.max_num_tokens,
        top_k=sized_for.top_k,
        num_experts=sized_for.num_experts,
        size_per_rank=sized_for.need(ctx.ep_size),
    )


def ep_barrier(ctx: Any) -> None:
    """What must separate round trips whose payload layouts differ: FlashInfer 0.7.2's combine region
    starts after the current dispatch payloads, so without it a fast rank's next dispatch overwrites
    the combine slots a slower peer is still reading (TensorRT-LLM #19312)."""
    import torch
    import torch.distributed as dist

    if ctx.device != "cpu":
        torch.cuda.synchronize()
    dist.barrier(group=ctx.cpu_group)


def first_layer_sizing(ctx: Any, base: LayerSpec, head: LayerSpec, tokens: int, barrier: bool = True) -> dict[str, Any]:
    """Size the workspace from the base layer (the pre-fix manager), then round-trip the head layer
    (``barrier=False`` leaves out the EP barrier between the two layouts: a race)."""
    from pytest_mnnvl.conformance.roundtrip import round_trip

    a2a = build_moe_alltoall(ctx, base)
    base_ok = round_trip(a2a, base, ctx.ep_rank, ctx.ep_size, base.max_num_tokens, ctx.device)
    if barrier:
        ep_barrier(ctx)
    try:
        round_trip(a2a, head, ctx.ep_rank, ctx.ep_size, tokens, ctx.device)
    except RuntimeError as error:
        a2a._reset_workspace()
        return {"base": base_ok.received_per_source, "head_error": str(error)}
    a2a._reset_workspace()
    return {"base": base_ok.received_per_source, "head_error": None}


def union_sizing(ctx: Any, layers: list[LayerSpec]) -> list[int]:
    """Size the workspace for the largest need of all layers (the fix): every layer round-trips."""
    from pytest_mnnvl.conformance.roundtrip import round_trip

    biggest = max(layers, key=lambda layer: layer.need(ctx.ep_size))
    a2a = build_moe_alltoall(ctx, biggest)
    for layer in layers:
        round_trip(a2a, layer, ctx.ep_rank, ctx.ep_size, layer.max_num_tokens, ctx.device)
        ep_barrier(ctx)
    size = int(a2a.workspace_size_per_rank)
    a2a._reset_workspace()
    return [size]
