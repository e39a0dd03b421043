"""failed_rebuild_consistent after a *successful* build: the manager's barrier after it fails (injected on every
rank, before the collective). A manager that then neither releases the new workspace nor keeps it live leaves it in
FlashInfer's table: the suite reports it (an xfail; a failure under ``--mnnvl-strict``). Before, the suite injected
failures in the build only, and the reference's except path (retire the new handle, keep the old) never ran."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "conformance" / "test_invariants.py"

pytestmark = pytest.mark.skipif(not SUITE.exists(), reason="the conformance suite is not in this checkout")

KEEPS_NEW = '''
from pytest_mnnvl.managers.reference import ReferenceManager


class KeepsNewOnBarrierFailure(ReferenceManager):
    """The reference, except that a failure after the build lets the new handle go without releasing it."""

    def _rebuild(self, target, top_k, num_experts):
        new = self._build(target, top_k, num_experts)
        old = self.moe_alltoall
        self._quiesce()
        self._barrier()
        self._commit(new, target, top_k, num_experts)
        if old is not None:
            self._retire(old, keep=new)
'''


def _run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, manager: str, *extra: str) -> pytest.RunResult:
    pytester.makepyfile(keeps_new=KEEPS_NEW)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pytester.path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    return pytester.runpytest_subprocess(
        "-p",
        "pytest_mnnvl",
        "-p",
        "no:randomly",
        f"{SUITE}::test_failed_rebuild_consistent",
        f"--mnnvl-manager={manager}",
        "--mnnvl-backend=sim",
        "--mnnvl-world-sizes=2",
        "--mnnvl-pp=1",
        *extra,
        timeout=240,
    )


def test_a_workspace_left_behind_by_a_failed_barrier_is_reported(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = pytester.path / "report.json"
    result = _run(pytester, monkeypatch, "keeps_new:KeepsNewOnBarrierFailure", f"--mnnvl-report={report}")
    result.assert_outcomes(xfailed=1)
    verdict = json.loads(report.read_text())["invariants"]["failed_rebuild_consistent"]
    assert verdict["status"] == "fail", verdict
    assert "the new workspace was left in" in verdict["counterexample"]["detail"], verdict["counterexample"]
    strict = _run(pytester, monkeypatch, "keeps_new:KeepsNewOnBarrierFailure", "--mnnvl-strict")
    strict.assert_outcomes(failed=1)
    strict.stdout.fnmatch_lines(["*FailedRebuildViolation*barrier after a successful build failed*"])


def test_the_reference_releases_the_new_workspace_when_its_barrier_fails(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run(pytester, monkeypatch, "reference", "--mnnvl-strict").assert_outcomes(passed=1)
