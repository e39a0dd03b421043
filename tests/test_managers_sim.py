"""The reference manager and every mutant, on real rank worlds running FlashInfer's own Python.

Each mutant test shows its one defect directly, in the invariant its docstring names; the same
plan passes with the reference. Layers are small (H=1024, 64–128 tokens) so the sim's host kernels
stay fast; the geometry still reproduces FlashInfer's failures (combinePayloadOffset, token bound).
Tests are ordered by the world they use (2 ranks, 2 ranks under -O, 4 ranks, 4 ranks PP 2) so that
each world starts once with the default two warm worlds; the deadlock, which recycles its world,
comes last.

They run on the installed FlashInfer (0.7.2.post1 in ``.venv``, 0.7.4 in ``.venv074``): the
decisions are the same on both, FlashInfer's words for a failure are the release's (:data:`SAYS`),
and a mutant whose defect cannot exist on the release is refused there with its reason.
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_mnnvl.conformance.observations import Collective
from pytest_mnnvl.conformance.rank import failed_rebuild, mismatch, run_plan
from pytest_mnnvl.errors import MnnvlUsageError, WorldDeadlock
from pytest_mnnvl.managers import ManagerFactory, mutants, resolve
from pytest_mnnvl.model import releases
from pytest_mnnvl.model.layers import LayerSpec
from pytest_mnnvl.model.oracle import need, trajectory
from tests.manager_rank_fns import (
    BF,
    BF_2T,
    GROW_PLAN,
    NV,
    NV_2T,
    NV_E16,
    NV_TOP4,
    WIDE,
    E,
    T,
    cleanup_twice,
    first_error,
    layer,
    plan,
    raised,
    require_sim,
)

pytestmark = pytest.mark.usefixtures("_sim_backend")

RELEASE = releases.current()
#: FlashInfer's words, per release, for the failure each mutant's defect causes.
SAYS = {
    releases.V072: {
        "bf16_on_nvfp4": "(combinePayloadOffset >= 0 && combinePayloadOffset + payloadBytes <= sizePerRank) is false: "
        "workspace insufficient for combine payload region",
        "too_few_bytes": "workspace insufficient",
        "too_few_tokens": "exceeds max_num_tokens",
        "narrow_combine": "combine payload region",
        "shrunk_below_earlier": "combine payload region",
        "retry_skipped": "combine payload region",
        "cross_product": "workspace insufficient",
    },
    releases.V074: {
        "bf16_on_nvfp4": "Dispatch payload exceeds its workspace capacity",
        "too_few_bytes": "Dispatch payload exceeds its workspace capacity",
        "too_few_tokens": "runtime_max_tokens_per_rank=64 must be in (0, 32]",
        "narrow_combine": "Combine payload exceeds its fixed workspace region",
        "shrunk_below_earlier": "Dispatch payload exceeds its workspace capacity",
        "retry_skipped": "Dispatch payload exceeds its workspace capacity",
        "cross_product": "Dispatch payload exceeds its workspace capacity",
    },
}[RELEASE]


def mutant(name: str) -> ManagerFactory:
    """``mutant:<name>``, or a skip naming why its defect cannot exist on this release (after checking that
    resolving it is refused with that reason)."""
    cls = mutants.MUTANTS[name]
    if not cls.applies_to(RELEASE):
        with pytest.raises(MnnvlUsageError, match="cannot exist on the installed FlashInfer"):
            resolve(f"mutant:{name}")
        pytest.skip(f"mutant:{name} does not apply to FlashInfer {RELEASE}: {cls.release_note(RELEASE)}")
    return resolve(f"mutant:{name}")


@pytest.fixture
def _sim_backend(request: pytest.FixtureRequest) -> None:
    require_sim(request.config)


def _steps(result: dict[str, Any]) -> list[dict[str, Any]]:
    return list(result.steps)


# ---- the reference ---------------------------------------------------------------------------


def _check_grow_plan(results: list[dict[str, Any]], world_size: int) -> None:
    expected = trajectory("per_dimension", GROW_PLAN, world_size)
    for result in results:
        steps = _steps(result)
        assert [s.rebuilt for s in steps] == [e.rebuilt for e in expected]
        assert [s.state.size_per_rank for s in steps] == [e.capacity.size_per_rank for e in expected]
        sizes = [s.state.size_per_rank for s in steps]
        tokens = [s.state.max_num_tokens for s in steps]
        assert sizes == sorted(sizes) and tokens == sorted(tokens)
        assert first_error(result) is None
        for step in steps:
            assert all(ranks == tuple(range(world_size)) for ranks in (c.group_ranks for c in step.collectives)), (
                step.collectives
            )
            if not step.rebuilt:
                assert step.collectives == ()
            else:
                assert Collective("barrier", tuple(range(world_size))) in step.collectives
        assert result.workspaces_before_cleanup == 1, "superseded workspaces must leave FlashInfer's cache"
        assert not result.after_cleanup.initialized and result.after_cleanup.stamp is None
        assert result.reinit.size_per_rank == need(NV, world_size)
        assert result.reinit_round_trip == "ok"
        assert result.workspaces_at_end == 0
    # EP symmetry: every rank reached the same sizes, tokens and decisions.
    shapes = {tuple((s.rebuilt, s.state.size_per_rank, s.state.max_num_tokens) for s in r.steps) for r in results}
    assert len(shapes) == 1


def test_reference_grows_skips_never_shrinks_2_ranks(mnnvl_world: Any) -> None:
    # run_plan starts from an empty workspace cache; recheck: every earlier layer after each initialize.
    _check_grow_plan(mnnvl_world(2, 1).run(run_plan, resolve("reference"), plan(GROW_PLAN), recheck=True), 2)


def test_reference_covers_the_cross_product(mnnvl_world: Any) -> None:
    # The probes: each layout at the largest max tokens, BF_2T (bf16 at 2T) first.
    results = mnnvl_world(2, 1).run(run_plan, resolve("reference"), plan([BF, NV_2T]), recheck=True)
    assert all(r.probes == {0: "ok", 1: "ok"} and first_error(r) is None for r in results)


def test_reference_failed_rebuild_keeps_the_old_handle(mnnvl_world: Any) -> None:
    for result in mnnvl_world(2, 1).run(failed_rebuild, resolve("reference"), layer(NV), layer(BF)):
        assert raised(result.raised) == "InjectedBuildFailure"
        assert result.same_handle and result.after_failure == result.before
        assert result.first_round_trip == "ok"
        assert result.after_retry.size_per_rank > result.before.size_per_rank
        assert result.retry_round_trip == "ok"


@pytest.mark.parametrize("second", [NV_TOP4, NV_E16], ids=["top_k", "num_experts"])
def test_reference_refuses_mismatch_without_changing_state(mnnvl_world: Any, second: LayerSpec) -> None:
    for result in mnnvl_world(2, 1).run(mismatch, resolve("reference"), layer(NV), layer(second)):
        assert raised(result.raised) == "ShapeMismatch"
        assert result.same_handle and result.after == result.before
        # The rest of the plan: the layer that fits is kept, the one that must grow rebuilds, as on a fresh manager.
        assert [(s.layer, s.rebuilt, s.round_trip) for s in result.continuation] == [(2, False, "ok"), (3, True, "ok")]
        assert [(s.rebuilt, s.state.size_per_rank) for s in result.control] == [
            (s.rebuilt, s.state.size_per_rank) for s in result.continuation
        ]


# ---- the mutants, one defect each (2 ranks) --------------------------------------------------


def test_first_call_wins_fails_the_bf16_combine(mnnvl_world: Any) -> None:
    results = mnnvl_world(2, 1).run(run_plan, mutant("first_call_wins"), plan([NV, BF]), probes=False)
    for result in results:
        assert not result.steps[1].rebuilt
        step, layer, outcome = first_error(result) or (None, None, "")
        assert (step, layer) == (1, 1)
        assert SAYS["bf16_on_nvfp4"] in outcome


def test_scale_bytes_left_out_fails_its_own_layer_and_hides_behind_bf16(mnnvl_world: Any) -> None:
    world = mnnvl_world(2, 1)
    spec = mutant("scale_bytes_left_out")
    # At 64 tokens: on 0.7.4 the missing scale bytes (2 x 64 x H/32 beyond the narrowest format's row) exceed
    # the 4 x 256 bytes of alignment NVLinkOneSidedAlltoAll always adds (at 32 tokens they still fit).
    for result in world.run(run_plan, spec, plan([NV_2T]), probes=False):
        assert result.steps[0].state.size_per_rank < need(NV_2T, 2)
        assert SAYS["too_few_bytes"] in result.steps[0].round_trip
    # Grown by a bf16 layer first, every round trip passes: only a per-layer check catches it.
    for result in world.run(run_plan, spec, plan([BF, NV]), probes=False, recheck=True):
        assert first_error(result) is None


def test_tokens_not_grown_fails_the_token_bound(mnnvl_world: Any) -> None:
    for result in mnnvl_world(2, 1).run(run_plan, mutant("tokens_not_grown"), plan([NV, NV_2T]), probes=False):
        assert result.steps[1].state.max_num_tokens == T
        assert SAYS["too_few_tokens"] in (first_error(result) or (0, 0, ""))[2]


def test_combine_from_last_layer_breaks_an_earlier_wide_layer(mnnvl_world: Any) -> None:
    world = mnnvl_world(2, 1)
    for result in world.run(run_plan, mutant("combine_from_last_layer"), plan([WIDE, BF]), recheck=True):
        assert result.steps[1].rebuilt
        assert result.steps[1].earlier_round_trips[0].startswith("error")
        assert SAYS["narrow_combine"] in result.steps[1].earlier_round_trips[0]
    for result in world.run(run_plan, resolve("reference"), plan([WIDE, BF]), probes=False, recheck=True):
        assert first_error(result) is None


def test_shrink_to_current_shrinks(mnnvl_world: Any) -> None:
    for result in mnnvl_world(2, 1).run(run_plan, mutant("shrink_to_current"), plan([BF, NV]), recheck=True):
        first, second = (s.state for s in result.steps)
        assert result.steps[1].rebuilt and second.size_per_rank < first.size_per_rank
        assert SAYS["shrunk_below_earlier"] in result.steps[1].earlier_round_trips[0]


def test_rebuild_every_call_rebuilds_a_dominated_layer(mnnvl_world: Any) -> None:
    world = mnnvl_world(2, 1)
    for result in world.run(run_plan, mutant("rebuild_every_call"), plan([BF, NV]), probes=False, recheck=True):
        assert result.steps[1].rebuilt and result.steps[1].collectives
        assert first_error(result) is None
    for result in world.run(run_plan, resolve("reference"), plan([BF, NV]), probes=False, recheck=True):
        assert not result.steps[1].rebuilt and result.steps[1].collectives == ()


def test_rebuilds_unless_dominated_rebuilds_what_the_union_covers(mnnvl_world: Any) -> None:
    layers = [NV_2T, BF, BF_2T]  # BF_2T: dominated by no single layer, covered by the union
    expected = [e.rebuilt for e in trajectory("per_dimension", layers, 2)]
    world = mnnvl_world(2, 1)
    for result in world.run(run_plan, resolve("reference"), plan(layers), probes=False, recheck=True):
        assert [s.rebuilt for s in result.steps] == expected == [True, True, False]
    for result in world.run(run_plan, mutant("rebuilds_unless_dominated"), plan(layers), probes=False, recheck=True):
        steps = result.steps
        assert [s.rebuilt for s in steps] == [True, True, True]
        assert steps[2].state.size_per_rank == steps[1].state.size_per_rank
        assert first_error(result) is None


def test_asymmetric_ranks_disagree(mnnvl_world: Any) -> None:
    results = mnnvl_world(2, 1).run(run_plan, mutant("asymmetric"), plan([NV_2T, BF]), probes=False)
    if RELEASE == releases.V074:
        # 0.7.4 sizes the workspace from the tokens: FlashInfer refuses rank 0's smaller allocation on both ranks.
        assert [r.steps[1].raised for r in results] == ["AssertionError: Not all rank allocating same size."] * 2
        assert all(r.steps[1].state == r.steps[0].state for r in results)
        return
    tokens = [r.steps[1].state.max_num_tokens for r in results]
    sizes = {r.steps[1].state.size_per_rank for r in results}
    assert tokens == [T, 2 * T] and len(sizes) == 1


def test_skewed_expert_count_ranks_disagree_and_none_hangs(mnnvl_world: Any) -> None:
    """Nothing refuses rank 0's expert count (sizes and layouts agree), its rows reach the wrong peer, and that peer
    says so after taking part in the combine: a rank that skipped it left rank 0 in the combine kernel until the
    deadlock verdict."""
    results = mnnvl_world(2, 1).run(run_plan, mutant("skewed_expert_count"), plan([NV]), probes=False)
    states = [r.steps[0].state for r in results]
    assert [s.num_experts for s in states] == [E + 2, E]
    assert len({(s.size_per_rank, s.max_num_tokens, s.layout) for s in states}) == 1
    assert all(r.steps[0].raised is None for r in results)
    assert all("RoundTripMismatch" in (r.steps[0].round_trip or "") for r in results), [r.steps[0] for r in results]


def test_accepts_mismatch_raises_nothing(mnnvl_world: Any) -> None:
    for result in mnnvl_world(2, 1).run(mismatch, mutant("accepts_mismatch"), layer(NV), layer(NV_TOP4)):
        assert result.raised is None


def test_mismatch_raises_late_changes_the_handle(mnnvl_world: Any) -> None:
    for result in mnnvl_world(2, 1).run(mismatch, mutant("mismatch_raises_late"), layer(NV), layer(NV_TOP4)):
        assert raised(result.raised) == "ShapeMismatch"
        assert not result.same_handle and result.after.top_k == 4


def test_mismatch_forgets_capacity_rebuilds_the_next_layer_that_fits(mnnvl_world: Any) -> None:
    """What a snapshot reads is unchanged; the next layer that fits is rebuilt (a fresh manager keeps the handle)."""
    for result in mnnvl_world(2, 1).run(mismatch, mutant("mismatch_forgets_capacity"), layer(NV), layer(NV_TOP4)):
        assert raised(result.raised) == "ShapeMismatch"
        assert result.same_handle and result.after == result.before and result.round_trip_after == "ok"
        assert [s.rebuilt for s in result.continuation] == [True, True]
        assert [s.rebuilt for s in result.control] == [False, True]


def test_cleanup_keeps_handle(mnnvl_world: Any) -> None:
    world = mnnvl_world(2, 1)
    for result in world.run(cleanup_twice, mutant("cleanup_keeps_handle"), [NV, BF]):
        assert not result["after_cleanup"].initialized and result["after_cleanup"].stamp is not None
    for result in world.run(cleanup_twice, resolve("reference"), [NV, BF]):
        assert result["after_cleanup"].stamp is None


def test_cleanup_stays_initialized(mnnvl_world: Any) -> None:
    for result in mnnvl_world(2, 1).run(run_plan, mutant("cleanup_stays_initialized"), plan([NV]), probes=False):
        assert result.after_cleanup.initialized and result.after_cleanup.stamp is None
        assert result.reinit.stamp is None
        assert result.reinit_round_trip == "error: no live FlashInfer handle"


@pytest.mark.parametrize("name", ["leaks_superseded", "skips_destroy"])
def test_leaking_mutants_keep_every_workspace(mnnvl_world: Any, name: str) -> None:
    """0.7.2 keeps what nobody evicted (leaks_superseded), 0.7.4 what nobody destroyed (skips_destroy)."""
    # run_plan empties FlashInfer's table first: a cached workspace of the same geometry would be reused.
    layers = plan([NV, BF, NV_2T])
    world = mnnvl_world(2, 1)
    for result in world.run(run_plan, mutant(name), layers, probes=False, after_cleanup=False):
        assert result.workspaces_before_cleanup == 3
    for result in world.run(run_plan, resolve("reference"), layers, probes=False, after_cleanup=False):
        assert result.workspaces_before_cleanup == 1


def test_half_updated_on_failure_skips_the_retry(mnnvl_world: Any) -> None:
    for result in mnnvl_world(2, 1).run(failed_rebuild, mutant("half_updated_on_failure"), layer(NV), layer(BF)):
        assert raised(result.raised) == "InjectedBuildFailure"
        assert result.after_retry == result.before  # the retry was skipped as "fits"
        assert SAYS["retry_skipped"] in result.retry_round_trip


def test_stale_after_failed_rebuild_rebuilds_the_next_layer_that_fits(mnnvl_world: Any) -> None:
    """Everything the snapshot and retry checks read is right; after the retry, the layer that fits is rebuilt
    (a fresh manager that never saw the failure keeps its handle)."""
    for result in mnnvl_world(2, 1).run(failed_rebuild, mutant("stale_after_failed_rebuild"), layer(NV), layer(BF)):
        assert raised(result.raised) == "InjectedBuildFailure"
        assert result.same_handle and result.after_failure == result.before and result.first_round_trip == "ok"
        assert result.retry_raised is None and result.retry_round_trip == "ok"
        assert [(s.rebuilt, s.round_trip) for s in result.continuation] == [(True, "ok"), (True, "ok")]
        assert [s.rebuilt for s in result.control] == [False, True]


def test_total_need_misses_the_cross_product(mnnvl_world: Any) -> None:
    layers = [BF, NV_2T]
    results = mnnvl_world(2, 1).run(run_plan, mutant("total_need"), plan(layers), recheck=True)
    expected = trajectory("total", layers, 2)
    for result in results:
        assert [s.state.size_per_rank for s in result.steps] == [e.capacity.size_per_rank for e in expected]
        assert first_error(result) is None  # every MUST holds
        assert "workspace" in result.probes[0]  # the first probe, bf16 at max tokens (BF_2T), does not fit


def test_region_total_need_misses_the_cross_product(mnnvl_world: Any) -> None:
    """The bf16 layer's dispatch need (T × its row) is spread over 2T tokens: it fits at its own T tokens (every
    MUST holds) but not at 2T, which the handle admits from it."""
    results = mnnvl_world(2, 1).run(run_plan, mutant("region_total_need"), plan([NV_2T, BF]), recheck=True)
    for result in results:
        assert [s.rebuilt for s in result.steps] == [True, True]
        assert first_error(result) is None
        assert result.probes[0] == "ok" and SAYS["cross_product"] in result.probes[1]  # probe 1: bf16 at 2T


def test_assert_only_mismatch_raises_without_O(mnnvl_world: Any) -> None:
    # Under -O the assert vanishes: shown without a rank world in test_managers.py
    # (an -O world recompiles torch's bytecode: 15-30 s here).
    for result in mnnvl_world(2, 1).run(mismatch, mutant("assert_only_mismatch"), layer(NV), layer(NV_TOP4)):
        assert raised(result.raised) == "AssertionError" and result.optimize == 0


# ---- 4 ranks, then 4 ranks in 2 PP stages ------------------------------------------------------


def test_reference_grows_skips_never_shrinks_4_ranks(mnnvl_world: Any) -> None:
    # Earlier layers re-checked after the last initialize only: 4 ranks share 2 cores here.
    _check_grow_plan(mnnvl_world(4, 1).run(run_plan, resolve("reference"), plan(GROW_PLAN), probes=False), 4)


def test_reference_pp2_stages_rebuild_differently(mnnvl_world: Any) -> None:
    world = mnnvl_world(4, 2)
    results = world.run(run_plan, resolve("reference"), plan([NV], [NV, BF, NV_2T]), probes=False, recheck=True)
    for result in results:
        group = (0, 1) if result.stage == 0 else (2, 3)
        rebuilds = sum(s.rebuilt for s in result.steps)
        assert rebuilds == (1 if result.stage == 0 else 3)
        assert all(ranks == group for s in result.steps for ranks in (c.group_ranks for c in s.collectives))
        assert first_error(result) is None


def test_world_comm_backend_allocates_over_the_world(mnnvl_world: Any) -> None:
    world = mnnvl_world(4, 2)
    results = world.run(run_plan, mutant("world_comm_backend"), plan([NV], [NV]), probes=False)
    for result in results:
        assert Collective("all_gather_object", (0, 1, 2, 3)) in result.steps[0].collectives
    for result in world.run(run_plan, resolve("reference"), plan([NV], [NV]), probes=False):
        assert first_error(result) is None
        assert all(len(ranks) == 2 for ranks in (c.group_ranks for c in result.steps[0].collectives))


def test_world_barrier_deadlocks_pp2(mnnvl_world: Any) -> None:
    """Stage 1 rebuilds twice, stage 0 once: the second world barrier never completes. Kept last
    among the PP-2 tests: the deadlock recycles that world."""
    world = mnnvl_world(4, 2, timeout=5)
    with pytest.raises(WorldDeadlock) as info:
        world.run(run_plan, mutant("world_barrier"), plan([NV], [NV, BF]), probes=False, after_cleanup=False)
    # Stage 1 (ranks 2, 3) waits in its second world barrier; stage 0 returned after its only build
    # (unless a loaded machine kept it from getting there within the timeout).
    assert {2, 3} <= set(info.value.pending)
    assert any("barrier(group=[0, 1, 2, 3])" in info.value.blocked_in.get(rank, "") for rank in (2, 3))
