"""``--mnnvl-waivers``: the file's validation (each error names the file, entry and value), the semantics on
plain tests (cheap subprocesses, no rank worlds), and three runs of the real conformance suite with a mutant
and the reference on one invariant, which pin the exit codes README documents."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

import pytest

from pytest_mnnvl.conformance import waivers
from pytest_mnnvl.errors import MnnvlUsageError

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "conformance" / "test_invariants.py"
FUTURE = "2999-12-31"
PAST = "2000-01-01"
OK = {"invariant": "covers", "reason": "known", "expires": FUTURE}


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _json(tmp_path: Path, *entries: dict[str, Any], name: str = "w.json") -> str:
    return _write(tmp_path, name, json.dumps({"waivers": list(entries)}))


# ---- the file ------------------------------------------------------------------------------------

BAD_ENTRIES = [
    ({"invariant": "no_shrnk", "reason": "r", "expires": FUTURE}, "invariant='no_shrnk' is not known; allowed: covers"),
    ({"invariant": "covers", "expires": FUTURE}, "'reason' is missing; allowed: a non-empty string"),
    ({"invariant": "covers", "reason": "  ", "expires": FUTURE}, "reason='  ' is not valid; allowed: a non-empty"),
    ({"invariant": "covers", "reason": "r"}, "'expires' is missing; allowed: a date YYYY-MM-DD"),
    ({**OK, "expires": "2026-13-01"}, "expires='2026-13-01' is not a valid date; allowed: YYYY-MM-DD"),
    ({**OK, "expires": "next week"}, "expires='next week' is not a valid date; allowed: YYYY-MM-DD"),
    ({**OK, "expires": 20270101}, "expires=20270101 is not a valid date"),
    ({**OK, "reson": "typo"}, "unknown key 'reson'; allowed: invariant, test, manager, reason, expires, issue"),
    ({**OK, "test": "x"}, "has both of 'invariant' and 'test'; allowed: exactly one of them"),
    ({"reason": "r", "expires": FUTURE}, "has neither of 'invariant' and 'test'; allowed: exactly one"),
    ({**OK, "manager": ""}, "manager='' is not valid; allowed: a manager spec glob"),
    ({**OK, "issue": ["x"]}, "issue=['x'] is not valid; allowed: a non-empty URL or id"),
    ({"test": 3, "reason": "r", "expires": FUTURE}, "test=3 is not valid; allowed: a node id or node id glob"),
]


@pytest.mark.parametrize("entry,message", BAD_ENTRIES)
def test_bad_entries_name_the_file_entry_and_value(tmp_path: Path, entry: dict[str, Any], message: str) -> None:
    path = _json(tmp_path, OK, entry)  # the second entry: the message must say waivers[1]
    with pytest.raises(MnnvlUsageError) as info:
        waivers.load(path)
    assert str(info.value).startswith(f"--mnnvl-waivers={path}: waivers[1]"), info.value
    assert message in str(info.value)


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("w.json", '{"waivers": [\n  {"invariant": "covers",}\n]}', "not valid JSON: Expecting property name"),
        ("w.json", '{"waivers": [\n  {"invariant": "covers",}\n]}', "at line 2, column 26"),
        (
            "w.toml",
            '[[waivers]]\ninvariant = "covers"\nreason = \n',
            "not valid TOML: Invalid value (at line 3, column",
        ),
        ("w.json", "[]", "the top level is a list; allowed: an object with a 'waivers' list"),
        ("w.json", "{}", "'waivers' is missing; allowed: a list of entries"),
        ("w.json", '{"waivers": {}}', "'waivers' is an object; allowed: a list of entries"),
        ("w.json", '{"waivers": [], "version": 1}', "unknown top-level key 'version'; allowed: waivers"),
        ("w.json", '{"waivers": ["covers"]}', "waivers[0] is a string; allowed: an object with keys invariant"),
        ("w.yaml", "waivers: []", "extension '.yaml' is not valid; allowed: .json, .toml"),
        (
            "w.toml",
            '[[waivers]]\ninvariant = "covers"\nreason = "r"\nexpires = 2027-01-01T10:00:00\n',
            "waivers[0]: expires=datetime.datetime(2027, 1, 1, 10, 0) is not a valid date",
        ),
    ],
)
def test_bad_files_name_the_file_and_what_is_wrong(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = _write(tmp_path, name, text)
    with pytest.raises(MnnvlUsageError) as info:
        waivers.load(path)
    assert str(info.value).startswith(f"--mnnvl-waivers={path}: "), info.value
    assert message in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "w.json").write_bytes(b'{"waivers": []}\xff')
    with pytest.raises(MnnvlUsageError, match=r"w\.json: not UTF-8 \(invalid start byte at byte 15\)"):
        waivers.load(str(tmp_path / "w.json"))


def test_unreadable_file(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.json")
    with pytest.raises(MnnvlUsageError, match=r"missing\.json: cannot read the file \(No such file or directory\)"):
        waivers.load(path)


def test_json_and_toml_give_the_same_waivers(tmp_path: Path) -> None:
    entries = [
        {"invariant": "no_shrink", "manager": "mutant:*", "reason": "r1", "expires": FUTURE, "issue": "BUG-1"},
        {"test": "conformance/*::test_cleanup*", "reason": "r2", "expires": PAST},
    ]
    toml = (
        '[[waivers]]\ninvariant = "no_shrink"\nmanager = "mutant:*"\nreason = "r1"\nexpires = 2999-12-31\n'
        'issue = "BUG-1"\n\n[[waivers]]\ntest = "conformance/*::test_cleanup*"\nreason = "r2"\n'
        'expires = "2000-01-01"\n'
    )
    from_json = waivers.load(_json(tmp_path, *entries))
    assert waivers.load(_write(tmp_path, "w.toml", toml)) == from_json
    first, second = from_json
    assert first.expires == datetime.date(2999, 12, 31) and second.manager == "*" and second.issue is None
    assert first.xfail_reason() == "waived: r1 (expires 2999-12-31, BUG-1)"
    assert second.xfail_reason() == "waived: r2 (expires 2000-01-01)"


def test_matching() -> None:
    today = datetime.date(2026, 6, 1)
    by_invariant = waivers.Waiver(0, "r", today, invariant="no_shrink", manager="mutant:*")
    by_test = waivers.Waiver(1, "r", today, test="conformance/test_invariants.py::test_covers[ws2-pp1]")
    by_glob = waivers.Waiver(2, "r", today, test="*::test_covers*")
    node = "conformance/test_invariants.py::test_covers[ws2-pp1]"
    assert by_invariant.matches("x", "no_shrink", "mutant:shrink_to_current")
    assert not by_invariant.matches("x", "no_shrink", "reference")
    assert not by_invariant.matches("x", "covers", "mutant:shrink_to_current")
    # An exact parametrized id matches although "[ws2-pp1]" would be a character class as a glob.
    assert by_test.matches(node, "covers", "reference")
    assert not by_test.matches(node.replace("ws2", "ws4"), "covers", "reference")
    assert by_glob.matches(node.replace("ws2", "ws4"), None, "reference")
    # Valid through the expiry day.
    assert not by_invariant.expired(today) and by_invariant.expired(today + datetime.timedelta(days=1))


# ---- the options ---------------------------------------------------------------------------------


def test_bad_waiver_file_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    path = _json(pytester.path, {"invariant": "no_such", "reason": "r", "expires": FUTURE})
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl", f"--mnnvl-waivers={path}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--mnnvl-waivers={path}: waivers[[]0[]]: invariant='no_such' is not known*"])


PLAIN_TESTS = """
import pytest

def test_fails(): assert 1 == 2
def test_passes(): pass
def test_other_fails(): raise RuntimeError("boom")
def test_skips(): pytest.skip("no")
"""


def test_waivers_on_plain_tests_and_ini_twin_relative_to_the_ini_file(pytester: pytest.Pytester) -> None:
    """Test-id waivers work on any test: fail → xfail with the reason, pass → stale, expired → fails,
    a skip only → unused. The ini twin's path is relative to the ini file, not to the working directory."""
    pytester.makepyfile(PLAIN_TESTS)
    sub = pytester.mkdir("ci")
    _json(
        sub,
        {"test": "*::test_fails", "reason": "known bug", "expires": FUTURE, "issue": "BUG-7"},
        {"test": "*::test_passes", "reason": "was flaky", "expires": FUTURE},
        {"test": "*::test_other_fails", "reason": "old", "expires": PAST},
        {"test": "*::test_skips", "reason": "r", "expires": FUTURE},
        {"test": "*::test_fails", "manager": "vllm", "reason": "other manager", "expires": FUTURE},
    )
    (sub / "pytest.ini").write_text("[pytest]\nmnnvl_waivers = w.json\n")
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl", "-c", "ci/pytest.ini", "-rfx", str(pytester.path))
    result.assert_outcomes(passed=1, failed=1, skipped=1, xfailed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*= mnnvl waivers =*",
            "*ci/w.json: 1 applied, 1 stale, 1 expired, 2 unused",
            "waivers[[]0[]] test *::test_fails (manager *): applied to 1 test: known bug (expires 2999-12-31, BUG-7)",
            "waivers[[]1[]] test *::test_passes (manager *): stale: no longer needed, 1 matching test passed*",
            "waivers[[]2[]] test *::test_other_fails (manager *): expired waiver ignored (expired 2000-01-01)*",
            "waivers[[]3[]] test *::test_skips (manager *): unused: no matching test passed or failed",
            "waivers[[]4[]] test *::test_fails (manager vllm): unused*",
            "FAILED *::test_other_fails*",
            "XFAIL *::test_fails - waived: known bug (expires 2999-12-31, BUG-7)",
        ]
    )
    assert "ERROR: --mnnvl-strict" not in result.stdout.str()  # stale is informational without strict


def test_stale_waiver_under_strict_exits_6_unless_something_failed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(PLAIN_TESTS)
    path = _json(
        pytester.path,
        {"test": "*::test_passes", "reason": "was flaky", "expires": FUTURE},
        {"test": "*::test_fails", "reason": "known", "expires": FUTURE},
    )
    args = ("-p", "pytest_mnnvl", f"--mnnvl-waivers={path}", "--mnnvl-strict")
    result = pytester.runpytest_subprocess(*args, "-k", "not skips and not other")
    result.assert_outcomes(passed=1, xfailed=1)
    assert result.ret == waivers.STALE_EXIT == 6
    result.stdout.fnmatch_lines(
        ["*stale: no longer needed*", "ERROR: --mnnvl-strict: 1 stale waiver(s); exit status 6*"]
    )
    # A real failure wins: 1, not 6.
    result = pytester.runpytest_subprocess(*args, "-k", "not skips")
    result.assert_outcomes(passed=1, failed=1, xfailed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED


# ---- the conformance suite -----------------------------------------------------------------------


def _suite(
    pytester: pytest.Pytester, manager: str, target: str, *extra: str
) -> tuple[pytest.RunResult, dict[str, Any]]:
    report = pytester.path / "report.json"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    result = pytester.runpytest_subprocess(
        "-p",
        "pytest_mnnvl",
        f"{SUITE}{target}",
        f"--mnnvl-manager={manager}",
        f"--mnnvl-report={report}",
        "--mnnvl-backend=sim",
        "--mnnvl-world-sizes=2",
        "--mnnvl-pp=1",
        "-rx",
        "-p",
        "no:randomly",
        *extra,
        timeout=300,
    )
    data = json.loads(report.read_text()) if report.exists() else {}
    return result, data


needs_suite = pytest.mark.skipif(not SUITE.exists(), reason="the conformance suite is not in this checkout")


@needs_suite
def test_suite_waived_must_violation_exits_0_and_keeps_the_violation(pytester: pytest.Pytester) -> None:
    path = _json(
        pytester.path,
        {"invariant": "no_shrink", "manager": "mutant:shrink_*", "reason": "shrinks on purpose", "expires": FUTURE},
        {"test": "*::test_no_shrink[[]ws2-pp1]", "reason": "same, by id", "expires": FUTURE, "issue": "BUG-2"},
        {"invariant": "covers", "reason": "not run here", "expires": FUTURE},
    )
    result, data = _suite(pytester, "mutant:shrink_to_current", "::test_no_shrink", f"--mnnvl-waivers={path}")
    result.assert_outcomes(xfailed=1)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        [
            "MUST   no_shrink                  waived",
            "*: 2 applied, 0 stale, 0 expired, 1 unused",
            "XFAIL *::test_no_shrink[[]ws2-pp1[]] - waived: shrinks on purpose (expires 2999-12-31)",
        ]
    )
    verdict = data["invariants"]["no_shrink"]
    assert verdict["status"] == "waived" and verdict["violated"] == ["no_shrink"], verdict
    assert verdict["counterexample"]["invariant"] == "no_shrink"
    assert verdict["tests"][0]["waived"].startswith("waived: shrinks on purpose")
    assert [e["status"] for e in data["waivers"]["entries"]] == ["applied", "applied", "unused"]
    node = verdict["tests"][0]["nodeid"]
    assert data["waivers"]["entries"][1]["tests"] == {node: "waived"}
    assert data["exit_status"] == 0
    assert "waived" in (pytester.path / "report.md").read_text()


@needs_suite
def test_suite_expired_or_other_manager_waiver_does_not_apply(pytester: pytest.Pytester) -> None:
    path = _json(
        pytester.path,
        {"invariant": "no_shrink", "reason": "old", "expires": PAST},
        {"invariant": "no_shrink", "manager": "vllm", "reason": "another manager", "expires": FUTURE},
    )
    result, data = _suite(pytester, "mutant:shrink_to_current", "::test_no_shrink", f"--mnnvl-waivers={path}")
    result.assert_outcomes(failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["MUST   no_shrink                  fail", "*expired waiver ignored*"])
    assert data["invariants"]["no_shrink"]["status"] == "fail"
    assert [e["status"] for e in data["waivers"]["entries"]] == ["expired", "unused"]
    assert list(data["waivers"]["entries"][0]["tests"].values()) == ["failed"]
    assert data["exit_status"] == 1


@needs_suite
def test_suite_stale_waiver_on_the_reference_exits_6_under_strict(pytester: pytest.Pytester) -> None:
    path = _json(pytester.path, {"test": "*::test_no_shrink*", "reason": "was broken", "expires": FUTURE})
    result, data = _suite(pytester, "reference", "::test_no_shrink", f"--mnnvl-waivers={path}", "--mnnvl-strict")
    result.assert_outcomes(passed=1)
    assert result.ret == waivers.STALE_EXIT
    result.stdout.fnmatch_lines(["MUST   no_shrink                  pass", "*stale: no longer needed*"])
    assert [e["status"] for e in data["waivers"]["entries"]] == ["stale"]
    assert data["exit_status"] == waivers.STALE_EXIT


@needs_suite
def test_suite_with_no_tests_exits_5(pytester: pytest.Pytester) -> None:
    path = _json(pytester.path, OK)
    result, _ = _suite(pytester, "reference", "", f"--mnnvl-waivers={path}", "-k", "no_such_test")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED


def test_the_shipped_example_is_valid() -> None:
    example = REPO / "examples" / "ci" / "waivers.json"
    assert [w.target for w in waivers.load(str(example))] == [
        "invariant frees_superseded",
        "invariant mismatch_survives_O",
        "test conformance/test_invariants.py::test_covers[ws4-pp2]",
    ]
