"""The conformance report: JSON (``--mnnvl-report=PATH``) and a Markdown twin next to it (``PATH.md``).

JSON schema (version 1): ``manager`` (spec, description, shape, policy), ``backend``, ``environment``
(python, platform, torch, flashinfer, hostname, CPUs), ``topologies``, ``hypothesis`` (profile,
seed), ``strict``, ``exit_status``, ``invariants`` (name → level, status
pass|fail|manager_error|infrastructure|waived|skip|not_run, ``failure_kind``, gating, tests with outcome,
duration and — when one failed — ``failure_kind`` violation|manager_error|infrastructure and, for the last
two, ``failure`` (kind, summary, detail), ``counterexample``: the violation with its minimal plan),
``failure_kinds`` (how many tests failed of each kind), ``broken_topologies`` (the failure that ended a
topology: test, failure_kind, error, the tests skipped after it),
``examples_run``, ``rebuilds`` (plan runs, initialize calls, rebuilds, largest bytes per rank),
``timings`` and ``waivers`` (``--mnnvl-waivers``; null without it: file, counts, and per entry its
status applied|stale|expired|unused and the tests it matched with their outcome). ``waived`` and
``waivers`` were added to version 1 without a bump: readers that ignore them see the same verdicts,
except that a waived invariant is no longer ``fail``; so were the failure kinds: an invariant whose test
ended in a manager or infrastructure error is no longer ``fail`` (no invariant was found violated), and
``broken_topologies`` values became objects (they were the error's type name); and ``interrupted``
(true when the session ended before its tests did: a signal, Ctrl-C, ``pytest.exit``; ``exit_status`` is then
never 0) with ``interruption`` (``signals``: SIGINT/SIGTERM in the order received, ``reason``: what pytest saw
stop the run; null when not interrupted); and ``launcher.gpu_sharing`` (spawned ranks on the flashinfer backend,
else null: ``ranks_per_gpu``, per topology ``worlds`` with ranks, gpus, ranks_per_gpu and shared, or skipped,
``mps`` with mode, on and reason, ``nvlink_exercised`` and a ``note``).

The files are written whole or not at all (a temporary file, then ``os.replace``). The path is checked at
configure time (:func:`check_path`), and a session holds ``PATH.lock`` (:class:`ReportLock`) so that a second
session given the same path is told whose report it would overwrite.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import importlib.metadata
import json
import os
import platform
import socket
import stat
import tempfile
import time
from typing import TYPE_CHECKING, Any

import pytest_mnnvl
from pytest_mnnvl.conformance.catalog import INVARIANTS, SHOULD
from pytest_mnnvl.errors import FailureKind

if TYPE_CHECKING:
    from collections.abc import Iterable

    import pytest

    from pytest_mnnvl.conformance.recorder import Halt, Recorder
    from pytest_mnnvl.worlds.interrupts import Interruption

SCHEMA_VERSION = 1


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count(),
        "torch": _version("torch"),
        "flashinfer": _version("flashinfer-python"),
        "hypothesis": _version("hypothesis"),
        # The imported package's own version: a run from a source tree (the GPU suite) has no dist metadata.
        "pytest_mnnvl": pytest_mnnvl.__version__,
    }


#: An invariant's status when its tests failed, by the kind that decides it (the first kind present wins:
#: a violation found by one test outweighs another test's crash).
FAILED_STATUS = {
    FailureKind.VIOLATION: "fail",
    FailureKind.MANAGER_ERROR: "manager_error",
    FailureKind.INFRASTRUCTURE: "infrastructure",
}


def verdicts(recorder: Recorder) -> dict[str, dict[str, Any]]:
    """Per invariant: fail if any of its tests found a violation that no waiver covers, else
    manager_error or infrastructure if one failed without a violation (the manager raised or crashed
    outside any check; a rank killed from outside, the harness), else waived if a waiver covered a
    failure, else pass if any passed, else skip (or not_run when no test of it ran). A waived test keeps
    its violation (``counterexample``)."""
    out: dict[str, dict[str, Any]] = {}
    for name in INVARIANTS:
        tests = [t for t in recorder.ordered_tests() if t.get("invariant") == name and "outcome" in t]
        violations = [t["violation"] for t in tests if "violation" in t]
        failed = [t for t in tests if not t.get("waived") and ("violation" in t or t["outcome"] == "failed")]
        kinds = {FailureKind(t.get("failure_kind", FailureKind.VIOLATION.value)) for t in failed}
        kind = next((k for k in FAILED_STATUS if k in kinds), None)
        if kind is not None:
            status = FAILED_STATUS[kind]
        elif any(t.get("waived") for t in tests):
            status = "waived"
        elif any(t["outcome"] == "passed" for t in tests):
            status = "pass"
        elif tests:
            status = "skip"
        else:
            status = "not_run"
        out[name] = {
            "level": "should" if name in SHOULD else "must",
            "status": status,
            "failure_kind": kind.value if kind is not None else None,
            "tests": tests,
            "counterexample": violations[0] if violations else None,
            "violated": sorted({v["invariant"] for v in violations}),
            "judged_on": "sim" if any(t.get("judged_on") == "sim" for t in tests) else None,
        }
    return out


def status_text(verdict: dict[str, Any]) -> str:
    """An invariant's status as the terminal and Markdown show it: with where it was judged when that is not the
    session's backend (an invariant of the catalog's SIM_JUDGED in a session on GPUs)."""
    judged_on = verdict.get("judged_on")
    return f"{verdict['status']} (judged on the {judged_on})" if judged_on else str(verdict["status"])


def build(
    config: pytest.Config, recorder: Recorder, exit_status: int, interruption: Interruption | None = None
) -> dict[str, Any]:
    from pytest_mnnvl.session import MANAGER_KEY, SETTINGS_KEY, resolve_backend

    settings = config.stash[SETTINGS_KEY]
    manager = config.stash.get(MANAGER_KEY, None)
    return {
        "schema_version": SCHEMA_VERSION,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "manager": {
            "spec": settings.manager,
            "description": manager.describe() if manager else settings.manager,
            "shape": manager.shape if manager else None,
            "policy": manager.policy if manager else None,
        },
        "backend": resolve_backend(config),
        "environment": environment(),
        "topologies": [f"ws{ws}-pp{pp}" for ws, pp in settings.topologies()],
        "hypothesis": {"profile": recorder.profile, "seed": config.getoption("hypothesis_seed", None)},
        "strict": settings.strict,
        "exit_status": exit_status,
        "interrupted": interruption is not None,
        "interruption": interruption.to_dict() if interruption is not None else None,
        "invariants": verdicts(recorder),
        "examples_run": recorder.examples,
        "rebuilds": {
            "plan_runs": recorder.plan_runs,
            "cache_hits": recorder.cache_hits,
            "initialize_calls": recorder.initialize_calls,
            "rebuilds": recorder.rebuilds,
            "max_size_per_rank": recorder.max_size_per_rank,
        },
        "timings": {"session_s": round(time.time() - recorder.started, 2), "plans_s": round(recorder.plan_seconds, 2)},
        "failure_kinds": failure_kinds(recorder),
        "broken_topologies": {halt.topology: halt.to_dict() for halt in _in_order(recorder, recorder.broken.values())},
        "compatibility": compatibility(recorder),
        "manager_load_error": (
            {"test": recorder.load_error[0], "error": recorder.load_error[1]} if recorder.load_error else None
        ),
        "launcher": launcher(config),
        "waivers": waivers(config),
    }


def failure_kinds(recorder: Recorder) -> dict[str, int]:
    """How many tests failed (no waiver covering them) of each kind."""
    counts = {kind.value: 0 for kind in FailureKind}
    for t in recorder.tests.values():
        if t.get("outcome") == "failed" and "failure_kind" in t:
            counts[t["failure_kind"]] += 1
    return counts


def errors(recorder: Recorder) -> list[str]:
    """One line per test that failed without a violation: whom it blames, why, and what it stopped."""
    halts = {halt.nodeid: halt for halt in recorder.broken.values()}
    lines = []
    for nodeid, failure in sorted(recorder.failures.items(), key=lambda pair: recorder.position(pair[0])):
        incompatible = failure.incompatibility
        if incompatible is not None and nodeid in halts:  # the topology's compatibility verdict, once
            ended = halts[nodeid]
            verdict = {**incompatible.to_dict(), "topology": ended.topology, "skipped": len(ended.skipped)}
            lines.append(f"{compatibility_line(verdict)}; found by {nodeid}")
            continue
        line = f"{failure.label} in {nodeid}: {failure.summary} (no invariant blamed, no plan saved)"
        halt = halts.get(nodeid)
        if halt is not None and halt.kind is failure.kind and halt.skipped:
            n = len(halt.skipped)
            line += f"; {n} later test{'' if n == 1 else 's'} of {halt.topology} skipped"
        lines.append(line)
    return lines


def compatibility(recorder: Recorder) -> list[dict[str, Any]]:
    """One compatibility verdict per topology it ended (:mod:`pytest_mnnvl.managers.compat`): the verdict, the
    topology, the test that found it and how many later tests it skipped."""
    out = []
    for halt in _in_order(recorder, recorder.broken.values()):
        incompatible = halt.incompatibility
        if incompatible is not None:
            where = {"topology": halt.topology, "test": halt.nodeid, "skipped": len(halt.skipped)}
            out.append({**incompatible.to_dict(), **where})
    return out


def compatibility_line(verdict: dict[str, Any]) -> str:
    """``incompatible: vllm 0.32.0 with FlashInfer 0.7.4: fails at build: ... (ws2-pp1: 12 tests skipped)``"""
    n = verdict["skipped"]
    return f"incompatible: {verdict['verdict']} ({verdict['topology']}: {n} later test{'' if n == 1 else 's'} skipped)"


def _in_order(recorder: Recorder, halts: Iterable[Halt]) -> list[Halt]:
    """Halts in the order of the tests that caused them (an xdist controller hears of them as workers finish)."""
    return sorted(halts, key=lambda halt: recorder.position(halt.nodeid))


def waivers(config: pytest.Config) -> dict[str, Any] | None:
    from pytest_mnnvl.conformance.waivers import LEDGER_KEY

    ledger = config.stash.get(LEDGER_KEY, None)
    return ledger.section() if ledger is not None else None


def launcher(config: pytest.Config) -> dict[str, Any]:
    """How the ranks ran: ``spawn`` (the pool; on GPUs with ``gpu_sharing``: each topology's ranks per GPU, MPS,
    whether NVLink was exercised), or ``torchrun`` with its world, hosts and any plan disagreement."""
    from pytest_mnnvl.session import session_of, sharing_summary

    spmd = session_of(config)
    if spmd is None:
        summary = sharing_summary(config)
        return {"kind": "spawn", "gpu_sharing": summary.to_dict() if summary is not None else None}
    return {
        "kind": "torchrun",
        "world_size": spmd.world_size,
        "written_by_rank": spmd.rank,
        "hosts": spmd.hosts,
        "gone_ranks": sorted(spmd.dead),
        "plan_disagreements": spmd.plan_disagreements,
    }


def _outcome(test: dict[str, Any]) -> str:
    """``passed``, ``failed``, or ``error (manager_error)`` for a test that failed without a violation."""
    kind = test.get("failure_kind")
    if test["outcome"] == "failed" and kind in (FailureKind.MANAGER_ERROR.value, FailureKind.INFRASTRUCTURE.value):
        return f"error ({kind})"
    return str(test["outcome"])


#: What a counterexample without its own command (an older report's) says to run.
_DEFAULT_COMMAND = "python -m pytest_mnnvl explain|repro PLAN.json"


def _sharing_lines(launched: dict[str, Any]) -> list[str]:
    """``- GPU worlds: ws4-pp1 4 ranks on 1 GPU (shared); MPS on; NVLink itself is not exercised ...``"""
    sharing = launched.get("gpu_sharing")
    if not sharing:
        return []
    worlds = []
    for topology, w in sharing["worlds"].items():
        if "skipped" in w:
            worlds.append(f"{topology} skipped")
        else:
            gpus = f"{w['gpus']} GPU{'' if w['gpus'] == 1 else 's'}"
            worlds.append(f"{topology} {w['ranks']} ranks on {gpus}" if w["shared"] else f"{topology} one GPU per rank")
    mps = sharing["mps"]
    label = {True: "on", False: "off", None: "unknown"}[mps["on"]]
    line = f"- GPU worlds (--mnnvl-ranks-per-gpu={sharing['ranks_per_gpu']}): {', '.join(worlds) or 'none'}; "
    line += f"MPS {label} (--mnnvl-mps={mps['mode']}: {mps['reason']})"
    return [line + (f"; {sharing['note']}" if sharing.get("note") else "")]


def markdown(data: dict[str, Any]) -> str:
    lines = [
        f"# MoE all-to-all conformance: `{data['manager']['spec']}`",
        "",
        f"- manager: {data['manager']['description']}",
        f"- backend: {data['backend']}; topologies: {', '.join(data['topologies'])}; strict: {data['strict']}",
        f"- hypothesis: profile {data['hypothesis']['profile']}, seed {data['hypothesis']['seed']}; "
        f"examples run: {data['examples_run']}",
        "- environment: " + ", ".join(f"{k} {v}" for k, v in data["environment"].items()),
        *_sharing_lines(data.get("launcher") or {}),
        f"- date: {data['date']}; session {data['timings']['session_s']} s; exit status {data['exit_status']}",
    ]
    if data.get("interrupted"):
        i = data["interruption"]
        by = f"by {', '.join(i['signals'])} " if i["signals"] else ""
        lines += [f"- **interrupted** {by}({i['reason']}): the verdicts cover only the tests that finished"]
    for verdict in data.get("compatibility") or []:
        lines += [f"- **{compatibility_line(verdict)}** (found by `{verdict['test']}`)"]
    if data.get("manager_load_error"):
        e = data["manager_load_error"]
        lines += [f"- **the manager could not be loaded in the ranks**: `{e['error']}` (traceback in `{e['test']}`)"]
    lines += [
        "",
        "| level | invariant | status | tests |",
        "| --- | --- | --- | --- |",
    ]
    for name, v in data["invariants"].items():
        outcomes = ", ".join(_outcome(t) for t in v["tests"]) or "-"
        shown = f"**{v['status']}**" + (f" (judged on the {v['judged_on']})" if v.get("judged_on") else "")
        lines.append(f"| {v['level'].upper()} | {name} | {shown} | {outcomes} |")
    errored = [t for v in data["invariants"].values() for t in v["tests"] if t.get("failure")]
    if errored:
        lines += ["", "## Errors (no invariant blamed, no plan saved)"]
    for t in errored:
        f = t["failure"]
        lines += ["", f"### {t['nodeid']}: {f['kind']}", "", f"- {f['summary']}"]
        if f["detail"]:
            lines += ["", "```", f["detail"], "```"]
    failures = [(n, v["counterexample"]) for n, v in data["invariants"].items() if v["counterexample"]]
    if failures:
        lines += ["", "## Counterexamples"]
    for name, c in failures:
        lines += [
            "",
            f"### {name}: {c['detail']}",
            "",
            f"- violated: `{c['invariant']}` ({c['level']}); {c['topology']}, stage {c['stage']}, layer {c['layer']} "
            f"{c['layer_name']}, ranks {c['ranks']}",
            f"- expected: `{c['expected']}`",
            f"- observed: `{c['observed']}`",
            f"- plan file: `{c['plan_path']}` (`{c.get('command') or _DEFAULT_COMMAND}`)",
            "",
            "```json",
            json.dumps(c["plan"], indent=2),
            "```",
        ]
    if data.get("waivers"):
        from pytest_mnnvl.conformance.waivers import describe

        w = data["waivers"]
        lines += ["", f"## Waivers (`{w['file']}`)", ""]
        lines += [f"- {describe(e)}" for e in w["entries"]] or ["- (none)"]
    r = data["rebuilds"]
    lines += [
        "",
        f"Plans run: {r['plan_runs']} (cache hits {r['cache_hits']}), initialize calls {r['initialize_calls']}, "
        f"rebuilds {r['rebuilds']}, largest workspace {r['max_size_per_rank']} B per rank.",
    ]
    return "\n".join(lines) + "\n"


def markdown_path(path: str) -> str:
    """The Markdown twin of a report path: ``r.json`` -> ``r.md``; any other name gets ``.md`` appended."""
    return (path[:-5] if path.endswith(".json") else path) + ".md"


def write(path: str, data: dict[str, Any]) -> None:
    """Both files, each whole or not at all: an interrupt, a full disk or a crash in the middle leaves the
    previous file (or none), never half a report; both are rendered before either is replaced."""
    texts = [(path, json.dumps(data, indent=2, default=repr) + "\n"), (markdown_path(path), markdown(data))]
    for name, text in texts:
        _write_whole(name, text)


def _write_whole(path: str, text: str) -> None:
    target = os.path.realpath(path)  # a symlinked report path keeps its link
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    try:
        mode: int | None = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):  # /dev/null, a FIFO: there is no file to replace
        with open(target, "w", encoding="utf-8") as fh:
            fh.write(text)
        return
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(temporary, stat.S_IMODE(mode) if mode is not None else 0o666 & ~_umask())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_path(path: str) -> None:
    """A usage error now rather than a traceback after the whole run: the report and its Markdown twin must
    be files this session can create (missing directories are created at the end)."""
    from pytest_mnnvl.errors import MnnvlUsageError

    option = f"--mnnvl-report={path!r}"
    allowed = f"allowed: a file path (the JSON report; the Markdown one goes next to it as {markdown_path(path)})"
    if not path.strip() or path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)):
        raise MnnvlUsageError(f"{option} is not valid: it names no file; {allowed}")
    for name in (path, markdown_path(path)):
        if os.path.isdir(name):
            raise MnnvlUsageError(f"{option}: {os.path.abspath(name)} is a directory; {allowed}")
    directory = os.path.dirname(os.path.realpath(path))
    existing = directory
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise MnnvlUsageError(f"{option}: {existing} is not a directory; {allowed}")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".mnnvl-report-probe-")
    except OSError as exc:
        why = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        where = existing if existing == directory else f"{existing} (to create {directory})"
        raise MnnvlUsageError(f"{option}: cannot create a file in {where}: {why}") from None
    os.close(fd)
    os.unlink(probe)
