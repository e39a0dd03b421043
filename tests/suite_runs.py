"""One way for the tests to run the conformance suite in a pytester subprocess and read its JSON report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "conformance" / "test_invariants.py"


def run_suite(
    pytester: pytest.Pytester,
    *targets: str,
    manager: str,
    backend: str = "sim",
    world_sizes: str = "2",
    pp: str = "1",
    timeout: float = 240,
) -> tuple[pytest.RunResult, dict[str, Any]]:
    """``pytest -p pytest_mnnvl TARGETS...`` (plain arguments: node ids and extra options) against ``manager`` on
    one topology; the result and the report, which every run must write (its absence is the failure shown)."""
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess(
        "-p",
        "pytest_mnnvl",
        "-p",
        "no:randomly",
        *targets,
        f"--mnnvl-manager={manager}",
        f"--mnnvl-backend={backend}",
        f"--mnnvl-world-sizes={world_sizes}",
        f"--mnnvl-pp={pp}",
        f"--mnnvl-report={report}",
        timeout=timeout,
    )
    assert report.exists(), result.stdout.str()[-3000:] + result.stderr.str()[-2000:]
    return result, json.loads(report.read_text())
