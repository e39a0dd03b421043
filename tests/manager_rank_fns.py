"""What the manager tests share: small layers, plans as JSON, and readers of rank results.

The rank functions themselves are the conformance suite's (:mod:`pytest_mnnvl.conformance.rank`:
``run_plan``, ``mismatch``, ``failed_rebuild``), so these tests exercise the very code that judges
vendors' managers. What stays here is test-specific: the layer geometry (small, so the sim's host
kernels stay fast), :func:`first_error`, which finds the first thing that went wrong in a
``run_plan`` result, and :func:`cleanup_twice`, a check the suite does not make.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pytest_mnnvl.conformance.observations import PlanObservation
from pytest_mnnvl.managers import ManagerFactory
from pytest_mnnvl.model.layers import LayerSpec, ModelPlan

H, K, E, T = 512, 2, 8, 32
NV = LayerSpec("nvfp4", H, K, E, T, name="nv")
NV_HALF = LayerSpec("nvfp4", H, K, E, T // 2, name="nv-half")
NV_2T = LayerSpec("nvfp4", H, K, E, 2 * T, name="nv-double")
BF = LayerSpec("bf16", H, K, E, T, name="bf")
BF_2T = LayerSpec("bf16", H, K, E, 2 * T, name="bf-double")
WIDE = LayerSpec("nvfp4", 2 * H, K, E, T, name="wide")  # combine bytes above every bf16 layer's at H
NV_TOP4 = LayerSpec("nvfp4", H, 4, E, T, name="nv-top4")
NV_E16 = LayerSpec("nvfp4", H, K, 16, T, name="nv-e16")

#: Grow (bytes), no-rebuild (same, smaller), grow (tokens), no-rebuild (dominated by the union).
GROW_PLAN = [NV, BF, NV, NV_HALF, NV_2T, BF]


def plan(*stages: Sequence[LayerSpec]) -> str:
    """``run_plan``'s argument: one list of layers per PP stage."""
    return ModelPlan(tuple(tuple(stage) for stage in stages)).to_json(indent=None)


def layer(spec: LayerSpec) -> str:
    """``mismatch``'s and ``failed_rebuild``'s arguments."""
    return json.dumps(spec.to_dict())


def raised(text: str | None) -> str | None:
    """The exception type of a recorded ``"Type: first line"``."""
    return text.split(":", 1)[0] if text else None


def first_error(result: PlanObservation) -> tuple[int, int, str] | None:
    """(step, layer, what) of the first failure in a ``run_plan`` result: an ``initialize`` that raised,
    a failed round trip (its own layer, or an earlier one after it), a cleanup or re-initialize that
    raised. Probes (the cross product, a SHOULD) are left to the tests that want them."""
    steps = result.steps
    for step in steps:
        index = step.layer
        if step.raised is not None:
            return index, index, f"initialize raised {step.raised}"
        if step.round_trip not in (None, "ok"):
            return index, index, step.round_trip
        for earlier, outcome in step.earlier_round_trips.items():
            if outcome != "ok":
                return index, earlier, outcome
    if result.stopped is not None:
        return len(steps) - 1, len(steps) - 1, result.stopped
    for earlier, outcome in result.late_round_trips.items():
        if outcome != "ok":
            return len(steps) - 1, earlier, outcome
    for key, raised in (
        ("cleanup_raised", result.cleanup_raised),
        ("reinit_raised", result.reinit_raised),
        ("second_cleanup_raised", result.second_cleanup_raised),
    ):
        if raised:
            return len(steps) - 1, 0, f"{key}: {raised}"
    return None


def cleanup_twice(ctx: Any, factory: ManagerFactory, layers: Sequence[LayerSpec]) -> dict[str, Any]:
    """A rank function the suite has no twin of: initialize all, then ``cleanup()`` twice in a row
    (the second must be harmless); the state after the first and FlashInfer's cached workspaces."""
    from pytest_mnnvl.backends import records

    adapter = factory.adapter(factory(ctx.cpu_group))
    for spec in layers:
        adapter.initialize(spec)
    adapter.cleanup()
    out = {"after_cleanup": adapter.state().record(), "workspaces": records.snapshot().workspace_count}
    adapter.cleanup()
    return out


def require_sim(config: Any) -> None:
    """Skip unless this run's backend is the sim (the expectations here are the sim's arithmetic)."""
    import pytest

    from pytest_mnnvl.session import resolve_backend

    backend = resolve_backend(config)
    if backend != "sim":
        pytest.skip(f"manager rank tests are written for the sim backend (this run uses {backend})")
