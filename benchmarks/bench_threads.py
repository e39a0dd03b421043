"""What sizing each rank's torch thread pool to its share of the machine buys: ``examples/`` and the ``ci``
conformance suite on the sim, once with the default (``PYTEST_MNNVL_RANK_THREADS=share``: every rank gets
``OMP_NUM_THREADS`` = max(1, usable cores // ranks of the world)) and once as before (``=torch``: every rank's
pool has a thread per core, so N ranks oversubscribe the machine N times).

Each run is a real ``pytest`` session in a subprocess with ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` removed from
its environment. Recorded per run: wall time, exit status, JUnit counts, the five slowest tests, how many tests
ended in ``WorldTooSlow`` / ``WorldDeadlock``, and the header line that says what the ranks got. A run that
passes ``--cap`` seconds is stopped with SIGINT (pytest still writes its JUnit file; then SIGKILL after
``--grace``) and marked ``capped``: its wall time is a lower bound. The default cap keeps the whole benchmark
under 8 minutes on any machine (4 runs x (cap + grace)); ``--cap 0`` runs everything to the end.

``--configs`` names what runs: ``share`` and ``torch`` as above, each optionally with pytest-xdist workers
(``share-n8``: ``-n 8``, several worlds at once, each rank's share then divided by the workers too). That is how
a many-core machine is used: one world at a time is latency-bound, not compute-bound. A ``-cN`` suffix
(``share-c2``) runs the session on the first N of this process's CPUs (CPU affinity, inherited by every rank),
so a small machine is measured on the same big one, with the same CPUs and memory. A ``-spawn`` suffix
(``share-c2-spawn``) spawns every rank (``PYTEST_MNNVL_ZYGOTE=0``) instead of forking CPU ranks from a zygote.

Run::

    python benchmarks/bench_threads.py benchmarks/results/            # threads-cpu<N>-<date>.json and .md
    python benchmarks/bench_threads.py OUT --cap 0 --suites examples  # one suite, no cap
    python benchmarks/bench_threads.py OUT --configs share,share-n4,share-n8   # xdist workers on a big machine
    python benchmarks/bench_threads.py OUT --configs share-c2,share-n8         # 2 cores vs 16, one machine
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (HERE, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _environment import environment  # noqa: E402

from pytest_mnnvl.worlds import threads, zygote  # noqa: E402

#: What PYTEST_MNNVL_RANK_THREADS may say in a configuration.
POLICIES = ("share", "torch")
#: The configurations compared by default.
CONFIGS = ("share", "torch")
CONFIG_PATTERN = re.compile(r"(share|torch)(?:-n([1-9][0-9]*))?(?:-c([1-9][0-9]*))?(-spawn)?")
SUITES = ("examples", "conformance")
DEFAULT_CAP_S = 95.0
DEFAULT_GRACE_S = 15.0


@dataclass
class RunResult:
    suite: str
    config: str
    command: list[str]
    wall_s: float
    exit_status: int | None
    capped: bool
    header: str
    #: The session's ``mnnvl: rank starts:`` line (under xdist: summed over its workers).
    starts: str = ""
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    too_slow: int = 0
    deadlocks: int = 0
    slowest: list[tuple[str, float]] = field(default_factory=list)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: Where the wall time went, per process of the session (the main one, each xdist worker).
    timeline: list[ProcessTimeline] = field(default_factory=list)


@dataclass
class ProcessTimeline:
    """One process of a benchmarked session, in seconds from the session's launch: when it was ready to run tests,
    when its first test began and its last ended, how long its tests took in all, and its longest test."""

    process: str
    ready_s: float
    first_test_s: float | None
    last_test_end_s: float | None
    tests: int
    tests_s: float
    longest: str = ""
    longest_s: float = 0.0


def read_timeline(directory: str, launched: float) -> list[ProcessTimeline]:
    """What ``_timeline_plugin`` wrote for each process of one session (none where it wrote nothing)."""
    found: list[ProcessTimeline] = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            stamps = json.load(f)
        tests = [(nodeid, start, end) for nodeid, start, end in stamps["tests"] if end is not None]
        longest = max(tests, key=lambda t: t[2] - t[1], default=None)
        found.append(
            ProcessTimeline(
                name.removesuffix(".json"),
                round(stamps.get("collected", stamps.get("sessionstart", launched)) - launched, 2),
                round(tests[0][1] - launched, 2) if tests else None,
                round(tests[-1][2] - launched, 2) if tests else None,
                len(tests),
                round(sum(end - start for _, start, end in tests), 2),
                longest[0].rpartition("::")[2] if longest else "",
                round(longest[2] - longest[1], 2) if longest else 0.0,
            )
        )
    return found


def log(message: str) -> None:
    print(f"[bench_threads {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def conformance_dir() -> str:
    """The suite's directory (``conformance/``, or where a newer checkout keeps it)."""
    for candidate in ("conformance", os.path.join("pytest_mnnvl", "conformance")):
        if os.path.exists(os.path.join(ROOT, candidate, "test_invariants.py")):
            return candidate
    raise SystemExit("bench_threads: no conformance suite (conformance/test_invariants.py) in this checkout")


@dataclass(frozen=True)
class Config:
    """One configuration: the rank thread policy, xdist workers (0: none), CPUs (0: all this process has), and
    whether every rank is spawned (no zygote)."""

    policy: str
    workers: int = 0
    cpus: int = 0
    spawn: bool = False


def parse_config(label: str, available: int | None = None) -> Config:
    """``share`` / ``torch`` / ``share-n8`` / ``share-n2-c2``; ValueError names the label (and a CPU count this
    process does not have, when ``available`` is given)."""
    match = CONFIG_PATTERN.fullmatch(label)
    if match is None:
        raise ValueError(
            f"configuration {label!r} is not valid; allowed: share or torch, optionally -n<workers>, then -c<cpus>, "
            "then -spawn"
        )
    config = Config(match.group(1), int(match.group(2) or 0), int(match.group(3) or 0), bool(match.group(4)))
    if available is not None and config.cpus > available:
        raise ValueError(f"configuration {label!r} asks for {config.cpus} CPUs; this process may use {available}")
    return config


def cpu_set(cpus: int) -> set[int] | None:
    """The first ``cpus`` CPUs of this process's affinity (None: all of them)."""
    if not cpus:
        return None
    return set(sorted(os.sched_getaffinity(0))[:cpus])


def command_for(suite: str, junit: str, report: str, workers: int = 0) -> list[str]:
    # -vv: the session then says how its ranks started (forked from a zygote, or spawned and why).
    base = [sys.executable, "-m", "pytest", "-p", "pytest_mnnvl", "-p", "no:cacheprovider", "-rN", "-vv"]
    base += ["-p", "_timeline_plugin"]  # from this directory (PYTHONPATH): where each process's time went
    base += ["--mnnvl-backend=sim", f"--junitxml={junit}"]
    if workers:
        base += ["-n", str(workers)]
    if suite == "examples":
        return [*base, "examples/"]
    return [*base, conformance_dir() + "/", f"--mnnvl-report={report}"]


def run_one(suite: str, config: str, cap: float, grace: float, work: str, attempt: int = 0) -> RunResult:
    junit = os.path.join(work, f"{suite}-{config}-{attempt}.xml")
    report = os.path.join(work, f"{suite}-{config}-{attempt}-report", "report.json")
    parsed = parse_config(config)
    command = command_for(suite, junit, report, parsed.workers)
    env = {k: v for k, v in os.environ.items() if k not in threads.USER_VARIABLES}
    env[threads.POLICY_ENV] = parsed.policy
    env.pop(zygote.ZYGOTE_ENV, None)
    if parsed.spawn:
        env[zygote.ZYGOTE_ENV] = "0"
    cpus = cpu_set(parsed.cpus)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["PYTHONPATH"] = HERE + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["MNNVL_TIMELINE_DIR"] = timeline_dir = os.path.join(work, f"{suite}-{config}-{attempt}-timeline")
    log(f"{suite} / {config}: {' '.join(command[1:])}")
    load_before = os.getloadavg()
    launched = time.time()
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        capped = False
        try:
            proc.wait(timeout=cap if cap > 0 else None)
        except subprocess.TimeoutExpired:
            capped = True
            log(f"{suite} / {config}: past the {cap:g} s cap, SIGINT")
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        wall = time.monotonic() - t0
        out.seek(0)
        text = out.read()
    header = next((line for line in text.splitlines() if line.startswith("mnnvl: rank threads:")), "")
    starts = next((line for line in text.splitlines() if line.startswith("mnnvl: rank starts:")), "")
    result = RunResult(
        suite,
        config,
        command[1:],
        round(wall, 2),
        proc.returncode,
        capped,
        header,
        starts,
        load_before=load_before,
        load_after=os.getloadavg(),
    )
    _read_junit(junit, result)
    result.timeline = read_timeline(timeline_dir, launched)
    log(
        f"{suite} / {config}: {wall:.1f} s, exit {proc.returncode}{' (capped)' if capped else ''}, "
        f"{result.tests} tests, {result.failures} failed, {result.errors} errors, {result.skipped} skipped"
    )
    if proc.returncode not in (0, 1) and not capped:
        log(f"{suite} / {config}: unexpected exit; last output:\n{text[-3000:]}")
    return result


def _read_junit(path: str, result: RunResult) -> None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    for s in suites:
        result.tests += int(s.get("tests", 0))
        result.failures += int(s.get("failures", 0))
        result.errors += int(s.get("errors", 0))
        result.skipped += int(s.get("skipped", 0))
    cases = [(f"{c.get('classname')}::{c.get('name')}", float(c.get("time", 0))) for c in root.iter("testcase")]
    result.slowest = sorted(cases, key=lambda c: -c[1])[:5]
    # Tests that failed or erred on a late call, by the verdict's type in their report.
    for case in root.iter("testcase"):
        text = " ".join((e.get("message") or "") + (e.text or "") for e in case if e.tag in ("failure", "error"))
        result.too_slow += "WorldTooSlow" in text
        result.deadlocks += "WorldDeadlock" in text


def markdown(data: dict[str, Any]) -> str:
    env = data["environment"]
    lines = [
        f"# Rank threads: {' vs '.join(data['configs'])} ({env['date']})",
        "",
        f"Machine: {env.get('cpu', '?')}, {data['usable_cores']} usable cores ({env['cores']} online), "
        f"Python {env['python']}, torch {env['torch']}, FlashInfer {env['flashinfer']}; cap {data['cap_s']:g} s "
        "per run (0: none). `share` is the default (`OMP_NUM_THREADS` = max(1, usable cores // (ranks × xdist "
        "workers))); `torch` is "
        "the behaviour before (`PYTEST_MNNVL_RANK_THREADS=torch`: a thread per core in every rank); `-nW`: "
        "W pytest-xdist workers, several worlds at once; `-cN`: the session on N of the machine's CPUs (affinity); "
        "`-spawn`: every rank spawned (no zygote).",
        "",
        "| suite | config | wall (s) | exit | tests | failed | errors | skipped | WorldTooSlow | WorldDeadlock "
        "| load before → after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["runs"]:
        wall = f"≥ {r['wall_s']:.1f} (capped)" if r["capped"] else f"{r['wall_s']:.1f}"
        load = f"{r['load_before'][0]:.1f} → {r['load_after'][0]:.1f}"
        lines.append(
            f"| {r['suite']} | {r['config']} | {wall} | {r['exit_status']} | {r['tests']} | {r['failures']} | "
            f"{r['errors']} | {r['skipped']} | {r['too_slow']} | {r['deadlocks']} | {load} |"
        )
    lines.append("")
    base = data["configs"][0]
    for suite, ratios in data["speedup"].items():
        walls = data["median_wall_s"][suite]
        counts = {c: sum(1 for r in data["runs"] if r["suite"] == suite and r["config"] == c) for c in walls}
        shown = ", ".join(f"{config} {wall:.1f} s ({counts[config]} run(s))" for config, wall in walls.items())
        against = "; ".join(f"{base} / {config} = **{ratio}**" for config, ratio in ratios.items())
        tail = f": {against}" if against else ""
        lines.append(f"- {suite}: median wall {shown}{tail}")
    lines.append("")
    lines.append("What the ranks got (the session header):")
    lines.append("")
    for header in dict.fromkeys(f"{r['config']}: `{r['header'] or '(no header line)'}`" for r in data["runs"]):
        lines.append(f"- {header}")
    starts = [f"{r['suite']} / {r['config']}: `{r['starts']}`" for r in data["runs"] if r.get("starts")]
    if starts:
        lines += ["", "How the ranks started:", "", *(f"- {line}" for line in starts)]
    timelines = [r for r in data["runs"] if r.get("timeline")]
    if timelines:
        lines += [
            "",
            "Where each run's time went (seconds from the session's launch; per process: the main one or an xdist "
            "worker; ready = its tests collected):",
            "",
            "| suite | config | process | ready | first test | last test ended | tests | in tests | longest test |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in timelines:
            for p in r["timeline"]:
                first = "" if p["first_test_s"] is None else f"{p['first_test_s']:.1f}"
                last = "" if p["last_test_end_s"] is None else f"{p['last_test_end_s']:.1f}"
                lines.append(
                    f"| {r['suite']} | {r['config']} | {p['process']} | {p['ready_s']:.1f} | {first} | {last} | "
                    f"{p['tests']} | {p['tests_s']:.1f} | {p['longest']} {p['longest_s']:.1f} s |"
                )
    lines.append("")
    lines.append("Slowest tests per run:")
    lines.append("")
    for r in data["runs"]:
        slow = ", ".join(f"{name.rpartition('::')[2]} {t:.1f} s" for name, t in r["slowest"])
        lines.append(f"- {r['suite']} / {r['config']}: {slow}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="directory for threads-cpu<N>-<date>.json and .md")
    parser.add_argument("--cap", type=float, default=DEFAULT_CAP_S, help="seconds per run before SIGINT (0: none)")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, help="seconds after SIGINT before SIGKILL")
    parser.add_argument("--suites", default=",".join(SUITES), help="comma-separated: examples, conformance")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per suite and configuration, in ABBA order (medians compared)"
    )
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="comma-separated: share or torch, optionally -n<workers>, then -c<cpus>, then -spawn "
        "(share-n8, share-c2-spawn); the first is the baseline",
    )
    args = parser.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    try:
        for config in configs:
            parse_config(config, len(os.sched_getaffinity(0)))
    except ValueError as exc:
        parser.error(f"--configs={args.configs!r}: {exc}")
    if not configs or len(set(configs)) != len(configs):
        parser.error(f"--configs={args.configs!r} is not valid; allowed: distinct configurations, at least one")
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    bad = [s for s in suites if s not in SUITES]
    if bad or not suites:
        parser.error(f"--suites={args.suites!r} is not valid; allowed: a comma-separated list of {', '.join(SUITES)}")
    if args.cap < 0 or args.grace < 0:
        parser.error("--cap and --grace must be >= 0")
    if args.repeat < 1:
        parser.error(f"--repeat={args.repeat} is not valid; allowed: an integer >= 1")
    os.makedirs(args.out_dir, exist_ok=True)
    runs: list[RunResult] = []
    machine = environment("sim")  # once: it imports torch (and FlashInfer from a bundle) in this process
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as work:
        for suite in suites:
            for i in range(args.repeat):
                # ABBA: both configurations see the same drift in the machine's load.
                for config in configs if i % 2 == 0 else tuple(reversed(configs)):
                    runs.append(run_one(suite, config, args.cap, args.grace, work, i))
                    # After every run: a benchmark stopped part-way (a time limit) keeps what it measured.
                    write_results(args.out_dir, machine, runs, configs, args.cap, args.repeat)


def write_results(
    out_dir: str, machine: dict[str, Any], runs: list[RunResult], configs: list[str], cap: float, repeat: int
) -> None:
    """The JSON and Markdown of the runs so far (medians over the runs each configuration has had)."""
    speedup: dict[str, dict[str, str]] = {}
    medians: dict[str, dict[str, float]] = {}
    base = configs[0]
    by_suite: dict[str, dict[str, list[RunResult]]] = {}
    for r in runs:
        by_suite.setdefault(r.suite, {}).setdefault(r.config, []).append(r)
    for suite, by_config in by_suite.items():
        ran = [c for c in configs if c in by_config]
        walls = {c: statistics.median(r.wall_s for r in by_config[c]) for c in ran}
        medians[suite] = walls
        capped = {c: any(r.capped for r in by_config[c]) for c in ran}
        speedup[suite] = {}
        for config in [c for c in configs[1:] if c in walls and base in walls]:
            # base / config: > 1 when the configuration is faster than the baseline.
            ratio = f"{walls[base] / walls[config]:.2f}×" if walls[config] > 0 else "n/a"
            bound = {(True, False): "≥ ", (False, True): "≤ "}.get((capped[base], capped[config]), "")
            if capped[base] and capped[config]:
                ratio, bound = "n/a (both capped)", ""
            speedup[suite][config] = bound + ratio
    data = {
        "benchmark": "bench_threads",
        "environment": machine,
        "usable_cores": threads.usable_cores(),
        "cap_s": cap,
        "repeat": repeat,
        "configs": configs,
        "runs": [asdict(r) for r in runs],
        "median_wall_s": medians,
        "speedup": speedup,
    }
    date = datetime.date.today().isoformat()
    tag = "" if tuple(configs) == CONFIGS else "-" + "-".join(configs)
    stem = os.path.join(out_dir, f"threads-cpu{threads.usable_cores()}{tag}-{date}")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(data))
    log(f"wrote {stem}.json and {stem}.md ({len(runs)} run(s) so far)")


if __name__ == "__main__":
    main()
