"""The oracle's arithmetic on FlashInfer 0.7.4 (``NVLinkOneSidedAlltoAll``): fixed regions per layout.

0.7.4 lays a rank's row out once, at allocation, from per-dimension capacities
(:mod:`pytest_mnnvl.model.sizing_v074`): top-k tables of ``T × top_k``, a dispatch region of fixed
capacity and a combine input region at a fixed offset, sized ``ep × T × hidden × 2``. So on
0.7.4 a handle **covers** a layer when, at the layer's full token count:

- the runtime token count is at most the allocation's (``runtimeMaxTokensPerRank exceeds the
  allocation-time token capacity``), and ``top_k`` equals the layout's (``Dispatch EP size/top_k
  differs from its workspace layout``): 0.7.2 kept ``kMaxTopK`` tables, 0.7.4 does not;
- the layer's payloads, as ``NVLinkOneSidedAlltoAll.dispatch`` sends them (:func:`wire_payloads`),
  fit the dispatch region, each 128-aligned (``Dispatch payload exceeds its workspace capacity``);
- its combine input fits the combine region (``Combine payload exceeds its fixed workspace
  region``). The combine region no longer moves with the dispatch bytes, so a layer cannot borrow
  dispatch room for its combine (or the reverse): both capacities are judged, apart.

Bytes per rank alone say nothing; the verdicts read the handle's own 33-field layout.
The ``total`` policy (one byte size per rank, vLLM ≤ 0.32) cannot be followed on 0.7.4:
``NVLinkOneSidedAlltoAll`` takes no byte size, only the per-token dimensions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pytest_mnnvl.model import sizing_v074
from pytest_mnnvl.model.layers import COMBINE_ELEMENT_SIZE, INT32_BYTES, LayerSpec
from pytest_mnnvl.model.releases import V074
from pytest_mnnvl.model.sizing_v074 import WorkspaceLayout

if TYPE_CHECKING:
    from pytest_mnnvl.model.oracle import Capacity

RELEASE = V074
POLICIES = ("per_dimension", "first_call")
#: Why the policies missing from :data:`POLICIES` cannot be followed here.
UNFOLLOWABLE = {
    "total": "FlashInfer 0.7.4's NVLinkOneSidedAlltoAll sizes its workspace from per-token dimensions (tokens, "
    "hidden size, dispatch format, extra bytes) and takes no byte size per rank, so no manager can keep a single "
    "'total need'"
}
WORKSPACE_TABLE = "NVLinkOneSidedAlltoAll._WORKSPACES"
#: Why a superseded workspace stays in it.
LEAK_RULE = (
    "FlashInfer 0.7.4 frees a workspace with the destroy() of its last user, so a superseded "
    "NVLinkOneSidedAlltoAll was never destroyed"
)


def wire_payloads(layer: LayerSpec) -> tuple[int, ...]:
    """Bytes per token of each payload ``NVLinkOneSidedAlltoAll.dispatch`` sends for ``layer``.

    Its dispatch takes hidden states, their scales, the expert ids and the weights (at most four
    payloads, ``kMaxPayloads``); the room ``extra_payload_bytes_per_token`` reserves is for bytes
    that travel inside those rows, so a layer's extra bytes ride at the end of its hidden-state row.
    """
    hidden = layer.activation_bytes_per_token + layer.extra_payload_bytes_per_token
    scales = (layer.scale_bytes_per_token,) if layer.quant.scale_element_size else ()
    return (hidden, *scales, layer.top_k * INT32_BYTES, layer.top_k * INT32_BYTES)


def layout_for(
    ep_size: int, tokens: int, top_k: int, dispatch_bytes_per_token: int, combine_bytes_per_token: int, eplb: int = 0
) -> WorkspaceLayout:
    """The layout ``NVLinkOneSidedAlltoAll`` asks for when its dispatch row (format bytes + ids + weights +
    extra) is ``dispatch_bytes_per_token`` and its combine row ``combine_bytes_per_token`` (no CFT, no Lamport)."""
    return sizing_v074.workspace_layout(
        ep_size,
        tokens,
        top_k,
        ep_size * tokens * dispatch_bytes_per_token + sizing_v074.MAX_PAYLOADS * sizing_v074.WORKSPACE_ALIGNMENT,
        ep_size * tokens * combine_bytes_per_token,
        0,
        eplb,
        False,
    )


def layer_layout(layer: LayerSpec, ep_size: int) -> WorkspaceLayout:
    """The layout of a handle built for ``layer`` alone at its max tokens."""
    return layout_for(
        ep_size,
        layer.max_num_tokens,
        layer.top_k,
        layer.dispatch_bytes_per_token,
        layer.combine_bytes_per_token,
        layer.eplb_stats_num_experts,
    )


def need(layer: LayerSpec, ep_size: int) -> int:
    """Bytes per rank of the layout a handle for ``layer`` alone gets."""
    return layer_layout(layer, ep_size).workspace_size


def size_for(
    ep_size: int, tokens: int, dispatch: int, combine: int, eplb: int, top_k: int
) -> tuple[int, tuple[int, ...]]:
    """(bytes per rank, layout) of a handle sized for these per-dimension capacities."""
    layout = layout_for(ep_size, tokens, top_k, dispatch, combine, eplb)
    return layout.workspace_size, tuple(layout)


def layout_of(capacity: Capacity) -> WorkspaceLayout:
    if len(capacity.layout) != sizing_v074.NUM_METAINFO_FIELDS:
        raise ValueError(
            f"FlashInfer 0.7.4's verdicts need the handle's {sizing_v074.NUM_METAINFO_FIELDS}-field layout; this "
            f"capacity has {len(capacity.layout)} fields (bytes per rank alone do not say where its regions are)"
        )
    return WorkspaceLayout(*capacity.layout)


def dispatch_check(layout: WorkspaceLayout, layer: LayerSpec) -> sizing_v074.DispatchCapacity:
    return sizing_v074.check_dispatch(layout, layer.max_num_tokens, wire_payloads(layer))


def combine_check(layout: WorkspaceLayout, layer: LayerSpec) -> sizing_v074.CombineCapacity:
    return sizing_v074.check_combine(layout, layer.max_num_tokens, layer.hidden_size, COMBINE_ELEMENT_SIZE)


def _no_handle(capacity: Capacity) -> bool:
    """No layout and no bytes: the capacity of a missing (or destroyed) handle, which serves nothing."""
    return not capacity.layout and capacity.size_per_rank == 0


def covers(capacity: Capacity, layer: LayerSpec, ep_size: int) -> bool:
    """At the layer's full token count: tokens, top_k, dispatch region and combine region all fit."""
    if _no_handle(capacity):
        return False
    layout = layout_of(capacity)
    return (
        layout.ep_size == ep_size
        and layout.top_k == layer.top_k
        and layer.max_num_tokens <= layout.max_num_tokens
        and layer.eplb_stats_num_experts <= layout.eplb_stats_num_experts
        and dispatch_check(layout, layer).fits
        and combine_check(layout, layer).fits
    )


def shrunk(before: Capacity, after: Capacity) -> bool:
    """Any capacity smaller: bytes per rank, max tokens, or either fixed region (no handle at all: smaller)."""
    if _no_handle(before):
        return False
    if _no_handle(after):
        return True
    old, new = layout_of(before), layout_of(after)
    return (
        after.size_per_rank < before.size_per_rank
        or new.max_num_tokens < old.max_num_tokens
        or new.dispatch_payload_size < old.dispatch_payload_size
        or new.combine_input_size < old.combine_input_size
    )


def oversized(capacity: Capacity, bound: Capacity) -> dict[str, tuple[int, int]]:
    """The dimensions of a 0.7.4 layout (bytes per rank, max tokens, the fixed dispatch and combine regions, the
    EPLB slots) in which ``capacity`` exceeds ``bound``: name -> (observed, bound)."""
    if _no_handle(capacity):
        return {}
    have = layout_of(capacity)
    if _no_handle(bound):
        return {"size_per_rank": (capacity.size_per_rank, 0)}
    most = layout_of(bound)
    pairs = {
        "size_per_rank": (capacity.size_per_rank, bound.size_per_rank),
        "max_num_tokens": (have.max_num_tokens, most.max_num_tokens),
        "dispatch_capacity": (have.dispatch_payload_size, most.dispatch_payload_size),
        "combine_capacity": (have.combine_input_size, most.combine_input_size),
        "eplb_stats_num_experts": (have.eplb_stats_num_experts, most.eplb_stats_num_experts),
    }
    return {name: pair for name, pair in pairs.items() if pair[0] > pair[1]}


def requirement(layer: LayerSpec, ep_size: int) -> dict[str, Any]:
    """What a handle must have to serve ``layer``: its regions at full tokens, its token count and top_k."""
    layout = layer_layout(layer, ep_size)
    return {
        "dispatch_capacity": f">= {dispatch_check(layout, layer).need}",
        "combine_capacity": f">= {combine_check(layout, layer).need}",
        "max_num_tokens": f">= {layer.max_num_tokens}",
        "top_k": layer.top_k,
    }


def observed(capacity: Capacity) -> dict[str, Any]:
    out: dict[str, Any] = {"size_per_rank": capacity.size_per_rank, "max_num_tokens": capacity.max_num_tokens}
    if len(capacity.layout) == sizing_v074.NUM_METAINFO_FIELDS:
        layout = WorkspaceLayout(*capacity.layout)
        out.update(
            dispatch_capacity=layout.dispatch_payload_size,
            combine_capacity=layout.combine_input_size,
            top_k=layout.top_k,
        )
    return out


def cross_product_need(layers: Sequence[LayerSpec], ep_size: int) -> int:
    return layout_for(
        ep_size,
        max(layer.max_num_tokens for layer in layers),
        layers[0].top_k,
        max(layer.dispatch_bytes_per_token for layer in layers),
        max(layer.combine_bytes_per_token for layer in layers),
        max(layer.eplb_stats_num_experts for layer in layers),
    ).workspace_size
