"""Loads the suite's hooks and fixtures when pytest collects this package (``--pyargs pytest_mnnvl.conformance``
or its directory); :mod:`pytest_mnnvl.plugin` also loads them at configure time for ``--pyargs``, where this
file would come too late for the report header and never on an xdist controller, which collects nothing."""

from __future__ import annotations

pytest_plugins = ["pytest_mnnvl.conformance.plugin"]
