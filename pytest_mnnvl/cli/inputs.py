"""Reading a plan file and checking command-line values: every problem is one :class:`UsageError`.

A :class:`UsageError` names the field (a JSON path inside the plan, or an option), the bad value and
what is allowed; :mod:`.main` prints it on one line and exits with status 2, never a traceback.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from pytest_mnnvl.model import releases
from pytest_mnnvl.model.layers import RELEASE_RULES, LayerSpec, LayerSpecError, ModelPlan, PlanError

#: Exit statuses shared by every command.
EXIT_OK = 0
EXIT_FAILS = 1
EXIT_USAGE = 2
#: The rank world itself could not run the plan (crash, deadlock, unexpected error): not a verdict.
EXIT_WORLD = 3
#: The largest plan file read: a plan at the layer bound (``layers.MAX_PLAN_LAYERS``) written out in full is
#: ~2 MB; a bigger file is refused before it is parsed.
MAX_PLAN_BYTES = 16 * 1024 * 1024


class UsageError(ValueError):
    """Bad input: a plan, an option or a manager spec that the commands cannot use."""


@dataclass(frozen=True)
class LoadedPlan:
    """A validated plan plus where each of its layers came from in the JSON (for error messages)."""

    plan: ModelPlan
    source: str
    #: ``origins[stage][i]`` is the JSON path of the entry that produced layer ``i`` of
    #: ``plan.layers_of_stage(stage)`` (MTP head included).
    origins: tuple[tuple[str, ...], ...]

    def origin(self, stage: int, index: int) -> str:
        return self.origins[stage][index]


def _entry_paths(prefix: str, entries: Any) -> list[str]:
    paths: list[str] = []
    for j, entry in enumerate(entries if isinstance(entries, list) else []):
        repeat = entry.get("repeat", 1) if isinstance(entry, dict) else 1
        paths.extend([f"{prefix}[{j}]"] * (repeat if isinstance(repeat, int) and repeat > 0 else 1))
    return paths


def plan_path(text: str) -> str:
    """A plan argument as a file path: a packaged plan's name (no separator, no ``.json``) is that plan's file; a
    path is itself. A name that no packaged plan has and no file has is an error listing the packaged ones."""
    from pytest_mnnvl.model import plans as model_plans

    if not model_plans.looks_like_name(text):
        return text
    packaged = model_plans.path_of(text)
    if packaged is not None:
        return str(packaged)
    if os.path.exists(text):
        return text
    raise UsageError(
        f"PLAN {text!r}: no packaged plan has this name and there is no such file; packaged plans: "
        f"{', '.join(model_plans.names())} (or pass the path of a plan JSON file)"
    )


def load_plan(path: str) -> LoadedPlan:
    """Read and validate ``path`` as a plan (``layers.ModelPlan`` JSON, schema version 1)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_PLAN_BYTES + 1)
        if len(raw) > MAX_PLAN_BYTES:
            raise UsageError(f"PLAN {path!r}: too large; allowed: a plan file of at most {MAX_PLAN_BYTES:,} bytes")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"PLAN {path!r}: no such file; pass the path of a plan JSON file") from None
    except IsADirectoryError:
        raise UsageError(f"PLAN {path!r}: is a directory; pass the path of a plan JSON file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"PLAN {path!r}: cannot be read ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; "
            "a plan is one JSON object with a 'stages' array (see pytest_mnnvl/plans/README.md)"
        ) from None
    except RecursionError:
        raise UsageError(
            f"{path}: nested deeper than the JSON reader allows; a plan is one JSON object with a 'stages' "
            "array of arrays of layer objects (see pytest_mnnvl/plans/README.md)"
        ) from None
    try:
        plan = ModelPlan.from_dict(data)
    except PlanError as exc:
        raise UsageError(str(PlanError(exc.path, exc.value, exc.allowed, source=path))) from None
    origins = []
    for stage in range(plan.pp):
        paths = _entry_paths(f"stages[{stage}]", data["stages"][stage])
        if stage == plan.pp - 1:
            paths += _entry_paths("mtp_head", data.get("mtp_head", []))
        origins.append(tuple(paths))
    return LoadedPlan(plan, os.fspath(path), tuple(origins))


#: ``--flashinfer``'s help: the releases the commands can model.
FLASHINFER_HELP = (
    f"the FlashInfer release whose workspace arithmetic and rules to model: {' or '.join(releases.SUPPORTED)} "
    "(default: the installed one)"
)


def choose_release(release: str | None) -> tuple[str, str]:
    """The release a command models (``--flashinfer``, else the installed one) and why that one.

    An installed release pytest-mnnvl does not know is an input error too: the commands would
    otherwise model a workspace that is not the one the user runs."""
    if release is None:
        try:
            return releases.current(), "installed"
        except releases.UnsupportedRelease as exc:
            raise UsageError(f"{exc}; pass --flashinfer {{{','.join(releases.SUPPORTED)}}} to model one") from None
    if release not in releases.SUPPORTED:
        raise UsageError(f"--flashinfer {release!r}: not allowed: must be one of {', '.join(releases.SUPPORTED)}")
    return release, "--flashinfer"


def check_ep(loaded: LoadedPlan, ep: int, release: str | None = None) -> None:
    """Every layer must be runnable at this EP size on ``release`` (default: the installed one): experts
    split evenly, a ``top_k`` the release's kernels take (``layers.RELEASE_RULES``)."""
    rules = RELEASE_RULES[releases.resolve(release)]
    if not 1 <= ep <= rules.max_ranks:
        raise UsageError(
            f"--ep {ep}: not allowed: must be an integer in 1..{rules.max_ranks} on FlashInfer {rules.release}"
        )
    for stage, index, layer in loaded.plan.iter_layers():
        try:
            layer.validate_for_ep(ep, rules.release)
        except LayerSpecError as exc:
            where = loaded.origin(stage, index)
            raise UsageError(
                f"{loaded.source}: {where}.{exc.field}: {exc.value!r} is not allowed with --ep {ep}: {exc.allowed}"
            ) from None


def check_stage(loaded: LoadedPlan, stage: int | None) -> list[int]:
    """The stages a command looks at: all of them, or the one ``--stage`` names."""
    if stage is None:
        return list(range(loaded.plan.pp))
    if not 0 <= stage < loaded.plan.pp:
        raise UsageError(
            f"--stage {stage}: not allowed: the plan has {loaded.plan.pp} stage(s), allowed 0..{loaded.plan.pp - 1}"
        )
    return [stage]


def stage_shape_error(layers: tuple[LayerSpec, ...], index: int) -> str | None:
    """Why a manager refuses layer ``index`` of a stage (top_k / num_experts differ from the first)."""
    first, layer = layers[0], layers[index]
    if (layer.top_k, layer.num_experts) == (first.top_k, first.num_experts):
        return None
    return (
        f"top_k={layer.top_k}, num_experts={layer.num_experts} differ from the stage's first layer "
        f"(top_k={first.top_k}, num_experts={first.num_experts}): the manager refuses it at initialize"
    )
