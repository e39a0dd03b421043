"""pytest-mnnvl's hooks: options, markers, report header, fixtures and xdist wiring only.

The machinery lives in modules imported when first needed (:mod:`pytest_mnnvl.worlds.pool`,
:mod:`pytest_mnnvl.probes`, the backends), so loading the plugin imports neither torch nor
FlashInfer nor Hypothesis.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from pytest_mnnvl import settings as _settings
from pytest_mnnvl.conformance import waivers as _waivers
from pytest_mnnvl.errors import MnnvlUsageError
from pytest_mnnvl.markers import CAPABILITY_MARKERS, MARKER_LINES
from pytest_mnnvl.session import (
    BACKEND_KEY,
    CONFORMANCE_PLUGIN,
    GUARD_KEY,
    MANAGER_KEY,
    MPS_KEY,
    POOL_KEY,
    REPORT_LOCK_KEY,
    SETTINGS_KEY,
    STARTS_KEY,
    STARTS_WIRE,
    ZYGOTE_KEY,
    ZYGOTE_WIRE,
    header_lines,
    lock_report,
    mps_session,
    names_packaged_suite,
    rank_starts,
    resolve_backend,
    shared_zygote,
    skip_at_test,
    take_signals,
    uses_mnnvl,
)
from pytest_mnnvl.worlds import interrupts
from pytest_mnnvl.worlds import threads as _threads
from pytest_mnnvl.worlds.factory import WorldFactory
from pytest_mnnvl.worlds.layout import Topology


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_mnnvl import newhooks

    pluginmanager.add_hookspecs(newhooks)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mnnvl", "MoE all-to-all workspace managers on rank worlds (pytest-mnnvl)")
    for option in _settings.OPTIONS:
        if option.flag:
            group.addoption(option.flag_text, dest=option.name, action="store_true", default=False, help=option.help)
        else:
            group.addoption(option.flag_text, dest=option.name, metavar=option.metavar, help=option.help)
        if option.ini_type is None:
            parser.addini(option.name, option.help)
        else:
            parser.addini(option.name, option.help, type=option.ini_type)  # type: ignore[arg-type]


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKER_LINES:
        config.addinivalue_line("markers", line)
    try:
        config.stash[SETTINGS_KEY] = settings = _settings.from_config(config.getoption, config.getini)
        if names_packaged_suite(config) or config.pluginmanager.hasplugin(CONFORMANCE_PLUGIN):
            # The conformance suite runs nothing without a FlashInfer world: an unsupported release stops it here.
            from pytest_mnnvl.backends import unsupported_release

            if (problem := unsupported_release()) is not None:
                raise MnnvlUsageError(problem)
        if settings.manager != _settings.Settings.manager:
            # An explicit manager is resolved now, so a bad spec stops the run before any rank starts.
            from pytest_mnnvl.managers import resolve

            config.stash[MANAGER_KEY] = resolve(settings.manager)
        if settings.waivers:
            _waivers.install(config, settings.waivers, settings.manager, settings.strict)
        if settings.report and not hasattr(config, "workerinput"):
            from pytest_mnnvl.conformance import report

            report.check_path(settings.report)
        _threads.policy()  # a bad PYTEST_MNNVL_RANK_THREADS stops the run before any rank starts
    except MnnvlUsageError as exc:
        raise pytest.UsageError(str(exc)) from None
    if not hasattr(config, "workerinput"):
        for notice in settings.notices:
            config.issue_config_time_warning(pytest.PytestConfigWarning(notice), stacklevel=2)
    if settings.launcher == "torchrun":
        from pytest_mnnvl.worlds import spmd_plugin

        spmd_plugin.install(config, settings.timeout)
    config.stash[GUARD_KEY] = interrupts.Guard()
    config.pluginmanager.register(SessionEnd(config), "mnnvl-session-end")
    if settings.report and not hasattr(config, "workerinput"):
        lock_report(config, settings.report)
    if names_packaged_suite(config):
        config.pluginmanager.import_plugin(CONFORMANCE_PLUGIN)
    if settings.report or config.pluginmanager.hasplugin(CONFORMANCE_PLUGIN):
        take_signals(config)
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "mnnvl_backend" in workerinput:
        config.stash[BACKEND_KEY] = workerinput["mnnvl_backend"]
    if workerinput is not None and "mnnvl_mps" in workerinput:
        from pytest_mnnvl.worlds.mps import MpsSession, MpsState

        # The controller's daemon and directories: a worker neither starts nor stops anything.
        config.stash[MPS_KEY] = MpsSession(MpsState.from_dict(workerinput["mnnvl_mps"]))
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(), "mnnvl-xdist-hooks")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Apply ``--mnnvl-mps`` once per session, in the process that owns it (the controller under xdist, before
    its workers start): a private daemon must run before any rank's first CUDA call. An xdist controller starts the
    session's shared zygote here too, before xdist's own sessionstart starts the workers: its imports then overlap
    every worker's start and collection."""
    if not hasattr(session.config, "workerinput"):
        mps_session(session.config)
        if session.config.pluginmanager.has_plugin("dsession"):
            shared_zygote(session.config)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """With ``-vv``: how the ranks started (forked from a zygote, or spawned and why), summed over xdist workers."""
    starts = rank_starts(config)
    if config.option.verbose >= 2 and starts:
        terminalreporter.write_line(starts.describe())


def pytest_unconfigure(config: pytest.Config) -> None:
    pool = config.stash.get(POOL_KEY, None)
    if pool is not None:
        pool.close()
        del config.stash[POOL_KEY]
    zygote = config.stash.get(ZYGOTE_KEY, None)
    if zygote is not None:
        zygote.close()  # after the workers and their pools
        del config.stash[ZYGOTE_KEY]
    mps = config.stash.get(MPS_KEY, None)
    if mps is not None:
        mps.close()  # after the pool: no rank is a client any more
        del config.stash[MPS_KEY]
    lock = config.stash.get(REPORT_LOCK_KEY, None)
    if lock is not None:
        lock.release()
        del config.stash[REPORT_LOCK_KEY]
    guard = config.stash.get(GUARD_KEY, None)
    if guard is not None:
        guard.restore()


class SessionEnd:
    """Tells the interrupt guard when the session starts to end, and what ended it, so that neither a
    second signal nor a late first one can cut the end short or leave a report claiming success."""

    def __init__(self, config: pytest.Config) -> None:
        self.guard = config.stash[GUARD_KEY]

    @pytest.hookimpl(tryfirst=True)
    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        self.guard.finishing()
        # Type and message only: Hypothesis adds the example it was running as a note, many lines long.
        message = str(excinfo.value).strip()
        self.guard.stopped(f"{excinfo.typename}: {message}" if message else excinfo.typename)

    @pytest.hookimpl(wrapper=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> Generator[None, None, None]:
        # Before every other sessionfinish (the report, the terminal summary): a session a signal reached
        # did not finish, even where the signal came too late for pytest to record it (status still 0).
        self.guard.finishing()
        if self.guard.signals and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.INTERRUPTED
        return (yield)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return header_lines(config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "mnnvl_topology" in metafunc.fixturenames:
        pairs = metafunc.config.stash[SETTINGS_KEY].topologies()
        metafunc.parametrize(
            "mnnvl_topology",
            [Topology(ws, pp) for ws, pp in pairs],
            ids=[f"ws{ws}-pp{pp}" for ws, pp in pairs],
            indirect=True,
        )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    backend: str | None = None
    for name in CAPABILITY_MARKERS:
        for mark in item.iter_markers(name):
            from pytest_mnnvl.markers import skip_reason

            if backend is None:
                backend = resolve_backend(item.config)
            try:
                reason = skip_reason(
                    name, mark.args, dict(mark.kwargs), backend, item.config.stash[SETTINGS_KEY].ranks_per_gpu
                )
            except MnnvlUsageError as exc:
                pytest.fail(str(exc), pytrace=False)
            if reason:
                skip_at_test(reason)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if (
        report.skipped
        and not hasattr(report, "wasxfail")
        and item.config.stash[SETTINGS_KEY].strict
        and uses_mnnvl(item)
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"--mnnvl-strict: this test may not be skipped: {reason}"
    # After the strict check and pytest's xfail handling, before the conformance report records it.
    _waivers.makereport(item, report)
    return report


@pytest.fixture
def mnnvl_topology(request: pytest.FixtureRequest) -> Topology:
    """One (world size, PP) pair from ``--mnnvl-world-sizes`` × ``--mnnvl-pp``; parametrizes the test."""
    param = getattr(request, "param", None)
    return param if param is not None else Topology(2, 1)


@pytest.fixture
def mnnvl_world(request: pytest.FixtureRequest) -> WorldFactory:
    """A factory of warm rank worlds: ``world = mnnvl_world(world_size=2, pp=1)``; ``world.run(fn, …)``."""
    return WorldFactory(request)


class XdistHooks:
    """Registered only when pytest-xdist is present: workers inherit the controller's backend choice, MPS session
    and shared zygote, and send back how their ranks started."""

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["mnnvl_backend"] = resolve_backend(node.config)
        node.workerinput["mnnvl_mps"] = mps_session(node.config).state.to_dict()
        shared = shared_zygote(node.config)
        if shared is not None:
            node.workerinput[ZYGOTE_WIRE] = shared.to_dict()

    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        from pytest_mnnvl.worlds.zygote import RankStarts

        sent = getattr(node, "workeroutput", {}).get(STARTS_WIRE)
        if sent is not None:
            node.config.stash.setdefault(STARTS_KEY, RankStarts()).add(RankStarts.from_dict(sent))

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """On a worker, before xdist sends its output to the controller."""
        workeroutput = getattr(session.config, "workeroutput", None)
        starts = rank_starts(session.config)
        if workeroutput is not None and starts:
            workeroutput[STARTS_WIRE] = starts.to_dict()
