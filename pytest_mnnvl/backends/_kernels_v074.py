"""CPU twin of FlashInfer 0.7.4's compiled one-sided all-to-all module (``nvlink_one_sided_alltoall``).

:class:`SimNvlinkOneSidedModule` has the 15 functions ``build_and_load()`` returns on a GPU,
with 0.7.4's arguments and results. Each op runs FlashInfer's host checks first, in its order
and with its text (TVM FFI ``ICHECK`` format, a ``RuntimeError`` in Python; the formatting
helpers are shared with the 0.7.2 twin in :mod:`._kernels`), then a host "kernel" that moves
real bytes between the ranks' rows at 0.7.4's offsets (``nvlink_one_sided_alltoall.cu``,
``moeAlltoAllKernels.cu``):

* The layout is fixed at allocation (:mod:`pytest_mnnvl.model.sizing_v074`): dispatch receives into
  a fixed-capacity region, combine stages into a fixed region, and every offset dispatch
  returns is relative to the rank's row.
* ``flag_val`` advances twice per round (``2N+1`` dispatch, ``2N+2`` combine); its round parity
  picks one of two ``recv_counters[2][ep]`` banks, and dispatch re-arms the other bank to -1.
* dispatch: route each token once per distinct owner rank of its valid experts (ids outside
  ``[0, num_experts)`` go nowhere), write its payloads into the owners' rows at slot
  ``[source rank, send index]`` (each payload buffer 128-aligned), publish the counts into the
  owners' current bank, then raise this rank's flag in every peer and wait for theirs.
* combine: stage the expert outputs into this rank's combine region unless they already are
  there (FP8 under low precision), flag and wait, then pull one row per contributing rank from
  the owners' regions and reduce them in FP32 in the kernel's tree order.
* CFT counted writes and the Lamport transport are what an H100 built against CUDA < 13.4 has:
  no Lamport kernels, no logical-endpoint API (the CFT ops report failure the way the stub
  manager does); requesting either in dispatch/combine fails at FlashInfer's own checks.

Every access to a peer's row and to a combine source region goes through :func:`_write_rows` /
:func:`_read_rows` (the completion flags too), so a race checker can observe them in one place.
The race detector (:mod:`._hazards`) is fed as by the 0.7.2 twin: ``initialize`` and every
dispatch payload write are checked against the combine leases of peers not yet ordered after
their combine; every combine publishes its reads before its flags go up. With 0.7.4's fixed
regions a dispatch never overlaps a combine region (TensorRT-LLM #19312 is gone by design), but
re-initializing a live workspace still zeroes the combine region a slower peer may be reading.
A wait that never completes raises after ``min(timeout_sec, PYTEST_MNNVL_SIM_KERNEL_TIMEOUT)``
seconds with the kernel's own printf text and leaves the rank "trapped" (see :mod:`._kernels`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import torch

from pytest_mnnvl.model import sizing_v074 as lay
from pytest_mnnvl.model.sizing_v074 import WorkspaceLayout
from pytest_mnnvl.worlds import audit

from . import _hazards, _kernels
from ._kernels import (
    TIMEOUT_ENV,
    SimKernelTimeout,
    _as_bytes,
    _check_host,
    _check_input,
    _check_type,
    _launch_error,
    check,
    check_eq,
    first_occurrence,
    kernel_timeout_s,
    owner_ranks,
    raise_if_sticky,
)
from ._shm import memory_fence

#: ``SWITCH_TOP_K`` of the 0.7.4 kernels.
KERNEL_TOP_K = frozenset(lay.SUPPORTED_TOP_K)
#: ``toTllmDataType``: combine payloads the op accepts; the kernels (``SWITCH_DTYPE``) take only 16-bit ones.
COMBINE_PAYLOAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
COMBINE_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
#: ``CftLeManager::handleBytes()`` of a build without CUDA 13.4 logical-endpoint headers.
CFT_HANDLE_BYTES = 0
_FP8_MAX = 448.0
_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF
_DL_CPU = 1  # kDLCPU
_DL_CUDA = 2  # kDLCUDA

#: Row starts of this process's workspaces with a Lamport dispatch awaiting its combine.
_open_lamport_rounds: set[int] = set()


# --- the one place where rows are shared ---------------------------------------------------------


def _write_rows(workspace: torch.Tensor, rank: int, offset: int, data: torch.Tensor, row_stride: int = 0) -> None:
    """Store bytes into ``rank``'s row: ``data`` is uint8, 1-D (one block) or 2-D rows ``row_stride`` apart."""
    if data.dim() == 1:
        workspace[rank, offset : offset + data.numel()].copy_(data)
        return
    rows, width = data.shape
    if rows == 0 or width == 0:
        return
    span = workspace[rank, offset : offset + (rows - 1) * row_stride + width]
    span.as_strided((rows, width), (row_stride, 1)).copy_(data)


def _read_rows(workspace: torch.Tensor, rank: int, offset: int, nbytes: int) -> torch.Tensor:
    """A copy of ``nbytes`` bytes of ``rank``'s row (the bytes as they are at this moment)."""
    return workspace[rank, offset : offset + nbytes].clone()


def _i32(values: Sequence[int]) -> torch.Tensor:
    return torch.tensor([_signed32(v) for v in values], dtype=torch.int32).view(torch.uint8)


def _fill(value: int, nbytes: int) -> torch.Tensor:
    return torch.full((1,), value, dtype=torch.uint8).expand(nbytes)


def _signed32(value: int) -> int:
    value &= _U32
    return value - (1 << 32) if value >= 1 << 31 else value


def _complete_phase(
    workspace: torch.Tensor,
    phase: str,
    flags_offset: int,
    me: int,
    active: Sequence[bool],
    epoch: int,
    timeout_sec: int,
) -> None:
    """Raise my epoch in every active peer's flag array, then wait for every active peer's in mine."""
    ep = len(active)
    memory_fence()  # payloads and counters before the flag (release)
    for peer in range(ep):
        if active[peer]:
            _write_rows(workspace, peer, flags_offset + 4 * me, _i32([epoch]))
    pending = [peer for peer in range(ep) if active[peer]]
    wait = min(float(timeout_sec), kernel_timeout_s())
    deadline = time.monotonic() + wait
    nap = 0.0
    announced: list[int] | None = None
    try:
        while True:
            seen = _read_rows(workspace, me, flags_offset, 4 * ep).view(torch.int32).tolist()
            pending = [peer for peer in pending if seen[peer] & _U32 != epoch]
            if not pending:
                break
            _hazards.raise_if_poisoned(workspace, me)  # a peer found a race: nobody waits out a timeout
            if pending != announced:
                _kernels.announce_wait(phase, me, pending, ep)  # whom this rank waits for, for a timeout's verdict
                announced = pending
            if time.monotonic() > deadline:
                peer = pending[0]
                text = f"{phase}: rank {me} timed out waiting for rank {peer} flag={seen[peer] & _U32} expected={epoch}"
                _kernels._sticky_error = text  # shared trap state: later device work in this rank refuses to run
                raise SimKernelTimeout(
                    f"{text} (pytest-mnnvl sim: waited {wait:g} s; the peer never made the matching {phase} call. "
                    f"A GPU spins timeout_sec={timeout_sec} s, then traps; the sim waits at most {TIMEOUT_ENV} "
                    f"= {kernel_timeout_s():g} s)"
                )
            time.sleep(nap)
            nap = min(nap * 2 or 2e-5, 1e-3)
    finally:
        if announced is not None:
            audit.clear_waiting()
    memory_fence()  # peers' data after their flags (acquire)


# --- FlashInfer's host-check pieces --------------------------------------------------------------


def _device_type(t: torch.Tensor) -> int:
    return _DL_CPU if t.device.type == "cpu" else _DL_CUDA


def _check_cpu(t: torch.Tensor, name: str) -> None:
    """``CHECK_CPU``."""
    check_eq(_device_type(t), _DL_CPU, f"{name}.device().device_type", "kDLCPU", f"{name} must be a host tensor")


def _check_contiguous(t: torch.Tensor, name: str) -> None:
    check(t.is_contiguous(), f"{name}.IsContiguous()", f"{name} must be contiguous")


def _check_workspace(workspace: torch.Tensor) -> None:
    """``CHECK_CUDA(workspace)`` (the sim's device is the CPU) and ``CHECK_INPUT_TYPE(workspace, dl_uint8)``."""
    _check_host(workspace, "workspace")
    _check_type(workspace, torch.uint8, "workspace")


def _read_layout(metainfo: torch.Tensor) -> WorkspaceLayout:
    """``readWorkspaceLayout``."""
    _check_cpu(metainfo, "metainfo")
    _check_contiguous(metainfo, "metainfo")
    _check_type(metainfo, torch.int64, "metainfo")
    check(
        metainfo.dim() == 1 and metainfo.size(0) == lay.NUM_METAINFO_FIELDS,
        "metainfo.ndim() == 1 && metainfo.size(0) == meta::NUM_METAINFO_FIELDS",
        "metainfo must contain the complete MoE A2A workspace layout",
    )
    return WorkspaceLayout(*(int(v) for v in metainfo.tolist()))


def _row_ptr(workspace: torch.Tensor, rank: int) -> int:
    return int(workspace.data_ptr()) + rank * workspace.stride(0)


def _check_timeout(timeout_sec: int) -> None:
    """``timeoutCycles``."""
    check(
        0 < timeout_sec <= lay.MAX_TIMEOUT_SEC,
        "timeoutSec > 0 && timeoutSec <= kMaxTimeoutSec",
        f"MoE all-to-all timeout must be in 1..{lay.MAX_TIMEOUT_SEC} seconds",
    )


def _resolve_rank_mask(enable: bool, mask: torch.Tensor | None, ep_rank: int, ep_size: int) -> list[bool]:
    """``resolveRankMask``: who takes part; everyone without a mask."""
    if not enable:
        check(mask is None, "!hasActiveRankMask(activeRankMask)", "active_rank_mask requires enable_rank_mask=True")
        return [True] * ep_size
    check(
        0 <= ep_rank < lay.MAX_RANKS,
        "epRank >= 0 && epRank < tl::kMaxRanks",
        f"epRank must be in the range [0, {lay.MAX_RANKS}) for active_rank_mask",
    )
    check(mask is not None, "hasActiveRankMask(maskTensor)", "active_rank_mask must be defined")
    assert mask is not None
    _check_cpu(mask, "t")
    _check_contiguous(mask, "t")
    _check_type(mask, torch.uint64, "t")
    check_eq(mask.dim(), 1, "t.ndim()", "1", "active_rank_mask must be a 1D tensor")
    check_eq(
        mask.size(0),
        lay.RANK_MASK_WORDS,
        "t.size(0)",
        "tl::kRankMaskWords",
        f"active_rank_mask must have exactly {lay.RANK_MASK_WORDS} uint64 elements",
    )
    words = [w & _U64 for w in mask.view(torch.int64).tolist()]
    check(
        (words[ep_rank >> 6] >> (ep_rank & 63)) & 1,
        "(out[epRank >> 6] >> (epRank & 63)) & 1ULL",
        f"active_rank_mask must mark the local ep_rank ({ep_rank}) as active",
    )
    return [bool((words[r >> 6] >> (r & 63)) & 1) for r in range(ep_size)]


def _round_parity(flag: int) -> int:
    return (((flag - 1) & _U32) >> 1) & 1


def _load_flag(workspace: torch.Tensor, rank: int, layout: WorkspaceLayout) -> int:
    cell = workspace[rank, layout.flag_val_offset : layout.flag_val_offset + 4].view(torch.int32)
    return int(cell[0]) & _U32


def _store_flag(workspace: torch.Tensor, rank: int, layout: WorkspaceLayout, value: int) -> None:
    workspace[rank, layout.flag_val_offset : layout.flag_val_offset + 4].view(torch.int32)[0] = _signed32(value)


def _own_i32(workspace: torch.Tensor, rank: int, offset: int, count: int) -> torch.Tensor:
    """This rank's private control words (send counters, routing table): never touched by a peer."""
    return workspace[rank, offset : offset + 4 * count].view(torch.int32)


def _to_fp8(values: torch.Tensor) -> torch.Tensor:
    """``cvt.rn.satfinite`` to e4m3: round to nearest, saturate at ±448, NaN stays NaN."""
    return values.float().clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)


def _tree_sum(sources: torch.Tensor) -> torch.Tensor:
    """Pairwise FP32 sum over dim 1 (a power of two), the order ``vectorized_combine_impl`` adds in."""
    while sources.size(1) > 1:
        sources = sources[:, 0::2] + sources[:, 1::2]
    return sources[:, 0]


def _tree_width(count: int) -> int:
    """Sources one token's combine adds, zero padding included: 2, or groups of 8 on 1, 2 or 4 lanes."""
    return 2 if count <= 2 else 8 if count <= 8 else 16 if count <= 16 else 32


class SimNvlinkOneSidedModule:
    """The functions of the compiled ``nvlink_one_sided_alltoall`` module, on CPU tensors."""

    # --- layout (host only) ----------------------------------------------------------------------

    def moe_a2a_get_workspace_layout(
        self,
        ep_size: int,
        max_num_tokens: int,
        top_k: int,
        dispatch_bytes: int,
        combine_input_bytes: int,
        combine_recv_bytes: int,
        eplb_stats_num_experts: int,
        can_use_cft: bool,
        metainfo_out: torch.Tensor,
    ) -> None:
        _check_cpu(metainfo_out, "metainfo")
        _check_contiguous(metainfo_out, "metainfo")
        _check_type(metainfo_out, torch.int64, "metainfo")
        check(
            metainfo_out.dim() == 1 and metainfo_out.size(0) == lay.NUM_METAINFO_FIELDS,
            "metainfo.ndim() == 1 && metainfo.size(0) == meta::NUM_METAINFO_FIELDS",
            "metainfo must have NUM_METAINFO_FIELDS elements",
        )
        layout = lay.workspace_layout(
            int(ep_size),
            int(max_num_tokens),
            int(top_k),
            int(dispatch_bytes),
            int(combine_input_bytes),
            int(combine_recv_bytes),
            int(eplb_stats_num_experts),
            bool(can_use_cft),
        )
        metainfo_out.copy_(torch.tensor(list(layout), dtype=torch.int64))

    def moe_a2a_lamport_extend_workspace_layout(
        self, metainfo: torch.Tensor, max_num_tokens: int, payload_format: int, hidden_size: int
    ) -> None:
        layout = _read_layout(metainfo)
        check(
            layout == lay.base_layout(layout),
            "layout == base",
            "metainfo must be a layout from moe_a2a_get_workspace_layout",
        )
        extended = lay.with_lamport_regions(layout, int(max_num_tokens), int(payload_format), int(hidden_size))
        metainfo.copy_(torch.tensor(list(extended), dtype=torch.int64))

    def moe_a2a_lamport_row_bytes(self, payload_format: int, hidden_size: int, top_k: int) -> list[int]:
        row = lay.lamport_row_bytes(int(payload_format), int(hidden_size))
        return [
            row.payload,
            row.scale,
            lay.lamport_dispatch_blocks_per_token(row),
            lay.lamport_bytes_per_row(int(top_k), row, int(hidden_size)),
        ]

    def moe_a2a_lamport_available(self) -> bool:
        """An H100 has no Lamport kernels (they are built for compute capability 10.0/10.3/10.7)."""
        return False

    def moe_a2a_get_metainfo_index_pairs(self) -> tuple[list[str], list[int]]:
        names = [f"MOE_A2A_{name}" for name in lay.METAINFO_INDEX_NAMES]
        values = list(range(lay.NUM_METAINFO_FIELDS))
        for name, value in lay.MODULE_CONSTANTS:
            names.append(f"MOE_A2A_{name}")
            values.append(value)
        return names, values

    # --- initialize ------------------------------------------------------------------------------

    def moe_a2a_initialize(self, workspace: torch.Tensor, metainfo: torch.Tensor, ep_rank: int, ep_size: int) -> None:
        raise_if_sticky()
        _check_workspace(workspace)
        check(
            workspace.dim() == 2 and workspace.size(0) == ep_size and workspace.stride(1) == 1,
            "workspace.ndim() == 2 && workspace.size(0) == epSize && workspace.stride(1) == 1",
            "workspace must have shape [ep_size, bytes_per_rank] with contiguous rank slices",
        )
        check(0 <= ep_rank < ep_size, "epRank >= 0 && epRank < epSize", "Invalid EP rank")
        layout = _read_layout(metainfo)
        check_eq(layout.ep_size, ep_size, "layout[EP_SIZE_INDEX]", "epSize", "Workspace layout EP size mismatch")
        expected = lay.base_layout(layout)
        if layout.has_lamport:
            expected = lay.with_lamport_regions(
                expected, layout.lamport_max_num_tokens, layout.lamport_payload_format, layout.lamport_hidden_size
            )
        check(layout == expected, "layout == expected", "Workspace layout metadata is inconsistent")
        check(
            layout.dispatch_payload_size > 0 and layout.combine_input_size > 0,
            "layout[DISPATCH_PAYLOAD_SIZE_INDEX] > 0 && layout[COMBINE_INPUT_SIZE_INDEX] > 0",
            "Dispatch and combine input payload capacities must be positive",
        )
        check(
            not layout.cft_enabled or layout.combine_recv_size > 0,
            "!layout[CFT_ENABLED_INDEX] || layout[COMBINE_RECV_SIZE_INDEX] > 0",
            "CFT requires a combine receive payload capacity",
        )
        check(
            workspace.size(1) >= layout.workspace_size,
            "workspace.size(1) >= layout[WORKSPACE_SIZE_INDEX]",
            f"Workspace needs {layout.workspace_size} bytes per rank, got {workspace.size(1)}",
        )
        # The whole row is written (peers later read its combine region), so it goes through the hook.
        _hazards.on_initialize(workspace, ep_rank)
        _write_rows(workspace, ep_rank, 0, _fill(0, layout.workspace_size))
        _write_rows(workspace, ep_rank, layout.recv_counters_offset, _fill(0xFF, 2 * ep_size * 4))
        if layout.has_lamport:
            self._arm_lamport_regions(workspace, ep_rank, layout)
        _open_lamport_rounds.discard(_row_ptr(workspace, ep_rank))

    def _arm_lamport_regions(self, workspace: torch.Tensor, rank: int, layout: WorkspaceLayout) -> None:
        """``armLamportRegions``: landing rows 0xFF, expert-id rows 0x88, combine landing rows 0xFF."""
        row = lay.lamport_row_bytes(layout.lamport_payload_format, layout.lamport_hidden_size)
        sizes = lay.lamport_region_bytes(
            layout.ep_size, layout.lamport_max_num_tokens, layout.top_k, row, layout.lamport_hidden_size
        )
        payload = layout.lamport_landing_offset
        ids = payload + sizes.payload + sizes.scale + sizes.weights
        combine = layout.lamport_combine_landing_offset
        _write_rows(workspace, rank, payload, _fill(0xFF, ids - payload))
        _write_rows(workspace, rank, ids, _fill(0x88, 2 * sizes.ids_set))
        _write_rows(workspace, rank, combine, _fill(0xFF, layout.lamport_recv_offset - combine))

    # --- CFT counted writes: the stub manager of a build without CUDA 13.4 headers ---------------

    def moe_a2a_cft_handle_bytes(self) -> int:
        return CFT_HANDLE_BYTES

    def moe_a2a_cft_create_endpoint(
        self,
        workspace: torch.Tensor,
        mem_handle: int,
        size_per_rank: int,
        ep_rank: int,
        ep_size: int,
        handle_out: torch.Tensor,
    ) -> bool:
        _check_workspace(workspace)
        check_eq(
            workspace.dim(), 2, "workspace.ndim()", "2", "workspace must be a 2D tensor of shape [epSize, sizePerRank]"
        )
        check_eq(
            workspace.size(0), ep_size, "workspace.size(0)", "epSize", "workspace first dimension must equal epSize"
        )
        check(
            0 < ep_size <= lay.MAX_RANKS,
            "epSize > 0 && epSize <= tl::kMaxRanks",
            f"epSize must be in the range (0, {lay.MAX_RANKS}]",
        )
        check(0 <= ep_rank < ep_size, "epRank >= 0 && epRank < epSize", "epRank must be in the range [0, epSize)")
        check(
            0 < size_per_rank <= workspace.stride(0),
            "workspaceSizePerRank > 0 && workspaceSizePerRank <= workspace.stride(0)",
            "workspaceSizePerRank must be in the range (0, workspace.stride(0)]",
        )
        _check_cpu(handle_out, "handleOut")
        _check_contiguous(handle_out, "handleOut")
        _check_type(handle_out, torch.uint8, "handleOut")
        check_eq(
            handle_out.numel(),
            CFT_HANDLE_BYTES,
            "handleOut.numel()",
            "static_cast<int64_t>(tl::CftLeManager::handleBytes())",
            "handle_out must hold exactly one exported endpoint handle",
        )
        print("CftLeManager: CUDA logical endpoint APIs require CUDA 13.4+ headers.", file=sys.stderr)
        return False

    def moe_a2a_cft_import_endpoints(self, workspace: torch.Tensor, ep_rank: int, all_handles: torch.Tensor) -> bool:
        _check_cpu(all_handles, "allHandles")
        _check_contiguous(all_handles, "allHandles")
        _check_type(all_handles, torch.uint8, "allHandles")
        check(False, "g_cft_manager", "moe_a2a_cft_create_endpoint must succeed first")
        return False

    def moe_a2a_cft_destroy(self, workspace: torch.Tensor, ep_rank: int) -> None:
        return None  # no endpoint was ever created: nothing to release

    def moe_a2a_cft_release_endpoints(self, workspace: torch.Tensor, ep_rank: int) -> None:
        check(False, "g_cft_manager", "CFT endpoints are not initialized")

    def moe_a2a_cft_endpoint_ids(self, workspace: torch.Tensor, ep_rank: int, ids_out: torch.Tensor) -> None:
        _check_cpu(ids_out, "idsOut")
        _check_contiguous(ids_out, "idsOut")
        _check_type(ids_out, torch.int64, "idsOut")
        check(False, "g_cft_manager && g_cft_manager->isInitialized()", "CFT endpoints are not initialized")

    # --- dispatch --------------------------------------------------------------------------------

    def moe_a2a_dispatch(
        self,
        token_selected_experts: torch.Tensor,
        input_payloads: Sequence[torch.Tensor],
        workspace: torch.Tensor,
        metainfo: torch.Tensor,
        runtime_max_tokens_per_rank: int,
        ep_rank: int,
        ep_size: int,
        top_k: int,
        num_experts: int,
        eplb_local_stats: torch.Tensor | None,
        use_cft: bool,
        expert_id_payload_index: int,
        invalid_token_expert_id: int,
        use_lamport: bool,
        enable_rank_mask: bool,
        active_rank_mask: torch.Tensor | None,
        timeout_sec: int,
        enable_pdl: bool,
    ) -> tuple[list[int], int, int]:
        raise_if_sticky()
        tse = token_selected_experts
        _check_input(tse, "tokenSelectedExperts")
        _check_type(tse, torch.int32, "tokenSelectedExperts")
        check_eq(tse.dim(), 2, "tokenSelectedExperts.ndim()", "2", "tokenSelectedExperts must be a 2D tensor")
        check_eq(
            tse.size(1), top_k, "tokenSelectedExperts.size(1)", "topK", "tokenSelectedExperts must have topK columns"
        )
        layout = _read_layout(metainfo)
        check(
            not use_lamport or layout.has_lamport,
            "!useLamport || offsets[LAMPORT_MAX_NUM_TOKENS_INDEX] > 0",
            "Workspace was allocated without Lamport regions",
        )
        check(
            _row_ptr(workspace, ep_rank) not in _open_lamport_rounds,
            "!isLamportRoundOpen(rankWorkspacePtr(workspace, epRank))",
            "A Lamport dispatch must be followed by its Lamport combine before the next dispatch",
        )
        local = tse.size(0)
        payloads = list(input_payloads)
        runtime = int(runtime_max_tokens_per_rank)
        check(runtime > 0, "runtimeMaxTokensPerRank > 0", "runtimeMaxTokensPerRank must be positive")
        check(runtime <= layout.max_num_tokens, lay.RUNTIME_TOKENS_CONDITION, lay.RUNTIME_TOKENS_DETAIL)
        check(
            0 < ep_size <= lay.MAX_RANKS,
            "epSize > 0 && epSize <= tl::kMaxRanks",
            f"epSize must be in the range (0, {lay.MAX_RANKS}]",
        )
        check(0 <= ep_rank < ep_size, "epRank >= 0 && epRank < epSize", "epRank must be in the range [0, epSize)")
        check(0 < top_k <= lay.MAX_TOP_K, "topK > 0 && topK <= tl::kMaxTopK", "topK must be in the range (0, kMaxTopK]")
        check(len(payloads) > 0, "numPayloads > 0", "inputPayloads must not be empty")
        check(len(payloads) <= lay.MAX_PAYLOADS, "numPayloads <= tl::kMaxPayloads", "Too many input payloads")
        check(num_experts >= ep_size, "numExperts >= epSize", "numExperts must be greater than or equal to epSize")
        eplb_n = 0
        if eplb_local_stats is not None:
            stats = eplb_local_stats
            _check_input(stats, "stats")
            _check_type(stats, torch.int32, "stats")
            check_eq(stats.dim(), 1, "stats.ndim()", "1", "eplb_local_stats must be a 1D tensor")
            eplb_n = stats.size(0)
            check(eplb_n > 0, "eplbStatsNumExperts > 0", "eplb_local_stats must not be empty")
            check(
                eplb_n <= num_experts,
                "eplbStatsNumExperts <= numExperts",
                "eplb_local_stats size must be <= numExperts (slots)",
            )
        region = layout.lamport_recv_offset if use_lamport else layout.dispatch_payload_offset
        region_size = layout.lamport_recv_size if use_lamport else layout.dispatch_payload_size
        recv_offsets: list[int] = []
        cursor = region
        for payload in payloads:
            # CHECK_DEVICE(payload, tokenSelectedExperts) cannot fail here: every sim tensor is a host tensor.
            _check_input(payload, "payload")
            check_eq(payload.dim(), 2, "payload.ndim()", "2", "payload must be a 2D tensor")
            check_eq(
                payload.size(0),
                local,
                "payload.size(0)",
                "localNumTokens",
                "payload must have the same first dimension as tokenSelectedExperts",
            )
            check(
                payload.data_ptr() % 16 == 0,
                "reinterpret_cast<uintptr_t>(payload.data_ptr()) % 16 == 0",
                "payload must be 16-byte aligned",
            )
            recv_offsets.append(cursor)
            nbytes = ep_size * runtime * payload.size(1) * payload.element_size()
            cursor = lay.align(cursor + nbytes, lay.CACHELINE_ALIGNMENT)
        if expert_id_payload_index >= 0:
            check(
                expert_id_payload_index < len(payloads),
                "expertIdPayloadIndex < numPayloads",
                "expert_id_payload_index out of range",
            )
            ids_payload = payloads[expert_id_payload_index]
            _check_type(ids_payload, torch.int32, "expertIdPayload")
            check_eq(
                ids_payload.size(1),
                top_k,
                "expertIdPayload.size(1)",
                "topK",
                "expert-id payload must have topK columns",
            )
        _check_workspace(workspace)
        check_eq(
            workspace.dim(), 2, "workspace.ndim()", "2", "workspace must be a 2D tensor of shape [epSize, sizePerRank]"
        )
        check_eq(
            workspace.size(0), ep_size, "workspace.size(0)", "epSize", "workspace first dimension must equal epSize"
        )
        check(
            ep_size == layout.ep_size and top_k == layout.top_k,
            "epSize == offsets[EP_SIZE_INDEX] && topK == offsets[TOP_K_INDEX]",
            "Dispatch EP size/top_k differs from its workspace layout",
        )
        check(
            local <= runtime,
            "localNumTokens <= runtimeMaxTokensPerRank",
            "Local token count exceeds the runtime capacity",
        )
        check(
            eplb_n <= layout.eplb_stats_num_experts,
            "eplbStatsNumExperts <= offsets[EPLB_STATS_NUM_EXPERTS_INDEX]",
            "EPLB statistics exceed their workspace capacity",
        )
        check(
            not use_cft or layout.cft_enabled,
            "!useCftCountedWrites || offsets[CFT_ENABLED_INDEX]",
            "Workspace was allocated without CFT support",
        )
        check(
            workspace.size(1) >= layout.workspace_size,
            "workspace.size(1) >= offsets[WORKSPACE_SIZE_INDEX]",
            "Workspace is smaller than its layout",
        )
        capacity = lay.DispatchCapacity(tuple(recv_offsets), cursor - region, region_size)
        check(capacity.fits, lay.DISPATCH_CAPACITY_CONDITION, capacity.detail)
        if use_lamport:
            check(
                not use_cft and eplb_local_stats is None,
                "!useCftCountedWrites && !enableEplb",
                "A Lamport dispatch uses neither CFT counted writes nor EPLB statistics",
            )
            raise NotImplementedError(
                "pytest-mnnvl sim: the Lamport kernels are not emulated (the simulated H100 has none: "
                "moe_a2a_lamport_available() is False, so NVLinkOneSidedAlltoAll never picks them)"
            )
        check(
            _row_ptr(workspace, ep_rank) % lay.CACHELINE_ALIGNMENT == 0,
            "reinterpret_cast<uintptr_t>(rankWorkSpacePtr) % kCachelineAlignment == 0",
            f"rankWorkSpacePtr must be {lay.CACHELINE_ALIGNMENT}-byte aligned",
        )
        if use_cft:
            for i, payload in enumerate(payloads):
                row_bytes = payload.size(1) * payload.element_size()
                check(
                    row_bytes % 16 == 0,
                    "bytesPerToken % 16 == 0",
                    f"CFT dispatch payload {i} has {row_bytes} bytes per token; "
                    "CFT counted writes require 16-byte alignment",
                )
            check(
                False,
                "g_cft_manager && g_cft_manager->isInitialized()",
                "CFT counted writes requested but the CFT endpoints are not initialized",
            )
        active = _resolve_rank_mask(enable_rank_mask, active_rank_mask, ep_rank, ep_size)
        _check_timeout(int(timeout_sec))

        flag = self._prepare_dispatch(workspace, layout, ep_rank, ep_size)
        if top_k not in KERNEL_TOP_K:
            raise _launch_error("moe_a2a_dispatch_launch", "Unsupported top_k")
        self._dispatch_kernel(
            workspace,
            layout,
            tse,
            payloads,
            recv_offsets,
            runtime,
            ep_rank,
            num_experts,
            active,
            eplb_local_stats,
            flag,
        )
        _complete_phase(
            workspace, "dispatch", layout.dispatch_completion_flags_offset, ep_rank, active, flag, int(timeout_sec)
        )
        _hazards.dispatched(workspace)  # every peer raised its flag after its previous combine
        eplb_offset = layout.eplb_gathered_stats_offset if eplb_local_stats is not None else -1
        return recv_offsets, layout.combine_input_offset, eplb_offset

    def _prepare_dispatch(self, workspace: torch.Tensor, layout: WorkspaceLayout, me: int, ep: int) -> int:
        """``moeA2APrepareDispatchKernel``: next epoch, zero counters, re-arm the other receive bank."""
        flag = (_load_flag(workspace, me, layout) + 1) & _U32
        _store_flag(workspace, me, layout, flag)
        _own_i32(workspace, me, layout.local_token_counter_offset, 1).zero_()
        _own_i32(workspace, me, layout.send_counters_offset, ep).zero_()
        other = _round_parity(flag) ^ 1
        _write_rows(workspace, me, layout.recv_counters_offset + other * ep * 4, _i32([-1] * ep))
        return flag

    def _dispatch_kernel(
        self,
        workspace: torch.Tensor,
        layout: WorkspaceLayout,
        tse: torch.Tensor,
        payloads: list[torch.Tensor],
        recv_offsets: list[int],
        runtime: int,
        me: int,
        num_experts: int,
        active: list[bool],
        eplb_local_stats: torch.Tensor | None,
        flag: int,
    ) -> None:
        ep = len(active)
        local, top_k = tse.shape
        ids = tse.to(torch.int64)
        valid = (ids >= 0) & (ids < num_experts)
        targets = torch.where(valid, owner_ranks(ids.clamp(0, max(num_experts - 1, 0)), num_experts, ep), -1)
        live = torch.tensor(active, dtype=torch.bool)[targets.clamp(min=0)]
        send = valid & first_occurrence(targets) & live
        target_ranks = torch.where(send, targets, -1).to(torch.int32)
        send_indices = torch.full((local, top_k), -1, dtype=torch.int32)
        tokens_for: list[torch.Tensor] = []
        for rank in range(ep):
            hit = target_ranks == rank
            tokens = hit.any(dim=1).nonzero().flatten()
            if tokens.numel():
                column = hit[tokens].to(torch.int8).argmax(dim=1)
                send_indices[tokens, column] = torch.arange(tokens.numel(), dtype=torch.int32)
            tokens_for.append(tokens)
        _own_i32(workspace, me, layout.topk_target_ranks_offset, local * top_k).copy_(target_ranks.flatten())
        _own_i32(workspace, me, layout.topk_target_indices_offset, local * top_k).copy_(send_indices.flatten())
        rows = [_as_bytes(p) for p in payloads]
        writes = [
            _hazards.Write(
                rank,
                start + me * runtime * data.size(1),
                start + (me * runtime + tokens.numel()) * data.size(1),
                f"payload {index} of the dispatch",
            )
            for rank, tokens in enumerate(tokens_for)
            if tokens.numel()
            for index, (data, start) in enumerate(zip(rows, recv_offsets, strict=True))
        ]
        _hazards.check_writes(workspace, me, "dispatch", writes)
        for rank, tokens in enumerate(tokens_for):
            if tokens.numel() == 0:
                continue
            for data, start in zip(rows, recv_offsets, strict=True):
                width = data.size(1)
                _write_rows(workspace, rank, start + me * runtime * width, data.index_select(0, tokens).flatten())
        counts = [t.numel() for t in tokens_for]
        _own_i32(workspace, me, layout.send_counters_offset, ep).copy_(torch.tensor(counts, dtype=torch.int32))
        _own_i32(workspace, me, layout.local_token_counter_offset, 1)[0] = local
        bank = layout.recv_counters_offset + _round_parity(flag) * ep * 4
        for rank in range(ep):
            if active[rank]:
                _write_rows(workspace, rank, bank + me * 4, _i32([counts[rank]]))
            else:  # a masked peer sends nothing this round
                _write_rows(workspace, me, bank + rank * 4, _i32([0]))
        if eplb_local_stats is not None:
            n = eplb_local_stats.size(0)
            stats = eplb_local_stats.contiguous().view(torch.uint8)
            for rank in range(ep):
                if active[rank]:
                    _write_rows(workspace, rank, layout.eplb_gathered_stats_offset + me * n * 4, stats)

    # --- combine ---------------------------------------------------------------------------------

    def moe_a2a_combine(
        self,
        payload: torch.Tensor,
        local_num_tokens: int,
        workspace: torch.Tensor,
        metainfo: torch.Tensor,
        runtime_max_tokens_per_rank: int,
        ep_rank: int,
        ep_size: int,
        top_k: int,
        combine_payload_offset: int,
        payload_in_workspace: bool,
        use_low_precision: bool,
        use_cft: bool,
        enable_rank_mask: bool,
        active_rank_mask: torch.Tensor | None,
        output: torch.Tensor,
        timeout_sec: int,
        enable_pdl: bool,
        use_lamport: bool,
    ) -> None:
        raise_if_sticky()
        runtime = int(runtime_max_tokens_per_rank)
        local = int(local_num_tokens)
        _check_input(payload, "payload")
        check_eq(
            payload.dim(),
            3,
            "payload.ndim()",
            "3",
            "payload must be a 3D tensor [ep_size, runtime_max_tokens_per_rank, elements_per_token]",
        )
        check_eq(payload.size(0), ep_size, "payload.size(0)", "epSize", "payload first dimension must equal epSize")
        check(runtime > 0, "runtimeMaxTokensPerRank > 0", "runtimeMaxTokensPerRank must be positive")
        check_eq(
            payload.size(1),
            runtime,
            "payload.size(1)",
            "runtimeMaxTokensPerRank",
            "payload second dimension must equal runtimeMaxTokensPerRank",
        )
        check(
            payload.data_ptr() % 16 == 0,
            "reinterpret_cast<uintptr_t>(payload.data_ptr()) % 16 == 0",
            "payload must be 16-byte aligned",
        )
        hidden = payload.size(2)
        check(hidden > 0, "elementsPerToken > 0", "elementsPerToken must be positive")
        check(
            0 < ep_size <= lay.MAX_RANKS,
            "epSize > 0 && epSize <= tl::kMaxRanks",
            f"epSize must be in the range (0, {lay.MAX_RANKS}]",
        )
        check(0 <= ep_rank < ep_size, "epRank >= 0 && epRank < epSize", "epRank must be in the range [0, epSize)")
        check(0 < top_k <= lay.MAX_TOP_K, "topK > 0 && topK <= tl::kMaxTopK", "topK must be in the range (0, kMaxTopK]")
        check(local >= 0, "localNumTokens >= 0", "localNumTokens must be non-negative")
        if payload.dtype not in COMBINE_PAYLOAD_DTYPES:
            raise TypeError("Unsupported data type for payload")
        _check_input(output, "output")
        check(
            output.dtype == payload.dtype,
            "output.dtype() == payload.dtype()",
            "output dtype must match the payload dtype",
        )
        check(
            output.dim() == 2 and output.size(0) == local and output.size(1) == hidden,
            "output.ndim() == 2 && output.size(0) == localNumTokens && output.size(1) == elementsPerToken",
            "output must be a [local_num_tokens, elements_per_token] tensor",
        )
        layout = _read_layout(metainfo)
        _check_workspace(workspace)
        check(
            workspace.dim() == 2 and workspace.size(0) == ep_size,
            "workspace.ndim() == 2 && workspace.size(0) == epSize",
            "workspace must be [ep_size, size_per_rank]",
        )
        check(
            ep_size == layout.ep_size and top_k == layout.top_k,
            "epSize == offsets[EP_SIZE_INDEX] && topK == offsets[TOP_K_INDEX]",
            "Combine EP size/top_k differs from its workspace layout",
        )
        check(
            workspace.size(1) >= layout.workspace_size,
            "sizePerRank >= offsets[WORKSPACE_SIZE_INDEX]",
            "Workspace is smaller than its layout",
        )
        check(
            not use_cft or layout.cft_enabled,
            "!useCftCountedWrites || offsets[CFT_ENABLED_INDEX]",
            "Workspace was allocated without CFT support",
        )
        check(runtime <= layout.max_num_tokens, lay.RUNTIME_TOKENS_CONDITION, lay.RUNTIME_TOKENS_DETAIL)
        round_open = _row_ptr(workspace, ep_rank) in _open_lamport_rounds
        check(
            bool(use_lamport) == round_open,
            "useLamport == isLamportRoundOpen(rankWorkSpacePtr)",
            "A Lamport combine needs a Lamport dispatch before it"
            if use_lamport
            else "A Lamport dispatch must be followed by a Lamport combine",
        )
        if use_lamport:  # unreachable in a sim world: no Lamport dispatch ever opens a round
            raise NotImplementedError("pytest-mnnvl sim: the Lamport kernels are not emulated")
        check_eq(
            combine_payload_offset,
            layout.combine_input_offset,
            "combinePayloadOffset",
            "offsets[COMBINE_INPUT_OFFSET_INDEX]",
            "combinePayloadOffset must address the fixed combine source region",
        )
        input_is_workspace = payload.data_ptr() == _row_ptr(workspace, ep_rank) + combine_payload_offset
        check(
            not payload_in_workspace or input_is_workspace,
            "!payloadInWorkspace || inputIsWorkspace",
            "payload_in_workspace is true but payload does not address the combine input region",
        )
        capacity = lay.CombineCapacity(payload.numel() * payload.element_size(), layout.combine_input_size)
        check(capacity.fits, lay.COMBINE_CAPACITY_CONDITION, capacity.detail)
        element = payload.element_size()
        wire = hidden * (1 if use_low_precision else element)
        if use_cft:
            check(
                wire % 16 == 0,
                "params.wire_bytes_per_token % 16 == 0",
                f"CFT combine payload has {wire} bytes per token; CFT counted writes require 16-byte alignment",
            )
            check(
                False,
                "g_cft_manager && g_cft_manager->isInitialized()",
                "CFT counted writes requested but the CFT endpoints are not initialized",
            )
        active = _resolve_rank_mask(enable_rank_mask, active_rank_mask, ep_rank, ep_size)
        _check_timeout(int(timeout_sec))
        if payload.dtype not in COMBINE_KERNEL_DTYPES:
            raise _launch_error("moe_a2a_prepare_combine_launch", "Unsupported dtype for moe_a2a_combine")
        stride = wire if use_low_precision and not input_is_workspace else hidden * element
        flag = self._prepare_combine(
            workspace, layout, payload, ep_rank, runtime, stride, bool(use_low_precision), input_is_workspace
        )
        if top_k not in KERNEL_TOP_K:
            raise _launch_error("moe_a2a_combine_launch", "Unsupported top_k")
        # What this rank will read of each row, published before its flags go up (the race detector).
        _hazards.lease(
            workspace, ep_rank, flag, self._combine_reads(workspace, layout, ep_rank, runtime, local, stride)
        )
        _complete_phase(
            workspace, "combine", layout.combine_completion_flags_offset, ep_rank, active, flag, int(timeout_sec)
        )
        try:
            if local:
                self._combine_kernel(
                    workspace, layout, ep_rank, runtime, local, top_k, stride, wire, payload, output, use_low_precision
                )
        finally:
            _hazards.combined(workspace, ep_rank, flag, combine_payload_offset, active)

    def _combine_reads(
        self, workspace: torch.Tensor, layout: WorkspaceLayout, me: int, runtime: int, local: int, stride: int
    ) -> list[tuple[int, int, int]]:
        """``(row, start, end)`` of each owner's combine region this rank's combine gathers from: its slots
        ``[me, 0 .. last sent index]``, as :meth:`_combine_kernel` reads them."""
        top_k = layout.top_k
        ranks = _own_i32(workspace, me, layout.topk_target_ranks_offset, local * top_k).view(local, top_k).long()
        slots = _own_i32(workspace, me, layout.topk_target_indices_offset, local * top_k).view(local, top_k).long()
        first = layout.combine_input_offset + me * runtime * stride
        reads = []
        for rank in range(workspace.size(0)):
            mine = slots[(ranks == rank) & (slots >= 0)]
            used = int(mine.max()) + 1 if mine.numel() else 0
            reads.append((rank, first, first + used * stride))
        return reads

    def _prepare_combine(
        self,
        workspace: torch.Tensor,
        layout: WorkspaceLayout,
        payload: torch.Tensor,
        me: int,
        runtime: int,
        stride: int,
        low_precision: bool,
        in_workspace: bool,
    ) -> int:
        """``moeA2APrepareCombineKernel``: next epoch; stage each source's received rows into my region."""
        ep = payload.size(0)
        flag = _load_flag(workspace, me, layout)
        bank = layout.recv_counters_offset + _round_parity(flag) * ep * 4
        received = _read_rows(workspace, me, bank, 4 * ep).view(torch.int32).tolist()
        flag = (flag + 1) & _U32
        _store_flag(workspace, me, layout, flag)
        if in_workspace and not low_precision:
            return flag  # the experts wrote straight into the region: nothing to stage
        base = layout.combine_input_offset
        source_stride = payload.size(2) * payload.element_size()
        for source in range(ep):
            count = min(max(int(received[source]), 0), runtime)
            if count == 0:
                continue
            start = base + source * runtime * stride
            if in_workspace:  # low precision in place: FP8 into the first bytes of each row
                rows = _read_rows(workspace, me, start, count * source_stride).view(count, source_stride)
                values = rows.view(payload.dtype)
            else:
                values = payload[source, :count]
            if low_precision:
                staged = _to_fp8(values).view(torch.uint8)
                _write_rows(workspace, me, start, staged, stride)
            else:
                _write_rows(workspace, me, start, _as_bytes(values).flatten())
        return flag

    def _combine_kernel(
        self,
        workspace: torch.Tensor,
        layout: WorkspaceLayout,
        me: int,
        runtime: int,
        local: int,
        top_k: int,
        stride: int,
        wire: int,
        payload: torch.Tensor,
        output: torch.Tensor,
        low_precision: bool,
    ) -> None:
        """``moeA2ACombineKernel``: gather one row per contributing rank, reduce in FP32 tree order."""
        ep, hidden = payload.size(0), payload.size(2)
        wire_dtype = torch.float8_e4m3fn if low_precision else payload.dtype
        ranks = _own_i32(workspace, me, layout.topk_target_ranks_offset, local * top_k).view(local, top_k).long()
        slots = _own_i32(workspace, me, layout.topk_target_indices_offset, local * top_k).view(local, top_k).long()
        valid = slots >= 0
        position = valid.long().cumsum(dim=1) - 1  # compact index of each contributing slot
        counts = valid.sum(dim=1)
        width = _tree_width(int(counts.max()))
        sources = torch.zeros((local, width, hidden), dtype=torch.float32)
        origin = layout.combine_input_offset + me * runtime * stride
        for rank in range(ep):
            token, k = ((ranks == rank) & valid).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            index = slots[token, k]
            used = int(index.max()) + 1
            block = _read_rows(workspace, rank, origin, used * stride).view(used, stride)[:, :wire]
            picked = block.index_select(0, index).contiguous().view(wire_dtype).float()
            sources[token, position[token, k]] = picked
        result = torch.empty((local, hidden), dtype=torch.float32)
        widths = torch.tensor([_tree_width(int(c)) for c in counts.tolist()])
        for size in sorted(set(widths.tolist())):
            group = (widths == size).nonzero().flatten()
            result[group] = _tree_sum(sources[group, :size])
        output.copy_(result.to(output.dtype))

    # --- sanitize --------------------------------------------------------------------------------

    def moe_a2a_sanitize_expert_ids(
        self,
        expert_ids: torch.Tensor,
        workspace: torch.Tensor,
        metainfo: torch.Tensor,
        ep_rank: int,
        invalid_expert_id: int,
        enable_pdl: bool,
    ) -> None:
        raise_if_sticky()
        _check_input(expert_ids, "expertIds")
        _check_type(expert_ids, torch.int32, "expertIds")
        check_eq(
            expert_ids.dim(),
            3,
            "expertIds.ndim()",
            "3",
            "expert_ids must be [ep_size, runtime_max_tokens_per_rank, top_k]",
        )
        ep = expert_ids.size(0)
        layout = _read_layout(metainfo)
        _check_type(workspace, torch.uint8, "workspace")
        check_eq(workspace.dim(), 2, "workspace.ndim()", "2")
        parity = _round_parity(_load_flag(workspace, ep_rank, layout))
        bank = layout.recv_counters_offset + parity * ep * 4
        received = _read_rows(workspace, ep_rank, bank, 4 * ep).view(torch.int32).tolist()
        for source in range(ep):
            expert_ids[source, max(int(received[source]), 0) :] = int(invalid_expert_id)


class SimJitSpec:
    """What ``gen_nvlink_one_sided_alltoall_module()`` returns: ``build_and_load()`` gives the CPU module."""

    def build_and_load(self) -> SimNvlinkOneSidedModule:
        return SimNvlinkOneSidedModule()
