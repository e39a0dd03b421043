"""The conformance suite from a clone: ``pytest -p pytest_mnnvl conformance/ --mnnvl-manager=SPEC``.

The tests ship in the package (:mod:`pytest_mnnvl.conformance`); this directory collects them under its own
node ids (``test_invariants.py``) and loads their hooks and fixtures here.
"""

from __future__ import annotations

pytest_plugins = ["pytest_mnnvl.conformance.plugin"]
