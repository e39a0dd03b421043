"""The rank side of ``repro`` (and of ``explain --observe``): runs inside every rank of a pool world.

A session lives in ``ctx.scratch`` between calls, so the parent can drive the plan one layer step
at a time (one call per step, each under the per-call timeout) and print progress as it goes.
Each rank works on its own PP stage's layers; a stage that failed stops there (FlashInfer's
``MoeAlltoAll`` stays in the dispatched phase after a failed combine, and the next dispatch would
only report the cascade: ``dispatch called twice without combine``).

Each step is the conformance suite's own (:func:`pytest_mnnvl.conformance.rank.layer_step`), so repro
runs what the suite's ranks run, on every FlashInfer release the suite supports. Two drivers:
``("manager", factory)`` builds the real manager (``pytest_mnnvl.managers``) on the EP group and calls
its ``initialize`` through the adapter of its shape; ``("policy", name)`` stands in for a manager when
only an oracle policy is given (:class:`PolicyAdapter`): the parent sends, per step, whether to build a
new handle and for which capacity, and the rank builds exactly that.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from pytest_mnnvl.conformance.observations import OK, CallError, LayerStep, Phase
from pytest_mnnvl.conformance.rank import Walk, agreed_round_trip, layer_step
from pytest_mnnvl.managers.adapters import ManagerState
from pytest_mnnvl.model.layers import LayerSpec
from pytest_mnnvl.model.oracle import Capacity

SESSION_KEY = "pytest_mnnvl.cli.repro"
#: The phase of a failure in :func:`final_pass` (the others: ``initialize``, ``round_trip``).
FINAL_PASS = Phase.FINAL_PASS


class PolicyAdapter:
    """A manager's adapter for a policy: ``initialize`` builds exactly the capacity the parent sent for this
    step (``pending``; ``None``: keep the live handle), through the installed release's handle API, and
    releases the handle it replaces."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.handle: Any = None
        self.pending: Capacity | None = None

    def initialize(self, layer: LayerSpec) -> None:
        capacity, self.pending = self.pending, None
        if capacity is None:
            return
        old, self.handle = self.handle, _build(self.ctx, layer, capacity)
        if old is not None:
            self._release(old, keep=self.handle)

    def _release(self, handle: Any, keep: Any = None) -> None:
        from pytest_mnnvl.managers import handles

        with contextlib.suppress(KeyError, RuntimeError, AttributeError):
            handles.api().builder(self.ctx.ep_rank, self.ctx.ep_size).release(handle, keep)

    def moe_alltoall(self) -> Any:
        return self.handle

    def state(self) -> ManagerState:
        from pytest_mnnvl.managers import adapters, handles

        a2a = self.handle
        facts = handles.api().facts(a2a) if a2a is not None else handles.HandleFacts(None, None, None, None)
        return ManagerState(
            initialized=a2a is not None,
            handle=a2a,
            moe_alltoall=a2a,
            stamp=adapters.stamp(a2a),
            size_per_rank=facts.size_per_rank,
            max_num_tokens=facts.max_num_tokens,
            top_k=facts.top_k,
            num_experts=facts.num_experts,
            layout=facts.layout,
        )

    def cleanup(self) -> None:
        old, self.handle = self.handle, None
        if old is not None:
            self._release(old)


def _build(ctx: Any, layer: LayerSpec, capacity: Capacity) -> Any:
    """A handle on this rank's EP group for exactly ``capacity`` (0.7.2: its bytes per rank; 0.7.4: its
    per-token bytes, the handle sizes itself from them)."""
    from pytest_mnnvl.conformance.roundtrip import build_alltoall
    from pytest_mnnvl.managers.reference import EpComm
    from pytest_mnnvl.model import releases

    if releases.current() == releases.V072:
        sizes = {"size_per_rank": capacity.size_per_rank}
    else:
        sizes = {
            "dispatch_bytes_per_token": capacity.dispatch_bytes_per_token,
            "combine_bytes_per_token": capacity.combine_bytes_per_token,
        }
    # EpComm: the allocation's collectives stay on the EP group, as a correct manager's must (on a PP plan the
    # stages build at different steps; FlashInfer's TorchDistBackend would make world-wide groups and deadlock).
    return build_alltoall(
        ctx,
        max_num_tokens=capacity.max_num_tokens,
        top_k=layer.top_k,
        num_experts=layer.num_experts,
        comm=EpComm(ctx.cpu_group),
        **sizes,
    )


@dataclass
class _Session:
    walk: Walk
    #: This rank's stage stopped (a step failed somewhere in its EP group).
    failed: bool = False
    #: The policy driver's adapter (its ``pending`` build is set per step), else ``None``.
    policy: PolicyAdapter | None = None


@dataclass(frozen=True)
class RankStep:
    """One rank's layer step, as the parent receives it."""

    rank: int
    stage: int
    ep_rank: int
    index: int
    step: LayerStep


@dataclass(frozen=True)
class FinalPass:
    """One rank's final pass: the layers round-tripped again on the final handle, and the first that failed
    on this rank (``index``, ``error``)."""

    rank: int
    stage: int
    ep_rank: int
    checked: tuple[int, ...] = ()
    index: int | None = None
    error: CallError | None = None


def open_session(ctx: Any, driver: tuple[str, Any]) -> dict[str, Any]:
    """Build the manager (manager driver) or nothing yet (policy driver) on this rank."""
    kind, what = driver
    policy = None
    if kind == "manager":
        adapter = what.adapter(what(ctx.cpu_group))
    else:
        adapter = policy = PolicyAdapter(ctx)
    ctx.scratch[SESSION_KEY] = _Session(Walk.start(adapter), policy=policy)
    return {"rank": ctx.rank, "stage": ctx.pp_stage, "ep_rank": ctx.ep_rank, "device": str(ctx.device)}


def step(
    ctx: Any,
    index: int,
    work: dict[int, tuple[LayerSpec, Capacity | None]],
    round_trip: bool,
    every_layer: bool,
) -> RankStep | None:
    """Layer step ``index`` of this rank's stage (``work[stage]``: the layer, and for the policy driver the
    capacity to build, if any), by the conformance suite's own step function: ``initialize``, then a round
    trip at its full token count. ``None`` when this stage has no such layer or already failed."""
    s: _Session = ctx.scratch[SESSION_KEY]
    if s.failed or ctx.pp_stage not in work:
        return None
    from pytest_mnnvl.backends import _hazards

    # The parent's step-by-step calls are the tool's bookkeeping: a forward pass runs the next
    # initialize right after the last combine, so the race detector must not count them as order.
    _hazards.undo_call_boundary()
    layer, build = work[ctx.pp_stage]
    if s.policy is not None:
        s.policy.pending = build
    observed = layer_step(ctx, s.walk, index, layer, round_trip=round_trip, reuse_verified=not every_layer)
    s.failed = observed.error is not None or observed.peer_raised is not None or s.walk.failed
    return RankStep(ctx.rank, ctx.pp_stage, ctx.ep_rank, index, observed)


def final_pass(ctx: Any, layers_by_stage: dict[int, tuple[LayerSpec, ...]]) -> FinalPass | None:
    """After the last ``initialize``: round-trip every layer of this rank's stage again on the handle the
    manager ended with, as the next forward pass runs them (FlashInfer's combine region moves with the
    handle's max tokens, so a layer that fit its own step can overflow a handle built later). Layers
    already round-tripped on this same handle are not repeated. ``None`` when this stage has nothing to do
    (not in ``layers_by_stage``, or an earlier step failed)."""
    s: _Session = ctx.scratch[SESSION_KEY]
    if s.failed or ctx.pp_stage not in layers_by_stage:
        return None
    walk = s.walk
    checked: list[int] = []
    out = FinalPass(ctx.rank, ctx.pp_stage, ctx.ep_rank)
    if walk.adapter.moe_alltoall() is None:
        return out
    for index, layer in enumerate(layers_by_stage[ctx.pp_stage]):
        if layer in walk.verified:
            continue
        # The suite's round trip: the EP barrier consecutive layouts need (TensorRT-LLM #19312), and the
        # outcome agreed by the EP group.
        outcome, error, _offset = agreed_round_trip(ctx, walk.adapter, layer)
        if outcome != OK:
            s.failed = walk.failed = True
            return FinalPass(ctx.rank, ctx.pp_stage, ctx.ep_rank, tuple(checked), index, error)
        walk.verified[layer] = index
        checked.append(index)
    return FinalPass(ctx.rank, ctx.pp_stage, ctx.ep_rank, tuple(checked))


def close_session(ctx: Any) -> None:
    """Release what the session holds (best effort: after a failure FlashInfer's state may be odd)."""
    s: _Session | None = ctx.scratch.pop(SESSION_KEY, None)
    if s is None:
        return
    if s.policy is not None or not s.failed:
        with contextlib.suppress(Exception):
            s.walk.adapter.cleanup()
