"""Loaded into each benchmarked pytest session (``-p _timeline_plugin``): when every process of it (the main one,
each xdist worker) became ready and ran its tests, to ``$MNNVL_TIMELINE_DIR/<process>.json``, so a run's wall time
can be split into start, waiting and tests (what no per-test duration shows)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest

_stamps: dict[str, Any] = {"tests": []}


def pytest_sessionstart(session: pytest.Session) -> None:
    _stamps["sessionstart"] = time.time()


def pytest_collection_finish(session: pytest.Session) -> None:
    _stamps["collected"] = time.time()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _stamps["tests"].append([item.nodeid, time.time(), None])


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    if _stamps["tests"]:
        _stamps["tests"][-1][2] = time.time()


def pytest_unconfigure(config: pytest.Config) -> None:
    out = os.environ.get("MNNVL_TIMELINE_DIR")
    if not out:
        return
    who = getattr(config, "workerinput", {}).get("workerid", "main")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{who}.json"), "w", encoding="utf-8") as f:
        json.dump(_stamps, f)
