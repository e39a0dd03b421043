"""FlashInfer's one-sided MoE all-to-all workspace arithmetic, in pure Python.

Facts from flashinfer-python 0.7.2.post1 (`calculateOffsets` in `trtllm_moe_alltoall.cu`, the
`MoeA2AMetaInfoIndex` enum and `moe_a2a_get_workspace_size_per_rank`); no torch needed, so the
explain/predict tools and the oracle run anywhere. The sim backend builds its metainfo from here,
which is why the region walk is exposed field by field and not only as a total.
"""

from __future__ import annotations

from typing import NamedTuple

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
