"""FlashInfer 0.7.4's one-sided MoE all-to-all workspace arithmetic, in pure Python.

0.7.4 replaced 0.7.2's packed layout (see :mod:`pytest_mnnvl.model.sizing`) with fixed regions: the
C++ ``calculateWorkspaceLayout`` lays out one rank's row from byte capacities that
``NVLinkOneSidedAlltoAll`` computes in Python, and the whole layout travels as a 33-field int64
metainfo (offsets, capacities and the allocation-time configuration). The dispatch payloads
are packed inside a fixed-capacity region and the combine input sits at a fixed offset, so a
dispatch can no longer borrow the combine region: each has its own capacity check.

No torch needed: the explain/predict tools and the sim's CPU op module both build layouts and
check messages from here. Checks that fail raise a plain ``RuntimeError`` whose ``str()`` is
FlashInfer's exact TVM FFI text, as the compiled op does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pytest_mnnvl.model.sizing import check_failed_message

#: ``kMaxRanks``: EP sizes up to this many ranks (0.7.2: 64).
MAX_RANKS = 256
#: ``kMaxTopK``.
MAX_TOP_K = 22
#: ``kMaxPayloads``: payload tensors per dispatch (0.7.2: 6).
MAX_PAYLOADS = 4
#: ``kRankMaskWords``: uint64 words of the active-rank mask (0.7.2: 1).
RANK_MASK_WORDS = 4
#: ``kWorkspaceAlignment``: the payload regions start on, and are padded to, this boundary.
WORKSPACE_ALIGNMENT = 256
#: ``kCachelineAlignment``: the control arrays and each dispatch payload buffer start here.
CACHELINE_ALIGNMENT = 128
#: ``kCftCounterStride``: bytes between two CFT counted-write counters.
CFT_COUNTER_STRIDE = 256
#: ``kMaxTimeoutSec``: the largest ``timeout_sec`` a kernel accepts.
MAX_TIMEOUT_SEC = 24 * 60 * 60
#: ``_SUPPORTED_TOP_K`` of ``NVLinkOneSidedAlltoAll`` (the kernels' ``SWITCH_TOP_K`` cases; 3 is new).
SUPPORTED_TOP_K = (1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 18, 22)
#: Bytes of one dispatched activation row per ``MoEEpCommParams.dispatch_format`` name.
DISPATCH_FORMATS = ("BF16", "FP16", "FP8PerTensor", "DeepSeekFp8", "MXFP8", "NVFP4", "MXFP4")

# Lamport transport limits (``moe_alltoall_lamport.cuh``), exported by the op module too.
LAMPORT_MAX_RANKS = 64
LAMPORT_MAX_TOP_K = 22
LAMPORT_MAX_TOKENS_PER_RANK = 512
LAMPORT_DISPATCH_BLOCKS_PER_SM = 6
LAMPORT_NUM_THREADS = 128
#: ``kIdsSentinel`` (0x88888888) as the int32 the module exports.
LAMPORT_IDS_SENTINEL = 0x88888888 - (1 << 32)
#: ``PayloadFormat`` values.
LAMPORT_FORMATS = {"BF16": 0, "MXFP8": 1, "FP8_BLOCK128": 2, "NVFP4": 3}

_INT32_MAX = (1 << 31) - 1
_INT64_MAX = (1 << 63) - 1


def align(value: int, alignment: int) -> int:
    """``alignOffset``: round up to a multiple of a power-of-two ``alignment``."""
    return (value + alignment - 1) & ~(alignment - 1)


class WorkspaceLayout(NamedTuple):
    """The 33-field metainfo, in ``MoeA2AMetaInfoIndex`` order: ``tuple(layout)`` is the tensor.

    ``*_offset`` fields are byte offsets from the rank's row start, ``*_size`` fields byte
    capacities; CFT and Lamport fields are 0 when those regions are not allocated.
    """

    flag_val_offset: int
    local_token_counter_offset: int
    send_counters_offset: int
    recv_counters_offset: int
    dispatch_completion_flags_offset: int
    dispatch_counted_write_counters_offset: int
    dispatch_counter_baseline_offset: int
    topk_target_ranks_offset: int
    topk_target_indices_offset: int
    eplb_gathered_stats_offset: int
    dispatch_payload_offset: int
    dispatch_payload_size: int
    combine_completion_flags_offset: int
    combine_counted_write_counters_offset: int
    combine_counter_baseline_offset: int
    combine_input_offset: int
    combine_input_size: int
    combine_recv_offset: int
    combine_recv_size: int
    max_num_tokens: int
    top_k: int
    ep_size: int
    eplb_stats_num_experts: int
    cft_enabled: int
    workspace_size: int
    lamport_max_num_tokens: int
    lamport_payload_format: int
    lamport_hidden_size: int
    lamport_state_offset: int
    lamport_landing_offset: int
    lamport_combine_landing_offset: int
    lamport_recv_offset: int
    lamport_recv_size: int

    @property
    def has_lamport(self) -> bool:
        return self.lamport_max_num_tokens > 0


#: FlashInfer's names for the metainfo slots (``MOE_A2A_<NAME>`` in the module's index pairs),
#: derived from the record's fields so that the two cannot drift apart.
METAINFO_INDEX_NAMES: tuple[str, ...] = tuple(f"{name.upper()}_INDEX" for name in WorkspaceLayout._fields)
NUM_METAINFO_FIELDS = len(METAINFO_INDEX_NAMES)
#: The constants ``moe_a2a_get_metainfo_index_pairs`` lists after the layout indices, in its order.
MODULE_CONSTANTS: tuple[tuple[str, int], ...] = (
    ("NUM_METAINFO_FIELDS", NUM_METAINFO_FIELDS),
    ("MAX_RANKS", MAX_RANKS),
    ("MAX_TOP_K", MAX_TOP_K),
    ("MAX_PAYLOADS", MAX_PAYLOADS),
    ("WORKSPACE_ALIGNMENT", WORKSPACE_ALIGNMENT),
    ("LAMPORT_MAX_RANKS", LAMPORT_MAX_RANKS),
    ("LAMPORT_MAX_TOP_K", LAMPORT_MAX_TOP_K),
    ("LAMPORT_MAX_TOKENS_PER_RANK", LAMPORT_MAX_TOKENS_PER_RANK),
    ("LAMPORT_DISPATCH_BLOCKS_PER_SM", LAMPORT_DISPATCH_BLOCKS_PER_SM),
    ("LAMPORT_IDS_SENTINEL", LAMPORT_IDS_SENTINEL),
    *((f"LAMPORT_FORMAT_{name}", value) for name, value in LAMPORT_FORMATS.items()),
)


def check_eq_failed_message(a: object, b: object, expr_a: str, expr_b: str, detail: str = "") -> str:
    """The ``str()`` of the RuntimeError ``TVM_FFI_ICHECK_EQ(a, b) << detail`` raises."""
    return f"Check failed: {expr_a} == {expr_b} ({a} vs. {b}) : {detail}"


def _check(ok: bool, condition: str, detail: str = "") -> None:
    if not ok:
        raise RuntimeError(check_failed_message(condition, detail))


# --------------------------------------------------------------------------------------------------
# calculateWorkspaceLayout
# --------------------------------------------------------------------------------------------------


class _Walk:
    """The C++ ``reserve`` lambda: align the cursor, record the offset, advance by the size.

    ``conditions`` are its two overflow checks' ``#cond`` texts (they differ between the base
    layout and the Lamport extension).
    """

    def __init__(self, start: int, conditions: tuple[str, str], alignment: int | None = None) -> None:
        self.offset = start
        self.fields: dict[str, int] = {}
        self._conditions = conditions
        self._alignment = alignment

    def reserve(self, field: str, size: int, alignment: int = 4) -> None:
        alignment = self._alignment or alignment
        _check(
            0 <= self.offset <= _INT64_MAX - alignment,
            self._conditions[0],
            "Workspace layout alignment overflows int64",
        )
        self.offset = align(self.offset, alignment)
        _check(0 <= size <= _INT64_MAX - self.offset, self._conditions[1], "Workspace layout size overflows int64")
        self.fields[field] = self.offset
        self.offset += size


_BASE_WALK = (
    "offset <= std::numeric_limits<int64_t>::max() - alignment",
    "bytes >= 0 && bytes <= std::numeric_limits<int64_t>::max() - offset",
)
_LAMPORT_WALK = (
    "offset >= 0 && offset <= std::numeric_limits<int64_t>::max() - kWorkspaceAlignment",
    "size >= 0 && size <= std::numeric_limits<int64_t>::max() - offset",
)


def _aligned_capacity(nbytes: int) -> int:
    _check(
        0 <= nbytes <= _INT64_MAX - WORKSPACE_ALIGNMENT,
        "bytes >= 0 && bytes <= std::numeric_limits<int64_t>::max() - kWorkspaceAlignment",
        f"Invalid workspace payload capacity: {nbytes}",
    )
    return align(nbytes, WORKSPACE_ALIGNMENT)


def workspace_layout(
    ep_size: int,
    max_num_tokens: int,
    top_k: int,
    dispatch_bytes: int,
    combine_input_bytes: int,
    combine_recv_bytes: int = 0,
    eplb_stats_num_experts: int = 0,
    can_use_cft: bool = False,
) -> WorkspaceLayout:
    """``calculateWorkspaceLayout`` (what ``moe_a2a_get_workspace_layout`` writes), with its checks."""
    _check(0 < ep_size <= MAX_RANKS, "epSize > 0 && epSize <= tl::kMaxRanks", f"Invalid EP size: {ep_size}")
    _check(
        0 < max_num_tokens <= _INT32_MAX,
        "maxNumTokens > 0 && maxNumTokens <= std::numeric_limits<int32_t>::max()",
        f"Invalid allocation-time token capacity: {max_num_tokens}",
    )
    _check(0 < top_k <= MAX_TOP_K, "topK > 0 && topK <= tl::kMaxTopK", f"Invalid top_k: {top_k}")
    _check(
        0 <= eplb_stats_num_experts <= _INT32_MAX,
        "eplbStatsNumExperts >= 0 && eplbStatsNumExperts <= std::numeric_limits<int32_t>::max()",
        f"Invalid EPLB expert capacity: {eplb_stats_num_experts}",
    )
    _check(
        bool(can_use_cft) or combine_recv_bytes == 0,
        "canUseCft || combineRecvBytes == 0",
        "A combine receive payload requires CFT support",
    )
    dispatch_bytes = _aligned_capacity(dispatch_bytes)
    combine_input_bytes = _aligned_capacity(combine_input_bytes)
    combine_recv_bytes = _aligned_capacity(combine_recv_bytes)

    walk = _Walk(0, _BASE_WALK)
    rank_counts = ep_size * 4
    combine_slots = ep_size * max_num_tokens
    walk.reserve("flag_val_offset", 4)
    walk.reserve("local_token_counter_offset", 4)
    walk.reserve("send_counters_offset", rank_counts)
    walk.reserve("recv_counters_offset", 2 * rank_counts)
    walk.reserve("dispatch_completion_flags_offset", rank_counts, CACHELINE_ALIGNMENT)
    if can_use_cft:
        walk.reserve("dispatch_counted_write_counters_offset", ep_size * CFT_COUNTER_STRIDE, CFT_COUNTER_STRIDE)
        walk.reserve("dispatch_counter_baseline_offset", ep_size * 8, CACHELINE_ALIGNMENT)
    walk.reserve("topk_target_ranks_offset", max_num_tokens * top_k * 4, CACHELINE_ALIGNMENT)
    walk.reserve("topk_target_indices_offset", max_num_tokens * top_k * 4, CACHELINE_ALIGNMENT)
    walk.reserve("eplb_gathered_stats_offset", ep_size * eplb_stats_num_experts * 4, CACHELINE_ALIGNMENT)
    walk.reserve("dispatch_payload_offset", dispatch_bytes, WORKSPACE_ALIGNMENT)
    walk.reserve("combine_completion_flags_offset", rank_counts, CACHELINE_ALIGNMENT)
    if can_use_cft:
        walk.reserve("combine_counted_write_counters_offset", combine_slots * CFT_COUNTER_STRIDE, CFT_COUNTER_STRIDE)
        walk.reserve("combine_counter_baseline_offset", combine_slots * 8, CACHELINE_ALIGNMENT)
    walk.reserve("combine_input_offset", combine_input_bytes, WORKSPACE_ALIGNMENT)
    if can_use_cft:
        walk.reserve("combine_recv_offset", combine_recv_bytes, WORKSPACE_ALIGNMENT)
    fields = dict.fromkeys(WorkspaceLayout._fields, 0)
    fields.update(walk.fields)
    fields.update(
        dispatch_payload_size=dispatch_bytes,
        combine_input_size=combine_input_bytes,
        combine_recv_size=combine_recv_bytes if can_use_cft else 0,
        max_num_tokens=max_num_tokens,
        top_k=top_k,
        ep_size=ep_size,
        eplb_stats_num_experts=eplb_stats_num_experts,
        cft_enabled=int(bool(can_use_cft)),
        workspace_size=walk.offset,
    )
    return WorkspaceLayout(**fields)


def base_layout(layout: WorkspaceLayout) -> WorkspaceLayout:
    """The layout ``calculateWorkspaceLayout`` gives for ``layout``'s own configuration fields.

    ``moe_a2a_initialize`` and the Lamport extension recompute it to reject a metainfo that
    no layout call produced.
    """
    return workspace_layout(
        layout.ep_size,
        layout.max_num_tokens,
        layout.top_k,
        layout.dispatch_payload_size,
        layout.combine_input_size,
        layout.combine_recv_size,
        layout.eplb_stats_num_experts,
        bool(layout.cft_enabled),
    )


# --------------------------------------------------------------------------------------------------
# Lamport regions (moe_a2a_lamport_extend_workspace_layout / moe_a2a_lamport_row_bytes)
# --------------------------------------------------------------------------------------------------


class LamportRowBytes(NamedTuple):
    """``LamportRowBytes``: payload row, its scales as received, its scales on the wire."""

    payload: int
    scale: int
    wire_scale: int


def lamport_row_bytes(payload_format: int, hidden_size: int) -> LamportRowBytes:
    """``lamportRowBytes``: raises for a hidden size the format's kernels do not take."""
    _check(
        0 < hidden_size <= 1 << 24,
        "hiddenSize > 0 && hiddenSize <= (1 << 24)",
        f"Invalid Lamport hidden size {hidden_size}",
    )
    formats = {
        LAMPORT_FORMATS["BF16"]: (8, "BF16", LamportRowBytes(2 * hidden_size, 0, 0)),
        LAMPORT_FORMATS["MXFP8"]: (256, "MXFP8", LamportRowBytes(hidden_size, hidden_size // 32, hidden_size // 16)),
        LAMPORT_FORMATS["FP8_BLOCK128"]: (
            512,
            "FP8 block-128",
            LamportRowBytes(hidden_size, hidden_size // 32, hidden_size // 32),
        ),
        LAMPORT_FORMATS["NVFP4"]: (
            256,
            "NVFP4",
            LamportRowBytes(hidden_size // 2, hidden_size // 16, hidden_size // 16),
        ),
    }
    if payload_format not in formats:
        raise ValueError(f"Unknown Lamport payload format {payload_format}")
    multiple, name, row = formats[payload_format]
    _check(
        hidden_size % multiple == 0,
        f"hiddenSize % {multiple} == 0",
        f"Lamport {name} rows need hidden_size % {multiple} == 0, got {hidden_size}",
    )
    return row


def lamport_topk_row_bytes(top_k: int) -> int:
    """Bytes of one expert-id or weight landing row (``16 * topk_row_vectors``)."""
    return 16 * ((top_k + 3) // 4)


def lamport_dispatch_blocks_per_token(row: LamportRowBytes) -> int:
    vectors = (row.payload + row.wire_scale) // 16
    return (vectors + LAMPORT_NUM_THREADS - 1) // LAMPORT_NUM_THREADS


def lamport_bytes_per_row(top_k: int, row: LamportRowBytes, hidden_size: int) -> int:
    """Lamport workspace bytes per (source rank, token) row, padding aside."""
    landing = row.payload + row.wire_scale + 3 * lamport_topk_row_bytes(top_k)
    recv = row.payload + row.scale + 2 * top_k * 4
    return landing + 2 * hidden_size + recv


@dataclass(frozen=True)
class LamportRegionBytes:
    """``lamportRegionBytes``: sizes of the Lamport regions for ``max_num_tokens`` per source rank."""

    state: int
    payload: int
    scale: int
    weights: int
    ids_set: int
    landing: int
    combine: int
    recv: int


def lamport_region_bytes(
    ep_size: int, max_num_tokens: int, top_k: int, row: LamportRowBytes, hidden_size: int
) -> LamportRegionBytes:
    rows = ep_size * max_num_tokens
    topk_row = lamport_topk_row_bytes(top_k)
    payload = align(rows * row.payload, WORKSPACE_ALIGNMENT)
    scale = align(rows * row.wire_scale, WORKSPACE_ALIGNMENT)
    weights = align(rows * topk_row, WORKSPACE_ALIGNMENT)
    ids_set = align(rows * topk_row, WORKSPACE_ALIGNMENT)
    return LamportRegionBytes(
        state=CACHELINE_ALIGNMENT + max_num_tokens * 8,
        payload=payload,
        scale=scale,
        weights=weights,
        ids_set=ids_set,
        landing=payload + scale + weights + 2 * ids_set,
        combine=align(rows * 2 * hidden_size, WORKSPACE_ALIGNMENT),
        recv=rows * (row.payload + row.scale + 2 * top_k * 4) + MAX_PAYLOADS * CACHELINE_ALIGNMENT,
    )


def with_lamport_regions(
    layout: WorkspaceLayout, max_num_tokens: int, payload_format: int, hidden_size: int
) -> WorkspaceLayout:
    """``appendLamportRegions``: the layout with the Lamport regions after every other region."""
    if layout.lamport_max_num_tokens != 0:
        raise RuntimeError(
            check_eq_failed_message(
                layout.lamport_max_num_tokens,
                0,
                "layout[LAMPORT_MAX_NUM_TOKENS_INDEX]",
                "0",
                "The workspace layout already has Lamport regions",
            )
        )
    _check(
        layout.ep_size <= LAMPORT_MAX_RANKS,
        "epSize <= lamport::kMaxRanks",
        f"The Lamport transport supports at most {LAMPORT_MAX_RANKS} EP ranks",
    )
    _check(
        layout.top_k <= LAMPORT_MAX_TOP_K,
        "topK <= lamport::kMaxTopK",
        f"The Lamport transport supports top_k <= {LAMPORT_MAX_TOP_K}",
    )
    _check(
        0 < max_num_tokens <= LAMPORT_MAX_TOKENS_PER_RANK and max_num_tokens <= layout.max_num_tokens,
        "maxNumTokens > 0 && maxNumTokens <= lamport::kMaxTokensPerRank && "
        "maxNumTokens <= layout[MAX_NUM_TOKENS_INDEX]",
        f"Lamport token capacity must be in [1, min({LAMPORT_MAX_TOKENS_PER_RANK}, max_num_tokens)], "
        f"got {max_num_tokens}",
    )
    row = lamport_row_bytes(payload_format, hidden_size)
    sizes = lamport_region_bytes(layout.ep_size, max_num_tokens, layout.top_k, row, hidden_size)
    walk = _Walk(layout.workspace_size, _LAMPORT_WALK, WORKSPACE_ALIGNMENT)
    walk.reserve("lamport_state_offset", sizes.state)
    walk.reserve("lamport_landing_offset", sizes.landing)
    walk.reserve("lamport_combine_landing_offset", sizes.combine)
    walk.reserve("lamport_recv_offset", sizes.recv)
    return layout._replace(
        **walk.fields,
        lamport_recv_size=sizes.recv,
        lamport_max_num_tokens=max_num_tokens,
        lamport_payload_format=payload_format,
        lamport_hidden_size=hidden_size,
        workspace_size=walk.offset,
    )


# --------------------------------------------------------------------------------------------------
# What NVLinkOneSidedAlltoAll passes (Python side of 0.7.4's flashinfer.moe_ep)
# --------------------------------------------------------------------------------------------------


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def dispatch_bytes_per_token(hidden_size: int, dispatch_format: str | None = None, token_itemsize: int = 2) -> int:
    """``MoEEpCommParams.dispatch_bytes_per_token``: activations plus their scale factors."""
    if dispatch_format is None:
        return hidden_size * token_itemsize
    per_format = {
        "BF16": 2 * hidden_size,
        "FP16": 2 * hidden_size,
        "FP8PerTensor": hidden_size,
        "DeepSeekFp8": hidden_size + 4 * _ceil_div(hidden_size, 128),
        "MXFP8": hidden_size + _ceil_div(hidden_size, 32),
        "NVFP4": _ceil_div(hidden_size, 2) + _ceil_div(hidden_size, 16),
        "MXFP4": _ceil_div(hidden_size, 2) + _ceil_div(hidden_size, 32),
    }
    if dispatch_format not in per_format:
        raise ValueError(
            f"dispatch_format={dispatch_format!r} is not allowed: must be one of {DISPATCH_FORMATS} or None"
        )
    return per_format[dispatch_format]


def dispatch_bytes(
    ep_size: int, max_tokens_per_rank: int, bytes_per_token: int, top_k: int, extra_payload_bytes_per_token: int = 0
) -> int:
    """The dispatch capacity asked for: every token's row, ids and weights, one alignment per payload."""
    tokens = ep_size * max_tokens_per_rank
    return (
        tokens * (bytes_per_token + 2 * top_k * 4 + extra_payload_bytes_per_token) + MAX_PAYLOADS * WORKSPACE_ALIGNMENT
    )


def combine_input_bytes(ep_size: int, max_tokens_per_rank: int, hidden_size: int, token_itemsize: int = 2) -> int:
    """Expert outputs come back unquantized and at least 16 bits wide."""
    return ep_size * max_tokens_per_rank * hidden_size * max(token_itemsize, 2)


def combine_recv_bytes(
    ep_size: int,
    max_tokens_per_rank: int,
    hidden_size: int,
    token_itemsize: int = 2,
    *,
    low_precision: bool = False,
    cft_capable: bool = False,
) -> int:
    """The CFT receive inbox (FP8 wire bytes under low-precision combine); 0 without CFT."""
    if not cft_capable:
        return 0
    element = 1 if low_precision else max(token_itemsize, 2)
    return ep_size * max_tokens_per_rank * hidden_size * element


def nvlink_one_sided_layout(
    ep_size: int,
    max_tokens_per_rank: int,
    hidden_size: int,
    top_k: int,
    *,
    dispatch_format: str | None = None,
    token_itemsize: int = 2,
    extra_payload_bytes_per_token: int = 0,
    eplb_stats_num_experts: int = 0,
    low_precision_combine: bool = False,
    cft_capable: bool = False,
) -> WorkspaceLayout:
    """The layout ``NVLinkOneSidedAlltoAll`` asks for (no Lamport regions: an H100/H200 has none)."""
    per_token = dispatch_bytes_per_token(hidden_size, dispatch_format, token_itemsize)
    return workspace_layout(
        ep_size,
        max_tokens_per_rank,
        top_k,
        dispatch_bytes(ep_size, max_tokens_per_rank, per_token, top_k, extra_payload_bytes_per_token),
        combine_input_bytes(ep_size, max_tokens_per_rank, hidden_size, token_itemsize),
        combine_recv_bytes(
            ep_size,
            max_tokens_per_rank,
            hidden_size,
            token_itemsize,
            low_precision=low_precision_combine,
            cft_capable=cft_capable,
        ),
        eplb_stats_num_experts,
        cft_capable,
    )


# --------------------------------------------------------------------------------------------------
# Capacity checks of dispatch and combine, with FlashInfer's exact texts
# --------------------------------------------------------------------------------------------------

#: ``#cond`` of the dispatch capacity check (``moeA2ADispatchOp``).
DISPATCH_CAPACITY_CONDITION = "currentOffset <= static_cast<size_t>(recvRegionOffset + recvRegionSize)"
#: ``#cond`` of the combine region check (``moeA2ACombineOp``).
COMBINE_CAPACITY_CONDITION = "payloadSize <= regionSize"
RUNTIME_TOKENS_CONDITION = "runtimeMaxTokensPerRank <= offsets[MAX_NUM_TOKENS_INDEX]"
RUNTIME_TOKENS_DETAIL = "runtimeMaxTokensPerRank exceeds the allocation-time token capacity"


def dispatch_capacity_detail(need: int, capacity: int) -> str:
    """FlashInfer's words after the dispatch capacity check's ``Check failed`` prefix."""
    return f"Dispatch payload exceeds its workspace capacity: need {need} bytes, capacity {capacity}"


def dispatch_capacity_message(need: int, capacity: int) -> str:
    return check_failed_message(DISPATCH_CAPACITY_CONDITION, dispatch_capacity_detail(need, capacity))


def combine_capacity_detail(need: int, capacity: int) -> str:
    """FlashInfer's words after the combine region check's ``Check failed`` prefix."""
    return f"Combine payload exceeds its fixed workspace region: need {need} bytes, capacity {capacity}"


def combine_capacity_message(need: int, capacity: int) -> str:
    return check_failed_message(COMBINE_CAPACITY_CONDITION, combine_capacity_detail(need, capacity))


def runtime_tokens_message() -> str:
    """The C++ check of a runtime token count above the layout's capacity (dispatch and combine)."""
    return check_failed_message(RUNTIME_TOKENS_CONDITION, RUNTIME_TOKENS_DETAIL)


def runtime_tokens_value_error(runtime_max_tokens_per_rank: int, capacity: int) -> str:
    """``MoEEpCommunication``'s ValueError text (0.7.2 named the keyword ``max_tokens_per_rank``)."""
    return f"runtime_max_tokens_per_rank={runtime_max_tokens_per_rank} must be in (0, {capacity}]"


def top_k_value_error(top_k: int) -> str:
    return f"NVLinkOneSidedAlltoAll supports top_k in {SUPPORTED_TOP_K}, got {top_k}"


def ep_size_value_error(ep_size: int) -> str:
    return f"NVLinkOneSidedAlltoAll supports at most {MAX_RANKS} EP ranks, got {ep_size}"


def combine_buffer_value_error(dtype: str, nbytes: int, capacity: int) -> str:
    """``get_combine_input_buffer``'s ValueError; ``dtype`` as torch prints it (``torch.float32``)."""
    return f"a {dtype} combine input needs {nbytes} bytes, more than the {capacity}-byte combine region"


@dataclass(frozen=True)
class DispatchCapacity:
    """The dispatch capacity check of one call: where each payload lands and whether it fits.

    Each payload buffer holds ``ep_size * runtime_max_tokens_per_rank`` rows and the next starts
    on a 128-byte boundary after it, so ``need`` includes that padding.
    """

    recv_offsets: tuple[int, ...]
    need: int
    capacity: int

    @property
    def fits(self) -> bool:
        return self.need <= self.capacity

    @property
    def detail(self) -> str:
        return dispatch_capacity_detail(self.need, self.capacity)

    @property
    def message(self) -> str:
        return dispatch_capacity_message(self.need, self.capacity)


def check_dispatch(
    layout: WorkspaceLayout, runtime_max_tokens_per_rank: int, payload_bytes_per_token: Sequence[int]
) -> DispatchCapacity:
    """Receive offsets (relative to the row, as dispatch returns them) and the capacity check."""
    start = layout.dispatch_payload_offset
    cursor = start
    offsets = []
    for nbytes in payload_bytes_per_token:
        offsets.append(cursor)
        cursor = align(cursor + layout.ep_size * runtime_max_tokens_per_rank * nbytes, CACHELINE_ALIGNMENT)
    return DispatchCapacity(tuple(offsets), cursor - start, layout.dispatch_payload_size)


@dataclass(frozen=True)
class CombineCapacity:
    """The combine region check: the whole ``[ep, runtime_T, hidden]`` input against the fixed region."""

    need: int
    capacity: int

    @property
    def fits(self) -> bool:
        return self.need <= self.capacity

    @property
    def detail(self) -> str:
        return combine_capacity_detail(self.need, self.capacity)

    @property
    def message(self) -> str:
        return combine_capacity_message(self.need, self.capacity)


def check_combine(
    layout: WorkspaceLayout, runtime_max_tokens_per_rank: int, hidden_size: int, element_size: int
) -> CombineCapacity:
    return CombineCapacity(
        layout.ep_size * runtime_max_tokens_per_rank * hidden_size * element_size, layout.combine_input_size
    )
