"""The ``conformance`` fixture's object: runs layer plans on warm worlds against the manager under test, caches
the observations, draws plans with Hypothesis (the same draws on every rank under torchrun), and turns hangs
and violations into verdicts with a saved counterexample.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from pytest_mnnvl.conformance.catalog import SIM_JUDGED
from pytest_mnnvl.conformance.invariants import InvariantViolation, Judge
from pytest_mnnvl.conformance.recorder import (
    RECORDER_KEY,
    AttributedError,
    Failure,
    attributed,
    hide_for_attributed,
)
from pytest_mnnvl.errors import FailureKind, MnnvlError, MnnvlUsageError
from pytest_mnnvl.session import SETTINGS_KEY, resolve_backend
from pytest_mnnvl.worlds.layout import Topology

if TYPE_CHECKING:
    from pytest_mnnvl.conformance.observations import PlanObservation
    from pytest_mnnvl.managers import ManagerFactory
    from pytest_mnnvl.model.layers import ModelPlan
    from pytest_mnnvl.worlds.world import RankWorld as World


#: Seconds the PP deadlock check waits per call (the target: a deadlock is reported within timeout + 2 s).
DEADLOCK_TIMEOUT_S = 10.0


#: Seconds one Hypothesis plan may take on a world (plans are small; a hang must not cost minutes).
PLAN_TIMEOUT_S = 20.0


def _save_dir(config: pytest.Config) -> str:
    report = config.stash[SETTINGS_KEY].report
    if report:
        return os.path.join(os.path.dirname(os.path.abspath(report)), "counterexamples")
    return os.path.join(tempfile.gettempdir(), "pytest-mnnvl-counterexamples")


#: Topology parameters: already in a saved plan's name as ``ws2-pp1``.
_TOPOLOGY_PARAMS = ("mnnvl_topology", "pp_topology")


def _name_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_-")


def _save_tag(request: pytest.FixtureRequest, manager: ManagerFactory, started: float) -> str:
    """What ends this test's saved plans' names: its other parameters (``top_k``), the manager's short name
    (``mutant-first_call_wins``, ``MyManager``) and the session's run id (its start time and pid), so two
    sessions, two managers or two tests never write, or print a command for, the same file."""
    callspec = getattr(request.node, "callspec", None)
    params = [str(v) for k, v in sorted(callspec.params.items()) if k not in _TOPOLOGY_PARAMS] if callspec else []
    if manager.kind == "mutant":
        short = f"mutant-{manager.spec.partition(':')[2]}"
    elif manager.kind == "custom":
        short = manager.qualname.rpartition(".")[2]
    else:
        short = manager.spec
    run_id = f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}-{os.getpid()}"
    return "-".join(_name_part(part) for part in (*params, short, run_id) if _name_part(part))


class _Hang(Exception):
    """The world did not finish a plan in time (a deadlock): a verdict by itself."""

    def __init__(self, error: Exception, plan: ModelPlan, seconds: float) -> None:
        super().__init__(str(error))
        self.error = error
        self.plan = plan
        self.seconds = seconds


class Conformance:
    """Runs plans on the manager under test and judges them (the ``conformance`` fixture)."""

    def __init__(self, request: pytest.FixtureRequest, factory: Any, manager: ManagerFactory) -> None:
        self.request = request
        self.config = request.config
        self.worlds = factory
        self.manager = manager
        self.recorder = self.config.stash[RECORDER_KEY]
        self.strict = self.config.stash[SETTINGS_KEY].strict
        marker = request.node.get_closest_marker("conformance")
        self.invariant = str(marker.args[0]) if marker else ""
        entry = self.recorder.test(request.node.nodeid)
        entry["invariant"] = self.invariant
        self.entry = entry
        #: ``sim`` for an invariant of :data:`~.catalog.SIM_JUDGED` in a session on another backend, else None.
        self.judged_on: str | None = None
        if self.invariant in SIM_JUDGED and resolve_backend(self.config) != "sim":
            self.judged_on = "sim"
            entry["judged_on"] = "sim"

    # -- worlds and observations ---------------------------------------------------------------

    def world(self, topology: Topology, **kwargs: Any) -> World:
        self.entry["topology"] = f"ws{topology.world_size}-pp{topology.pp}"
        nodeid = self.request.node.nodeid
        if self.recorder.load_error is not None:
            load_nodeid, error = self.recorder.load_error
            self.recorder.skipped_after[nodeid] = FailureKind.MANAGER_ERROR
            pytest.skip(f"the manager could not be loaded in the ranks ({error}; traceback in {load_nodeid})")
        halt = self.recorder.broken.get((topology.world_size, topology.pp))
        if halt and halt.nodeid != nodeid and (not kwargs.get("env") or halt.incompatibility is not None):
            if nodeid not in halt.skipped:
                halt.skipped.append(nodeid)
            self.recorder.skipped_after[nodeid] = halt.kind
            raise pytest.skip.Exception(halt.skip_reason(), _use_item_location=True)
        if self.judged_on is not None:
            kwargs.setdefault("backend", self.judged_on)
        world: World = self.worlds(topology.world_size, topology.pp, **kwargs)
        self._load_manager(world, topology)
        return world

    def _load_manager(self, world: World, topology: Topology) -> None:
        """Import the manager in every rank of ``world`` once, before any timed call: the deadlock timeout
        must measure plans, not start-up (vLLM's import takes 10-15 s)."""
        __tracebackhide__ = hide_for_attributed
        from pytest_mnnvl.conformance.rank import load_manager

        warm = (tuple(world.pids), self.manager.spec)
        if warm in self.recorder.loaded:
            return
        try:
            world.call(load_manager, (self.manager,), {}, timeout=world.startup_timeout)
        except MnnvlUsageError:
            raise
        except MnnvlError as exc:
            failure = Failure.of(exc)
            if failure.incompatibility is not None:  # a compatibility verdict: once per topology, the rest skips
                self._halt(topology, failure.kind, failure.summary)
                raise attributed(failure) from None
            lines = [line for line in str(exc).splitlines() if line.strip()]
            self.recorder.load_error = (self.request.node.nodeid, lines[-1].strip() if lines else type(exc).__name__)
            raise attributed(failure) from None
        self.recorder.loaded.add(warm)

    def _halt(self, topology: Topology, kind: FailureKind, summary: str) -> None:
        self.recorder.halt((topology.world_size, topology.pp), self.request.node.nodeid, kind, summary)

    def judge(self, plan: ModelPlan, topology: Topology) -> Judge:
        return Judge(
            plan,
            topology.world_size,
            topology.pp,
            _save_dir(self.config),
            self.manager.policy,
            save_tag=_save_tag(self.request, self.manager, self.recorder.started),
            manager=self.manager.spec,
        )

    def observe(self, topology: Topology, plan: ModelPlan, timeout: float | None = None) -> list[PlanObservation]:
        """Run ``plan`` on every rank (cached per manager, topology and plan)."""
        __tracebackhide__ = hide_for_attributed
        from pytest_mnnvl.conformance.rank import run_plan
        from pytest_mnnvl.errors import WorldDeadlock

        text = plan.to_json(indent=None)
        key = (self.manager, topology, text, self.judged_on)
        if key in self.recorder.cache:
            self.recorder.cache_hits += 1
            return self.recorder.cache[key]
        world = self.world(topology)
        t0 = time.monotonic()
        try:
            results: list[PlanObservation] = world.call(run_plan, (self.manager, text), {}, timeout=timeout)
        except MnnvlUsageError:
            raise
        except WorldDeadlock as exc:
            self._halt(topology, FailureKind.VIOLATION, str(exc).partition("\n")[0])
            raise _Hang(exc, plan, time.monotonic() - t0) from exc
        except MnnvlError as exc:
            # A crash, or an exception outside the manager calls the invariants judge: not a verdict on the
            # plan, so no plan is saved (Hypothesis never sees it: explore() stops drawing and raises it).
            failure = Failure.of(exc)
            self._halt(topology, failure.kind, failure.summary)
            raise attributed(failure) from None
        self.recorder.plan_runs += 1
        self.recorder.plan_seconds += time.monotonic() - t0
        for r in results:
            if r.ep_rank == 0:
                self.recorder.initialize_calls += len(r.steps)
                self.recorder.rebuilds += sum(1 for s in r.steps if s.rebuilt)
                for s in r.steps:
                    self.recorder.max_size_per_rank = max(self.recorder.max_size_per_rank, s.state.size_per_rank or 0)
        self.recorder.cache[key] = results
        return results

    # -- Hypothesis ----------------------------------------------------------------------------

    def explore(self, topology: Topology, check: Callable[[Judge, list[PlanObservation]], None]) -> None:
        """Hypothesis draws plans for ``topology``; each runs on the warm world and ``check`` judges
        it. Every invariant test draws the same derandomized sequence (one inner function, one
        digest), so observations are shared through the cache."""
        __tracebackhide__ = hide_for_attributed
        from hypothesis import example, given
        from hypothesis import statistics as hypothesis_statistics

        from pytest_mnnvl.conformance import strategies

        hung: list[_Hang] = []
        stopped: list[AttributedError] = []
        failed: list[str] = []
        pinned = strategies.known_failures(topology.pp)
        explicit = {plan.to_json(indent=None) for _why, plan in pinned}
        timeout = min(self.config.stash[SETTINGS_KEY].timeout, PLAN_TIMEOUT_S)
        # Start the world and load the manager outside Hypothesis: a manager that cannot load is this
        # test's failure, not an example's (Hypothesis would replay it into the skip that follows).
        self.world(topology)

        def conformance_example(plan: ModelPlan) -> None:
            __tracebackhide__ = hide_for_attributed
            text = plan.to_json(indent=None)
            if hung or stopped or (failed and text in explicit and text not in failed):
                # The world is gone (the hang is the verdict, reported below), or a pinned example
                # already failed: Hypothesis runs every explicit example, the rest cost only time.
                return
            self.recorder.examples += 1
            self.entry["examples"] = self.entry.get("examples", 0) + 1
            plan = self._agreed(topology, plan)
            try:
                results = self.observe(topology, plan, timeout=timeout)
            except _Hang as exc:
                hung.append(exc)
                return
            except AttributedError as exc:
                stopped.append(exc)
                return
            strategies.observed_events(plan, results)
            try:
                check(self.judge(plan, topology), results)
            except InvariantViolation:
                failed.append(text)
                raise

        ep_size = topology.world_size // topology.pp
        test = given(plan=strategies.model_plans(topology.pp, ep_size=ep_size))(conformance_example)
        for _why, plan in reversed(pinned):
            test = example(plan=plan)(test)
        test = self._same_draws_on_every_rank(test)
        node = self.request.node

        collector: Any = hypothesis_statistics.collector  # typed by Hypothesis as holding None

        def note_statistics(stats: Any) -> None:
            # Hypothesis' plugin collects statistics only for a test item that is itself @given; this one
            # draws inside the item, so hand them to the item the same way (--hypothesis-show-statistics).
            stats["nodeid"] = node.nodeid
            setattr(node, "hypothesis_statistics", hypothesis_statistics.describe_statistics(stats))  # noqa: B010

        try:
            with collector.with_value(note_statistics):
                test()
        except BaseException as exc:
            interrupt = _interrupt_in(exc)
            if interrupt is not None:
                raise interrupt from None
            violation = _violation_in(exc)
            if violation is None:
                raise
            self.verdict(violation, exc)
        if stopped:
            raise stopped[0]
        if hung:
            self.hang(topology, hung[0])

    def _same_draws_on_every_rank(self, test: Any) -> Any:
        """Under torchrun every rank runs Hypothesis: one seed, no example database, so all draw alike."""
        from pytest_mnnvl.session import session_of

        if session_of(self.config) is None:
            return test
        from hypothesis import seed, settings

        from pytest_mnnvl.worlds.spmd import shared_seed

        if self.config.getoption("hypothesis_seed", None) is None:
            test = seed(shared_seed())(test)
        return settings(database=None)(test)

    def _agreed(self, topology: Topology, plan: ModelPlan) -> ModelPlan:
        """Under torchrun, rank 0's plan (a rank that drew another one is recorded in the report)."""
        from pytest_mnnvl.model.layers import ModelPlan

        text = plan.to_json(indent=None)
        agreed = str(self.world(topology).agree(text, f"plan of {self.request.node.nodeid}"))
        if agreed == text:
            return plan
        self.entry["plan_disagreements"] = self.entry.get("plan_disagreements", 0) + 1
        return ModelPlan.from_json(agreed)

    def hang(self, topology: Topology, hang: _Hang) -> NoReturn:
        from pytest_mnnvl.conformance.invariants import PpDeadlockViolation, scope_from_deadlock
        from pytest_mnnvl.errors import WorldDeadlock

        judge = self.judge(hang.plan, topology)
        error = hang.error
        if isinstance(error, WorldDeadlock) and self.invariant == "collective_scope":
            groups = _ep_groups(topology)
            try:
                scope_from_deadlock(judge, error.blocked_in, groups)
            except InvariantViolation as scope:
                self.verdict(scope, scope)
        cls = PpDeadlockViolation
        detail = f"the world did not finish the plan: {type(error).__name__}"
        observed: Any = str(error)
        if isinstance(error, WorldDeadlock):
            detail = f"deadlock: ranks {error.pending} still running after {error.timeout:g} s"
            observed = {"blocked_in": error.blocked_in, "reported_after_s": round(hang.seconds, 2)}
        self.verdict(judge.fail(cls, detail, expected="every stage finishes", observed=observed), error)
        raise AssertionError("unreachable")

    def verdict(self, violation: InvariantViolation, raised: BaseException) -> NoReturn:
        """Record the violation; SHOULDs become xfail unless ``--mnnvl-strict``."""
        self.entry["violation"] = violation.to_dict()
        if violation.level == "should" and not self.strict:
            self.entry["not_gating"] = True
            pytest.xfail(f"SHOULD {violation.invariant} violated (gates only with --mnnvl-strict): {violation}")
        if raised is violation:
            raise violation
        raise violation from (raised if raised is not violation else None)


def _interrupt_in(exc: BaseException) -> KeyboardInterrupt | None:
    """A Ctrl-C anywhere in what Hypothesis raised, stripped of the notes Hypothesis attached to it: it reports
    the plan it was running ("Failing explicit example: ...", "Falsifying example: ..."), but an interrupt is
    not a failure of that plan."""
    if isinstance(exc, KeyboardInterrupt):
        if hasattr(exc, "__notes__"):
            del exc.__notes__
        return exc
    for inner in getattr(exc, "exceptions", ()) or ():
        found = _interrupt_in(inner)
        if found is not None:
            return found
    return None


def _violation_in(exc: BaseException) -> InvariantViolation | None:
    if isinstance(exc, InvariantViolation):
        return exc
    for inner in getattr(exc, "exceptions", ()) or ():
        found = _violation_in(inner)
        if found is not None:
            return found
    return None


def _ep_groups(topology: Topology) -> dict[int, set[int]]:
    from pytest_mnnvl.worlds.layout import Layout

    layout = Layout(topology.world_size, topology.pp)
    groups: dict[int, set[int]] = {}
    for group in layout.all_ep_groups():
        for rank in group:
            groups[rank] = set(group)
    return groups
