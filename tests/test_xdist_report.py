"""The conformance report under pytest-xdist is the report of the same run without it.

Each case runs the real suite in pytest subprocesses on the sim, once in one process (``-n 0``) and once on
two xdist workers (``-n 2``), and compares the JSON and Markdown reports field by field, the terminal's
``mnnvl conformance`` and ``mnnvl waivers`` sections, the outcomes and the exit status. The selection
spans two topologies, so each worker runs one (the suite schedules by topology) and the controller, which
runs no test, must merge both: on ws2-pp1 a MUST violation (first-call sizing: ``covers`` fails, its plan is
saved) and a waived SHOULD, on ws3-pp1 a manager error (its ``__init__`` refuses 3 ranks) after which the
rest of the topology is skipped, and a waiver file with an applied, a stale and an unused entry.

Left out of the comparison, and why: ``date`` and ``timings`` (wall clock), each test's ``duration_s``
(wall clock), and in a counterexample's ``plan_path`` and ``command`` the report directory (each run has
its own) and the run id ``YYYYmmdd-HHMMSS-PID`` (the start time and pid of the process that ran the test).
The saved plans themselves are compared whole.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "conformance" / "test_invariants.py"

pytestmark = pytest.mark.skipif(not SUITE.exists(), reason="the conformance suite is not in this checkout")

SPLIT_MANAGER = '''
import torch.distributed as dist

from pytest_mnnvl.managers.mutants import FirstCallWins


class FirstCallWinsNotOnThree(FirstCallWins):
    """Sizes the workspace from the first layer (a covers violation) and refuses EP groups of 3 ranks
    (a manager error on ws3-pp1)."""

    def __init__(self, cpu_group):
        if dist.get_world_size(cpu_group) == 3:
            raise RuntimeError("this manager cannot split its experts over 3 ranks")
        super().__init__(cpu_group)
'''

WAIVERS = {
    "waivers": [
        {"invariant": "covers_cross_product", "reason": "known total-need gap", "expires": "2099-01-01"},
        {"test": "*::test_shape_mismatch*", "reason": "fixed since", "expires": "2099-01-01"},
        {"invariant": "cleanup", "reason": "not selected", "expires": "2099-01-01"},
    ]
}

#: A plugin (``-p kills_its_worker``) that kills the xdist worker in the middle of one test (as the OOM killer would).
KILLS_ITS_WORKER = """
import os

def pytest_runtest_call(item):
    if os.environ.get("PYTEST_XDIST_WORKER") and item.name == "test_shape_mismatch[ws2-pp1-num_experts]":
        os._exit(9)
"""

#: The run id in saved plans' names: the session's start time and the pid of the process that ran the test.
RUN_ID = re.compile(r"-\d{8}-\d{6}-\d+\.json")


@dataclass
class Run:
    ret: int
    outcomes: dict[str, int]
    stdout: str
    data: dict[str, Any]
    markdown: str
    out: Path

    def sections(self) -> list[str]:
        """The ``mnnvl conformance`` and ``mnnvl waivers`` sections of the terminal, seconds left out."""
        lines, inside = [], False
        for line in self.stdout.splitlines():
            if re.match(r"^=+ (mnnvl conformance|mnnvl waivers) =+$", line):
                inside = True
            elif line.startswith("=") and line.endswith("="):
                inside = False
            if inside:
                lines.append(re.sub(r"\(\d+\.\d s\)", "(S s)", line))
        return lines


def run_suite(pytester: pytest.Pytester, workers: int, *args: str) -> Run:
    out = pytester.path / f"n{workers}"
    report = out / "report.json"
    result = pytester.runpytest_subprocess(
        "-p",
        "pytest_mnnvl",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        "-v",
        str(SUITE),
        "--mnnvl-backend=sim",
        f"--mnnvl-report={report}",
        "-n",
        str(workers),
        *args,
        timeout=300,
    )
    stdout = result.stdout.str()
    assert report.exists(), stdout[-3000:] + result.stderr.str()[-2000:]
    return Run(
        int(result.ret),
        # Deselected tests are counted where collection runs: only without xdist (its controller does not collect).
        {k: n for k, n in result.parseoutcomes().items() if k != "deselected"},
        stdout,
        json.loads(report.read_text()),
        report.with_suffix(".md").read_text(),
        out,
    )


def normalized(value: Any, out: Path) -> Any:
    """``value`` with the fields the module docstring names taken out or made run-independent."""
    if isinstance(value, dict):
        skip = {"date", "timings", "duration_s"}
        return {k: normalized(v, out) for k, v in value.items() if k not in skip}
    if isinstance(value, list):
        return [normalized(v, out) for v in value]
    if isinstance(value, str):
        return RUN_ID.sub("-RUNID.json", value.replace(str(out), "OUT"))
    return value


def normalized_markdown(text: str, out: Path) -> str:
    text = re.sub(r"- date: \S+; session [\d.]+ s;", "- date: D; session S s;", text)
    return RUN_ID.sub("-RUNID.json", text.replace(str(out), "OUT"))


def saved_plans(run: Run) -> dict[str, str]:
    return {RUN_ID.sub("-RUNID.json", p.name): p.read_text() for p in (run.out / "counterexamples").glob("*.json")}


@pytest.fixture
def both(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> tuple[Run, Run]:
    pytester.makepyfile(split_manager=SPLIT_MANAGER)
    (pytester.path / "waivers.json").write_text(json.dumps(WAIVERS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pytester.path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    args = (
        "-k",
        "covers or shape_mismatch",
        "--mnnvl-world-sizes=2,3",
        "--mnnvl-pp=1",
        "--mnnvl-manager=split_manager:FirstCallWinsNotOnThree",
        "--mnnvl-waivers=waivers.json",
    )
    return run_suite(pytester, 0, *args), run_suite(pytester, 2, *args)


def test_the_report_under_xdist_is_the_report_without_it(both: tuple[Run, Run]) -> None:
    alone, spread = both
    # What the run found (so that two empty reports could not agree): the same in both.
    for run in both:
        assert run.ret == 1, run.stdout[-3000:]
        assert run.outcomes == {"failed": 1, "errors": 1, "passed": 2, "skipped": 3, "xfailed": 1}, run.outcomes
        data = run.data
        assert data["exit_status"] == 1
        assert data["invariants"]["covers"]["status"] == "fail"
        assert data["invariants"]["covers"]["counterexample"]["invariant"] == "covers"
        assert data["invariants"]["covers_cross_product"]["status"] == "waived"
        assert data["invariants"]["shape_mismatch"]["status"] == "pass"
        assert data["failure_kinds"] == {"violation": 1, "manager_error": 1, "infrastructure": 0}
        assert data["broken_topologies"]["ws3-pp1"]["failure_kind"] == "manager_error"
        assert len(data["broken_topologies"]["ws3-pp1"]["skipped"]) == 3
        assert data["waivers"]["counts"] == {"applied": 1, "stale": 1, "expired": 0, "unused": 1}
        assert data["examples_run"] > 0 and data["rebuilds"]["plan_runs"] > 0
        assert data["manager"]["shape"] is not None
    # Both topologies ran, each on one worker of its own, and the controller reported both.
    ran_on: dict[str, set[str]] = {}
    for worker, topology in re.findall(r"^\[(gw\d+)\] .*\[(ws\d-pp1)", spread.stdout, re.MULTILINE):
        ran_on.setdefault(topology, set()).add(worker)
    assert sorted(ran_on) == ["ws2-pp1", "ws3-pp1"], spread.stdout[-3000:]
    assert all(len(w) == 1 for w in ran_on.values()) and ran_on["ws2-pp1"] != ran_on["ws3-pp1"], ran_on

    assert normalized(spread.data, spread.out) == normalized(alone.data, alone.out)
    assert normalized_markdown(spread.markdown, spread.out) == normalized_markdown(alone.markdown, alone.out)
    assert spread.sections() == alone.sections()
    assert any("manager error in " in line and "1 later test" not in line for line in spread.sections())
    plans = saved_plans(alone)
    assert plans and saved_plans(spread) == plans


def test_a_worker_that_dies_in_a_test_is_an_infrastructure_failure_of_that_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(kills_its_worker=KILLS_ITS_WORKER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pytester.path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    args = ("-p", "kills_its_worker", "-k", "ws2-pp1 and shape_mismatch", "--mnnvl-world-sizes=2", "--mnnvl-pp=1")
    run = run_suite(pytester, 2, *args)
    assert run.ret == 1
    assert run.outcomes == {"passed": 1, "failed": 1}, run.outcomes
    mismatch = run.data["invariants"]["shape_mismatch"]
    assert mismatch["status"] == "infrastructure"
    outcomes = {t["nodeid"].rpartition("::")[2]: t["outcome"] for t in mismatch["tests"]}
    assert outcomes == {
        "test_shape_mismatch[ws2-pp1-top_k]": "passed",
        "test_shape_mismatch[ws2-pp1-num_experts]": "failed",
    }
    (crashed,) = [t for t in mismatch["tests"] if t["outcome"] == "failed"]
    assert crashed["failure_kind"] == "infrastructure"
    assert "crashed while running" in crashed["failure"]["summary"]
    assert run.data["failure_kinds"]["infrastructure"] == 1
    assert any(line.startswith("infrastructure failure in ") for line in run.sections()), run.sections()


def test_dist_each_is_a_usage_error_and_splitting_modes_warn(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl", str(SUITE), "-n", "2", "--dist=each")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--dist=each runs every test on every worker, so the conformance report would count each test once per*"]
    )
    result = pytester.runpytest_subprocess(
        "-p", "pytest_mnnvl", str(SUITE), "-n", "2", "--dist=worksteal", "-k", "none"
    )
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    result.stdout.fnmatch_lines(["*--dist=worksteal may split one topology's conformance tests between workers*"])
