"""What the mutation-score benchmark runs on ranks (here, so a rank can import it by name).

The conformance suite's ranks are separate processes that import ``pytest_mnnvl`` from disk; a mutant is only
tested if they import the mutated copy. ``import_origin`` returns, from inside a rank, which files they import.
"""

from __future__ import annotations

from typing import Any


def import_origin(ctx: Any) -> tuple[int, str, str, str]:
    """This rank's number, and the files its ``pytest_mnnvl``, reference manager and adapters come from."""
    import pytest_mnnvl
    from pytest_mnnvl.managers import adapters, reference

    return int(ctx.rank), str(pytest_mnnvl.__file__), str(reference.__file__), str(adapters.__file__)
