"""Rank functions for the manager tests (module level, so ranks can import them by name).

Each one builds a manager from a :class:`~pytest_mnnvl.managers.ManagerFactory` on the rank's EP
group, drives it through an adapter, and returns plain data: normalized states, the collectives
``initialize`` issued, and the outcome of real dispatch + combine round trips through the live
FlashInfer handle. The first round-trip failure ends the round trips of that run: FlashInfer's
``MoeAlltoAll`` stays in the dispatched phase after a failed combine (FACTS §4).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from pytest_mnnvl.layers import LayerSpec
from pytest_mnnvl.managers import ManagerFactory

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


def first_error(result: dict[str, Any]) -> tuple[int, int, str] | None:
    """(step, layer, outcome) of the first failed round trip of a :func:`sequence` result."""
    for step in result["steps"]:
        for layer, outcome in step["round_trips"].items():
            if outcome != "ok":
                return step["layer"], layer, outcome
    return None


def require_sim(config: Any) -> None:
    """Skip unless this run's backend is the sim (the expectations here are the sim's arithmetic)."""
    import pytest

    from pytest_mnnvl.plugin import resolve_backend

    backend = resolve_backend(config)
    if backend != "sim":
        pytest.skip(f"manager rank tests are written for the sim backend (this run uses {backend})")


def _round_trip(ctx: Any, adapter: Any, layer: LayerSpec) -> str:
    """One round trip, then agree on the outcome across the EP group.

    The all-gather is also a barrier, and it is needed: the combine region moves with the dispatch
    size, so a rank that starts the next layer's dispatch while a peer still reads this combine can
    overwrite it (TensorRT-LLM #19312); and a rank that failed alone must not leave its peers
    waiting in the next kernel.
    """
    import torch.distributed as dist

    from pytest_mnnvl.roundtrip import round_trip

    a2a = adapter.moe_alltoall()
    outcome = "ok"
    if a2a is None:
        outcome = "error: no live MoeAlltoAll"
    else:
        try:
            round_trip(a2a, layer, ctx.ep_rank, ctx.ep_size, layer.max_num_tokens, ctx.device)
        except Exception as exc:
            outcome = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    everyone: list[Any] = [None] * ctx.ep_size
    dist.all_gather_object(everyone, outcome, group=ctx.cpu_group)
    if outcome == "ok" and any(o != "ok" for o in everyone):
        return "error: failed on a peer: " + next(o for o in everyone if o != "ok")
    return outcome


def _collectives(calls: Sequence[Any]) -> list[tuple[str, tuple[int, ...]]]:
    return [(c.name, c.group_ranks) for c in calls]


def sequence(
    ctx: Any,
    factory: ManagerFactory,
    stages: Sequence[Sequence[LayerSpec]],
    *,
    round_trips: bool = True,
    earlier: str = "each",
    probes: Sequence[LayerSpec] = (),
    after_cleanup: bool = True,
    cleanup: bool = True,
) -> dict[str, Any]:
    """Initialize the layers of this rank's PP stage in order; after each, round-trip it, and every
    earlier layer too (``earlier="each"``; ``"last"``: after the last initialize only; ``"none"``);
    round-trip ``probes`` (layers never initialized) at the end; then cleanup,
    re-initialize the first layer and round-trip it again. ``cleanup=False`` leaves the manager
    built, as a serving engine does after load."""
    from pytest_mnnvl import audit
    from pytest_mnnvl.backends import records

    layers = list(stages[ctx.pp_stage % len(stages)])
    workspaces_before = records.snapshot().workspace_count
    manager = factory(ctx.cpu_group)
    adapter = factory.adapter(manager)
    steps: list[dict[str, Any]] = []
    failed = False
    previous = adapter.state()
    for index, layer in enumerate(layers):
        with audit.recording() as calls:
            adapter.initialize(layer)
        state = adapter.state()
        step: dict[str, Any] = {
            "layer": index,
            "state": state.record(),
            "rebuilt": not state.same_handle(previous),
            "collectives": _collectives(calls),
            "round_trips": {},
        }
        previous = state
        del state
        if round_trips and not failed:
            recheck = earlier == "each" or (earlier == "last" and index == len(layers) - 1)
            for checked in range(index + 1) if recheck else [index]:
                outcome = _round_trip(ctx, adapter, layers[checked])
                step["round_trips"][checked] = outcome
                if outcome != "ok":
                    failed = True
                    break
        steps.append(step)
    result: dict[str, Any] = {
        "rank": ctx.rank,
        "stage": ctx.pp_stage,
        "steps": steps,
        "probes": {},
        "new_workspaces": records.snapshot().workspace_count - workspaces_before,
    }
    del previous
    if round_trips:
        for index, probe in enumerate(probes):
            if failed:
                break
            outcome = _round_trip(ctx, adapter, probe)
            result["probes"][index] = outcome
            failed = outcome != "ok"
    if not cleanup:
        ctx.scratch.setdefault("kept_managers", []).append(manager)
        return result
    if after_cleanup and layers:
        adapter.cleanup()
        result["after_cleanup"] = adapter.state().record()
        adapter.initialize(layers[0])
        result["reinit"] = adapter.state().record()
        result["reinit_round_trip"] = _round_trip(ctx, adapter, layers[0]) if round_trips and not failed else None
        adapter.cleanup()
    elif layers:
        adapter.cleanup()
    result["new_workspaces_at_end"] = records.snapshot().workspace_count - workspaces_before
    return result


def mismatch(ctx: Any, factory: ManagerFactory, first: LayerSpec, second: LayerSpec) -> dict[str, Any]:
    """Initialize ``first``, then ``second`` (different top_k or num_experts): what was raised, and
    whether the state moved."""
    manager = factory(ctx.cpu_group)
    adapter = factory.adapter(manager)
    adapter.initialize(first)
    before = adapter.state()
    raised = None
    try:
        adapter.initialize(second)
    except Exception as exc:
        raised = type(exc).__name__
    after = adapter.state()
    out = {
        "raised": raised,
        "same_handle": after.same_handle(before),
        "before": before.record(),
        "after": after.record(),
        "optimize": sys.flags.optimize,
    }
    del before, after
    adapter.cleanup()
    return out


def failed_rebuild(ctx: Any, factory: ManagerFactory, first: LayerSpec, second: LayerSpec) -> dict[str, Any]:
    """Grow from ``first`` to ``second`` with the build made to fail, then retry ``second`` normally."""
    from pytest_mnnvl.managers.adapters import inject_build_failure

    manager = factory(ctx.cpu_group)
    adapter = factory.adapter(manager)
    adapter.initialize(first)
    before = adapter.state()
    raised = None
    with inject_build_failure():
        try:
            adapter.initialize(second)
        except Exception as exc:
            raised = type(exc).__name__
    after = adapter.state()
    out: dict[str, Any] = {
        "raised": raised,
        "same_handle": after.same_handle(before),
        "before": before.record(),
        "after_failure": after.record(),
        "first_round_trip": _round_trip(ctx, adapter, first) if after.handle is not None else None,
    }
    del before, after
    adapter.initialize(second)
    out["after_retry"] = adapter.state().record()
    out["retry_round_trip"] = _round_trip(ctx, adapter, second)
    adapter.cleanup()
    return out


def cleanup_twice(ctx: Any, factory: ManagerFactory, layers: Sequence[LayerSpec]) -> dict[str, Any]:
    """Initialize all, cleanup, and report the state and FlashInfer's cached workspaces."""
    from pytest_mnnvl.backends import records

    manager = factory(ctx.cpu_group)
    adapter = factory.adapter(manager)
    for layer in layers:
        adapter.initialize(layer)
    adapter.cleanup()
    state = adapter.state()
    out = {"after_cleanup": state.record(), "workspaces": records.snapshot().workspace_count}
    adapter.cleanup()
    return out


def evict_all_workspaces(ctx: Any) -> int:
    """Drop every cached FlashInfer workspace in this rank, so tests that count them start clean."""
    import sys as _sys

    module = _sys.modules.get("flashinfer.comm.trtllm_moe_alltoall")
    if module is None:
        return 0
    cache = module.MoeAlltoAll._WORKSPACE_CACHE
    count = len(cache)
    cache.clear()
    import gc

    gc.collect()
    return count


def audited_initialize(ctx: Any, factory: ManagerFactory, stages: Sequence[Sequence[LayerSpec]]) -> dict[str, Any]:
    """Initialize this stage's layers under the collective audit; an exception ends the run and is
    returned with whatever was recorded up to it."""
    from pytest_mnnvl import audit

    manager = factory(ctx.cpu_group)
    adapter = factory.adapter(manager)
    raised = None
    with audit.recording() as calls:
        try:
            for layer in stages[ctx.pp_stage % len(stages)]:
                adapter.initialize(layer)
        except Exception as exc:
            raised = f"{type(exc).__name__}: {exc}"
    ctx.scratch.setdefault("kept_managers", []).append(manager)
    return {"collectives": _collectives(calls), "raised": raised}
