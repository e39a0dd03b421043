"""CPU tests pinned to what real FlashInfer did on H100s (committed GPU results)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pytest_mnnvl.model import sizing

ROOT = Path(__file__).resolve().parent.parent
SIZES = json.loads((ROOT / "tests/golden/flashinfer_sizes_h100.json").read_text())["points"]
#: GPU fidelity runs: 2x H100 (ep 2) and 4x H200 (ep 2 and 4), FlashInfer 0.7.2.post1.
FIDELITY_RUNS = {
    name: json.loads((ROOT / f"benchmarks/results/sim_fidelity-{name}.json").read_text())
    for name in ("h100x2", "h200x4")
}
CASES = [(name, case) for name, run in FIDELITY_RUNS.items() for case in run["cases"]]

# Bytes per token of each dispatch payload, per format, as the fidelity run sent them (MXFP8 scales of
# the hidden size padded to 128, as that run did).
PAYLOADS = {
    "bf16": lambda h: [2 * h],
    "nvfp4": lambda h: [h // 2, h // 16],
    "mxfp8": lambda h: [h, (h + 127) // 128 * 128 // 32],
    "fp8_block": lambda h: [h, h // 128 * 4],
}


@pytest.mark.parametrize("point", SIZES, ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items() if k != "flashinfer"))
def test_sizes_equal_flashinfers_measured_values(point: dict[str, Any]) -> None:
    if point["kind"] == "aux":
        assert sizing.aux_size(point["ep"], point["tokens"], point["eplb"]) == point["flashinfer"]
    else:
        got = sizing.workspace_size_per_rank(
            point["ep"], point["tokens"], point["dispatch_bytes"], point["combine_bytes"], point["eplb"]
        )
        assert got == point["flashinfer"]


@pytest.mark.parametrize(("run", "case"), CASES, ids=[f"{name}-ep{c['ep']}-case{c['index']}" for name, c in CASES])
def test_host_check_predictions_equal_real_outcomes(run: str, case: dict[str, Any]) -> None:
    """What FlashInfer raised on the GPUs (per rank) is what sizing predicts, message for message."""
    per_token = [*PAYLOADS[case["format"]](case["hidden"]), 4 * case["top_k"], 4 * case["top_k"]]
    check = sizing.check_round_trip(
        case["ep"],
        case["runtime_tokens"],
        per_token,
        2 * case["hidden"],
        case["workspace_size_per_rank"],
        sizing.aux_size(case["ep"], case["max_tokens"], case["eplb"]),
    )
    predicted_dispatch = None if check.dispatch.fits else check.dispatch.message
    predicted_combine = None if check.fits or not check.dispatch.fits else check.combine.message
    for rank_outcome in case["flashinfer"]:
        assert rank_outcome["dispatch"] == predicted_dispatch
        assert rank_outcome["combine"] == predicted_combine
        if predicted_dispatch is None and predicted_combine is None:
            assert rank_outcome["numerics_ok"] and rank_outcome["counts_ok"]


@pytest.mark.parametrize("run", sorted(FIDELITY_RUNS))
def test_the_gpu_run_exercised_both_failures(run: str) -> None:
    summary = FIDELITY_RUNS[run]["summary"]
    outcomes = summary["outcomes"]
    assert outcomes["dispatch"] >= 1 and outcomes["combine"] >= 1 and summary["disagreements"] == 0


def test_the_four_gpu_run_covered_ep_4_and_every_sizing_point_agreed() -> None:
    run = FIDELITY_RUNS["h200x4"]
    assert {case["ep"] for case in run["cases"]} == {2, 4}
    assert run["sizing"]["flashinfer"]["mismatches"] == [] and run["sizing"]["flashinfer"]["points"] >= 700
