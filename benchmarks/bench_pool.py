"""What the warm rank pool buys, and what the plugin costs: measured side by side in one run.

Run (CPU is enough; about 4 minutes on 2 cores)::

    python benchmarks/bench_pool.py --out benchmarks/results/

Writes ``pool-<machine>-<date>.json`` (every sample, the machine and versions) and a short ``.md`` table
next to it. Four measurements, each against one of the project's performance targets:

1. **per call**: one small realistic call (all-reduce of 4 KiB + barrier in the EP group) on a warm
   :class:`~pytest_mnnvl.worlds.pool.World` (started once; start reported apart) versus spawning a world per
   call the way vLLM's ``_spawn_workers`` does (``torch.multiprocessing`` spawn context, one ``Process``
   per rank, gloo over ``tcp://127.0.0.1:<free port>``, result through a queue,
   ``destroy_process_group``, parent joins all). World sizes 2 and 4, backends ``plain`` and ``sim``
   (``sim`` is recorded as failed and skipped if it does not start). Target: ratio ≥ 20×.
2. **crash verdict**: a rank writes ``time.time()`` to a file and SIGKILLs itself while its peers wait
   in a barrier; latency = the moment :class:`~pytest_mnnvl.errors.RankCrashed` reaches the caller minus
   that stamp (the world's restart before each trial is timed apart). Target: ≤ 2 s.
3. **deadlock verdict**: rank 0 skips a barrier the others enter, with call timeouts 1, 2 and 5 s;
   overshoot = (time until :class:`~pytest_mnnvl.errors.WorldDeadlock`) − timeout. Target: ≤ 2 s.
4. **plugin load**: ``pytest --co -q`` on a tiny test directory with ``-p pytest_mnnvl`` versus
   ``-p no:pytest_mnnvl``, alternating, in fresh interpreters; median difference. Target: < 50 ms.
   Plus ``python -X importtime -c "import pytest_mnnvl.plugin"``: the pytest_mnnvl modules' times.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (HERE, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import _bench_pool_fns as fns  # noqa: E402  (after the path set-up; ranks import it by this name)

from pytest_mnnvl.errors import RankCrashed, WorldDeadlock  # noqa: E402
from pytest_mnnvl.worlds.pool import World, WorldSpec  # noqa: E402

#: The project's performance targets: warm ≥ 20× cheaper than spawning, verdicts within 2 s, plugin load < 50 ms.
TARGET_RATIO = 20.0
TARGET_CRASH_S = 2.0
TARGET_DEADLOCK_OVERSHOOT_S = 2.0
TARGET_PLUGIN_MS = 50.0


# -- helpers ---------------------------------------------------------------------------------------


def summary(samples: Sequence[float]) -> dict[str, float]:
    """median / p90 / min / max / mean of ``samples`` (seconds in, seconds out)."""
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "p90": p90,
        "min": ordered[0],
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
    }


def log(message: str) -> None:
    print(f"[bench_pool {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_info() -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    import torch

    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.is_available(),
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_error(exc: BaseException, limit: int = 1500) -> str:
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return text if len(text) <= limit else text[:limit] + " …"


# -- 1. per call: warm pool vs spawn per call ------------------------------------------------------


class WarmWorld:
    """One warm world under test: started (and its start timed) once, then timed in blocks of calls."""

    def __init__(self, world_size: int, backend: str, warmup: int) -> None:
        self.world_size = world_size
        self.backend = backend
        self.world = World(WorldSpec(world_size, 1, backend), timeout=60.0)
        self.step_times: list[float] = []
        self.noop_times: list[float] = []
        t0 = time.perf_counter()
        self.world.pids  # noqa: B018 - starts the world
        self.startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        first = self.world.run(fns.pool_step)
        self.first_call = time.perf_counter() - t0
        expected = float(world_size * (world_size + 1) // 2)
        if first != [expected] * world_size:
            raise AssertionError(f"wrong all-reduce result {first}, expected {expected}")
        for _ in range(warmup):
            self.world.run(fns.pool_step)

    def block(self, calls: int) -> None:
        """``calls`` timed step calls, each followed by a timed no-op call (both see the same machine state)."""
        for _ in range(calls):
            t0 = time.perf_counter()
            self.world.run(fns.pool_step)
            self.step_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            self.world.run(fns.pool_noop)
            self.noop_times.append(time.perf_counter() - t0)

    def finish(self) -> dict[str, Any]:
        starts = self.world.starts
        self.world.close()
        if starts != 1:
            raise AssertionError(f"the world restarted during the benchmark ({starts} starts)")
        return {
            "startup_s": self.startup,
            "first_call_s": self.first_call,
            "call_s": summary(self.step_times),
            "noop_call_s": summary(self.noop_times),
            "samples_s": self.step_times,
        }


def spawn_world_once(world_size: int) -> float:
    """One call the vLLM way: spawn ``world_size`` processes, rendezvous over TCP, run, tear down, join."""
    import torch.multiprocessing as mp

    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=fns.spawn_worker, args=(rank, world_size, port, results)) for rank in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    outcomes = [results.get(timeout=10) for _ in range(world_size)]
    results.close()
    results.join_thread()
    elapsed = time.perf_counter() - t0
    bad = [o for o in outcomes if o[1] != "ok"] + [f"exit {p.exitcode}" for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"spawned world failed: {bad}")
    expected = float(world_size * (world_size + 1) // 2)
    if sorted(o[2] for o in outcomes) != [expected] * world_size:
        raise AssertionError(f"wrong all-reduce result {outcomes}")
    return elapsed


def bench_per_call(
    world_size: int, backends: Sequence[str], calls: int, spawn_worlds: int, warm_up_spawn: bool
) -> list[dict[str, Any]]:
    """Warm worlds of every backend, timed in blocks interleaved with spawned worlds (same load for both)."""
    warm: dict[str, WarmWorld] = {}
    rows: dict[str, dict[str, Any]] = {b: {"backend": b, "world_size": world_size} for b in backends}
    try:
        for backend in backends:
            log(f"world {world_size}: starting warm {backend} world")
            try:
                warm[backend] = WarmWorld(world_size, backend, warmup=10)
            except Exception as exc:
                rows[backend]["error"] = short_error(exc)
                log(f"  {backend} world {world_size} failed, skipped: {rows[backend]['error'].splitlines()[0]}")
        if warm_up_spawn:
            spawn_world_once(world_size)  # warm the page cache: not counted
        spawn_times: list[float] = []
        per_block = -(-calls // spawn_worlds)
        for i in range(spawn_worlds):
            log(f"world {world_size}: round {i + 1}/{spawn_worlds}: 1 spawned world, {per_block} warm calls each")
            spawn_times.append(spawn_world_once(world_size))
            for w in warm.values():
                w.block(min(per_block, calls - len(w.step_times)))
        spawn_summary = summary(spawn_times)
        spawn: dict[str, Any] = {"call_s": spawn_summary, "samples_s": spawn_times}
        for backend, w in list(warm.items()):
            del warm[backend]
            result = w.finish()
            ratio = spawn_summary["median"] / result["call_s"]["median"]
            rows[backend].update(warm=result, spawn=spawn, ratio=ratio)
    finally:
        for w in warm.values():
            w.world.close()
    return list(rows.values())


# -- 2. crash verdict latency ----------------------------------------------------------------------


def bench_crash(world_size: int, trials: int, victim: int) -> dict[str, Any]:
    world = World(WorldSpec(world_size, 1, "plain"), timeout=30.0)
    latencies: list[float] = []
    restarts: list[float] = []
    messages: list[str] = []
    stamp_dir = tempfile.mkdtemp(prefix="bench-crash-")
    try:
        for trial in range(trials):
            t0 = time.perf_counter()
            world.run(fns.pool_noop)  # (re)starts the world after the previous crash: timed apart
            restarts.append(time.perf_counter() - t0)
            stamp = os.path.join(stamp_dir, f"stamp-{trial}")
            try:
                world.run(fns.pool_kill_self, victim, stamp)
            except RankCrashed as exc:
                verdict = time.time()
                messages.append(str(exc).splitlines()[0])
            else:
                raise AssertionError("the call with a SIGKILLed rank returned normally")
            with open(stamp, encoding="utf-8") as f:
                latencies.append(verdict - float(f.read()))
    finally:
        world.close()
        shutil.rmtree(stamp_dir, ignore_errors=True)
    return {
        "world_size": world_size,
        "victim_rank": victim,
        "latency_s": summary(latencies),
        "samples_s": latencies,
        "restart_s": summary(restarts[1:]) if len(restarts) > 1 else None,
        "message": messages[0] if messages else None,
        "names_rank_and_signal": all(f"rank {victim}" in m and "SIGKILL" in m for m in messages),
    }


# -- 3. deadlock verdict latency -------------------------------------------------------------------


def bench_deadlock(world_size: int, timeouts: Sequence[float], trials: int) -> dict[str, Any]:
    world = World(WorldSpec(world_size, 1, "plain"), timeout=60.0)
    rows: list[dict[str, Any]] = []
    try:
        for timeout in timeouts:
            overshoots: list[float] = []
            detail: dict[str, Any] = {}
            for _ in range(trials):
                world.run(fns.pool_noop)  # (re)start outside the timed part
                t0 = time.perf_counter()
                try:
                    world.call(fns.pool_skip_barrier, timeout=timeout)
                except WorldDeadlock as exc:
                    elapsed = time.perf_counter() - t0
                    detail = {
                        "pending": exc.pending,
                        "blocked_in": exc.blocked_in,
                        "stacks_from_ranks": sorted(r for r, s in exc.stacks.items() if s.strip()),
                        "first_line": str(exc).splitlines()[0],
                    }
                else:
                    raise AssertionError("the call with a skipped barrier returned normally")
                overshoots.append(elapsed - timeout)
            rows.append({"timeout_s": timeout, "overshoot_s": summary(overshoots), "samples_s": overshoots, **detail})
    finally:
        world.close()
    return {"world_size": world_size, "by_timeout": rows}


# -- 4. plugin load cost ---------------------------------------------------------------------------


TINY_TESTS = textwrap.dedent(
    """
    import pytest


    @pytest.mark.parametrize("n", range(5))
    def test_param(n):
        assert n >= 0


    def test_one():
        assert True
    """
)


def _pytest_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in list(env):
        if key.startswith(("PYTEST_XDIST", "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST", "PYTEST_DISABLE_PLUGIN")):
            del env[key]
    return env


def bench_plugin_load(runs: int) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="bench-plugin-")
    try:
        return _plugin_load(runs, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _plugin_load(runs: int, tmp: str) -> dict[str, Any]:
    """``pytest --co -q`` with and without the plugin, alternating; wall time and the child's CPU time.

    The CPU time (user + system of the pytest process, from ``wait4``) is what the plugin itself costs; it
    hardly moves when other work competes for the cores, where the wall time can swing by seconds.
    """
    with open(os.path.join(tmp, "pytest.ini"), "w", encoding="utf-8") as f:
        f.write("[pytest]\n")
    with open(os.path.join(tmp, "test_tiny.py"), "w", encoding="utf-8") as f:
        f.write(TINY_TESTS)
    env = _pytest_env()
    variants = {"with": ["-p", "pytest_mnnvl"], "without": ["-p", "no:pytest_mnnvl"]}

    def run_once(extra: list[str], *more: str) -> tuple[float, float, str]:
        cmd = [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", *extra, *more]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        out = proc.stdout.read()  # not communicate(): it would reap the child before wait4 gets its rusage
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        if code != 0:
            raise RuntimeError(f"{cmd} failed ({code}):\n{out}")
        return elapsed, usage.ru_utime + usage.ru_stime, out

    # Sanity: the plugin really is on in one variant and off in the other.
    help_with = run_once(variants["with"], "--help")[2]
    help_without = run_once(variants["without"], "--help")[2]
    loaded = {"with": "--mnnvl-backend" in help_with, "without": "--mnnvl-backend" in help_without}
    wall: dict[str, list[float]] = {"with": [], "without": []}
    cpu: dict[str, list[float]] = {"with": [], "without": []}
    for name in ("with", "without"):  # one warm-up each, not counted
        run_once(variants[name])
    for i in range(runs):
        order = ("with", "without") if i % 2 == 0 else ("without", "with")
        for name in order:
            w, c, _ = run_once(variants[name])
            wall[name].append(w)
            cpu[name].append(c)

    def paired_ms(samples: dict[str, list[float]]) -> float:
        return statistics.median(a - b for a, b in zip(samples["with"], samples["without"], strict=True)) * 1e3

    return {
        "runs": runs,
        "plugin_loaded": loaded,
        "wall_with_s": summary(wall["with"]),
        "wall_without_s": summary(wall["without"]),
        "cpu_with_s": summary(cpu["with"]),
        "cpu_without_s": summary(cpu["without"]),
        "wall_median_difference_ms": (statistics.median(wall["with"]) - statistics.median(wall["without"])) * 1e3,
        "wall_paired_difference_ms": paired_ms(wall),
        "cpu_median_difference_ms": (statistics.median(cpu["with"]) - statistics.median(cpu["without"])) * 1e3,
        "cpu_paired_difference_ms": paired_ms(cpu),
        "samples_wall_s": wall,
        "samples_cpu_s": cpu,
    }


IMPORTTIME_LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)\s*$")


def bench_importtime(runs: int) -> dict[str, Any]:
    """``-X importtime`` of ``import pytest_mnnvl.plugin``: the package's modules' self/cumulative µs."""
    per_run: list[dict[str, Any]] = []
    for _ in range(runs):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import pytest_mnnvl.plugin"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        modules: dict[str, tuple[int, int]] = {}
        for line in done.stderr.splitlines():
            m = IMPORTTIME_LINE.match(line)
            if m:
                modules[m.group(4)] = (int(m.group(1)), int(m.group(2)))
        ours = {name: v for name, v in modules.items() if name == "pytest_mnnvl" or name.startswith("pytest_mnnvl.")}
        per_run.append(
            {
                "plugin_cumulative_us": modules.get("pytest_mnnvl.plugin", (0, 0))[1],
                "package_cumulative_us": modules.get("pytest_mnnvl", (0, 0))[1],
                "pytest_mnnvl_self_sum_us": sum(s for s, _ in ours.values()),
                "pytest_cumulative_us": modules.get("pytest", (0, 0))[1],
                "modules": {name: {"self_us": s, "cumulative_us": c} for name, (s, c) in ours.items()},
                "heavy_imported": sorted(
                    name
                    for name in modules
                    if name.split(".")[0] in ("torch", "flashinfer", "hypothesis", "numpy") and "." not in name
                ),
            }
        )
    keys = ("plugin_cumulative_us", "package_cumulative_us", "pytest_mnnvl_self_sum_us", "pytest_cumulative_us")
    result: dict[str, Any] = {"runs": runs}
    for key in keys:
        result[key] = statistics.median(r[key] for r in per_run)
    median_run = sorted(per_run, key=lambda r: r["pytest_mnnvl_self_sum_us"])[len(per_run) // 2]
    result["modules_median_run"] = median_run["modules"]
    result["heavy_imported"] = sorted({name for r in per_run for name in r["heavy_imported"]})
    return result


# -- report ----------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# Pool benchmark, {report['date']} ({report['label']})",
        "",
        f"{m['cpu_model']}, {m['cores']} cores, {m['platform']}, Python {m['python']}, torch {m['torch']}. "
        f"Whole run: {report['total_s']:.0f} s; 1-min load average {report['load_average_start'][0]:.1f} at start, "
        f"{report['load_average_end'][0]:.1f} at end (a shared machine: other work ran beside it).",
        "",
        "## 1. Per call: warm pool vs a world spawned per call (vLLM `_spawn_workers` style)",
        "",
        "Call = all-reduce of 4 KiB + barrier in the EP group (gloo). Warm: median/p90 of "
        f"{report['config']['warm_calls']} calls; spawn: median of {report['config']['spawn_worlds']} worlds.",
        "",
        "| backend | world | warm start | warm call median | p90 | pool no-op call | spawn per call | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["per_call"]:
        if "error" in row:
            lines.append(f"| {row['backend']} | {row['world_size']} | failed: see JSON | | | | | |")
            continue
        w, s = row["warm"], row["spawn"]
        lines.append(
            f"| {row['backend']} | {row['world_size']} | {w['startup_s']:.2f} s | {ms(w['call_s']['median'])} "
            f"| {ms(w['call_s']['p90'])} | {ms(w['noop_call_s']['median'])} | {s['call_s']['median']:.2f} s "
            f"| **{row['ratio']:.0f}×** |"
        )
    for row in report["per_call"]:
        if "error" in row:
            lines += ["", f"`{row['backend']}` world {row['world_size']} failed: `{row['error'].splitlines()[0]}`"]
    c = report["crash"]
    lines += ["", "## 2. Crash verdict (rank SIGKILLs itself → `RankCrashed` in the caller)", ""]
    lines += ["| world | victim | median | max | restart (apart) | message |", "|---|---|---|---|---|---|"]
    for row in c:
        restart = f"{row['restart_s']['median']:.2f} s" if row["restart_s"] else "–"
        lines.append(
            f"| {row['world_size']} | rank {row['victim_rank']} | {ms(row['latency_s']['median'])} "
            f"| {ms(row['latency_s']['max'])} | {restart} | `{row['message']}` |"
        )
    d = report["deadlock"]
    lines += [
        "",
        f"## 3. Deadlock verdict (rank 0 skips a barrier; world {d['world_size']})",
        "",
        "| timeout | overshoot median | max | blocked in |",
        "|---|---|---|---|",
    ]
    for row in d["by_timeout"]:
        blocked = ", ".join(f"rank {r}: {w}" for r, w in sorted(row.get("blocked_in", {}).items())) or "–"
        lines.append(
            f"| {row['timeout_s']:g} s | {ms(row['overshoot_s']['median'])} | {ms(row['overshoot_s']['max'])} "
            f"| {blocked} |"
        )
    p, it = report["plugin_load"], report["importtime"]
    lines += [
        "",
        "## 4. Plugin load",
        "",
        f"`pytest --co -q` on 6 tests, {p['runs']} runs each, alternating (medians):",
        "",
        "| | `-p pytest_mnnvl` | `-p no:pytest_mnnvl` | difference | paired difference |",
        "|---|---|---|---|---|",
        f"| CPU time of the pytest process | {ms(p['cpu_with_s']['median'])} | {ms(p['cpu_without_s']['median'])} "
        f"| **{p['cpu_median_difference_ms']:+.1f} ms** | {p['cpu_paired_difference_ms']:+.1f} ms |",
        f"| wall time | {ms(p['wall_with_s']['median'])} | {ms(p['wall_without_s']['median'])} "
        f"| {p['wall_median_difference_ms']:+.1f} ms | {p['wall_paired_difference_ms']:+.1f} ms |",
        "",
        f"`-X importtime` of `import pytest_mnnvl.plugin` (median of {it['runs']}): pytest_mnnvl modules' own "
        f"time {it['pytest_mnnvl_self_sum_us'] / 1e3:.1f} ms; `pytest_mnnvl.plugin` cumulative "
        f"{it['plugin_cumulative_us'] / 1e3:.1f} ms (pytest itself {it['pytest_cumulative_us'] / 1e3:.1f} ms). "
        f"Heavy packages imported: {', '.join(it['heavy_imported']) or 'none'}.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    ratios = [r for r in report["per_call"] if "ratio" in r]
    if ratios:
        worst = min(ratios, key=lambda r: r["ratio"])
        out.append(
            {
                "target": f"warm call ≥ {TARGET_RATIO:g}× cheaper than spawn per call",
                "measured": f"≥ {worst['ratio']:.0f}× (worst: {worst['backend']}, world {worst['world_size']})",
                "met": worst["ratio"] >= TARGET_RATIO,
            }
        )
    worst_crash = max(r["latency_s"]["max"] for r in report["crash"])
    out.append(
        {
            "target": f"crash verdict ≤ {TARGET_CRASH_S:g} s, rank and signal named",
            "measured": f"max {ms(worst_crash)}",
            "met": worst_crash <= TARGET_CRASH_S and all(r["names_rank_and_signal"] for r in report["crash"]),
        }
    )
    worst_dl = max(r["overshoot_s"]["max"] for r in report["deadlock"]["by_timeout"])
    out.append(
        {
            "target": f"deadlock verdict ≤ timeout + {TARGET_DEADLOCK_OVERSHOOT_S:g} s",
            "measured": f"max overshoot {ms(worst_dl)}",
            "met": worst_dl <= TARGET_DEADLOCK_OVERSHOOT_S,
        }
    )
    p = report["plugin_load"]
    diff = p["cpu_median_difference_ms"]
    out.append(
        {
            "target": f"plugin adds < {TARGET_PLUGIN_MS:g} ms to `pytest --co`",
            "measured": f"{diff:+.1f} ms CPU (wall: {p['wall_median_difference_ms']:+.1f} ms)",
            "met": diff < TARGET_PLUGIN_MS and p["plugin_loaded"] == {"with": True, "without": False},
        }
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for the JSON and .md files")
    parser.add_argument("--label", default=None, help="file name tag (default: 'cpu' without a GPU, else 'gpu')")
    parser.add_argument("--date", default=None, help="date in file names and report (default: today)")
    parser.add_argument("--world-sizes", default="2,4")
    parser.add_argument("--backends", default="plain,sim")
    parser.add_argument("--warm-calls", type=int, default=200)
    parser.add_argument("--spawn-worlds", type=int, default=5)
    parser.add_argument("--crash-trials", type=int, default=5)
    parser.add_argument("--deadlock-timeouts", default="1,2,5")
    parser.add_argument("--deadlock-trials", type=int, default=3)
    parser.add_argument("--plugin-runs", type=int, default=10)
    args = parser.parse_args(argv)

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # both the pool's ranks and the spawned children
    started = time.perf_counter()
    machine = machine_info()
    date = args.date or datetime.date.today().isoformat()
    label = args.label or ("gpu" if machine["gpu"] else "cpu")
    world_sizes = [int(x) for x in args.world_sizes.split(",")]
    report: dict[str, Any] = {
        "benchmark": "pytest_mnnvl pool",
        "date": date,
        "label": label,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "load_average_start": list(os.getloadavg()),
        "python_dont_write_bytecode": bool(os.environ.get("PYTHONDONTWRITEBYTECODE")),
        "config": {
            "world_sizes": world_sizes,
            "backends": args.backends.split(","),
            "warm_calls": args.warm_calls,
            "spawn_worlds": args.spawn_worlds,
            "crash_trials": args.crash_trials,
            "deadlock_timeouts": args.deadlock_timeouts,
            "deadlock_trials": args.deadlock_trials,
            "plugin_runs": args.plugin_runs,
            "call": f"all_reduce(float32[{fns.NUMEL}]) + barrier in the EP group (pp=1)",
        },
        "per_call": [],
    }

    for i, ws in enumerate(world_sizes):
        rows = bench_per_call(ws, args.backends.split(","), args.warm_calls, args.spawn_worlds, warm_up_spawn=i == 0)
        report["per_call"].extend(rows)

    log(f"crash verdict: {args.crash_trials} trials per world")
    report["crash"] = [bench_crash(2, args.crash_trials, victim=1), bench_crash(4, max(3, args.crash_trials - 2), 2)]
    timeouts = [float(x) for x in args.deadlock_timeouts.split(",")]
    log(f"deadlock verdict: timeouts {timeouts}, {args.deadlock_trials} trials each")
    report["deadlock"] = bench_deadlock(2, timeouts, args.deadlock_trials)
    log(f"plugin load: {args.plugin_runs} runs each")
    report["plugin_load"] = bench_plugin_load(args.plugin_runs)
    report["importtime"] = bench_importtime(5)
    report["load_average_end"] = list(os.getloadavg())
    report["total_s"] = time.perf_counter() - started
    report["targets"] = targets(report)

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"pool-{label}-{date}")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    text = markdown(report)
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    log(f"wrote {stem}.json and {stem}.md in {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
