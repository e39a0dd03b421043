"""Inside ranks: run one conformance plan on a manager and return plain observations.

Every function here runs on every rank of a world (``world.run(fn, ...)``) and returns picklable
data; the parent (:mod:`pytest_mnnvl.conformance.invariants`) judges it. What is observed:

- per ``initialize``: what it raised, the normalized state read from the live FlashInfer handle,
  whether the handle changed (by kept reference, never ``id()``), and every torch.distributed
  collective issued inside the call with the global ranks of its group;
- a dispatch + combine round trip of each layer at its full token count right after its own
  ``initialize`` (a defect can hide behind a later, larger layer that grows the workspace), and of
  every earlier layer after the last ``initialize``; optionally "cross-product" probes (each layout
  at the largest token count seen); the first failure ends the round trips (FlashInfer stays in the
  dispatched phase after a failed combine, so later ones would only report the cascade);
- FlashInfer's workspace records (superseded ones leak there: 0.7.2's cache keeps what nobody
  evicts, 0.7.4's table what nobody destroyed), ``cleanup()`` and a re-``initialize``.

Every decision that peers must take together (did anyone raise, did a round trip fail anywhere)
is all-gathered over the EP group. Those gathers are the harness's bookkeeping, absent from a
forward pass, so the sim's race detector does not count them as order (a manager whose
``initialize`` writes a live workspace without its own EP synchronisation is caught); the EP
barrier every round trip starts with is the one consecutive layouts need (TensorRT-LLM #19312).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from pytest_mnnvl.managers import ManagerFactory
from pytest_mnnvl.model import releases
from pytest_mnnvl.model.layers import LayerSpec, ModelPlan

OK = "ok"


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _gather(ctx: Any, value: Any) -> list[Any]:
    import torch.distributed as dist

    from pytest_mnnvl.backends import _hazards

    out: list[Any] = [None] * ctx.ep_size
    with _hazards.harness_only():
        dist.all_gather_object(out, value, group=ctx.cpu_group)
    return out


def evict_workspaces() -> int:
    """Drop FlashInfer's leftover workspaces of this process, so each plan starts from a clean table
    (0.7.2: ``MoeAlltoAll._WORKSPACE_CACHE``; 0.7.4: the ``NVLinkOneSidedAlltoAll._WORKSPACES``
    entries no one destroyed)."""
    import gc

    from pytest_mnnvl.managers import handles

    count = handles.api().evict_all()
    # Usually dropping the cache frees every allocation by reference counting; a full collection
    # (~0.1 s with torch loaded, a third of a small plan) runs only when some allocation survived.
    from pytest_mnnvl.backends import records

    if records.snapshot().allocations:
        gc.collect()
    return count


def _workspace_tables() -> list[str]:
    """The FlashInfer workspace tables this process can read (none: the counts say nothing)."""
    from pytest_mnnvl.backends import records

    return list(records.snapshot().tables)


def _workspace_count() -> int:
    from pytest_mnnvl.backends import records

    return records.snapshot().workspace_count


def round_trip(ctx: Any, adapter: Any, layer: LayerSpec, tokens: int | None = None) -> str:
    """One verified dispatch + combine of ``layer`` through the live handle; the outcome agreed by
    the EP group (``ok``, or the first line of this rank's error, or the peer's)."""
    from pytest_mnnvl.conformance.roundtrip import ep_barrier
    from pytest_mnnvl.conformance.roundtrip import round_trip as verified_round_trip

    ep_barrier(ctx)
    a2a = adapter.moe_alltoall()
    outcome = OK
    if a2a is None:
        outcome = "error: no live FlashInfer handle"
    else:
        try:
            verified_round_trip(a2a, layer, ctx.ep_rank, ctx.ep_size, tokens or layer.max_num_tokens, ctx.device)
        except Exception as exc:
            outcome = "error: " + _first_line(exc)
    everyone = _gather(ctx, outcome)
    if outcome == OK and any(o != OK for o in everyone):
        return "error: failed on a peer: " + next(o for o in everyone if o != OK)
    return outcome


def _collectives(calls: Sequence[Any]) -> list[tuple[str, tuple[int, ...]]]:
    return [(c.name, tuple(c.group_ranks)) for c in calls]


def _initialize(ctx: Any, adapter: Any, layer: LayerSpec) -> tuple[str | None, list[tuple[str, tuple[int, ...]]]]:
    from pytest_mnnvl.worlds import audit

    raised = None
    with audit.recording() as calls:
        try:
            adapter.initialize(layer)
        except Exception as exc:
            raised = _first_line(exc)
    return raised, _collectives(calls)


def cross_product_probes(layers: Sequence[LayerSpec]) -> list[LayerSpec]:
    """Each distinct payload layout of ``layers`` at the largest max tokens among them."""
    if not layers:
        return []
    tokens = max(layer.max_num_tokens for layer in layers)
    probes: list[LayerSpec] = []
    seen: set[tuple[Any, ...]] = set()
    for layer in layers:
        key = (layer.quant, layer.hidden_size, layer.extra_payload_bytes_per_token, layer.mx_alignment)
        if key in seen:
            continue
        seen.add(key)
        probes.append(dataclasses.replace(layer, max_num_tokens=tokens, name=f"{layer.name or 'layer'}@maxT"))
    return probes


def load_manager(ctx: Any, factory: ManagerFactory) -> str:
    """Import the manager's class (and whatever it imports) ahead of any timed call."""
    return factory.load().__qualname__


def run_plan(
    ctx: Any,
    factory: ManagerFactory,
    plan_json: str,
    *,
    probes: bool = True,
    after_cleanup: bool = True,
    recheck: bool = False,
) -> dict[str, Any]:
    """Run this rank's PP stage of ``plan_json`` on a fresh manager; see the module docstring.

    ``recheck``: after each ``initialize``, also round-trip every earlier layer
    (``step["earlier_round_trips"]``), not only after the last one: a stricter check the manager tests
    use, which the suite skips for time."""
    plan = ModelPlan.from_json(plan_json)
    layers = list(plan.layers_of_stage(ctx.pp_stage)) if plan.pp > ctx.pp_stage else []
    evict_workspaces()
    workspaces_before = _workspace_count()
    result: dict[str, Any] = {
        "rank": ctx.rank,
        "stage": ctx.pp_stage,
        "ep_rank": ctx.ep_rank,
        "ep_group": tuple(_ep_members(ctx)),
        "steps": [],
        "late_round_trips": {},
        "probes": {},
        "stopped": None,
        # What the ranks run: the workspace tables and the leak expectation follow it.
        "release": releases.current(),
    }
    if not layers:
        return result
    manager = factory(ctx.cpu_group)
    adapter = factory.adapter(manager)
    previous = adapter.state()
    failed = False
    for index, layer in enumerate(layers):
        raised, collectives = _initialize(ctx, adapter, layer)
        state = adapter.state()
        rebuilt = state.handle is not None and not state.same_handle(previous)
        step: dict[str, Any] = {
            "layer": index,
            "raised": raised,
            "state": state.record(),
            "rebuilt": rebuilt,
            "collectives": collectives,
            "round_trip": None,
        }
        previous = state
        del state
        result["steps"].append(step)
        anyone_raised = [r for r in _gather(ctx, raised) if r is not None]
        if anyone_raised:
            result["stopped"] = f"initialize of layer {index} raised: {anyone_raised[0]}"
            break
        if not failed:
            step["round_trip"] = round_trip(ctx, adapter, layer)
            failed = step["round_trip"] != OK
        if recheck and not failed and index:
            step["earlier_round_trips"] = {}
            for earlier in range(index):
                outcome = round_trip(ctx, adapter, layers[earlier])
                step["earlier_round_trips"][earlier] = outcome
                if outcome != OK:
                    failed = True
                    break
    if result["stopped"] is None and not failed and recheck:
        # The last step already round-tripped every earlier layer after the last initialize.
        result["late_round_trips"] = dict(result["steps"][-1].get("earlier_round_trips", {}))
    elif result["stopped"] is None and not failed:
        for index in range(len(layers) - 1):
            outcome = round_trip(ctx, adapter, layers[index])
            result["late_round_trips"][index] = outcome
            if outcome != OK:
                failed = True
                break
    if probes and result["stopped"] is None and not failed:
        for index, probe in enumerate(cross_product_probes(layers)):
            outcome = round_trip(ctx, adapter, probe)
            result["probes"][index] = outcome
            if outcome != OK:
                break
    final = adapter.state()
    result["final_has_handle"] = final.handle is not None
    del final, previous
    result["workspaces_before_cleanup"] = _workspace_count() - workspaces_before
    result["tables"] = _workspace_tables()
    if after_cleanup:
        try:
            adapter.cleanup()
            result["cleanup_raised"] = None
        except Exception as exc:
            result["cleanup_raised"] = _first_line(exc)
        result["after_cleanup"] = adapter.state().record()
        raised, collectives = _initialize(ctx, adapter, layers[0])
        result["reinit_raised"] = raised
        result["reinit"] = adapter.state().record()
        result["reinit_collectives"] = collectives
        if not [r for r in _gather(ctx, raised) if r is not None]:
            result["reinit_round_trip"] = round_trip(ctx, adapter, layers[0])
        try:
            adapter.cleanup()
        except Exception as exc:
            result["second_cleanup_raised"] = _first_line(exc)
    else:
        adapter.cleanup()
    result["workspaces_at_end"] = _workspace_count() - workspaces_before
    # EP symmetry is all-gathered here, not assumed: every rank sees what its peers decided.
    result["ep_view"] = _gather(ctx, _decisions(result))
    return result


def _ep_members(ctx: Any) -> list[int]:
    return [int(r) for r in ctx.ep_group_ranks]


def _decisions(result: dict[str, Any]) -> list[Any]:
    """What every rank of an EP group must agree on (stamps are per process, so left out)."""
    out: list[Any] = []
    for step in result["steps"]:
        s = step["state"]
        out.append(
            (
                step["layer"],
                step["raised"] is None,
                step["rebuilt"],
                s.initialized,
                s.stamp is not None,
                s.size_per_rank,
                s.max_num_tokens,
                s.top_k,
                s.num_experts,
                len(step["collectives"]),
                s.layout,  # FlashInfer 0.7.4's regions (None on 0.7.2): peers must agree on them too
            )
        )
    return out


def _initialized_on_first(
    ctx: Any, factory: ManagerFactory, first_json: str, second_json: str
) -> tuple[Any, LayerSpec, LayerSpec]:
    """A fresh manager on a clean workspace cache, initialized with ``first``; the two layers parsed."""
    first = LayerSpec(**_layer_dict(first_json))
    second = LayerSpec(**_layer_dict(second_json))
    evict_workspaces()
    adapter = factory.adapter(factory(ctx.cpu_group))
    adapter.initialize(first)
    return adapter, first, second


def mismatch(ctx: Any, factory: ManagerFactory, first_json: str, second_json: str) -> dict[str, Any]:
    """Initialize ``first``, then ``second`` (another top_k or num_experts): what was raised, and
    whether state, handle or collectives moved."""
    import sys

    adapter, first, second = _initialized_on_first(ctx, factory, first_json, second_json)
    before = adapter.state()
    raised, collectives = _initialize(ctx, adapter, second)
    after = adapter.state()
    out: dict[str, Any] = {
        "rank": ctx.rank,
        "raised": raised,
        "same_handle": after.same_handle(before),
        "before": before.record(),
        "after": after.record(),
        "collectives": collectives,
        "optimize": sys.flags.optimize,
    }
    unchanged = out["same_handle"] and out["after"] == out["before"]
    del before, after
    # A handle that already moved is a verdict by itself; round-tripping it could hang the sim.
    everyone = _gather(ctx, unchanged)
    out["round_trip_after"] = round_trip(ctx, adapter, first) if all(everyone) else None
    adapter.cleanup()
    return out


def failed_rebuild(ctx: Any, factory: ManagerFactory, first_json: str, second_json: str) -> dict[str, Any]:
    """Grow from ``first`` to ``second`` with FlashInfer's workspace allocation made to fail, then
    retry ``second`` normally."""
    from pytest_mnnvl.managers.adapters import inject_build_failure

    adapter, first, second = _initialized_on_first(ctx, factory, first_json, second_json)
    before = adapter.state()
    with inject_build_failure():
        raised, _ = _initialize(ctx, adapter, second)
    after = adapter.state()
    out: dict[str, Any] = {
        "rank": ctx.rank,
        "raised": raised,
        "same_handle": after.same_handle(before),
        "before": before.record(),
        "after_failure": after.record(),
    }
    has_handle = [h for h in _gather(ctx, after.handle is not None) if h]
    del before, after
    out["first_round_trip"] = round_trip(ctx, adapter, first) if len(has_handle) == ctx.ep_size else None
    retry_raised, _ = _initialize(ctx, adapter, second)
    out["retry_raised"] = retry_raised
    out["after_retry"] = adapter.state().record()
    if not [r for r in _gather(ctx, retry_raised) if r is not None]:
        out["retry_round_trip"] = round_trip(ctx, adapter, second)
    else:
        out["retry_round_trip"] = None
    try:
        adapter.cleanup()
    except Exception as exc:
        out["cleanup_raised"] = _first_line(exc)
    return out


def _layer_dict(text: str) -> dict[str, Any]:
    import json

    data = json.loads(text)
    assert isinstance(data, dict)
    return data
