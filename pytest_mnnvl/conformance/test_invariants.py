"""Every invariant of :mod:`.catalog`, one test each, on every topology of ``--mnnvl-world-sizes`` × ``--mnnvl-pp``.

Shipped in the package (``pytest -p pytest_mnnvl --pyargs pytest_mnnvl.conformance``); a clone's
``conformance/test_invariants.py`` imports these tests and collects them under its own node ids.

Plan invariants draw plans with Hypothesis (same derandomized sequence for all of them, so one run
of a plan serves every check); the shape-mismatch, failed-rebuild and ``-O`` checks drive fixed
layer pairs; PP deadlock freedom runs the plans whose stages rebuild different numbers of times
with a short per-call timeout. SHOULD violations are xfails unless ``--mnnvl-strict``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from pytest_mnnvl.conformance import invariants
from pytest_mnnvl.conformance.driver import DEADLOCK_TIMEOUT_S, Conformance
from pytest_mnnvl.conformance.observations import MismatchObservation
from pytest_mnnvl.session import SETTINGS_KEY
from pytest_mnnvl.worlds.layout import Topology


def _plan_test(invariant: str) -> Any:
    @pytest.mark.conformance(invariant)
    def test(conformance: Conformance, mnnvl_topology: Topology) -> None:
        if invariant == "minimal_rebuilds" and conformance.manager.policy is None:
            pytest.skip(
                f"{conformance.manager.spec} declares no growth policy (mnnvl_policy = 'total' or 'per_dimension'), "
                "so nothing bounds how often or how large it builds"
            )
        conformance.explore(mnnvl_topology, invariants.PLAN_CHECKS[invariant])

    test.__name__ = f"test_{invariant}"
    test.__doc__ = invariants.PLAN_CHECKS[invariant].__doc__
    return test


test_covers = _plan_test("covers")
test_no_shrink = _plan_test("no_shrink")
test_no_needless_rebuild = _plan_test("no_needless_rebuild")
test_ep_symmetry = _plan_test("ep_symmetry")
test_collective_scope = _plan_test("collective_scope")
test_cleanup = _plan_test("cleanup")
test_workspace_race_free = _plan_test("workspace_race_free")
test_frees_superseded = _plan_test("frees_superseded")
test_covers_cross_product = _plan_test("covers_cross_product")
test_minimal_rebuilds = _plan_test("minimal_rebuilds")


@pytest.mark.conformance("pp_deadlock_freedom")
@pytest.mark.conformance_first
def test_pp_deadlock_freedom(conformance: Conformance, pp_topology: Topology | None) -> None:
    """Stages that rebuild different numbers of times, and a stage without MoE layers, all finish;
    a hang is reported as a deadlock with every rank's stack within the timeout + 2 s."""
    from pytest_mnnvl.conformance import strategies
    from pytest_mnnvl.conformance.driver import _Hang

    if pp_topology is None:
        pytest.skip("no topology with PP > 1 in --mnnvl-world-sizes × --mnnvl-pp")
    timeout = min(conformance.config.stash[SETTINGS_KEY].timeout, DEADLOCK_TIMEOUT_S)
    for _why, plan in strategies.deadlock_plans(pp_topology.pp):
        t0 = time.monotonic()
        try:
            conformance.observe(pp_topology, plan, timeout=timeout)
        except _Hang as hang:
            conformance.entry["reported_after_s"] = round(hang.seconds, 2)
            assert hang.seconds <= timeout + 2.0, f"deadlock reported after {hang.seconds:.1f} s > {timeout} + 2 s"
            conformance.hang(pp_topology, hang)
        conformance.entry.setdefault("plan_seconds", []).append(round(time.monotonic() - t0, 2))


@pytest.mark.conformance("shape_mismatch")
@pytest.mark.parametrize("field", ["top_k", "num_experts"])
def test_shape_mismatch(conformance: Conformance, mnnvl_topology: Topology, field: str) -> None:
    """A different top_k or num_experts after the first layer, larger or smaller, raises and changes no state:
    nothing a snapshot reads, nor what the next layers of the first shape get (they initialize, round-trip and
    rebuild as on a fresh manager that never saw the refused call).

    Both directions: a manager that compares with ``<=`` (a smaller value "fits") passes the larger one."""
    for smaller in (False, True):
        _mismatch(conformance, mnnvl_topology, field, invariants.ShapeMismatchViolation, smaller=smaller)


def _mismatch(
    conformance: Conformance,
    topology: Topology,
    field: str,
    cls: type[invariants.InvariantViolation],
    env: dict[str, str] | None = None,
    smaller: bool = False,
) -> list[MismatchObservation]:
    from pytest_mnnvl.conformance import strategies
    from pytest_mnnvl.conformance.rank import continuation_of, mismatch
    from pytest_mnnvl.model.layers import ModelPlan

    first, second = strategies.mismatch_pair(field)
    if smaller:  # the pair's second layer has the larger value
        first, second = second, first
    world = conformance.world(topology, env=env) if env else conformance.world(topology)
    results: list[MismatchObservation] = world.run(mismatch, conformance.manager, _json(first), _json(second))
    judge = conformance.judge(ModelPlan(((first, second, *continuation_of(first)),) * topology.pp), topology)
    try:
        invariants.check_mismatch(judge, results, field, cls=cls)
    except invariants.InvariantViolation as violation:
        conformance.verdict(violation, violation)
    return results


def _json(layer: Any) -> str:
    import json

    return json.dumps(layer.to_dict())


@pytest.mark.conformance("failed_rebuild_consistent")
def test_failed_rebuild_consistent(conformance: Conformance, mnnvl_topology: Topology) -> None:
    """A rebuild whose allocation fails leaves the previous working state, a retry works, and the layers
    after it initialize, round-trip and rebuild as on a fresh manager that never saw the failure. Then the same
    growth with the build succeeding and the manager's first barrier after it failing: one working state, no
    workspace left behind beyond what the growth leaves when it succeeds, and a retry that works."""
    from pytest_mnnvl.conformance import strategies
    from pytest_mnnvl.conformance.rank import continuation_of, failed_commit, failed_rebuild
    from pytest_mnnvl.model.layers import ModelPlan

    first, second = strategies.growth_pair()
    world = conformance.world(mnnvl_topology)
    results = world.run(failed_rebuild, conformance.manager, _json(first), _json(second))
    plan = ModelPlan(((first, second, *continuation_of(second)),) * mnnvl_topology.pp)
    judge = conformance.judge(plan, mnnvl_topology)
    try:
        invariants.check_failed_rebuild(judge, results)
        # The same growth with the build succeeding and the manager's barrier after it failing.
        commits = world.run(failed_commit, conformance.manager, _json(first), _json(second))
        invariants.check_failed_commit(judge, commits)
    except invariants.InvariantViolation as violation:
        conformance.verdict(violation, violation)


@pytest.mark.conformance("mismatch_survives_O")
@pytest.mark.conformance_last
@pytest.mark.parametrize("field", ["top_k"])
def test_mismatch_survives_O(conformance: Conformance, field: str) -> None:
    """Under ``python -O`` (PYTHONOPTIMIZE=1 in every rank) the mismatch check still raises."""
    results = _mismatch(
        conformance, Topology(2, 1), field, invariants.MismatchUnderOViolation, env={"PYTHONOPTIMIZE": "1"}
    )
    assert all(r.optimize == 1 for r in results), "the ranks did not run under -O"


#: What ``from pytest_mnnvl.conformance.test_invariants import *`` gives (a clone's ``conformance/`` collects the
#: tests that way): every test, nothing else.
__all__ = [name for name in dict(globals()) if name.startswith("test_")]
