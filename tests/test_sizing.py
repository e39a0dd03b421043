"""FlashInfer's workspace arithmetic and host checks, against measured and source-derived numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_mnnvl.model import sizing
from pytest_mnnvl.model.layers import LayerSpec, QuantFormat
from pytest_mnnvl.model.sizing import (
    WorkspaceGeometry,
    align,
    aux_offsets,
    aux_size,
    check_combine,
    check_dispatch,
    check_round_trip,
    smallest_failing_runtime_tokens,
    workspace_size_per_rank,
)

GOLDEN = json.loads((Path(__file__).parent / "golden" / "flashinfer_host_checks.json").read_text())
COMBINE_MSG = (
    "Check failed: (combinePayloadOffset >= 0 && combinePayloadOffset + payloadBytes <= sizePerRank) "
    "is false: workspace insufficient for combine payload region"
)
H = 4096


def golden_str(name: str, args: list[int]) -> str | None:
    """What Python saw when the check statement cut from FlashInfer's .cu ran with ``args``."""
    return next(c["str"] for c in GOLDEN["checks"] if c["name"] == name and c["args"] == args)


# ---- Hand examples, T=256, H=4096, top_k=2 (measured on 2xH100 / 4xH100) -------------------------


def test_aux_size_hand_example() -> None:
    assert aux_size(2, 256) == 45_440


@pytest.mark.parametrize(
    ("ep", "quant", "expected"),
    [
        (2, "nvfp4", 5_427_584),
        (2, "bf16", 8_442_240),
        (4, "nvfp4", 10_809_728),
        (4, "bf16", 16_839_040),
    ],
)
def test_workspace_size_measured(ep: int, quant: str, expected: int) -> None:
    layer = LayerSpec(QuantFormat(quant), H, top_k=2, num_experts=8, max_num_tokens=256)
    assert layer.need(ep) == expected
    assert sizing.need(layer, ep) == expected
    assert workspace_size_per_rank(ep, 256, layer.dispatch_bytes_per_token, layer.combine_bytes_per_token) == expected


def test_the_bug_nvfp4_workspace_then_bf16_layer() -> None:
    """The field failure (NVFP4 workspace, then a bf16 layer): dispatch passes, combine fails with FlashInfer's text."""
    nvfp4 = LayerSpec("nvfp4", H, 2, 8, 256)  # type: ignore[arg-type]
    bf16 = LayerSpec("bf16", H, 2, 8, 256)  # type: ignore[arg-type]
    geometry = WorkspaceGeometry(2, 256, nvfp4.need(2))
    assert geometry.size_per_rank == 5_427_584
    trip = bf16.check_round_trip(geometry)
    assert trip.dispatch.fits
    assert trip.failed_stage == "combine"
    assert trip.error == COMBINE_MSG
    with pytest.raises(RuntimeError) as info:
        trip.combine.raise_for_failure()
    assert str(info.value) == COMBINE_MSG
    trip.dispatch.raise_for_failure()  # passes: no exception


# ---- Worked example of the combinePayloadOffset check (ep=2, T=256, H=4096, top_k=8) --------------


@pytest.fixture
def table_geometry() -> WorkspaceGeometry:
    return WorkspaceGeometry.sized_for(2, 256, H // 2 + H // 16 + 8 * 4 + 8 * 4, 2 * H)


def test_worked_example_size(table_geometry: WorkspaceGeometry) -> None:
    assert table_geometry.size_per_rank == 5_452_160
    assert table_geometry.payload_offset == 45_440


@pytest.mark.parametrize(
    ("quant", "dispatch_need", "dispatch_ok", "combine_offset", "combine_need", "combine_ok"),
    [
        ("nvfp4", 1_257_856, True, 1_257_856, 5_452_160, True),  # exactly full
        ("bf16", 4_272_512, True, 4_272_512, 8_466_816, False),
    ],
)
def test_worked_example_table(
    table_geometry: WorkspaceGeometry,
    quant: str,
    dispatch_need: int,
    dispatch_ok: bool,
    combine_offset: int,
    combine_need: int,
    combine_ok: bool,
) -> None:
    layer = LayerSpec(QuantFormat(quant), H, 8, 8, 256)
    trip = layer.check_round_trip(table_geometry, 256)
    assert trip.dispatch.required_size == dispatch_need
    assert trip.dispatch.fits is dispatch_ok
    assert trip.dispatch.combine_payload_offset == combine_offset
    assert trip.combine.combine_payload_offset == combine_offset
    assert trip.combine.payload_bytes == 2 * 256 * 2 * H
    assert trip.combine.required_size == combine_need
    assert trip.combine.fits is combine_ok
    assert trip.fits is combine_ok


def test_dispatch_regions_back_to_back(table_geometry: WorkspaceGeometry) -> None:
    layer = LayerSpec(QuantFormat.NVFP4, H, 8, 8, 256)
    d = table_geometry.check_dispatch(256, layer.dispatch_payload_bytes_per_token)
    assert d.payload_bytes == (2 * 256 * 2048, 2 * 256 * 256, 2 * 256 * 32, 2 * 256 * 32)
    assert d.payload_offsets[0] == 45_440
    for start, size, nxt in zip(d.payload_offsets, d.payload_bytes, d.payload_offsets[1:], strict=False):
        assert start + size == nxt  # no padding between payloads
    assert d.required_size == d.payload_offsets[-1] + d.payload_bytes[-1]
    assert d.total_payload_bytes == sum(d.payload_bytes)
    assert d.shortfall == 0


def test_combine_offset_is_aligned_up() -> None:
    d = check_dispatch(1, 1, [3], 10_000, 128)
    assert d.required_size == 131
    assert d.combine_payload_offset == 256


# ---- runtime token count: a smaller batch passes where a full batch fails -------------------------


def test_combine_fails_only_at_large_runtime_tokens(table_geometry: WorkspaceGeometry) -> None:
    bf16 = LayerSpec(QuantFormat.BF16, H, 8, 8, 256)
    first = smallest_failing_runtime_tokens(bf16, table_geometry)
    assert first is not None and 1 < first < 256
    assert bf16.check_round_trip(table_geometry, first - 1).fits
    failing = bf16.check_round_trip(table_geometry, first)
    assert failing.dispatch.fits and failing.failed_stage == "combine"
    assert bf16.check_round_trip(table_geometry, 1).fits
    assert sizing.first_failing_round_trip(bf16, table_geometry) == failing
    assert smallest_failing_runtime_tokens(bf16, table_geometry, up_to=first - 1) is None


def test_no_failure_when_layer_fits(table_geometry: WorkspaceGeometry) -> None:
    nvfp4 = LayerSpec(QuantFormat.NVFP4, H, 8, 8, 256)
    assert smallest_failing_runtime_tokens(nvfp4, table_geometry) is None
    assert sizing.first_failing_round_trip(nvfp4, table_geometry) is None
    assert smallest_failing_runtime_tokens(nvfp4, table_geometry, up_to=0) is None


def test_dispatch_failure_found_first() -> None:
    layer = LayerSpec(QuantFormat.BF16, H, 8, 8, 256)
    geometry = WorkspaceGeometry(2, 256, aux_size(2, 256) + 100)
    assert smallest_failing_runtime_tokens(layer, geometry) == 1
    trip = layer.check_round_trip(geometry, 1)
    assert trip.failed_stage == "dispatch"
    assert trip.error == trip.dispatch.message


@pytest.mark.parametrize(
    ("quant", "sized_as", "ep", "max_tokens"),
    [
        ("bf16", "nvfp4", 2, 64),
        ("bf16", "mxfp8", 4, 48),
        ("fp8_block", "nvfp4", 3, 40),
        ("mxfp8", "nvfp4", 2, 33),
        ("bf16", "fp8_block", 8, 17),
    ],
)
def test_checks_are_monotone_and_bisection_exact(quant: str, sized_as: str, ep: int, max_tokens: int) -> None:
    """Brute force: once a round trip fails at some token count it fails at every larger one."""
    hidden = 1024
    layer = LayerSpec(QuantFormat(quant), hidden, 2, 64, max_tokens)
    small = LayerSpec(QuantFormat(sized_as), hidden, 2, 64, max_tokens)
    for slack in (0, 1, 127, 128, 4096, 50_000):
        geometry = WorkspaceGeometry(ep, max_tokens, small.need(ep) + slack)
        verdicts = [layer.check_round_trip(geometry, t).fits for t in range(1, max_tokens + 1)]
        first = next((t for t, ok in enumerate(verdicts, 1) if not ok), None)
        assert all(not ok for ok in verdicts[(first or max_tokens + 1) - 1 :])
        assert smallest_failing_runtime_tokens(layer, geometry) == first


# ---- exact texts, checked against the statements compiled from FlashInfer's .cu -----------------


def test_golden_file_provenance() -> None:
    assert GOLDEN["flashinfer_version"] == "0.7.2.post1"
    assert all(c["type"] in (None, "RuntimeError") for c in GOLDEN["checks"])


def test_dispatch_message_matches_flashinfer() -> None:
    d = check_dispatch(2, 256, [8192, 32, 32], 4_000_000, 45_440)
    assert not d.fits and d.required_size == 45_440 + 4_227_072
    assert d.message == golden_str("dispatch_size", [45440, 4227072, 4000000])
    assert d.message == (
        "Check failed: (sizePerRank >= requiredSize) is false: "
        "workspace size per rank insufficient, need 4272512 bytes but has 4000000"
    )
    assert d.error == d.message
    assert d.shortfall == 272_512
    with pytest.raises(RuntimeError, match="need 4272512 bytes but has 4000000"):
        d.raise_for_failure()


def test_dispatch_that_fits_has_no_error() -> None:
    d = check_dispatch(2, 256, [2048, 256, 32, 32], 5_452_160, 45_440)
    assert golden_str("dispatch_size", [45440, 1212416, 5452160]) is None
    assert d.fits and d.error is None


@pytest.mark.parametrize(("offset", "payload", "size"), [(4272512, 4194304, 5452160), (-128, 4, 5452160)])
def test_combine_message_matches_flashinfer(offset: int, payload: int, size: int) -> None:
    c = check_combine(1, 1, payload, size, offset)
    assert not c.fits
    assert c.payload_bytes == payload
    assert c.message == golden_str("combine_size", [offset, payload, size]) == COMBINE_MSG


def test_combine_exactly_full_fits() -> None:
    c = check_combine(2, 256, 8192, 5_452_160, 1_257_856)
    assert c.fits and c.required_size == c.size_per_rank and c.error is None and c.shortfall == 0


DISPATCH_ARG_CASES: list[tuple[dict[str, Any], str, list[int]]] = [
    ({"num_payloads": 7}, "too_many_payloads", [7]),
    ({"num_payloads": 0}, "too_many_payloads", [0]),
    ({"ep_size": 65, "num_experts": 64}, "scalar_args", [65, 0, 1, 64, 2]),
    ({"ep_rank": 2}, "scalar_args", [2, 2, 1, 8, 2]),
    ({"runtime_max_tokens_per_rank": 0}, "scalar_args", [2, 0, 0, 8, 2]),
    ({"ep_size": 4, "num_experts": 2}, "scalar_args", [4, 0, 1, 2, 2]),
    ({"top_k": 23}, "scalar_args", [2, 0, 1, 8, 23]),
]


@pytest.mark.parametrize(("overrides", "golden_fn", "golden_args"), DISPATCH_ARG_CASES)
def test_dispatch_argument_messages(overrides: dict[str, Any], golden_fn: str, golden_args: list[int]) -> None:
    args: dict[str, Any] = {
        "ep_size": 2,
        "runtime_max_tokens_per_rank": 1,
        "top_k": 2,
        "num_experts": 8,
        "num_payloads": 4,
    }
    args.update(overrides)
    message = sizing.dispatch_argument_error(**args)
    assert message is not None
    assert message == golden_str(golden_fn, golden_args)


def test_dispatch_argument_ok_and_local_tokens() -> None:
    ok = {"ep_size": 2, "runtime_max_tokens_per_rank": 1, "top_k": 2, "num_experts": 8, "num_payloads": 4}
    assert sizing.dispatch_argument_error(**ok) is None  # type: ignore[arg-type]
    assert sizing.dispatch_argument_error(**ok, local_num_tokens=-1) == (  # type: ignore[arg-type]
        "Check failed: (localNumTokens >= 0) is false: local_num_tokens must be non-negative"
    )


@pytest.mark.parametrize(
    ("stats", "reserved", "expected"),
    [
        (0, 0, "Check failed: (eplbStatsNumExperts > 0) is false: eplb_local_stats must not be empty"),
        (
            9,
            9,
            "Check failed: (eplbStatsNumExperts <= numExperts) is false: eplb_local_stats size must be <= num_experts",
        ),
        (
            8,
            0,
            "Check failed: (gatheredEnd <= offsets[fi_throughput::PAYLOAD_DATA_OFFSET_INDEX]) is false: "
            "eplb_local_stats size (8) exceeds the eplb_stats_num_experts reserved at initialize time",
        ),
        (8, 8, None),
    ],
)
def test_dispatch_eplb_messages(stats: int, reserved: int, expected: str | None) -> None:
    # ep=2, T=1: the EPLB region starts at 256 and the payload at 256 + align(8*reserved).
    message = sizing.dispatch_argument_error(
        2, 1, 2, 8, 4, eplb_local_stats_num_experts=stats, offsets=aux_offsets(2, 1, reserved)
    )
    assert message == expected


def test_dispatch_eplb_needs_offsets() -> None:
    with pytest.raises(ValueError, match="offsets"):
        sizing.dispatch_argument_error(2, 1, 2, 8, 4, eplb_local_stats_num_experts=4)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"ep_size": 0, "top_k": 2},
            "Check failed: (epSize > 0 && epSize <= tl_throughput::kMaxRanks) is false: "
            "epSize must be in the range (0, 64]",
        ),
        ({"ep_size": 2, "top_k": 2, "ep_rank": -1}, "Check failed: (epRank >= 0 && epRank < epSize) is false: "),
        ({"ep_size": 2, "top_k": 0}, "Check failed: (topK > 0 && topK <= tl_throughput::kMaxTopK) is false: "),
        ({"ep_size": 2, "top_k": 2, "local_num_tokens": -1}, "Check failed: (localNumTokens >= 0) is false: "),
        ({"ep_size": 2, "top_k": 2}, None),
    ],
)
def test_combine_argument_messages(kwargs: dict[str, Any], expected: str | None) -> None:
    assert sizing.combine_argument_error(**kwargs) == expected


def test_misaligned_payload_message() -> None:
    # NVFP4 with H=16 packs 8 + 1 bytes per token before the int32 ids: misaligned at one row.
    layer = LayerSpec(QuantFormat.NVFP4, 16, 1, 4, 8)
    args = (layer.dispatch_payload_bytes_per_token, layer.dispatch_payload_element_sizes)
    message = sizing.misaligned_payload_error(1, 1, *args)
    assert message == golden_str("misaligned", [9, 4, 2])
    assert message is not None and "Misaligned payload buffer 2 with element size 4" in message
    assert sizing.misaligned_payload_error(1, 4, *args) is None
    big = LayerSpec(QuantFormat.NVFP4, H, 8, 8, 256)
    assert (
        sizing.misaligned_payload_error(
            2, 255, big.dispatch_payload_bytes_per_token, big.dispatch_payload_element_sizes
        )
        is None
    )


def test_misaligned_payload_length_mismatch() -> None:
    with pytest.raises(ValueError, match="payload_element_sizes"):
        sizing.misaligned_payload_error(1, 1, [4, 4], [4])


def test_python_side_texts() -> None:
    assert sizing.RUNTIME_TOKENS_EXCEED_MAX == "runtime_max_tokens_per_rank exceeds max_num_tokens"
    assert sizing.DISPATCH_TWICE == "dispatch called twice without combine"
    assert sizing.check_failed_message("x > 0") == "Check failed: (x > 0) is false: "


# ---- aux offsets: the 112-point grid from FlashInfer's own calculateOffsets ----------------------


def test_aux_grid_matches_flashinfer() -> None:
    grid = GOLDEN["aux_grid"]
    assert len(grid) == 112
    for point in grid:
        offsets = aux_offsets(point["ep"], point["max_num_tokens"], point["eplb_stats_num_experts"])
        assert list(offsets) == point["offsets"], point


def test_aux_grid_self_consistent() -> None:
    """Independent closed form: each region's start is the aligned end of the previous one."""
    for point in GOLDEN["aux_grid"]:
        ep, t, eplb = point["ep"], point["max_num_tokens"], point["eplb_stats_num_experts"]
        offsets = aux_offsets(ep, t, eplb)
        sizes = [4, 4, 4 * ep, 4 * ep, 4 * ep, 4 * ep, 88 * t, 88 * t, 4 * ep * eplb]
        aligned_before = {4, 5, 6, 7, 8, 9}  # regions that start on a 128-byte boundary
        end = 0
        for index, size in enumerate(sizes):
            start = align(end) if index in aligned_before else end
            assert offsets[index] == start
            end = start + size
        assert offsets.payload_data == align(end) == aux_size(ep, t, eplb)
        assert len(offsets) == sizing.NUM_METAINFO_FIELDS == len(sizing.METAINFO_INDEX_NAMES)
        ws = workspace_size_per_rank(ep, t, 100, 30, eplb)
        assert ws == offsets.payload_data + align(ep * t * 100) + align(ep * t * 30)


# ---- input validation names the field ------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: check_dispatch(0, 1, [1], 10, 0), "ep_size"),
        (lambda: check_dispatch(1, -1, [1], 10, 0), "runtime_max_tokens_per_rank"),
        (lambda: check_dispatch(1, 1, [1, -2], 10, 0), r"payload_bytes_per_token\[1\]"),
        (lambda: check_dispatch(1, 1, "12", 10, 0), "payload_bytes_per_token"),  # type: ignore[arg-type]
        (lambda: check_dispatch(1, 1, [1], True, 0), "size_per_rank"),
        (lambda: check_dispatch(1, 1, [1], 10, -1), "payload_offset"),
        (lambda: check_combine(1, 1, -1, 10, 0), "combine_bytes_per_token"),
        (lambda: check_combine(1, 1, 1, 10, 1.5), "combine_payload_offset"),  # type: ignore[arg-type]
        (lambda: WorkspaceGeometry(65, 1, 10), "ep_size"),
        (lambda: WorkspaceGeometry(2, 0, 10), "max_num_tokens"),
        (lambda: WorkspaceGeometry(2, 1, -1), "size_per_rank"),
        (lambda: WorkspaceGeometry(2, 1, 10, -1), "eplb_stats_num_experts"),
        (lambda: sizing.need(LayerSpec(QuantFormat.BF16, 8, 1, 1, 1), 0), "ep_size"),
        (
            lambda: smallest_failing_runtime_tokens(
                LayerSpec(QuantFormat.BF16, 8, 1, 1, 1), WorkspaceGeometry(1, 1, 10), up_to=-1
            ),
            "up_to",
        ),
    ],
)
def test_bad_input_names_field(call: Any, field: str) -> None:
    with pytest.raises(ValueError, match=field) as info:
        call()
    assert "is not allowed" in str(info.value)


def test_round_trip_function_matches_geometry(table_geometry: WorkspaceGeometry) -> None:
    layer = LayerSpec(QuantFormat.BF16, H, 8, 8, 256)
    direct = check_round_trip(2, 200, layer.dispatch_payload_bytes_per_token, 2 * H, 5_452_160, 45_440)
    assert direct == table_geometry.check_round_trip(200, layer.dispatch_payload_bytes_per_token, 2 * H)


def test_modules_import_no_heavy_packages() -> None:
    code = (
        "import sys, pytest_mnnvl.model.sizing, pytest_mnnvl.model.layers\n"
        "bad = [m for m in ('torch', 'flashinfer', 'hypothesis') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
