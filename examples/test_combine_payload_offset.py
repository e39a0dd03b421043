"""The bug pytest-mnnvl exists for, reproduced with FlashInfer's own all-to-all handle on a rank world.

A workspace sized for an NVFP4 base layer is too small for a bf16 MTP head. Which host check says so
depends on the installed FlashInfer: on 0.7.2.post1 (``MoeAlltoAll``) the head's dispatch still fits
(it borrows the combine region, which starts after the current dispatch payloads) and combine fails;
on 0.7.4 (``flashinfer.moe_ep``'s ``NVLinkOneSidedAlltoAll``) dispatch and combine have fixed regions
of their own, and the head's dispatch already overflows the dispatch region. The expected errors come
from pytest-mnnvl's model of the installed release, so the run and the arithmetic must agree.

On CPU this runs on the sim backend; on a machine with NVLink GPUs, ``--mnnvl-backend=flashinfer``
runs it for real.
"""

from __future__ import annotations

import pytest
import rank_fns

from pytest_mnnvl.cli import analysis
from pytest_mnnvl.model import oracle, releases, sizing, sizing_v074
from pytest_mnnvl.model.layers import LayerSpec

BASE = LayerSpec("nvfp4", hidden_size=4096, top_k=2, num_experts=8, max_num_tokens=256, name="nvfp4 base")
HEAD = LayerSpec("bf16", hidden_size=4096, top_k=2, num_experts=8, max_num_tokens=256, name="bf16 MTP head")
#: The host check the head fails first on each release, and FlashInfer's own words for it.
FAILS_IN = {releases.V072: "combine", releases.V074: "dispatch"}
SAYS = {
    releases.V072: "Check failed: (combinePayloadOffset >= 0 && combinePayloadOffset + payloadBytes <= sizePerRank) "
    "is false: workspace insufficient for combine payload region",
    releases.V074: "Dispatch payload exceeds its workspace capacity: need ",
}


def base_sized_workspace(ep: int) -> analysis.Handle:
    """The workspace the pre-fix manager holds when the head runs: sized for BASE alone (the oracle's
    ``first_call`` policy), as the installed FlashInfer's host checks see it."""
    held = oracle.trajectory("first_call", [BASE, HEAD], ep)[-1].capacity
    layout = sizing_v074.WorkspaceLayout(*held.layout) if held.layout else None  # 0.7.4's fixed regions
    geometry = analysis.HandleGeometry(ep, held.max_num_tokens, held.size_per_rank)
    return analysis.Handle(geometry, releases.current(), layout)


def test_the_numbers_of_the_bug() -> None:
    """Measured on 2×H100 with FlashInfer 0.7.2.post1: ep=2, T=256, H=4096, top_k=2 (0.7.2's arithmetic,
    whatever release is installed)."""
    assert sizing.aux_size(2, 256) == 45_440
    assert BASE.need(2) == 5_427_584
    assert HEAD.need(2) == 8_442_240


@pytest.mark.parametrize("world_size", [2, 4])
def test_first_layer_sizing_fails_in_combine(mnnvl_world, world_size: int) -> None:
    """Fails in combine on 0.7.2.post1, in dispatch on 0.7.4: each release's own check and message."""
    expected = base_sized_workspace(world_size).trip(HEAD, 256)
    assert expected.verdict == FAILS_IN[releases.current()]
    assert expected.error is not None and SAYS[releases.current()] in expected.error
    out = mnnvl_world(world_size).run(rank_fns.first_layer_sizing, BASE, HEAD, 256)
    assert [o["head_error"] for o in out] == [expected.error] * world_size


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_layout_change_without_a_barrier_is_a_race(mnnvl_world, world_size: int) -> None:
    """Round trips of two layouts back to back on a workspace that holds both. On 0.7.2 the head's dispatch
    may overwrite the base's combine slots a slower peer is still reading (TensorRT-LLM #19312): on a GPU
    that corrupts data only when the timing is unlucky; the sim says so on every run, on the rank that
    writes and on its peers. 0.7.4's fixed regions removed that race: there the same program is correct.
    The detector is the sim's, so this runs on the sim whatever ``--mnnvl-backend`` says."""
    out = mnnvl_world(world_size, backend="sim").run(rank_fns.union_sizing, [BASE, HEAD], False)
    if releases.current() == releases.V072:
        for rank, o in enumerate(out):
            assert o["error"] is not None and "workspace race" in o["error"], (rank, o["error"])
    else:
        assert [o["error"] for o in out] == [None] * world_size


def test_a_small_batch_hides_the_bug(mnnvl_world) -> None:
    """The checks use the runtime token count: the smallest failing batch comes from the arithmetic."""
    workspace = base_sized_workspace(2)
    first_bad = analysis.first_failing_tokens(HEAD, workspace)
    assert first_bad is not None and 1 < first_bad < 256
    world = mnnvl_world(2)
    passes = world.run(rank_fns.first_layer_sizing, BASE, HEAD, first_bad - 1)
    fails = world.run(rank_fns.first_layer_sizing, BASE, HEAD, first_bad)
    assert [o["head_error"] for o in passes] == [None] * 2
    assert [o["head_error"] for o in fails] == [workspace.trip(HEAD, first_bad).error] * 2


@pytest.mark.mnnvl(world_size=2)
def test_union_sizing_serves_every_layer(mnnvl_world) -> None:
    out = mnnvl_world().run(rank_fns.union_sizing, [BASE, HEAD])
    assert out == [{"size_per_rank": oracle.cross_product_need([BASE, HEAD], 2), "error": None}] * 2
