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
        "import json, sys; sys.path.insert(0, sys.argv[1]); from pytest_mnnvl import report; "
        "print(json.dumps(report.environment()))"
    )
    run = subprocess.run(
        [sys.executable, "-S", "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    env = json.loads(run.stdout)
    assert env["hypothesis"] is None  # no dist metadata was visible
    assert env["pytest_mnnvl"] == pytest_mnnvl.__version__
