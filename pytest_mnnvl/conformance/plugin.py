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
from typing import TYPE_CHECKING, Any

import pytest

from pytest_mnnvl.conformance.catalog import INVARIANTS, SHOULD
from pytest_mnnvl.errors import FailureKind, MnnvlError, MnnvlUsageError
from pytest_mnnvl.session import GUARD_KEY, MANAGER_KEY, SETTINGS_KEY, resolve_backend
from pytest_mnnvl.worlds.layout import Topology

if TYPE_CHECKING:
    from pytest_mnnvl.managers import ManagerFactory
    from pytest_mnnvl.worlds.interrupts import Interruption
from pytest_mnnvl.conformance.driver import Conformance, _violation_in
from pytest_mnnvl.conformance.recorder import ERROR_KINDS, RECORDER_KEY, AttributedError, Failure, Recorder


def pytest_configure(config: pytest.Config) -> None:
    from pytest_mnnvl.conformance import profiles

    config.addinivalue_line(
        "markers", "conformance(invariant): the invariant the test checks, a name in pytest_mnnvl.conformance.catalog"
    )
    config.addinivalue_line("markers", "conformance_first: run first within its topology (may recycle the world)")
    config.addinivalue_line("markers", "conformance_last: run after every topology (its own world)")
    recorder = Recorder()
    recorder.profile = profiles.load(
        config.getoption("hypothesis_profile", None), config.getoption("hypothesis_seed", None)
    )
    config.stash[RECORDER_KEY] = recorder
    if config.getoption("xmlpath", None):
        config.pluginmanager.register(JunitErrors(config), "mnnvl-junit-errors")
    from pytest_mnnvl.conformance import xdist_merge as conformance_xdist

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
            # Waived (pytest_mnnvl.conformance.waivers): an xfail now, the violation or error kept for the report.
            entry["waived"] = report.wasxfail
            if "violation" not in entry and report.longrepr is not None:
                entry["error"] = str(report.longrepr)[-2000:]
        if report.failed or entry.get("waived") or "violation" in entry:
            kind = _attribute(recorder, item, entry, call)
            entry["failure_kind"] = kind.value
            if report.failed:
                report.mnnvl_failure_kind = kind.value  # plain data: reports travel from xdist workers as JSON
    from pytest_mnnvl.conformance import xdist_merge as conformance_xdist

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
    from pytest_mnnvl.conformance import report
    from pytest_mnnvl.session import writes_reports

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
    from pytest_mnnvl.conformance import report
    from pytest_mnnvl.session import writes_reports

    if not writes_reports(config):
        return

    verdicts = report.verdicts(recorder)
    terminalreporter.section("mnnvl conformance")
    for name in INVARIANTS:
        v = verdicts[name]
        level = "SHOULD" if name in SHOULD else "MUST"
        terminalreporter.write_line(f"{level:6} {name:26} {report.status_text(v)}")
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
