"""The race detector on FlashInfer 0.7.4's sim op module (``_kernels_v074``), where the regions are fixed.

0.7.4's combine region no longer moves with the dispatch payloads, so the layout-change race of 0.7.2
(TensorRT-LLM #19312, tests/test_hazards.py) is gone by design: a dispatch of another layout is never
accused. A write into a live row still races: ``moe_a2a_initialize`` on a workspace whose combine region
a slower peer may still be reading (the mutant ``reinitializes_live_workspace``). Runs only with 0.7.4
installed (``.venv074``).
"""

from __future__ import annotations

import re

import pytest

from pytest_mnnvl.model import releases
from pytest_mnnvl.model.layers import LayerSpec
from pytest_mnnvl.worlds.factory import WorldFactory

from . import hazard_rank_fns as fns

pytestmark = pytest.mark.skipif(
    releases.installed() != releases.V074, reason=f"needs flashinfer-python {releases.V074} installed"
)
NVFP4 = LayerSpec("nvfp4", hidden_size=1024, top_k=2, num_experts=8, max_num_tokens=64, name="base")
BF16 = LayerSpec("bf16", hidden_size=1024, top_k=2, num_experts=8, max_num_tokens=64, name="head")
SIM = "sim"
RACE = re.compile(
    r"WorkspaceRace: pytest-mnnvl sim: workspace race: rank (\d)'s moe_a2a_initialize writes bytes \[0, (\d+)\) of "
    r"its own workspace row \(zeroes the whole row\) while rank (\d) may still be reading bytes \[(\d+), (\d+)\) "
    r"of that row in the combine of the previous round"
)
POISONED = "WorkspaceRace: pytest-mnnvl sim: this workspace is poisoned by a race a peer detected"


def test_another_layout_without_order_is_no_race(mnnvl_world: WorldFactory) -> None:
    """What raises WorkspaceRace on 0.7.2 on every run (tests/test_hazards.py) passes here, both round trips right."""
    for errors in mnnvl_world(world_size=2, backend=SIM).run(fns.v074_two_layouts, NVFP4, BF16, 2):
        assert errors == [None, None]


@pytest.mark.parametrize("ep", [2, 4])
def test_reinitializing_a_live_workspace_without_order_is_a_race(mnnvl_world: WorldFactory, ep: int) -> None:
    errors = mnnvl_world(world_size=ep, backend=SIM).run(fns.v074_reinitialize, BF16, "none")
    detected = [RACE.match(error or "") for error in errors]
    assert any(detected), errors
    for rank, (error, found) in enumerate(zip(errors, detected, strict=True)):
        if found is None:
            assert error is not None and error.startswith(POISONED), (rank, error)
            continue
        writer, row_bytes, reader, lo, hi = map(int, found.groups())
        assert writer == rank and reader != rank and 0 < lo < hi <= row_bytes


def test_reinitializing_after_an_ep_barrier_is_no_race(mnnvl_world: WorldFactory) -> None:
    assert mnnvl_world(world_size=2, backend=SIM).run(fns.v074_reinitialize, BF16, "barrier") == [None, None]
