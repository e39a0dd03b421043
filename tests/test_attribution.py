"""Blame the right thing: a conformance failure is an invariant violation, a manager error or an
infrastructure failure, and the terminal, the JSON and Markdown reports, JUnit XML and the exit status agree.

Each case runs the real suite (one test, ws2-pp1, sim, the ``ci`` profile) in a pytest subprocess against a
manager defined here that breaks outside any invariant's check: its ``__init__`` raises, its ``initialize``
calls ``os._exit(3)``, segfaults, or SIGKILLs its own rank at the second layer (the OOM killer's way). Rule:
death by SIGKILL or SIGTERM comes from outside the manager (infrastructure); any other signal, an exit or an
exception in the ranks is the manager's. Neither saves a plan or names an invariant; only a violation does.
"""

from __future__ import annotations

import json
import os
import signal
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_mnnvl.errors import FailureKind, PythonFrame, RankCrashed, RankError, WorldDeadlock, WorldStartError

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "conformance" / "test_invariants.py"

pytestmark = pytest.mark.skipif(not SUITE.exists(), reason="the conformance suite is not in this checkout")

BAD_MANAGERS = '''
import ctypes
import os
import signal

from pytest_mnnvl.managers.reference import ReferenceManager


class InitRaises(ReferenceManager):
    def __init__(self, cpu_group):
        raise RuntimeError("manager __init__ broke")


class ExitsInInitialize(ReferenceManager):
    def initialize(self, *args, **kwargs):
        os._exit(3)


class SegfaultsInInitialize(ReferenceManager):
    def initialize(self, *args, **kwargs):
        ctypes.string_at(0)  # SEGFAULT LINE


class BuildsMoeAlltoAll(ReferenceManager):
    """Written for FlashInfer 0.7.2.post1: builds on ``flashinfer.comm.MoeAlltoAll``, which 0.7.4 removed."""

    def __init__(self, cpu_group):
        from flashinfer.comm import MoeAlltoAll  # noqa: F401

        super().__init__(cpu_group)


class OldDispatchKeyword(ReferenceManager):
    """Its own forward pass dispatches with 0.7.2's keyword ``max_tokens_per_rank`` (0.7.4: renamed)."""

    def mnnvl_dispatch(self, hidden_states, topk_ids, topk_weights):
        tokens = hidden_states.shape[0]
        return self.moe_alltoall.dispatch(hidden_states, topk_ids, topk_weights, max_tokens_per_rank=tokens)

    def mnnvl_combine(self, expert_output):
        return self.moe_alltoall.combine(expert_output)


class OomKilled(ReferenceManager):
    """Rank 1 is SIGKILLed at its second initialize, as the kernel's OOM killer would."""

    def initialize(self, *args, **kwargs):
        self.calls = getattr(self, "calls", 0) + 1
        if os.environ["PYTEST_MNNVL_RANK"] == "1" and self.calls == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().initialize(*args, **kwargs)
'''


@dataclass
class Run:
    ret: int
    stdout: str
    lines: pytest.LineMatcher
    outcomes: dict[str, int]
    data: dict[str, Any]
    markdown: str
    junit: ET.Element
    saved_plans: list[Path]


def run_suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, manager: str, *tests: str) -> Run:
    pytester.makepyfile(bad_managers=BAD_MANAGERS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pytester.path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    report = pytester.path / "out" / "report.json"
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess(
        "-p",
        "pytest_mnnvl",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        "-rs",
        *[f"{SUITE}::{test}" for test in tests or ("test_covers",)],
        f"--mnnvl-manager={manager}",
        "--mnnvl-backend=sim",
        "--mnnvl-world-sizes=2",
        "--mnnvl-pp=1",
        f"--mnnvl-report={report}",
        f"--junitxml={junit}",
        timeout=240,
    )
    saved = sorted((report.parent / "counterexamples").glob("*.json"))
    return Run(
        ret=int(result.ret),
        stdout=result.stdout.str(),
        lines=result.stdout,
        outcomes=result.parseoutcomes(),
        data=json.loads(report.read_text()),
        markdown=report.with_suffix(".md").read_text(),
        junit=ET.parse(junit).getroot(),
        saved_plans=saved,
    )


def covers_case(run: Run) -> ET.Element:
    (case,) = [c for c in run.junit.iter("testcase") if c.get("name") == "test_covers[ws2-pp1]"]
    return case


def assert_not_blamed_on_an_invariant(run: Run, kind: str, skipped: tuple[str, ...] = ()) -> dict[str, Any]:
    """The common verdict of a manager error or an infrastructure failure (``skipped``: the invariants whose
    tests were skipped after it); returns the test's JSON entry."""
    assert run.ret == 1, run.stdout[-3000:]
    assert run.outcomes.get("errors") == 1 and not run.outcomes.get("failed"), run.outcomes
    # The terminal: an ERROR, the kind in the verdict table, no invariant's exception, no plan.
    run.lines.fnmatch_lines(["*ERROR at call of test_covers[[]ws2-pp1[]]*"])
    run.lines.fnmatch_lines([f"MUST   covers * {kind}"])
    assert "Violation" not in run.stdout and "minimal plan" not in run.stdout, run.stdout[-3000:]
    # JSON: a typed kind on the test, the invariant's status, no counterexample anywhere.
    covers = run.data["invariants"]["covers"]
    (entry,) = covers["tests"]
    assert entry["failure_kind"] == kind
    assert "violation" not in entry
    assert covers["status"] == kind and covers["failure_kind"] == kind
    assert {n: v["counterexample"] for n, v in run.data["invariants"].items() if v["counterexample"]} == {}
    assert {n: v["status"] for n, v in run.data["invariants"].items() if n != "covers"} == {
        n: "skip" if n in skipped else "not_run" for n in run.data["invariants"] if n != "covers"
    }
    assert run.data["failure_kinds"] == {"violation": 0, "manager_error": 0, "infrastructure": 0, kind: 1}
    assert run.saved_plans == []
    # Markdown: the same status and the error, no counterexample section.
    assert f"| MUST | covers | **{kind}** |" in run.markdown
    assert "## Counterexamples" not in run.markdown
    assert "## Errors" in run.markdown
    # JUnit: an <error>, not a <failure>, and the suite's counts say so.
    case = covers_case(run)
    assert [child.tag for child in case if child.tag in ("error", "failure")] == ["error"]
    suite = run.junit if run.junit.tag == "testsuite" else run.junit.find("testsuite")
    assert suite is not None
    assert (suite.get("errors"), suite.get("failures")) == ("1", "0")
    return entry  # type: ignore[no-any-return]


def test_a_manager_whose_init_raises_is_a_manager_error_and_the_rest_is_skipped_naming_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = run_suite(pytester, monkeypatch, "bad_managers:InitRaises", "test_covers", "test_no_shrink")
    # The second test of the topology is skipped, and its reason names the first one's error.
    assert run.outcomes.get("skipped") == 1, run.outcomes
    entry = assert_not_blamed_on_an_invariant(run, "manager_error", skipped=("no_shrink",))
    assert "RuntimeError: manager __init__ broke" in entry["failure"]["summary"]
    run.lines.fnmatch_lines(
        [
            "*ManagerError: manager error (no invariant checked): 2 of 2 ranks raised*"
            "RuntimeError: manager __init__ broke*",
        ]
    )
    run.lines.fnmatch_lines(
        [
            "SKIPPED*not run: test_covers[[]ws2-pp1[]] ended in a manager error on ws2-pp1 (2 of 2 ranks raised*",
        ]
    )
    run.lines.fnmatch_lines(
        ["manager error in *test_covers[[]ws2-pp1[]]: 2 of 2 ranks raised*; 1 later test of ws2-pp1 skipped"]
    )


def test_a_manager_that_exits_in_initialize_is_a_manager_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = run_suite(pytester, monkeypatch, "bad_managers:ExitsInInitialize")
    entry = assert_not_blamed_on_an_invariant(run, "manager_error")
    run.lines.fnmatch_lines(["*ManagerError: manager error (no invariant checked): rank ? exited with code 3*"])
    assert "exited with code 3" in entry["failure"]["summary"]


def test_a_segfault_in_the_manager_names_its_python_frame(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = run_suite(pytester, monkeypatch, "bad_managers:SegfaultsInInitialize")
    entry = assert_not_blamed_on_an_invariant(run, "manager_error")
    source = (pytester.path / "bad_managers.py").read_text().splitlines()
    line = next(i for i, text in enumerate(source, 1) if "SEGFAULT LINE" in text)
    where = f"bad_managers.py:{line} in initialize"
    run.lines.fnmatch_lines(
        [
            f"*ManagerError: manager error (no invariant checked): rank ? was killed by SIGSEGV during run_plan() "
            f"at */{where}",
            "*Python stack of rank ? at SIGSEGV (most recent call first):",
            "*File *ctypes*, line * in string_at",
            f'*File "*/bad_managers.py", line {line} in initialize',
        ]
    )
    assert where in entry["failure"]["summary"]
    # The C backtrace that FlashInfer's FFI library prints is cut to a few lines.
    assert "Py_BytesMain" not in run.stdout and "native frames trimmed" in run.stdout


def test_a_rank_sigkilled_mid_plan_is_infrastructure(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = run_suite(pytester, monkeypatch, "bad_managers:OomKilled")
    entry = assert_not_blamed_on_an_invariant(run, "infrastructure")
    run.lines.fnmatch_lines(
        ["*InfrastructureError: infrastructure failure (not the manager's): rank 1 was killed by SIGKILL*"]
    )
    run.lines.fnmatch_lines(["infrastructure failure in *test_covers[[]ws2-pp1[]]: rank 1 was killed by SIGKILL*"])
    assert "SIGKILL" in entry["failure"]["summary"]


def test_a_violation_is_still_a_failure_with_its_plan(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = run_suite(pytester, monkeypatch, "mutant:first_call_wins")
    assert run.ret == 1
    assert run.outcomes.get("failed") == 1 and not run.outcomes.get("errors"), run.outcomes
    covers = run.data["invariants"]["covers"]
    assert covers["status"] == "fail" and covers["failure_kind"] == "violation"
    assert covers["tests"][0]["failure_kind"] == "violation"
    assert run.data["failure_kinds"] == {"violation": 1, "manager_error": 0, "infrastructure": 0}
    # One plan, named for its invariant, topology, manager and session (see tests/test_counterexamples.py).
    assert len(run.saved_plans) == 1, run.saved_plans
    assert run.saved_plans[0].name.startswith("covers-ws2-pp1-mutant-first_call_wins-"), run.saved_plans
    assert [child.tag for child in covers_case(run) if child.tag in ("error", "failure")] == ["failure"]


_HARNESS_FAULT_TB = (
    "Traceback (most recent call last):\n  ...\npytest_mnnvl.conformance.rank.HandleIdentityDisagrees: "
    "pytest-mnnvl harness fault: the live handle is the same object by identity but another by stamp"
)


@pytest.mark.parametrize(
    "error,kind",
    [
        (RankCrashed(1, -signal.SIGKILL, "fn()"), FailureKind.INFRASTRUCTURE),
        (RankCrashed(1, -signal.SIGTERM, "fn()"), FailureKind.INFRASTRUCTURE),
        (RankCrashed(1, None, "fn()"), FailureKind.INFRASTRUCTURE),  # torchrun: the exit status is not ours to see
        (RankCrashed(1, -signal.SIGSEGV, "fn()"), FailureKind.MANAGER_ERROR),
        (RankCrashed(1, -signal.SIGABRT, "fn()"), FailureKind.MANAGER_ERROR),
        (RankCrashed(1, 3, "fn()"), FailureKind.MANAGER_ERROR),
        (RankError({0: "Traceback ...\nValueError: x"}, 2), FailureKind.MANAGER_ERROR),
        # The suite's own cross-check (rank.same_handle) failing on every rank that raised: not the manager's.
        (RankError({0: _HARNESS_FAULT_TB, 1: _HARNESS_FAULT_TB}, 2), FailureKind.INFRASTRUCTURE),
        (RankError({0: _HARNESS_FAULT_TB, 1: "Traceback ...\nValueError: x"}, 2), FailureKind.MANAGER_ERROR),
        (WorldDeadlock(1.0, [1], {}, {}), FailureKind.MANAGER_ERROR),
        (WorldStartError("could not start"), FailureKind.INFRASTRUCTURE),
    ],
)
def test_the_rule_for_who_is_blamed(error: Exception, kind: FailureKind) -> None:
    from pytest_mnnvl.errors import failure_kind

    assert failure_kind(error) is kind  # type: ignore[arg-type]


def test_a_crash_names_the_innermost_frame_outside_the_python_library() -> None:
    import ctypes

    library = PythonFrame(ctypes.__file__, 519, "string_at")
    mine = PythonFrame("/src/vendor/manager.py", 20, "initialize")
    error = RankCrashed(0, -signal.SIGSEGV, "run_plan()", (library, mine, PythonFrame("/src/x.py", 1, "<module>")))
    assert str(error).splitlines()[0] == (
        "rank 0 was killed by SIGSEGV during run_plan() at /src/vendor/manager.py:20 in initialize"
    )


def _release() -> str:
    from pytest_mnnvl.model import releases

    return releases.current()


def test_a_manager_built_on_an_api_the_release_removed_is_one_compatibility_verdict(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On 0.7.4 ``from flashinfer.comm import MoeAlltoAll`` fails at build: one verdict line in the terminal, the
    JSON and the Markdown, the topology's other tests skipped naming it; on 0.7.2.post1 the same manager builds."""
    run = run_suite(pytester, monkeypatch, "bad_managers:BuildsMoeAlltoAll", "test_covers", "test_no_shrink")
    if _release() != "0.7.4":
        assert run.ret == 0 and run.outcomes.get("passed") == 2, run.stdout[-3000:]
        assert run.data["compatibility"] == []
        return
    verdict = (
        "bad_managers:BuildsMoeAlltoAll with FlashInfer 0.7.4: fails at build: "
        "flashinfer.comm has no MoeAlltoAll (removed in 0.7.4)"
    )
    assert run.outcomes.get("skipped") == 1, run.outcomes
    entry = assert_not_blamed_on_an_invariant(run, "manager_error", skipped=("no_shrink",))
    assert entry["failure"]["summary"] == verdict
    assert entry["failure"]["incompatibility"]["stage"] == "build"
    run.lines.fnmatch_lines([f"*ManagerError: incompatible (no invariant checked): {verdict}"])
    run.lines.fnmatch_lines([f"SKIPPED*not run: {verdict} (found by test_covers[[]ws2-pp1[]]); the rest of ws2-pp1*"])
    run.lines.fnmatch_lines([f"incompatible: {verdict} (ws2-pp1: 1 later test skipped); found by *test_covers*"])
    assert [(v["verdict"], v["topology"], v["skipped"]) for v in run.data["compatibility"]] == [(verdict, "ws2-pp1", 1)]
    assert f"**incompatible: {verdict} (ws2-pp1: 1 later test skipped)**" in run.markdown


def test_a_manager_whose_own_dispatch_uses_a_renamed_keyword_fails_at_dispatch(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The suite's round trip calls FlashInfer with the right keywords; the manager's own dispatch path
    (``mnnvl_dispatch``), run once per world, is what finds 0.7.2's ``max_tokens_per_rank`` on 0.7.4."""
    if _release() != "0.7.4":
        pytest.skip("the keyword was renamed in FlashInfer 0.7.4; this release is " + _release())
    run = run_suite(pytester, monkeypatch, "bad_managers:OldDispatchKeyword")
    verdict = (
        "bad_managers:OldDispatchKeyword with FlashInfer 0.7.4: fails at dispatch: NVLinkOneSidedAlltoAll.dispatch() "
        "got an unexpected keyword 'max_tokens_per_rank' (renamed runtime_max_tokens_per_rank in 0.7.4)"
    )
    entry = assert_not_blamed_on_an_invariant(run, "manager_error")
    assert entry["failure"]["summary"] == verdict
    assert run.data["compatibility"][0]["stage"] == "dispatch"
    run.lines.fnmatch_lines([f"incompatible: {verdict} (ws2-pp1: 0 later tests skipped); found by *test_covers*"])


def test_the_reference_manager_passes_with_its_own_dispatch_path_checked(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manager whose own path is right (the keyword of the installed release) is not blamed: the check
    can pass, and it judges the combine."""
    keyword = "runtime_max_tokens_per_rank" if _release() == "0.7.4" else "max_tokens_per_rank"
    pytester.makepyfile(
        good_path=f"""
        from pytest_mnnvl.managers.reference import ReferenceManager


        class RightKeyword(ReferenceManager):
            def mnnvl_dispatch(self, hidden_states, topk_ids, topk_weights):
                tokens = hidden_states.shape[0]
                return self.moe_alltoall.dispatch(hidden_states, topk_ids, topk_weights, {keyword}=tokens)

            def mnnvl_combine(self, expert_output):
                return self.moe_alltoall.combine(expert_output)
        """
    )
    if _release() != "0.7.4":
        pytest.skip("0.7.2.post1's MoeAlltoAll dispatches with another signature (no moe_ep handle to call)")
    run = run_suite(pytester, monkeypatch, "good_path:RightKeyword")
    assert run.ret == 0 and run.outcomes.get("passed") == 1, run.stdout[-3000:]
    assert run.data["compatibility"] == []


@pytest.mark.parametrize(
    "make,reason",
    [
        (
            lambda: ImportError(
                "cannot import name 'MoeAlltoAll' from 'flashinfer.comm' (/x.py)", name="flashinfer.comm"
            ),
            "flashinfer.comm has no MoeAlltoAll (removed in 0.7.4)",
        ),
        (
            lambda: ModuleNotFoundError(
                "No module named 'flashinfer.comm.trtllm_moe_alltoall'", name="flashinfer.comm.trtllm_moe_alltoall"
            ),
            "no module named flashinfer.comm.trtllm_moe_alltoall (removed in 0.7.4)",
        ),
        (lambda: ImportError("cannot import name 'x' from 'numpy' (/x.py)", name="numpy"), None),
        (lambda: ModuleNotFoundError("No module named 'PIL'", name="PIL"), None),
        (lambda: TypeError("f() got an unexpected keyword argument 'max_tokens_per_rank'"), None),
    ],
)
def test_what_counts_as_an_incompatibility(make: Any, reason: str | None) -> None:
    from pytest_mnnvl.managers.compat import Incompatibility, Stage, classify

    assert classify(make(), "0.7.4") == reason
    if reason is not None:
        line = Incompatibility("vllm 0.32.0", "0.7.4", Stage.BUILD, reason).line
        assert Incompatibility.parse(line) == Incompatibility("vllm 0.32.0", "0.7.4", Stage.BUILD, reason)
        assert Incompatibility.parse(f"2 of 2 ranks raised; rank 0: {line}") is None
