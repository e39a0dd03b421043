"""Hooks of a torchrun session (``--mnnvl-launcher=torchrun``), registered by :mod:`pytest_mnnvl.plugin` only then.

Every torchrun worker runs this same pytest session as one rank. These hooks keep the ranks in step and
make them speak with one voice: the same collection (checked: a digest of the node ids, in order), the
same test order (pytest-randomly gets a seed derived from torchrun's run id), one outcome per test phase
agreed by all ranks (if any rank failed, every rank reports the failure, naming the rank), and one report
and one JUnit file, written by rank 0 (or by the lowest surviving rank when rank 0 is gone). Ranks other
than 0 are quiet on the terminal; torchrun's ``--tee 3 --log-dir DIR`` keeps each rank's full output.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Generator
from typing import Any

import pytest

from pytest_mnnvl.session import SPMD_KEY
from pytest_mnnvl.worlds.spmd import SpmdSession, TorchrunEnv, WorldLost, shared_seed

JUNIT_KEY = pytest.StashKey[tuple[str, str]]()
#: Characters of a peer's failure text carried into this rank's report.
PEER_TEXT_CHARS = 6000


def install(config: pytest.Config, timeout: float) -> SpmdSession:
    """Called from the plugin's ``pytest_configure`` (before junitxml's): set up this rank's seat."""
    dist = config.getoption("dist", "no")
    if dist != "no":
        raise pytest.UsageError(
            f"--mnnvl-launcher=torchrun cannot run under pytest-xdist (-n / --dist={dist}): torchrun already runs "
            "one pytest session per rank, and every xdist worker would claim that same rank; allowed: no -n "
            "(or -n 0) under torchrun"
        )
    env = TorchrunEnv.from_environ()
    session = SpmdSession(env, backend="sim", timeout=timeout)
    config.stash[SPMD_KEY] = session
    xmlpath = getattr(config.option, "xmlpath", None)
    if xmlpath:
        # Every rank keeps its JUnit file aside; the writer moves its own into place at the end.
        aside = os.path.join(tempfile.gettempdir(), f"mnnvl-junit-{env.run_id}-rank{env.rank}.xml")
        config.stash[JUNIT_KEY] = (aside, os.path.abspath(xmlpath))
        config.option.xmlpath = aside if env.rank != 0 else xmlpath
    if env.rank != 0:
        config.option.verbose = -2
        config.option.reportchars = ""
        config.option.no_header = True
        config.option.no_summary = True
        config.option.durations = None
    if getattr(config.option, "randomly_seed", None) == "default":
        config.option.randomly_seed = shared_seed()  # pytest-randomly: one order on every rank
    config.pluginmanager.register(SpmdHooks(session), "mnnvl-torchrun-hooks")
    return session


def _agree_timeout(session: SpmdSession) -> float:
    # Ranks run the same test in step; a rank this far behind is stuck outside any call (or gone).
    return max(2 * session.timeout, 60.0)


class SpmdHooks:
    def __init__(self, session: SpmdSession) -> None:
        self.session = session

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        from pytest_mnnvl.session import resolve_backend

        self.session.backend = resolve_backend(session.config)
        ids = "\n".join(item.nodeid for item in session.items)
        mine = (len(session.items), hashlib.sha256(ids.encode()).hexdigest()[:16])
        digests = self.session.exchange("collection", mine, _agree_timeout(self.session))
        missing = [r for r in range(self.session.world_size) if r not in digests]
        if missing:
            raise pytest.UsageError(f"torchrun ranks {missing} did not finish collecting within the timeout")
        if len(set(digests.values())) > 1:
            lines = ", ".join(f"rank {r}: {n} tests ({h})" for r, (n, h) in sorted(digests.items()))
            raise pytest.UsageError(
                f"the torchrun ranks collected different tests ({lines}); every rank must run the same "
                "tests in the same order: same files and -k/-m on every node, pytest-randomly with one "
                "seed (-p randomly_seed=N) or off (-p no:randomly)"
            )

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
        report = yield
        s = self.session
        if s.broken or s.terminating:
            item.session.shouldstop = f"the torchrun world cannot go on: {s.broken or 'torchrun sent SIGTERM'}"
            return report
        text = report.longreprtext[-PEER_TEXT_CHARS:] if report.failed else ""
        reason = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else ""
        try:
            outcomes = s.exchange(
                f"report:{item.nodeid}:{report.when}", (report.outcome, text, reason), _agree_timeout(s)
            )
        except WorldLost as exc:
            report.outcome, report.longrepr = "failed", str(exc)
            item.session.shouldstop = str(exc)
            return report
        silent = [r for r in s.alive_ranks() if r not in outcomes]
        if silent:
            s.broken = f"ranks {silent} did not finish {report.when} of {item.nodeid} within {_agree_timeout(s):g} s"
            outcomes.update({r: ("failed", f"rank {r} is stuck or gone: {s.broken}", "") for r in silent})
            item.session.shouldstop = f"the torchrun world cannot go on: {s.broken}"
        _merge(report, outcomes, s.rank, item)
        return report

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.session.settle_survivors()

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        aside = config.stash.get(JUNIT_KEY, None)
        if aside is not None and self.session.rank != 0:
            if self.session.writer() == self.session.rank and os.path.exists(aside[0]):
                os.replace(aside[0], aside[1])
            with contextlib.suppress(OSError):
                os.unlink(aside[0])
        self.session.close()


def _merge(report: pytest.TestReport, outcomes: dict[int, tuple[str, str, str]], me: int, item: pytest.Item) -> None:
    """Make this rank's report the agreed one: failed if any rank failed, else skipped if any skipped."""
    failed = {r: text for r, (outcome, text, _) in sorted(outcomes.items()) if outcome == "failed"}
    if failed:
        if report.outcome != "failed":
            report.outcome = "failed"
            report.longrepr = "\n\n".join(f"rank {r} failed:\n{text}" for r, text in failed.items())
        else:
            # Every rank's own traceback is in its log (--tee/--log-dir); here only who failed.
            report.sections.append(("mnnvl torchrun", f"failed on ranks {sorted(failed)} of {len(outcomes)}"))
        return
    skipped = {r: reason for r, (outcome, _, reason) in sorted(outcomes.items()) if outcome == "skipped"}
    if skipped and report.outcome == "passed":
        first = min(skipped)
        path, lineno, _ = item.location
        report.outcome = "skipped"
        report.longrepr = (str(path), (lineno or 0) + 1, f"[rank {first}] {skipped[first]}")
