"""``python -m pytest_mnnvl explain|predict|repro PLAN.json``: see :mod:`pytest_mnnvl.cli`."""

from __future__ import annotations

import sys

from pytest_mnnvl.cli.main import run

if __name__ == "__main__":
    sys.exit(run())
