"""pytest-mnnvl's hooks: options, markers, report header, fixtures and xdist wiring only.

The machinery lives in modules imported when first needed (:mod:`pytest_mnnvl.pool`,
:mod:`pytest_mnnvl.capabilities`, the backends), so loading the plugin imports neither torch nor
FlashInfer nor Hypothesis.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

import pytest

from pytest_mnnvl import interrupts
from pytest_mnnvl import settings as _settings
from pytest_mnnvl import threads as _threads
from pytest_mnnvl import waivers as _waivers
from pytest_mnnvl.errors import MnnvlUsageError
from pytest_mnnvl.markers import CAPABILITY_MARKERS, MARKER_LINES

if TYPE_CHECKING:
    from pytest_mnnvl.managers import ManagerFactory
    from pytest_mnnvl.mps import MpsSession
    from pytest_mnnvl.pool import Pool, World
    from pytest_mnnvl.report import ReportLock
    from pytest_mnnvl.sharing import GpuPlan, SharingSummary
    from pytest_mnnvl.spmd import SpmdPool, SpmdWorld

SETTINGS_KEY = pytest.StashKey["_settings.Settings"]()
BACKEND_KEY = pytest.StashKey[str]()
POOL_KEY = pytest.StashKey["Pool | SpmdPool"]()
MANAGER_KEY: pytest.StashKey[ManagerFactory] = pytest.StashKey()
GUARD_KEY = pytest.StashKey[interrupts.Guard]()
#: The conformance suite's plugin, as ``conformance/conftest.py`` and the packaged suite's conftest register it.
CONFORMANCE_PLUGIN = "pytest_mnnvl.conformance_plugin"
#: The packaged conformance suite (``pytest -p pytest_mnnvl --pyargs pytest_mnnvl.conformance``).
SUITE_PACKAGE = "pytest_mnnvl.conformance"
REPORT_LOCK_KEY: pytest.StashKey[ReportLock] = pytest.StashKey()
#: A header line for the session that found ``--mnnvl-report`` in use by another one.
REPORT_SHARED_KEY = pytest.StashKey[str]()
#: What this session does about CUDA MPS (``--mnnvl-mps``; :mod:`pytest_mnnvl.mps`).
MPS_KEY: pytest.StashKey[MpsSession] = pytest.StashKey()


class Topology(NamedTuple):
    """One (world size, PP) pair of ``--mnnvl-world-sizes`` × ``--mnnvl-pp``."""

    world_size: int
    pp: int


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_mnnvl import newhooks

    pluginmanager.add_hookspecs(newhooks)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mnnvl", "MoE all-to-all workspace managers on rank worlds (pytest-mnnvl)")
    group.addoption("--mnnvl-backend", dest="mnnvl_backend", metavar="auto|sim|flashinfer", help=_settings.BACKEND_HELP)
    group.addoption("--mnnvl-timeout", dest="mnnvl_timeout", metavar="SECONDS", help=_settings.TIMEOUT_HELP)
    group.addoption(
        "--mnnvl-strict", dest="mnnvl_strict", action="store_true", default=False, help=_settings.STRICT_HELP
    )
    group.addoption("--mnnvl-world-sizes", dest="mnnvl_world_sizes", metavar="N[,N…]", help=_settings.WORLD_SIZES_HELP)
    group.addoption("--mnnvl-pp", dest="mnnvl_pp", metavar="N[,N…]", help=_settings.PP_HELP)
    group.addoption("--mnnvl-report", dest="mnnvl_report", metavar="PATH", help=_settings.REPORT_HELP)
    group.addoption("--mnnvl-manager", dest="mnnvl_manager", metavar="SPEC", help=_settings.MANAGER_HELP)
    group.addoption("--mnnvl-warm-worlds", dest="mnnvl_warm_worlds", metavar="N", help=_settings.WARM_WORLDS_HELP)
    group.addoption(
        "--mnnvl-startup-timeout",
        dest="mnnvl_startup_timeout",
        metavar="SECONDS",
        help=_settings.STARTUP_TIMEOUT_HELP,
    )
    group.addoption("--mnnvl-launcher", dest="mnnvl_launcher", metavar="spawn|torchrun", help=_settings.LAUNCHER_HELP)
    group.addoption("--mnnvl-waivers", dest="mnnvl_waivers", metavar="FILE", help=_waivers.HELP)
    group.addoption(
        "--mnnvl-ranks-per-gpu", dest="mnnvl_ranks_per_gpu", metavar="N|auto", help=_settings.RANKS_PER_GPU_HELP
    )
    group.addoption("--mnnvl-mps", dest="mnnvl_mps", metavar="auto|off|start", help=_settings.MPS_HELP)
    parser.addini("mnnvl_backend", _settings.BACKEND_HELP)
    parser.addini("mnnvl_timeout", _settings.TIMEOUT_HELP)
    parser.addini("mnnvl_strict", _settings.STRICT_HELP)
    parser.addini("mnnvl_world_sizes", _settings.WORLD_SIZES_HELP)
    parser.addini("mnnvl_pp", _settings.PP_HELP)
    parser.addini("mnnvl_report", _settings.REPORT_HELP)
    parser.addini("mnnvl_manager", _settings.MANAGER_HELP)
    parser.addini("mnnvl_warm_worlds", _settings.WARM_WORLDS_HELP)
    parser.addini("mnnvl_startup_timeout", _settings.STARTUP_TIMEOUT_HELP)
    parser.addini("mnnvl_launcher", _settings.LAUNCHER_HELP)
    parser.addini("mnnvl_ranks_per_gpu", _settings.RANKS_PER_GPU_HELP)
    parser.addini("mnnvl_mps", _settings.MPS_HELP)
    # "paths": a relative path in the ini file is relative to the ini file, not to where pytest runs.
    parser.addini("mnnvl_waivers", _waivers.HELP, type="paths")


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKER_LINES:
        config.addinivalue_line("markers", line)
    try:
        config.stash[SETTINGS_KEY] = settings = _settings.from_config(config.getoption, config.getini)
        if settings.manager != _settings.Settings.manager:
            # An explicit manager is resolved now, so a bad spec stops the run before any rank starts.
            from pytest_mnnvl.managers import resolve

            config.stash[MANAGER_KEY] = resolve(settings.manager)
        if settings.waivers:
            _waivers.install(config, settings.waivers, settings.manager, settings.strict)
        if settings.report and not hasattr(config, "workerinput"):
            from pytest_mnnvl import report

            report.check_path(settings.report)
        _threads.policy()  # a bad PYTEST_MNNVL_RANK_THREADS stops the run before any rank starts
    except MnnvlUsageError as exc:
        raise pytest.UsageError(str(exc)) from None
    if not hasattr(config, "workerinput"):
        for notice in settings.notices:
            config.issue_config_time_warning(pytest.PytestConfigWarning(notice), stacklevel=2)
    if settings.launcher == "torchrun":
        from pytest_mnnvl import spmd_plugin

        spmd_plugin.install(config, settings.timeout)
    config.stash[GUARD_KEY] = interrupts.Guard()
    config.pluginmanager.register(SessionEnd(config), "mnnvl-session-end")
    if settings.report and not hasattr(config, "workerinput"):
        _lock_report(config, settings.report)
    if _names_packaged_suite(config):
        config.pluginmanager.import_plugin(CONFORMANCE_PLUGIN)
    if settings.report or config.pluginmanager.hasplugin(CONFORMANCE_PLUGIN):
        take_signals(config)
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "mnnvl_backend" in workerinput:
        config.stash[BACKEND_KEY] = workerinput["mnnvl_backend"]
    if workerinput is not None and "mnnvl_mps" in workerinput:
        from pytest_mnnvl.mps import MpsSession, MpsState

        # The controller's daemon and directories: a worker neither starts nor stops anything.
        config.stash[MPS_KEY] = MpsSession(MpsState.from_dict(workerinput["mnnvl_mps"]))
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(), "mnnvl-xdist-hooks")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Apply ``--mnnvl-mps`` once per session, in the process that owns it (the controller under xdist, before
    its workers start): a private daemon must run before any rank's first CUDA call."""
    if not hasattr(session.config, "workerinput"):
        mps_session(session.config)


def mps_session(config: pytest.Config) -> MpsSession:
    """This session's :class:`~pytest_mnnvl.mps.MpsSession`, opened on first use (a failed start is a usage
    error naming the command and its output)."""
    if MPS_KEY not in config.stash:
        from pytest_mnnvl import mps

        s = config.stash[SETTINGS_KEY]
        backend = resolve_backend(config)
        gpu = s.launcher == "spawn" and backend == "flashinfer"
        idle = (
            "not applied: torchrun starts the ranks"
            if s.launcher == "torchrun"
            else f"not used: the ranks run no GPU (backend {backend})"
        )
        # Under the session's temporary directory (pytest's basetemp, made only when a directory is needed).
        factory = getattr(config, "_tmp_path_factory", None)
        base = str(factory.getbasetemp()) if factory is not None and gpu and s.mps != "auto" else None
        try:
            config.stash[MPS_KEY] = mps.open_session(s.mps, gpu, os.environ, mps.find_control(), base, idle_reason=idle)
        except mps.MpsStartError as exc:
            raise pytest.UsageError(str(exc)) from None
    return config.stash[MPS_KEY]


def pytest_unconfigure(config: pytest.Config) -> None:
    pool = config.stash.get(POOL_KEY, None)
    if pool is not None:
        pool.close()
        del config.stash[POOL_KEY]
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


def _names_packaged_suite(config: pytest.Config) -> bool:
    """``--pyargs pytest_mnnvl.conformance`` (or a module or test in it): that package's conftest loads the suite's
    plugin only when collection reaches it, after the report header and never on an xdist controller (which
    collects nothing: no report would be written), so the plugin is loaded at configure instead."""
    if not config.getoption("pyargs", False):
        return False
    names = (str(arg).split("::")[0] for arg in config.args)
    return any(name == SUITE_PACKAGE or name.startswith(f"{SUITE_PACKAGE}.") for name in names)


def take_signals(config: pytest.Config) -> None:
    """From now on SIGINT and SIGTERM stop this session cleanly (:mod:`pytest_mnnvl.interrupts`): from
    configure when there is a report to write, else from the first rank world. Not under torchrun, whose
    agent stops its workers with SIGTERM and owns that signal (:mod:`pytest_mnnvl.spmd`)."""
    guard = config.stash.get(GUARD_KEY, None)
    if guard is not None and config.stash[SETTINGS_KEY].launcher != "torchrun":
        guard.install()


def _lock_report(config: pytest.Config, path: str) -> None:
    """Hold ``path``'s advisory lock for the session; warn now when another session holds it."""
    from pytest_mnnvl.report import ReportLock
    from pytest_mnnvl.spmd_plugin import session_of

    spmd = session_of(config)
    if spmd is not None and spmd.rank != 0:
        return  # one lock per torchrun session (its ranks share the path), taken by rank 0
    lock = ReportLock(path)
    holder = lock.acquire()
    if holder is None:
        config.stash[REPORT_LOCK_KEY] = lock
        return
    text = (
        f"--mnnvl-report={path!r} is in use by another session ({holder}): whichever finishes last "
        "overwrites the other's report; give each session its own path"
    )
    config.stash[REPORT_SHARED_KEY] = text
    config.issue_config_time_warning(pytest.PytestConfigWarning(text), stacklevel=2)


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


def resolve_backend(config: pytest.Config) -> str:
    """The backend this session uses: the option, else a plugin's choice, else the probe."""
    if BACKEND_KEY in config.stash:
        return config.stash[BACKEND_KEY]
    requested = config.stash[SETTINGS_KEY].backend
    backend = requested
    if requested == "auto":
        backend = config.hook.pytest_mnnvl_select_backend(config=config, requested=requested) or ""
        if backend and backend not in ("sim", "flashinfer"):
            raise pytest.UsageError(f"pytest_mnnvl_select_backend returned {backend!r}; allowed: sim, flashinfer, None")
        if not backend:
            from pytest_mnnvl import capabilities

            backend = capabilities.resolve_auto_backend(config.stash[SETTINGS_KEY].ranks_per_gpu).value
    config.stash[BACKEND_KEY] = backend
    return backend


def pytest_report_header(config: pytest.Config) -> list[str]:
    from pytest_mnnvl import capabilities

    s = config.stash[SETTINGS_KEY]
    backend = resolve_backend(config)
    how = f"auto -> {backend}" if s.backend == "auto" else backend
    profile, seed = _hypothesis_in_effect(config)
    return [
        f"mnnvl: backend={how}, timeout={s.timeout:g}s, topologies="
        + " ".join(f"ws{ws}-pp{pp}" for ws, pp in s.topologies())
        + f", manager={s.manager}, strict={'on' if s.strict else 'off'}",
        *capabilities.header_lines(),
        *_sharing_lines(config, backend),
        _rank_threads_line(config),
        f"mnnvl: hypothesis profile={profile}, seed={seed}",
        *([f"mnnvl: WARNING: {config.stash[REPORT_SHARED_KEY]}"] if REPORT_SHARED_KEY in config.stash else []),
    ]


def _rank_threads_line(config: pytest.Config) -> str:
    """How many intra-op threads the ranks get (:mod:`pytest_mnnvl.threads`): per world size, divided among
    the xdist workers (the controller prints the header: ``-n`` is resolved to a number by then)."""
    s = config.stash[SETTINGS_KEY]
    if s.launcher == "torchrun":
        local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or "1"
        return _threads.header_line((), 1, torchrun_local_ranks=int(local) if local.isdigit() else 1)
    workers = getattr(config.option, "numprocesses", None)
    count = workers if isinstance(workers, int) and workers > 0 else _threads.worlds_at_once()
    return _threads.header_line(tuple(ws for ws, _pp in s.topologies()), count)


def _sharing_lines(config: pytest.Config, backend: str) -> list[str]:
    s = config.stash[SETTINGS_KEY]
    summary = sharing_summary(config)
    if summary is not None:
        return [f"mnnvl: GPU worlds ({_settings_text(s)}): {summary.text()}", f"mnnvl: MPS: {summary.mps_reason}"]
    if s.ranks_per_gpu != 1 or s.mps != "auto":
        return [f"mnnvl: GPU worlds: {_settings_text(s)} has no effect: backend {backend} runs no GPU"]
    return []


def _settings_text(s: _settings.Settings) -> str:
    return f"--mnnvl-ranks-per-gpu={s.ranks_per_gpu} --mnnvl-mps={s.mps}"


def sharing_summary(config: pytest.Config) -> SharingSummary | None:
    """How this session's GPU worlds sit on the GPUs (per topology) and whether MPS is on; None off GPUs."""
    from pytest_mnnvl import capabilities
    from pytest_mnnvl.sharing import SharingSummary, WorldLayout

    s = config.stash[SETTINGS_KEY]
    if s.launcher != "spawn" or resolve_backend(config) != "flashinfer":
        return None
    env = dict(os.environ)
    workers = getattr(config.option, "numprocesses", None)
    if not hasattr(config, "workerinput") and isinstance(workers, int) and workers > 0:
        env.update(PYTEST_XDIST_WORKER="gw0", PYTEST_XDIST_WORKER_COUNT=str(workers))  # as each worker will split
    inventory = capabilities.gpu_inventory()
    worlds = []
    for ws, pp in s.topologies():
        try:
            plan = capabilities.world_gpu_plan(ws, s.ranks_per_gpu, inventory, env)
            worlds.append(WorldLayout(f"ws{ws}-pp{pp}", plan))
        except ValueError as exc:
            worlds.append(WorldLayout(f"ws{ws}-pp{pp}", None, str(exc)))
    state = mps_session(config).state
    return SharingSummary(s.ranks_per_gpu, tuple(worlds), state.mode, state.on, state.reason)


def _hypothesis_in_effect(config: pytest.Config) -> tuple[str, str]:
    """The profile and seed Hypothesis runs with: the conformance suite loads its own profile (``ci``, or its
    seeded twin), which the option alone does not say."""
    from pytest_mnnvl import profiles

    if config.pluginmanager.hasplugin("hypothesispytest"):
        # Hypothesis picks its profile at import (its own derandomized ``ci`` under a CI variable): import it
        # now, once, so the header says what the tests will run with, not what an unimported module implies.
        import hypothesis  # noqa: F401

    profile = profiles.profile_in_effect(config.getoption("hypothesis_profile", None))
    if config.pluginmanager.hasplugin(CONFORMANCE_PLUGIN):
        from pytest_mnnvl.conformance_plugin import RECORDER_KEY

        recorder = config.stash.get(RECORDER_KEY, None)
        profile = recorder.profile if recorder is not None and recorder.profile else profile
    return profile, profiles.seed_in_effect(config.getoption("hypothesis_seed", None))


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
                _skip_at_test(reason)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if (
        report.skipped
        and not hasattr(report, "wasxfail")
        and item.config.stash[SETTINGS_KEY].strict
        and _uses_mnnvl(item)
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"--mnnvl-strict: this test may not be skipped: {reason}"
    # After the strict check and pytest's xfail handling, before the conformance report records it.
    _waivers.makereport(item, report)
    return report


def _skip_at_test(reason: str) -> NoReturn:
    """Skip, reported at the test's location (as skipif marks are), not at this plugin's line."""
    raise pytest.skip.Exception(reason, _use_item_location=True)


def _uses_mnnvl(item: pytest.Item) -> bool:
    if any(item.get_closest_marker(name) for name in CAPABILITY_MARKERS):
        return True
    fixturenames = getattr(item, "fixturenames", ())
    return "mnnvl_world" in fixturenames or "mnnvl_topology" in fixturenames


def _pool(config: pytest.Config) -> Pool | SpmdPool:
    if POOL_KEY not in config.stash:
        from pytest_mnnvl.pool import Pool

        s = config.stash[SETTINGS_KEY]
        if s.launcher == "torchrun":
            from pytest_mnnvl.spmd import SpmdPool
            from pytest_mnnvl.spmd_plugin import session_of

            spmd = session_of(config)
            assert spmd is not None
            config.stash[POOL_KEY] = SpmdPool(spmd, s.timeout, s.startup_timeout)
            return config.stash[POOL_KEY]
        config.stash[POOL_KEY] = Pool(timeout=s.timeout, max_warm=s.warm_worlds, startup_timeout=s.startup_timeout)
        take_signals(config)
    return config.stash[POOL_KEY]


@pytest.fixture
def mnnvl_topology(request: pytest.FixtureRequest) -> Topology:
    """One (world size, PP) pair from ``--mnnvl-world-sizes`` × ``--mnnvl-pp``; parametrizes the test."""
    param = getattr(request, "param", None)
    return param if param is not None else Topology(2, 1)


@pytest.fixture
def mnnvl_world(request: pytest.FixtureRequest) -> WorldFactory:
    """A factory of warm rank worlds: ``world = mnnvl_world(world_size=2, pp=1)``; ``world.run(fn, …)``."""
    return WorldFactory(request)


class WorldFactory:
    """What the ``mnnvl_world`` fixture returns; defaults come from the marker, then the topology."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request

    def __call__(
        self,
        world_size: int | None = None,
        pp: int | None = None,
        *,
        backend: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> World | SpmdWorld:
        __tracebackhide__ = True
        from pytest_mnnvl.markers import parse_mnnvl_mark
        from pytest_mnnvl.pool import WorldSpec

        config = self._request.config
        node_mark = self._request.node.get_closest_marker("mnnvl")
        mark = parse_mnnvl_mark(node_mark.args, dict(node_mark.kwargs)) if node_mark else None
        topology: Topology | None = None
        if "mnnvl_topology" in self._request.fixturenames:
            topology = self._request.getfixturevalue("mnnvl_topology")
        torchrun = config.stash[SETTINGS_KEY].launcher == "torchrun"
        default_size = int(os.environ["WORLD_SIZE"]) if torchrun else 2
        world_size = world_size or (mark and mark.world_size) or (topology and topology.world_size) or default_size
        pp = pp or (mark and mark.pp) or (topology and topology.pp) or 1
        chosen = backend or resolve_backend(config)
        from pytest_mnnvl.backends import BACKENDS

        if chosen not in BACKENDS:
            raise MnnvlUsageError(f"mnnvl_world(backend={chosen!r}) is not valid; allowed: {', '.join(BACKENDS)}")
        if not 1 <= world_size <= _settings.MAX_WORLD_SIZE:
            raise MnnvlUsageError(
                f"mnnvl_world(world_size={world_size!r}) is not valid; allowed: 1..{_settings.MAX_WORLD_SIZE}"
            )
        extra_env: dict[str, str] = {}
        plan = _gpu_plan_for(config, world_size) if chosen == "flashinfer" and not torchrun else None
        if plan is not None:
            # --mnnvl-mps (and a shared rank's share of the SMs under MPS), before the hooks and env=
            extra_env.update(mps_session(config).state.rank_env(plan.ranks_per_gpu, os.environ))
        probe = WorldSpec(world_size, pp, chosen)
        for result in config.hook.pytest_mnnvl_rank_env(config=config, spec=probe):
            extra_env.update({str(k): str(v) for k, v in (result or {}).items()})
        extra_env.update({str(k): str(v) for k, v in (env or {}).items()})
        spec = WorldSpec(
            world_size,
            pp,
            chosen,
            tuple(sorted(extra_env.items())),
            # Under torchrun each rank takes GPU LOCAL_RANK of its own host.
            plan.devices if plan is not None else None,
            plan.ranks_per_gpu if plan is not None else 1,
        )
        world = _pool(config).world(spec)
        world.timeout = timeout or (mark and mark.timeout) or config.stash[SETTINGS_KEY].timeout
        return world


def _gpu_plan_for(config: pytest.Config, world_size: int) -> GpuPlan:
    """The GPUs of a world (UUIDs: they survive any CUDA_DEVICE_ORDER; the inventory already applied
    CUDA_VISIBLE_DEVICES), from this xdist worker's share, with ``--mnnvl-ranks-per-gpu``; skips the test
    when the world does not fit, with the reason."""
    from pytest_mnnvl import capabilities

    try:
        return capabilities.world_gpu_plan(
            world_size, config.stash[SETTINGS_KEY].ranks_per_gpu, capabilities.gpu_inventory(), os.environ
        )
    except ValueError as exc:
        _skip_at_test(str(exc))


class XdistHooks:
    """Registered only when pytest-xdist is present: workers inherit the controller's backend choice."""

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["mnnvl_backend"] = resolve_backend(node.config)
        node.workerinput["mnnvl_mps"] = mps_session(node.config).state.to_dict()
