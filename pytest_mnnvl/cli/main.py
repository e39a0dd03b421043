"""Argument parsing and exit statuses of ``python -m pytest_mnnvl``.

Exit status: 0 every layer fits (``repro``: no failure reproduced), 1 some layer fails (``repro``: a
failure reproduced), 2 bad input (one line on stderr naming the field and what is allowed), 3 the
rank world could not run the plan (``repro`` only: a crash, a deadlock, an unexpected error), 130 or 143
interrupted by Ctrl-C or SIGTERM (after the rank world was stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from pytest_mnnvl.backends import SESSION_BACKENDS
from pytest_mnnvl.cli.inputs import (
    EXIT_FAILS,
    EXIT_OK,
    EXIT_USAGE,
    FLASHINFER_HELP,
    UsageError,
    check_ep,
    check_stage,
    choose_release,
    load_plan,
    plan_path,
)
from pytest_mnnvl.cli.policy import SPEC_HELP, resolve_model
from pytest_mnnvl.errors import MnnvlUsageError
from pytest_mnnvl.model.oracle import POLICIES
from pytest_mnnvl.settings import (
    MAX_TIMEOUT_S,
    MAX_WORLD_SIZE,
    MIN_TIMEOUT_S,
    ascii_int,
    parse_ranks_per_gpu,
    timeout_range,
)
from pytest_mnnvl.worlds.sharing import RanksPerGpu

PROG = "python -m pytest_mnnvl"
DEFAULT_EP = 2
DESCRIPTION = (
    "Explain, predict and reproduce FlashInfer's 'workspace insufficient for combine payload region' "
    "failures of MoE all-to-all workspace managers, from a layer plan (ModelPlan JSON, or the name of a plan "
    "shipped with the package: list-plans)."
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    value = ascii_int(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: must be >= 1")
    return value


def _nonneg_int(text: str) -> int:
    value = ascii_int(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: must be >= 0")
    return value


def _ranks_per_gpu(text: str) -> RanksPerGpu:
    try:
        return parse_ranks_per_gpu(text)
    except MnnvlUsageError:
        allowed = f"an integer 1..{MAX_WORLD_SIZE} or auto"
        raise argparse.ArgumentTypeError(f"{text!r} is not valid; allowed: {allowed}") from None


def _timeout(text: str) -> float:
    """Seconds, checked before any rank starts: ``inf`` once ran a world and ended in ``OverflowError``."""
    seconds = timeout_range(text)
    if seconds is None:
        raise argparse.ArgumentTypeError(
            f"{text} is not allowed; allowed: {MIN_TIMEOUT_S:g}..{MAX_TIMEOUT_S:g} seconds"
        )
    return seconds


def _common(p: argparse.ArgumentParser, stage: bool = True) -> None:
    p.add_argument(
        "plan",
        metavar="PLAN.json",
        help="a ModelPlan JSON file (schema_version 1), or the name of a packaged plan (list-plans shows them)",
    )
    p.add_argument("--manager", metavar="SPEC", default="reference", help=f"the manager: {SPEC_HELP}")
    p.add_argument(
        "--policy",
        choices=POLICIES,
        help="walk the plan with this oracle policy instead of the one --manager stands for",
    )
    p.add_argument(
        "--ep",
        type=_positive_int,
        default=DEFAULT_EP,
        metavar="N",
        help=f"EP size of every PP stage (default {DEFAULT_EP}); num_experts must be a multiple of it",
    )
    if stage:
        p.add_argument("--stage", type=_nonneg_int, metavar="S", help="only this PP stage (default: all)")
        # Not for repro: its ranks run the installed FlashInfer, which is the release it models.
        p.add_argument("--flashinfer", metavar="RELEASE", help=FLASHINFER_HELP)
        p.add_argument(
            "--observe",
            action="store_true",
            help="run the real manager's initialize on a sim world and read the workspace it holds, instead of "
            "its oracle policy (automatic for specs no policy models)",
        )
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="{explain,predict,repro,list-plans}", parser_class=_Parser)
    sub.required = True
    explain = sub.add_parser(
        "explain",
        help="per layer: payload, need(), the workspace the manager holds, whether dispatch and combine fit",
        description="Walk the plan through the manager's decisions and show FlashInfer's host-check arithmetic "
        "at every layer's full runtime token count. Exit 0: every layer fits; 1: some layer fails; 2: bad input.",
    )
    _common(explain)
    explain.add_argument(
        "-v", "--verbose", action="store_true", help="show the arithmetic of every layer, not only of the failing ones"
    )
    predict = sub.add_parser(
        "predict",
        help="per layer: the smallest runtime token count at which it fails",
        description="The host checks use the runtime token count, so small batches pass where a full one "
        "fails. Exit 0: no layer fails at any token count; 1: some layer does; 2: bad input.",
    )
    _common(predict)
    repro = sub.add_parser(
        "repro",
        help="run the plan on a real rank world and show the first failure exactly as FlashInfer raises it",
        description="Spawns ep × pp ranks (sim: FlashInfer's Python on CPU; flashinfer: real GPUs), initializes "
        "every layer in order on each stage and round-trips it at its full token count right after, then "
        "round-trips every layer again on the handle its stage ended with (the next forward pass). "
        "Exit 0: no failure; 1: a failure reproduced; 2: bad input; 3: the world itself failed.",
    )
    _common(repro, stage=False)
    repro.add_argument("--backend", choices=SESSION_BACKENDS, default="sim", help="rank backend (default sim)")
    repro.add_argument(
        "--ranks-per-gpu",
        type=_ranks_per_gpu,
        default=1,
        metavar="N|auto",
        help="flashinfer: ranks per GPU (default 1; auto: share GPUs when there are fewer than ranks; a shared "
        "world runs on gloo and does not exercise NVLink)",
    )
    repro.add_argument(
        "--mps",
        choices=("auto", "off", "start"),
        default="auto",
        help="flashinfer: CUDA MPS (auto: use a running daemon, start none; off: without MPS; start: a private "
        "daemon for this run, stopped at its end)",
    )
    repro.add_argument(
        "--timeout",
        type=_timeout,
        default=120.0,
        metavar="S",
        help="seconds each per-layer step may take on every rank (default 120)",
    )
    repro.add_argument(
        "--every-layer",
        action="store_true",
        help="round-trip every layer, even one identical to a layer already round-tripped on "
        "the same live handle (same checks, same offsets; off by default to save time)",
    )
    listing = sub.add_parser(
        "list-plans",
        help="the real-model plans shipped with the package, by name (usable in place of PLAN.json)",
        description="One line per packaged plan: its name, PP stages, MoE layers and model. Exit 0.",
    )
    listing.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list-plans":
        return _list_plans(args.json)
    try:
        release, release_source = choose_release(getattr(args, "flashinfer", None))
        loaded = load_plan(plan_path(args.plan))
        check_ep(loaded, args.ep, release)
        if args.command == "repro":
            from pytest_mnnvl.cli import repro

            return repro.run(loaded, args)
        stages = check_stage(loaded, args.stage)
        model = resolve_model(args.manager, args.policy, args.observe, release)
        observed = None
        if model.observed:
            from pytest_mnnvl.cli import repro

            observed = repro.observe(loaded, model.spec, args.ep)
            _check_observed_layouts(observed, release)
    except UsageError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from pytest_mnnvl.cli import analysis, render

    walk = analysis.walk(loaded, model, args.ep, stages, observed, release, release_source)
    if args.command == "explain":
        print(
            json.dumps(render.walk_json(walk, "explain"), indent=2)
            if args.json
            else render.explain_text(walk, args.verbose)
        )
        return EXIT_OK if walk.fits else EXIT_FAILS
    fails_somewhere = any(
        o.first_failing_tokens is not None or o.verdict == "refused" for s in walk.stages for o in s.outcomes
    )
    print(json.dumps(render.walk_json(walk, "predict"), indent=2) if args.json else render.predict_text(walk))
    return EXIT_FAILS if fails_somewhere else EXIT_OK


def _check_observed_layouts(observed: dict[int, list[Any]], release: str) -> None:
    """0.7.4's verdicts read the handle's layout; an observation that lacks it is a clear error, never a guess."""
    from pytest_mnnvl.model import oracle, releases

    if release != releases.V074:
        return
    if any(h.init_error is None and not h.layout for holdings in observed.values() for h in holdings):
        raise UsageError(
            f"--observe on FlashInfer {release}: the observed handles carry no workspace layout, and 0.7.4's "
            f"dispatch and combine regions cannot be known without it; pass --policy "
            f"{{{','.join(oracle.policies(release))}}} to model them by an oracle policy"
        )


def _list_plans(as_json: bool) -> int:
    from pytest_mnnvl.model import plans as model_plans

    plans = model_plans.catalog()
    if as_json:
        print(json.dumps({"plans": [p.to_dict() for p in plans]}, indent=2))
        return EXIT_OK
    width = max((len(p.name) for p in plans), default=0)
    for p in plans:
        model = re.split(r"(?<!e\.g)(?<!i\.e)\. ", p.description, maxsplit=1)[0].rstrip(".")
        model = model if len(model) <= 90 else model[:89] + "…"
        print(f"{p.name:{width}}  pp {p.pp}  {p.moe_layers:3} MoE layers  {model}")
    example = plans[0].name if plans else "NAME"
    print(f"({len(plans)} plans in {model_plans.PLANS_DIR}; e.g. {PROG} explain {example})")
    return EXIT_OK


def run() -> int:
    """``main`` for ``python -m``: a closed pipe (``| head``), Ctrl-C or SIGTERM ends quietly, never in a
    traceback; a signal stops the rank world first (:mod:`pytest_mnnvl.worlds.interrupts`) and the status is
    128 + its number (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a process the signal ended."""
    from pytest_mnnvl.worlds import interrupts

    with interrupts.guarded() as guard:
        try:
            status = main()
            sys.stdout.flush()
            return status
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout again at exit
            return EXIT_OK
        except KeyboardInterrupt:
            guard.finishing()
            by = f" by {guard.signals[0]}" if guard.signals else ""
            print(f"{PROG}: interrupted{by}", file=sys.stderr)
            return guard.exit_status()
