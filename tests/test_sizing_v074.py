"""FlashInfer 0.7.4's workspace layout arithmetic, against numbers derived by hand from its C++.

``calculateWorkspaceLayout`` (``nvlink_one_sided_alltoall.cu``) was walked on paper for the cases
below; the table cases are the upstream notes' computed (not measured) sizes, which agree.
"""

from __future__ import annotations

import pytest

from pytest_mnnvl.model import sizing_v074 as s


def test_metainfo_names_are_flashinfers_order() -> None:
    """The 33 ``MoeA2AMetaInfoIndex`` names, in enum order (``moe_a2a_get_metainfo_index_pairs``)."""
    assert s.NUM_METAINFO_FIELDS == 33
    assert s.METAINFO_INDEX_NAMES[:12] == (
        "FLAG_VAL_OFFSET_INDEX",
        "LOCAL_TOKEN_COUNTER_OFFSET_INDEX",
        "SEND_COUNTERS_OFFSET_INDEX",
        "RECV_COUNTERS_OFFSET_INDEX",
        "DISPATCH_COMPLETION_FLAGS_OFFSET_INDEX",
        "DISPATCH_COUNTED_WRITE_COUNTERS_OFFSET_INDEX",
        "DISPATCH_COUNTER_BASELINE_OFFSET_INDEX",
        "TOPK_TARGET_RANKS_OFFSET_INDEX",
        "TOPK_TARGET_INDICES_OFFSET_INDEX",
        "EPLB_GATHERED_STATS_OFFSET_INDEX",
        "DISPATCH_PAYLOAD_OFFSET_INDEX",
        "DISPATCH_PAYLOAD_SIZE_INDEX",
    )
    assert s.METAINFO_INDEX_NAMES[15:25] == (
        "COMBINE_INPUT_OFFSET_INDEX",
        "COMBINE_INPUT_SIZE_INDEX",
        "COMBINE_RECV_OFFSET_INDEX",
        "COMBINE_RECV_SIZE_INDEX",
        "MAX_NUM_TOKENS_INDEX",
        "TOP_K_INDEX",
        "EP_SIZE_INDEX",
        "EPLB_STATS_NUM_EXPERTS_INDEX",
        "CFT_ENABLED_INDEX",
        "WORKSPACE_SIZE_INDEX",
    )
    assert s.METAINFO_INDEX_NAMES[-1] == "LAMPORT_RECV_SIZE_INDEX"
    assert dict(s.MODULE_CONSTANTS)["LAMPORT_IDS_SENTINEL"] == -2004318072  # int32(0x88888888)


def test_bf16_layout_by_hand() -> None:
    """ep 2, T 1024, hidden 4096, top_k 4, BF16: every region, walked by hand."""
    layout = s.nvlink_one_sided_layout(2, 1024, 4096, 4)
    # dispatch: 2*1024*(8192 + 32) + 4*256 = 16,843,776 (already a multiple of 256)
    assert s.dispatch_bytes(2, 1024, 8192, 4) == 16_843_776
    assert s.combine_input_bytes(2, 1024, 4096) == 16_777_216
    assert layout._asdict() == {
        **dict.fromkeys(layout._fields, 0),
        "local_token_counter_offset": 4,
        "send_counters_offset": 8,
        "recv_counters_offset": 16,  # [2][ep] int32
        "dispatch_completion_flags_offset": 128,
        "topk_target_ranks_offset": 256,  # T * top_k * 4 = 16,384 each, not T * 22 * 4
        "topk_target_indices_offset": 16_640,
        "eplb_gathered_stats_offset": 33_024,
        "dispatch_payload_offset": 33_024,
        "dispatch_payload_size": 16_843_776,
        "combine_completion_flags_offset": 16_876_800,
        "combine_input_offset": 16_877_056,  # align256(16,876,808)
        "combine_input_size": 16_777_216,
        "max_num_tokens": 1024,
        "top_k": 4,
        "ep_size": 2,
        "workspace_size": 33_654_272,
    }


def test_cft_layout_by_hand() -> None:
    """Small CFT layout: counters at 256-byte stride, baselines, and the combine receive inbox."""
    layout = s.workspace_layout(2, 16, 2, 1000, 3000, 500, eplb_stats_num_experts=3, can_use_cft=True)
    assert tuple(layout[:19]) == (
        0,
        4,
        8,
        16,
        128,
        256,  # dispatch counters: 2 * 256 B
        768,  # dispatch baselines: 2 * 8 B
        896,
        1024,
        1152,  # EPLB 2 * 3 * 4 = 24 B
        1280,
        1024,  # align256(1000)
        2304,
        2560,  # combine counters: 2 * 16 * 256 B
        10_752,  # combine baselines: 2 * 16 * 8 B
        11_008,
        3072,  # align256(3000)
        14_080,
        512,  # align256(500)
    )
    assert (layout.eplb_stats_num_experts, layout.cft_enabled, layout.workspace_size) == (3, 1, 14_592)


def test_lamport_extension_by_hand() -> None:
    """BF16 Lamport regions for 8 tokens per rank appended after the ep-2 BF16 layout."""
    base = s.nvlink_one_sided_layout(2, 1024, 4096, 4)
    layout = s.with_lamport_regions(base, 8, s.LAMPORT_FORMATS["BF16"], 4096)
    assert layout[:24] == base[:24] and layout.workspace_size == 34_049_536
    assert layout[25:] == (8, 0, 4096, 33_654_272, 33_654_528, 33_786_368, 33_917_440, 132_096)
    row = s.lamport_row_bytes(s.LAMPORT_FORMATS["NVFP4"], 7168)
    assert row == (3584, 448, 448)
    assert s.lamport_dispatch_blocks_per_token(row) == 2
    assert s.lamport_bytes_per_row(8, row, 7168) == 22_560
    with pytest.raises(RuntimeError) as info:
        s.with_lamport_regions(layout, 8, 0, 4096)
    assert str(info.value) == (
        "Check failed: layout[LAMPORT_MAX_NUM_TOKENS_INDEX] == 0 (8 vs. 0) : "
        "The workspace layout already has Lamport regions"
    )
    with pytest.raises(RuntimeError, match=r"Lamport NVFP4 rows need hidden_size % 256 == 0, got 100$"):
        s.lamport_row_bytes(s.LAMPORT_FORMATS["NVFP4"], 100)
    with pytest.raises(ValueError, match=r"^Unknown Lamport payload format 9$"):
        s.lamport_row_bytes(9, 4096)


@pytest.mark.parametrize(
    ("ep", "tokens", "hidden", "top_k", "fmt", "expected"),
    [
        (2, 1024, 4096, 4, None, 33_654_272),
        (2, 1024, 4096, 4, "NVFP4", 21_595_648),
        (2, 256, 7168, 8, "NVFP4", 9_455_104),
        (4, 2048, 7168, 8, "NVFP4", 151_127_552),
        (8, 8192, 7168, 8, None, 1_883_768_320),
    ],
)
def test_upstream_notes_table(ep: int, tokens: int, hidden: int, top_k: int, fmt: str | None, expected: int) -> None:
    """The notes' computed per-rank sizes (NVLinkOneSidedAlltoAll path, no CFT, no Lamport)."""
    assert s.nvlink_one_sided_layout(ep, tokens, hidden, top_k, dispatch_format=fmt).workspace_size == expected


def test_layout_checks_have_flashinfers_text() -> None:
    with pytest.raises(RuntimeError) as info:
        s.workspace_layout(257, 16, 2, 1, 1)
    assert str(info.value) == "Check failed: (epSize > 0 && epSize <= tl::kMaxRanks) is false: Invalid EP size: 257"
    with pytest.raises(RuntimeError) as info:
        s.workspace_layout(2, 16, 23, 1, 1)
    assert str(info.value) == "Check failed: (topK > 0 && topK <= tl::kMaxTopK) is false: Invalid top_k: 23"
    with pytest.raises(RuntimeError) as info:
        s.workspace_layout(2, 16, 2, 1, 1, combine_recv_bytes=16)
    assert str(info.value) == (
        "Check failed: (canUseCft || combineRecvBytes == 0) is false: A combine receive payload requires CFT support"
    )


def test_dispatch_and_combine_capacity() -> None:
    """NVFP4-sized workspace (ep 2, T 256, hidden 4096, top_k 2), then a bf16 layer's payloads."""
    layout = s.nvlink_one_sided_layout(2, 256, 4096, 2, dispatch_format="NVFP4")
    # 2*256*(2048 + 256 + 16) + 1024 = 1,188,864
    assert layout.dispatch_payload_size == 1_188_864
    bf16 = s.check_dispatch(layout, 256, [8192, 8, 8])
    # each buffer 128-aligned: 4,194,304 + 4096 + 4096
    assert (bf16.need, bf16.capacity, bf16.fits) == (4_202_496, 1_188_864, False)
    assert bf16.message == (
        "Check failed: (currentOffset <= static_cast<size_t>(recvRegionOffset + recvRegionSize)) is false: "
        "Dispatch payload exceeds its workspace capacity: need 4202496 bytes, capacity 1188864"
    )
    offset = layout.dispatch_payload_offset
    assert bf16.recv_offsets == (offset, offset + 4_194_304, offset + 4_198_400)
    small = s.check_dispatch(layout, 64, [8192, 8, 8])
    assert (small.need, small.fits) == (1_050_624, True)  # 1,048,576 + 1024 + 1024
    odd = s.check_dispatch(layout, 3, [2048, 256, 8, 8])  # 12,288 + 1536 + 48 -> 128 + 48 -> 128
    assert odd.recv_offsets == (offset, offset + 12_288, offset + 13_824, offset + 13_952) and odd.need == 14_080
    fp32 = s.check_combine(layout, 256, 4096, 4)
    assert (fp32.need, fp32.capacity, fp32.fits) == (8_388_608, 4_194_304, False)
    assert fp32.message == (
        "Check failed: (payloadSize <= regionSize) is false: "
        "Combine payload exceeds its fixed workspace region: need 8388608 bytes, capacity 4194304"
    )
    assert s.check_combine(layout, 128, 4096, 4).fits


def test_python_side_messages() -> None:
    assert s.top_k_value_error(5) == (
        "NVLinkOneSidedAlltoAll supports top_k in (1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 18, 22), got 5"
    )
    assert s.runtime_tokens_value_error(300, 256) == "runtime_max_tokens_per_rank=300 must be in (0, 256]"
    assert s.runtime_tokens_message() == (
        "Check failed: (runtimeMaxTokensPerRank <= offsets[MAX_NUM_TOKENS_INDEX]) is false: "
        "runtimeMaxTokensPerRank exceeds the allocation-time token capacity"
    )
    assert s.dispatch_bytes_per_token(7168, "DeepSeekFp8") == 7168 + 4 * 56
    assert s.dispatch_bytes_per_token(4096, None, 4) == 16_384
    with pytest.raises(ValueError, match="dispatch_format='INT4' is not allowed"):
        s.dispatch_bytes_per_token(4096, "INT4")
    assert s.combine_recv_bytes(2, 8, 64, low_precision=True, cft_capable=True) == 1024
    assert s.combine_recv_bytes(2, 8, 64, cft_capable=False) == 0
