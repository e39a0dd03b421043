"""Hypothesis profiles of the conformance suite: ``ci`` (default there), ``dev``, ``thorough``.

``ci`` is derandomized (no database, no deadline, few examples) so CI is reproducible; when
``--hypothesis-seed`` is given, derandomization is switched off so that the seed takes effect
(Hypothesis lets derandomize win over a forced seed).

Every profile starts from Hypothesis' pristine ``default`` profile, never from whatever is in effect: under a
CI environment variable Hypothesis loads its own derandomized ``ci`` profile at import, and ``dev`` must not
inherit that (``--hypothesis-profile=dev`` means random draws on every machine).
"""

from __future__ import annotations

import sys
from typing import Any

PROFILES: dict[str, dict[str, Any]] = {
    "ci": {"max_examples": 8, "derandomize": True, "database": None},
    "dev": {"max_examples": 25},
    "thorough": {"max_examples": 200},
}
DEFAULT_PROFILE = "ci"


def register() -> None:
    from hypothesis import HealthCheck, Phase, settings

    common: dict[str, Any] = {
        "deadline": None,
        "print_blob": True,
        "suppress_health_check": [
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
        "phases": (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink),
    }
    pristine = settings.get_profile("default")
    for name, values in PROFILES.items():
        settings.register_profile(name, pristine, **common, **values)
        settings.register_profile(f"{name}-seeded", pristine, **common, **{**values, "derandomize": False})


def profile_in_effect(asked: str | None) -> str:
    """The profile Hypothesis has loaded (its own ``ci`` under a CI environment variable), else the one asked
    for, else ``default``; never imports Hypothesis."""
    hypothesis = sys.modules.get("hypothesis")
    current = getattr(hypothesis.settings, "_current_profile", None) if hypothesis is not None else None
    return str(current or asked or "default")


def seed_in_effect(seed: object) -> str:
    """What decides the draws, for the report header; never imports Hypothesis (plugin load stays cheap).

    When Hypothesis is not imported yet no profile was loaded: its default profile (random) applies."""
    hypothesis = sys.modules.get("hypothesis")
    derandomized = hypothesis is not None and bool(hypothesis.settings.default.derandomize)
    if derandomized:
        return "derandomized (fixed per test)" + (
            f"; --hypothesis-seed={seed} has no effect" if seed is not None else ""
        )
    return str(seed) if seed is not None else "random (printed on failure)"


def load(profile: str | None, seed: object) -> str:
    """Load ``profile`` (``ci`` when none was asked for); the seeded twin when a seed is forced."""
    from hypothesis import settings

    register()
    name = profile or DEFAULT_PROFILE
    if name not in PROFILES:
        return name  # a user's own profile, already loaded by Hypothesis' plugin
    if seed is not None:
        name = f"{name}-seeded"
    settings.load_profile(name)
    return name
