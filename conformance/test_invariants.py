"""The conformance suite from a clone: ``pytest -p pytest_mnnvl conformance/ --mnnvl-manager=SPEC``.

The tests live in the installed package (:mod:`pytest_mnnvl.conformance.test_invariants`, run there as
``pytest -p pytest_mnnvl --pyargs pytest_mnnvl.conformance``); importing them here collects each once, with
the node ids this directory always had (``conformance/test_invariants.py::test_covers[ws2-pp1]``), which
waiver files and ``::test_<invariant>`` selections name.
"""

from __future__ import annotations

from pytest_mnnvl.conformance.test_invariants import *  # noqa: F403
