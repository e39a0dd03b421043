"""The oracle's arithmetic on FlashInfer 0.7.2.post1 (``MoeAlltoAll``): one byte size per rank.

0.7.2's workspace is one size per rank and a token count. The aux regions grow with the handle's
max tokens, the dispatch payloads follow them packed, and the combine region starts right after
*this call's* payloads: so whether a layer fits is FlashInfer's host-check arithmetic on the
handle's real geometry (:func:`pytest_mnnvl.model.sizing.layer_round_trip`), never ``size >= need``.
Selected by :mod:`pytest_mnnvl.model.oracle`; pure Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pytest_mnnvl.model import sizing
from pytest_mnnvl.model.layers import LayerSpec
from pytest_mnnvl.model.releases import V072

if TYPE_CHECKING:
    from pytest_mnnvl.model.oracle import Capacity

RELEASE = V072
#: Every policy a 0.7.2 manager can follow: ``MoeAlltoAll`` takes any byte size.
POLICIES = ("total", "per_dimension", "first_call")
#: Where FlashInfer keeps the workspaces a manager has not released.
WORKSPACE_TABLE = "MoeAlltoAll._WORKSPACE_CACHE"
#: Why a superseded workspace stays in it.
LEAK_RULE = "FlashInfer 0.7.2 keeps every workspace until _reset_workspace() evicts it; dropping a handle frees nothing"


def need(layer: LayerSpec, ep_size: int) -> int:
    """``moe_a2a_get_workspace_size_per_rank`` for ``layer`` alone at its max tokens."""
    return sizing.need(layer, ep_size)


def size_for(
    ep_size: int, tokens: int, dispatch: int, combine: int, eplb: int, top_k: int
) -> tuple[int, tuple[int, ...]]:
    """(bytes per rank, layout) of a handle sized for these per-dimension capacities (no layout on 0.7.2)."""
    return sizing.workspace_size_per_rank(ep_size, tokens, dispatch, combine, eplb), ()


def covers(capacity: Capacity, layer: LayerSpec, ep_size: int) -> bool:
    """At the layer's full token count, dispatch and combine both pass FlashInfer's host checks."""
    if capacity.max_num_tokens < layer.max_num_tokens:
        return False
    return sizing.layer_round_trip(layer, capacity.geometry(ep_size), layer.max_num_tokens).fits


def shrunk(before: Capacity, after: Capacity) -> bool:
    """Fewer bytes per rank or fewer max tokens: the two numbers a 0.7.2 handle is."""
    return after.size_per_rank < before.size_per_rank or after.max_num_tokens < before.max_num_tokens


def oversized(capacity: Capacity, bound: Capacity) -> dict[str, tuple[int, int]]:
    """The dimensions of a 0.7.2 handle (bytes per rank, max tokens) in which ``capacity`` exceeds ``bound``:
    name -> (observed, bound)."""
    pairs = {
        "size_per_rank": (capacity.size_per_rank, bound.size_per_rank),
        "max_num_tokens": (capacity.max_num_tokens, bound.max_num_tokens),
    }
    return {name: pair for name, pair in pairs.items() if pair[0] > pair[1]}


def requirement(layer: LayerSpec, ep_size: int) -> dict[str, Any]:
    """What a handle must have to serve ``layer`` (for violation messages; ``covers`` decides)."""
    return {"size_per_rank": f">= {need(layer, ep_size)}", "max_num_tokens": f">= {layer.max_num_tokens}"}


def observed(capacity: Capacity) -> dict[str, Any]:
    return {"size_per_rank": capacity.size_per_rank, "max_num_tokens": capacity.max_num_tokens}


def cross_product_need(layers: Sequence[LayerSpec], ep_size: int) -> int:
    return sizing.workspace_size_per_rank(
        ep_size,
        max(layer.max_num_tokens for layer in layers),
        max(layer.dispatch_bytes_per_token for layer in layers),
        max(layer.combine_bytes_per_token for layer in layers),
        max(layer.eplb_stats_num_experts for layer in layers),
    )
