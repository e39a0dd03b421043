"""The moe_ep-shaped manager (``moe_ep_reference``): a second correct design the whole suite must pass.

It is the only moe_ep-shaped manager that runs without vLLM 0.33, so these tests are what drives the suite
through the moe_ep adapter (``flashinfer.fused_moe.QuantFormat`` arguments, the handle at ``communication``)
and through a manager's own dispatch path. They run on the installed FlashInfer (0.7.2.post1 or 0.7.4).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from pytest_mnnvl.conformance.dispatch_path import PROBE_LAYER
from pytest_mnnvl.conformance.rank import mismatch
from pytest_mnnvl.managers import adapters, resolve
from pytest_mnnvl.managers.moe_ep_manager import MoeEpManager, Reach
from tests.manager_rank_fns import NV, NV_E16, NV_TOP4, layer, raised, require_sim
from tests.suite_runs import SUITE, run_suite

SPEC = "moe_ep_reference"


def test_resolves_to_a_moe_ep_manager_with_its_own_dispatch_path() -> None:
    factory = resolve(SPEC)
    assert (factory.module, factory.qualname) == ("pytest_mnnvl.managers.moe_ep_manager", "MoeEpManager")
    assert (factory.shape, factory.policy) == ("moe_ep", "per_dimension")
    assert adapters.detect_shape(MoeEpManager) == adapters.Shape("moe_ep", "moe_ep", declared=True)
    assert factory.has_dispatch_path(MoeEpManager)


def test_the_cli_models_it_by_its_declared_policy() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest_mnnvl", "predict", "deepseek-v3-r1-nvfp4-mtp", "--manager", SPEC, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["manager"], out["policy"]) == (SPEC, "per_dimension")
    assert out["policy_source"] == "declared by MoeEpManager.mnnvl_policy"


def test_reach_grows_each_dimension_to_its_maximum() -> None:
    wide, long = Reach(64, 7168, 4032), Reach(256, 2048, 4096)
    grown = wide.grown_by(long)
    assert grown == Reach(256, 7168, 4096)
    assert grown.admits(wide) and grown.admits(long)
    assert not wide.admits(long) and not long.admits(wide)
    # Routing (int32 ids + fp32 weights per top-k) is added to the dispatch bytes; combine is bf16.
    assert grown.capacity(top_k=8).dispatch_bytes_per_token == 4096 + 8 * 8
    assert grown.capacity(top_k=8).combine_bytes_per_token == 7168 * 2


def test_moe_ep_arguments_take_a_mapping_of_formats() -> None:
    """``moe_ep_kwargs`` accepts a name -> format Mapping as well as the ``QuantFormat`` enum (read by name)."""
    marker = object()
    kwargs = adapters.moe_ep_kwargs(NV, {NV.quant.flashinfer_name: marker})
    assert kwargs["dispatch_format"] is marker


@pytest.mark.parametrize("second", [NV_TOP4, NV_E16], ids=["top_k", "num_experts"])
def test_refuses_another_expert_layout_with_its_own_exception(
    request: pytest.FixtureRequest, mnnvl_world: Any, second: Any
) -> None:
    require_sim(request.config)
    for result in mnnvl_world(2, 1).run(mismatch, resolve(SPEC), layer(NV), layer(second)):
        assert raised(result.raised) == "ExpertLayoutChanged"
        assert result.same_handle and result.after == result.before
        assert result.round_trip_after == "ok"


def _dispatch_path_name(ctx: Any, factory: Any) -> str | None:
    """In a rank: the name of the dispatch path the suite would send its probe batch through (nothing is built)."""
    path = factory.adapter(factory(ctx.cpu_group)).dispatch_path(PROBE_LAYER)
    return None if path is None else str(path.name)


def test_its_adapter_hands_the_suite_its_own_dispatch_path(request: pytest.FixtureRequest, mnnvl_world: Any) -> None:
    """The path the suite is handed must be the manager's own methods."""
    require_sim(request.config)
    names = mnnvl_world(2, 1).run(_dispatch_path_name, resolve(SPEC))
    assert names == ["MoeEpManager.mnnvl_dispatch/mnnvl_combine"] * 2


def _check_with_the_path_lost(ctx: Any, factory: Any) -> str:
    """In a rank: the suite's dispatch-path check with the adapters made to lose the manager's own path (a
    harness defect, as a mutation of ``own_dispatch_path`` makes it); the error it raises, first line."""
    from pytest_mnnvl.conformance import dispatch_path

    saved = adapters.own_dispatch_path
    adapters.own_dispatch_path = lambda manager: None
    try:
        dispatch_path.check(ctx, factory)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        adapters.own_dispatch_path = saved
    return "no error"


def test_a_dispatch_path_the_harness_loses_is_a_harness_fault(request: pytest.FixtureRequest, mnnvl_world: Any) -> None:
    """The check runs only for a manager whose class has a path; an adapter that then builds none used to make it
    return quietly ("none"), so the manager passed with its path unchecked."""
    require_sim(request.config)
    errors = mnnvl_world(2, 1).run(_check_with_the_path_lost, resolve(SPEC))
    assert all(e.startswith("HarnessFault: ") and "the adapter built none" in e for e in errors), errors


@pytest.mark.skipif(not SUITE.exists(), reason="the conformance suite is not in this checkout")
def test_the_whole_suite_passes_it_strictly(pytester: pytest.Pytester) -> None:
    """Every MUST and SHOULD on ws2-pp1 (pp_deadlock_freedom needs PP > 1) plus the ``python -O`` mismatch."""
    result, report = run_suite(
        pytester, str(SUITE), "-k", "ws2-pp1 or mismatch_survives_O", "--mnnvl-strict", manager=SPEC
    )
    statuses = {name: verdict["status"] for name, verdict in report["invariants"].items()}
    assert statuses.pop("pp_deadlock_freedom") == "not_run"
    assert set(statuses.values()) == {"pass"}, statuses
    assert result.ret == 0, result.stdout.str()[-3000:]
    assert report["manager"]["shape"] == "moe_ep"
