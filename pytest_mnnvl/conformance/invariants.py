"""The conformance invariants (named in :mod:`.catalog`): one exception type each, and the parent-side checks.

Ranks return observations (:mod:`pytest_mnnvl.conformance.rank`); the checks here hold them against
what every correct growth policy must do (:mod:`pytest_mnnvl.model.oracle`), never against one
implementation's numbers. A violation names the invariant, the layer (stage and index), the rank(s),
expected vs observed, and the plan as JSON, saved to a file that ``python -m pytest_mnnvl
explain|repro PLAN.json`` accepts. Distinct invariants raise distinct types, so Hypothesis keeps
distinct bugs apart; the first failure of a run is reported, not its cascade (after a failed combine
FlashInfer's ``MoeAlltoAll`` stays dispatched, so every later dispatch fails too).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pytest_mnnvl.conformance.observations import (
    OK,
    Decision,
    FailedCommitObservation,
    FailedRebuildObservation,
    LayerStep,
    MismatchObservation,
    PlanObservation,
    decisions,
    plain_collectives,
)
from pytest_mnnvl.managers.adapters import StateRecord
from pytest_mnnvl.model import oracle
from pytest_mnnvl.model.layers import LayerSpec, ModelPlan


class InvariantViolation(AssertionError):
    """Base: one subclass per invariant (``invariant`` is its name in :mod:`.catalog`)."""

    invariant: ClassVar[str] = ""
    level: ClassVar[str] = "must"
    #: What ``repro`` cannot do that this check did to find the violation (None: replaying the plan is enough);
    #: the printed command then offers ``explain`` only and says what to rerun instead.
    not_replayed: ClassVar[str | None] = None

    def __init__(
        self,
        detail: str,
        *,
        stage: int | None = None,
        layer: int | None = None,
        layer_name: str = "",
        ranks: Iterable[int] = (),
        expected: Any = None,
        observed: Any = None,
        plan: ModelPlan | None = None,
        plan_path: str | None = None,
        topology: str = "",
        command: str = "",
    ) -> None:
        self.detail = detail
        self.stage = stage
        self.layer = layer
        self.layer_name = layer_name
        self.ranks = tuple(sorted(set(ranks)))
        self.expected = expected
        self.observed = observed
        self.plan = plan
        self.plan_path = plan_path
        self.topology = topology
        #: The explain|repro command for the saved plan (its path, manager and EP size).
        self.command = command or (f"python -m pytest_mnnvl explain|repro {plan_path}" if plan_path else "")
        super().__init__(self._message())

    def _message(self) -> str:
        where = []
        if self.topology:
            where.append(self.topology)
        if self.stage is not None:
            where.append(f"stage {self.stage}")
        if self.layer is not None:
            where.append(f"layer {self.layer}" + (f" ({self.layer_name})" if self.layer_name else ""))
        if self.ranks:
            where.append("rank" + ("s " if len(self.ranks) > 1 else " ") + ", ".join(map(str, self.ranks)))
        lines = [f"[{self.invariant}] {self.detail}" + (f" — {', '.join(where)}" if where else "")]
        lines.append(f"  expected: {self.expected}")
        lines.append(f"  observed: {self.observed}")
        if self.plan is not None:
            lines.append(
                "  minimal plan" + (f" (saved to {self.plan_path}; `{self.command}`)" if self.plan_path else "") + ":"
            )
            lines.append(self.plan.to_json(indent=None))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "invariant": self.invariant,
            "level": self.level,
            "detail": self.detail,
            "topology": self.topology,
            "stage": self.stage,
            "layer": self.layer,
            "layer_name": self.layer_name,
            "ranks": list(self.ranks),
            "expected": _plain(self.expected),
            "observed": _plain(self.observed),
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "plan_path": self.plan_path,
            "command": self.command or None,
        }


def _plain(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


class CoversViolation(InvariantViolation):
    invariant = "covers"


class NoShrinkViolation(InvariantViolation):
    invariant = "no_shrink"


class NeedlessRebuildViolation(InvariantViolation):
    invariant = "no_needless_rebuild"


class EpSymmetryViolation(InvariantViolation):
    invariant = "ep_symmetry"


class CollectiveScopeViolation(InvariantViolation):
    invariant = "collective_scope"


class PpDeadlockViolation(InvariantViolation):
    invariant = "pp_deadlock_freedom"


class ShapeMismatchViolation(InvariantViolation):
    invariant = "shape_mismatch"


class CleanupViolation(InvariantViolation):
    invariant = "cleanup"


class WorkspaceRaceViolation(InvariantViolation):
    invariant = "workspace_race_free"


class FreesSupersededViolation(InvariantViolation):
    invariant = "frees_superseded"
    level = "should"


class MismatchUnderOViolation(InvariantViolation):
    invariant = "mismatch_survives_O"
    level = "should"
    not_replayed = "repro does not run the manager under python -O"


class FailedRebuildViolation(InvariantViolation):
    invariant = "failed_rebuild_consistent"
    level = "should"
    not_replayed = "repro does not inject the failed build or barrier this check injects"


class CrossProductViolation(InvariantViolation):
    invariant = "covers_cross_product"
    level = "should"


class MinimalRebuildsViolation(InvariantViolation):
    invariant = "minimal_rebuilds"
    level = "should"


VIOLATIONS: dict[str, type[InvariantViolation]] = {
    cls.invariant: cls
    for cls in (
        CoversViolation,
        NoShrinkViolation,
        NeedlessRebuildViolation,
        EpSymmetryViolation,
        CollectiveScopeViolation,
        PpDeadlockViolation,
        ShapeMismatchViolation,
        CleanupViolation,
        WorkspaceRaceViolation,
        FreesSupersededViolation,
        MismatchUnderOViolation,
        FailedRebuildViolation,
        CrossProductViolation,
        MinimalRebuildsViolation,
    )
}


# ---- the judge: context every check needs -------------------------------------------------


@dataclass
class Judge:
    """One plan on one topology: raises violations with the plan saved to ``save_dir``."""

    plan: ModelPlan
    world_size: int
    pp: int
    save_dir: str | None = None
    policy: str | None = None
    saved: list[str] = field(default_factory=list)
    #: Ends every saved plan's name, ``<invariant>-<topology>-<save_tag>.json``: the conformance suite puts the
    #: test's other parameters, the manager and its session's run id there, so that no other test, session
    #: or manager writes the same file (and a printed command always names the plan of its own failure).
    save_tag: str = ""
    #: The ``--mnnvl-manager`` spec, for the printed explain|repro command (empty: the CLI's default).
    manager: str = ""

    @property
    def ep_size(self) -> int:
        return self.world_size // self.pp

    @property
    def topology(self) -> str:
        return f"ws{self.world_size}-pp{self.pp}"

    def layers(self, stage: int) -> tuple[LayerSpec, ...]:
        return self.plan.layers_of_stage(stage) if stage < self.plan.pp else ()

    def save(self, invariant: str) -> str | None:
        """Write the plan as JSON; Hypothesis replays the shrunk example last, so the file ends minimal."""
        if not self.save_dir:
            return None
        os.makedirs(self.save_dir, exist_ok=True)
        name = "-".join(part for part in (invariant, self.topology, self.save_tag) if part)
        path = os.path.join(self.save_dir, f"{name}.json")
        self.plan.save(path)
        self.saved.append(path)
        return path

    def command(self, path: str | None, not_replayed: str | None = None) -> str:
        """``python -m pytest_mnnvl explain|repro PATH --manager SPEC --ep N``: the plan on this topology's EP size;
        ``explain`` alone, saying why, when ``repro`` cannot replay what found the violation (``not_replayed``)."""
        if path is None:
            return ""
        manager = f" --manager {shlex.quote(self.manager)}" if self.manager else ""
        verbs = "explain" if not_replayed else "explain|repro"
        command = f"python -m pytest_mnnvl {verbs} {shlex.quote(path)}{manager} --ep {self.ep_size}"
        return f"{command} ({not_replayed}: rerun this test to reproduce)" if not_replayed else command

    def fail(self, cls: type[InvariantViolation], detail: str, **kwargs: Any) -> InvariantViolation:
        stage, layer = kwargs.get("stage"), kwargs.get("layer")
        if stage is not None and layer is not None and "layer_name" not in kwargs:
            layers = self.layers(stage)
            if 0 <= layer < len(layers):
                kwargs["layer_name"] = layers[layer].name or layers[layer].quant.value
        path = self.save(cls.invariant)
        command = self.command(path, cls.not_replayed)
        return cls(detail, plan=self.plan, plan_path=path, topology=self.topology, command=command, **kwargs)


Results = Sequence[PlanObservation]


def _geometry(state: StateRecord) -> dict[str, Any]:
    return {"size_per_rank": state.size_per_rank, "max_num_tokens": state.max_num_tokens}


def _release(results: Results = ()) -> str:
    """The FlashInfer release the ranks ran (their results say; else this process's)."""
    from pytest_mnnvl.model import releases

    found = next((r.release for r in results if r.release), None)
    return releases.resolve(found)


def _capacity(state: StateRecord, release: str) -> dict[str, Any]:
    """A handle's capacity in the release's terms, for expected/observed."""
    return oracle.observed(oracle.capacity_of(state), release)


def _capacity_of(capacity: oracle.Capacity, release: str) -> dict[str, Any]:
    """The oracle's own capacity (a policy's handle) in the release's terms, for expected/observed."""
    return oracle.observed(capacity, release)


def _failed(outcome: str | None) -> bool:
    return outcome is not None and outcome != OK


# ---- MUST ---------------------------------------------------------------------------------


def check_covers(judge: Judge, results: Results) -> None:
    """After ``initialize(l)`` the live handle covers ``l`` (FlashInfer's checks on its real
    geometry) and a round trip of ``l`` at full tokens passes; after the last ``initialize`` every
    earlier layer's does too. The first failure, in call order, is reported."""
    ep = judge.ep_size
    release = _release(results)
    for r in results:
        layers = judge.layers(r.stage)
        for step in r.steps:
            i, st = step.layer, step.state
            layer = layers[i]
            where = {"stage": r.stage, "layer": i, "ranks": [r.rank]}
            if step.raised is not None:
                raise judge.fail(
                    CoversViolation,
                    "initialize raised for a valid layer",
                    expected="no exception",
                    observed=step.raised,
                    **where,
                )
            expected = oracle.requirement(layer, ep, release)
            if not st.initialized or st.size_per_rank is None or st.max_num_tokens is None:
                raise judge.fail(
                    CoversViolation,
                    "no live handle after initialize",
                    expected=expected,
                    observed={"initialized": st.initialized, "handle": st.stamp is not None},
                    **where,
                )
            if not oracle.covers(oracle.capacity_of(st), layer, ep, release):
                raise judge.fail(
                    CoversViolation,
                    "the live handle cannot serve this layer at full tokens (FlashInfer's host checks)",
                    expected=expected,
                    observed=_capacity(st, release),
                    **where,
                )
            if _failed(step.round_trip):
                raise judge.fail(
                    CoversViolation,
                    "round trip right after this layer's initialize failed",
                    expected="ok",
                    observed=step.round_trip,
                    **where,
                )
        for i, outcome in sorted(r.late_round_trips.items()):
            if _failed(outcome):
                raise judge.fail(
                    CoversViolation,
                    "round trip of an earlier layer after the last initialize failed",
                    stage=r.stage,
                    layer=i,
                    ranks=[r.rank],
                    expected="ok",
                    observed=outcome,
                )


def check_no_shrink(judge: Judge, results: Results) -> None:
    """Bytes per rank and max tokens of the handle (on FlashInfer 0.7.4 also its fixed dispatch and combine
    regions) never decrease while initialized."""
    release = _release(results)
    for r in results:
        prev: StateRecord | None = None
        for step in r.steps:
            st = step.state
            held = prev is not None and prev.initialized and prev.size_per_rank is not None
            if prev is not None and held and oracle.shrunk(oracle.capacity_of(prev), oracle.capacity_of(st), release):
                raise judge.fail(
                    NoShrinkViolation,
                    "the handle shrank",
                    stage=r.stage,
                    layer=step.layer,
                    ranks=[r.rank],
                    expected=f">= {_capacity(prev, release)}",
                    observed=_capacity(st, release),
                )
            prev = st


def check_no_needless_rebuild(judge: Judge, results: Results) -> None:
    """A layer dominated by one the live handle already serves keeps the handle, issues nothing."""
    for r in results:
        layers = judge.layers(r.stage)
        served: list[LayerSpec] = []
        for step in r.steps:
            layer = layers[step.layer]
            if served and oracle.dominated_by_any(layer, served) and (step.rebuilt or step.collectives):
                big = next(i for i, other in enumerate(layers) if other in served and oracle.dominates(other, layer))
                raise judge.fail(
                    NeedlessRebuildViolation,
                    f"layer dominated by layer {big}, which the live handle serves, changed the handle or issued "
                    "collectives",
                    stage=r.stage,
                    layer=step.layer,
                    ranks=[r.rank],
                    expected="same handle, no collective",
                    observed={"rebuilt": step.rebuilt, "collectives": plain_collectives(step.collectives)},
                )
            served = [layer] if step.rebuilt else [*served, layer]


def _by_group(results: Results) -> dict[tuple[int, ...], list[PlanObservation]]:
    groups: dict[tuple[int, ...], list[PlanObservation]] = {}
    for r in results:
        groups.setdefault(tuple(r.ep_group), []).append(r)
    return groups


def check_ep_symmetry(judge: Judge, results: Results) -> None:
    """Every rank of an EP group takes the same decisions and reaches the same state."""
    for group, members in _by_group(results).items():
        views = [decisions(m.steps) for m in members]
        gathered = {v for m in members for v in m.ep_view}
        if len(set(views)) > 1 or len(gathered) > 1:
            base = views[0]
            for m, view in zip(members, views, strict=True):
                if view != base:
                    step = next((a.layer for a, b in zip(base, view, strict=False) if a != b), None)
                    raise judge.fail(
                        EpSymmetryViolation,
                        f"ranks of EP group {list(group)} disagree (all-gathered decisions and states)",
                        stage=m.stage,
                        layer=step,
                        ranks=[members[0].rank, m.rank],
                        expected=_row(base, step),
                        observed=_row(view, step),
                    )
            raise judge.fail(
                EpSymmetryViolation,
                f"the all-gathered views of EP group {list(group)} disagree",
                stage=members[0].stage,
                ranks=group,
                expected="one view",
                observed=sorted(tuple(d.row() for d in v) for v in gathered),
            )
        for key, seen in (
            ("after_cleanup", [m.after_cleanup for m in members]),
            ("reinit", [m.reinit for m in members]),
        ):
            states = {
                (s.initialized, s.stamp is not None, s.size_per_rank, s.max_num_tokens) for s in seen if s is not None
            }
            if len(states) > 1:
                raise judge.fail(
                    EpSymmetryViolation,
                    f"ranks of EP group {list(group)} disagree {key.replace('_', ' ')}",
                    stage=members[0].stage,
                    ranks=group,
                    expected="one state",
                    observed=sorted(states),
                )


def _row(view: Sequence[Decision], step: int | None) -> dict[str, Any] | None:
    """One step's decision as expected/observed show it (field name -> value)."""
    for decision in view:
        if decision.layer == step:
            return dataclasses.asdict(decision)
    return None


def check_collective_scope(judge: Judge, results: Results) -> None:
    """Every collective inside ``initialize`` stays within the EP group (by group membership)."""
    for r in results:
        group = set(r.ep_group)
        calls = [(s.layer, c) for s in r.steps for c in s.collectives]
        calls += [(0, c) for c in r.reinit_collectives]
        for layer, (name, ranks) in ((layer, c.plain()) for layer, c in calls):
            if not set(ranks) <= group:
                raise judge.fail(
                    CollectiveScopeViolation,
                    f"{name} inside initialize reached beyond the EP group",
                    stage=r.stage,
                    layer=layer,
                    ranks=[r.rank],
                    expected=f"group within {sorted(group)}",
                    observed=f"{name}(group={list(ranks)})",
                )


_BLOCKED_GROUP = re.compile(r"(\w+)\(group=\[([\d, ]*)\]\)")


def scope_from_deadlock(judge: Judge, blocked_in: dict[int, str], groups: dict[int, set[int]]) -> None:
    """A deadlocked rank blocked in a collective beyond its EP group is a collective-scope violation."""
    for rank, text in sorted(blocked_in.items()):
        found = _BLOCKED_GROUP.search(text or "")
        if not found:
            continue
        members = {int(x) for x in found.group(2).split(",") if x.strip()}
        if rank in groups and not members <= groups[rank]:
            raise judge.fail(
                CollectiveScopeViolation,
                "a rank hung in a collective beyond its EP group",
                ranks=[rank],
                expected=f"group within {sorted(groups[rank])}",
                observed=text,
            )


def check_cleanup(judge: Judge, results: Results) -> None:
    """``cleanup()`` releases the handle and leaves the manager uninitialized; initialize works after."""
    ep = judge.ep_size
    release = _release(results)
    for r in results:
        after, st = r.after_cleanup, r.reinit
        if not r.steps or after is None or st is None:
            continue
        first = judge.layers(r.stage)[0]
        where = {"stage": r.stage, "layer": 0, "ranks": [r.rank]}
        if r.cleanup_raised:
            raise judge.fail(
                CleanupViolation, "cleanup() raised", expected="no exception", observed=r.cleanup_raised, **where
            )
        if after.initialized or after.stamp is not None:
            raise judge.fail(
                CleanupViolation,
                "cleanup() left the manager initialized or kept the handle",
                expected={"initialized": False, "handle": None},
                observed={"initialized": after.initialized, "handle": after.stamp is not None},
                **where,
            )
        capacity = oracle.capacity_of(st)
        if r.reinit_raised or not st.initialized or st.stamp is None or not oracle.covers(capacity, first, ep, release):
            raise judge.fail(
                CleanupViolation,
                "initialize after cleanup() did not give a working handle",
                expected=f"initialized handle covering need {oracle.need(first, ep, release)}",
                observed={
                    "raised": r.reinit_raised,
                    "initialized": st.initialized,
                    "handle": st.stamp is not None,
                    **_geometry(st),
                },
                **where,
            )
        if _failed(r.reinit_round_trip):
            raise judge.fail(
                CleanupViolation,
                "round trip after cleanup() + initialize failed",
                expected="ok",
                observed=r.reinit_round_trip,
                **where,
            )


# ---- SHOULD -------------------------------------------------------------------------------


def check_frees_superseded(judge: Judge, results: Results) -> None:
    """Superseded workspaces leave FlashInfer's process-wide workspace table (FlashInfer's own records):
    on 0.7.2 the manager must evict them from ``MoeAlltoAll._WORKSPACE_CACHE`` (dropping a handle frees
    nothing); on 0.7.4 FlashInfer frees one itself with the ``destroy()`` of its last user, so a leak
    there is a superseded ``NVLinkOneSidedAlltoAll`` never destroyed."""
    release = _release(results)
    rules = oracle.arithmetic(release)
    for r in results:
        if not r.steps:
            continue
        live = 1 if r.final_has_handle else 0
        if r.tables is not None and rules.WORKSPACE_TABLE not in r.tables and r.workspaces_before_cleanup < live:
            # Not a verdict: the ranks could not read the table a leak would be in (nothing may pass for that).
            raise RuntimeError(
                f"pytest-mnnvl: rank {r.rank} holds a live handle but could not read FlashInfer {release}'s "
                f"{rules.WORKSPACE_TABLE} (tables found: {list(r.tables) or 'none'}); frees_superseded cannot be judged"
            )
        leaked = r.workspaces_before_cleanup - live
        if leaked > 0:
            raise judge.fail(
                FreesSupersededViolation,
                f"superseded workspaces are still in {rules.WORKSPACE_TABLE} ({rules.LEAK_RULE})",
                stage=r.stage,
                ranks=[r.rank],
                expected=f"{live} cached workspace(s) (the live one)",
                observed=f"{r.workspaces_before_cleanup} cached, {leaked} superseded",
            )
        if r.workspaces_at_end > 0:
            raise judge.fail(
                FreesSupersededViolation,
                "workspaces still cached after cleanup()",
                stage=r.stage,
                ranks=[r.rank],
                expected=0,
                observed=r.workspaces_at_end,
            )


def check_covers_cross_product(judge: Judge, results: Results) -> None:
    """The final handle covers max tokens × each layout seen (arithmetic and real round trips)."""
    from pytest_mnnvl.conformance.rank import cross_product_probes

    ep = judge.ep_size
    release = _release(results)
    for r in results:
        layers = judge.layers(r.stage)
        if not r.steps or r.stopped:
            continue
        st = r.steps[-1].state
        capacity = oracle.capacity_of(st)
        probes = cross_product_probes(layers)
        for index, probe in enumerate(probes):
            outcome = r.probes.get(index)
            if not oracle.covers(capacity, probe, ep, release) or _failed(outcome):
                raise judge.fail(
                    CrossProductViolation,
                    f"the final handle does not cover {probe.quant.value} H={probe.hidden_size} at "
                    f"{probe.max_num_tokens} tokens (max tokens x this layout)",
                    stage=r.stage,
                    ranks=[r.rank],
                    expected=f"size_per_rank >= {oracle.cross_product_need(layers, ep, release)}",
                    observed={**_capacity(st, release), "round_trip": outcome},
                )


def check_minimal_rebuilds(judge: Judge, results: Results) -> None:
    """Builds (first included) no more, and none larger, than the manager's declared policy needs: after each
    ``initialize`` the live handle is no larger, in any dimension the release's handle has, than the policy's
    own handle for the layers seen so far (its trajectory; the covers checks bound it from below)."""
    if judge.policy is None:
        return
    release = _release(results)
    for r in results:
        layers = judge.layers(r.stage)
        if not r.steps or r.stopped:
            continue
        path = oracle.trajectory(judge.policy, layers, judge.ep_size, release)
        observed = sum(1 for s in r.steps if s.rebuilt)
        least = sum(s.rebuilt for s in path)
        if observed > least:
            raise judge.fail(
                MinimalRebuildsViolation,
                f"more builds than the declared policy {judge.policy!r} needs",
                stage=r.stage,
                ranks=[r.rank],
                expected=f"{least} builds {[s.rebuilt for s in path]}",
                observed=f"{observed} builds {[s.rebuilt for s in r.steps]}",
            )
        for step in r.steps:
            st, bound = step.state, path[step.layer].capacity
            if not st.initialized or st.size_per_rank is None:
                continue  # no live handle: the covers checks' verdict
            over = oracle.oversized(oracle.capacity_of(st), bound, release)
            if over:
                raise judge.fail(
                    MinimalRebuildsViolation,
                    f"the live handle is larger than the declared policy {judge.policy!r} needs for the layers so "
                    f"far ({', '.join(f'{name} {have} > {most}' for name, (have, most) in over.items())})",
                    stage=r.stage,
                    layer=step.layer,
                    ranks=[r.rank],
                    expected=f"<= {_capacity_of(bound, release)}",
                    observed=_capacity(st, release),
                )


#: How the sim's race detector names its error (the first line of an outcome starts with it).
RACE_ERROR = "WorkspaceRace"


def _race_outcomes(r: PlanObservation) -> Iterable[tuple[str, int | None, str | None]]:
    """(where, layer, outcome) of every call of one rank's plan that may have met a race."""
    for step in r.steps:
        yield "initialize", step.layer, step.raised
        yield "round trip after initialize", step.layer, step.round_trip
        for i, outcome in sorted(step.earlier_round_trips.items()):
            yield "round trip of an earlier layer", i, outcome
    for i, outcome in sorted(r.late_round_trips.items()):
        yield "round trip of an earlier layer after the last initialize", i, outcome
    for i, outcome in sorted(r.probes.items()):
        yield "cross-product probe", i, outcome
    yield "cleanup raised", None, r.cleanup_raised
    yield "reinit raised", None, r.reinit_raised
    yield "reinit round trip", None, r.reinit_round_trip
    yield "second cleanup raised", None, r.second_cleanup_raised


def _races(results: Results) -> list[tuple[PlanObservation, str, int | None, str]]:
    found = []
    for r in results:
        for where, layer, outcome in _race_outcomes(r):
            if isinstance(outcome, str) and RACE_ERROR in outcome:
                found.append((r, where, layer, outcome))
    return found


def check_workspace_race_free(judge: Judge, results: Results) -> None:
    """No call of the plan writes workspace bytes a peer's combine may still be reading: on a GPU that
    corrupts the peer's result silently, whenever the timing is unlucky. The sim judges the order
    (what synchronises the EP group between a combine and a later write), so the verdict does not
    depend on timing; the harness's own bookkeeping collectives do not count as order."""
    found = _races(results)
    if not found:
        return
    # The rank that detected it names writer, reader and bytes; its peers only saw the poison.
    r, where, layer, outcome = next((f for f in found if "poisoned" not in f[3]), found[0])
    raise judge.fail(
        WorkspaceRaceViolation,
        f"{where} wrote workspace bytes a peer may still be reading",
        stage=r.stage,
        layer=layer,
        ranks=[f[0].rank for f in found],
        expected="every write into a live workspace ordered after the peers' combine reads",
        observed=outcome,
    )


def _unless_raced(check: Callable[[Judge, Results], None]) -> Callable[[Judge, Results], None]:
    """After a race every later observation may be the corruption's cascade: only its own check reports."""

    def judged(judge: Judge, results: Results) -> None:
        if not _races(results):
            check(judge, results)

    judged.__doc__ = check.__doc__
    judged.__name__ = check.__name__
    return judged


PLAN_CHECKS: dict[str, Callable[[Judge, Results], None]] = {
    "covers": _unless_raced(check_covers),
    "no_shrink": _unless_raced(check_no_shrink),
    "no_needless_rebuild": _unless_raced(check_no_needless_rebuild),
    "ep_symmetry": _unless_raced(check_ep_symmetry),
    "collective_scope": _unless_raced(check_collective_scope),
    "cleanup": _unless_raced(check_cleanup),
    "workspace_race_free": check_workspace_race_free,
    "frees_superseded": _unless_raced(check_frees_superseded),
    "covers_cross_product": _unless_raced(check_covers_cross_product),
    "minimal_rebuilds": _unless_raced(check_minimal_rebuilds),
}


#: What a continuation layer's decision is compared on with the control's (the collectives are the
#: build's, counted by ``no_needless_rebuild``; stamps are per process).
_DECIDED = ("rebuilt", "initialized", "handle", "size_per_rank", "max_num_tokens", "top_k", "num_experts", "layout")


def _decided(step: LayerStep) -> dict[str, Any]:
    row = dataclasses.asdict(Decision.of(step))
    return {name: row[name] for name in _DECIDED}


def check_continuation(
    judge: Judge,
    results: Sequence[MismatchObservation | FailedRebuildObservation],
    after: str,
    cls: type[InvariantViolation],
) -> None:
    """A call that "changes no state" is judged by what happens next: after ``after``, each further layer of
    the original shape initializes, round-trips on the handle, and takes the decisions (rebuild or not, the
    handle's capacity and shape) that a fresh manager that never saw the bad call takes for the same layers in the
    same world. A snapshot reads the handle and the normalized record only; this catches the rest. Only what
    differs from that fresh manager is blamed: a layer it cannot serve either is the plan checks' finding."""
    release = _release()
    for r in results:
        if r.control_stopped is not None:
            continue  # the fresh manager fails the plan by itself: the plan checks' business, not this one's
        controls = {step.layer: step for step in r.control}
        for step in r.continuation:
            control = controls.get(step.layer)
            if control is None:
                break  # the fresh manager stopped before this layer: it fails the plan by itself
            where = {"stage": 0, "layer": step.layer, "ranks": [r.rank]}
            if step.peer_raised is not None and control.peer_raised is None:
                raise judge.fail(
                    cls,
                    f"a later layer of the original shape does not initialize after {after}",
                    expected="initialize returns on every rank (as on a fresh manager)",
                    observed=step.raised or f"a peer raised: {step.peer_raised}",
                    **where,
                )
            if _failed(step.round_trip) and not _failed(control.round_trip):
                raise judge.fail(
                    cls,
                    f"a later layer of the original shape does not round-trip after {after}",
                    expected="ok (as on a fresh manager)",
                    observed={"round_trip": step.round_trip, **_capacity(step.state, release)},
                    **where,
                )
    for r in results:
        if r.control_stopped is not None:
            continue  # the fresh manager fails the plan by itself: the plan checks' business, not this one's
        mine = {step.layer: step for step in r.continuation}
        for control in r.control:
            if control.layer not in mine:
                continue
            ours, theirs = _decided(mine[control.layer]), _decided(control)
            differ = [name for name in _DECIDED if ours[name] != theirs[name]]
            if differ:
                raise judge.fail(
                    cls,
                    f"after {after} a later layer of the original shape gets other decisions than on a fresh "
                    f"manager that never saw it ({', '.join(differ)} differ)",
                    expected={name: theirs[name] for name in differ},
                    observed={name: ours[name] for name in differ},
                    stage=0,
                    layer=control.layer,
                    ranks=[r.rank],
                )


def check_mismatch(
    judge: Judge,
    results: Sequence[MismatchObservation],
    field_name: str,
    *,
    cls: type[InvariantViolation] = ShapeMismatchViolation,
) -> None:
    """A different ``top_k``/``num_experts`` raises on every rank and changes nothing."""
    for r in results:
        where = {"stage": 0, "layer": 1, "ranks": [r.rank]}
        if r.raised is None:
            raise judge.fail(
                cls,
                f"initialize with a different {field_name} was accepted",
                expected="an exception",
                observed="no exception",
                **where,
            )
        if not r.same_handle or r.after != r.before or r.collectives:
            raise judge.fail(
                cls,
                f"initialize with a different {field_name} raised but changed state",
                expected={"state": r.before, "collectives": []},
                observed={
                    "raised": r.raised,
                    "same_handle": r.same_handle,
                    "state": r.after,
                    "collectives": plain_collectives(r.collectives),
                },
                **where,
            )
        if _failed(r.round_trip_after):
            raise judge.fail(
                cls,
                "the first layer no longer round-trips after the refused call",
                expected="ok",
                observed=r.round_trip_after,
                **where,
            )
    check_continuation(judge, results, f"the refused {field_name} mismatch", cls)


def check_failed_rebuild(judge: Judge, results: Sequence[FailedRebuildObservation]) -> None:
    """A rebuild that fails leaves the previous working state; a retry then rebuilds and works."""
    ep = judge.ep_size
    release = _release()  # a failed-rebuild observation names no release: the ranks run this process's
    second = judge.layers(0)[1]
    for r in results:
        where = {"stage": 0, "layer": 1, "ranks": [r.rank]}
        if r.raised is not None and (not r.same_handle or r.after_failure != r.before):
            raise judge.fail(
                FailedRebuildViolation,
                "the failed rebuild changed the manager's state",
                expected=r.before,
                observed=r.after_failure,
                **where,
            )
        if _failed(r.first_round_trip):
            raise judge.fail(
                FailedRebuildViolation,
                "the previous layer no longer works after the failed rebuild",
                expected="ok",
                observed=r.first_round_trip,
                stage=0,
                layer=0,
                ranks=[r.rank],
            )
        st = r.after_retry
        capacity = oracle.capacity_of(st)
        if r.retry_raised or not oracle.covers(capacity, second, ep, release) or _failed(r.retry_round_trip):
            raise judge.fail(
                FailedRebuildViolation,
                "retrying the layer after a failed rebuild did not serve it",
                expected=f"handle covering need {oracle.need(second, ep, release)}, round trip ok",
                observed={
                    "raised": r.retry_raised,
                    **_capacity(st, release),
                    "round_trip": r.retry_round_trip,
                },
                **where,
            )
    check_continuation(judge, results, "the failed rebuild and its retry", FailedRebuildViolation)


def check_failed_commit(judge: Judge, results: Sequence[FailedCommitObservation]) -> None:
    """A rebuild whose build succeeded but whose synchronisation after it failed leaves one working state (the
    previous one, or a live handle that serves the new layer), no more of FlashInfer's workspaces than the same
    growth leaves when it succeeds, and a retry that works. Judged only where the manager met the injected failure
    (it issues a ``torch.distributed.barrier`` after its build)."""
    ep = judge.ep_size
    release = _release()  # the observation names no release: the ranks run this process's
    second = judge.layers(0)[1]
    for r in results:
        if not r.injected:
            continue
        where = {"stage": 0, "layer": 1, "ranks": [r.rank]}
        kept = r.same_handle and r.after_failure == r.before
        serves = r.after_failure.initialized and oracle.covers(oracle.capacity_of(r.after_failure), second, ep, release)
        if r.raised is not None and not kept and not serves:
            raise judge.fail(
                FailedRebuildViolation,
                "after the barrier that followed a successful build failed, the manager holds neither its previous "
                "state nor a handle that serves the layer",
                expected={"previous": r.before, "or serving": oracle.requirement(second, ep, release)},
                observed=r.after_failure,
                **where,
            )
        if r.extra_workspaces > r.control_extra_workspaces:
            rules = oracle.arithmetic(release)
            raise judge.fail(
                FailedRebuildViolation,
                f"the barrier after a successful build failed and the new workspace was left in {rules.WORKSPACE_TABLE}"
                " (the manager neither released it nor kept it live)",
                expected=f"<= {r.control_extra_workspaces} workspace(s) beyond the live one (as the same growth leaves"
                " when it succeeds)",
                observed=f"{r.extra_workspaces} beyond the live one",
                **where,
            )
        st = r.after_retry
        if (
            r.retry_raised
            or not oracle.covers(oracle.capacity_of(st), second, ep, release)
            or _failed(r.retry_round_trip)
        ):
            raise judge.fail(
                FailedRebuildViolation,
                "retrying the layer after the failed barrier did not serve it",
                expected=f"handle covering need {oracle.need(second, ep, release)}, round trip ok",
                observed={"raised": r.retry_raised, **_capacity(st, release), "round_trip": r.retry_round_trip},
                **where,
            )
