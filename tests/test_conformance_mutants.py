"""Proof that the conformance suite works: the reference passes it and every mutant fails it, on the
invariant its ``mnnvl_invariant`` names (read from the suite's JSON report).

Each run is a pytest subprocess on the sim backend (``MNNVL_MATRIX_BACKEND=flashinfer`` on GPUs) with the
``ci`` profile. To fit CI, a mutant
runs only its named invariant's test, on 2 ranks, or on 4 ranks in 2 PP stages where the defect
needs PP (collective scope, deadlock freedom). The runs are independent parametrized cases, so
``-n 2`` splits them. ``MNNVL_MATRIX_OUT=DIR`` also writes the mutation matrix (JSON + Markdown).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_mnnvl.managers import MUTANT_NAMES
from pytest_mnnvl.managers.mutants import MUTANTS

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "conformance" / "test_invariants.py"
#: Invariants whose defects only show with more than one PP stage.
NEEDS_PP = ("collective_scope", "pp_deadlock_freedom")

pytestmark = pytest.mark.skipif(not SUITE.exists(), reason="the conformance suite is not in this checkout")


def run_suite(pytester: pytest.Pytester, manager: str, invariant: str | None) -> tuple[int, dict[str, Any], float]:
    report = pytester.path / "report.json"
    target = str(SUITE) if invariant is None else f"{SUITE}::test_{invariant}"
    args = [
        "-p",
        "pytest_mnnvl",
        target,
        f"--mnnvl-manager={manager}",
        f"--mnnvl-report={report}",
        f"--mnnvl-backend={os.environ.get('MNNVL_MATRIX_BACKEND', 'sim')}",
        "-q",
        "-p",
        "no:randomly",
    ]
    if invariant is not None:
        ws, pp = ("4", "2") if invariant in NEEDS_PP else ("2", "1")
        args += [f"--mnnvl-world-sizes={ws}", f"--mnnvl-pp={pp}"]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    t0 = time.monotonic()
    result = pytester.runpytest_subprocess(*args, timeout=300)
    seconds = time.monotonic() - t0
    assert report.exists(), result.stdout.str()[-3000:] + result.stderr.str()[-2000:]
    return int(result.ret), json.loads(report.read_text()), seconds


def _record(row: dict[str, Any]) -> None:
    out = os.environ.get("MNNVL_MATRIX_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{row['manager'].replace(':', '_')}.json").write_text(json.dumps(row, indent=2))


def test_reference_passes_the_whole_suite(pytester: pytest.Pytester) -> None:
    ret, report, seconds = run_suite(pytester, "reference", None)
    statuses = {name: v["status"] for name, v in report["invariants"].items()}
    _record(
        {"manager": "reference", "expected": "pass", "statuses": statuses, "exit": ret, "seconds": round(seconds, 1)}
    )
    assert ret == 0, statuses
    assert set(statuses.values()) == {"pass"}, statuses


@pytest.mark.parametrize("name", MUTANT_NAMES)
def test_mutant_is_killed_on_its_invariant(pytester: pytest.Pytester, name: str) -> None:
    invariant = MUTANTS[name].mnnvl_invariant
    ret, report, seconds = run_suite(pytester, f"mutant:{name}", invariant)
    verdict = report["invariants"][invariant]
    violated = verdict["violated"]
    _record(
        {
            "manager": f"mutant:{name}",
            "expected": f"fail on {invariant}",
            "status": verdict["status"],
            "violated": violated,
            "level": verdict["level"],
            "exit": ret,
            "seconds": round(seconds, 1),
            "detail": (verdict["counterexample"] or {}).get("detail"),
        }
    )
    assert verdict["status"] == "fail", json.dumps(verdict, indent=1, default=str)[:3000]
    assert invariant in violated, violated
    if verdict["level"] == "must":
        assert ret == 1
