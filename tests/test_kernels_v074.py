"""The 0.7.4 op twin on its own, in the test process: no ranks, no FlashInfer import.

A workspace here is a plain CPU tensor; "ranks" are either one (flags to itself) or threads sharing
the tensor, which is all the kernels need. Texts come from ``nvlink_one_sided_alltoall.cu``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from pytest_mnnvl.backends import _kernels_v074 as k074
from pytest_mnnvl.model import sizing_v074 as lay

MODULE = k074.SimNvlinkOneSidedModule()


def _workspace(ep: int, row: int) -> torch.Tensor:
    """``[ep, row]`` uint8 rows on 256-byte boundaries (as MnnvlMemory's are)."""
    row = lay.align(row, 256)
    buf = torch.zeros(ep * row + 256, dtype=torch.uint8)
    start = (-buf.data_ptr()) % 256
    return buf[start : start + ep * row].view(ep, row)


def _metainfo(layout: lay.WorkspaceLayout) -> torch.Tensor:
    return torch.tensor(list(layout), dtype=torch.int64)


def _message(fn: Callable[[], Any]) -> str:
    with pytest.raises(Exception) as info:  # the type and text are compared by the caller
        fn()
    return f"{type(info.value).__name__}: {info.value}"


def _dispatch(tse: torch.Tensor, payloads: list[torch.Tensor], ws: torch.Tensor, meta: torch.Tensor, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "runtime": tse.size(0),
        "rank": 0,
        "ep": ws.size(0),
        "top_k": tse.size(1),
        "experts": 8,
        "stats": None,
        "cft": False,
        "ids_index": -1,
        "invalid": -1,
        "lamport": False,
        "mask_on": False,
        "mask": None,
        "timeout": 300,
    }
    args.update(kw)
    return MODULE.moe_a2a_dispatch(
        tse, payloads, ws, meta, args["runtime"], args["rank"], args["ep"], args["top_k"], args["experts"],
        args["stats"], args["cft"], args["ids_index"], args["invalid"], args["lamport"], args["mask_on"],
        args["mask"], args["timeout"], False,
    )  # fmt: skip


def _combine(payload: torch.Tensor, local: int, ws: torch.Tensor, meta: torch.Tensor, **kw: Any) -> torch.Tensor:
    args: dict[str, Any] = {
        "runtime": payload.size(1),
        "rank": 0,
        "top_k": 2,
        "offset": int(meta[15]),
        "in_ws": False,
        "low": False,
        "cft": False,
        "mask_on": False,
        "mask": None,
        "output": None,
        "timeout": 300,
        "lamport": False,
    }
    args.update(kw)
    output = args["output"] if args["output"] is not None else torch.empty(local, payload.size(2), dtype=payload.dtype)
    MODULE.moe_a2a_combine(
        payload, local, ws, meta, args["runtime"], args["rank"], ws.size(0), args["top_k"], args["offset"],
        args["in_ws"], args["low"], args["cft"], args["mask_on"], args["mask"], output, args["timeout"], False,
        args["lamport"],
    )  # fmt: skip
    return output


def _single_rank(
    tokens: int = 8, hidden: int = 64, top_k: int = 2
) -> tuple[lay.WorkspaceLayout, torch.Tensor, torch.Tensor]:
    layout = lay.nvlink_one_sided_layout(1, tokens, hidden, top_k)
    ws = _workspace(1, layout.workspace_size)
    meta = _metainfo(layout)
    MODULE.moe_a2a_initialize(ws, meta, 0, 1)
    return layout, ws, meta


def test_layout_ops_and_index_pairs() -> None:
    meta = torch.empty(lay.NUM_METAINFO_FIELDS, dtype=torch.int64)
    MODULE.moe_a2a_get_workspace_layout(2, 1024, 4, 16_842_752 + 1024, 16_777_216, 0, 0, False, meta)
    assert meta.tolist() == list(lay.nvlink_one_sided_layout(2, 1024, 4096, 4))
    assert _message(lambda: MODULE.moe_a2a_get_workspace_layout(2, 8, 2, 1, 1, 0, 0, False, meta.int())) == (
        "RuntimeError: Check failed: metainfo.dtype() == dl_int64 (int32 vs. int64) : "
        "Inconsistency of Tensor type: metainfo"
    )
    names, values = MODULE.moe_a2a_get_metainfo_index_pairs()
    pairs = dict(zip(names, values, strict=True))
    assert len(names) == 33 + 5 + 9
    assert names[:2] == ["MOE_A2A_FLAG_VAL_OFFSET_INDEX", "MOE_A2A_LOCAL_TOKEN_COUNTER_OFFSET_INDEX"]
    assert pairs["MOE_A2A_COMBINE_INPUT_OFFSET_INDEX"] == 15 and pairs["MOE_A2A_WORKSPACE_SIZE_INDEX"] == 24
    assert (pairs["MOE_A2A_NUM_METAINFO_FIELDS"], pairs["MOE_A2A_MAX_RANKS"], pairs["MOE_A2A_MAX_PAYLOADS"]) == (
        33,
        256,
        4,
    )
    assert pairs["MOE_A2A_LAMPORT_FORMAT_NVFP4"] == 3 and pairs["MOE_A2A_LAMPORT_IDS_SENTINEL"] == -2004318072
    assert MODULE.moe_a2a_lamport_row_bytes(3, 7168, 8) == [3584, 448, 2, 22_560]
    assert MODULE.moe_a2a_lamport_available() is False


def test_initialize_clears_the_row_and_arms_the_receive_banks() -> None:
    layout = lay.nvlink_one_sided_layout(2, 8, 64, 2)
    ws = _workspace(2, layout.workspace_size + 512)
    ws.fill_(7)
    meta = _metainfo(layout)
    MODULE.moe_a2a_initialize(ws, meta, 1, 2)
    recv = layout.recv_counters_offset
    assert ws[1, recv : recv + 16].tolist() == [0xFF] * 16  # [2][ep] int32 = -1
    assert int(ws[1, : layout.workspace_size].ne(0).sum()) == 16
    assert ws[1, layout.workspace_size :].eq(7).all() and ws[0].eq(7).all()  # only its own layout bytes
    bad = meta.clone()
    bad[16] += 256  # a combine capacity no layout call produced
    assert _message(lambda: MODULE.moe_a2a_initialize(ws, bad, 0, 2)) == (
        "RuntimeError: Check failed: (layout == expected) is false: Workspace layout metadata is inconsistent"
    )
    small = _workspace(2, layout.workspace_size - 256)
    assert _message(lambda: MODULE.moe_a2a_initialize(small, meta, 0, 2)) == (
        "RuntimeError: Check failed: (workspace.size(1) >= layout[WORKSPACE_SIZE_INDEX]) is false: "
        f"Workspace needs {layout.workspace_size} bytes per rank, got {small.size(1)}"
    )
    assert _message(lambda: MODULE.moe_a2a_initialize(ws, meta, 0, 4)) == (
        "RuntimeError: Check failed: (workspace.ndim() == 2 && workspace.size(0) == epSize && "
        "workspace.stride(1) == 1) is false: workspace must have shape [ep_size, bytes_per_rank] with "
        "contiguous rank slices"
    )


def test_single_rank_rounds_parity_and_sanitize() -> None:
    """Two rounds on one rank: relative offsets, invalid ids go nowhere, the two receive banks alternate."""
    layout, ws, meta = _single_rank()
    x = torch.randn(8, 64).to(torch.bfloat16)
    ids = torch.tensor([[0, 1], [2, -1], [9, 9], [3, 3], [4, 5], [6, 7], [-5, 0], [1, 2]], dtype=torch.int32)
    offsets, combine_offset, eplb = _dispatch(ids, [x, ids], ws, meta)
    assert offsets == [layout.dispatch_payload_offset, layout.dispatch_payload_offset + 8 * 128]
    assert (combine_offset, eplb) == (layout.combine_input_offset, -1)
    banks = ws[0, layout.recv_counters_offset : layout.recv_counters_offset + 8].view(torch.int32).tolist()
    assert banks == [7, -1]  # token 2 has only invalid experts: 7 tokens sent, bank 0 (round parity 0)
    recv_ids = ws[0, offsets[1] : offsets[1] + 8 * 8].view(torch.int32).view(1, 8, 2).clone()
    MODULE.moe_a2a_sanitize_expert_ids(recv_ids, ws, meta, 0, -1, False)
    assert recv_ids[0, 7].tolist() == [-1, -1]
    assert recv_ids[0, :7].tolist() == ids[[0, 1, 3, 4, 5, 6, 7]].tolist()  # received in token order
    y = _combine(torch.ones(1, 8, 64, dtype=torch.bfloat16), 8, ws, meta)
    assert y[:, 0].tolist() == [1, 1, 0, 1, 1, 1, 1, 1]
    _dispatch(ids[:3], [x[:3], ids[:3]], ws, meta, runtime=8)
    banks = ws[0, layout.recv_counters_offset : layout.recv_counters_offset + 8].view(torch.int32).tolist()
    assert banks == [-1, 2]  # round 2: parity 1; dispatch re-armed bank 0
    assert ws[0, :4].view(torch.int32).item() == 3  # flag: 2N+1 at the second dispatch


def test_single_rank_combine_paths() -> None:
    """Staged, zero-copy and FP8 (saturating) combines give the same sums of what the experts returned."""
    _, ws, meta = _single_rank()
    x = (torch.randn(8, 64) * 100).to(torch.bfloat16)
    x[0, 0] = 1000.0  # above e4m3's 448: saturates
    ids = torch.tensor([[0, 4]] * 8, dtype=torch.int32)
    region = int(meta[15])
    for in_workspace in (False, True):
        for low in (False, True):
            _dispatch(ids, [x, ids], ws, meta)
            if in_workspace:
                payload = ws[0, region : region + 8 * 64 * 2].view(torch.bfloat16).view(1, 8, 64)
                payload.copy_(x.view(1, 8, 64))
            else:
                payload = x.view(1, 8, 64).clone()
            y = _combine(payload, 8, ws, meta, in_ws=in_workspace, low=low)
            want = x.float().clamp(-448, 448).to(torch.float8_e4m3fn).float() if low else x.float()
            assert torch.equal(y.float(), want), (in_workspace, low)


def test_dispatch_and_combine_checks_have_flashinfers_text() -> None:
    _, ws, meta = _single_rank()
    x = torch.randn(8, 64).to(torch.bfloat16)
    ids = torch.zeros(8, 2, dtype=torch.int32)
    odd = torch.zeros(8 * 16 + 1, dtype=torch.uint8)[1:].view(8, 16)
    one_word = torch.ones(1, dtype=torch.uint64)
    cases: list[tuple[Callable[[], Any], str]] = [
        (
            lambda: _dispatch(ids, [x] * 5, ws, meta),
            "(numPayloads <= tl::kMaxPayloads) is false: Too many input payloads",
        ),
        (
            lambda: _dispatch(ids, [odd], ws, meta),
            "(reinterpret_cast<uintptr_t>(payload.data_ptr()) % 16 == 0) is false: payload must be 16-byte aligned",
        ),
        (
            lambda: _dispatch(ids[:, :1].contiguous(), [x], ws, meta, top_k=1),
            "(epSize == offsets[EP_SIZE_INDEX] && topK == offsets[TOP_K_INDEX]) is false: "
            "Dispatch EP size/top_k differs from its workspace layout",
        ),
        (
            lambda: _dispatch(ids, [x], ws, meta, top_k=4),
            "tokenSelectedExperts.size(1) == topK (2 vs. 4) : tokenSelectedExperts must have topK columns",
        ),
        (
            lambda: _dispatch(ids, [x], ws, meta, cft=True),
            "(!useCftCountedWrites || offsets[CFT_ENABLED_INDEX]) is false: "
            "Workspace was allocated without CFT support",
        ),
        (
            lambda: _dispatch(ids, [x], ws, meta, lamport=True),
            "(!useLamport || offsets[LAMPORT_MAX_NUM_TOKENS_INDEX] > 0) is false: "
            "Workspace was allocated without Lamport regions",
        ),
        (
            lambda: _dispatch(ids, [x], ws, meta, mask_on=True, mask=one_word),
            "t.size(0) == tl::kRankMaskWords (1 vs. 4) : active_rank_mask must have exactly 4 uint64 elements",
        ),
        (
            lambda: _dispatch(ids, [x], ws, meta, mask=torch.ones(4, dtype=torch.uint64)),
            "(!hasActiveRankMask(activeRankMask)) is false: active_rank_mask requires enable_rank_mask=True",
        ),
        (
            lambda: _dispatch(ids, [x], ws, meta, timeout=0),
            "(timeoutSec > 0 && timeoutSec <= kMaxTimeoutSec) is false: "
            "MoE all-to-all timeout must be in 1..86400 seconds",
        ),
    ]
    for call, text in cases:
        assert _message(call) == f"RuntimeError: Check failed: {text}"
    assert ws[0, :4].view(torch.int32).item() == 0  # no check reached a kernel
    _dispatch(ids, [x, ids], ws, meta)
    ones = torch.ones(1, 8, 64, dtype=torch.bfloat16)
    region = int(meta[15])
    combine_cases: list[tuple[Callable[[], Any], str]] = [
        (
            lambda: _combine(ones, 8, ws, meta, offset=region + 256),
            "RuntimeError: Check failed: combinePayloadOffset == offsets[COMBINE_INPUT_OFFSET_INDEX] "
            f"({region + 256} vs. {region}) : combinePayloadOffset must address the fixed combine source region",
        ),
        (
            lambda: _combine(ones, 8, ws, meta, in_ws=True),
            "RuntimeError: Check failed: (!payloadInWorkspace || inputIsWorkspace) is false: "
            "payload_in_workspace is true but payload does not address the combine input region",
        ),
        (lambda: _combine(ones.to(torch.float8_e4m3fn), 8, ws, meta), "TypeError: Unsupported data type for payload"),
        (
            lambda: _combine(torch.ones(1, 8, 32), 8, ws, meta),
            "RuntimeError: Error in function 'moe_a2a_prepare_combine_launch' at moeAlltoAllKernels.cu: "
            "Unsupported dtype for moe_a2a_combine",
        ),
        (
            lambda: _combine(ones, 8, ws, meta, output=torch.empty(8, 64)),
            "RuntimeError: Check failed: (output.dtype() == payload.dtype()) is false: "
            "output dtype must match the payload dtype",
        ),
        (
            lambda: _combine(torch.ones(1, 9, 64, dtype=torch.bfloat16), 8, ws, meta),
            f"RuntimeError: {lay.runtime_tokens_message()}",
        ),
        (
            lambda: _combine(ones, 8, ws, meta, lamport=True),
            "RuntimeError: Check failed: (useLamport == isLamportRoundOpen(rankWorkSpacePtr)) is false: "
            "A Lamport combine needs a Lamport dispatch before it",
        ),
    ]
    for call, text in combine_cases:
        assert _message(call) == text
    assert ws[0, :4].view(torch.int32).item() == 1  # still the dispatch epoch: no combine kernel ran


def test_cft_is_the_stub_managers_and_lamport_regions_are_laid_out() -> None:
    layout = lay.nvlink_one_sided_layout(1, 8, 256, 2)
    meta = _metainfo(layout)
    MODULE.moe_a2a_lamport_extend_workspace_layout(meta, 4, 0, 256)
    extended = lay.WorkspaceLayout(*meta.tolist())
    assert extended == lay.with_lamport_regions(layout, 4, 0, 256)
    ws = _workspace(1, extended.workspace_size)
    MODULE.moe_a2a_initialize(ws, meta, 0, 1)
    assert (
        ws[0, extended.lamport_landing_offset].item() == 0xFF
        and ws[0, extended.lamport_combine_landing_offset].item() == 0xFF
    )
    ids = torch.zeros(4, 2, dtype=torch.int32)
    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    assert _message(lambda: _dispatch(ids, [x, ids], ws, meta, lamport=True)).startswith(
        "NotImplementedError: pytest-mnnvl sim: the Lamport kernels are not emulated"
    )
    assert MODULE.moe_a2a_cft_handle_bytes() == 0
    assert MODULE.moe_a2a_cft_create_endpoint(ws, 0, 4096, 0, 1, torch.empty(0, dtype=torch.uint8)) is False
    assert _message(lambda: MODULE.moe_a2a_cft_import_endpoints(ws, 0, torch.empty(0, dtype=torch.uint8))) == (
        "RuntimeError: Check failed: (g_cft_manager) is false: moe_a2a_cft_create_endpoint must succeed first"
    )
    assert _message(lambda: MODULE.moe_a2a_cft_release_endpoints(ws, 0)) == (
        "RuntimeError: Check failed: (g_cft_manager) is false: CFT endpoints are not initialized"
    )
    assert MODULE.moe_a2a_cft_destroy(ws, 0) is None


def test_four_threads_reduce_in_the_kernels_tree_order() -> None:
    """Four sources of one token: ((s0+s1)+(s2+s3)) in FP32 gives 1 here; a running sum would give 0."""
    ep, tokens, hidden, top_k = 4, 2, 16, 4
    layout = lay.nvlink_one_sided_layout(ep, tokens, hidden, top_k)
    ws = _workspace(ep, layout.workspace_size)
    meta = _metainfo(layout)
    values = [2.0**24, 1.0, 1.0, -(2.0**24)]  # what rank r's experts return
    results: dict[int, Any] = {}

    def rank(me: int) -> None:
        try:
            MODULE.moe_a2a_initialize(ws, meta, me, ep)
            barrier.wait()
            ids = torch.tensor([[0, 2, 4, 6]] * tokens, dtype=torch.int32)  # one expert on every rank
            x = torch.full((tokens, hidden), float(me), dtype=torch.bfloat16)
            _dispatch(ids, [x, ids], ws, meta, rank=me, ep=ep, top_k=top_k, experts=8)
            payload = torch.full((ep, tokens, hidden), values[me], dtype=torch.bfloat16)
            results[me] = _combine(payload, tokens, ws, meta, rank=me, top_k=top_k)
        except BaseException as exc:
            results[me] = exc

    barrier = threading.Barrier(ep)
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ep)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for me in range(ep):
        assert isinstance(results[me], torch.Tensor), results[me]
        assert results[me].float().unique().tolist() == [1.0]
