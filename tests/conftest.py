"""The plugin's own tests run pytest in subprocesses (pytester), like pytest-timeout and xdist do."""

from __future__ import annotations

import os

import pytest

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
