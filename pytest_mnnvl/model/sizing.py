"""FlashInfer's one-sided MoE all-to-all workspace arithmetic, in pure Python.

Facts from flashinfer-python 0.7.2.post1 (`calculateOffsets` in `trtllm_moe_alltoall.cu`, the
`MoeA2AMetaInfoIndex` enum and `moe_a2a_get_workspace_size_per_rank`); no torch needed, so the
explain/predict tools and the oracle run anywhere. The sim backend builds its metainfo from here,
which is why the region walk is exposed field by field and not only as a total.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

#: Every region in the workspace row starts on a 128-byte boundary.
ALIGNMENT = 128
#: The aux arrays are sized for this many experts per token, whatever the layer's top_k.
MAX_TOP_K = 22
#: At most this many payload tensors per dispatch.
MAX_PAYLOADS = 6
#: At most this many ranks in one EP group.
MAX_RANKS = 64
INT32_BYTES = 4


def align(value: int, alignment: int = ALIGNMENT) -> int:
    """Round ``value`` up to a multiple of ``alignment`` (FlashInfer's ``alignOffset``/``pad_up``)."""
    return (value + alignment - 1) // alignment * alignment


class AuxOffsets(NamedTuple):
    """Byte offsets of the regions in one rank's workspace row, in FlashInfer's metainfo order.

    The field order is the ``MoeA2AMetaInfoIndex`` enum: ``tuple(offsets)`` is exactly the int64[10]
    metainfo tensor that ``moe_a2a_initialize`` returns.
    """

    flag_val: int
    local_token_counter: int
    send_counters: int
    recv_counters: int
    dispatch_completion_flags: int
    combine_completion_flags: int
    topk_target_ranks: int
    topk_send_indices: int
    eplb_gathered_stats: int
    payload_data: int


#: FlashInfer's names for the metainfo slots (``MOE_A2A_<NAME>`` in the compiled module's index pairs).
METAINFO_INDEX_NAMES: tuple[str, ...] = (
    "FLAG_VAL_OFFSET_INDEX",
    "LOCAL_TOKEN_COUNTER_OFFSET_INDEX",
    "SEND_COUNTERS_OFFSET_INDEX",
    "RECV_COUNTERS_OFFSET_INDEX",
    "DISPATCH_COMPLETION_FLAGS_OFFSET_INDEX",
    "COMBINE_COMPLETION_FLAGS_OFFSET_INDEX",
    "TOPK_TARGET_RANKS_OFFSET_INDEX",
    "TOPK_SEND_INDICES_OFFSET_INDEX",
    "EPLB_GATHERED_STATS_OFFSET_INDEX",
    "PAYLOAD_DATA_OFFSET_INDEX",
)
NUM_METAINFO_FIELDS = len(METAINFO_INDEX_NAMES)


def aux_offsets(ep_size: int, max_num_tokens: int, eplb_stats_num_experts: int = 0) -> AuxOffsets:
    """Walk the aux regions the way FlashInfer lays them out; ``payload_data`` is the aux size."""
    offset = 0
    flag_val = offset
    offset += INT32_BYTES
    local_token_counter = offset
    offset += INT32_BYTES
    send_counters = offset
    offset += ep_size * INT32_BYTES
    recv_counters = offset
    offset += ep_size * INT32_BYTES
    dispatch_completion_flags = offset = align(offset)
    offset += ep_size * INT32_BYTES
    combine_completion_flags = offset = align(offset)
    offset += ep_size * INT32_BYTES
    topk_target_ranks = offset = align(offset)
    offset += max_num_tokens * MAX_TOP_K * INT32_BYTES
    topk_send_indices = offset = align(offset)
    offset += max_num_tokens * MAX_TOP_K * INT32_BYTES
    eplb_gathered_stats = offset = align(offset)
    offset += ep_size * eplb_stats_num_experts * INT32_BYTES
    payload_data = align(offset)
    return AuxOffsets(
        flag_val,
        local_token_counter,
        send_counters,
        recv_counters,
        dispatch_completion_flags,
        combine_completion_flags,
        topk_target_ranks,
        topk_send_indices,
        eplb_gathered_stats,
        payload_data,
    )


def aux_size(ep_size: int, max_num_tokens: int, eplb_stats_num_experts: int = 0) -> int:
    """What ``moe_a2a_get_aux_data_size`` returns: the offset of the payload region."""
    return aux_offsets(ep_size, max_num_tokens, eplb_stats_num_experts).payload_data


def workspace_size_per_rank(
    ep_size: int,
    max_num_tokens: int,
    total_dispatch_payload_size_per_token: int,
    combine_payload_size_per_token: int,
    eplb_stats_num_experts: int = 0,
) -> int:
    """``moe_a2a_get_workspace_size_per_rank``: padded aux + dispatch region + combine region."""
    return (
        align(aux_size(ep_size, max_num_tokens, eplb_stats_num_experts))
        + align(ep_size * max_num_tokens * total_dispatch_payload_size_per_token)
        + align(ep_size * max_num_tokens * combine_payload_size_per_token)
    )


# --------------------------------------------------------------------------------------------------
# Host checks of moe_a2a_dispatch / moe_a2a_combine, with FlashInfer's exact error texts.
#
# The C++ op raises through TVM FFI: ``TVM_FFI_ICHECK(cond) << msg`` builds the message
# ``"Check failed: (" #cond ") is false: " + msg`` (tvm_ffi/include/tvm/ffi/error.h, TVM_FFI_CHECK)
# with kind ``InternalError``. That kind is not registered on the Python side, so Python raises a
# plain ``RuntimeError`` whose ``str()`` is exactly that message (tvm_ffi/cython/error.pxi,
# ``Error.py_error``); the backtrace goes into ``__traceback__``, not into the text.
# --------------------------------------------------------------------------------------------------

#: ``#cond`` of the dispatch size check (trtllm_moe_alltoall.cu, moeA2ADispatchOp).
DISPATCH_SIZE_CONDITION = "sizePerRank >= requiredSize"
#: ``#cond`` of the combine region check (trtllm_moe_alltoall.cu, moeA2ACombineIntoOp).
COMBINE_SIZE_CONDITION = "combinePayloadOffset >= 0 && combinePayloadOffset + payloadBytes <= sizePerRank"
COMBINE_SIZE_DETAIL = "workspace insufficient for combine payload region"

#: Python-side assertions of ``MoeAlltoAll`` (``AssertionError`` with these texts).
RUNTIME_TOKENS_EXCEED_MAX = "runtime_max_tokens_per_rank exceeds max_num_tokens"
DISPATCH_TWICE = "dispatch called twice without combine"
COMBINE_BEFORE_DISPATCH = "combine called before successful dispatch"


def check_failed_message(condition: str, detail: str = "") -> str:
    """The ``str()`` of the RuntimeError that ``TVM_FFI_ICHECK(condition) << detail`` raises."""
    return f"Check failed: ({condition}) is false: {detail}"


def dispatch_size_detail(required_size: int, size_per_rank: int) -> str:
    """FlashInfer's own words after the dispatch size check's ``Check failed`` prefix."""
    return f"workspace size per rank insufficient, need {required_size} bytes but has {size_per_rank}"


def _require_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """Reject non-integers (bool included) and out-of-range values, naming the field."""
    allowed = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} is not allowed: must be {allowed}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name}={value!r} is not allowed: must be {allowed}")
    return value


def _int_tuple(name: str, values: Sequence[int], minimum: int) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{name}={values!r} is not allowed: must be a sequence of integers >= {minimum}")
    return tuple(_require_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(values))


@dataclass(frozen=True)
class DispatchCheck:
    """The dispatch size check at one runtime token count, with every number it looks at.

    FlashInfer lays the payloads of one dispatch back to back (no padding between them) from
    ``payload_offset``; each takes ``ep_size * runtime_max_tokens_per_rank * bytes_per_token``.
    Only ``payload_offset + Σ payload_bytes <= size_per_rank`` is checked here, which is why a
    dispatch too big for its share can still pass by borrowing the combine region.
    """

    ep_size: int
    runtime_max_tokens_per_rank: int
    payload_bytes_per_token: tuple[int, ...]
    size_per_rank: int
    payload_offset: int
    #: Bytes of each payload region (``ep * runtime_T * bytes_per_token_i``).
    payload_bytes: tuple[int, ...] = field(init=False)
    #: Start of each payload region in the rank's row (the receive offsets dispatch returns).
    payload_offsets: tuple[int, ...] = field(init=False)
    #: ``payload_offset + Σ payload_bytes``: FlashInfer's ``requiredSize``.
    required_size: int = field(init=False)
    #: ``align128(required_size)``: where this dispatch puts the combine region.
    combine_payload_offset: int = field(init=False)
    fits: bool = field(init=False)

    def __post_init__(self) -> None:
        _require_int("ep_size", self.ep_size, 1)
        _require_int("runtime_max_tokens_per_rank", self.runtime_max_tokens_per_rank, 0)
        per_token = _int_tuple("payload_bytes_per_token", self.payload_bytes_per_token, 0)
        _require_int("size_per_rank", self.size_per_rank, 0)
        _require_int("payload_offset", self.payload_offset, 0)
        rows = self.ep_size * self.runtime_max_tokens_per_rank
        sizes = tuple(rows * b for b in per_token)
        starts = []
        cursor = self.payload_offset
        for size in sizes:
            starts.append(cursor)
            cursor += size
        object.__setattr__(self, "payload_bytes_per_token", per_token)
        object.__setattr__(self, "payload_bytes", sizes)
        object.__setattr__(self, "payload_offsets", tuple(starts))
        object.__setattr__(self, "required_size", cursor)
        object.__setattr__(self, "combine_payload_offset", align(cursor))
        object.__setattr__(self, "fits", self.size_per_rank >= cursor)

    @property
    def total_payload_bytes(self) -> int:
        return self.required_size - self.payload_offset

    @property
    def shortfall(self) -> int:
        """Bytes missing for the check to pass (0 when it fits)."""
        return max(0, self.required_size - self.size_per_rank)

    @property
    def message(self) -> str:
        """``str()`` of FlashInfer's RuntimeError for these numbers (whether or not it fires)."""
        return check_failed_message(
            DISPATCH_SIZE_CONDITION, dispatch_size_detail(self.required_size, self.size_per_rank)
        )

    @property
    def error(self) -> str | None:
        return None if self.fits else self.message

    def raise_for_failure(self) -> None:
        """Raise the RuntimeError FlashInfer raises, if the check fails."""
        if not self.fits:
            raise RuntimeError(self.message)


@dataclass(frozen=True)
class CombineCheck:
    """The combine region check: the region starts where the *current* dispatch ended.

    ``payload_bytes`` is the whole combine input tensor, ``[ep, runtime_T, hidden]`` times its
    element size, so the check depends on the runtime token count, not the workspace's maximum.
    """

    ep_size: int
    runtime_max_tokens_per_rank: int
    combine_bytes_per_token: int
    size_per_rank: int
    combine_payload_offset: int
    payload_bytes: int = field(init=False)
    #: ``combine_payload_offset + payload_bytes``: the end of the region.
    required_size: int = field(init=False)
    fits: bool = field(init=False)

    def __post_init__(self) -> None:
        _require_int("ep_size", self.ep_size, 1)
        _require_int("runtime_max_tokens_per_rank", self.runtime_max_tokens_per_rank, 0)
        _require_int("combine_bytes_per_token", self.combine_bytes_per_token, 0)
        _require_int("size_per_rank", self.size_per_rank, 0)
        if isinstance(self.combine_payload_offset, bool) or not isinstance(self.combine_payload_offset, int):
            raise ValueError(
                f"combine_payload_offset={self.combine_payload_offset!r} is not allowed: must be an integer"
            )
        payload = self.ep_size * self.runtime_max_tokens_per_rank * self.combine_bytes_per_token
        end = self.combine_payload_offset + payload
        object.__setattr__(self, "payload_bytes", payload)
        object.__setattr__(self, "required_size", end)
        object.__setattr__(self, "fits", self.combine_payload_offset >= 0 and end <= self.size_per_rank)

    @property
    def shortfall(self) -> int:
        return max(0, self.required_size - self.size_per_rank)

    @property
    def message(self) -> str:
        return check_failed_message(COMBINE_SIZE_CONDITION, COMBINE_SIZE_DETAIL)

    @property
    def error(self) -> str | None:
        return None if self.fits else self.message

    def raise_for_failure(self) -> None:
        if not self.fits:
            raise RuntimeError(self.message)


@dataclass(frozen=True)
class RoundTripCheck:
    """One dispatch followed by its combine at the same runtime token count.

    ``combine`` is always computed (what combine would check had dispatch passed), so an
    explanation can show both; ``failed_stage``/``error`` follow FlashInfer's order.
    """

    dispatch: DispatchCheck
    combine: CombineCheck

    @property
    def fits(self) -> bool:
        return self.dispatch.fits and self.combine.fits

    @property
    def failed_stage(self) -> Literal["dispatch", "combine"] | None:
        if not self.dispatch.fits:
            return "dispatch"
        if not self.combine.fits:
            return "combine"
        return None

    @property
    def error(self) -> str | None:
        return self.dispatch.error or self.combine.error


def check_dispatch(
    ep_size: int,
    runtime_max_tokens_per_rank: int,
    payload_bytes_per_token: Sequence[int],
    size_per_rank: int,
    payload_offset: int,
) -> DispatchCheck:
    """Dispatch size check: ``payload_offset + Σ ep*T*b_i <= size_per_rank``."""
    return DispatchCheck(
        ep_size, runtime_max_tokens_per_rank, tuple(payload_bytes_per_token), size_per_rank, payload_offset
    )


def check_combine(
    ep_size: int,
    runtime_max_tokens_per_rank: int,
    combine_bytes_per_token: int,
    size_per_rank: int,
    combine_payload_offset: int,
) -> CombineCheck:
    """Combine region check: ``0 <= offset`` and ``offset + ep*T*combine_bytes <= size_per_rank``."""
    return CombineCheck(
        ep_size, runtime_max_tokens_per_rank, combine_bytes_per_token, size_per_rank, combine_payload_offset
    )


def check_round_trip(
    ep_size: int,
    runtime_max_tokens_per_rank: int,
    dispatch_payload_bytes_per_token: Sequence[int],
    combine_bytes_per_token: int,
    size_per_rank: int,
    payload_offset: int,
) -> RoundTripCheck:
    """Both checks of one dispatch + combine; the combine offset comes from this dispatch."""
    dispatch = check_dispatch(
        ep_size, runtime_max_tokens_per_rank, dispatch_payload_bytes_per_token, size_per_rank, payload_offset
    )
    combine = check_combine(
        ep_size,
        runtime_max_tokens_per_rank,
        combine_bytes_per_token,
        size_per_rank,
        dispatch.combine_payload_offset,
    )
    return RoundTripCheck(dispatch, combine)


# ---- the other host checks that are pure arithmetic on sizes, in the order FlashInfer runs them ----


def misaligned_payload_error(
    ep_size: int,
    runtime_max_tokens_per_rank: int,
    payload_bytes_per_token: Sequence[int],
    payload_element_sizes: Sequence[int],
) -> str | None:
    """Dispatch's per-payload alignment check, or None when every payload starts aligned.

    FlashInfer requires the running byte total *including* payload ``i`` to be a multiple of
    payload ``i``'s element size; with payloads packed back to back, a small byte-sized payload
    before an int32 one can break that at odd token counts.
    """
    per_token = _int_tuple("payload_bytes_per_token", payload_bytes_per_token, 0)
    sizes = _int_tuple("payload_element_sizes", payload_element_sizes, 1)
    if len(per_token) != len(sizes):
        raise ValueError(
            f"payload_element_sizes has {len(sizes)} entries: must have one per payload ({len(per_token)})"
        )
    rows = ep_size * runtime_max_tokens_per_rank
    total = 0
    for i, (nbytes, element_size) in enumerate(zip(per_token, sizes, strict=True)):
        total += rows * nbytes
        if total % element_size:
            return check_failed_message(
                "totalBytesNeeded % elementSize == 0",
                f"Misaligned payload buffer {i} with element size {element_size}. "
                "Consider reordering payloads by largest to smallest element size",
            )
    return None


def dispatch_argument_error(
    ep_size: int,
    runtime_max_tokens_per_rank: int,
    top_k: int,
    num_experts: int,
    num_payloads: int,
    *,
    ep_rank: int = 0,
    local_num_tokens: int = 0,
    eplb_local_stats_num_experts: int | None = None,
    offsets: AuxOffsets | None = None,
) -> str | None:
    """The scalar argument checks ``moe_a2a_dispatch`` runs before the payload loop, first failure.

    Tensor-shape checks (ndim, dtype, device) are left out: they are not about sizes.
    ``eplb_local_stats_num_experts`` is the length of ``eplb_local_stats`` (None: not passed); its
    reservation check needs the workspace ``offsets``.
    """
    if num_payloads <= 0:
        return check_failed_message("numPayloads > 0", "At least one payload is required")
    if num_payloads > MAX_PAYLOADS:
        return check_failed_message(
            "numPayloads <= tl_throughput::kMaxPayloads",
            f"Too many payloads: {num_payloads} > {MAX_PAYLOADS}",
        )
    if local_num_tokens < 0:
        return check_failed_message("localNumTokens >= 0", "local_num_tokens must be non-negative")
    if not 0 < ep_size <= MAX_RANKS:
        return check_failed_message(
            "epSize > 0 && epSize <= tl_throughput::kMaxRanks",
            f"epSize must be in the range (0, {MAX_RANKS}]",
        )
    if not 0 <= ep_rank < ep_size:
        return check_failed_message("epRank >= 0 && epRank < epSize")
    if runtime_max_tokens_per_rank <= 0:
        return check_failed_message("runtimeMaxTokensPerRank > 0")
    if num_experts < ep_size:
        return check_failed_message("numExperts >= epSize", "num_experts must be >= ep_size")
    if not 0 < top_k <= MAX_TOP_K:
        return check_failed_message("topK > 0 && topK <= tl_throughput::kMaxTopK")
    if eplb_local_stats_num_experts is not None:
        n = eplb_local_stats_num_experts
        if n <= 0:
            return check_failed_message("eplbStatsNumExperts > 0", "eplb_local_stats must not be empty")
        if n > num_experts:
            return check_failed_message(
                "eplbStatsNumExperts <= numExperts", "eplb_local_stats size must be <= num_experts"
            )
        if offsets is None:
            raise ValueError(
                "offsets=None is not allowed when eplb_local_stats_num_experts is given: pass the AuxOffsets"
            )
        gathered_end = offsets.eplb_gathered_stats + ep_size * n * INT32_BYTES
        if gathered_end > offsets.payload_data:
            return check_failed_message(
                "gatheredEnd <= offsets[fi_throughput::PAYLOAD_DATA_OFFSET_INDEX]",
                f"eplb_local_stats size ({n}) exceeds the eplb_stats_num_experts reserved at initialize time",
            )
    return None


def combine_argument_error(ep_size: int, top_k: int, *, ep_rank: int = 0, local_num_tokens: int = 0) -> str | None:
    """The scalar argument checks ``moe_a2a_combine`` runs before the region check, first failure."""
    if not 0 < ep_size <= MAX_RANKS:
        return check_failed_message(
            "epSize > 0 && epSize <= tl_throughput::kMaxRanks",
            f"epSize must be in the range (0, {MAX_RANKS}]",
        )
    if not 0 <= ep_rank < ep_size:
        return check_failed_message("epRank >= 0 && epRank < epSize")
    if not 0 < top_k <= MAX_TOP_K:
        return check_failed_message("topK > 0 && topK <= tl_throughput::kMaxTopK")
    if local_num_tokens < 0:
        return check_failed_message("localNumTokens >= 0")
    return None


# --------------------------------------------------------------------------------------------------
# A workspace's geometry, and what a layer needs from it.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkspaceGeometry:
    """What the host checks see of a live workspace: its row size and the metainfo it was built with.

    ``max_num_tokens``/``eplb_stats_num_experts`` are the values given to ``moe_a2a_initialize``:
    they fix the payload offset, whatever the layer now dispatching was sized for.
    """

    ep_size: int
    max_num_tokens: int
    size_per_rank: int
    eplb_stats_num_experts: int = 0

    def __post_init__(self) -> None:
        _require_int("ep_size", self.ep_size, 1, MAX_RANKS)
        _require_int("max_num_tokens", self.max_num_tokens, 1)
        _require_int("size_per_rank", self.size_per_rank, 0)
        _require_int("eplb_stats_num_experts", self.eplb_stats_num_experts, 0)

    @classmethod
    def sized_for(
        cls,
        ep_size: int,
        max_num_tokens: int,
        total_dispatch_payload_size_per_token: int,
        combine_payload_size_per_token: int,
        eplb_stats_num_experts: int = 0,
    ) -> WorkspaceGeometry:
        """A workspace built with FlashInfer's own size formula for these per-token bytes."""
        size = workspace_size_per_rank(
            ep_size,
            max_num_tokens,
            total_dispatch_payload_size_per_token,
            combine_payload_size_per_token,
            eplb_stats_num_experts,
        )
        return cls(ep_size, max_num_tokens, size, eplb_stats_num_experts)

    @property
    def offsets(self) -> AuxOffsets:
        return aux_offsets(self.ep_size, self.max_num_tokens, self.eplb_stats_num_experts)

    @property
    def payload_offset(self) -> int:
        return aux_size(self.ep_size, self.max_num_tokens, self.eplb_stats_num_experts)

    def check_dispatch(self, runtime_max_tokens_per_rank: int, payload_bytes_per_token: Sequence[int]) -> DispatchCheck:
        return check_dispatch(
            self.ep_size,
            runtime_max_tokens_per_rank,
            payload_bytes_per_token,
            self.size_per_rank,
            self.payload_offset,
        )

    def check_round_trip(
        self,
        runtime_max_tokens_per_rank: int,
        dispatch_payload_bytes_per_token: Sequence[int],
        combine_bytes_per_token: int,
    ) -> RoundTripCheck:
        return check_round_trip(
            self.ep_size,
            runtime_max_tokens_per_rank,
            dispatch_payload_bytes_per_token,
            combine_bytes_per_token,
            self.size_per_rank,
            self.payload_offset,
        )


class LayerPayloads(Protocol):
    """What sizing needs of a layer (``layers.LayerSpec`` is one); kept structural so that this
    module does not import ``layers``."""

    @property
    def max_num_tokens(self) -> int: ...

    @property
    def dispatch_payload_bytes_per_token(self) -> tuple[int, ...]: ...

    @property
    def combine_bytes_per_token(self) -> int: ...

    @property
    def eplb_stats_num_experts(self) -> int: ...


def need(layer: LayerPayloads, ep_size: int) -> int:
    """Bytes per rank FlashInfer's formula gives for ``layer`` alone, at its max tokens."""
    _require_int("ep_size", ep_size, 1, MAX_RANKS)
    return workspace_size_per_rank(
        ep_size,
        layer.max_num_tokens,
        sum(layer.dispatch_payload_bytes_per_token),
        layer.combine_bytes_per_token,
        layer.eplb_stats_num_experts,
    )


def layer_round_trip(
    layer: LayerPayloads, geometry: WorkspaceGeometry, runtime_max_tokens_per_rank: int
) -> RoundTripCheck:
    """Both host checks for ``layer``'s own payload layout on ``geometry`` at one token count."""
    return geometry.check_round_trip(
        runtime_max_tokens_per_rank, layer.dispatch_payload_bytes_per_token, layer.combine_bytes_per_token
    )


def smallest_failing_runtime_tokens(
    layer: LayerPayloads, geometry: WorkspaceGeometry, up_to: int | None = None
) -> int | None:
    """Smallest runtime token count in ``1..up_to`` at which ``layer``'s dispatch or combine fails.

    ``up_to`` defaults to the workspace's max tokens (beyond it the Python-side assert fires
    first). Both checks only grow with the token count (dispatch need is linear in it, the combine
    end is ``align128`` of a linear term plus a linear term), so a bisection is exact.
    """
    limit = geometry.max_num_tokens if up_to is None else _require_int("up_to", up_to, 0)
    if limit < 1 or layer_round_trip(layer, geometry, limit).fits:
        return None
    low, high = 0, limit  # invariant: fits at ``low`` (vacuously at 0), fails at ``high``
    while high - low > 1:
        mid = (low + high) // 2
        if layer_round_trip(layer, geometry, mid).fits:
            low = mid
        else:
            high = mid
    return high


def first_failing_round_trip(
    layer: LayerPayloads, geometry: WorkspaceGeometry, up_to: int | None = None
) -> RoundTripCheck | None:
    """The failing check at :func:`smallest_failing_runtime_tokens`, for explanations."""
    tokens = smallest_failing_runtime_tokens(layer, geometry, up_to)
    return None if tokens is None else layer_round_trip(layer, geometry, tokens)
