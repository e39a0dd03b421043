"""Proof that the conformance suite works: the reference passes it and every mutant fails it, on the
invariant its ``mnnvl_invariant`` names (read from the suite's JSON report).

Each run is a pytest subprocess on the sim backend (``MNNVL_MATRIX_BACKEND=flashinfer`` on GPUs) with the
``ci`` profile. To fit CI, a mutant
runs only its named invariant's test, on 2 ranks, or on 4 ranks in 2 PP stages where the defect
needs PP (collective scope, deadlock freedom). The runs are independent parametrized cases, so
``-n 2`` splits them. ``MNNVL_MATRIX_OUT=DIR`` also writes the mutation matrix (JSON + Markdown).
``MNNVL_MATRIX_TOPOLOGIES=all`` runs every mutant on each of ws2-pp1, ws4-pp1 and ws4-pp2 instead (a defect
that needs PP is run only where there is PP): the full GPU matrix, ~3× the time. ``MNNVL_MATRIX_ARGS`` adds
options to every suite run (on a one-GPU box: ``--mnnvl-ranks-per-gpu=auto --mnnvl-mps=off``).

The matrix is the installed FlashInfer release's (``.venv`` 0.7.2.post1, ``.venv074`` 0.7.4): a mutant runs
on the invariant it names for that release (``Mutant.invariant_on``), and a mutant whose defect cannot exist
there is not run, only shown refused with its reason (a row ``n/a``, never counted as killed).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_mnnvl.managers import MUTANT_NAMES
from pytest_mnnvl.managers.mutants import MUTANTS
from pytest_mnnvl.model import releases

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "conformance" / "test_invariants.py"
#: Invariants whose defects only show with more than one PP stage.
NEEDS_PP = ("collective_scope", "pp_deadlock_freedom")
#: (world size, PP) of every topology the full matrix runs a mutant on.
ALL_TOPOLOGIES = ((2, 1), (4, 1), (4, 2))


def topologies_for(invariant: str, *also: str) -> list[tuple[int, int]]:
    """Where a mutant of ``invariant`` runs: its one default topology, or every topology where the defect can
    show under ``MNNVL_MATRIX_TOPOLOGIES=all``. The defect needs PP when any of ``invariant`` and ``also``
    (the invariant it names on another release) does."""
    mode = os.environ.get("MNNVL_MATRIX_TOPOLOGIES", "default")
    if mode not in ("default", "all"):
        raise ValueError(f"MNNVL_MATRIX_TOPOLOGIES={mode!r}: allowed values are 'default' and 'all'")
    needs_pp = any(name in NEEDS_PP for name in (invariant, *also))
    if mode == "default":
        return [(4, 2) if needs_pp else (2, 1)]
    return [(ws, pp) for ws, pp in ALL_TOPOLOGIES if pp > 1 or not needs_pp]


RELEASE = releases.current()
APPLICABLE = [name for name in MUTANT_NAMES if MUTANTS[name].applies_to(RELEASE)]
NOT_APPLICABLE = [name for name in MUTANT_NAMES if not MUTANTS[name].applies_to(RELEASE)]


def invariant_of(name: str) -> str:
    invariant = MUTANTS[name].invariant_on(RELEASE)
    assert invariant is not None, name
    return invariant


MATRIX = [
    (name, ws, pp)
    for name in APPLICABLE
    for ws, pp in topologies_for(invariant_of(name), MUTANTS[name].mnnvl_invariant)
]

pytestmark = pytest.mark.skipif(not SUITE.exists(), reason="the conformance suite is not in this checkout")


def run_suite(
    pytester: pytest.Pytester, manager: str, invariant: str | None, topology: tuple[int, int] | None = None
) -> tuple[int, dict[str, Any], float]:
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
    if topology is not None:
        args += [f"--mnnvl-world-sizes={topology[0]}", f"--mnnvl-pp={topology[1]}"]
    args += shlex.split(os.environ.get("MNNVL_MATRIX_ARGS", ""))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    t0 = time.monotonic()
    result = pytester.runpytest_subprocess(*args, timeout=300)
    seconds = time.monotonic() - t0
    assert report.exists(), result.stdout.str()[-3000:] + result.stderr.str()[-2000:]
    return int(result.ret), json.loads(report.read_text()), seconds


def _record(row: dict[str, Any]) -> None:
    row = {**row, "flashinfer": RELEASE}
    out = os.environ.get("MNNVL_MATRIX_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        all_topologies = os.environ.get("MNNVL_MATRIX_TOPOLOGIES") == "all"
        suffix = f"_{row['topology']}" if all_topologies and "topology" in row else ""
        (Path(out) / f"{row['manager'].replace(':', '_')}{suffix}.json").write_text(json.dumps(row, indent=2))


#: Skip reasons that say a topology could not run on this machine or was not asked for, not that the manager failed.
TOPOLOGY_SKIP = re.compile(r"no topology with PP > 1|needs \d+ GPUs")


def skipped_for_want_of_topology(report: dict[str, Any]) -> list[str]:
    """Invariants whose every test was skipped because the topology it needs cannot run here (a 2-GPU machine
    has no 4-rank world, so no PP > 1). On the sim every topology runs, and every invariant must pass."""
    return sorted(
        name
        for name, verdict in report["invariants"].items()
        if verdict["status"] == "skip"
        and verdict["tests"]
        and all(TOPOLOGY_SKIP.search(test.get("reason") or "") for test in verdict["tests"])
    )


def test_reference_passes_the_whole_suite(pytester: pytest.Pytester) -> None:
    ret, report, seconds = run_suite(pytester, "reference", None)
    statuses = {name: v["status"] for name, v in report["invariants"].items()}
    skipped = skipped_for_want_of_topology(report)
    _record(
        {
            "manager": "reference",
            "expected": "pass",
            "statuses": statuses,
            "topologies": report["topologies"],
            "skipped_for_want_of_topology": skipped,
            "exit": ret,
            "seconds": round(seconds, 1),
        }
    )
    assert ret == 0, statuses
    assert {status for name, status in statuses.items() if name not in skipped} == {"pass"}, statuses


@pytest.mark.parametrize(("name", "ws", "pp"), MATRIX, ids=[f"{n}-ws{ws}-pp{pp}" for n, ws, pp in MATRIX])
def test_mutant_is_killed_on_its_invariant(pytester: pytest.Pytester, name: str, ws: int, pp: int) -> None:
    invariant = invariant_of(name)
    ret, report, seconds = run_suite(pytester, f"mutant:{name}", invariant, (ws, pp))
    verdict = report["invariants"][invariant]
    violated = verdict["violated"]
    _record(
        {
            "manager": f"mutant:{name}",
            "topology": f"ws{ws}-pp{pp}",
            "expected": f"fail on {invariant}",
            "invariant": invariant,
            "release_note": MUTANTS[name].release_note(RELEASE),
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


@pytest.mark.parametrize("name", NOT_APPLICABLE)
def test_a_mutant_whose_defect_cannot_exist_is_refused(pytester: pytest.Pytester, name: str) -> None:
    """Not run, so never counted as killed: the suite refuses it at start-up (usage error) with the reason."""
    note = MUTANTS[name].release_note(RELEASE)
    t0 = time.monotonic()
    result = pytester.runpytest_subprocess(
        "-p", "pytest_mnnvl", str(SUITE), f"--mnnvl-manager=mutant:{name}", "-q", "-p", "no:randomly", timeout=120
    )
    seconds = time.monotonic() - t0
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*mutant:{name}*cannot exist on the installed FlashInfer {RELEASE}: *"])
    assert note in " ".join(result.stderr.str().split())
    _record(
        {
            "manager": f"mutant:{name}",
            "expected": "not applicable",
            "status": "n/a",
            "violated": [],
            "level": "-",
            "exit": int(result.ret),
            "seconds": round(seconds, 1),
            "detail": note,
        }
    )


def test_a_skip_is_excused_only_for_want_of_a_topology() -> None:
    def invariant(status: str, *reasons: str) -> dict[str, Any]:
        return {"status": status, "tests": [{"reason": reason} for reason in reasons]}

    report = {
        "invariants": {
            "covers": invariant("pass", ""),
            "pp_deadlock_freedom": invariant("skip", "Skipped: no topology with PP > 1 in --mnnvl-world-sizes"),
            "no_shrink": invariant("skip", "Skipped: one-sided all-to-all needs 4 GPUs, 2 visible to this process"),
            "cleanup": invariant("skip", "Skipped: the manager could not be loaded in the ranks"),
            "ep_symmetry": invariant("skip", "Skipped: needs 4 GPUs, 2 visible", "Skipped: this topology failed"),
        }
    }
    assert skipped_for_want_of_topology(report) == ["no_shrink", "pp_deadlock_freedom"]


def test_full_matrix_topologies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MNNVL_MATRIX_TOPOLOGIES", "all")
    assert topologies_for("covers") == [(2, 1), (4, 1), (4, 2)]
    assert topologies_for("collective_scope") == [(4, 2)]
    assert topologies_for("covers", "collective_scope") == [(4, 2)]  # a defect that needs PP on any release
    monkeypatch.setenv("MNNVL_MATRIX_TOPOLOGIES", "some")
    with pytest.raises(ValueError, match="'some': allowed values are 'default' and 'all'"):
        topologies_for("covers")
    monkeypatch.delenv("MNNVL_MATRIX_TOPOLOGIES")
    assert topologies_for("covers") == [(2, 1)]
    assert topologies_for("pp_deadlock_freedom") == [(4, 2)]
