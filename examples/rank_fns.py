"""Functions the demo runs on every rank (module level, so each rank imports them by name)."""

from __future__ import annotations

from typing import Any

from pytest_mnnvl.model.layers import LayerSpec


def build_moe_alltoall(ctx: Any, *sized_for: LayerSpec) -> Any:
    """FlashInfer's own handle on this rank's EP group (0.7.2.post1: ``MoeAlltoAll``; 0.7.4:
    ``NVLinkOneSidedAlltoAll``), sized by FlashInfer's formula for the largest tokens, dispatch bytes
    and combine bytes of ``sized_for`` only."""
    from pytest_mnnvl.conformance.roundtrip import build_union_alltoall

    return build_union_alltoall(ctx, sized_for)


def release(ctx: Any, a2a: Any) -> None:
    """Free the workspace once every EP rank is done with it (0.7.2: ``_reset_workspace()``; 0.7.4: ``destroy()``)."""
    from pytest_mnnvl.conformance.roundtrip import ep_barrier
    from pytest_mnnvl.managers import handles

    ep_barrier(ctx)
    handles.api().builder(ctx.ep_rank, ctx.ep_size).release(a2a)


def first_layer_sizing(ctx: Any, base: LayerSpec, head: LayerSpec, tokens: int) -> dict[str, Any]:
    """Size the workspace from the base layer (the pre-fix manager), then round-trip the head layer."""
    from pytest_mnnvl.conformance.roundtrip import ep_barrier, round_trip

    a2a = build_moe_alltoall(ctx, base)
    base_ok = round_trip(a2a, base, ctx.ep_rank, ctx.ep_size, base.max_num_tokens, ctx.device)
    ep_barrier(ctx)
    head_error = None
    try:
        round_trip(a2a, head, ctx.ep_rank, ctx.ep_size, tokens, ctx.device)
    except RuntimeError as error:
        head_error = str(error)
    release(ctx, a2a)
    return {"base": base_ok.received_per_source, "head_error": head_error}


def union_sizing(ctx: Any, layers: list[LayerSpec], barrier: bool = True) -> dict[str, Any]:
    """Size the workspace for all layers at once (the fix), then round-trip each in turn (``barrier=False``
    leaves out the EP barrier between two layouts: a race on FlashInfer 0.7.2, see the test)."""
    from pytest_mnnvl.conformance.roundtrip import ep_barrier, round_trip
    from pytest_mnnvl.managers import handles

    a2a = build_moe_alltoall(ctx, *layers)
    error = None
    try:
        for layer in layers:
            round_trip(a2a, layer, ctx.ep_rank, ctx.ep_size, layer.max_num_tokens, ctx.device)
            if barrier:
                ep_barrier(ctx)
    except RuntimeError as exc:
        error = str(exc)
    size = handles.api().facts(a2a).size_per_rank
    release(ctx, a2a)
    return {"size_per_rank": size, "error": error}
