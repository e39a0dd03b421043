"""The real-model layer plans shipped with the package (``pytest_mnnvl/plans/``; its README.md gives each one's
model facts and expected verdicts), found by name so that an installed package needs no clone:
``python -m pytest_mnnvl explain deepseek-v3-r1-nvfp4-mtp``, ``python -m pytest_mnnvl list-plans``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: Where the packaged plans live: one ``NAME.json`` per plan (a clone's ``examples/plans`` links here).
PLANS_DIR = Path(__file__).resolve().parent.parent / "plans"


def names() -> list[str]:
    """The packaged plans' names (file names without ``.json``), sorted."""
    return sorted(p.stem for p in PLANS_DIR.glob("*.json"))


def looks_like_name(text: str) -> bool:
    """A plan argument that is a name, not a path: no directory separator and no ``.json`` suffix."""
    separators = [s for s in (os.sep, os.altsep, "/") if s]
    return bool(text) and not any(s in text for s in separators) and not text.lower().endswith(".json")


def path_of(name: str) -> Path | None:
    """The packaged plan called ``name``, or None when there is none."""
    return PLANS_DIR / f"{name}.json" if name in names() else None


@dataclass(frozen=True)
class PackagedPlan:
    """One packaged plan, as ``list-plans`` shows it."""

    name: str
    path: Path
    pp: int
    moe_layers: int
    description: str

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def catalog() -> list[PackagedPlan]:
    """Every packaged plan, read and validated (layer counts include the MTP head and every ``repeat``)."""
    from pytest_mnnvl.model.layers import ModelPlan

    out = []
    for name in names():
        path = PLANS_DIR / f"{name}.json"
        plan = ModelPlan.load(path)
        out.append(PackagedPlan(name, path, plan.pp, sum(1 for _ in plan.iter_layers()), plan.description))
    return out
