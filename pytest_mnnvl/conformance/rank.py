"""Inside ranks: run one conformance plan on a manager and return typed observations.

Every function here runs on every rank of a world (``world.run(fn, ...)``) and returns picklable
records (:mod:`pytest_mnnvl.conformance.observations`); the parent
(:mod:`pytest_mnnvl.conformance.invariants`) judges them. One step function, :func:`layer_step`, walks
each layer (``initialize``, round trip, record); ``repro`` walks a plan with it too. What is observed:

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pytest_mnnvl.conformance.observations import (
    OK,
    CallError,
    Collective,
    FailedCommitObservation,
    FailedRebuildObservation,
    LayerStep,
    MismatchObservation,
    Phase,
    PlanObservation,
    decisions,
)
from pytest_mnnvl.errors import HarnessFault
from pytest_mnnvl.managers import ManagerFactory
from pytest_mnnvl.model import releases
from pytest_mnnvl.model.layers import LayerSpec, ModelPlan


def _first_line(exc: BaseException) -> str:
    return CallError.of(exc).first_line


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


def agreed_round_trip(
    ctx: Any, adapter: Any, layer: LayerSpec, tokens: int | None = None
) -> tuple[str, CallError | None, int | None]:
    """One verified dispatch + combine of ``layer`` through the live handle: the outcome agreed by the EP
    group (``ok``, or the first line of this rank's error, or the peer's), this rank's own error in full,
    and the combine payload's offset FlashInfer reported."""
    from pytest_mnnvl.conformance.roundtrip import ep_barrier
    from pytest_mnnvl.conformance.roundtrip import round_trip as verified_round_trip

    ep_barrier(ctx)
    a2a = adapter.moe_alltoall()
    outcome, error, offset = OK, None, None
    if a2a is None:
        outcome = "error: no live FlashInfer handle"
        error = CallError("RuntimeError", "no live handle after initialize")
    else:
        try:
            result = verified_round_trip(
                a2a, layer, ctx.ep_rank, ctx.ep_size, tokens or layer.max_num_tokens, ctx.device
            )
            offset = result.combine_payload_offset
        except Exception as exc:
            error = CallError.of(exc)
            outcome = "error: " + error.first_line
    everyone = _gather(ctx, outcome)
    if outcome == OK and any(o != OK for o in everyone):
        return "error: failed on a peer: " + next(o for o in everyone if o != OK), None, offset
    return outcome, error, offset


def round_trip(ctx: Any, adapter: Any, layer: LayerSpec, tokens: int | None = None) -> str:
    """One verified dispatch + combine of ``layer`` through the live handle; the outcome agreed by
    the EP group (``ok``, or the first line of this rank's error, or the peer's)."""
    return agreed_round_trip(ctx, adapter, layer, tokens)[0]


def _collectives(calls: Sequence[Any]) -> tuple[Collective, ...]:
    return tuple(Collective(c.name, tuple(c.group_ranks)) for c in calls)


def _initialize(ctx: Any, adapter: Any, layer: LayerSpec) -> tuple[CallError | None, tuple[Collective, ...]]:
    from pytest_mnnvl.worlds import audit

    raised = None
    with audit.recording() as calls:
        try:
            adapter.initialize(layer)
        except Exception as exc:
            raised = CallError.of(exc)
    return raised, _collectives(calls)


def _first_line_of(error: CallError | None) -> str | None:
    return None if error is None else error.first_line


class HandleIdentityDisagrees(HarnessFault):
    """The harness's two readings of "the same live handle" disagree: no verdict built on them could be trusted."""


def same_handle(after: Any, before: Any) -> bool:
    """Whether ``after`` holds the very handle ``before`` did, read twice: by object identity
    (``ManagerState.same_handle``) and by the stamps the adapters give each handle object.

    Every rebuild the suite counts (``no_needless_rebuild``, ``minimal_rebuilds``) and every "changed nothing"
    verdict (``shape_mismatch``, ``failed_rebuild_consistent``) rests on this one fact, so one wrong operator in
    either reading would blind them all while the correct reference still passed: the two must agree, or the
    run stops with :class:`HandleIdentityDisagrees` instead of judging."""
    by_identity = bool(after.same_handle(before))
    by_stamp = after.stamp is not None and after.stamp == before.stamp
    if by_identity != by_stamp:
        raise HandleIdentityDisagrees(
            f"the live handle is {'the same' if by_identity else 'another'} object by identity but "
            f"{'the same' if by_stamp else 'another'} by stamp (stamps {before.stamp} -> {after.stamp}): "
            "the harness cannot tell a rebuild from a kept handle"
        )
    return by_identity


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
    """Import the manager's class (and whatever it imports) ahead of any timed call; a manager with its own
    dispatch path sends one tiny batch through it here (:mod:`pytest_mnnvl.conformance.dispatch_path`)."""
    cls = factory.load()
    if factory.has_dispatch_path(cls):
        from pytest_mnnvl.conformance import dispatch_path

        dispatch_path.check(ctx, factory)
    return cls.__qualname__


@dataclasses.dataclass
class Walk:
    """One rank's walk through its stage's layers on one manager (through its adapter): what the next
    :func:`layer_step` compares with. The suite's ``run_plan`` and ``repro`` both walk with it."""

    adapter: Any
    #: The manager's state before the next ``initialize`` (it keeps the handle it names alive).
    previous: Any
    #: A round trip failed: FlashInfer stays in the dispatched phase, so no more round trips (their
    #: errors would only be the cascade: ``dispatch called twice without combine``).
    failed: bool = False
    #: Layers that round-tripped fine on the live handle: layer -> step of the first one.
    verified: dict[LayerSpec, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def start(cls, adapter: Any) -> Walk:
        return cls(adapter, adapter.state())


def layer_step(
    ctx: Any,
    walk: Walk,
    index: int,
    layer: LayerSpec,
    *,
    round_trip: bool = True,
    recheck: Sequence[LayerSpec] = (),
    reuse_verified: bool = False,
) -> LayerStep:
    """One layer step, on every rank of the EP group together: ``initialize(layer)``, the state it left (did
    the handle change, which collectives it issued), whether any peer raised (all-gathered), then unless
    someone raised or an earlier round trip failed, a round trip of ``layer`` at its full token count, and
    of each of ``recheck`` (earlier layers) after it.

    ``reuse_verified``: a layer that already passed on this same handle is not round-tripped again
    (``same_as`` says which step it passed in), as ``repro`` does unless ``--every-layer``."""
    adapter = walk.adapter
    error, collectives = _initialize(ctx, adapter, layer)
    state = adapter.state()
    rebuilt = state.handle is not None and not same_handle(state, walk.previous)
    if rebuilt:
        walk.verified.clear()
    walk.previous = state
    record = state.record()
    del state
    raised = _first_line_of(error)
    peer_raised = next((r for r in _gather(ctx, raised) if r is not None), None)
    step = LayerStep(
        index,
        raised,
        record,
        rebuilt,
        collectives,
        peer_raised=peer_raised,
        error=error,
        phase=None if error is None else Phase.INITIALIZE,
    )
    if peer_raised is not None or not round_trip or walk.failed:
        return step
    same_as = walk.verified.get(layer) if reuse_verified else None
    if same_as is not None and adapter.moe_alltoall() is not None:
        return dataclasses.replace(step, round_trip=OK, same_as=same_as)
    # No handle to round-trip through is the initialize's failure (the round trip still runs its EP
    # barrier and agreement, so every peer issues the same collectives).
    phase = Phase.INITIALIZE if adapter.moe_alltoall() is None else Phase.ROUND_TRIP
    outcome, error, offset = agreed_round_trip(ctx, adapter, layer)
    walk.failed = outcome != OK
    if not walk.failed:
        walk.verified.setdefault(layer, index)
    earlier: dict[int, str] = {}
    if recheck and not walk.failed:
        for position, other in enumerate(recheck):
            earlier[position] = again = agreed_round_trip(ctx, adapter, other)[0]
            if again != OK:
                walk.failed = True
                break
    return dataclasses.replace(
        step,
        round_trip=outcome,
        earlier_round_trips=earlier,
        error=error,
        phase=None if error is None else phase,
        combine_payload_offset=offset,
    )


def run_plan(
    ctx: Any,
    factory: ManagerFactory,
    plan_json: str,
    *,
    probes: bool = True,
    after_cleanup: bool = True,
    recheck: bool = False,
) -> PlanObservation:
    """Run this rank's PP stage of ``plan_json`` on a fresh manager; see the module docstring.

    ``recheck``: after each ``initialize``, also round-trip every earlier layer
    (``LayerStep.earlier_round_trips``), not only after the last one: a stricter check the manager tests
    use, which the suite skips for time."""
    plan = ModelPlan.from_json(plan_json)
    layers = list(plan.layers_of_stage(ctx.pp_stage)) if plan.pp > ctx.pp_stage else []
    evict_workspaces()
    workspaces_before = _workspace_count()
    identity = PlanObservation(ctx.rank, ctx.pp_stage, ctx.ep_rank, tuple(_ep_members(ctx)), releases.current())
    if not layers:
        return identity
    manager = factory(ctx.cpu_group)
    adapter = factory.adapter(manager)
    walk = Walk.start(adapter)
    steps: list[LayerStep] = []
    stopped = None
    for index, layer in enumerate(layers):
        step = layer_step(ctx, walk, index, layer, recheck=layers[:index] if recheck else ())
        steps.append(step)
        if step.peer_raised is not None:
            stopped = f"initialize of layer {index} raised: {step.peer_raised}"
            break
    late: dict[int, str] = {}
    if stopped is None and not walk.failed and recheck:
        # The last step already round-tripped every earlier layer after the last initialize.
        late = dict(steps[-1].earlier_round_trips)
    elif stopped is None and not walk.failed:
        for index in range(len(layers) - 1):
            late[index] = outcome = round_trip(ctx, adapter, layers[index])
            if outcome != OK:
                walk.failed = True
                break
    probed: dict[int, str] = {}
    if probes and stopped is None and not walk.failed:
        for index, probe in enumerate(cross_product_probes(layers)):
            probed[index] = outcome = round_trip(ctx, adapter, probe)
            if outcome != OK:
                break
    final_has_handle = adapter.state().handle is not None
    walk.previous = None
    workspaces_before_cleanup = _workspace_count() - workspaces_before
    tables = tuple(_workspace_tables())
    cleanup: dict[str, Any] = {}
    if after_cleanup:
        try:
            adapter.cleanup()
            cleanup["cleanup_raised"] = None
        except Exception as exc:
            cleanup["cleanup_raised"] = _first_line(exc)
        cleanup["after_cleanup"] = adapter.state().record()
        error, collectives = _initialize(ctx, adapter, layers[0])
        raised = _first_line_of(error)
        cleanup.update(reinit_raised=raised, reinit=adapter.state().record(), reinit_collectives=collectives)
        if not [r for r in _gather(ctx, raised) if r is not None]:
            cleanup["reinit_round_trip"] = round_trip(ctx, adapter, layers[0])
        try:
            adapter.cleanup()
        except Exception as exc:
            cleanup["second_cleanup_raised"] = _first_line(exc)
    else:
        adapter.cleanup()
    mine = tuple(steps)
    # EP symmetry is all-gathered here, not assumed: every rank sees what its peers decided.
    return dataclasses.replace(
        identity,
        steps=mine,
        late_round_trips=late,
        probes=probed,
        stopped=stopped,
        final_has_handle=final_has_handle,
        workspaces_before_cleanup=workspaces_before_cleanup,
        workspaces_at_end=_workspace_count() - workspaces_before,
        tables=tables,
        ep_view=tuple(_gather(ctx, decisions(mine))),
        **cleanup,
    )


def _ep_members(ctx: Any) -> list[int]:
    return [int(r) for r in ctx.ep_group_ranks]


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


#: Plan index of the first continuation layer: after the two layers of a mismatch or failed-rebuild check.
CONTINUATION_START = 2


def continuation_of(served: LayerSpec) -> tuple[LayerSpec, LayerSpec]:
    """The rest of the plan after a refused or failed call: two layers of ``served``'s shape (format, top_k,
    num_experts), one that the workspace serving ``served`` fits (half its tokens) and one it must grow for
    (twice its tokens). A snapshot shows what moved; only what the manager does next shows what it forgot."""
    half, double = max(1, served.max_num_tokens // 2), 2 * served.max_num_tokens
    return (
        dataclasses.replace(served, max_num_tokens=half, name=f"continuation-fits-{half}"),
        dataclasses.replace(served, max_num_tokens=double, name=f"continuation-grows-{double}"),
    )


def _continue(ctx: Any, adapter: Any, layers: Sequence[LayerSpec], *, round_trip: bool = True) -> tuple[LayerStep, ...]:
    """``layers`` as plan steps :data:`CONTINUATION_START`.. on the adapter's live state, through
    :func:`layer_step`; stops where an ``initialize`` raised somewhere or a round trip failed."""
    walk = Walk.start(adapter)
    steps: list[LayerStep] = []
    for index, layer in enumerate(layers, CONTINUATION_START):
        step = layer_step(ctx, walk, index, layer, round_trip=round_trip)
        steps.append(step)
        if step.peer_raised is not None or walk.failed:
            break
    return tuple(steps)


def _control(
    ctx: Any, factory: ManagerFactory, served: Sequence[LayerSpec], layers: Sequence[LayerSpec]
) -> tuple[tuple[LayerStep, ...], str | None]:
    """The continuation on a fresh manager that never saw the bad call (``served`` initialized, then
    ``layers``, round-tripped as the continuation is): what the bad call may not change. A continuation layer
    that fails here too is the plan checks' business (a manager that never grows fails ``covers``), not a
    change the bad call made. Its steps, or why there are none."""
    evict_workspaces()
    adapter = factory.adapter(factory(ctx.cpu_group))
    walk = Walk.start(adapter)
    stopped = None
    for index, layer in enumerate(served):
        step = layer_step(ctx, walk, index, layer, round_trip=False)
        if step.peer_raised is not None:
            stopped = f"initialize of layer {index} raised: {step.peer_raised}"
            break
    walk.previous = None
    steps = () if stopped else _continue(ctx, adapter, layers)
    try:
        adapter.cleanup()
    except Exception as exc:
        stopped = stopped or f"cleanup raised: {_first_line(exc)}"
    return steps, stopped


def mismatch(ctx: Any, factory: ManagerFactory, first_json: str, second_json: str) -> MismatchObservation:
    """Initialize ``first``, then ``second`` (another top_k or num_experts): what was raised, and
    whether state, handle or collectives moved; then, unless that already failed, the rest of the plan
    (:func:`continuation_of` ``first``) on this manager and on a fresh one."""
    import sys

    adapter, first, second = _initialized_on_first(ctx, factory, first_json, second_json)
    before = adapter.state()
    error, collectives = _initialize(ctx, adapter, second)
    after = adapter.state()
    unmoved = same_handle(after, before)
    before_record, after_record = before.record(), after.record()
    unchanged = unmoved and after_record == before_record
    del before, after
    # A handle that already moved is a verdict by itself; round-tripping it could hang the sim.
    everyone = _gather(ctx, unchanged)
    round_trip_after = round_trip(ctx, adapter, first) if all(everyone) else None
    layers = continuation_of(first)
    continuation = _continue(ctx, adapter, layers) if round_trip_after == OK else ()
    adapter.cleanup()
    control, control_stopped = _control(ctx, factory, (first,), layers) if continuation else ((), None)
    return MismatchObservation(
        rank=ctx.rank,
        raised=_first_line_of(error),
        same_handle=unmoved,
        before=before_record,
        after=after_record,
        collectives=collectives,
        optimize=sys.flags.optimize,
        round_trip_after=round_trip_after,
        continuation=continuation,
        control=control,
        control_stopped=control_stopped,
    )


def _retry(ctx: Any, adapter: Any, layer: LayerSpec) -> tuple[str | None, Any, str | None]:
    """Initialize ``layer`` again after a failed call: (what it raised, the state record after it, the round trip
    when no EP rank raised, else None)."""
    error, _ = _initialize(ctx, adapter, layer)
    raised = _first_line_of(error)
    after = adapter.state().record()
    trip = None
    if not [r for r in _gather(ctx, raised) if r is not None]:
        trip = round_trip(ctx, adapter, layer)
    return raised, after, trip


def failed_rebuild(ctx: Any, factory: ManagerFactory, first_json: str, second_json: str) -> FailedRebuildObservation:
    """Grow from ``first`` to ``second`` with FlashInfer's workspace allocation made to fail, then
    retry ``second`` normally; then, unless that failed, the rest of the plan (:func:`continuation_of`
    ``second``) on this manager and on a fresh one that grew to ``second`` with no failure."""
    from pytest_mnnvl.managers.adapters import inject_build_failure

    adapter, first, second = _initialized_on_first(ctx, factory, first_json, second_json)
    before = adapter.state()
    with inject_build_failure():
        error, _ = _initialize(ctx, adapter, second)
    after = adapter.state()
    unmoved = same_handle(after, before)
    before_record, after_failure = before.record(), after.record()
    has_handle = [h for h in _gather(ctx, after.handle is not None) if h]
    del before, after
    first_round_trip = round_trip(ctx, adapter, first) if len(has_handle) == ctx.ep_size else None
    retry_raised, after_retry, retry_round_trip = _retry(ctx, adapter, second)
    layers = continuation_of(second)
    continuation = _continue(ctx, adapter, layers) if retry_round_trip == OK else ()
    cleanup_raised = None
    try:
        adapter.cleanup()
    except Exception as exc:
        cleanup_raised = _first_line(exc)
    control, control_stopped = _control(ctx, factory, (first, second), layers) if continuation else ((), None)
    return FailedRebuildObservation(
        rank=ctx.rank,
        raised=_first_line_of(error),
        same_handle=unmoved,
        before=before_record,
        after_failure=after_failure,
        first_round_trip=first_round_trip,
        retry_raised=retry_raised,
        after_retry=after_retry,
        retry_round_trip=retry_round_trip,
        cleanup_raised=cleanup_raised,
        continuation=continuation,
        control=control,
        control_stopped=control_stopped,
    )


@contextmanager
def inject_barrier_failure() -> Iterator[list[bool]]:
    """Make the first ``torch.distributed.barrier`` this rank issues after a FlashInfer handle construction
    returned raise :class:`InjectedBarrierFailure`, before it enters the collective; the list it yields gets
    ``True`` once that happened (a manager with no barrier after its build never meets it).

    It tests what a manager leaves behind when the synchronisation after a successful build fails: the new
    workspace is allocated, the rebuild is not done. The construction's own barriers come before it returns,
    so they pass. Use it on every rank of the EP group alike, as ``inject_build_failure``."""
    import torch.distributed as dist

    from pytest_mnnvl.managers import handles

    cls = handles.api().handle_type()
    init = cls.__dict__["__init__"]
    barrier = dist.barrier
    built: list[bool] = []
    fired: list[bool] = []

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        built.append(True)

    def failing_barrier(*args: Any, **kwargs: Any) -> Any:
        if built and not fired:
            fired.append(True)
            raise handles.InjectedBarrierFailure(
                "pytest-mnnvl: injected failure of the first torch.distributed.barrier after a handle was built"
            )
        return barrier(*args, **kwargs)

    cls.__init__ = __init__  # type: ignore[misc]
    dist.barrier = failing_barrier
    try:
        yield fired
    finally:
        cls.__init__ = init  # type: ignore[misc]
        dist.barrier = barrier


def failed_commit(ctx: Any, factory: ManagerFactory, first_json: str, second_json: str) -> FailedCommitObservation:
    """Grow from ``first`` to ``second`` with FlashInfer's build succeeding and the first barrier after it made to
    fail (:func:`inject_barrier_failure`), then retry ``second``; and the same growth
    on a fresh manager with no failure, for the workspaces its own success leaves in FlashInfer's table."""
    adapter, first, second = _initialized_on_first(ctx, factory, first_json, second_json)
    before = adapter.state()
    with inject_barrier_failure() as fired:
        error, _ = _initialize(ctx, adapter, second)
    after = adapter.state()
    unmoved = same_handle(after, before)
    before_record, after_failure = before.record(), after.record()
    extra = _workspace_count() - (1 if after.handle is not None else 0)
    del before, after
    retry_raised, after_retry, retry_round_trip = _retry(ctx, adapter, second)
    adapter.cleanup()
    evict_workspaces()
    control = factory.adapter(factory(ctx.cpu_group))
    control_extra = 0
    if _initialize(ctx, control, first)[0] is None and _initialize(ctx, control, second)[0] is None:
        control_extra = _workspace_count() - (1 if control.state().handle is not None else 0)
    control.cleanup()
    return FailedCommitObservation(
        rank=ctx.rank,
        injected=bool(fired),
        raised=_first_line_of(error),
        same_handle=unmoved,
        before=before_record,
        after_failure=after_failure,
        extra_workspaces=extra,
        control_extra_workspaces=control_extra,
        retry_raised=retry_raised,
        after_retry=after_retry,
        retry_round_trip=retry_round_trip,
    )


def _layer_dict(text: str) -> dict[str, Any]:
    import json

    data = json.loads(text)
    assert isinstance(data, dict)
    return data
