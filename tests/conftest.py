"""The plugin's own tests run pytest in subprocesses (pytester), like pytest-timeout and xdist do."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pytest_mnnvl.worlds.load import LoadBoard
    from pytest_mnnvl.worlds.pool import Pool

pytest_plugins = ["pytester"]

#: The test files whose outcome depends on the FlashInfer release (a word of their name says so): CI runs them
#: a second time on the other supported release (``-m flashinfer_release``; README "FlashInfer releases").
RELEASE_SENSITIVE_WORDS = ("sim", "sizing", "conformance", "cli", "v074", "releases")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "flashinfer_release: the outcome depends on the FlashInfer release (set from the file name)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        words = item.path.stem.split("_")[1:]  # test_sim_v074 -> sim, v074
        if any(word in RELEASE_SENSITIVE_WORDS for word in words):
            item.add_marker(pytest.mark.flashinfer_release)


@pytest.fixture(autouse=True)
def _not_an_xdist_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """When this suite itself runs under xdist, inner sessions and probes must not think they are workers."""
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_ci_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Inner sessions as on a developer's machine: Hypothesis loads its own derandomized ``ci`` profile when it
    sees any CI variable (the project's CI sets ``CI``); tests set ``CI`` again to check what CI runs."""
    from hypothesis._settings import _CI_VARS

    for name in _CI_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def rank_tester(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester whose inner sessions load pytest-mnnvl and keep rank output visible."""
    pytester.makeini("[pytest]\naddopts = -p pytest_mnnvl -p no:cacheprovider\n")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return pytester


@pytest.fixture
def seated_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Pool, LoadBoard]]:
    """A pool seated on slot 0 of a load board, as an xdist worker's is, and the board (its owner's view) to play
    the other workers on; no thread setting of the user's (the ranks' count is the harness's to follow)."""
    from pytest_mnnvl.worlds import threads
    from pytest_mnnvl.worlds.load import LoadBoard, Seat
    from pytest_mnnvl.worlds.pool import Pool

    for name in (*threads.USER_VARIABLES, threads.POLICY_ENV):
        monkeypatch.delenv(name, raising=False)
    board = LoadBoard.create(str(tmp_path))
    pool = Pool(timeout=60.0, seat=Seat(LoadBoard.open(board.path, writable=True), 0))
    try:
        yield pool, board
    finally:
        pool.close()
        board.close()


@pytest.fixture
def follow_cores() -> int:
    """The usable cores, at least 2 (with one, a share never changes: skipped, saying so)."""
    from pytest_mnnvl.worlds import threads

    cores = threads.usable_cores()
    if cores < 2:
        pytest.skip(f"following the load needs 2 usable cores to show a change; this process has {cores}")
    return cores
