"""A manager that imports in the controller but not in the ranks (a trimmed bundle missing a module, as
vLLM's bundle once was on a GPU image with sentencepiece): the first test fails with the ranks'
traceback (a manager error: no invariant is blamed), every later test skips on that failure instead of
importing again, and the report says why."""

from __future__ import annotations

import os

import pytest

from tests.suite_runs import SUITE, run_suite

pytestmark = pytest.mark.skipif(not SUITE.exists(), reason="the conformance suite is not in this checkout")

UNLOADABLE = '''
import os

if "PYTEST_MNNVL_RANK_BOOT" in os.environ:  # only inside a rank process
    with open(os.environ["ATTEMPTS_FILE"], "a") as attempts:
        attempts.write(f"{os.getpid()}\\n")
    raise ImportError("cannot import name 'SentencePieceBackend' (a module the bundle left out)")

from pytest_mnnvl.managers.reference import ReferenceManager


class Unloadable(ReferenceManager):
    """The reference, from a module that cannot be imported inside the ranks."""
'''


def test_a_manager_that_cannot_load_fails_once_and_skips_the_rest(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(unloadable_manager=UNLOADABLE)
    attempts = pytester.path / "attempts.txt"
    monkeypatch.setenv("ATTEMPTS_FILE", str(attempts))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pytester.path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    report = pytester.path / "report.json"
    targets = (f"{SUITE}::test_covers", f"{SUITE}::test_no_shrink", f"{SUITE}::test_cleanup")
    result, data = run_suite(pytester, *targets, manager="unloadable_manager:Unloadable")
    # A manager error, not an invariant's failure: pytest counts it as an error (JUnit <error>).
    result.assert_outcomes(errors=1, skipped=2)
    result.stdout.fnmatch_lines(
        [
            "*ImportError: cannot import name 'SentencePieceBackend'*",
            "*the manager could not be loaded in the ranks: ImportError: cannot import name 'SentencePieceBackend'*"
            "test_covers*every later test was skipped*",
        ]
    )
    # One import per rank of the one world; the skipped tests did not try again.
    assert len(attempts.read_text().split()) == 2
    assert data["manager_load_error"]["test"].endswith("test_covers[ws2-pp1]")
    assert "SentencePieceBackend" in data["manager_load_error"]["error"]
    assert "could not be loaded in the ranks" in report.with_suffix(".md").read_text()
