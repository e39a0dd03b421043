"""The conformance suite: ``pytest -p pytest_mnnvl conformance/ --mnnvl-manager=SPEC``."""

from __future__ import annotations

pytest_plugins = ["pytest_mnnvl.conformance_plugin"]
