"""What one pytest session holds: its stash keys, and what is decided once per session (the backend, the
MPS session, the signal guard, the report lock, the rank pool, the report header's lines).

The hooks in :mod:`pytest_mnnvl.plugin` and the conformance suite's plugin both read these; keeping them out
of the hook module is what lets both import them without an import circle.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NoReturn

import pytest

from pytest_mnnvl import settings as _settings
from pytest_mnnvl.backends import SESSION_BACKENDS
from pytest_mnnvl.markers import CAPABILITY_MARKERS
from pytest_mnnvl.worlds import interrupts
from pytest_mnnvl.worlds import threads as _threads

if TYPE_CHECKING:
    from pytest_mnnvl.conformance.report_lock import ReportLock
    from pytest_mnnvl.managers import ManagerFactory
    from pytest_mnnvl.worlds.mps import MpsSession
    from pytest_mnnvl.worlds.sharing import GpuPlan, SharingSummary
    from pytest_mnnvl.worlds.spmd import SpmdSession
    from pytest_mnnvl.worlds.world import WorldPool
    from pytest_mnnvl.worlds.zygote import RankStarts, SharedAddress, SharedZygote


SETTINGS_KEY = pytest.StashKey["_settings.Settings"]()
BACKEND_KEY = pytest.StashKey[str]()
POOL_KEY = pytest.StashKey["WorldPool"]()
MANAGER_KEY: pytest.StashKey[ManagerFactory] = pytest.StashKey()
GUARD_KEY = pytest.StashKey[interrupts.Guard]()
#: The conformance suite's plugin, as ``conformance/conftest.py`` and the packaged suite's conftest register it.
CONFORMANCE_PLUGIN = "pytest_mnnvl.conformance.plugin"
#: The packaged conformance suite (``pytest -p pytest_mnnvl --pyargs pytest_mnnvl.conformance``).
SUITE_PACKAGE = "pytest_mnnvl.conformance"
REPORT_LOCK_KEY: pytest.StashKey[ReportLock] = pytest.StashKey()
#: A header line for the session that found ``--mnnvl-report`` in use by another one.
REPORT_SHARED_KEY = pytest.StashKey[str]()
#: What this session does about CUDA MPS (``--mnnvl-mps``; :mod:`pytest_mnnvl.worlds.mps`).
MPS_KEY: pytest.StashKey[MpsSession] = pytest.StashKey()
#: The session's shared zygote (started by the xdist controller for its workers), or None where it has none.
ZYGOTE_KEY: pytest.StashKey[SharedZygote | None] = pytest.StashKey()
#: How the ranks of every xdist worker started, summed by the controller as workers finish.
STARTS_KEY: pytest.StashKey[RankStarts] = pytest.StashKey()
#: The key of ``workerinput`` and ``workeroutput`` these travel under.
ZYGOTE_WIRE = "mnnvl_zygote"
STARTS_WIRE = "mnnvl_rank_starts"
#: This rank's seat in a torchrun session (``--mnnvl-launcher=torchrun``; :mod:`pytest_mnnvl.worlds.spmd`).
SPMD_KEY = pytest.StashKey["SpmdSession"]()


def mps_session(config: pytest.Config) -> MpsSession:
    """This session's :class:`~pytest_mnnvl.worlds.mps.MpsSession`, opened on first use (a failed start is a usage
    error naming the command and its output)."""
    if MPS_KEY not in config.stash:
        from pytest_mnnvl.worlds import mps

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


def shared_zygote(config: pytest.Config) -> SharedAddress | None:
    """The session's shared zygote, started on first use in the process that owns the session (the xdist
    controller, at session start, before its workers), where its workers' CPU ranks would be forked: the ``spawn``
    launcher, a forkable backend, the zygote on and a thread count the harness chooses. None where there is none."""
    if ZYGOTE_KEY not in config.stash:
        from pytest_mnnvl.worlds import zygote
        from pytest_mnnvl.worlds.pool import rank_world_env
        from pytest_mnnvl.worlds.world import WorldSpec

        backend = resolve_backend(config)
        env, threads = rank_world_env(WorldSpec(2, backend=backend))
        started: SharedZygote | None = None
        s = config.stash[SETTINGS_KEY]
        if s.launcher == "spawn" and backend in zygote.FORKABLE_BACKENDS and zygote.enabled(env) and threads:
            factory = getattr(config, "_tmp_path_factory", None)
            log_dir = str(factory.getbasetemp()) if factory is not None else None
            started = zygote.SharedZygote(env, backend, os.getcwd(), log_dir)
        config.stash[ZYGOTE_KEY] = started
    shared = config.stash[ZYGOTE_KEY]
    return shared.address if shared is not None else None


def rank_starts(config: pytest.Config) -> RankStarts | None:
    """How this session's ranks started: this process's pool's, or (on an xdist controller) its workers' sum."""
    if STARTS_KEY in config.stash:
        return config.stash[STARTS_KEY]
    zygotes = getattr(config.stash.get(POOL_KEY, None), "zygotes", None)
    return zygotes.starts if zygotes is not None else None


def names_packaged_suite(config: pytest.Config) -> bool:
    """``--pyargs pytest_mnnvl.conformance`` (or a module or test in it): that package's conftest loads the suite's
    plugin only when collection reaches it, after the report header and never on an xdist controller (which
    collects nothing: no report would be written), so the plugin is loaded at configure instead."""
    if not config.getoption("pyargs", False):
        return False
    names = (str(arg).split("::")[0] for arg in config.args)
    return any(name == SUITE_PACKAGE or name.startswith(f"{SUITE_PACKAGE}.") for name in names)


def take_signals(config: pytest.Config) -> None:
    """From now on SIGINT and SIGTERM stop this session cleanly (:mod:`pytest_mnnvl.worlds.interrupts`): from
    configure when there is a report to write, else from the first rank world. Not under torchrun, whose
    agent stops its workers with SIGTERM and owns that signal (:mod:`pytest_mnnvl.worlds.spmd`)."""
    guard = config.stash.get(GUARD_KEY, None)
    if guard is not None and config.stash[SETTINGS_KEY].launcher != "torchrun":
        guard.install()


def lock_report(config: pytest.Config, path: str) -> None:
    """Hold ``path``'s advisory lock for the session; warn now when another session holds it."""
    from pytest_mnnvl.conformance.report_lock import ReportLock

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


def resolve_backend(config: pytest.Config) -> str:
    """The backend this session uses: the option, else a plugin's choice, else the probe."""
    if BACKEND_KEY in config.stash:
        return config.stash[BACKEND_KEY]
    requested = config.stash[SETTINGS_KEY].backend
    backend = requested
    if requested == "auto":
        backend = config.hook.pytest_mnnvl_select_backend(config=config, requested=requested) or ""
        if backend and backend not in SESSION_BACKENDS:
            allowed = ", ".join((*SESSION_BACKENDS, "None"))
            raise pytest.UsageError(f"pytest_mnnvl_select_backend returned {backend!r}; allowed: {allowed}")
        if not backend:
            from pytest_mnnvl.probes.backend import resolve_auto_backend

            backend = resolve_auto_backend(config.stash[SETTINGS_KEY].ranks_per_gpu).value
    config.stash[BACKEND_KEY] = backend
    return backend


def header_lines(config: pytest.Config) -> list[str]:
    """The report header's ``mnnvl:`` lines: what this session runs on and with."""
    from pytest_mnnvl.probes import header

    s = config.stash[SETTINGS_KEY]
    backend = resolve_backend(config)
    how = f"auto -> {backend}" if s.backend == "auto" else backend
    profile, seed = hypothesis_in_effect(config)
    return [
        f"mnnvl: backend={how}, timeout={s.timeout:g}s, topologies="
        + " ".join(f"ws{ws}-pp{pp}" for ws, pp in s.topologies())
        + f", manager={s.manager}, strict={'on' if s.strict else 'off'}",
        *header.header_lines(),
        *_sharing_lines(config, backend),
        _rank_threads_line(config),
        f"mnnvl: hypothesis profile={profile}, seed={seed}",
        *([f"mnnvl: WARNING: {config.stash[REPORT_SHARED_KEY]}"] if REPORT_SHARED_KEY in config.stash else []),
    ]


def _rank_threads_line(config: pytest.Config) -> str:
    """How many intra-op threads the ranks get (:mod:`pytest_mnnvl.worlds.threads`): per world size, divided among
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
    from pytest_mnnvl.probes.backend import world_gpu_plan
    from pytest_mnnvl.probes.gpus import gpu_inventory
    from pytest_mnnvl.worlds.sharing import SharingSummary, WorldLayout

    s = config.stash[SETTINGS_KEY]
    if s.launcher != "spawn" or resolve_backend(config) != "flashinfer":
        return None
    env = dict(os.environ)
    workers = getattr(config.option, "numprocesses", None)
    if not hasattr(config, "workerinput") and isinstance(workers, int) and workers > 0:
        env.update(PYTEST_XDIST_WORKER="gw0", PYTEST_XDIST_WORKER_COUNT=str(workers))  # as each worker will split
    inventory = gpu_inventory()
    worlds = []
    for ws, pp in s.topologies():
        try:
            plan = world_gpu_plan(ws, s.ranks_per_gpu, inventory, env)
            worlds.append(WorldLayout(f"ws{ws}-pp{pp}", plan))
        except ValueError as exc:
            worlds.append(WorldLayout(f"ws{ws}-pp{pp}", None, str(exc)))
    state = mps_session(config).state
    return SharingSummary(s.ranks_per_gpu, tuple(worlds), state.mode, state.on, state.reason)


def hypothesis_in_effect(config: pytest.Config) -> tuple[str, str]:
    """The profile and seed Hypothesis runs with: the conformance suite loads its own profile (``ci``, or its
    seeded twin), which the option alone does not say."""
    from pytest_mnnvl.conformance import profiles

    if config.pluginmanager.hasplugin("hypothesispytest"):
        # Hypothesis picks its profile at import (its own derandomized ``ci`` under a CI variable): import it
        # now, once, so the header says what the tests will run with, not what an unimported module implies.
        import hypothesis  # noqa: F401

    profile = profiles.profile_in_effect(config.getoption("hypothesis_profile", None))
    if config.pluginmanager.hasplugin(CONFORMANCE_PLUGIN):
        from pytest_mnnvl.conformance.recorder import RECORDER_KEY

        recorder = config.stash.get(RECORDER_KEY, None)
        profile = recorder.profile if recorder is not None and recorder.profile else profile
    return profile, profiles.seed_in_effect(config.getoption("hypothesis_seed", None))


def skip_at_test(reason: str) -> NoReturn:
    """Skip, reported at the test's location (as skipif marks are), not at this plugin's line."""
    raise pytest.skip.Exception(reason, _use_item_location=True)


def uses_mnnvl(item: pytest.Item) -> bool:
    if any(item.get_closest_marker(name) for name in CAPABILITY_MARKERS):
        return True
    fixturenames = getattr(item, "fixturenames", ())
    return "mnnvl_world" in fixturenames or "mnnvl_topology" in fixturenames


def pool(config: pytest.Config) -> WorldPool:
    if POOL_KEY not in config.stash:
        from pytest_mnnvl.worlds.pool import Pool

        s = config.stash[SETTINGS_KEY]
        if s.launcher == "torchrun":
            from pytest_mnnvl.worlds.spmd import SpmdPool

            spmd = session_of(config)
            assert spmd is not None
            config.stash[POOL_KEY] = SpmdPool(spmd, s.timeout, s.startup_timeout)
            return config.stash[POOL_KEY]
        from pytest_mnnvl.worlds.zygote import SharedAddress

        shared = getattr(config, "workerinput", {}).get(ZYGOTE_WIRE)
        config.stash[POOL_KEY] = Pool(
            timeout=s.timeout,
            max_warm=s.warm_worlds,
            startup_timeout=s.startup_timeout,
            shared_zygote=SharedAddress.from_dict(shared) if shared else None,
        )
        take_signals(config)
    return config.stash[POOL_KEY]


def gpu_plan_for(config: pytest.Config, world_size: int) -> GpuPlan:
    """The GPUs of a world (UUIDs: they survive any CUDA_DEVICE_ORDER; the inventory already applied
    CUDA_VISIBLE_DEVICES), from this xdist worker's share, with ``--mnnvl-ranks-per-gpu``; skips the test
    when the world does not fit, with the reason."""
    from pytest_mnnvl.probes.backend import world_gpu_plan
    from pytest_mnnvl.probes.gpus import gpu_inventory

    try:
        return world_gpu_plan(world_size, config.stash[SETTINGS_KEY].ranks_per_gpu, gpu_inventory(), os.environ)
    except ValueError as exc:
        skip_at_test(str(exc))


def session_of(config: pytest.Config) -> SpmdSession | None:
    return config.stash.get(SPMD_KEY, None)


def writes_reports(config: pytest.Config) -> bool:
    """Whether this process writes the session's reports (always, unless a torchrun rank other than the writer)."""
    session = session_of(config)
    return session is None or session.writer() == session.rank
