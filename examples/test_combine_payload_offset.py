"""The bug pytest-mnnvl exists for, reproduced with FlashInfer's own MoeAlltoAll on a rank world.

A workspace sized for an NVFP4 base layer is too small for a bf16 MTP head: the head's dispatch
still fits (it borrows the combine region), and combine fails FlashInfer's host check. On CPU this
runs on the sim backend; on a machine with NVLink GPUs, ``--mnnvl-backend=flashinfer`` runs it for real.
"""

from __future__ import annotations

import pytest
import rank_fns

from pytest_mnnvl.model import sizing
from pytest_mnnvl.model.layers import LayerSpec

COMBINE_CHECK = (
    "Check failed: (combinePayloadOffset >= 0 && combinePayloadOffset + payloadBytes <= sizePerRank) is false: "
    "workspace insufficient for combine payload region"
)
BASE = LayerSpec("nvfp4", hidden_size=4096, top_k=2, num_experts=8, max_num_tokens=256, name="nvfp4 base")
HEAD = LayerSpec("bf16", hidden_size=4096, top_k=2, num_experts=8, max_num_tokens=256, name="bf16 MTP head")


def test_the_numbers_of_the_bug() -> None:
    """Measured on 2×H100 with FlashInfer 0.7.2.post1: ep=2, T=256, H=4096, top_k=2."""
    assert sizing.aux_size(2, 256) == 45_440
    assert BASE.need(2) == 5_427_584
    assert HEAD.need(2) == 8_442_240


@pytest.mark.parametrize("world_size", [2, 4])
def test_first_layer_sizing_fails_in_combine(mnnvl_world, world_size: int) -> None:
    out = mnnvl_world(world_size).run(rank_fns.first_layer_sizing, BASE, HEAD, 256)
    assert [o["head_error"] for o in out] == [COMBINE_CHECK] * world_size


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_layout_change_without_a_barrier_is_a_race(mnnvl_world, world_size: int) -> None:
    """Round trips of two layouts back to back: the head's dispatch may overwrite the base's combine
    slots a slower peer is still reading. On a GPU that corrupts data only when the timing is
    unlucky; the sim says so on every run, on the rank that writes and on its peers. The detector is the
    sim's, so this runs on the sim whatever ``--mnnvl-backend`` says."""
    out = mnnvl_world(world_size, backend="sim").run(rank_fns.first_layer_sizing, BASE, HEAD, 256, False)
    for rank, o in enumerate(out):
        assert "workspace race" in o["head_error"], (rank, o["head_error"])


def test_a_small_batch_hides_the_bug(mnnvl_world) -> None:
    """The check uses the runtime token count: the smallest failing batch comes from the arithmetic."""
    geometry = sizing.WorkspaceGeometry(ep_size=2, max_num_tokens=256, size_per_rank=BASE.need(2))
    first_bad = sizing.smallest_failing_runtime_tokens(HEAD, geometry)
    assert first_bad is not None and 1 < first_bad < 256
    world = mnnvl_world(2)
    passes = world.run(rank_fns.first_layer_sizing, BASE, HEAD, first_bad - 1)
    fails = world.run(rank_fns.first_layer_sizing, BASE, HEAD, first_bad)
    assert [o["head_error"] for o in passes] == [None] * 2
    assert [o["head_error"] for o in fails] == [COMBINE_CHECK] * 2


@pytest.mark.mnnvl(world_size=2)
def test_union_sizing_serves_every_layer(mnnvl_world) -> None:
    assert mnnvl_world().run(rank_fns.union_sizing, [BASE, HEAD]) == [[HEAD.need(2)]] * 2
