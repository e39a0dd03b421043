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
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from pytest_mnnvl.cli.inputs import LoadedPlan, stage_shape_error
from pytest_mnnvl.cli.policy import ManagerModel
from pytest_mnnvl.model import sizing
from pytest_mnnvl.model.layers import LayerSpec
from pytest_mnnvl.model.oracle import trajectory

Verdict = Literal["ok", "refused", "unreached", "tokens", "misaligned", "dispatch", "combine"]
#: What a verdict means, for tables and JSON readers.
VERDICT_TEXT: dict[str, str] = {
    "ok": "dispatch and combine fit",
    "refused": "the manager raises in initialize",
    "unreached": "never initialized: an earlier initialize of this stage raised",
    "tokens": "runtime tokens exceed the handle's max_num_tokens (Python assert)",
    "misaligned": "a payload is misaligned (dispatch check)",
    "dispatch": "dispatch does not fit",
    "combine": "dispatch fits, combine does not fit",
}


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
    geometry: sizing.WorkspaceGeometry
    runtime_tokens: int
    verdict: Verdict
    #: Exception type and exact text FlashInfer (or the manager) raises; None when it fits.
    error_type: str | None
    error: str | None
    #: The host checks at ``runtime_tokens`` (None when an earlier check stops the call first).
    check: sizing.RoundTripCheck | None
    #: Smallest runtime token count in 1..layer.max_num_tokens that fails; None: never.
    first_failing_tokens: int | None
    #: True for the final pass: the layer again on the handle its stage ended with (the next forward pass).
    final_pass: bool = False

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


def _full_size_outcome(
    layer: LayerSpec, geometry: sizing.WorkspaceGeometry
) -> tuple[Verdict, str | None, str | None, sizing.RoundTripCheck | None, int | None]:
    """The round trip of ``layer`` at its full token count on ``geometry``: verdict, error type and text, the
    host-check arithmetic, and the smallest failing runtime token count."""
    tokens = layer.max_num_tokens
    first = first_failing_tokens(layer, geometry)
    if tokens > geometry.max_num_tokens:
        return "tokens", "AssertionError", sizing.RUNTIME_TOKENS_EXCEED_MAX, None, first
    check = sizing.layer_round_trip(layer, geometry, tokens)
    misaligned = sizing.misaligned_payload_error(
        geometry.ep_size, tokens, layer.dispatch_payload_bytes_per_token, layer.dispatch_payload_element_sizes
    )
    if misaligned is not None:
        return "misaligned", "RuntimeError", misaligned, check, first
    if not check.dispatch.fits:
        return "dispatch", "RuntimeError", check.dispatch.message, check, first
    if not check.combine.fits:
        return "combine", "RuntimeError", check.combine.message, check, first
    return "ok", None, None, check, first


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


#: ``Holding.init_error`` of the layers after a refused one.
UNREACHED = ("NotReached", "not initialized: an earlier initialize of this stage raised")


def oracle_holdings(policy: str, layers: tuple[LayerSpec, ...], ep: int) -> list[Holding]:
    """What ``policy`` holds after each layer. A top_k/num_experts change is refused, as managers do:
    the handle stays as it was and the stage stops there (the engine would not finish loading)."""
    refused = next((i for i in range(len(layers)) if stage_shape_error(layers, i)), len(layers))
    out = []
    for step in trajectory(policy, layers[:refused], ep):
        built_by = step.built_by
        out.append(
            Holding(
                step.rebuilt,
                built_by,
                step.capacity.size_per_rank,
                step.capacity.max_num_tokens,
                layers[built_by].eplb_stats_num_experts,
            )
        )
    if refused < len(layers):
        error = stage_shape_error(layers, refused)
        assert error is not None
        prev = out[-1]  # layer 0 is never refused, so something was built
        out.append(
            Holding(
                False,
                prev.built_by,
                prev.size_per_rank,
                prev.max_num_tokens,
                prev.eplb_stats_num_experts,
                ("ValueError", error),
            )
        )
        out += [Holding(False, -1, 0, 0, 0, UNREACHED)] * (len(layers) - refused - 1)
    return out


def first_failing_tokens(layer: LayerSpec, geometry: sizing.WorkspaceGeometry) -> int | None:
    """Smallest runtime token count in ``1..layer.max_num_tokens`` at which the round trip fails.

    Alignment depends on ``ep * T * bytes`` only through divisibility, so it fails at ``T = 1`` or
    never; the size checks grow with ``T`` (bisection in :mod:`pytest_mnnvl.model.sizing`); beyond the
    handle's max tokens the Python assert fires.
    """
    if sizing.misaligned_payload_error(
        geometry.ep_size, 1, layer.dispatch_payload_bytes_per_token, layer.dispatch_payload_element_sizes
    ):
        return 1
    limit = min(layer.max_num_tokens, geometry.max_num_tokens)
    host = sizing.smallest_failing_runtime_tokens(layer, geometry, up_to=limit)
    if host is None and layer.max_num_tokens > geometry.max_num_tokens:
        return geometry.max_num_tokens + 1
    return host


def walk_stage(loaded: LoadedPlan, ep: int, stage: int, holdings: list[Holding]) -> StageWalk:
    plan = loaded.plan
    layers = plan.layers_of_stage(stage)
    first_mtp = len(plan.stages[stage])
    outcomes = []
    for index, (layer, held) in enumerate(zip(layers, holdings, strict=True)):
        geometry = sizing.WorkspaceGeometry(
            ep, max(held.max_num_tokens, 1), held.size_per_rank, held.eplb_stats_num_experts
        )
        check: sizing.RoundTripCheck | None
        error_type: str | None
        error: str | None
        first: int | None
        if held.init_error is not None:
            verdict: Verdict = "unreached" if held.init_error == UNREACHED else "refused"
            error_type, error = held.init_error
            check, first = None, None
        else:
            verdict, error_type, error, check, first = _full_size_outcome(layer, geometry)
        outcomes.append(
            LayerOutcome(
                stage=stage,
                index=index,
                layer=layer,
                is_mtp=index >= first_mtp,
                origin=loaded.origin(stage, index),
                need=layer.need(ep),
                rebuilt=held.rebuilt,
                built_by=held.built_by,
                geometry=geometry,
                runtime_tokens=layer.max_num_tokens,
                verdict=verdict,
                error_type=error_type,
                error=error,
                check=check,
                first_failing_tokens=first,
            )
        )
    ranks = tuple(range(stage * ep, (stage + 1) * ep))
    return StageWalk(stage, ranks, tuple(outcomes), _final_pass(outcomes, holdings, ep))


def _final_pass(outcomes: list[LayerOutcome], holdings: list[Holding], ep: int) -> tuple[LayerOutcome, ...]:
    """Every layer that fit its own step on an earlier handle, judged again on the handle the stage ended
    with: the aux regions grow with the handle's max tokens, so it can overflow a handle built later."""
    if not outcomes or any(h.init_error is not None for h in holdings):
        return ()
    last = holdings[-1]
    geometry = outcomes[-1].geometry  # the handle the last initialize left
    final: list[LayerOutcome] = []
    seen: set[LayerSpec] = set()
    for o, held in zip(outcomes, holdings, strict=True):
        if held.built_by == last.built_by or not o.fits or o.layer in seen:
            continue
        seen.add(o.layer)
        verdict, error_type, error, check, first = _full_size_outcome(o.layer, geometry)
        final.append(
            replace(
                o,
                rebuilt=False,
                built_by=last.built_by,
                geometry=geometry,
                verdict=verdict,
                error_type=error_type,
                error=error,
                check=check,
                first_failing_tokens=first,
                final_pass=True,
            )
        )
    return tuple(final)


def walk(
    loaded: LoadedPlan,
    model: ManagerModel,
    ep: int,
    stages: list[int],
    observed: dict[int, list[Holding]] | None = None,
) -> PlanWalk:
    """Every requested stage of ``loaded`` at EP size ``ep``: oracle holdings for a policy model,
    else the ``observed`` ones (from :func:`pytest_mnnvl.cli.repro.observe`)."""
    walks = []
    for s in stages:
        if model.policy is not None:
            holdings = oracle_holdings(model.policy, loaded.plan.layers_of_stage(s), ep)
        else:
            assert observed is not None, "an observed model needs observations"
            holdings = observed[s]
        walks.append(walk_stage(loaded, ep, s, holdings))
    return PlanWalk(loaded, model, ep, tuple(walks))
