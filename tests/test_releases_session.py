"""An installed FlashInfer that is none of the supported releases: one message per session, never a traceback per test.

The other release is put first on ``PYTHONPATH`` as a ``flashinfer_python-9.9.9.dist-info`` folder holding only its
``METADATA``: that folder is exactly what ``importlib.metadata`` reads to tell the installed version (the first one
on ``sys.path`` wins), so the inner session sees FlashInfer 9.9.9 the way it would see a real wheel of it; the
package's files stay the venv's. This needs no network (a real wheel installed with ``pip install --no-deps --target``
behaves the same: the README's "FlashInfer releases" section says how it was checked).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_mnnvl.model import releases

OTHER = "9.9.9"
SUPPORTED_TEXT = f"supported releases are {', '.join(releases.SUPPORTED)}"

RANK_FNS = """
def rank(ctx):
    return ctx.rank
"""
WORLD_TESTS = """
import rankfns


def test_sim_world(mnnvl_world):
    assert mnnvl_world(2).run(rankfns.rank) == [0, 1]


def test_another_sim_world(mnnvl_world):
    assert mnnvl_world(2).run(rankfns.rank) == [0, 1]


def test_without_a_world():
    pass
"""


@pytest.fixture
def other_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``PYTHONPATH`` starts with a folder in which ``flashinfer-python`` is release :data:`OTHER`."""
    site = tmp_path / "other-flashinfer"
    info = site / f"flashinfer_python-{OTHER}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: flashinfer-python\nVersion: {OTHER}\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    return site


def test_the_header_says_unsupported_and_every_world_test_skips_with_one_reason(
    rank_tester: pytest.Pytester, other_release: Path
) -> None:
    rank_tester.makepyfile(rankfns=RANK_FNS, test_worlds=WORLD_TESTS)
    result = rank_tester.runpytest_subprocess("-rs", "--mnnvl-backend=sim", timeout=120)
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(
        [
            f"mnnvl: FlashInfer: {OTHER} (*; UNSUPPORTED: pytest-mnnvl supports {', '.join(releases.SUPPORTED)})",
            f"SKIPPED [[]1[]] test_worlds.py:*: FlashInfer '{OTHER}' is not supported by pytest-mnnvl: "
            f"{SUPPORTED_TEXT}; it *'s *. FlashInfer worlds (sim, GPU) need a supported release: "
            f"pip install --no-deps flashinfer-python=={releases.V074}",
        ]
    )
    skips = [line for line in result.outlines if line.startswith("SKIPPED")]
    assert len(skips) == 2 and len({line.split(": ", 1)[1] for line in skips}) == 1, skips
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_the_conformance_suite_stops_at_configure_with_one_usage_error(
    pytester: pytest.Pytester, other_release: Path, xdist: list[str]
) -> None:
    result = pytester.runpytest_subprocess(
        "-p", "pytest_mnnvl", "-p", "no:cacheprovider", "--pyargs", "pytest_mnnvl.conformance", *xdist, timeout=120
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.strip()]
    assert len(errors) == 1, result.errlines
    assert errors[0].startswith(f"ERROR: FlashInfer '{OTHER}' is not supported by pytest-mnnvl: {SUPPORTED_TEXT}; ")
    assert errors[0].endswith(f"pip install --no-deps flashinfer-python=={releases.V074}")
    assert "Traceback" not in result.stdout.str()


def test_the_cli_refuses_an_unsupported_release_as_an_input_error(other_release: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest_mnnvl", "explain", "kimi-k2-fp8"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout == ""
    assert out.stderr.startswith(
        f"python -m pytest_mnnvl explain: error: FlashInfer '{OTHER}' is not supported by pytest-mnnvl: "
        f"{SUPPORTED_TEXT}; "
    )
    assert out.stderr.count("\n") == 1, out.stderr


def test_a_supported_release_gets_no_note_and_no_refusal() -> None:
    """The other side of the check: neither supported release is refused, nor a missing FlashInfer."""
    assert [releases.header_note(r) for r in (*releases.SUPPORTED, None)] == ["", "", ""]
    assert releases.header_note(OTHER) == f"; UNSUPPORTED: pytest-mnnvl supports {', '.join(releases.SUPPORTED)}"
