"""The sim backend on FlashInfer 0.7.4: its own NVLinkOneSidedAlltoAll on CPU ranks.

Runs only when flashinfer-python 0.7.4 is the installed release (a second venv; see the README).
Expected numbers and texts are derived from 0.7.4's C++ by hand (tests/test_sizing_v074.py pins the
arithmetic); nothing here was measured on a GPU.
"""

from __future__ import annotations

import time
from importlib import metadata
from typing import TYPE_CHECKING

import pytest

from pytest_mnnvl.model import sizing_v074

from . import sim074_rank_fns as fns

if TYPE_CHECKING:
    from pytest_mnnvl.worlds.factory import WorldFactory


def _installed() -> str | None:
    try:
        return metadata.version("flashinfer-python")
    except metadata.PackageNotFoundError:
        return None


INSTALLED = _installed()
pytestmark = pytest.mark.skipif(
    INSTALLED != "0.7.4", reason=f"needs flashinfer-python 0.7.4 installed (found {INSTALLED or 'none'})"
)
SIM = "sim"
MIB = 1 << 20
WORLD_SIZES = pytest.mark.parametrize("ep", [2, 4])


@pytest.mark.parametrize(
    ("ep", "num_experts", "top_k", "options"),
    [
        (2, 8, 4, {}),
        (2, 8, 3, {"use_low_precision_combine": True, "enable_rank_mask": True}),
        (4, 8, 2, {"eplb_stats_num_experts": 8}),
        (4, 16, 8, {}),
    ],
    ids=["ep2-k4", "ep2-k3-fp8-mask", "ep4-k2-eplb", "ep4-E16-k8"],
)
def test_round_trip(mnnvl_world: WorldFactory, ep: int, num_experts: int, top_k: int, options: dict) -> None:
    """Bytes reach exactly the owner ranks; combine sums one row per distinct owner; layout = sizing_v074."""
    tokens, hidden = 24, 128
    for r in mnnvl_world(world_size=ep, backend=SIM).run(fns.round_trip, num_experts, top_k, tokens, hidden, options):
        layout = r.pop("layout_bytes")
        assert r == {
            "delivered": True,
            "eplb": True,
            "ones": True,
            "in_region": True,
            "scaled": True,
            "flag_epoch": 4,
            "metainfo": True,
            "row_bytes": layout,
            "aligned_bytes": 2 * MIB,  # MnnvlMemory rounds up to the 2 MiB granularity
            "pdl": True,  # an H100 (SM 9.0): device_support_pdl
            "cft_lamport": (False, False),  # POSIX handles: no CFT; no Lamport kernels on an H100
        }


def test_round_trip_layout_is_the_hand_derived_one() -> None:
    """The layout the round trip compares with (ep 2, T 24, hidden 128, top_k 4), walked by hand."""
    layout = sizing_v074.nvlink_one_sided_layout(2, 24, 128, 4)
    # topk arrays 24*4*4 = 384 B from 256 and 640; dispatch 48*(256+32)+1024 = 14,848 from 1024;
    # combine flags at 15,872; combine input 48*128*2 = 12,288 from 16,128.
    assert (layout.dispatch_payload_offset, layout.dispatch_payload_size) == (1024, 14_848)
    assert (layout.combine_input_offset, layout.workspace_size) == (16_128, 28_416)


# Dispatch need / capacity and FP32 combine need / capacity for ep 2 and 4 (T 256, hidden 4096, top_k 2).
NVFP4_DISPATCH = {2: (4_202_496, 1_188_864), 4: (8_404_992, 2_376_704)}
FP32_COMBINE = {2: (8_388_608, 4_194_304), 4: (16_777_216, 8_388_608)}


@WORLD_SIZES
def test_nvfp4_workspace_then_bf16_layer(mnnvl_world: WorldFactory, ep: int) -> None:
    """0.7.4's fixed regions: the bf16 layer fails at dispatch (it can no longer borrow the combine region)."""
    need, capacity = NVFP4_DISPATCH[ep]
    combine_need, combine_capacity = FP32_COMBINE[ep]
    for r in mnnvl_world(world_size=ep, backend=SIM).run(fns.nvfp4_then_bf16):
        assert r["bf16_full"] == (
            "RuntimeError",
            "Check failed: (currentOffset <= static_cast<size_t>(recvRegionOffset + recvRegionSize)) is false: "
            f"Dispatch payload exceeds its workspace capacity: need {need} bytes, capacity {capacity}",
        )
        assert r["idle_after"] and r["bf16_small_ok"] and r["nvfp4_dispatch_ok"]
        assert r["fp32_combine"] == (
            "RuntimeError",
            "Check failed: (payloadSize <= regionSize) is false: Combine payload exceeds its fixed workspace "
            f"region: need {combine_need} bytes, capacity {combine_capacity}",
        )
        assert r["next_dispatch"] == ("RuntimeError", "dispatch called twice without an intervening combine")


def test_runtime_tokens_over_capacity(mnnvl_world: WorldFactory) -> None:
    for r in mnnvl_world(world_size=2, backend=SIM).run(fns.runtime_over_capacity):
        assert r["python"] == ("ValueError", "runtime_max_tokens_per_rank=33 must be in (0, 32]")
        kind, message = r["old_keyword"]  # vLLM 0.33.0's call
        assert kind == "TypeError" and "unexpected keyword argument 'max_tokens_per_rank'" in message
        assert r["cpp_runtime"] == ("RuntimeError", sizing_v074.runtime_tokens_message())
        local = (
            "RuntimeError",
            "Check failed: (localNumTokens <= runtimeMaxTokensPerRank) is false: "
            "Local token count exceeds the runtime capacity",
        )
        assert r["cpp_local"] == local and r["direct_local"] == local
        assert r["idle_after"]


@WORLD_SIZES
def test_destroy_of_the_last_user_frees_the_workspace(mnnvl_world: WorldFactory, ep: int) -> None:
    """Refcounted sharing; a view outlives destroy() and keeps the rows mapped; then nothing is left."""
    rows = ep * 2 * MIB  # own row and every peer's, 2 MiB each
    for r in mnnvl_world(world_size=ep, backend=SIM).run(fns.destroy_frees):
        assert r["start"] == (0, 0, 0, 0)
        assert r["shared"] and r["refcount"] == 2
        assert r["two"] == (1, 1, ep, rows)  # (workspaces, allocations, memfds, mapped bytes)
        assert r["after_first"] == (1, 1, ep, rows)
        assert r["view_keeps"] == (0, 1, ep, rows)  # the entry is gone; the MnnvlMemory lives in the view
        assert r["destroyed"] == ("RuntimeError", "NVLinkOneSidedAlltoAll has been destroyed")
        assert r["end"] == (0, 0, 0, 0)
        # __init__'s collectives (gloo's all_gather_object runs two all_gathers inside; left out): the
        # platform vote, the communicator Split (+ its barrier), the handle-type vote, the CFT/Lamport vote,
        # the allocation (size, handle-type vote again, create errors, fd-exchange socket paths, import
        # errors) and the barrier after initialize.
        top_level = [name for name in r["collectives"] if name != "all_gather"]
        assert top_level == ["all_gather_object"] * 2 + ["barrier"] + ["all_gather_object"] * 7 + ["barrier"]
        assert r["collectives"][-1] == "barrier"


def test_top_k_outside_the_kernels_set(mnnvl_world: WorldFactory) -> None:
    for r in mnnvl_world(world_size=2, backend=SIM).run(fns.bad_top_k, 5):
        assert r == ("ValueError", sizing_v074.top_k_value_error(5))
        assert r[1] == "NVLinkOneSidedAlltoAll supports top_k in (1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 18, 22), got 5"


def test_skipped_dispatch_times_out_like_a_trap(mnnvl_world: WorldFactory) -> None:
    """``timeout_sec=1``: the kernel's 0.7.4 printf text after about a second, then a sticky launch failure."""
    world = mnnvl_world(world_size=2, backend=SIM)
    started = time.monotonic()
    results = world.run(fns.skip_dispatch)
    assert time.monotonic() - started < 30
    assert results[1] is None
    (kind, message), sticky = results[0]
    assert kind == "SimKernelTimeout"
    assert message.startswith("dispatch: rank 0 timed out waiting for rank 1 flag=0 expected=1 (")
    assert sticky is not None and "unspecified launch failure" in sticky[1]
