"""FlashInfer 0.7.4's handle: ``flashinfer.moe_ep``'s ``NVLinkOneSidedAlltoAll`` (see :mod:`.handles`).

0.7.4 deleted ``MoeAlltoAll``; the one-sided all-to-all is built through
``flashinfer.moe_ep.create_communication(BootstrapConfig, MoEEpCommParams, NVLinkOneSidedConfig)``
and owns its workspace: an entry of ``NVLinkOneSidedAlltoAll._WORKSPACES`` keyed by the whole
33-field layout, shared by instances of one layout and refcounted, so the ``destroy()`` of its last
user frees it. There is no byte-size parameter: the layout follows from the parameters,

- dispatch region ``ep × T × (format bytes(hidden) + 2·4·top_k + extra) + 4 × 256``,
- combine region ``ep × T × hidden × 2`` (bf16), at a fixed offset,
- top-k tables ``T × top_k`` each,

so a capacity (max tokens, dispatch bytes per token, combine bytes per token) is expressed as
``hidden = combine / 2`` and the narrowest dispatch format of 0.7.4 (MXFP4 for any real hidden
size), the rest of the dispatch bytes going to ``extra_payload_bytes_per_token``: the fence kernels
only see the region's capacity, so this is exactly the capacity asked for (it is more only where a
capacity asks for less than that format's row: then the format's row). CFT counted writes and the
Lamport transport are turned off: each adds regions sized for one layer's format and for what every
rank's hardware votes, so the layout, and the oracle's verdict on it, would no longer be a function
of the capacity alone.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pytest_mnnvl.managers.handles import Capacity, HandleFacts, InjectedBuildFailure
from pytest_mnnvl.model import sizing_v074
from pytest_mnnvl.model.layers import COMBINE_ELEMENT_SIZE, INT32_BYTES
from pytest_mnnvl.model.releases import V074

RELEASE = V074
HANDLE_CLASS = "NVLinkOneSidedAlltoAll"
_COMMUNICATION = "flashinfer.moe_ep.backends.split.comm.nvlink_one_sided.communication"
_SIZE_INDEX = sizing_v074.WorkspaceLayout._fields.index("workspace_size")
_TOKENS_INDEX = sizing_v074.WorkspaceLayout._fields.index("max_num_tokens")
_TOP_K_INDEX = sizing_v074.WorkspaceLayout._fields.index("top_k")


def _moe_ep() -> Any:
    """``flashinfer.moe_ep``, looked up by name: this module also type-checks against 0.7.2's."""
    return importlib.import_module("flashinfer.moe_ep")


def parameters(capacity: Capacity, top_k: int, max_num_tokens: int | None = None) -> dict[str, Any]:
    """``NVLinkOneSidedAlltoAll``'s sizing inputs for ``capacity``: ``max_tokens_per_rank``,
    ``hidden_size``, ``dispatch_format`` (a ``QuantFormat`` name) and ``extra_payload_bytes_per_token``."""
    hidden = -(-capacity.combine_bytes_per_token // COMBINE_ELEMENT_SIZE)
    fmt = min(sizing_v074.DISPATCH_FORMATS, key=lambda name: sizing_v074.dispatch_bytes_per_token(hidden, name))
    row = sizing_v074.dispatch_bytes_per_token(hidden, fmt) + 2 * INT32_BYTES * top_k
    return {
        "max_tokens_per_rank": capacity.max_num_tokens if max_num_tokens is None else max_num_tokens,
        "hidden_size": hidden,
        "dispatch_format": fmt,
        "extra_payload_bytes_per_token": max(0, capacity.dispatch_bytes_per_token - row),
    }


class Builder:
    """``NVLinkOneSidedAlltoAll`` on one EP rank, through ``create_communication``."""

    def __init__(self, ep_rank: int, ep_size: int) -> None:
        self.ep_rank = ep_rank
        self.ep_size = ep_size

    def layout(self, capacity: Capacity, top_k: int, max_num_tokens: int | None = None) -> sizing_v074.WorkspaceLayout:
        """The layout :meth:`build` gets (0.7.4's own arithmetic, :mod:`pytest_mnnvl.model.sizing_v074`)."""
        p = parameters(capacity, top_k, max_num_tokens)
        return sizing_v074.nvlink_one_sided_layout(
            self.ep_size,
            p["max_tokens_per_rank"],
            p["hidden_size"],
            top_k,
            dispatch_format=p["dispatch_format"],
            extra_payload_bytes_per_token=p["extra_payload_bytes_per_token"],
        )

    def size_for(self, capacity: Capacity, top_k: int) -> int:
        return self.layout(capacity, top_k).workspace_size

    def build(
        self, capacity: Capacity, top_k: int, num_experts: int, comm: Any, *, max_num_tokens: int | None = None
    ) -> Any:
        """Collective over ``comm``: 0.7.4's ``__init__`` all-gathers the platform verdict, the handle-type
        vote and the transport votes, then (a new layout) allocates and barriers. A smaller
        ``max_num_tokens`` makes a smaller layout here: the bytes follow the tokens."""
        from flashinfer.fused_moe.api import QuantFormat

        moe_ep = _moe_ep()
        p = parameters(capacity, top_k, max_num_tokens)
        return moe_ep.create_communication(
            moe_ep.BootstrapConfig(world_size=self.ep_size, rank=self.ep_rank, process_group=_group_of(comm)),
            moe_ep.MoEEpCommParams(
                num_experts,
                top_k,
                p["max_tokens_per_rank"],
                p["hidden_size"],
                dispatch_format=getattr(QuantFormat, p["dispatch_format"]),
            ),
            moe_ep.NVLinkOneSidedConfig(
                comm_backend=comm,
                extra_payload_bytes_per_token=p["extra_payload_bytes_per_token"],
                cft=False,
                lamport=False,
            ),
        )

    def release(self, handle: Any, keep: Any = None) -> None:
        """``destroy()``: this handle's share of the workspace; the last user's frees it (an instance
        ``keep`` of the same layout holds its own share, so it needs no exception)."""
        handle.destroy()

    def drop(self, handle: Any) -> None:
        handle.destroy()


def _group_of(comm: Any) -> Any:
    """The torch process group a comm backend runs over (``EpComm.group``, ``TorchDistBackend._group``)."""
    return getattr(comm, "group", getattr(comm, "_group", None))


def builder(ep_rank: int, ep_size: int) -> Builder:
    return Builder(ep_rank, ep_size)


def facts(a2a: Any) -> HandleFacts:
    """Read from the handle's own metainfo (its layout) and parameters; all ``None`` once destroyed."""
    metainfo = getattr(a2a, "metainfo", None)
    params = getattr(a2a, "params", None)
    if metainfo is None or params is None:
        return HandleFacts(None, None, None, None)
    layout = tuple(int(v) for v in metainfo.tolist())
    return HandleFacts(
        size_per_rank=layout[_SIZE_INDEX],
        max_num_tokens=layout[_TOKENS_INDEX],
        top_k=layout[_TOP_K_INDEX],
        num_experts=int(params.num_experts),
        layout=layout,
    )


def round_trip_handle(communication: Any) -> Any:
    """A ``flashinfer.moe_ep`` communication is itself the handle round trips go through."""
    return communication


def dispatch(a2a: Any, layer: Any, experts: Any, payloads: list[Any], tokens: int) -> tuple[Any, int | None]:
    """``NVLinkOneSidedAlltoAll.dispatch(hidden_states, topk_ids, topk_weights, hidden_states_scale=,
    runtime_max_tokens_per_rank=)``: the layer's extra bytes ride at the end of each hidden-state row
    (0.7.4 sends at most these four payloads; ``extra_payload_bytes_per_token`` is the room for them)."""
    import torch

    by_name = {p.name: tensor for p, tensor in zip(layer.dispatch_payloads, payloads, strict=True)}
    hidden = by_name["hidden_states"]
    if "extra" in by_name:
        hidden = torch.cat([hidden.contiguous().view(torch.uint8), by_name["extra"].view(torch.uint8)], dim=1)
    result = a2a.dispatch(
        hidden,
        by_name["topk_ids"],
        by_name["topk_weights"],
        hidden_states_scale=by_name.get("scales"),
        runtime_max_tokens_per_rank=tokens,
    )
    offset = int(a2a._round["combine_offset"])
    return result.hidden_states.view(a2a.ep_size, tokens, -1), offset


def combine(a2a: Any, payload: Any, tokens: int) -> Any:
    """``combine(expert_output)``; the token count is the dispatch's (0.7.4 keeps it per round)."""
    return a2a.combine(payload)


def reinitialize(a2a: Any) -> None:
    """``moe_a2a_initialize`` on the live workspace again (what ``checkpoint_restore`` runs on a fresh
    mapping): zeroes this rank's row, its fixed combine region included (a mutant's defect)."""
    a2a._module.moe_a2a_initialize(a2a.workspace, a2a.metainfo, a2a.ep_rank, a2a.ep_size)


@contextmanager
def inject_build_failure() -> Iterator[None]:
    """Every ``NVLinkOneSidedAlltoAll`` construction in this rank fails where it would allocate: after
    ``__init__``'s votes (every rank casts them alike), before ``_acquire_workspace`` allocates."""
    cls = _moe_ep().NVLinkOneSidedAlltoAll
    original = cls.__dict__["_acquire_workspace"]

    def _acquire_workspace(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise InjectedBuildFailure("pytest-mnnvl: injected failure of NVLinkOneSidedAlltoAll._acquire_workspace")

    cls._acquire_workspace = _acquire_workspace
    try:
        yield
    finally:
        cls._acquire_workspace = original


def handle_type() -> type:
    cls: type = _moe_ep().NVLinkOneSidedAlltoAll
    return cls


def evict_all() -> int:
    """Free every ``_WORKSPACES`` entry as the last ``destroy()`` would (between plans: whatever a
    leaking manager left behind). Nothing to do if ``flashinfer.moe_ep`` was never imported."""
    module = sys.modules.get(_COMMUNICATION)
    cls: Any = getattr(module, "NVLinkOneSidedAlltoAll", None)
    table = getattr(cls, "_WORKSPACES", None)
    if not table:
        return 0
    count = len(table)
    for (ep_rank, _ep_size, _layout), state in list(table.items()):
        if state.get("cft_ready"):
            from flashinfer.moe_ep.backends.split.comm.nvlink_one_sided.kernels import (
                get_nvlink_one_sided_alltoall_module,
            )

            get_nvlink_one_sided_alltoall_module().moe_a2a_cft_destroy(state["workspace"], ep_rank)
        state.clear()
    table.clear()
    cls._CFT_WORKSPACE_KEY = None
    return count
