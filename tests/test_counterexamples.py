"""Saved counterexample plans: every session writes its own files, and the command it prints names them.

They were ``<invariant>-<topology>.json`` in one folder, so a second session (or a run against another manager)
overwrote the first one's plan, and the ``explain|repro`` command the first printed then ran someone else's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_mnnvl.model.layers import ModelPlan

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "conformance" / "test_invariants.py"

pytestmark = pytest.mark.skipif(not SUITE.exists(), reason="the conformance suite is not in this checkout")

SAVED = re.compile(
    r"minimal plan \(saved to (\S+); `python -m pytest_mnnvl explain\|repro (\S+) --manager (\S+) --ep (\d+)`\):"
)


def failing_session(pytester: pytest.Pytester, manager: str) -> tuple[Path, str, ModelPlan]:
    """One session of ``test_covers`` on ws2-pp1 against a mutant it kills: (saved path, manager, printed plan)."""
    result = pytester.runpytest_subprocess(
        "-p",
        "pytest_mnnvl",
        "-p",
        "no:randomly",
        f"{SUITE}::test_covers",
        f"--mnnvl-manager={manager}",
        "--mnnvl-backend=sim",
        "--mnnvl-world-sizes=2",
        "--mnnvl-pp=1",
        timeout=240,
    )
    result.assert_outcomes(failed=1)
    lines = [line.removeprefix("E").strip() for line in result.stdout.lines]
    found = [(i, SAVED.search(line)) for i, line in enumerate(lines)]
    found = [(i, m) for i, m in found if m is not None]
    assert found, result.stdout.str()[-4000:]
    index, match = found[-1]  # the final (shrunk) failure's message
    saved, in_command, spec, ep = match.groups()
    assert saved == in_command and spec == manager and ep == "2", match.group(0)
    return Path(saved), spec, ModelPlan.from_json(lines[index + 1])


@pytest.fixture
def temp_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The sessions' own temp dir (the default folder is in it), short: rank sockets live there too, and a
    Unix socket path may not be longer than 107 bytes."""
    temp = Path(tempfile.mkdtemp(prefix="mnnvl-ce-"))
    monkeypatch.setenv("TMPDIR", str(temp))
    yield temp
    shutil.rmtree(temp, ignore_errors=True)


def test_two_sessions_and_two_managers_save_distinct_plans_each_named_by_its_command(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, temp_dir: Path
) -> None:
    temp = temp_dir
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    runs = [failing_session(pytester, m) for m in ("mutant:first_call_wins",) * 2 + ("mutant:scale_bytes_left_out",)]
    paths = [path for path, _spec, _plan in runs]
    assert len(set(paths)) == 3, paths
    for path, spec, plan in runs:
        assert path.parent == temp / "pytest-mnnvl-counterexamples"
        assert path.name.startswith(f"covers-ws2-pp1-mutant-{spec.partition(':')[2]}-"), path.name
        # Each file still holds the plan its own session printed: nothing overwrote it.
        assert ModelPlan.load(path) == plan
    # The printed command runs on the file it names and finds the failure again.
    path, spec, _plan = runs[0]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, "-m", "pytest_mnnvl", "explain", str(path), "--manager", spec, "--ep", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=pytester.path,
    )
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]


def test_a_violation_repro_cannot_replay_offers_explain_and_says_what_to_rerun(pytester: pytest.Pytester) -> None:
    """A failed rebuild is injected by the check; repro only walks the plan, so the command the failure printed
    ran clean ("no failure", exit 0) on the mutant that failed it: it must not offer repro."""
    from tests.suite_runs import run_suite

    result, report = run_suite(
        pytester, f"{SUITE}::test_failed_rebuild_consistent", "--mnnvl-strict", manager="mutant:half_updated_on_failure"
    )
    assert result.ret == 1
    command = report["invariants"]["failed_rebuild_consistent"]["counterexample"]["command"]
    assert command.startswith("python -m pytest_mnnvl explain ") and "explain|repro" not in command
    why = "(repro does not inject the failed build or barrier this check injects: rerun this test to reproduce)"
    assert command.endswith(why)
    result.stdout.fnmatch_lines(["*minimal plan (saved to *; `python -m pytest_mnnvl explain *rerun this test*`):"])
