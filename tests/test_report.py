"""The conformance report's environment block: what a committed GPU report says it ran."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest_mnnvl

REPO = Path(__file__).resolve().parent.parent


def test_version_matches_the_project_metadata() -> None:
    declared = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert declared is not None
    assert pytest_mnnvl.__version__ == declared.group(1)


def test_environment_names_the_harness_version_from_a_source_tree(tmp_path: Path) -> None:
    """The GPU suite runs from an unpacked source tree with no dist metadata; its reports must still say which
    pytest-mnnvl wrote them. (A copy of the package alone, under ``-S``: no site-packages, no egg-info.)"""
    shutil.copytree(REPO / "pytest_mnnvl", tmp_path / "pytest_mnnvl", ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from pytest_mnnvl.conformance import report; "
        "print(json.dumps(report.environment()))"
    )
    run = subprocess.run(
        [sys.executable, "-S", "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    env = json.loads(run.stdout)
    assert env["hypothesis"] is None  # no dist metadata was visible
    assert env["pytest_mnnvl"] == pytest_mnnvl.__version__


def _data(**changes: object) -> dict[str, object]:
    """The smallest report :func:`report.markdown` renders (what ``report.build`` writes, fewer fields)."""
    data: dict[str, object] = {
        "manager": {"spec": "reference", "description": "the reference"},
        "backend": "sim",
        "topologies": ["ws2-pp1"],
        "strict": False,
        "hypothesis": {"profile": "ci", "seed": None},
        "examples_run": 0,
        "environment": {},
        "date": "2026-12-01T00:00:00+00:00",
        "timings": {"session_s": 1.0},
        "exit_status": 2,
        "interrupted": True,
        "interruption": {"signals": ["SIGTERM"], "reason": "KeyboardInterrupt: SIGTERM"},
        "invariants": {},
        "rebuilds": {"plan_runs": 0, "cache_hits": 0, "initialize_calls": 0, "rebuilds": 0, "max_size_per_rank": 0},
    }
    data.update(changes)
    return data


def test_write_replaces_the_files_whole_through_a_symlinked_path(tmp_path: Path) -> None:
    """Written through a temporary file and os.replace: the link itself stays a link, the file it points at
    gets the report, its mode is kept, and no temporary file is left."""
    from pytest_mnnvl.conformance import report

    real = tmp_path / "results" / "r.json"
    real.parent.mkdir()
    real.write_text("old")
    real.chmod(0o640)
    link = tmp_path / "r.json"
    link.symlink_to(real)
    report.write(str(link), _data())
    assert link.is_symlink() and json.loads(real.read_text())["interrupted"] is True
    assert oct(real.stat().st_mode & 0o777) == "0o640"
    assert "**interrupted** by SIGTERM" in (tmp_path / "r.md").read_text()
    assert sorted(p.name for p in real.parent.iterdir()) == ["r.json"]


def test_a_report_that_cannot_be_rendered_leaves_the_previous_one_whole(tmp_path: Path) -> None:
    """Both files are rendered before either is replaced: a failure in between leaves the old pair as it was
    (the old write truncated the JSON first, then failed on the Markdown)."""
    from pytest_mnnvl.conformance import report

    path = tmp_path / "r.json"
    report.write(str(path), _data())
    before = (path.read_text(), (tmp_path / "r.md").read_text())
    broken = _data(exit_status=0, interrupted=False)
    del broken["rebuilds"]  # the Markdown needs it
    try:
        report.write(str(path), broken)
    except KeyError:
        pass
    else:
        raise AssertionError("the broken report rendered")
    assert (path.read_text(), (tmp_path / "r.md").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]


def test_the_markdown_gives_the_counterexample_command_the_session_printed() -> None:
    """The command names the saved file, the manager and the EP size, as the terminal did (not a placeholder)."""
    command = "python -m pytest_mnnvl explain|repro /tmp/ce/c.json --manager mutant:first_call_wins --ep 2"
    violation = {
        "invariant": "covers",
        "level": "must",
        "detail": "round trip failed",
        "topology": "ws2-pp1",
        "stage": 0,
        "layer": 1,
        "layer_name": "bf16",
        "ranks": [0, 1],
        "expected": "ok",
        "observed": "error",
        "plan": {"stages": []},
        "plan_path": "/tmp/ce/c.json",
        "command": command,
    }
    invariants = {"covers": {"level": "must", "status": "fail", "tests": [], "counterexample": violation}}
    from pytest_mnnvl.conformance import report

    text = report.markdown(_data(invariants=invariants))
    assert f"- plan file: `/tmp/ce/c.json` (`{command}`)" in text
