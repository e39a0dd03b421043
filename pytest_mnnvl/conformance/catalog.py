"""The invariants' names, in report order, and their level: the one list every other module takes them from.

MUST invariants gate (a violation fails the run); SHOULD invariants report (a violation is an xfail unless
``--mnnvl-strict``). The checks (:mod:`pytest_mnnvl.conformance.invariants`), the suite's tests, the report,
waivers and the mutant catalog all name invariants from here; this module imports nothing, so the mutant
catalog can name what it breaks without importing the checks.
"""

from __future__ import annotations

MUST = (
    "covers",
    "no_shrink",
    "no_needless_rebuild",
    "ep_symmetry",
    "collective_scope",
    "pp_deadlock_freedom",
    "shape_mismatch",
    "cleanup",
    "workspace_race_free",
)
SHOULD = (
    "frees_superseded",
    "mismatch_survives_O",
    "failed_rebuild_consistent",
    "covers_cross_product",
    "minimal_rebuilds",
)
INVARIANTS = MUST + SHOULD
#: Invariants judged on a sim world even when the session runs on real GPUs: the race detector is the sim's. It
#: judges the order of every write against the peers' combine reads, so its verdict does not depend on timing;
#: real kernels show a race only when the timing is unlucky, as a corrupted round trip or none at all (a real
#: backend's "pass" would say nothing).
SIM_JUDGED = ("workspace_race_free",)
