"""CPU twin of FlashInfer's compiled one-sided all-to-all module (``mnnvl_moe_alltoall``).

:class:`SimMoeA2AModule` has the functions ``build_and_load()`` returns on a GPU, with the
same arguments and results. Each op first runs FlashInfer's host checks, in FlashInfer's order
and with FlashInfer's text (TVM FFI ``ICHECK`` format, surfacing in Python as ``RuntimeError``),
then a host "kernel" that moves real bytes between the ranks' workspace rows at FlashInfer's
offsets (FlashInfer 0.7.2.post1, ``trtllm_moe_alltoall.cu`` and ``moeAlltoAllKernels.cu``):

* dispatch: bump the ``flag_val`` epoch; route each token once per *distinct* owner rank of its
  top-k experts (contiguous expert blocks); write the payloads back to back from
  ``PAYLOAD_DATA_OFFSET`` into the owner's row, slot ``[source rank, send index]``; record
  ``topk_target_ranks``/``topk_send_indices`` in the own row; publish the counts into the
  owners' ``recv_counters``; then fence, raise this rank's completion flag in every peer row and
  spin until every peer has raised its flag in ours.
* combine: bump the epoch, stage the expert outputs in the own row at the combine offset, flag
  and wait the same way, then pull one slot per distinct owner rank from the owners' rows and
  sum them (fp32 accumulate, unweighted) into the source token.

Receive slots are handed out in token order, one legal order of the GPU's atomics. A wait that
never completes raises after ``PYTEST_MNNVL_SIM_KERNEL_TIMEOUT`` seconds (default 60; the GPU
kernel traps after about 300 s) with the kernel's own words, and leaves the process "sticky"
like a trapped CUDA context: later device work raises until the rank is recycled. Where a GPU
would silently corrupt memory (a receive slot past ``runtime_max_tokens_per_rank``, an expert id
owned by no rank) the sim raises an error that starts with ``pytest-mnnvl sim:``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from pytest_mnnvl.model.sizing import (
    COMBINE_SIZE_CONDITION,
    COMBINE_SIZE_DETAIL,
    DISPATCH_SIZE_CONDITION,
    MAX_PAYLOADS,
    MAX_RANKS,
    MAX_TOP_K,
    METAINFO_INDEX_NAMES,
    AuxOffsets,
    aux_offsets,
    check_failed_message,
    dispatch_size_detail,
)
from pytest_mnnvl.worlds import audit

from . import _hazards
from ._shm import memory_fence

#: ``SWITCH_TOP_K``: the top-k values the kernels are instantiated for.
SUPPORTED_TOP_K = frozenset({1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 22})
#: Combine payload dtypes (``toNvDataType``).
COMBINE_DTYPES = (torch.float8_e4m3fn, torch.float16, torch.bfloat16, torch.float32)
#: The device the sim pretends to be: an H100 (quantized combine needs SM >= 100).
SIM_SM_VERSION = 90
RANK_MASK_WORDS = 1
TIMEOUT_ENV = "PYTEST_MNNVL_SIM_KERNEL_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
_KERNELS_FILE = "moeAlltoAllKernels.cu"


class SimKernelTimeout(RuntimeError):
    """A rank waited for a peer's completion flag past the timeout (a trap on a GPU)."""


_sticky_error: str | None = None
#: Global ranks of this rank's EP group in EP order (the sim installs them): whom a flag wait waits for.
_ep_group_ranks: tuple[int, ...] = ()


def set_ep_group_ranks(ranks: Sequence[int]) -> None:
    """Which global rank each EP rank of this rank's workspaces is (its EP group, in EP order)."""
    global _ep_group_ranks
    _ep_group_ranks = tuple(int(r) for r in ranks)


def announce_wait(phase: str, me: int, pending: Sequence[int], ep: int) -> None:
    """Write to the rank's status (:mod:`pytest_mnnvl.worlds.audit`) whose ``phase`` completion flags this rank still
    waits for: at a timeout the pool reads it, and a rank spinning on a peer's flag is waiting for that peer,
    not computing. Global ranks when the workspace spans this rank's EP group, else EP ranks only."""
    if len(_ep_group_ranks) == ep and 0 <= me < ep:
        known = [_ep_group_ranks[p] for p in pending]
        whose = f"rank {known[0]}'s completion flag" if len(known) == 1 else f"the completion flags of ranks {known}"
        audit.set_waiting(audit.WaitKind.PEER_FLAG, f"the sim {phase} kernel's wait for {whose}", known)
        return
    whose = f"the completion flags of EP ranks {list(pending)} (EP rank {me} of a group other than its own)"
    audit.set_waiting(audit.WaitKind.PEER_FLAG, f"the sim {phase} kernel's wait for {whose}", None)


def raise_if_sticky() -> None:
    """Refuse device work after a trapped kernel, like a CUDA context after ``trap``."""
    if _sticky_error is not None:
        raise RuntimeError(
            "CUDA error: unspecified launch failure (pytest-mnnvl sim: an earlier kernel in this rank "
            f"trapped: {_sticky_error}; the process must be recycled)"
        )


def clear_sticky_error() -> None:
    """Forget a trapped kernel (tests that provoke a timeout on purpose, then rebuild)."""
    global _sticky_error
    _sticky_error = None


def kernel_timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    return float(value) if value else DEFAULT_TIMEOUT_S


# --- FlashInfer's host-check formats ------------------------------------------------------------


def check(ok: Any, cond: str, msg: str = "") -> None:
    """``TVM_FFI_ICHECK(cond) << msg``."""
    if not ok:
        raise RuntimeError(check_failed_message(cond, msg))


def check_eq(a: Any, b: Any, expr_a: str, expr_b: str, msg: str = "") -> None:
    """``TVM_FFI_ICHECK_EQ(a, b) << msg``."""
    if a != b:
        raise RuntimeError(f"Check failed: {expr_a} == {expr_b} ({a} vs. {b}) : {msg}")


def dl_name(dtype: torch.dtype) -> str:
    """How TVM FFI prints a DLPack dtype (``int32``, ``bfloat16``, ``float8_e4m3fn``)."""
    return str(dtype).removeprefix("torch.")


def _launch_error(function: str, msg: str) -> RuntimeError:
    # flashinfer::Error from FLASHINFER_CHECK inside a launcher (absolute source path elided).
    return RuntimeError(f"Error in function '{function}' at {_KERNELS_FILE}: {msg}")


def _check_host(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cpu":
        raise RuntimeError(f"pytest-mnnvl sim: {name} must be a CPU tensor in a sim world, got {t.device}")


def _check_input(t: torch.Tensor, name: str) -> None:
    """``CHECK_INPUT``: a device tensor (the sim's device is the CPU), contiguous."""
    _check_host(t, name)
    check(t.is_contiguous(), f"{name}.IsContiguous()", f"{name} must be contiguous")


def _check_type(t: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """``CHECK_INPUT_TYPE``."""
    check_eq(
        dl_name(t.dtype),
        dl_name(dtype),
        f"{name}.dtype()",
        f"dl_{dl_name(dtype)}",
        f"Inconsistency of Tensor type: {name}",
    )


def _check_metainfo(metainfo: torch.Tensor) -> AuxOffsets:
    check_eq(
        1 if metainfo.device.type == "cpu" else 2,
        1,
        "metainfo.device().device_type",
        "kDLCPU",
        "metainfo must be a host tensor",
    )
    _check_type(metainfo, torch.int64, "metainfo")
    check_eq(metainfo.dim(), 1, "metainfo.ndim()", "1")
    check_eq(metainfo.size(0), len(METAINFO_INDEX_NAMES), "metainfo.size(0)", "fi_throughput::NUM_METAINFO_FIELDS")
    return AuxOffsets(*(int(v) for v in metainfo.tolist()))


def _check_workspace(workspace: torch.Tensor, ep_size: int | None) -> None:
    _check_host(workspace, "workspace")
    _check_type(workspace, torch.uint8, "workspace")
    check_eq(workspace.dim(), 2, "workspace.ndim()", "2")
    if ep_size is not None:
        check_eq(workspace.size(0), ep_size, "workspace.size(0)", "epSize")


def _resolve_rank_mask(enable: bool, mask: torch.Tensor | None, ep_rank: int, ep_size: int) -> list[bool]:
    """Which ranks take part (``resolveActiveRankMask``); all of them without a mask."""
    if not enable:
        check(
            mask is None,
            "!hasActiveRankMask(activeRankMask)",
            "active_rank_mask requires enable_rank_mask=True",
        )
        return [True] * ep_size
    check(
        0 <= ep_rank < MAX_RANKS,
        "epRank >= 0 && epRank < kMaxRanks",
        f"epRank must be in the range [0, {MAX_RANKS}) for active_rank_mask",
    )
    check(
        mask is not None,
        "hasActiveRankMask(maskTensor)",
        "active_rank_mask must be defined when enable_rank_mask=True",
    )
    assert mask is not None
    check_eq(
        1 if mask.device.type == "cpu" else 2,
        1,
        "t.device().device_type",
        "kDLCPU",
        "t must be a host tensor",
    )
    check(mask.is_contiguous(), "t.IsContiguous()", "t must be contiguous")
    _check_type(mask, torch.uint64, "t")
    check_eq(mask.dim(), 1, "t.ndim()", "1", "active_rank_mask must be a 1D tensor")
    check_eq(
        mask.size(0),
        RANK_MASK_WORDS,
        "t.size(0)",
        "kRankMaskWords",
        f"active_rank_mask must have exactly {RANK_MASK_WORDS} uint64 elements",
    )
    word = int(mask.view(torch.int64)[0]) & 0xFFFF_FFFF_FFFF_FFFF
    check(
        (word >> ep_rank) & 1,
        "(out[epRank >> 6] >> (epRank & 63)) & 1ULL",
        f"active_rank_mask must mark the local ep_rank ({ep_rank}) as active",
    )
    return [bool((word >> r) & 1) for r in range(ep_size)]


# --- workspace rows --------------------------------------------------------------------------


class _Rows:
    """Typed windows into the ranks' rows of one workspace at FlashInfer's offsets."""

    def __init__(self, workspace: torch.Tensor, offsets: AuxOffsets) -> None:
        self.ws = workspace
        self.off = offsets

    def i32(self, rank: int, offset: int, count: int) -> torch.Tensor:
        return self.ws[rank, offset : offset + 4 * count].view(torch.int32)

    def bump_flag(self, rank: int) -> int:
        """``*flag_val += 1`` (uint32 wrap-around); returns the new epoch as a stored int32."""
        cell = self.i32(rank, self.off.flag_val, 1)
        value = (int(cell[0]) + 1) & 0xFFFF_FFFF
        signed = value - (1 << 32) if value >= 1 << 31 else value
        cell[0] = signed
        return signed

    def signal_and_wait(self, phase: str, region: int, me: int, active: Sequence[bool], flag: int) -> None:
        """Raise my flag in every active peer's row, then spin on every active peer's flag in mine."""
        ep = len(active)
        memory_fence()  # payload and counters before the flag (release)
        for peer in range(ep):
            if active[peer]:
                self.i32(peer, region, ep)[me] = flag
        mine = self.i32(me, region, ep)
        pending = [peer for peer in range(ep) if active[peer]]
        timeout = kernel_timeout_s()
        deadline = time.monotonic() + timeout
        nap = 0.0
        announced: list[int] | None = None
        try:
            while True:
                pending = [peer for peer in pending if int(mine[peer]) != flag]
                if not pending:
                    break
                if pending != announced:
                    announce_wait(phase, me, pending, ep)
                    announced = pending
                _hazards.raise_if_poisoned(self.ws, me)
                if time.monotonic() > deadline:
                    global _sticky_error
                    text = f"{phase}: ---Rank {me} timed out waiting for completion flag from rank {pending[0]}"
                    _sticky_error = text
                    raise SimKernelTimeout(
                        f"{text} (pytest-mnnvl sim: waited {timeout:g} s for epoch {flag & 0xFFFF_FFFF}, saw "
                        f"{int(mine[pending[0]]) & 0xFFFF_FFFF}; the peer never made the matching {phase} call. "
                        f"A GPU spins ~300 s, then traps; set {TIMEOUT_ENV} to change the sim's wait)"
                    )
                time.sleep(nap)
                nap = min(nap * 2 or 2e-5, 1e-3)
        finally:
            if announced is not None:
                audit.clear_waiting()
        memory_fence()  # peers' data after their flags (acquire)


def owner_ranks(experts: torch.Tensor, num_experts: int, ep_size: int) -> torch.Tensor:
    """``compute_target_rank_id``: contiguous blocks, ranks below ``E % ep`` own one extra expert.

    C integer division truncates toward zero, so a small negative id lands on rank 0 as on a GPU.
    """
    e = experts.to(torch.int64)
    base, rem = divmod(num_experts, ep_size)
    if rem == 0:
        return torch.div(e, base, rounding_mode="trunc")
    split = rem * (base + 1)
    low = torch.div(e, base + 1, rounding_mode="trunc")
    high = rem + torch.div(e - split, base, rounding_mode="trunc")
    return torch.where(e < split, low, high)


def first_occurrence(targets: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` mask of the first top-k slot of each distinct target rank in a token."""
    k = targets.size(1)
    same = targets.unsqueeze(2) == targets.unsqueeze(1)  # [N, K(k), K(j)]
    earlier = torch.ones(k, k, dtype=torch.bool).tril(-1)  # j < k
    return ~(same & earlier).any(dim=2)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    rows = t.size(0)
    return t.reshape(rows, -1).view(torch.uint8) if t.numel() else t.new_empty((rows, 0), dtype=torch.uint8)


class SimMoeA2AModule:
    """The functions of the compiled module, on CPU tensors (see the module docstring)."""

    def moe_a2a_get_aux_data_size(self, ep_size: int, max_num_tokens: int, eplb_stats_num_experts: int = 0) -> int:
        return aux_offsets(int(ep_size), int(max_num_tokens), int(eplb_stats_num_experts)).payload_data

    def moe_a2a_get_metainfo_index_pairs(self) -> tuple[list[str], list[int]]:
        names = [f"MOE_A2A_{name}" for name in METAINFO_INDEX_NAMES] + ["MOE_A2A_NUM_METAINFO_FIELDS"]
        return names, list(range(len(METAINFO_INDEX_NAMES) + 1))

    def moe_a2a_initialize(
        self,
        workspace: torch.Tensor,
        ep_rank: int,
        ep_size: int,
        max_num_tokens: int,
        eplb_stats_num_experts: int = 0,
    ) -> torch.Tensor:
        raise_if_sticky()
        _check_host(workspace, "workspace")
        _check_type(workspace, torch.uint8, "workspace")
        check_eq(workspace.dim(), 2, "workspace.ndim()", "2", "workspace must be a 2D tensor")
        check_eq(
            workspace.size(0),
            ep_size,
            "workspace.size(0)",
            "epSize",
            "workspace first dim must equal ep_size",
        )
        check(0 <= ep_rank < ep_size, "epRank >= 0 && epRank < epSize", "epRank out of range")
        _hazards.on_initialize(workspace, ep_rank)
        workspace[ep_rank].zero_()
        check(
            eplb_stats_num_experts >= 0,
            "eplbStatsNumExperts >= 0",
            "eplb_stats_num_experts must be non-negative",
        )
        offsets = aux_offsets(int(ep_size), int(max_num_tokens), int(eplb_stats_num_experts))
        return torch.tensor(list(offsets), dtype=torch.int64)

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
        enable_pdl: bool,
        eplb_local_stats: torch.Tensor | None = None,
        enable_rank_mask: bool = False,
        active_rank_mask: torch.Tensor | None = None,
    ) -> tuple[list[int], list[int], int, int, int]:
        raise_if_sticky()
        tse = token_selected_experts
        _check_input(tse, "tokenSelectedExperts")
        _check_type(tse, torch.int32, "tokenSelectedExperts")
        check_eq(tse.dim(), 2, "tokenSelectedExperts.ndim()", "2", "token_selected_experts must be 2D")
        check_eq(
            tse.size(1),
            top_k,
            "tokenSelectedExperts.size(1)",
            "topK",
            "token_selected_experts shape mismatch",
        )
        payloads = list(input_payloads)
        num_payloads = len(payloads)
        check(num_payloads > 0, "numPayloads > 0", "At least one payload is required")
        check(
            num_payloads <= MAX_PAYLOADS,
            "numPayloads <= tl_throughput::kMaxPayloads",
            f"Too many payloads: {num_payloads} > {MAX_PAYLOADS}",
        )
        local = tse.size(0)
        for i, payload in enumerate(payloads):
            _check_input(payload, "payload")
            check_eq(payload.dim(), 2, "payload.ndim()", "2", f"payload {i} must be 2D")
            check_eq(
                payload.size(0),
                local,
                "payload.size(0)",
                "localNumTokens",
                f"payload {i} first dimension must match local_num_tokens",
            )
        offsets = _check_metainfo(metainfo)
        _check_workspace(workspace, ep_size)
        check(
            0 < ep_size <= MAX_RANKS,
            "epSize > 0 && epSize <= tl_throughput::kMaxRanks",
            f"epSize must be in the range (0, {MAX_RANKS}]",
        )
        check(0 <= ep_rank < ep_size, "epRank >= 0 && epRank < epSize")
        runtime_max = int(runtime_max_tokens_per_rank)
        check(runtime_max > 0, "runtimeMaxTokensPerRank > 0")
        check(num_experts >= ep_size, "numExperts >= epSize", "num_experts must be >= ep_size")
        check(0 < top_k <= MAX_TOP_K, "topK > 0 && topK <= tl_throughput::kMaxTopK")
        eplb_n = 0
        if eplb_local_stats is not None:
            stats = eplb_local_stats
            _check_input(stats, "localStats")
            _check_type(stats, torch.int32, "localStats")
            check_eq(stats.dim(), 1, "localStats.ndim()", "1", "eplb_local_stats must be a 1D tensor")
            eplb_n = stats.size(0)
            check(eplb_n > 0, "eplbStatsNumExperts > 0", "eplb_local_stats must not be empty")
            check(
                eplb_n <= num_experts,
                "eplbStatsNumExperts <= numExperts",
                "eplb_local_stats size must be <= num_experts",
            )
            gathered_end = offsets.eplb_gathered_stats + ep_size * eplb_n * 4
            check(
                gathered_end <= offsets.payload_data,
                "gatheredEnd <= offsets[fi_throughput::PAYLOAD_DATA_OFFSET_INDEX]",
                f"eplb_local_stats size ({eplb_n}) exceeds the eplb_stats_num_experts reserved at initialize time",
            )
        sizes: list[int] = []
        total = 0
        for i, payload in enumerate(payloads):
            elem = payload.element_size()
            sizes.append(ep_size * runtime_max * payload.size(1) * elem)
            total += sizes[-1]
            check(
                total % elem == 0,
                "totalBytesNeeded % elementSize == 0",
                f"Misaligned payload buffer {i} with element size {elem}. "
                "Consider reordering payloads by largest to smallest element size",
            )
        size_per_rank = workspace.size(1)
        required = offsets.payload_data + total
        check(size_per_rank >= required, DISPATCH_SIZE_CONDITION, dispatch_size_detail(required, size_per_rank))
        active = _resolve_rank_mask(enable_rank_mask, active_rank_mask, ep_rank, ep_size)

        rows = _Rows(workspace, offsets)
        # moe_a2a_prepare_dispatch_launch runs before the launcher validates top_k.
        rows.i32(ep_rank, offsets.send_counters, ep_size).zero_()
        rows.i32(ep_rank, offsets.local_token_counter, 1).zero_()
        flag = rows.bump_flag(ep_rank)
        if top_k not in SUPPORTED_TOP_K:
            raise _launch_error("moe_a2a_dispatch_launch", "Unsupported top_k")

        recv_offsets = []
        cursor = offsets.payload_data
        for size in sizes:
            recv_offsets.append(cursor)
            cursor += size
        self._dispatch_kernel(
            rows,
            tse,
            payloads,
            recv_offsets,
            runtime_max,
            ep_rank,
            ep_size,
            num_experts,
            active,
            eplb_local_stats,
            flag,
        )
        base = ep_rank * workspace.stride(0)
        combine_offset = (cursor + 127) // 128 * 128
        eplb_offset = base + offsets.eplb_gathered_stats if eplb_local_stats is not None else -1
        return [base + o for o in recv_offsets], sizes, combine_offset, eplb_offset, eplb_n

    def _dispatch_kernel(
        self,
        rows: _Rows,
        tse: torch.Tensor,
        payloads: list[torch.Tensor],
        recv_offsets: list[int],
        runtime_max: int,
        me: int,
        ep: int,
        num_experts: int,
        active: list[bool],
        eplb_local_stats: torch.Tensor | None,
        flag: int,
    ) -> None:
        off = rows.off
        local, top_k = tse.shape
        targets = owner_ranks(tse, num_experts, ep)
        if local:
            bad = (targets < 0) | (targets >= ep)
            if bool(bad.any()):
                t, k = (int(v) for v in bad.nonzero()[0])
                raise RuntimeError(
                    f"pytest-mnnvl sim: expert id {int(tse[t, k])} of token {t} maps to rank "
                    f"{int(targets[t, k])}, outside [0, {ep}) for num_experts={num_experts}; on a GPU this "
                    "writes out of bounds"
                )
        active_t = torch.tensor(active, dtype=torch.bool)
        keep = first_occurrence(targets) & active_t[targets.clamp(0, ep - 1)]
        target_ranks = torch.where(keep, targets, torch.full_like(targets, -1)).to(torch.int32)
        send_indices = torch.full((local, top_k), -1, dtype=torch.int32)
        tokens_for: list[torch.Tensor] = []
        for rank in range(ep):
            hit = target_ranks == rank
            tokens = hit.any(dim=1).nonzero().flatten()
            count = tokens.numel()
            if count > runtime_max:
                raise RuntimeError(
                    f"pytest-mnnvl sim: {count} tokens of rank {me} go to rank {rank} but only "
                    f"runtime_max_tokens_per_rank={runtime_max} receive slots exist "
                    f"(local_num_tokens={local}); "
                    "FlashInfer does not check this and a GPU silently overruns the next source's slots"
                )
            if count:
                column = hit[tokens].to(torch.int8).argmax(dim=1)
                send_indices[tokens, column] = torch.arange(count, dtype=torch.int32)
            tokens_for.append(tokens)
        aux_slots = (off.topk_send_indices - off.topk_target_ranks) // 4
        if local * top_k > aux_slots:
            raise RuntimeError(
                f"pytest-mnnvl sim: {local} tokens x top_k {top_k} overrun the top-k routing arrays "
                f"({aux_slots} slots for the workspace's max_num_tokens); a GPU silently corrupts "
                "its workspace"
            )
        rows.i32(me, off.topk_target_ranks, local * top_k).copy_(target_ranks.flatten())
        rows.i32(me, off.topk_send_indices, local * top_k).copy_(send_indices.flatten())

        raw = [_as_bytes(p) for p in payloads]
        writes = [
            _hazards.Write(
                rank,
                start + me * runtime_max * data.size(1),
                start + (me * runtime_max + tokens_for[rank].numel()) * data.size(1),
                f"payload {index} of the dispatch",
            )
            for rank in range(ep)
            if active[rank] and tokens_for[rank].numel()
            for index, (data, start) in enumerate(zip(raw, recv_offsets, strict=True))
        ]
        _hazards.check_writes(rows.ws, me, "dispatch", writes)
        for rank in range(ep):
            tokens = tokens_for[rank]
            if not active[rank] or tokens.numel() == 0:
                continue
            for data, start, size in zip(raw, recv_offsets, (ep * runtime_max * r.size(1) for r in raw), strict=True):
                region = rows.ws[rank, start : start + size].view(ep, runtime_max, data.size(1))
                region[me, : tokens.numel()] = data.index_select(0, tokens)
        counts = [t.numel() for t in tokens_for]
        rows.i32(me, off.send_counters, ep).copy_(torch.tensor(counts, dtype=torch.int32))
        rows.i32(me, off.local_token_counter, 1)[0] = local
        for rank in range(ep):
            if active[rank]:
                rows.i32(rank, off.recv_counters, ep)[me] = counts[rank]
        if eplb_local_stats is not None:
            n = eplb_local_stats.size(0)
            for rank in range(ep):
                if active[rank]:
                    rows.i32(rank, off.eplb_gathered_stats, ep * n)[me * n : (me + 1) * n] = eplb_local_stats
        rows.signal_and_wait("dispatch", off.dispatch_completion_flags, me, active, flag)
        _hazards.dispatched(rows.ws)

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
        payload_in_workspace: bool = False,
        output_dtype: torch.dtype | None = None,
        output_scales: torch.Tensor | None = None,
        output_scalar_scale: float = 1.0,
        sf_layout: int = 2,
        use_low_precision: bool = False,
        enable_pdl: bool = False,
        enable_rank_mask: bool = False,
        active_rank_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise_if_sticky()
        _check_input(payload, "payload")
        check_eq(
            payload.dim(),
            3,
            "payload.ndim()",
            "3",
            "payload must be [ep_size, runtime_max_tokens_per_rank, hidden]",
        )
        dtype = output_dtype if output_dtype is not None else (torch.bfloat16 if use_low_precision else payload.dtype)
        width = payload.size(2) // 2 if dtype == torch.uint8 else payload.size(2)
        output = torch.empty((int(local_num_tokens), width), dtype=dtype)
        self.moe_a2a_combine_into(
            payload,
            local_num_tokens,
            workspace,
            metainfo,
            runtime_max_tokens_per_rank,
            ep_rank,
            ep_size,
            top_k,
            combine_payload_offset,
            payload_in_workspace,
            output_dtype,
            output_scales,
            output_scalar_scale,
            sf_layout,
            use_low_precision,
            enable_pdl,
            enable_rank_mask,
            active_rank_mask,
            output,
        )
        return output

    def moe_a2a_combine_into(
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
        output_dtype: torch.dtype | None,
        output_scales: torch.Tensor | None,
        output_scalar_scale: float,
        sf_layout: int,
        use_low_precision: bool,
        enable_pdl: bool,
        enable_rank_mask: bool,
        active_rank_mask: torch.Tensor | None,
        output: torch.Tensor,
    ) -> None:
        raise_if_sticky()
        _check_input(payload, "payload")
        check_eq(
            payload.dim(),
            3,
            "payload.ndim()",
            "3",
            "payload must be [ep_size, runtime_max_tokens_per_rank, hidden]",
        )
        runtime_max = int(runtime_max_tokens_per_rank)
        check_eq(payload.size(0), ep_size, "payload.size(0)", "epSize")
        check_eq(payload.size(1), runtime_max, "payload.size(1)", "runtimeMaxTokensPerRank")
        check(
            0 < ep_size <= MAX_RANKS,
            "epSize > 0 && epSize <= tl_throughput::kMaxRanks",
            f"epSize must be in the range (0, {MAX_RANKS}]",
        )
        check(0 <= ep_rank < ep_size, "epRank >= 0 && epRank < epSize")
        check(0 < top_k <= MAX_TOP_K, "topK > 0 && topK <= tl_throughput::kMaxTopK")
        check(local_num_tokens >= 0, "localNumTokens >= 0")
        offsets = _check_metainfo(metainfo)
        _check_workspace(workspace, ep_size)
        size_per_rank = workspace.size(1)
        payload_bytes = payload.numel() * payload.element_size()
        check(
            combine_payload_offset >= 0 and combine_payload_offset + payload_bytes <= size_per_rank,
            COMBINE_SIZE_CONDITION,
            COMBINE_SIZE_DETAIL,
        )
        if payload_in_workspace:
            expected = workspace[ep_rank].data_ptr() + combine_payload_offset
            check(
                payload.data_ptr() == expected,
                "payload.data_ptr() == expectedPtr",
                f"payload_in_workspace is True but tensor pointer mismatch: {payload.data_ptr():#x} != {expected:#x}",
            )
        want = output_dtype if output_dtype is not None else (torch.bfloat16 if use_low_precision else payload.dtype)
        hidden = payload.size(2)
        shape = (int(local_num_tokens), hidden // 2 if want == torch.uint8 else hidden)
        _check_input(output, "output")
        check_eq(output.dim(), 2, "output.ndim()", "2", "output must be a 2D tensor")
        check_eq(output.size(0), shape[0], "output.size(0)", "output_shape[0]")
        check_eq(output.size(1), shape[1], "output.size(1)", "output_shape[1]")
        what = (
            "output_dtype"
            if output_dtype is not None
            else ("bf16 (use_low_precision)" if use_low_precision else "payload dtype")
        )
        check(
            output.dtype == want,
            "output.dtype() == outputDtype",
            f"output dtype must match {what} (expected {dl_name(want)}, got {dl_name(output.dtype)})",
        )
        if payload.dtype not in COMBINE_DTYPES:
            raise TypeError("Unsupported dtype for MoE combine")
        if output_scales is not None:
            self._check_quantized_combine(payload, output, output_scales, int(sf_layout), int(local_num_tokens))
        elif use_low_precision:
            check(
                output.dtype == torch.bfloat16,
                "output.dtype() == dl_bfloat16",
                "low-precision combine must produce a bf16 output",
            )
        else:
            check(
                output.dtype == payload.dtype,
                "output.dtype() == payload.dtype()",
                "output_dtype without output_scales must match payload dtype",
            )
        active = _resolve_rank_mask(enable_rank_mask, active_rank_mask, ep_rank, ep_size)
        rows = _Rows(workspace, offsets)
        flag = rows.bump_flag(ep_rank)
        if top_k not in SUPPORTED_TOP_K:
            raise _launch_error("moe_a2a_combine_launch", "Unsupported top_k")
        self._combine_kernel(
            rows,
            payload,
            payload_in_workspace,
            use_low_precision,
            combine_payload_offset,
            runtime_max,
            int(local_num_tokens),
            ep_rank,
            ep_size,
            top_k,
            active,
            flag,
            output,
        )

    def _check_quantized_combine(
        self, payload: torch.Tensor, output: torch.Tensor, scales: torch.Tensor, sf_layout: int, rows: int
    ) -> None:
        check(
            payload.dtype in (torch.bfloat16, torch.float16),
            "payload.dtype() == dl_bfloat16 || payload.dtype() == dl_float16",
            "Quantization only supports for fp16 or bf16 inputs",
        )
        _check_input(scales, "scales")
        if output.dtype == torch.float8_e4m3fn:
            _check_type(scales, torch.uint8, "scales")
            block = 32
        elif output.dtype == torch.uint8:
            check(
                scales.dtype in (torch.uint8, torch.float8_e4m3fn),
                "scales.dtype() == dl_uint8 || scales.dtype() == dl_float8_e4m3fn",
                "packed fp4 output_scales must have uint8 (MXFP4) or float8_e4m3fn (NVFP4) dtype",
            )
            block = 16 if scales.dtype == torch.float8_e4m3fn else 32
        else:
            raise RuntimeError(f"Quantization not supported for output dtype: {dl_name(output.dtype)}")
        check(
            0 <= sf_layout <= 2,
            "sfLayout >= static_cast<int64_t>(MoeA2ACombineSwizzleSFMode::SWIZZLE_128x4) && "
            "sfLayout <= static_cast<int64_t>(MoeA2ACombineSwizzleSFMode::LINEAR)",
            "sf_layout must be layout_128x4, layout_8x4, or layout_linear",
        )
        columns = (payload.size(2) + block - 1) // block
        extent = {
            0: (rows + 127) // 128 * 128 * ((columns + 3) // 4 * 4),
            1: (rows + 7) // 8 * 8 * ((columns + 3) // 4 * 4),
            2: rows * columns,
        }[sf_layout]
        check_eq(
            scales.numel(),
            extent,
            "scales.numel()",
            "expectedScales",
            "output_scales extent does not match the requested quantization layout",
        )
        check(
            SIM_SM_VERSION >= 100,
            "sm_version >= 100",
            f"Quantized moe_a2a_combine requires SM>=100 (Blackwell), but got SM{SIM_SM_VERSION}",
        )

    def _combine_kernel(
        self,
        rows: _Rows,
        payload: torch.Tensor,
        in_workspace: bool,
        low_precision: bool,
        combine_offset: int,
        runtime_max: int,
        local: int,
        me: int,
        ep: int,
        top_k: int,
        active: list[bool],
        flag: int,
        output: torch.Tensor,
    ) -> None:
        off = rows.off
        hidden = payload.size(2)
        elem = payload.element_size()
        staged_fp8 = low_precision and not in_workspace
        stride = hidden if staged_fp8 else hidden * elem

        def region(rank: int) -> torch.Tensor:
            return rows.ws[rank, combine_offset : combine_offset + ep * runtime_max * stride].view(
                ep, runtime_max, stride
            )

        received = rows.i32(me, off.recv_counters, ep).tolist()
        mine = region(me)
        for source in range(ep):
            count = min(int(received[source]), runtime_max)
            if count <= 0:
                continue
            if low_precision:
                if in_workspace:
                    values = mine[source, :count].contiguous().view(payload.dtype)
                else:
                    values = payload[source, :count]
                fp8 = values.to(torch.float8_e4m3fn).view(torch.uint8)
                mine[source, :count, :hidden] = fp8
            elif not in_workspace:
                mine[source, :count] = payload[source, :count].reshape(count, -1).view(torch.uint8)
        target_ranks = rows.i32(me, off.topk_target_ranks, local * top_k).view(local, top_k)
        send_indices = rows.i32(me, off.topk_send_indices, local * top_k).view(local, top_k)
        routed = [((target_ranks == rank) & (send_indices >= 0)).nonzero(as_tuple=True) for rank in range(ep)]
        # What this rank will read of each row, published before its flags go up (the race detector).
        first = combine_offset + me * runtime_max * stride
        reads = []
        for rank, (token, k) in enumerate(routed):
            count = int(send_indices[token, k].max()) + 1 if token.numel() else 0
            reads.append((rank, first, first + count * stride))
        _hazards.lease(rows.ws, me, flag, reads)
        rows.signal_and_wait("combine", off.combine_completion_flags, me, active, flag)
        try:
            if local == 0:
                return
            read_dtype = torch.float8_e4m3fn if low_precision else payload.dtype
            read_bytes = hidden * (1 if low_precision else elem)
            acc = torch.zeros((local, hidden), dtype=torch.float32)
            for rank, (token, k) in enumerate(routed):
                if token.numel() == 0:
                    continue
                slots = send_indices[token, k].to(torch.int64)
                picked = region(rank)[me].index_select(0, slots)[:, :read_bytes].contiguous().view(read_dtype)
                acc.index_add_(0, token, picked.float())
            output.copy_(acc.to(output.dtype))
        finally:
            _hazards.combined(rows.ws, me, flag, combine_offset, active)

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
        check_eq(expert_ids.dim(), 3, "expertIds.ndim()", "3")
        offsets = _check_metainfo(metainfo)
        _check_workspace(workspace, None)
        ep = expert_ids.size(0)
        received = _Rows(workspace, offsets).i32(ep_rank, offsets.recv_counters, ep).tolist()
        for source in range(ep):
            expert_ids[source, max(int(received[source]), 0) :] = int(invalid_expert_id)


class SimJitSpec:
    """What ``gen_moe_alltoall_module`` returns: ``build_and_load()`` gives the CPU module, no compiler."""

    def __init__(self, target: str) -> None:
        if target != "legacy":
            raise NotImplementedError(
                f"pytest-mnnvl sim backend: only the default backend='trtllm' kernels are emulated, not {target!r}"
            )
        self.target = target

    def build_and_load(self) -> SimMoeA2AModule:
        return SimMoeA2AModule()
