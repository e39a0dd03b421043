"""The sim's race detector: a write into workspace bytes a peer's combine may still read is reported on
every run (the order decides, never the timing), and ordered programs are never accused."""

from __future__ import annotations

import re

import pytest

from pytest_mnnvl.backends import _hazards
from pytest_mnnvl.model import releases
from pytest_mnnvl.model.layers import LayerSpec
from pytest_mnnvl.worlds.factory import WorldFactory

from . import hazard_rank_fns as fns

pytestmark = pytest.mark.skipif(
    releases.current() != releases.V072,
    reason="the layout-change race (TensorRT-LLM #19312) is FlashInfer 0.7.2.post1's; 0.7.4's regions are fixed "
    "(tests/test_hazards_v074.py shows it gone there and a live re-initialize still caught)",
)

NVFP4 = LayerSpec("nvfp4", hidden_size=1024, top_k=2, num_experts=8, max_num_tokens=64, name="base")
BF16 = LayerSpec("bf16", hidden_size=1024, top_k=2, num_experts=8, max_num_tokens=64, name="head")
SIM = "sim"
RACE = re.compile(
    r"WorkspaceRace: pytest-mnnvl sim: workspace race: rank (\d)'s dispatch writes bytes \[(\d+), (\d+)\) of "
    r"(its own|rank \d's) workspace row \(payload \d of the dispatch\) while rank (\d) may still be reading "
    r"bytes \[(\d+), (\d+)\) of that row"
)


@pytest.mark.parametrize("ep", [2, 4])
def test_a_layout_change_without_order_is_a_race_on_every_run(mnnvl_world: WorldFactory, ep: int) -> None:
    results = mnnvl_world(world_size=ep, backend=SIM).run(fns.two_round_trips, NVFP4, BF16, "none", 3)
    detected = 0
    for rank, r in enumerate(results):
        assert len(r["errors"]) == 3
        for error in r["errors"]:
            assert error is not None and "WorkspaceRace" in error, (rank, error)
            match = RACE.match(error)
            if match is None:
                assert "poisoned by a race a peer detected" in error, error
                continue
            detected += 1
            writer, w_lo, w_hi, _row, reader, r_lo, r_hi = match.groups()
            assert int(writer) == rank and int(reader) != rank
            assert max(int(w_lo), int(r_lo)) < min(int(w_hi), int(r_hi)), error  # the ranges really overlap
    assert detected >= 3, "some rank must name writer, reader and bytes in every repetition"


@pytest.mark.parametrize("sync", ["barrier", "all_gather"])
def test_a_synchronising_collective_orders_the_layouts(mnnvl_world: WorldFactory, sync: str) -> None:
    results = mnnvl_world(world_size=2, backend=SIM).run(fns.two_round_trips, NVFP4, BF16, sync, 2)
    assert [r["errors"] for r in results] == [[None, None]] * 2


def test_the_same_layout_back_to_back_needs_no_order(mnnvl_world: WorldFactory) -> None:
    """Its dispatch payloads end where its combine region starts: nothing a peer reads is written."""
    results = mnnvl_world(world_size=2, backend=SIM).run(fns.two_round_trips, NVFP4, NVFP4, "none", 2)
    assert [r["errors"] for r in results] == [[None, None]] * 2


@pytest.mark.parametrize("sync", ["harness_gather", "broadcast"])
def test_what_does_not_order_every_peer_is_not_counted(mnnvl_world: WorldFactory, sync: str) -> None:
    """The harness's bookkeeping gathers are not in a forward pass; a broadcast orders only its root."""
    results = mnnvl_world(world_size=2, backend=SIM).run(fns.two_round_trips, NVFP4, BF16, sync)
    for r in results:
        assert r["errors"][0] is not None and "WorkspaceRace" in r["errors"][0]


def test_the_mode_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_hazards.RACES_ENV, "allow")
    assert not _hazards._active()
    monkeypatch.setenv(_hazards.RACES_ENV, "raise")
    assert _hazards._active()
    with _hazards.allowed():
        assert not _hazards._active()
    monkeypatch.setenv(_hazards.RACES_ENV, "sometimes")
    with pytest.raises(RuntimeError, match=r"PYTEST_MNNVL_SIM_RACES='sometimes' is not one of raise, allow"):
        _hazards._active()
