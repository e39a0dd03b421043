"""``repro``: the plan run on a real rank world, first failure shown exactly as FlashInfer raises it.

The world has ``ep × pp`` ranks (:mod:`pytest_mnnvl.worlds.pool`): ``sim`` runs FlashInfer's own Python
on CPU ranks, ``flashinfer`` the real thing on GPUs. Every stage initializes its layers in order (the
MTP head last on the last stage) and round-trips each one at its full token count right after its own
``initialize`` (a defect can hide behind a later, larger layer that grows the workspace). The parent
drives one layer step per call, prints progress, and at the end puts the first failure next to what the
arithmetic (:mod:`.analysis`) predicts for the workspace the ranks really held.

:func:`observe` is the same walk without round trips, for ``explain``/``predict`` of managers no
oracle policy models.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pytest_mnnvl.cli import analysis, render, repro_rank
from pytest_mnnvl.cli.inputs import EXIT_FAILS, EXIT_OK, EXIT_WORLD, LoadedPlan, UsageError
from pytest_mnnvl.cli.policy import resolve_factory
from pytest_mnnvl.conformance.observations import CallError, LayerStep, Phase
from pytest_mnnvl.errors import MnnvlError, RankError
from pytest_mnnvl.managers.adapters import StateRecord
from pytest_mnnvl.model import sizing, sizing_v074
from pytest_mnnvl.model.layers import LayerSpec
from pytest_mnnvl.model.oracle import Capacity, trajectory
from pytest_mnnvl.worlds.sharing import RanksPerGpu

#: Seconds a rank world gets to start (spawn, imports, rendezvous), on top of the per-step timeout.
STARTUP_TIMEOUT_S = 180.0


def classify(error_type: str, message: str) -> str:
    """Which check an exception from a round trip is (by FlashInfer's exact texts, of either release)."""
    if message == sizing.check_failed_message(sizing.COMBINE_SIZE_CONDITION, sizing.COMBINE_SIZE_DETAIL):
        return "combine"
    if message.startswith(sizing.check_failed_message(sizing.DISPATCH_SIZE_CONDITION)):
        return "dispatch"
    if message.startswith(sizing.check_failed_message(sizing_v074.COMBINE_CAPACITY_CONDITION)):
        return "combine"
    if message.startswith(sizing.check_failed_message(sizing_v074.DISPATCH_CAPACITY_CONDITION)):
        return "dispatch"
    if message == sizing_v074.runtime_tokens_message():
        return "tokens"
    if "Misaligned payload buffer" in message:
        return "misaligned"
    if message == sizing.RUNTIME_TOKENS_EXCEED_MAX:
        return "tokens"
    if error_type == "RoundTripMismatch":
        return "wrong data"
    return "other"


def failed_check(phase: Phase, error: CallError) -> str:
    """Which check a failing step is: ``initialize``, or the round trip's (step or final pass) by its error."""
    return "initialize" if phase is Phase.INITIALIZE else classify(error.type, error.message)


@dataclass(frozen=True)
class Driver:
    """What the ranks run: the real manager (``factory``) or a policy standing in for one."""

    spec: str
    policy: str | None
    factory: Any = None

    @property
    def rank_driver(self) -> tuple[str, Any]:
        return ("manager", self.factory) if self.policy is None else ("policy", self.policy)

    def describe(self) -> str:
        if self.policy is not None:
            return f"oracle policy {self.policy} driving FlashInfer's own handle directly (--policy)"
        f = self.factory
        return f"the real {f.module}.{f.qualname} (shape {f.shape}), built on every rank's EP group"


def make_driver(spec: str, policy: str | None) -> Driver:
    if policy is not None:
        return Driver(f"policy:{policy}", policy)
    return Driver(spec, None, resolve_factory(spec))


def _world(
    loaded: LoadedPlan, ep: int, backend: str, timeout: float, ranks_per_gpu: RanksPerGpu = 1, mps: Any = None
) -> Any:
    """The rank world; on flashinfer its GPUs follow ``ranks_per_gpu`` and its ranks get ``mps``'s environment."""
    import os

    from pytest_mnnvl.worlds.pool import World, WorldSpec

    world_size = ep * loaded.plan.pp
    if backend != "flashinfer":
        return World(WorldSpec(world_size, loaded.plan.pp, backend), timeout, max(STARTUP_TIMEOUT_S, timeout))
    from pytest_mnnvl.probes.backend import world_gpu_plan
    from pytest_mnnvl.probes.gpus import gpu_inventory

    _check_gpus(world_size, ranks_per_gpu)
    plan = world_gpu_plan(world_size, ranks_per_gpu, gpu_inventory(), os.environ)
    env = mps.state.rank_env(plan.ranks_per_gpu, os.environ) if mps is not None else ()
    spec = WorldSpec(world_size, loaded.plan.pp, backend, env, plan.devices, plan.ranks_per_gpu)
    return World(spec, timeout, startup_timeout=max(STARTUP_TIMEOUT_S, timeout))


def _check_gpus(world_size: int, ranks_per_gpu: RanksPerGpu) -> None:
    """A usage error, before anything starts, when FlashInfer cannot run ``world_size`` ranks here."""
    from pytest_mnnvl.probes.backend import missing_for_one_sided_shared

    missing = missing_for_one_sided_shared(world_size, ranks_per_gpu)
    if missing is not None:
        for option, ours in (("--mnnvl-ranks-per-gpu=", "--ranks-per-gpu "), ("--mnnvl-backend=", "--backend ")):
            missing = missing.replace(option, ours)
        raise UsageError(f"--backend flashinfer: cannot run {world_size} ranks here: {missing}; use --backend sim")


def _open_mps(args: argparse.Namespace) -> Any:
    """``--mps`` for a flashinfer run (a private daemon lives until :func:`run` ends); None on the sim."""
    if args.backend != "flashinfer":
        return None
    import os

    from pytest_mnnvl.worlds import mps

    try:
        return mps.open_session(args.mps, True, os.environ, mps.find_control(), None)
    except mps.MpsStartError as exc:
        raise UsageError(str(exc).replace("--mnnvl-mps=", "--mps ")) from None


def _world_record(world: Any, mps: Any) -> tuple[str, dict[str, Any]] | None:
    """Where the ranks run, on GPUs: ``world: 4 ranks on 1 GPU, MPS off (...); NVLink itself is not exercised``
    and its JSON twin; None on the sim."""
    from pytest_mnnvl.worlds.sharing import NVLINK_NOT_EXERCISED, GpuPlan

    spec = world.spec
    if spec.devices is None or mps is None:
        return None
    plan = GpuPlan(spec.world_size, spec.devices, spec.ranks_per_gpu)
    note = ""
    if plan.shared:
        note = NVLINK_NOT_EXERCISED if not plan.nvlink_exercised else "NVLink carries only the cross-GPU traffic"
    state = mps.state
    record = {
        "ranks": plan.world_size,
        "gpus": len(plan.devices),
        "ranks_per_gpu": plan.ranks_per_gpu,
        "shared": plan.shared,
        "mps": {"mode": state.mode, "on": state.on, "reason": state.reason},
        "nvlink_exercised": not plan.shared or plan.nvlink_exercised,
        "note": note or None,
    }
    return f"world: {plan.describe()}, {state.describe()}" + (f"; {note}" if note else ""), record


@dataclass
class StageRecord:
    """What one stage's ranks did, step by step (EP rank 0's view, plus every rank's error)."""

    stage: int
    steps: list[LayerStep] = field(default_factory=list)
    #: ``(index, phase, {rank: error})`` of the first failing step; phase ``final_pass`` when the layer
    #: fit its own step but not the handle the stage ended with.
    failure: tuple[int, Phase, dict[int, CallError]] | None = None
    #: Layers round-tripped again on the final handle (``None``: no final pass ran).
    final_checked: list[int] | None = None

    @property
    def failed_in_final_pass(self) -> bool:
        return self.failure is not None and self.failure[1] == repro_rank.FINAL_PASS


def _builds(driver: Driver, layers: tuple[LayerSpec, ...], ep: int) -> list[Capacity | None]:
    """Per layer, the capacity the policy driver builds at its ``initialize`` (``None``: keep the handle)."""
    if driver.policy is None:
        return [None] * len(layers)
    holdings = analysis.oracle_holdings(driver.policy, layers, ep)
    # A refused layer (another top_k or num_experts) and those after it build nothing.
    served = next((i for i, h in enumerate(holdings) if h.init_error is not None), len(layers))
    steps = trajectory(driver.policy, layers[:served], ep)
    return [steps[i].capacity if i < served and h.rebuilt else None for i, h in enumerate(holdings)]


def _drive(
    loaded: LoadedPlan,
    driver: Driver,
    world: Any,
    ep: int,
    round_trip: bool,
    every_layer: bool,
    on_step: Callable[[int, dict[int, list[repro_rank.RankStep]]], None],
    on_final: Callable[[StageRecord], None] | None = None,
) -> dict[int, StageRecord]:
    """Drive the plan one layer step at a time; with ``on_final``, then the final pass (every layer again on
    the handle each stage ended with)."""
    plan = loaded.plan
    world.call(repro_rank.open_session, (driver.rank_driver,), timeout=world.startup_timeout)
    stage_layers = {s: plan.layers_of_stage(s) for s in range(plan.pp)}
    builds = {s: _builds(driver, layers, ep) for s, layers in stage_layers.items()}
    records = {s: StageRecord(s) for s in range(plan.pp)}
    try:
        for index in range(max(len(layers) for layers in stage_layers.values())):
            work = {
                s: (layers[index], builds[s][index])
                for s, layers in stage_layers.items()
                if index < len(layers) and records[s].failure is None
            }
            if not work:
                break
            results: list[repro_rank.RankStep | None] = world.call(
                repro_rank.step, (index, work, round_trip, every_layer)
            )
            by_stage: dict[int, list[repro_rank.RankStep]] = {}
            for result in results:
                if result is not None:
                    by_stage.setdefault(result.stage, []).append(result)
            for s, rows in by_stage.items():
                rows.sort(key=lambda r: r.ep_rank)
                record = records[s]
                errors = {r.rank: r.step.error for r in rows if r.step.error is not None}
                if errors:
                    phase = next(r.step.phase for r in rows if r.step.phase is not None)
                    record.failure = (index, phase, errors)
                record.steps.append(rows[0].step)
            on_step(index, by_stage)
        if on_final is not None and round_trip:
            _final_pass(world, stage_layers, records, on_final)
    finally:
        with contextlib.suppress(MnnvlError):
            world.call(repro_rank.close_session, timeout=min(world.timeout, 30.0))
    return records


def _final_pass(
    world: Any,
    stage_layers: dict[int, tuple[LayerSpec, ...]],
    records: dict[int, StageRecord],
    on_final: Callable[[StageRecord], None],
) -> None:
    todo = {s: layers for s, layers in stage_layers.items() if records[s].failure is None and layers}
    if not todo:
        return
    by_stage: dict[int, list[repro_rank.FinalPass]] = {}
    results: list[repro_rank.FinalPass | None] = world.call(repro_rank.final_pass, (todo,))
    for result in results:
        if result is not None:
            by_stage.setdefault(result.stage, []).append(result)
    for s, rows in sorted(by_stage.items()):
        rows.sort(key=lambda r: r.ep_rank)
        record = records[s]
        failed = [(r.rank, r.index, r.error) for r in rows if r.index is not None and r.error is not None]
        if failed:
            index = min(i for _rank, i, _error in failed)
            errors = {rank: error for rank, i, error in failed if i == index}
            record.failure = (index, repro_rank.FINAL_PASS, errors)
        record.final_checked = sorted({i for r in rows for i in r.checked})
        on_final(record)


def _holdings(record: StageRecord, layers: tuple[LayerSpec, ...]) -> list[analysis.Holding]:
    """Observed states as the analysis' holdings; layers not reached inherit the stopping error."""
    holdings: list[analysis.Holding] = []
    first_of: dict[Any, int] = {}
    stop: tuple[str, str] | None = None
    for index, _layer in enumerate(layers):
        step = record.steps[index] if index < len(record.steps) else None
        state = _held(step)
        failed_here = (
            record.failure is not None and record.failure[0] == index and record.failure[1] is Phase.INITIALIZE
        )
        if failed_here and record.failure is not None:
            err = next(iter(record.failure[2].values()))
            stop = (err.type, err.message)
            prev = holdings[-1] if holdings else None
            holdings.append(
                analysis.Holding(
                    False,
                    prev.built_by if prev else -1,
                    prev.size_per_rank if prev else 0,
                    prev.max_num_tokens if prev else 0,
                    init_error=stop,
                )
            )
            continue
        if stop is not None or step is None or state is None:
            holdings.append(
                analysis.Holding(
                    False, -1, 0, 0, init_error=("NotReached", "not initialized: an earlier step of this stage failed")
                )
            )
            continue
        stamp = state.stamp
        first_of.setdefault(stamp, index)
        holdings.append(
            analysis.Holding(
                step.rebuilt,
                first_of[stamp],
                int(state.size_per_rank or 0),
                int(state.max_num_tokens or 0),
                layers[first_of[stamp]].eplb_stats_num_experts,
            )
        )
    return holdings


def _held(step: LayerStep | None) -> StateRecord | None:
    """The state a step left to show: none where its own ``initialize`` raised on this rank."""
    return None if step is None or step.raised is not None else step.state


def observe(loaded: LoadedPlan, spec: str, ep: int, timeout: float = 120.0) -> dict[int, list[analysis.Holding]]:
    """Run the real manager's ``initialize`` per layer on a sim world; the handle it holds after each."""
    driver = make_driver(spec, None)
    world = _world(loaded, ep, "sim", timeout)
    try:
        records = _drive(loaded, driver, world, ep, False, False, lambda i, r: None)
    except MnnvlError as exc:
        raise UsageError(f"--manager {spec!r}: observing it on a sim world failed: {_one_line(exc)}") from None
    finally:
        world.close()
    return {s: _holdings(rec, loaded.plan.layers_of_stage(s)) for s, rec in records.items()}


def _one_line(error: MnnvlError) -> str:
    """The world's failure on one line, with what the ranks raised: a manager whose constructor raises shows
    up as a ``RankError`` whose first line alone ("2 of 2 ranks raised") says nothing of why."""
    head = str(error).splitlines()[0] if str(error) else type(error).__name__
    if not isinstance(error, RankError) or not error.tracebacks:
        return head
    rank, trace = next(iter(error.tracebacks.items()))
    lines = [line.strip() for line in trace.splitlines() if line.strip()]
    return f"{head}; rank {rank}: {lines[-1] if lines else 'no traceback'}"


# ---- the command --------------------------------------------------------------------------------


class _Progress:
    """One line per step that did something new; runs of repeated layers are summarized."""

    def __init__(self, loaded: LoadedPlan, out: Any) -> None:
        self.loaded = loaded
        self.out = out
        self.skipped: dict[int, list[int]] = {}

    def _flush(self, stage: int) -> None:
        run = self.skipped.pop(stage, [])
        if run:
            span = f"{run[0]}" if len(run) == 1 else f"{run[0]}-{run[-1]}"
            print(
                f"  stage {stage} layers {span}: handle kept, same layer as one already round-tripped on it "
                "(not repeated; --every-layer repeats them)",
                file=self.out,
            )

    def __call__(self, index: int, by_stage: dict[int, list[repro_rank.RankStep]]) -> None:
        for stage in sorted(by_stage):
            row = by_stage[stage][0].step
            layer = self.loaded.plan.layers_of_stage(stage)[index]
            state = _held(row)
            rebuilt = state is not None and row.rebuilt
            failed = [(r.rank, r.step.phase, r.step.error) for r in by_stage[stage] if r.step.error is not None]
            if not failed and row.round_trip is not None and row.same_as is not None and not rebuilt:
                self.skipped.setdefault(stage, []).append(index)
                continue
            self._flush(stage)
            name = analysis.layer_label(self.loaded, stage, index)
            held = (
                f"{'built' if rebuilt else 'kept'} {render.n(state.size_per_rank)} B/rank, "
                f"max_num_tokens {state.max_num_tokens}"
                if state is not None and state.size_per_rank is not None
                else "no handle"
            )
            if failed:
                _rank, phase, err = failed[0]
                assert phase is not None and err is not None
                where = failed_check(phase, err)
                what = f"FAILED in {where} on rank(s) {', '.join(str(r) for r, _p, _e in failed)}"
            elif row.round_trip is None:
                what = "initialized"
            else:
                what = f"round trip at T={layer.max_num_tokens} ok"
            print(f"  stage {stage} layer {index} {name!r} ({layer.quant.value}): {held}; {what}", file=self.out)

    def final(self, record: StageRecord) -> None:
        """The final pass of one stage: which layers ran again on the handle it ended with, and how."""
        self._flush(record.stage)
        checked = record.final_checked or []
        if record.failed_in_final_pass:
            assert record.failure is not None
            index, _phase, errors = record.failure
            rank = min(errors)
            err = errors[rank]
            name = analysis.layer_label(self.loaded, record.stage, index)
            print(
                f"  stage {record.stage} final pass: layer {index} {name!r} again on the handle the stage ended "
                f"with: FAILED in {failed_check(repro_rank.FINAL_PASS, err)} on rank(s) "
                f"{', '.join(map(str, sorted(errors)))}",
                file=self.out,
            )
        elif checked:
            print(
                f"  stage {record.stage} final pass: layer(s) {', '.join(map(str, checked))} again on the handle "
                "the stage ended with: ok",
                file=self.out,
            )
        else:
            print(
                f"  stage {record.stage} final pass: every layer already round-tripped on the final handle",
                file=self.out,
            )

    def finish(self) -> None:
        for stage in list(self.skipped):
            self._flush(stage)


#: The first failure of a run: its stage's record, the layer index, the phase, the rank shown and its error.
FirstFailure = tuple[StageRecord, int, Phase, int, CallError]


def _first_failure(records: dict[int, StageRecord]) -> FirstFailure | None:
    failing = [(r, r.failure) for r in records.values() if r.failure is not None]
    if not failing:
        return None
    # In time order: a failing step comes before any final pass.
    record, (index, phase, errors) = min(failing, key=lambda rf: (rf[0].failed_in_final_pass, rf[1][0], rf[0].stage))
    rank = min(errors)
    return record, index, phase, rank, errors[rank]


def run(loaded: LoadedPlan, args: argparse.Namespace) -> int:
    """``python -m pytest_mnnvl repro``; returns the exit status."""
    driver = make_driver(args.manager, args.policy)
    plan, ep = loaded.plan, args.ep
    out = sys.stderr if args.json else sys.stdout
    if args.backend == "flashinfer":
        _check_gpus(ep * plan.pp, args.ranks_per_gpu)  # before --mps start starts a daemon
    mps = _open_mps(args)
    try:
        world = _world(loaded, ep, args.backend, args.timeout, args.ranks_per_gpu, mps)
    except BaseException:
        if mps is not None:
            mps.close()
        raise
    title = plan.name or loaded.source
    print(f"repro: {title}: {plan.pp} PP stage(s), ep={ep}, {ep * plan.pp} ranks, backend={args.backend}", file=out)
    where = _world_record(world, mps)
    if where is not None:
        print(where[0], file=out)
    print(f"manager: {driver.spec}: {driver.describe()}", file=out)
    progress = _Progress(loaded, out)
    started = time.monotonic()
    try:
        records = _drive(loaded, driver, world, ep, True, args.every_layer, progress, progress.final)
    except MnnvlError as exc:
        print(f"repro: the rank world failed, no verdict: {exc}", file=sys.stderr)
        return EXIT_WORLD
    finally:
        world.close()
        if mps is not None:
            mps.close()  # after the ranks: none is a client any more
    progress.finish()
    elapsed = time.monotonic() - started
    first = _first_failure(records)
    predicted = {
        s: analysis.walk_stage(loaded, ep, s, _holdings(rec, plan.layers_of_stage(s))) for s, rec in records.items()
    }
    document = _document(loaded, args, driver, records, first, predicted, elapsed, where[1] if where else None)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        _print_verdict(loaded, first, predicted, elapsed)
    return EXIT_OK if first is None else EXIT_FAILS


def _prediction_for(
    predicted: dict[int, analysis.StageWalk], stage: int, index: int, phase: Phase
) -> analysis.LayerOutcome | None:
    """The arithmetic's outcome for the step (or the final pass) that failed, on the handle the ranks held."""
    walk = predicted.get(stage)
    if walk is None:
        return None
    if phase == repro_rank.FINAL_PASS:
        return next((o for o in walk.final if o.index == index), None)
    return None if index >= len(walk.outcomes) else walk.outcomes[index]


def _print_verdict(
    loaded: LoadedPlan,
    first: FirstFailure | None,
    predicted: dict[int, analysis.StageWalk],
    elapsed: float,
) -> None:
    print()
    if first is None:
        print(
            "no failure: every layer initialized and round-tripped at its full token count, and again on the "
            f"handle its stage ended with ({elapsed:.1f} s)"
        )
        return
    record, index, phase, rank, error = first
    label = analysis.layer_label(loaded, record.stage, index)
    errors = record.failure[2] if record.failure else {}
    check = failed_check(phase, error)
    when = ""
    if phase == repro_rank.FINAL_PASS:
        when = " in the final pass (it fit its own step, not the handle its stage ended with)"
    print(
        f"FIRST FAILURE: stage {record.stage}, layer {index} {label!r} "
        f"({loaded.origin(record.stage, index)}), rank {rank}, {check}{when}:"
    )
    print(f"{error.type}: {error.message}")
    same = [r for r, e in errors.items() if e.message == error.message]
    others = sorted(set(errors) - set(same))
    print(
        f"raised by rank(s) {', '.join(map(str, sorted(same)))}"
        + (f"; rank(s) {', '.join(map(str, others))} raised something else" if others else "")
    )
    if check == "other":
        print(error.traceback.rstrip())
    outcome = _prediction_for(predicted, record.stage, index, phase)
    if outcome is not None and outcome.check is not None and phase is not Phase.INITIALIZE:
        agrees = outcome.error == error.message
        print(
            f"arithmetic on the workspace the ranks held: {analysis.VERDICT_TEXT[outcome.verdict]} "
            f"({'the same text' if agrees else 'a DIFFERENT outcome'})"
        )
        for line in render.arithmetic_lines(outcome, outcome.geometry.ep_size, indent="  ")[1:]:
            print(line)


def _document(
    loaded: LoadedPlan,
    args: argparse.Namespace,
    driver: Driver,
    records: dict[int, StageRecord],
    first: FirstFailure | None,
    predicted: dict[int, analysis.StageWalk],
    elapsed: float,
    world: dict[str, Any] | None = None,
) -> dict[str, Any]:
    stages = []
    for s, record in sorted(records.items()):
        layers = []
        for index, step in enumerate(record.steps):
            state = _held(step)
            failed = record.failure is not None and record.failure[0] == index and not record.failed_in_final_pass
            layers.append(
                {
                    "index": index,
                    "name": loaded.plan.layers_of_stage(s)[index].name,
                    "rebuilt": None if state is None else step.rebuilt,
                    "size_per_rank": None if state is None else state.size_per_rank,
                    "max_num_tokens": None if state is None else state.max_num_tokens,
                    "round_trip": "failed"
                    if failed
                    else (None if step.round_trip is None else ("same_as" if step.same_as is not None else "ok")),
                    "same_as": step.same_as,
                }
            )
        stages.append(
            {"stage": s, "layers": layers, "failed": record.failure is not None, "final_pass": record.final_checked}
        )
    failure = None
    if first is not None:
        record, index, phase, rank, error = first
        outcome = _prediction_for(predicted, record.stage, index, phase)
        failure = {
            "stage": record.stage,
            "index": index,
            "name": loaded.plan.layers_of_stage(record.stage)[index].name,
            "origin": loaded.origin(record.stage, index),
            "rank": rank,
            "phase": phase.value,
            "check": failed_check(phase, error),
            "type": error.type,
            "message": error.message,
            "ranks": sorted(record.failure[2]) if record.failure else [],
            "predicted": None if outcome is None else render.outcome_json(outcome),
        }
    return {
        "schema_version": render.JSON_SCHEMA_VERSION,
        "command": "repro",
        "plan": loaded.plan.name,
        "source": loaded.source,
        "ep": args.ep,
        "backend": args.backend,
        "world": world,
        "manager": driver.spec,
        "driver": driver.describe(),
        "reproduced": first is not None,
        "elapsed_s": round(elapsed, 3),
        "first_failure": failure,
        "stages": stages,
    }
