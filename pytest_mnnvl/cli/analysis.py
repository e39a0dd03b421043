"""A plan walked through a manager's policy, with FlashInfer's host checks at every layer.

For each PP stage (its own EP group, the MTP head last on the last stage) and each layer in
``initialize`` order this computes: the layer's payload per token, ``need()``, the workspace the
manager holds right after that layer's ``initialize`` (from the oracle policy), and what
FlashInfer checks when the layer dispatches and combines its full token count on that workspace:
the payload offset, the dispatch's required size, ``combinePayloadOffset`` (which moves with the
*current* dispatch size), the combine payload bytes and the size per rank. ``predict`` adds the
smallest runtime token count at which the layer fails (the checks use the runtime count, so small
batches pass where a full one fails).

The failure order is FlashInfer's: the manager's own shape check (top_k / num_experts), then the
Python assert on the token count, then the op's per-payload alignment check, the dispatch size
check and finally the combine region check.

The arithmetic is one release's (``release=``, default the installed one): 0.7.2.post1's packed row
(:mod:`pytest_mnnvl.model.sizing`), or 0.7.4's fixed dispatch and combine regions
(:mod:`pytest_mnnvl.model.sizing_v074`), where the token check is ``MoEEpCommunication``'s ValueError,
nothing is misaligned (every payload buffer starts 128-aligned) and each region has its own capacity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, TypedDict

from pytest_mnnvl.cli.inputs import LoadedPlan, stage_shape_error
from pytest_mnnvl.cli.policy import ManagerModel
from pytest_mnnvl.model import oracle, oracle_v074, releases, sizing, sizing_v074
from pytest_mnnvl.model.layers import COMBINE_ELEMENT_SIZE, LayerSpec

Verdict = Literal["ok", "refused", "unreached", "tokens", "misaligned", "dispatch", "combine", "unknown"]
#: What a verdict means, for tables and JSON readers.
VERDICT_TEXT: dict[str, str] = {
    "ok": "dispatch and combine fit",
    "refused": "the manager raises in initialize",
    "unreached": "never initialized: an earlier initialize of this stage raised",
    "tokens": "runtime tokens exceed the handle's max_num_tokens (FlashInfer's Python check)",
    "misaligned": "a payload is misaligned (dispatch check)",
    "dispatch": "dispatch does not fit",
    "combine": "dispatch fits, combine does not fit",
    "unknown": "not judged: the handle's FlashInfer 0.7.4 layout was not recorded",
}


@dataclass(frozen=True)
class RegionCheck:
    """FlashInfer 0.7.4's two capacity checks of one round trip, on the handle's fixed layout."""

    layout: sizing_v074.WorkspaceLayout
    #: Bytes per token of each payload ``NVLinkOneSidedAlltoAll.dispatch`` sends.
    payloads: tuple[int, ...]
    dispatch: sizing_v074.DispatchCapacity
    combine: sizing_v074.CombineCapacity

    @property
    def fits(self) -> bool:
        return self.dispatch.fits and self.combine.fits


#: The host-check arithmetic of one round trip, in the modelled release's terms.
Check = sizing.RoundTripCheck | RegionCheck


def region_check(layer: LayerSpec, layout: sizing_v074.WorkspaceLayout, tokens: int) -> RegionCheck:
    """0.7.4's dispatch and combine capacity checks of ``layer`` at runtime ``tokens`` on ``layout``."""
    payloads = oracle_v074.wire_payloads(layer)
    return RegionCheck(
        layout,
        payloads,
        sizing_v074.check_dispatch(layout, tokens, payloads),
        sizing_v074.check_combine(layout, tokens, layer.hidden_size, COMBINE_ELEMENT_SIZE),
    )


@dataclass(frozen=True)
class HandleGeometry:
    """A live handle's size, in every release's terms (0.7.2's ``WorkspaceGeometry`` caps EP at its 64 ranks)."""

    ep_size: int
    max_num_tokens: int
    size_per_rank: int
    eplb_stats_num_experts: int = 0

    def v072(self) -> sizing.WorkspaceGeometry:
        """The geometry 0.7.2's host checks read."""
        return sizing.WorkspaceGeometry(
            self.ep_size, self.max_num_tokens, self.size_per_rank, self.eplb_stats_num_experts
        )


@dataclass(frozen=True)
class Trip:
    """What one round trip at runtime ``tokens`` meets: the verdict, FlashInfer's exception and the arithmetic."""

    tokens: int
    verdict: Verdict
    error_type: str | None
    error: str | None
    #: None when an earlier check (the token count) stops the call first.
    check: Check | None


@dataclass(frozen=True)
class LayerOutcome:
    """One layer's ``initialize`` and its full-size round trip on the workspace that follows."""

    stage: int
    #: Position in the stage's initialize order (MTP head layers last).
    index: int
    layer: LayerSpec
    is_mtp: bool
    origin: str
    need: int
    rebuilt: bool
    #: Index (in this stage) of the layer whose initialize built the live handle.
    built_by: int
    geometry: HandleGeometry
    runtime_tokens: int
    verdict: Verdict
    #: Exception type and exact text FlashInfer (or the manager) raises; None when it fits.
    error_type: str | None
    error: str | None
    #: The host checks at ``runtime_tokens`` (None when an earlier check stops the call first).
    check: Check | None
    #: Smallest runtime token count in 1..layer.max_num_tokens that fails; None: never.
    first_failing_tokens: int | None
    #: True for the final pass: the layer again on the handle its stage ended with (the next forward pass).
    final_pass: bool = False
    #: The FlashInfer release whose arithmetic this is.
    release: str = releases.V072
    #: What the round trip meets at ``first_failing_tokens`` (None: it never fails).
    first_trip: Trip | None = None

    @property
    def fits(self) -> bool:
        return self.verdict == "ok"

    @property
    def label(self) -> str:
        return self.layer.name or self.origin


@dataclass(frozen=True)
class StageWalk:
    stage: int
    ep_ranks: tuple[int, ...]
    outcomes: tuple[LayerOutcome, ...]
    #: Layers whose step fit but that meet a different handle at the end of the stage, judged on that handle.
    final: tuple[LayerOutcome, ...] = ()

    @property
    def fits(self) -> bool:
        return all(o.fits for o in self.outcomes) and all(o.fits for o in self.final)


@dataclass(frozen=True)
class PlanWalk:
    loaded: LoadedPlan
    model: ManagerModel
    ep: int
    stages: tuple[StageWalk, ...]
    #: The FlashInfer release modelled, and why that one (``installed`` or ``--flashinfer``).
    release: str = releases.V072
    release_source: str = "installed"

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    @property
    def failures(self) -> list[LayerOutcome]:
        """Failing steps first (in time order they come first), then failing final-pass layers."""
        steps = [o for s in self.stages for o in s.outcomes if not o.fits]
        return steps + [o for s in self.stages for o in s.final if not o.fits]


def layer_label(loaded: LoadedPlan, stage: int, index: int) -> str:
    """The layer's name, else where it comes from in the plan (``mtp_head[0]``, ``stages[1][3]``)."""
    return loaded.plan.layers_of_stage(stage)[index].name or loaded.origin(stage, index)


def _trip_v072(layer: LayerSpec, geometry: sizing.WorkspaceGeometry, tokens: int) -> Trip:
    if tokens > geometry.max_num_tokens:
        return Trip(tokens, "tokens", "AssertionError", sizing.RUNTIME_TOKENS_EXCEED_MAX, None)
    check = sizing.layer_round_trip(layer, geometry, tokens)
    misaligned = sizing.misaligned_payload_error(
        geometry.ep_size, tokens, layer.dispatch_payload_bytes_per_token, layer.dispatch_payload_element_sizes
    )
    if misaligned is not None:
        return Trip(tokens, "misaligned", "RuntimeError", misaligned, check)
    if not check.dispatch.fits:
        return Trip(tokens, "dispatch", "RuntimeError", check.dispatch.message, check)
    if not check.combine.fits:
        return Trip(tokens, "combine", "RuntimeError", check.combine.message, check)
    return Trip(tokens, "ok", None, None, check)


def _trip_v074(layer: LayerSpec, layout: sizing_v074.WorkspaceLayout, tokens: int) -> Trip:
    if tokens > layout.max_num_tokens:
        message = sizing_v074.runtime_tokens_value_error(tokens, layout.max_num_tokens)
        return Trip(tokens, "tokens", "ValueError", message, None)
    check = region_check(layer, layout, tokens)
    if not check.dispatch.fits:
        return Trip(tokens, "dispatch", "RuntimeError", check.dispatch.message, check)
    if not check.combine.fits:
        return Trip(tokens, "combine", "RuntimeError", check.combine.message, check)
    return Trip(tokens, "ok", None, None, check)


@dataclass(frozen=True)
class Handle:
    """What the checks of one release read of a live handle: 0.7.2's geometry, 0.7.4's layout too."""

    geometry: HandleGeometry
    release: str
    #: FlashInfer 0.7.4's layout (None on 0.7.2, whose regions move with each call).
    layout: sizing_v074.WorkspaceLayout | None = None

    def trip(self, layer: LayerSpec, tokens: int) -> Trip:
        """The round trip of ``layer`` at runtime ``tokens`` on this handle."""
        if self.release == releases.V074:
            if self.layout is None:  # an observed handle whose layout nobody recorded: never guessed
                return Trip(tokens, "unknown", None, None, None)
            return _trip_v074(layer, self.layout, tokens)
        return _trip_v072(layer, self.geometry.v072(), tokens)

    @property
    def max_num_tokens(self) -> int:
        return self.layout.max_num_tokens if self.layout is not None else self.geometry.max_num_tokens


def _full_size_outcome(layer: LayerSpec, handle: Handle) -> tuple[Trip, Trip | None]:
    """The round trip of ``layer`` at its full token count on ``handle``, and the one at the smallest
    failing runtime token count (None: none fails)."""
    full = handle.trip(layer, layer.max_num_tokens)
    first = first_failing_tokens(layer, handle)
    return full, (None if first is None else handle.trip(layer, first))


@dataclass(frozen=True)
class Holding:
    """The handle a manager holds right after one ``initialize`` (from the oracle or observed)."""

    rebuilt: bool
    #: Index (in the stage) of the layer whose initialize built the live handle; -1: no handle.
    built_by: int
    size_per_rank: int
    max_num_tokens: int
    eplb_stats_num_experts: int = 0
    #: ``(type, text)`` when ``initialize`` raised (the manager refuses the layer).
    init_error: tuple[str, str] | None = None
    #: FlashInfer 0.7.4's 33-field layout of the handle (empty on 0.7.2; 0.7.4's verdicts need it).
    layout: tuple[int, ...] = ()


#: ``Holding.init_error`` of the layers after a refused one.
UNREACHED = ("NotReached", "not initialized: an earlier initialize of this stage raised")


def oracle_holdings(policy: str, layers: tuple[LayerSpec, ...], ep: int, release: str | None = None) -> list[Holding]:
    """What ``policy`` holds after each layer on ``release`` (default: the installed one). A top_k/num_experts
    change is refused, as managers do: the handle stays as it was and the stage stops there (the engine would
    not finish loading)."""
    refused = next((i for i in range(len(layers)) if stage_shape_error(layers, i)), len(layers))
    out = []
    for step in oracle.trajectory(policy, layers[:refused], ep, release):
        built_by = step.built_by
        out.append(
            Holding(
                step.rebuilt,
                built_by,
                step.capacity.size_per_rank,
                step.capacity.max_num_tokens,
                layers[built_by].eplb_stats_num_experts,
                layout=step.capacity.layout,
            )
        )
    if refused < len(layers):
        error = stage_shape_error(layers, refused)
        assert error is not None
        prev = out[-1]  # layer 0 is never refused, so something was built
        out.append(replace(prev, rebuilt=False, init_error=("ValueError", error)))
        out += [Holding(False, -1, 0, 0, 0, UNREACHED)] * (len(layers) - refused - 1)
    return out


def first_failing_tokens(layer: LayerSpec, handle: Handle) -> int | None:
    """Smallest runtime token count in ``1..layer.max_num_tokens`` at which the round trip fails.

    0.7.2: alignment depends on ``ep * T * bytes`` only through divisibility, so it fails at ``T = 1`` or
    never; the size checks grow with ``T`` (bisection in :mod:`pytest_mnnvl.model.sizing`). 0.7.4: both
    region needs grow with ``T``, so a bisection finds the first. Beyond the handle's max tokens the token
    check fires.
    """
    limit = min(layer.max_num_tokens, handle.max_num_tokens)
    host: int | None
    if handle.release == releases.V074 and handle.layout is None:
        return None
    if handle.release == releases.V074:
        host = _bisect_first_failing(lambda t: handle.trip(layer, t).verdict != "ok", limit)
    else:
        geometry = handle.geometry.v072()
        if sizing.misaligned_payload_error(
            geometry.ep_size, 1, layer.dispatch_payload_bytes_per_token, layer.dispatch_payload_element_sizes
        ):
            return 1
        host = sizing.smallest_failing_runtime_tokens(layer, geometry, up_to=limit)
    if host is None and layer.max_num_tokens > handle.max_num_tokens:
        return handle.max_num_tokens + 1
    return host


def _bisect_first_failing(fails: Callable[[int], bool], limit: int) -> int | None:
    """Smallest ``t`` in ``1..limit`` with ``fails(t)``, for a ``fails`` that stays true once true."""
    if limit < 1 or not fails(limit):
        return None
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi) // 2
        if fails(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _handle(ep: int, held: Holding, release: str) -> Handle:
    """The handle ``held`` describes; one never round-tripped (a refused or unreached layer) needs no layout."""
    geometry = HandleGeometry(ep, max(held.max_num_tokens, 1), held.size_per_rank, held.eplb_stats_num_experts)
    if release != releases.V074 or held.init_error is not None:
        return Handle(geometry, release)
    if len(held.layout) != sizing_v074.NUM_METAINFO_FIELDS:
        return Handle(geometry, release)  # its verdicts are "unknown": bytes per rank do not say where regions are
    return Handle(geometry, release, sizing_v074.WorkspaceLayout(*held.layout))


def walk_stage(
    loaded: LoadedPlan, ep: int, stage: int, holdings: list[Holding], release: str | None = None
) -> StageWalk:
    """One stage on the handles ``holdings`` describe, by ``release``'s checks (default: the installed one)."""
    release = releases.resolve(release)
    plan = loaded.plan
    layers = plan.layers_of_stage(stage)
    first_mtp = len(plan.stages[stage])
    outcomes = []
    handles = []
    for index, (layer, held) in enumerate(zip(layers, holdings, strict=True)):
        handle = _handle(ep, held, release)
        handles.append(handle)
        trip: Trip
        first: Trip | None
        if held.init_error is not None:
            verdict: Verdict = "unreached" if held.init_error == UNREACHED else "refused"
            trip, first = Trip(layer.max_num_tokens, verdict, *held.init_error, None), None
        else:
            trip, first = _full_size_outcome(layer, handle)
        outcomes.append(
            LayerOutcome(
                stage=stage,
                index=index,
                layer=layer,
                is_mtp=index >= first_mtp,
                origin=loaded.origin(stage, index),
                need=oracle.need(layer, ep, release),
                rebuilt=held.rebuilt,
                built_by=held.built_by,
                geometry=handle.geometry,
                runtime_tokens=layer.max_num_tokens,
                release=release,
                **_trip_fields(trip, first),
            )
        )
    ranks = tuple(range(stage * ep, (stage + 1) * ep))
    return StageWalk(stage, ranks, tuple(outcomes), _final_pass(outcomes, holdings, handles))


class _TripFields(TypedDict):
    verdict: Verdict
    error_type: str | None
    error: str | None
    check: Check | None
    first_failing_tokens: int | None
    first_trip: Trip | None


def _trip_fields(trip: Trip, first: Trip | None) -> _TripFields:
    """A LayerOutcome's fields that say how its round trip at full size went (``trip``) and where it first fails
    (``first``): one place for the step's outcome and for its final-pass replacement."""
    return _TripFields(
        verdict=trip.verdict,
        error_type=trip.error_type,
        error=trip.error,
        check=trip.check,
        first_failing_tokens=None if first is None else first.tokens,
        first_trip=first,
    )


def _final_pass(
    outcomes: list[LayerOutcome], holdings: list[Holding], handles: list[Handle]
) -> tuple[LayerOutcome, ...]:
    """Every layer that fit its own step on an earlier handle, judged again on the handle the stage ended
    with: the aux regions grow with the handle's max tokens, so it can overflow a handle built later."""
    if not outcomes or any(h.init_error is not None for h in holdings):
        return ()
    last = holdings[-1]
    handle = handles[-1]  # the handle the last initialize left
    final: list[LayerOutcome] = []
    seen: set[LayerSpec] = set()
    for o, held in zip(outcomes, holdings, strict=True):
        if held.built_by == last.built_by or not o.fits or o.layer in seen:
            continue
        seen.add(o.layer)
        trip, first = _full_size_outcome(o.layer, handle)
        final.append(
            replace(
                o,
                rebuilt=False,
                built_by=last.built_by,
                geometry=handle.geometry,
                final_pass=True,
                **_trip_fields(trip, first),
            )
        )
    return tuple(final)


def walk(
    loaded: LoadedPlan,
    model: ManagerModel,
    ep: int,
    stages: list[int],
    observed: dict[int, list[Holding]] | None = None,
    release: str | None = None,
    release_source: str = "installed",
) -> PlanWalk:
    """Every requested stage of ``loaded`` at EP size ``ep`` on ``release`` (default: the installed one):
    oracle holdings for a policy model, else the ``observed`` ones (from :func:`pytest_mnnvl.cli.repro.observe`)."""
    release = releases.resolve(release)
    walks = []
    for s in stages:
        if model.policy is not None:
            holdings = oracle_holdings(model.policy, loaded.plan.layers_of_stage(s), ep, release)
        else:
            assert observed is not None, "an observed model needs observations"
            holdings = observed[s]
        walks.append(walk_stage(loaded, ep, s, holdings, release))
    return PlanWalk(loaded, model, ep, tuple(walks), release, release_source)
