"""``benchmarks/gpu_suite.sh``, the GPU runners' step list, dry-run on the sim: a wrong step name is refused with
the list of steps before a device call is wasted on it, and a spent budget starts no step."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.sh"


def run(out: Path, *steps: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "MNNVL_BACKEND": "sim", "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.run(
        ["bash", str(SCRIPT), str(out), *steps], capture_output=True, text=True, cwd=ROOT, env=environ, timeout=120
    )


def test_an_unknown_step_is_refused_with_the_steps_allowed(tmp_path: Path) -> None:
    result = run(tmp_path, "benchmark")
    assert result.returncode == 2
    assert "unknown step 'benchmark'" in result.stderr
    for step in ("bench", "threads", "mutants", "fidelity", "vllm"):
        assert f" {step}" in result.stderr


def test_no_step_starts_once_the_budget_is_spent(tmp_path: Path) -> None:
    result = run(tmp_path, "bench", "threads", MNNVL_SUITE_BUDGET="30")
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "steps.log").read_text()
    assert "=== bench not run: the 30s budget is spent" in log
    assert "=== threads not run: the 30s budget is spent" in log
