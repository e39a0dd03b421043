"""vLLM's own ``FlashInferNVLinkOneSidedManager``, unmodified, on the sim: whichever vLLM is installed.

vLLM is not a dependency (its wheel pins a CUDA torch); these tests run only in a venv made by
``pytest_mnnvl/managers/install_vllm.sh`` (0.33.0: the ``flashinfer.moe_ep`` shape, per-dimension
growth; 0.32.0: the PR #42976 shape, total-need growth). Expected sizes come from the oracle's
model of the version's policy, never from one release's numbers.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from pytest_mnnvl.conformance.rank import mismatch, run_plan
from pytest_mnnvl.managers import ManagerFactory, installed_vllm, resolve
from pytest_mnnvl.model.oracle import trajectory
from tests.manager_rank_fns import BF, GROW_PLAN, NV, NV_2T, NV_TOP4, first_error, layer, plan, raised, require_sim

_FOUND = installed_vllm()
pytestmark = [
    pytest.mark.skipif(
        _FOUND is None or importlib.util.find_spec("vllm") is None,
        reason="vLLM is not installed in this venv: run `pytest_mnnvl/managers/install_vllm.sh 0.33.0 VENV "
        "$PWD` (or 0.32.0), then `VENV/bin/python -m pytest -p pytest_mnnvl tests/test_managers_vllm.py`",
    ),
    pytest.mark.usefixtures("_sim_backend"),
]


@pytest.fixture
def _sim_backend(request: pytest.FixtureRequest) -> None:
    require_sim(request.config)


@pytest.fixture
def factory() -> ManagerFactory:
    return resolve("vllm")


def _expect(factory: ManagerFactory, results: list[dict[str, Any]], world_size: int) -> None:
    assert factory.policy is not None
    expected = trajectory(factory.policy, GROW_PLAN, world_size)
    for result in results:
        steps = result.steps
        assert [s.rebuilt for s in steps] == [e.rebuilt for e in expected]
        assert [s.state.size_per_rank for s in steps] == [e.capacity.size_per_rank for e in expected]
        assert [s.state.max_num_tokens for s in steps] == [e.capacity.max_num_tokens for e in expected]
        assert first_error(result) is None
        assert all(
            set(ranks) == set(range(world_size)) for s in steps for ranks in (c.group_ranks for c in s.collectives)
        )
        assert all(s.collectives == () for s in steps if not s.rebuilt)
        assert not result.after_cleanup.initialized and result.after_cleanup.stamp is None
        assert result.reinit_round_trip == "ok"
    assert len({tuple((s.state.size_per_rank, s.rebuilt) for s in r.steps) for r in results}) == 1


def test_vllm_resolves_to_its_shape(factory: ManagerFactory) -> None:
    assert factory.kind == "vllm" and factory.version is not None
    version = factory.version.split("==")[1]
    assert factory.shape == ("moe_ep" if version.startswith("0.33") else "pr42976")


def test_vllm_grows_skips_never_shrinks_2_ranks(mnnvl_world: Any, factory: ManagerFactory) -> None:
    # run_plan starts from an empty workspace cache; recheck: every earlier layer after each initialize.
    results = mnnvl_world(2, 1).run(run_plan, factory, plan(GROW_PLAN), probes=False, recheck=True)
    _expect(factory, results, 2)
    builds = sum(s.rebuilt for s in results[0].steps)
    # Known, and why the reference exists: vLLM drops superseded handles but FlashInfer's cache
    # keeps every workspace (the frees_superseded SHOULD).
    assert all(r.workspaces_before_cleanup == builds for r in results)


def test_vllm_cross_product_by_policy(mnnvl_world: Any, factory: ManagerFactory) -> None:
    """covers_cross_product: per dimension (0.33) covers bf16 at the largest token count; total
    need (0.32) does not."""
    # The probes: each layout at the largest max tokens, bf16 at 2T (BF_2T) first.
    results = mnnvl_world(2, 1).run(run_plan, factory, plan([BF, NV_2T]), after_cleanup=False, recheck=True)
    for result in results:
        assert first_error(result) is None
        if factory.policy == "per_dimension":
            assert result.probes == {0: "ok", 1: "ok"}
        else:
            assert "workspace" in result.probes[0]


def test_vllm_refuses_mismatch(mnnvl_world: Any, factory: ManagerFactory) -> None:
    for result in mnnvl_world(2, 1).run(mismatch, factory, layer(NV), layer(NV_TOP4)):
        assert raised(result.raised) == "AssertionError"  # vLLM's check is an assert: python -O drops it
        assert result.same_handle and result.after == result.before


def test_vllm_grows_skips_never_shrinks_4_ranks(mnnvl_world: Any, factory: ManagerFactory) -> None:
    _expect(factory, mnnvl_world(4, 1).run(run_plan, factory, plan(GROW_PLAN), probes=False), 4)


def test_vllm_pp2_stages_rebuild_differently(mnnvl_world: Any, factory: ManagerFactory) -> None:
    results = mnnvl_world(4, 2).run(run_plan, factory, plan([NV], [NV, BF, NV_2T]), probes=False, recheck=True)
    for result in results:
        group = {0, 1} if result.stage == 0 else {2, 3}
        assert sum(s.rebuilt for s in result.steps) == (1 if result.stage == 0 else 3)
        assert all(set(ranks) == group for s in result.steps for ranks in (c.group_ranks for c in s.collectives))
        assert first_error(result) is None


def test_vllm_conftest_example_runs_as_documented(pytester: pytest.Pytester) -> None:
    """The test that ``examples/vllm_conftest.py``'s docstring shows, run from a tree with that conftest."""
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "vllm_conftest.py"
    pytester.makeconftest(example.read_text())
    pytester.makepyfile(
        test_grow="""
        import pytest

        def _grow(ctx, factory, layers):
            adapter = factory.adapter(factory(ctx.cpu_group))
            sizes = []
            for layer in layers:
                adapter.initialize(layer)
                sizes.append(adapter.state().size_per_rank)
            adapter.cleanup()
            return sizes

        @pytest.mark.requires_ptrace
        @pytest.mark.mnnvl(world_size=2)
        def test_grows(mnnvl_world, vllm_manager, nvfp4_then_bf16):
            assert mnnvl_world().run(_grow, vllm_manager, nvfp4_then_bf16) == [[5_427_584, 8_442_240]] * 2
        """
    )
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl", "--mnnvl-backend=sim")
    result.assert_outcomes(passed=1)
