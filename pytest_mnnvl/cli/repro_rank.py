"""The rank side of ``repro`` (and of ``explain --observe``): runs inside every rank of a pool world.

A session lives in ``ctx.scratch`` between calls, so the parent can drive the plan one layer step
at a time (one call per step, each under the per-call timeout) and print progress as it goes.
Each rank works on its own PP stage's layers; a stage that failed stops there (FlashInfer's
``MoeAlltoAll`` stays in the dispatched phase after a failed combine, and the next dispatch would
only report the cascade: ``dispatch called twice without combine``).

Two drivers: ``("manager", factory)`` builds the real manager (``pytest_mnnvl.managers``) on the
EP group and calls its ``initialize`` through the adapter of its shape; ``("policy", name)``
stands in for a manager when only an oracle policy is given: the parent sends, per step, whether
to build a new ``MoeAlltoAll`` and at which size, and the rank builds exactly that.
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass, field
from typing import Any

from pytest_mnnvl.model.layers import LayerSpec

SESSION_KEY = "pytest_mnnvl.cli.repro"
#: The phase of a failure in :func:`final_pass` (the others: ``initialize``, ``round_trip``).
FINAL_PASS = "final_pass"


@dataclass
class _Session:
    driver: str
    adapter: Any = None
    handle: Any = None  # the policy driver's live MoeAlltoAll
    stamp: int = 0
    failed: bool = False
    #: Layers that round-tripped fine on the live handle: layer -> index of the first one.
    verified: dict[LayerSpec, int] = field(default_factory=dict)
    last_stamp: Any = None


def open_session(ctx: Any, driver: tuple[str, Any]) -> dict[str, Any]:
    """Build the manager (manager driver) or nothing yet (policy driver) on this rank."""
    kind, what = driver
    session = _Session(kind)
    if kind == "manager":
        manager = what(ctx.cpu_group)
        session.adapter = what.adapter(manager)
    ctx.scratch[SESSION_KEY] = session
    return {"rank": ctx.rank, "stage": ctx.pp_stage, "ep_rank": ctx.ep_rank, "device": str(ctx.device)}


def _error(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc), "traceback": "".join(traceback.format_exception(exc))}


def _build(ctx: Any, layer: LayerSpec, size_per_rank: int, max_num_tokens: int) -> Any:
    """A ``MoeAlltoAll`` on this rank's EP group with exactly these sizes (the policy driver)."""
    from pytest_mnnvl.conformance.roundtrip import build_alltoall

    return build_alltoall(
        ctx,
        max_num_tokens=max_num_tokens,
        top_k=layer.top_k,
        num_experts=layer.num_experts,
        size_per_rank=size_per_rank,
    )


def _release(handle: Any) -> None:
    with contextlib.suppress(KeyError, RuntimeError, AttributeError):
        handle._reset_workspace()


def _initialize(ctx: Any, s: _Session, layer: LayerSpec, build: tuple[int, int] | None) -> dict[str, Any]:
    """Run one ``initialize``; returns the state the live handle is in afterwards."""
    if s.driver == "manager":
        s.adapter.initialize(layer)
        state = s.adapter.state()
        a2a = state.moe_alltoall
        ident = state.stamp
    else:
        if build is not None:
            old = s.handle
            s.handle = _build(ctx, layer, *build)
            s.stamp += 1
            if old is not None:
                _release(old)
        a2a = s.handle
        ident = s.stamp
    rebuilt = ident != s.last_stamp
    if rebuilt:
        s.verified.clear()
    s.last_stamp = ident
    return {
        "a2a": a2a,
        "stamp": ident,
        "rebuilt": rebuilt,
        "size_per_rank": None if a2a is None else int(a2a.workspace_size_per_rank),
        "max_num_tokens": None if a2a is None else int(a2a.max_num_tokens),
    }


def step(
    ctx: Any,
    index: int,
    work: dict[int, tuple[LayerSpec, tuple[int, int] | None]],
    round_trip: bool,
    every_layer: bool,
) -> dict[str, Any] | None:
    """Initialize layer ``index`` of this rank's stage (``work[stage]``), then round-trip it at its full
    token count. ``None`` when this stage has no such layer or already failed."""
    from pytest_mnnvl.conformance.roundtrip import ep_barrier
    from pytest_mnnvl.conformance.roundtrip import round_trip as do_round_trip

    s: _Session = ctx.scratch[SESSION_KEY]
    if s.failed or ctx.pp_stage not in work:
        return None
    from pytest_mnnvl.backends import _hazards

    # The parent's step-by-step calls are the tool's bookkeeping: a forward pass runs the next
    # initialize right after the last combine, so the race detector must not count them as order.
    _hazards.undo_call_boundary()
    layer, build = work[ctx.pp_stage]
    out: dict[str, Any] = {"rank": ctx.rank, "stage": ctx.pp_stage, "ep_rank": ctx.ep_rank, "index": index}
    try:
        state = _initialize(ctx, s, layer, build)
    except Exception as exc:
        s.failed = True
        out.update(phase="initialize", error=_error(exc))
        return out
    a2a = state.pop("a2a")
    out["state"] = state
    if not round_trip:
        return out
    if a2a is None:
        s.failed = True
        out.update(
            phase="initialize",
            error={"type": "RuntimeError", "message": "no live handle after initialize", "traceback": ""},
        )
        return out
    same_as = s.verified.get(layer)
    if same_as is not None and not every_layer:
        out["round_trip"] = {"ok": True, "same_as": same_as}
        return out
    try:
        ep_barrier(ctx)
        result = do_round_trip(a2a, layer, ctx.ep_rank, ctx.ep_size, layer.max_num_tokens, ctx.device)
    except Exception as exc:
        s.failed = True
        out.update(phase="round_trip", error=_error(exc))
        return out
    s.verified.setdefault(layer, index)
    out["round_trip"] = {"ok": True, "same_as": None, "combine_payload_offset": result.combine_payload_offset}
    return out


def final_pass(ctx: Any, layers_by_stage: dict[int, tuple[LayerSpec, ...]]) -> dict[str, Any] | None:
    """After the last ``initialize``: round-trip every layer of this rank's stage again on the handle the
    manager ended with, as the next forward pass runs them (FlashInfer's combine region moves with the
    handle's max tokens, so a layer that fit its own step can overflow a handle built later). Layers
    already round-tripped on this same handle are not repeated. ``None`` when this stage has nothing to do
    (not in ``layers_by_stage``, or an earlier step failed)."""
    from pytest_mnnvl.conformance.roundtrip import round_trip as do_round_trip

    s: _Session = ctx.scratch[SESSION_KEY]
    if s.failed or ctx.pp_stage not in layers_by_stage:
        return None
    a2a = s.adapter.state().moe_alltoall if s.driver == "manager" else s.handle
    out: dict[str, Any] = {"rank": ctx.rank, "stage": ctx.pp_stage, "ep_rank": ctx.ep_rank, "checked": []}
    if a2a is None:
        return out
    import torch.distributed as dist

    for index, layer in enumerate(layers_by_stage[ctx.pp_stage]):
        if layer in s.verified:
            continue
        error = None
        try:
            do_round_trip(a2a, layer, ctx.ep_rank, ctx.ep_size, layer.max_num_tokens, ctx.device)
        except Exception as exc:
            error = _error(exc)
        # Agreeing on the outcome is also the EP barrier consecutive layouts need (TensorRT-LLM #19312):
        # without it a fast rank's next dispatch can overwrite combine slots a peer is still reading.
        everyone: list[Any] = [None] * ctx.ep_size
        dist.all_gather_object(everyone, error is None, group=ctx.cpu_group)
        if error is not None:
            s.failed = True
            out.update(index=index, phase=FINAL_PASS, error=error)
            return out
        if not all(everyone):
            s.failed = True
            return out
        s.verified[layer] = index
        out["checked"].append(index)
    return out


def close_session(ctx: Any) -> None:
    """Release what the session holds (best effort: after a failure FlashInfer's state may be odd)."""
    s: _Session | None = ctx.scratch.pop(SESSION_KEY, None)
    if s is None:
        return
    if s.driver == "manager" and s.adapter is not None and not s.failed:
        with contextlib.suppress(Exception):
            s.adapter.cleanup()
    if s.handle is not None:
        _release(s.handle)
