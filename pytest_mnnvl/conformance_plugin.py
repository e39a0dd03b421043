"""The conformance suite's hooks and fixtures, loaded by the suite's conftest (``pytest_plugins`` in
``pytest_mnnvl/conformance/conftest.py``, and in a clone's ``conformance/conftest.py``), or for ``--pyargs
pytest_mnnvl.conformance`` by :mod:`pytest_mnnvl.plugin` at configure time.

Kept apart from :mod:`pytest_mnnvl.plugin` so that loading ``-p pytest_mnnvl`` stays free of
Hypothesis. It owns: the Hypothesis profile (``ci`` unless ``--hypothesis-profile`` says otherwise),
test ordering (by topology, so each world starts once; the ``-O`` world last), the ``conformance``
fixture (runs plans on warm worlds, caches observations, turns hangs into verdicts) and the report
(``--mnnvl-report``: JSON + Markdown, written at session end).

A failed test blames one of three things (:class:`pytest_mnnvl.errors.FailureKind`): an invariant (its
violation, plan and counterexample file), the manager (it raised or crashed outside any check: no plan, no
invariant) or the infrastructure (a rank killed from outside, a world that would not start, the harness).
The last two are pytest errors, not failures: ``E`` in the terminal, ``<error>`` in JUnit XML.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from pytest_mnnvl.errors import FailureKind, MnnvlError, MnnvlUsageError, failure_kind
from pytest_mnnvl.invariants import INVARIANTS, SHOULD, InvariantViolation, Judge
from pytest_mnnvl.plugin import GUARD_KEY, MANAGER_KEY, SETTINGS_KEY, Topology, resolve_backend

if TYPE_CHECKING:
    from pytest_mnnvl.interrupts import Interruption
    from pytest_mnnvl.layers import ModelPlan
    from pytest_mnnvl.managers import ManagerFactory
    from pytest_mnnvl.pool import World

RECORDER_KEY = pytest.StashKey["Recorder"]()
#: Seconds the PP deadlock check waits per call (DESIGN: reported within timeout + 2 s).
DEADLOCK_TIMEOUT_S = 10.0
#: Seconds one Hypothesis plan may take on a world (plans are small; a hang must not cost minutes).
PLAN_TIMEOUT_S = 20.0
#: Characters of a failure's detail (tracebacks, stacks, output) kept in the report.
DETAIL_CHARS = 4000


@dataclass(frozen=True)
class Failure:
    """A failure that no invariant's check found: whom it blames, one line, and the evidence."""

    kind: FailureKind
    summary: str
    detail: str = ""

    @classmethod
    def of(cls, error: MnnvlError) -> Failure:
        """The failure a world's error stands for (:func:`pytest_mnnvl.errors.failure_kind` decides whom)."""
        from pytest_mnnvl.errors import RankCrashed, RankError

        text = str(error)
        head, _, rest = text.partition("\n")
        if isinstance(error, RankError) and error.tracebacks:
            rank, tb = next(iter(error.tracebacks.items()))
            last = [line.strip() for line in tb.splitlines() if line.strip()]
            if last:
                head += f"; rank {rank}: {last[-1]}"
        kind = failure_kind(error)
        detail = rest.strip("\n")
        if kind is FailureKind.INFRASTRUCTURE and isinstance(error, RankCrashed) and error.returncode is not None:
            hint = (
                "SIGKILL and SIGTERM come from outside the rank's code: the kernel's OOM killer (see dmesg), a job "
                "scheduler or a person. The harness sends them only to stop a world after its verdict."
            )
            detail = hint + (f"\n\n{detail}" if detail else "")
        return cls(kind, head, detail)

    @property
    def blame(self) -> str:
        if self.kind is FailureKind.MANAGER_ERROR:
            return "no invariant checked"
        return "not the manager's"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "summary": self.summary, "detail": self.detail[-DETAIL_CHARS:]}


class AttributedError(Exception):
    """Raised for a :class:`Failure`: the test errs with it, no invariant is blamed, no plan is saved."""

    def __init__(self, failure: Failure) -> None:
        self.failure = failure
        text = f"{failure.kind.label} ({failure.blame}): {failure.summary}"
        super().__init__(text + (f"\n\n{failure.detail}" if failure.detail else ""))


def _hide_for_attributed(excinfo: pytest.ExceptionInfo[BaseException]) -> bool:
    """``__tracebackhide__`` of the frames that raise an :class:`AttributedError`: its message is the
    report; the plugin's source around the ``raise`` is not."""
    return excinfo.errisinstance(AttributedError)


class ManagerError(AttributedError):
    """The manager raised or crashed outside any invariant's check."""


class InfrastructureError(AttributedError):
    """The machine or the harness failed: a rank killed from outside (SIGKILL/SIGTERM), a world that did not start."""


def attributed(failure: Failure) -> AttributedError:
    return (ManagerError if failure.kind is FailureKind.MANAGER_ERROR else InfrastructureError)(failure)


@dataclass
class Halt:
    """The failure after which the rest of a topology's tests are skipped (each would replay the same plans:
    a hang costs its timeout again, a crash crashes again); ``skipped`` lists them."""

    nodeid: str
    topology: str
    kind: FailureKind
    summary: str
    skipped: list[str] = field(default_factory=list)

    def skip_reason(self) -> str:
        what = {
            FailureKind.VIOLATION: "a deadlock",
            FailureKind.MANAGER_ERROR: "a manager error",
            FailureKind.INFRASTRUCTURE: "an infrastructure failure",
        }[self.kind]
        return (
            f"not run: {self.nodeid.rpartition('::')[2]} ended in {what} on {self.topology} ({self.summary}); "
            "the rest of this topology is skipped"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"test": self.nodeid, "failure_kind": self.kind.value, "error": self.summary, "skipped": self.skipped}


@dataclass
class Recorder:
    """Everything the report needs, gathered while the session runs."""

    started: float = field(default_factory=time.time)
    profile: str = ""
    tests: dict[str, dict[str, Any]] = field(default_factory=dict)
    examples: int = 0
    plan_runs: int = 0
    cache_hits: int = 0
    plan_seconds: float = 0.0
    initialize_calls: int = 0
    rebuilds: int = 0
    max_size_per_rank: int = 0
    #: Per topology, the failure that ended it for this session (:class:`Halt`).
    broken: dict[tuple[int, int], Halt] = field(default_factory=dict)
    #: Tests skipped because of an earlier failure (a halt, the manager not loading): the kind of that failure.
    skipped_after: dict[str, FailureKind] = field(default_factory=dict)
    #: Tests that failed without a violation, by node id (the report's ``failure``).
    failures: dict[str, Failure] = field(default_factory=dict)
    loaded: set[tuple[tuple[int, ...], str]] = field(default_factory=set)
    #: The first failure to import the manager in the ranks (test id, error): every later test skips
    #: on it instead of importing again (a failed vLLM import can take minutes and may not be re-entrant).
    load_error: tuple[str, str] | None = None
    cache: dict[tuple[Any, ...], list[dict[str, Any]]] = field(default_factory=dict)
    #: Each test's place in the session's collection: the report lists tests in this order, with or without
    #: pytest-xdist (whose controller hears of them in the order they finish).
    order: dict[str, int] = field(default_factory=dict)

    def test(self, nodeid: str) -> dict[str, Any]:
        return self.tests.setdefault(nodeid, {"nodeid": nodeid})

    def position(self, nodeid: str) -> int:
        return self.order.get(nodeid, len(self.order))

    def ordered_tests(self) -> list[dict[str, Any]]:
        return sorted(self.tests.values(), key=lambda entry: self.position(entry["nodeid"]))

    def halt(self, topology: tuple[int, int], nodeid: str, kind: FailureKind, summary: str) -> None:
        """End ``topology`` for the rest of the session on this failure (the first one stays)."""
        ws, pp = topology
        self.broken.setdefault(topology, Halt(nodeid, f"ws{ws}-pp{pp}", kind, summary))


def pytest_configure(config: pytest.Config) -> None:
    from pytest_mnnvl import profiles

    config.addinivalue_line("markers", "conformance(invariant): the DESIGN.md invariant a conformance test checks")
    config.addinivalue_line("markers", "conformance_first: run first within its topology (may recycle the world)")
    config.addinivalue_line("markers", "conformance_last: run after every topology (its own world)")
    recorder = Recorder()
    recorder.profile = profiles.load(
        config.getoption("hypothesis_profile", None), config.getoption("hypothesis_seed", None)
    )
    config.stash[RECORDER_KEY] = recorder
    if config.getoption("xmlpath", None):
        config.pluginmanager.register(JunitErrors(config), "mnnvl-junit-errors")
    from pytest_mnnvl import conformance_xdist

    conformance_xdist.install(config, recorder)


def pytest_collection_finish(session: pytest.Session) -> None:
    recorder = session.config.stash.get(RECORDER_KEY, None)
    if recorder is not None:
        recorder.order.update({item.nodeid: index for index, item in enumerate(session.items)})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group conformance tests by topology (each world starts once; two stay warm), the PP deadlock
    check first within its topology (a hang recycles the world early) and the ``-O`` world last."""
    order = {t: i for i, t in enumerate(config.stash[SETTINGS_KEY].topologies())}

    def key(pair: tuple[int, pytest.Item]) -> tuple[int, int, int]:
        index, item = pair
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        topology = params.get("mnnvl_topology") or params.get("pp_topology")
        if item.get_closest_marker("conformance_last"):
            return (len(order) + 1, 0, index)
        if topology is None:
            return (0, 1, index)
        first = 0 if item.get_closest_marker("conformance_first") else 1
        return (order.get((topology.world_size, topology.pp), len(order)), first, index)

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "pp_topology" in metafunc.fixturenames:
        pairs = [(ws, pp) for ws, pp in metafunc.config.stash[SETTINGS_KEY].topologies() if pp > 1]
        metafunc.parametrize(
            "pp_topology",
            [Topology(ws, pp) for ws, pp in pairs] or [None],
            ids=[f"ws{ws}-pp{pp}" for ws, pp in pairs] or ["no-pp-topology"],
        )


@pytest.fixture
def mnnvl_manager(request: pytest.FixtureRequest) -> ManagerFactory:
    """The manager under test: ``--mnnvl-manager`` (default ``reference``), resolved once."""
    config = request.config
    if MANAGER_KEY not in config.stash:
        from pytest_mnnvl.managers import resolve

        config.stash[MANAGER_KEY] = resolve(config.stash[SETTINGS_KEY].manager)
    return config.stash[MANAGER_KEY]


@pytest.fixture
def conformance(request: pytest.FixtureRequest, mnnvl_world: Any, mnnvl_manager: ManagerFactory) -> Conformance:
    return Conformance(request, mnnvl_world, mnnvl_manager)


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

    # -- worlds and observations ---------------------------------------------------------------

    def world(self, topology: Topology, **kwargs: Any) -> World:
        self.entry["topology"] = f"ws{topology.world_size}-pp{topology.pp}"
        nodeid = self.request.node.nodeid
        if self.recorder.load_error is not None:
            load_nodeid, error = self.recorder.load_error
            self.recorder.skipped_after[nodeid] = FailureKind.MANAGER_ERROR
            pytest.skip(f"the manager could not be loaded in the ranks ({error}; traceback in {load_nodeid})")
        halt = self.recorder.broken.get((topology.world_size, topology.pp))
        if halt and halt.nodeid != nodeid and not kwargs.get("env"):
            if nodeid not in halt.skipped:
                halt.skipped.append(nodeid)
            self.recorder.skipped_after[nodeid] = halt.kind
            raise pytest.skip.Exception(halt.skip_reason(), _use_item_location=True)
        world: World = self.worlds(topology.world_size, topology.pp, **kwargs)
        self._load_manager(world)
        return world

    def _load_manager(self, world: World) -> None:
        """Import the manager in every rank of ``world`` once, before any timed call: the deadlock timeout
        must measure plans, not start-up (vLLM's import takes 10-15 s)."""
        __tracebackhide__ = _hide_for_attributed
        from pytest_mnnvl.conformance_rank import load_manager

        warm = (tuple(world.pids), self.manager.spec)
        if warm in self.recorder.loaded:
            return
        try:
            world.call(load_manager, (self.manager,), {}, timeout=world.startup_timeout)
        except MnnvlUsageError:
            raise
        except MnnvlError as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            self.recorder.load_error = (self.request.node.nodeid, lines[-1].strip() if lines else type(exc).__name__)
            raise attributed(Failure.of(exc)) from None
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

    def observe(self, topology: Topology, plan: ModelPlan, timeout: float | None = None) -> list[dict[str, Any]]:
        """Run ``plan`` on every rank (cached per manager, topology and plan)."""
        __tracebackhide__ = _hide_for_attributed
        from pytest_mnnvl.conformance_rank import run_plan
        from pytest_mnnvl.errors import WorldDeadlock

        text = plan.to_json(indent=None)
        key = (self.manager, topology, text)
        if key in self.recorder.cache:
            self.recorder.cache_hits += 1
            return self.recorder.cache[key]
        world = self.world(topology)
        t0 = time.monotonic()
        try:
            results = world.call(run_plan, (self.manager, text), {}, timeout=timeout)
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
            if r["ep_rank"] == 0:
                self.recorder.initialize_calls += len(r["steps"])
                self.recorder.rebuilds += sum(1 for s in r["steps"] if s["rebuilt"])
                for s in r["steps"]:
                    self.recorder.max_size_per_rank = max(
                        self.recorder.max_size_per_rank, s["state"].size_per_rank or 0
                    )
        self.recorder.cache[key] = results
        return results

    # -- Hypothesis ----------------------------------------------------------------------------

    def explore(self, topology: Topology, check: Callable[[Judge, list[dict[str, Any]]], None]) -> None:
        """Hypothesis draws plans for ``topology``; each runs on the warm world and ``check`` judges
        it. Every invariant test draws the same derandomized sequence (one inner function, one
        digest), so observations are shared through the cache."""
        __tracebackhide__ = _hide_for_attributed
        from hypothesis import example, given

        from pytest_mnnvl import strategies

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
            __tracebackhide__ = _hide_for_attributed
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
            try:
                check(self.judge(plan, topology), results)
            except InvariantViolation:
                failed.append(text)
                raise

        test = given(plan=strategies.model_plans(topology.pp))(conformance_example)
        for _why, plan in reversed(pinned):
            test = example(plan=plan)(test)
        test = self._same_draws_on_every_rank(test)
        try:
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
        from pytest_mnnvl.spmd_plugin import session_of

        if session_of(self.config) is None:
            return test
        from hypothesis import seed, settings

        from pytest_mnnvl.spmd import shared_seed

        if self.config.getoption("hypothesis_seed", None) is None:
            test = seed(shared_seed())(test)
        return settings(database=None)(test)

    def _agreed(self, topology: Topology, plan: ModelPlan) -> ModelPlan:
        """Under torchrun, rank 0's plan (a rank that drew another one is recorded in the report)."""
        world = self.world(topology)
        agree = getattr(world, "agree", None)
        if agree is None:
            return plan
        from pytest_mnnvl.layers import ModelPlan

        text = plan.to_json(indent=None)
        agreed = str(agree(text, f"plan of {self.request.node.nodeid}"))
        if agreed == text:
            return plan
        self.entry["plan_disagreements"] = self.entry.get("plan_disagreements", 0) + 1
        return ModelPlan.from_json(agreed)

    def hang(self, topology: Topology, hang: _Hang) -> NoReturn:
        from pytest_mnnvl.errors import WorldDeadlock
        from pytest_mnnvl.invariants import PpDeadlockViolation, scope_from_deadlock

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
    from pytest_mnnvl.topology import Layout

    layout = Layout(topology.world_size, topology.pp)
    groups: dict[int, set[int]] = {}
    for group in layout.all_ep_groups():
        for rank in group:
            groups[rank] = set(group)
    return groups


# ---- report -------------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    recorder = item.config.stash.get(RECORDER_KEY, None)
    marker = item.get_closest_marker("conformance")
    if recorder is None or marker is None:
        return report
    entry = recorder.test(item.nodeid)
    entry["invariant"] = str(marker.args[0])
    if report.when == "call" or (report.when == "setup" and not report.passed):
        entry["outcome"] = "xfailed" if hasattr(report, "wasxfail") else report.outcome
        entry["duration_s"] = round(report.duration, 3)
        if report.skipped and not hasattr(report, "wasxfail"):
            longrepr = report.longrepr
            entry["reason"] = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        if report.failed and "violation" not in entry:
            entry["error"] = str(report.longrepr)[-2000:]
        if (getattr(report, "mnnvl_waivers", None) or {}).get("applied"):
            # Waived (pytest_mnnvl.waivers): an xfail now, the violation or error kept for the report.
            entry["waived"] = report.wasxfail
            if "violation" not in entry and report.longrepr is not None:
                entry["error"] = str(report.longrepr)[-2000:]
        if report.failed or entry.get("waived") or "violation" in entry:
            kind = _attribute(recorder, item, entry, call)
            entry["failure_kind"] = kind.value
            if report.failed:
                report.mnnvl_failure_kind = kind.value  # plain data: reports travel from xdist workers as JSON
    from pytest_mnnvl import conformance_xdist

    conformance_xdist.attach(item, report)  # on an xdist worker: what this test added, for the controller
    return report


def _attribute(
    recorder: Recorder, item: pytest.Item, entry: dict[str, Any], call: pytest.CallInfo[None]
) -> FailureKind:
    """Whom this failed (or waived) test blames; a failure no check found goes into ``entry["failure"]``."""
    if "violation" in entry:
        return FailureKind.VIOLATION
    error = call.excinfo.value if call.excinfo is not None else None
    failure: Failure | None = None
    if isinstance(error, AttributedError):
        failure = error.failure
    elif isinstance(error, MnnvlError) and not isinstance(error, MnnvlUsageError):
        # A world's error outside observe() (a test calling world.run itself): the same rule, and the
        # same halt, as for a plan.
        failure = Failure.of(error)
        callspec = getattr(item, "callspec", None)
        topology = (callspec.params if callspec is not None else {}).get("mnnvl_topology")
        if isinstance(topology, Topology):
            recorder.halt((topology.world_size, topology.pp), item.nodeid, failure.kind, failure.summary)
    if failure is not None:
        recorder.failures[item.nodeid] = failure
        entry["failure"] = failure.to_dict()
        return failure.kind
    if error is not None and _violation_in(error) is not None:
        return FailureKind.VIOLATION
    # A skip that --mnnvl-strict failed inherits the kind of the failure it was skipped for; anything else
    # (the suite's own assertion, a Hypothesis health check, a bug in a check) is the harness's.
    return recorder.skipped_after.get(item.nodeid, FailureKind.INFRASTRUCTURE)


#: The kinds that are pytest errors (``E``, ``<error>``), not failures: no invariant was found violated.
ERROR_KINDS = (FailureKind.MANAGER_ERROR.value, FailureKind.INFRASTRUCTURE.value)


def _is_error(report: pytest.TestReport) -> bool:
    return report.when == "call" and report.failed and getattr(report, "mnnvl_failure_kind", None) in ERROR_KINDS


@pytest.hookimpl(tryfirst=True)
def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config) -> tuple[str, str, str] | None:
    """A manager error or an infrastructure failure is an ERROR, as a failing fixture is: the test's own
    check never ran (pytest's ``ERROR at call of ...`` header, ``1 error`` in the summary line)."""
    if _is_error(report):
        return "error", "E", "ERROR"
    return None


class JunitErrors:
    """Under ``--junitxml``: a manager error or an infrastructure failure is an ``<error>``, not a ``<failure>``.

    pytest's junitxml writes ``<error>`` only for setup and teardown and has no option to choose, so after it
    logged the call, the element it added is renamed and its counts moved (a test checks this still works)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> Any:
        result = yield
        if not _is_error(report):
            return result
        from _pytest.junitxml import xml_key

        xml = self.config.stash.get(xml_key, None)
        if xml is None:
            return result
        nodes = xml.node_reporter(report).nodes
        for node in reversed(nodes):
            if node.tag == "failure":
                node.tag = "error"
                xml.stats["failure"] -= 1
                xml.stats["error"] += 1
                break
        return result


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    recorder = config.stash.get(RECORDER_KEY, None)
    path = config.stash[SETTINGS_KEY].report
    if recorder is None or not path or hasattr(config, "workerinput"):
        return
    from pytest_mnnvl import report
    from pytest_mnnvl.spmd_plugin import writes_reports

    if not writes_reports(config):
        return  # under torchrun one rank writes (0, or the lowest survivor)

    if MANAGER_KEY not in config.stash:
        # Resolved by the first test's fixture, which an xdist controller never runs (an explicit
        # --mnnvl-manager is resolved at configure): the report describes the manager all the same.
        from pytest_mnnvl.managers import resolve

        with contextlib.suppress(MnnvlError):
            config.stash[MANAGER_KEY] = resolve(config.stash[SETTINGS_KEY].manager)
    # session.exitstatus, not the argument: a stale waiver under --mnnvl-strict changes it first, and an
    # interrupt pytest could not record (a signal during its own handling of the first) is made non-zero.
    data = report.build(config, recorder, int(session.exitstatus), _interruption(config))
    report.write(path, data)


def _interruption(config: pytest.Config) -> Interruption | None:
    guard = config.stash.get(GUARD_KEY, None)
    return guard.interruption() if guard is not None else None


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    recorder = config.stash.get(RECORDER_KEY, None)
    interruption = _interruption(config)
    if recorder is None or not (recorder.tests or interruption):
        return
    from pytest_mnnvl import report
    from pytest_mnnvl.spmd_plugin import writes_reports

    if not writes_reports(config):
        return

    verdicts = report.verdicts(recorder)
    terminalreporter.section("mnnvl conformance")
    for name in INVARIANTS:
        v = verdicts[name]
        level = "SHOULD" if name in SHOULD else "MUST"
        terminalreporter.write_line(f"{level:6} {name:26} {v['status']}")
    terminalreporter.write_line(
        f"plans run: {recorder.plan_runs} ({recorder.plan_seconds:.1f} s), examples: {recorder.examples}, "
        f"cache hits: {recorder.cache_hits}, hypothesis profile: {recorder.profile}, backend: {resolve_backend(config)}"
    )
    for line in report.errors(recorder):
        terminalreporter.write_line(line, red=True)
    if recorder.load_error is not None:
        terminalreporter.write_line(
            f"the manager could not be loaded in the ranks: {recorder.load_error[1]} (traceback in "
            f"{recorder.load_error[0]}); every later test was skipped",
            red=True,
        )
    if interruption is not None:
        terminalreporter.write_line(
            f"{interruption.describe()}: the verdicts cover only the tests that finished; the report says interrupted",
            red=True,
        )
