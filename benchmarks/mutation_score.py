"""Mutation score of the reference manager and the adapters under the conformance suite (issue 19, part 3).

Run it with the Python of a venv that has cosmic-ray (the suite itself runs under ``--suite-python``)::

    python3 -m venv /work/venvs/mut && /work/venvs/mut/bin/pip install cosmic-ray==8.7.0
    /work/venvs/mut/bin/python benchmarks/mutation_score.py all --deadline 03:25

Why cosmic-ray and not mutmut: the suite's ranks are separate processes that import ``pytest_mnnvl`` from
disk. cosmic-ray writes each mutant into the source file and runs a shell command, so the ranks import the
mutant (``setup`` proves it from inside a rank). mutmut 3 instead puts every mutant behind a trampoline in a
``mutants/`` copy and decides which tests cover a mutant from trampoline hits it records *in the pytest
process* (``record_trampoline_hit`` adds to an in-memory set the pytest hook reads); the manager runs only
in the ranks, so its mutants would be recorded as covered by no test and never run ("no tests").

Phases (``all`` runs them in order): ``setup`` clones the repository (``git clone``, then the source's
uncommitted tracked and untracked files laid over it, so the tree under test is the working tree), copies the
clone once per worker, proves from a rank which ``pytest_mnnvl`` it imports, and measures the baseline;
``run`` makes one cosmic-ray session per target (reference.py first), marks annotation-only mutants skipped
(see :func:`annotation_spans`), and executes the rest on ``--workers`` cosmic-ray HTTP workers until the
deadline; ``rerun`` runs every timed-out mutant once more, one at a time; ``finals`` runs every survivor
again under :data:`FINAL_CHECKS` (``--mnnvl-strict``, the suite on the second built-in manager, the unit tests),
in order, each on the survivors no earlier one killed; ``report`` writes the JSON and Markdown results, each
survivor classed by the final check that kills it, else by :data:`CLASSIFICATION` (equivalents, written by
hand), else ``unclassified``. Not part of ``all``: ``check`` runs survivors under any other pytest arguments
(other topologies, a built-in bad manager) in a copy whose suite is refreshed from the source. The latest run::

    mutation_score.py setup; mutation_score.py run --timeout 90; mutation_score.py rerun
    mutation_score.py finals --timeout 90
    mutation_score.py report --notes NOTES.md --out benchmarks/results/mutation-score-2026-12-02b
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TARGETS = ("pytest_mnnvl/managers/reference.py", "pytest_mnnvl/managers/adapters.py")
#: The suite's selection: the ws2-pp1 tests only (13, the ``ci`` profile), to keep one run near half a minute.
SUITE_ARGS = "-m pytest -p pytest_mnnvl conformance/ -x -q -k ws2-pp1 -p no:xdist"
TIMEOUT_FACTOR = 3.0
FIRST_PORT = 9876


@dataclasses.dataclass(frozen=True)
class Check:
    """A command a survivor of the test command is run again under; a kill there gives it the class ``kills_as``.

    The final checks (:data:`FINAL_CHECKS`) run in order, each on the survivors no earlier one killed, so a
    survivor's class names the cheapest part of the project's tests that finds its defect."""

    label: str
    args: str
    kills_as: str
    why: str


_SUITE_REST = SUITE_ARGS.split(" ", 2)[2]
FINAL_CHECKS = (
    Check(
        "final: the test command under --mnnvl-strict",
        f"{_SUITE_REST} --mnnvl-strict",
        "should",
        "a SHOULD violation: the test command reports it as an xfail (exit 0); --mnnvl-strict, the CI gate's "
        "setting, fails on it",
    ),
    Check(
        "final: the suite on moe_ep_reference (--mnnvl-strict)",
        f"{_SUITE_REST} --mnnvl-strict --mnnvl-manager=moe_ep_reference",
        "suite-moe_ep",
        "the suite on the second built-in correct manager (the moe_ep shape, its own dispatch path) kills it: the "
        "pr42976-shape reference never takes this path",
    ),
    Check(
        "final: unit tests of the manager modules",
        "tests/test_managers.py tests/test_reference_arguments.py -x -q -p no:xdist",
        "gap-unit",
        "no conformance run reaches this path (a malformed manager class, an unknown keyword family, the reference's "
        "own argument check, a handle that cannot be weakly referenced); the unit tests kill it",
    ),
)
TIMEOUT_OUTPUT = "timeout"  # cosmic-ray's output for a test command it killed at the timeout

#: Survivors written down by hand: ``"file:line:operator:occurrence"`` -> (class, why). Only ``equivalent`` ones
#: (no observable behaviour change where the suite can run it: the why says the scope); every other class comes
#: from the final check that kills the survivor (:data:`FINAL_CHECKS`), and one no check kills and nobody wrote
#: down is ``unclassified``: an open gap.
REF = "pytest_mnnvl/managers/reference.py"
ADP = "pytest_mnnvl/managers/adapters.py"
_BOOKKEEPING = (
    "equivalent",
    "changes only the manager's own bookkeeping attribute (workspace_size / max_num_tokens / top_k / num_experts "
    "while uninitialized, or as published after a build). Equivalent for the suite's contract: the reference reads "
    "top_k / num_experts only while initialized (after _commit set them) and workspace_size / max_num_tokens never, "
    "and no model code reads them from the manager: vLLM 0.32's one-sided prepare/finalize reads only its "
    "initialize(), moe_alltoall, world_size and combine_into; vLLM 0.33's only initialize() and get_communication() "
    "(the max_num_tokens / top_k / num_experts it uses are its own, from the layer's config)",
)
_BCAST = (
    "equivalent",
    "EpComm.bcast is dead on FlashInfer 0.7.2.post1: its MoeAlltoAll allocation only all-gathers (comm.bcast is "
    "called for multicast buffers alone); the box[1] mutant, which would raise IndexError on any call, survives too",
)
_SPLIT = (
    "equivalent",
    "FlashInfer only ever calls Split(colour 0) here (the manager's Mapping has one PP stage, one CP rank), and "
    "for 0 the mutated test is False as the original is",
)
_QUIESCE = (
    "equivalent",
    "on the sim (CPU) torch.cuda.is_available() and is_initialized() are both False, so the mutated condition is "
    "False too: no synchronize either way. GPU-only difference (a skipped or needless synchronize)",
)
_FACTS_OR = (
    "equivalent",
    "FlashInfer's MoeAlltoAll always carries a positive int workspace_size_per_rank and max_num_tokens, so "
    "`x or 0` and `x or 1` / `x or -1` are both x",
)
#: The sha256 of each target the keys of :data:`CLASSIFICATION` (lines, occurrences) were written for.
CLASSIFIED_FOR: dict[str, str] = {
    REF: "2fdb50e384d5621d447eaaa1207b6705cd94d7b3c3fe0355b2764f1533b70dcf",
    ADP: "c187731ac0bb091352adce5f6209409fbbb6c58e1991d937f51d9dd63683e4a7",
}
CLASSIFICATION: dict[str, tuple[str, str]] = {
    f"{ADP}:179:core/ReplaceComparisonOperator_Eq_Lt:2": (
        "equivalent",
        "initialize_kwargs's moe_ep branch is dead: MoeEpAdapter.kwargs overrides the base kwargs, its only caller; "
        "'pr42976' < 'moe_ep' is false, so the pr42976 branch is unchanged",
    ),
    **dict.fromkeys(
        [f"{ADP}:364:core/ReplaceComparisonOperator_Is_IsNot:11", f"{ADP}:364:core/AddNot:22"],
        (
            "equivalent",
            "only the cache of FlashInfer's QuantFormat is skipped: moe_ep_kwargs(layer, None) imports the same enum",
        ),
    ),
    f"{ADP}:321:core/ReplaceTrueWithFalse:3": ("equivalent", "nothing assigns to a DispatchPath"),
    f"{ADP}:151:core/ReplaceComparisonOperator_Is_GtE:3": (
        "equivalent",
        "QuantFormat is a str enum and no member's value sorts after 'nvfp4' (bf16, fp16, fp8_block, mxfp8), so "
        "`quant >= NVFP4` holds for NVFP4 alone, as `is` does",
    ),
    f"{ADP}:100:core/ReplaceComparisonOperator_Is_Eq:1": (
        "equivalent",
        "Parameter.kind is an enum member: `==` and `is` agree",
    ),
    f"{ADP}:100:core/ReplaceComparisonOperator_Is_LtE:1": (
        "equivalent",
        "POSITIONAL_ONLY is the smallest Parameter kind, so `kind <= POSITIONAL_ONLY` is `kind is POSITIONAL_ONLY`",
    ),
    f"{ADP}:114:core/ReplaceBinaryOperator_BitOr_BitXor:0": (
        "equivalent",
        "BASE_PARAMETERS and every keyword family are disjoint, so the symmetric difference is the union",
    ),
    f"{ADP}:115:core/ReplaceComparisonOperator_Is_Eq:2": (
        "equivalent",
        "`default == Parameter.empty` is `default is Parameter.empty` for every default with an ordinary __eq__ (the "
        "empty marker is a class; only an __eq__ that claims equality with it, or raises, would differ)",
    ),
    **dict.fromkeys(
        [
            f"{ADP}:145:core/ReplaceComparisonOperator_Eq_Is:0",
            f"{ADP}:148:core/ReplaceComparisonOperator_Eq_Is:1",
            f"{ADP}:179:core/ReplaceComparisonOperator_Eq_Is:2",
            f"{ADP}:381:core/ReplaceComparisonOperator_Eq_Is:3",
        ],
        (
            "equivalent",
            "`is` on a string: the value always comes from the KEYWORDS / shape-name literals, which CPython interns, "
            "so `is` and `==` agree",
        ),
    ),
    **dict.fromkeys(
        [f"{ADP}:87:core/ReplaceComparisonOperator_Is_Eq:0", f"{ADP}:151:core/ReplaceComparisonOperator_Is_Eq:3"],
        ("equivalent", "an enum member compared with `==` instead of `is`: the same"),
    ),
    **dict.fromkeys(
        [f"{ADP}:179:core/ReplaceComparisonOperator_Eq_LtE:2", f"{ADP}:381:core/ReplaceComparisonOperator_Eq_LtE:3"],
        ("equivalent", "for the only two shape names, 'moe_ep' <= 'moe_ep' and not 'pr42976' <= 'moe_ep': as =="),
    ),
    **dict.fromkeys(
        [f"{ADP}:188:core/NumberReplacer:4", f"{ADP}:188:core/NumberReplacer:5"],
        ("equivalent", "stamps start at 2 / 0 instead of 1: they are only compared with each other and with None"),
    ),
    **dict.fromkeys(
        [
            f"{ADP}:64:core/ReplaceTrueWithFalse:0",
            f"{ADP}:221:core/ReplaceTrueWithFalse:1",
            f"{ADP}:235:core/ReplaceTrueWithFalse:2",
        ],
        (
            "equivalent",
            "frozen=False: nothing assigns to a Shape / StateRecord / ManagerState, and nothing hashes one (an "
            "unfrozen dataclass with eq has no hash, so a hash would raise and kill the mutant)",
        ),
    ),
    **dict.fromkeys(
        [f"{ADP}:240:core/ReplaceFalseWithTrue:1", f"{ADP}:241:core/ReplaceFalseWithTrue:3"],
        (
            "equivalent",
            "compare=True on the handle fields: equal ManagerStates already have equal stamps, i.e. the same handles, "
            "and FlashInfer's handles compare by identity",
        ),
    ),
    **dict.fromkeys(
        [f"{ADP}:240:core/ReplaceFalseWithTrue:2", f"{ADP}:241:core/ReplaceFalseWithTrue:4"],
        ("equivalent", "repr=True: only repr(ManagerState) changes, and nothing prints one"),
    ),
    f"{ADP}:250:core/ReplaceComparisonOperator_Is_Eq:4": (
        "equivalent",
        "FlashInfer's handles define no __eq__: `==` is identity",
    ),
    f"{ADP}:70:core/ReplaceFalseWithTrue:0": (
        "equivalent",
        "the default of Shape.declared is never used: the only constructor call passes it",
    ),
    f"{ADP}:87:core/ReplaceComparisonOperator_Is_GtE:0": (
        "equivalent",
        "VAR_KEYWORD is the largest Parameter kind, so `kind >= VAR_KEYWORD` is `kind is VAR_KEYWORD`",
    ),
    **dict.fromkeys(
        [
            f"{REF}:105:core/AddNot:0",
            f"{REF}:105:core/ReplaceComparisonOperator_IsNot_Is:0",
            f"{REF}:108:core/NumberReplacer:6",
            f"{REF}:108:core/NumberReplacer:7",
        ],
        _BCAST,
    ),
    **dict.fromkeys(
        [
            f"{REF}:116:core/ReplaceComparisonOperator_NotEq_Gt:0",
            f"{REF}:116:core/ReplaceComparisonOperator_NotEq_Lt:0",
        ],
        _SPLIT,
    ),
    **dict.fromkeys(
        [
            f"{REF}:149:core/NumberReplacer:10",
            f"{REF}:149:core/NumberReplacer:11",
            f"{REF}:150:core/NumberReplacer:12",
            f"{REF}:150:core/NumberReplacer:13",
            f"{REF}:151:core/NumberReplacer:14",
            f"{REF}:151:core/NumberReplacer:15",
            f"{REF}:152:core/NumberReplacer:16",
            f"{REF}:152:core/NumberReplacer:17",
            f"{REF}:261:core/ReplaceOrWithAnd:2",
            f"{REF}:262:core/ReplaceOrWithAnd:3",
        ],
        _BOOKKEEPING,
    ),
    f"{REF}:195:core/ReplaceComparisonOperator_Eq_Is:0": (
        "equivalent",
        "`top_k is self.top_k` equals `==` in CPython for ints in -5..256 (one cached object each), and FlashInfer "
        "dispatches top_k <= 22 only",
    ),
    **dict.fromkeys([f"{REF}:254:core/AddNot:10", f"{REF}:254:core/ReplaceAndWithOr:3"], _QUIESCE),
    **dict.fromkeys(
        [
            f"{REF}:261:core/NumberReplacer:30",
            f"{REF}:261:core/NumberReplacer:31",
            f"{REF}:262:core/NumberReplacer:32",
            f"{REF}:262:core/NumberReplacer:33",
        ],
        _FACTS_OR,
    ),
}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where everything lives: the base clone, the per-worker copies, the sessions and the logs."""

    work: Path
    workers: int

    @property
    def clone(self) -> Path:
        return self.work / "clone"

    def worker(self, index: int) -> Path:
        return self.work / f"worker-{index}"

    def session(self, target: str) -> Path:
        return self.work / f"{Path(target).stem}.sqlite"

    def config(self, target: str) -> Path:
        return self.work / f"{Path(target).stem}.toml"

    @property
    def state(self) -> Path:
        return self.work / "state.json"

    @property
    def checks(self) -> Path:
        """Kept apart from ``state``: ``check`` may run while ``run`` (which rewrites the state) still does."""
        return self.work / "checks.json"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _load_state(layout: Layout) -> dict[str, Any]:
    if layout.state.exists():
        loaded: dict[str, Any] = json.loads(layout.state.read_text())
        return loaded
    return {}


def _load_checks(layout: Layout) -> dict[str, Any]:
    if layout.checks.exists():
        loaded: dict[str, Any] = json.loads(layout.checks.read_text())
        return loaded
    return {}


def _save_state(layout: Layout, state: dict[str, Any]) -> None:
    layout.state.write_text(json.dumps(state, indent=2) + "\n")


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def suite_command(suite_python: str) -> str:
    """The test command, run in a worker's copy: ``PYTHONPATH=.`` so the parent and every rank import that copy."""
    return f"env PYTHONPATH=. PYTHONDONTWRITEBYTECODE=1 {suite_python} {SUITE_ARGS}"


# ---- setup ------------------------------------------------------------------------------------


def setup(args: argparse.Namespace, layout: Layout) -> None:
    if layout.work.exists():
        shutil.rmtree(layout.work)
    layout.work.mkdir(parents=True)
    source = Path(args.source).resolve()
    subprocess.run(["git", "clone", "-q", str(source), str(layout.clone)], check=True)
    # The working tree, not just HEAD: tracked files as they are now, untracked ones git does not ignore
    # (top-level hidden folders are others' scratch, never the project).
    listed = _git(source, "ls-files", "-co", "--exclude-standard", "-z").split("\0")
    overlaid = 0
    for name in filter(None, listed):
        if name.startswith(".") and "/" in name:
            continue
        src = source / name
        if src.is_file():
            dst = layout.clone / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            overlaid += 1
    head = _git(layout.clone, "rev-parse", "HEAD")
    dirty = _git(layout.clone, "status", "--porcelain")
    diff_sha = subprocess.run(
        ["git", "diff", "HEAD"], cwd=layout.clone, check=True, capture_output=True
    ).stdout  # tracked changes only; untracked files are listed below
    for index in range(layout.workers):
        shutil.copytree(layout.clone, layout.worker(index), symlinks=True)
        subprocess.run([sys.executable, "-m", "compileall", "-q", "pytest_mnnvl"], cwd=layout.worker(index), check=True)
    origins = [prove_import_origin(args.suite_python, layout.worker(i)) for i in range(layout.workers)]
    timings = [baseline(args.suite_python, layout.worker(0)) for _ in range(args.baseline_runs)]
    state = {
        "source": str(source),
        "head": head,
        "target_sha256": {t: hashlib.sha256((layout.clone / t).read_bytes()).hexdigest() for t in TARGETS},
        "tracked_diff_sha256": hashlib.sha256(diff_sha).hexdigest(),
        "changed_paths": dirty.splitlines(),
        "overlaid_files": overlaid,
        "rank_import_origins": origins,
        "baseline_seconds": timings,
        "timeout_seconds": round(TIMEOUT_FACTOR * max(timings), 1),
        "setup_at": _now(),
        "load_average_at_setup": list(os.getloadavg()),
    }
    _save_state(layout, state)
    print(json.dumps({k: v for k, v in state.items() if k != "changed_paths"}, indent=2))


def prove_import_origin(suite_python: str, copy: Path) -> list[list[Any]]:
    """Start a sim world from ``copy`` the way the suite does and ask each rank which files it imports."""
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks')\n"
        "import _mutation_score_fns as fns\n"
        "from pytest_mnnvl.worlds.pool import World\n"
        "from pytest_mnnvl.worlds.world import WorldSpec\n"
        "w = World(WorldSpec(2, 1, 'sim'), timeout=120.0)\n"
        "try:\n    print(json.dumps(w.run(fns.import_origin)))\nfinally:\n    w.close()\n"
    )
    env = {**os.environ, "PYTHONPATH": ".", "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([suite_python, "-c", code], cwd=copy, env=env, check=True, capture_output=True, text=True)
    origins: list[list[Any]] = json.loads(out.stdout.strip().splitlines()[-1])
    for rank, *files in origins:
        for file in files:
            if not Path(file).resolve().is_relative_to(copy.resolve()):
                raise SystemExit(f"rank {rank} imports {file}, not the copy under {copy}: mutants would go unseen")
    return origins


def baseline(suite_python: str, copy: Path) -> float:
    t0 = time.monotonic()
    done = subprocess.run(suite_command(suite_python).split(), cwd=copy, capture_output=True, text=True)
    elapsed = round(time.monotonic() - t0, 1)
    if done.returncode != 0:
        raise SystemExit(f"baseline failed (exit {done.returncode}):\n{done.stdout[-4000:]}")
    return elapsed


# ---- run --------------------------------------------------------------------------------------


def annotation_spans(path: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Source spans of annotations. Every target has ``from __future__ import annotations``: an annotation is
    kept as a string and never evaluated (dataclasses read its text only for ``ClassVar``/``InitVar``;
    ``inspect.signature`` does not evaluate it), so a mutant inside one changes no behaviour."""
    tree = ast.parse(path.read_text())
    if not any(
        isinstance(node, ast.ImportFrom)
        and node.module == "__future__"
        and any(a.name == "annotations" for a in node.names)
        for node in tree.body
    ):
        return []
    spans = []
    for node in ast.walk(tree):
        found: list[ast.expr | None] = []
        if isinstance(node, (ast.AnnAssign, ast.arg)):
            found.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append(node.returns)
        for ann in found:
            if ann is not None and ann.end_lineno is not None and ann.end_col_offset is not None:
                spans.append(((ann.lineno, ann.col_offset), (ann.end_lineno, ann.end_col_offset)))
    return spans


def write_config(layout: Layout, target: str, timeout: float, suite_python: str) -> None:
    urls = ", ".join(f'"http://localhost:{FIRST_PORT + i}"' for i in range(layout.workers))
    layout.config(target).write_text(
        "[cosmic-ray]\n"
        f'module-path = "{target}"\n'
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f'test-command = "{suite_command(suite_python)}"\n\n'
        '[cosmic-ray.distributor]\nname = "http"\n\n'
        f"[cosmic-ray.distributor.http]\nworker-urls = [{urls}]\n"
    )


def init_session(layout: Layout, target: str) -> dict[str, int]:
    """``cosmic-ray init`` (in a worker's copy: module paths are relative), then mark annotation mutants skipped."""
    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    subprocess.run(
        [_cosmic_ray(), "init", str(layout.config(target)), str(layout.session(target))],
        cwd=layout.worker(0),
        check=True,
    )
    spans = annotation_spans(layout.worker(0) / target)
    skipped = total = 0
    with use_db(str(layout.session(target))) as db:
        for item in list(db.work_items):
            total += 1
            if all(any(s <= tuple(m.start_pos) and tuple(m.end_pos) <= e for s, e in spans) for m in item.mutations):
                db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
                skipped += 1
    return {"generated": total, "skipped_annotation": skipped}


def _cosmic_ray() -> str:
    return str(Path(sys.executable).with_name("cosmic-ray"))


@contextlib.contextmanager
def http_workers(layout: Layout) -> Iterator[None]:
    procs = []
    logs = []
    try:
        for i in range(layout.workers):
            log = open(layout.work / f"worker-{i}.log", "a")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [_cosmic_ray(), "http-worker", "--port", str(FIRST_PORT + i)],
                    cwd=layout.worker(i),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        time.sleep(3)
        yield
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()
        restore_targets(layout)


def restore_targets(layout: Layout) -> None:
    """A worker stopped mid-mutant leaves the mutant on disk: put every target back from the clone."""
    for i in range(layout.workers):
        for target in TARGETS:
            shutil.copy2(layout.clone / target, layout.worker(i) / target)


def run(args: argparse.Namespace, layout: Layout) -> None:
    state = _load_state(layout)
    timeout = float(args.timeout or state["timeout_seconds"])
    deadline = _deadline(args.deadline)
    state.setdefault("sessions", {})
    state["run_timeout_seconds"] = timeout
    state["run_started_at"] = _now()
    with http_workers(layout):
        for target in TARGETS:
            write_config(layout, target, timeout, args.suite_python)
            if not layout.session(target).exists():
                state["sessions"][target] = init_session(layout, target)
                _save_state(layout, state)
            left = deadline - time.time()
            if left <= 0:
                print(f"deadline reached before {target}")
                break
            t0 = time.monotonic()
            exec_ = subprocess.Popen(
                [_cosmic_ray(), "exec", str(layout.config(target)), str(layout.session(target))],
                cwd=layout.worker(0),
                start_new_session=True,
            )
            try:
                exec_.wait(left)
            except subprocess.TimeoutExpired:
                os.killpg(exec_.pid, signal.SIGTERM)
                exec_.wait()
                print(f"deadline reached during {target}")
            state["sessions"][target]["exec_seconds"] = round(
                state["sessions"][target].get("exec_seconds", 0) + time.monotonic() - t0, 1
            )
            _save_state(layout, state)
    state["run_finished_at"] = _now()
    _save_state(layout, state)


def _deadline(text: str | None) -> float:
    if not text:
        return time.time() + 10 * 3600
    hour, minute = map(int, text.split(":"))
    now = dt.datetime.now(dt.timezone.utc)
    at = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if at < now:
        at += dt.timedelta(days=1)
    return at.timestamp()


# ---- results ----------------------------------------------------------------------------------


def jobs(layout: Layout, target: str) -> list[dict[str, Any]]:
    """Every job of ``target``'s session: mutation, outcome and (for tested ones) output and diff."""
    if not layout.session(target).exists():
        return []
    dumped = subprocess.run(
        [_cosmic_ray(), "dump", str(layout.session(target))], check=True, capture_output=True, text=True
    ).stdout
    out = []
    for line in dumped.splitlines():
        item, result = json.loads(line)
        (mutation,) = item["mutations"]
        out.append({"job_id": item["job_id"], **mutation, "result": result})
    return out


def outcome(job: dict[str, Any]) -> str:
    result = job["result"]
    if result is None:
        return "not_run"
    if result["worker_outcome"] == "skipped":
        return "skipped_annotation"
    if result["worker_outcome"] != "normal":
        return f"worker_{result['worker_outcome']}"
    if result["test_outcome"] == "killed":
        return "timeout" if (result.get("output") or "").strip() == TIMEOUT_OUTPUT else "killed"
    return str(result["test_outcome"])


def key(job: dict[str, Any]) -> str:
    return f"{job['module_path']}:{job['start_pos'][0]}:{job['operator_name']}:{job['occurrence']}"


def rerun(args: argparse.Namespace, layout: Layout) -> None:
    """Each timed-out mutant once more, alone, with the same timeout (a timeout is no kill to trust)."""
    state = _load_state(layout)
    timeout = float(args.timeout or state["timeout_seconds"])
    reruns = state.setdefault("reruns", {})
    copy = layout.worker(0)
    for target in TARGETS:
        for job in jobs(layout, target):
            if outcome(job) != "timeout" or key(job) in reruns:
                continue
            reruns[key(job)] = run_one(copy, job, timeout, args.suite_python)
            _save_state(layout, state)
            print(key(job), reruns[key(job)]["outcome"])


def check(args: argparse.Namespace, layout: Layout) -> None:
    """Run survivors (or ``--keys``) again under another command (``--check-args``, e.g. other topologies), in
    copies of their own whose suite (every non-target file) is refreshed from the source's working tree: how a gap
    closed in the suite is shown killing its mutant."""
    state = _load_state(layout)
    label = args.check_label or args.check_args
    checks = _load_checks(layout)
    results = checks.setdefault(label, {"args": args.check_args, "at": _now(), "mutants": {}})
    wanted = set(args.keys or [])
    selected = [
        job
        for target in TARGETS
        for job in jobs(layout, target)
        if (key(job) in wanted if wanted else outcome(job) == "survived")
        and (args.again or key(job) not in results["mutants"])  # else checked under this label already
    ]
    runner = _CheckRunner(args, layout, state, checks, float(args.timeout or state["timeout_seconds"]))
    runner.run(label, args.check_args, selected)


def finals(args: argparse.Namespace, layout: Layout) -> None:
    """Every :data:`FINAL_CHECKS` in order, each on the survivors no earlier one killed."""
    state = _load_state(layout)
    timeout = float(args.timeout or state.get("run_timeout_seconds") or state["timeout_seconds"])
    checks = _load_checks(layout)
    runner = _CheckRunner(args, layout, state, checks, timeout)
    left = [job for target in TARGETS for job in jobs(layout, target) if outcome(job) == "survived"]
    for final in FINAL_CHECKS:
        results = checks.setdefault(final.label, {"args": final.args, "at": _now(), "mutants": {}})
        runner.run(final.label, final.args, [job for job in left if key(job) not in results["mutants"]])
        left = [job for job in left if results["mutants"].get(key(job), {}).get("outcome") != "killed"]


class _CheckRunner:
    """Runs jobs under a check's pytest arguments, ``--workers`` at a time (one refreshed copy of the clone
    each), and records each result in ``checks`` (written after every mutant, so a stopped run keeps its part)."""

    def __init__(
        self, args: argparse.Namespace, layout: Layout, state: dict[str, Any], checks: dict[str, Any], timeout: float
    ) -> None:
        from queue import Queue

        self.args, self.layout, self.checks, self.timeout = args, layout, checks, timeout
        self.copies: Queue[Path] = Queue()
        for index in range(layout.workers):
            self.copies.put(_refreshed_copy(layout, Path(state["source"]), f"check-{index}"))

    def run(self, label: str, pytest_args: str, selected: list[dict[str, Any]]) -> None:
        import threading
        from concurrent.futures import ThreadPoolExecutor

        lock = threading.Lock()

        def one(job: dict[str, Any]) -> None:
            copy = self.copies.get()
            try:
                done = run_one(copy, job, self.timeout, self.args.suite_python, pytest_args)
            finally:
                self.copies.put(copy)
            done["killed_by"] = _first_failure(done["tail"])
            with lock:
                self.checks[label]["mutants"][key(job)] = done
                self.layout.checks.write_text(json.dumps(self.checks, indent=2) + "\n")
            print(label, key(job), done["outcome"], done["killed_by"], flush=True)

        with ThreadPoolExecutor(self.layout.workers) as pool:
            list(pool.map(one, selected))


def _refreshed_copy(layout: Layout, source: Path, name: str) -> Path:
    """A copy of the clone whose every non-target file is the source's working tree now: the suite and tests as
    they are, the targets as they were mutated."""
    copy = layout.work / name
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(layout.clone, copy, symlinks=True)
    for name_ in filter(None, _git(source, "ls-files", "-co", "--exclude-standard", "-z").split("\0")):
        if name_ not in TARGETS and not (name_.startswith(".") and "/" in name_) and (source / name_).is_file():
            (copy / name_).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name_, copy / name_)
    return copy


def run_one(
    copy: Path, job: dict[str, Any], timeout: float, suite_python: str, pytest_args: str | None = None
) -> dict[str, Any]:
    """Apply one mutant with ``cosmic-ray apply``, run the suite (or ``pytest_args``), put the file back."""
    target = copy / job["module_path"]
    original = target.read_bytes()
    try:
        subprocess.run(
            [_cosmic_ray(), "apply", job["module_path"], job["operator_name"], str(job["occurrence"])],
            cwd=copy,
            check=True,
        )
        t0 = time.monotonic()
        command = suite_command(suite_python).split()
        if pytest_args is not None:
            command = [*command[: command.index("pytest") + 1], *shlex.split(pytest_args)]
        proc = subprocess.Popen(
            command,
            cwd=copy,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
            result = "survived" if proc.returncode == 0 else "killed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            result = "timeout"
        return {"outcome": result, "seconds": round(time.monotonic() - t0, 1), "tail": (output or "")[-1500:]}
    finally:
        target.write_bytes(original)


def _first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED", "ERROR")):
            return line[:200]
    return ""


def _diff_lines(diff: str | None) -> list[str]:
    return [line for line in (diff or "").splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def _verdict_lines(output: str) -> list[str]:
    """The suite's own verdict rows that are not ``pass``/``not_run`` (a SHOULD ``fail`` is an xfail: exit 0)."""
    out = []
    for line in output.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] in ("MUST", "SHOULD") and words[2] not in ("pass", "not_run"):
            out.append(" ".join(words))
    return out


def classify(name: str, checks: dict[str, dict[str, str]]) -> tuple[str, str]:
    """A survivor's class: the first final check that kills it, else the hand-written one, else ``unclassified``
    (an open gap). A survivor written down as equivalent that a final check kills is ``misclassified``."""
    killer = next((f for f in FINAL_CHECKS if checks.get(f.label, {}).get("outcome") == "killed"), None)
    hand = CLASSIFICATION.get(name)
    if killer is not None:
        by = checks[killer.label]["killed_by"].split(" - ")[0]
        if hand is not None and hand[0] == "equivalent":
            return "misclassified", f"written down as equivalent ({hand[1]}), but *{killer.label}* kills it ({by})"
        return killer.kills_as, f"{killer.why} ({by})"
    if hand is not None:
        return hand
    return "unclassified", ""


def collect(layout: Layout) -> dict[str, Any]:
    """Every mutant's row (final outcome after reruns; survivors with diff, classification and checks)."""
    state = _load_state(layout)
    checks = _load_checks(layout)
    rows = []
    counts: dict[str, dict[str, int]] = {}
    for target in TARGETS:
        per = counts.setdefault(target, {})
        for job in jobs(layout, target):
            first = outcome(job)
            rerun_of = state.get("reruns", {}).get(key(job))
            final = rerun_of["outcome"] if rerun_of is not None else first
            per[final] = per.get(final, 0) + 1
            result = job["result"] or {}
            row: dict[str, Any] = {
                "key": key(job),
                "file": job["module_path"],
                "line": job["start_pos"][0],
                "operator": job["operator_name"],
                "occurrence": job["occurrence"],
                "function": job.get("definition_name"),
                "outcome": final,
                "first_outcome": first,
            }
            if final == "killed":
                row["killed_by"] = _first_failure(result.get("output") or (rerun_of or {}).get("tail", ""))
            if final == "survived":
                row["diff"] = _diff_lines(result.get("diff"))
                row["suite_verdicts"] = _verdict_lines(result.get("output") or "")
                row["checks"] = {
                    label: {
                        "outcome": c["mutants"][key(job)]["outcome"],
                        "killed_by": c["mutants"][key(job)]["killed_by"],
                    }
                    for label, c in checks.items()
                    if key(job) in c["mutants"]
                }
                cls, why = classify(key(job), row["checks"])
                row["classification"], row["why"] = cls, why
            rows.append(row)
    total = {k: sum(c.get(k, 0) for c in counts.values()) for k in sorted({k for c in counts.values() for k in c})}
    by_class: dict[str, int] = {}
    for r in rows:
        if r["outcome"] == "survived":
            by_class[r["classification"]] = by_class.get(r["classification"], 0) + 1
    tested = sum(v for k, v in total.items() if k in ("killed", "survived", "timeout"))
    return {
        "tool": "cosmic-ray",
        "tool_version": _cr_version(),
        "targets": list(TARGETS),
        "test_command": suite_command(str(state.get("suite_python", "python"))),
        "machine": {"nproc": os.cpu_count(), "cpu": _cpu_model(), "platform": platform.platform()},
        "state": state,
        "checks": {label: {"args": c["args"], "at": c["at"]} for label, c in checks.items()},
        "counts_by_target": counts,
        "counts": total,
        "generated": sum(sum(c.values()) for c in counts.values()),
        "tested": tested,
        "score_killed_over_tested": round(total.get("killed", 0) / tested, 4) if tested else None,
        "survivors_by_class": by_class,
        "classified_for_other_versions": [
            t for t in TARGETS if CLASSIFIED_FOR.get(t) != state.get("target_sha256", {}).get(t)
        ],
        "mutants": rows,
    }


def report(args: argparse.Namespace, layout: Layout) -> None:
    summary = collect(layout)
    summary["test_command"] = suite_command(args.suite_python)
    summary["notes"] = Path(args.notes).read_text() if args.notes else ""
    out = Path(args.out)
    out.with_name(out.name + ".json").write_text(json.dumps(summary, indent=2) + "\n")
    out.with_name(out.name + ".md").write_text(markdown(summary))
    print(json.dumps({k: summary[k] for k in ("counts_by_target", "counts", "generated", "survivors_by_class")}))


def markdown(summary: dict[str, Any]) -> str:
    """The results page: numbers first, then every survivor with its diff and classification."""
    state = summary["state"]
    lines = [
        "# Mutation score: reference manager and adapters under the conformance suite",
        "",
        "Made by `benchmarks/mutation_score.py` (its docstring says why cosmic-ray, not mutmut). Notes written by",
        "hand are under *Reading*; everything else is generated from the cosmic-ray sessions.",
        "",
        f"- tool: cosmic-ray {summary['tool_version']} (HTTP distributor, {len(state.get('rank_import_origins', []))}"
        " workers, one copy of the tree each)",
        f"- targets: {', '.join(f'`{t}`' for t in summary['targets'])}",
        f"- test command (in each worker's copy): `{summary['test_command']}`",
        f"- tree: `{state.get('head', '?')[:12]}` + the working tree's uncommitted changes at setup"
        f" ({len(state.get('changed_paths', []))} paths;"
        f" tracked diff sha256 `{state.get('tracked_diff_sha256', '?')[:16]}`)",
        f"- machine: {summary['machine']['nproc']} cores, {summary['machine']['cpu']}; load average at setup"
        f" {', '.join(f'{x:.1f}' for x in state.get('load_average_at_setup', []))} (shared with other engineers)",
        f"- baseline (unmutated, all pass): {', '.join(f'{x} s' for x in state.get('baseline_seconds', []))};"
        f" per-mutant timeout {state.get('run_timeout_seconds', state.get('timeout_seconds'))} s"
        " (--timeout, else 3x the slowest)",
        f"- run: {state.get('run_started_at', '?')} to {state.get('run_finished_at', '?')};"
        + "".join(
            f" {Path(t).name} exec {v.get('exec_seconds', '?')} s;" for t, v in state.get("sessions", {}).items()
        ),
        "- rank imports (proved from inside a rank of each worker's world): "
        + "; ".join(sorted({Path(o[1]).parent.parent.name for w in state.get("rank_import_origins", []) for o in w})),
        "",
        "## Numbers",
        "",
        "| target | generated | killed | survived | timed out | incompetent | skipped (annotation) | not run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for target, c in summary["counts_by_target"].items():
        incompetent = sum(v for k, v in c.items() if k.startswith("worker_") or k == "incompetent")
        lines.append(
            f"| `{Path(target).name}` | {sum(c.values())} | {c.get('killed', 0)} | {c.get('survived', 0)} |"
            f" {c.get('timeout', 0)} | {incompetent} | {c.get('skipped_annotation', 0)} | {c.get('not_run', 0)} |"
        )
    t = summary["counts"]
    by_class = summary["survivors_by_class"]
    lines += [
        "",
        "## Where each mutant dies",
        "",
        "Each survivor of the test command was run again under the final checks, in this order, each on the",
        "survivors no earlier one killed; `equivalent` ones are written down by hand with the reason.",
        "",
        "| | mutants |",
        "|---|---|",
        f"| killed by the test command | {t.get('killed', 0)} |",
    ]
    lines += [
        f"| survived it, killed by *{f.label}* (`{f.kills_as}`) | {by_class.get(f.kills_as, 0)} |" for f in FINAL_CHECKS
    ]
    lines += [
        f"| equivalent (no observable change; each says why) | {by_class.get('equivalent', 0)} |",
        f"| written down as equivalent but killed (`misclassified`) | {by_class.get('misclassified', 0)} |",
        f"| open (`unclassified`) | {by_class.get('unclassified', 0)} |",
    ]
    others = {
        k: v
        for k, v in by_class.items()
        if k not in {f.kills_as for f in FINAL_CHECKS} | {"equivalent", "misclassified", "unclassified"}
    }
    if others:
        lines.append(f"| other classes | {', '.join(f'{k} {v}' for k, v in sorted(others.items()))} |")
    for target in summary.get("classified_for_other_versions", []):
        lines += [
            "",
            f"**Stale:** the hand-written classifications of `{target}` were made for another version of it"
            " (its sha256 differs from `CLASSIFIED_FOR`): re-key them before trusting its classes.",
        ]
    if summary["notes"]:
        lines += ["", "## Reading (written by hand after the run)", "", summary["notes"].rstrip()]
    lines += [
        "",
        "## Generated detail",
        "",
        f"Tested {summary['tested']}; killed / tested = {summary['score_killed_over_tested']}. Timed-out mutants were"
        f" run once more alone (reruns: {len(state.get('reruns', {}))}); the table counts the rerun's outcome."
        f" Skipped: mutants wholly inside an annotation ({t.get('skipped_annotation', 0)}), never run: every target has"
        " `from __future__ import annotations`, so an annotation is a string nothing evaluates.",
        "",
        "Survivors by classification: "
        + ", ".join(f"{k} {v}" for k, v in sorted(summary["survivors_by_class"].items())),
        "",
        "## Survivors",
        "",
    ]
    for r in summary["mutants"]:
        if r["outcome"] != "survived":
            continue
        lines.append(f"### `{r['file']}:{r['line']}` {r['operator']} #{r['occurrence']} ({r['function']})")
        lines.append("")
        lines.append("```diff")
        lines.extend(r["diff"])
        lines.append("```")
        lines.append(f"**{r['classification']}**: {r['why']}")
        if r["suite_verdicts"]:
            lines.append(f"The suite's own summary: {'; '.join(r['suite_verdicts'])}.")
        for label, c in r["checks"].items():
            by = f" ({c['killed_by']})" if c["killed_by"] else ""
            lines.append(f"- check *{label}*: {c['outcome']}{by}")
        lines.append("")
    lines += ["## Checks (survivors run again under another command)", ""]
    for label, c in summary["checks"].items():
        lines.append(f"- *{label}*: `pytest {c['args']}` ({c['at']})")
    lines.append("")
    return "\n".join(lines) + "\n"


def _cr_version() -> str:
    from importlib.metadata import version

    return version("cosmic-ray")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=("setup", "run", "rerun", "check", "finals", "report", "all"))
    parser.add_argument("--source", default=str(REPO), help="the repository to clone (default: this one)")
    parser.add_argument("--work", default="/tmp/mutscore", help="scratch folder (the clone, worker copies, sessions)")
    parser.add_argument("--workers", type=int, default=2, help="mutants tested at once (default 2: a 2-core machine)")
    parser.add_argument("--suite-python", default=str(REPO / ".venv/bin/python"), help="the Python the suite runs in")
    parser.add_argument("--baseline-runs", type=int, default=2, help="baselines measured; the slowest sets the timeout")
    parser.add_argument("--timeout", type=float, help=f"per-mutant timeout (default {TIMEOUT_FACTOR}× the baseline)")
    parser.add_argument("--deadline", help="UTC HH:MM after which no new mutant is started")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/mutation-score"), help="results path stem")
    parser.add_argument("--check-args", default=SUITE_ARGS.split(" ", 2)[2], help="check: pytest arguments")
    parser.add_argument("--notes", help="report: a Markdown file of hand-written reading to include")
    parser.add_argument("--again", action="store_true", help="check: also the mutants checked under this label")
    parser.add_argument("--check-label", help="check: the name its results are kept under (default: the arguments)")
    parser.add_argument(
        "--keys", nargs="*", help="check: these mutants (file:line:operator:occurrence); default survivors"
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers={args.workers} must be >= 1")
    layout = Layout(Path(args.work), args.workers)
    phases = ("setup", "run", "rerun", "finals", "report") if args.phase == "all" else (args.phase,)
    for phase in phases:
        {"setup": setup, "run": run, "rerun": rerun, "check": check, "finals": finals, "report": report}[phase](
            args, layout
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
