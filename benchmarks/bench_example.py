"""What one conformance example costs: warm pool vs a world spawned per example, and the harness's
overhead over the manager's own work. Side by side in one run, on the sim (CPU) or real FlashInfer.

An *example* is what the conformance suite does for one Hypothesis draw: ``conformance_rank.run_plan``
on every rank (fresh manager, ``initialize`` per layer with the collective audit and state read
back from the live handle, a verified round trip per layer, late round trips, probes, ``cleanup``
and re-``initialize``), results back in the parent.

- **warm**: on a started :class:`~pytest_mnnvl.worlds.pool.World`, per-example wall time in the parent.
- **spawn**: vLLM's test-helper shape (``torch.multiprocessing`` spawn, one process per rank, the
  process group and backend set up, the example, ``destroy_process_group``, join), per example.
  Target (the project's): spawn / warm ≥ 20×.
- **bare**: the manager's own work with no harness: ``initialize`` + one round trip per layer, the
  earlier layers' round trips again on the final handle (what ``run_plan`` does at least) + ``cleanup``,
  timed inside the ranks from barrier to barrier. Overhead = (warm_minimal − bare) / bare, the harness's
  cost over the work a hand-written test would do anyway; target ≤ 10% on GPU. (The
  full ``run_plan`` does more checks than the bare loop — probes, ``cleanup`` + re-``initialize`` —
  so overhead is measured on ``warm_minimal``, ``run_plan`` without them; ``full_checks_vs_bare`` says
  what the extra checks cost.)
- Scaling: world sizes (``--world-sizes``) × plan lengths (``--layers``).

Run::

    python benchmarks/bench_example.py OUT.json --backend sim --world-sizes 2,4
    python benchmarks/bench_example.py OUT.json --backend flashinfer --world-sizes 2,4   # GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (HERE, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import _bench_example_fns as fns  # noqa: E402  (ranks and children import it by this name)
from _environment import environment  # noqa: E402

from pytest_mnnvl.conformance.rank import run_plan  # noqa: E402
from pytest_mnnvl.errors import MnnvlUsageError  # noqa: E402
from pytest_mnnvl.managers import resolve  # noqa: E402
from pytest_mnnvl.model.layers import LayerSpec, ModelPlan, QuantFormat  # noqa: E402
from pytest_mnnvl.settings import parse_mps, parse_ranks_per_gpu  # noqa: E402
from pytest_mnnvl.worlds.pool import World, WorldSpec  # noqa: E402
from pytest_mnnvl.worlds.sharing import RanksPerGpu  # noqa: E402

CYCLE = (QuantFormat.NVFP4, QuantFormat.BF16, QuantFormat.FP8_BLOCK, QuantFormat.MXFP8)


def plan_of(length: int) -> ModelPlan:
    """``length`` layers of the measured failure's shape (H 4096, top_k 2, 8 experts), formats cycling, T 128/256."""
    layers = [LayerSpec(CYCLE[i % len(CYCLE)], 4096, 2, 8, 128 * (1 + i % 2), name=f"l{i}") for i in range(length)]
    return ModelPlan((tuple(layers),), (), f"bench-{length}", "bench_example.py")


def stats(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def log(message: str) -> None:
    print(f"[bench_example {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Placement:
    """Where a benchmark world's ranks run: its GPUs (None on the sim), ranks per GPU, and what each rank's
    environment gets on top of this process's (MPS settings)."""

    devices: tuple[str, ...] | None = None
    ranks_per_gpu: int = 1
    env: tuple[tuple[str, str], ...] = ()


def placement_for(world_size: int, backend: str, ranks_per_gpu: RanksPerGpu, mps: Any) -> Placement:
    """The GPUs of a ``world_size``-rank world here (several ranks per GPU where ``ranks_per_gpu`` allows);
    raises RuntimeError with the reason when it does not fit."""
    if backend != "flashinfer":
        return Placement()
    from pytest_mnnvl.probes.backend import missing_for_one_sided_shared, world_gpu_plan
    from pytest_mnnvl.probes.gpus import gpu_inventory

    missing = missing_for_one_sided_shared(world_size, ranks_per_gpu)
    if missing is not None:
        raise RuntimeError(f"cannot run {world_size} GPU ranks here: {missing}")
    plan = world_gpu_plan(world_size, ranks_per_gpu, gpu_inventory(), os.environ)
    env = mps.state.rank_env(plan.ranks_per_gpu, os.environ) if mps is not None else ()
    return Placement(plan.devices, plan.ranks_per_gpu, env)


def spawn_example(world_size: int, backend: str, where: Placement, factory: Any, text: str) -> float:
    """One example in a freshly spawned world, vLLM style; wall seconds."""
    import torch.multiprocessing as mp

    child_env = dict(where.env)
    if where.devices:
        child_env["CUDA_VISIBLE_DEVICES"] = ",".join(where.devices)
    saved = {name: os.environ.get(name) for name in child_env}
    os.environ.update(child_env)
    try:
        with tempfile.TemporaryDirectory(prefix="mnnvl-bench-") as tmp:
            boot = {
                "world_size": world_size,
                "pp": 1,
                "backend": backend,
                "store_path": f"{tmp}/store",
                "dir": tmp,
                "ranks_per_gpu": where.ranks_per_gpu,
            }
            t0 = time.perf_counter()
            ctx = mp.get_context("spawn")
            results = ctx.Queue()
            procs = [
                ctx.Process(target=fns.spawn_example_worker, args=(rank, boot, factory, text, results))
                for rank in range(world_size)
            ]
            for p in procs:
                p.start()
            outcomes = [results.get(timeout=900) for _ in range(world_size)]
            for p in procs:
                p.join()
            elapsed = time.perf_counter() - t0
            results.close()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    bad = [o for o in outcomes if o[1] != "ok"] + [f"exit {p.exitcode}" for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"spawned world failed: {str(bad)[:3000]}")
    return elapsed


def bench_world(world_size: int, backend: str, factory: Any, lengths: list[int], args: Any, mps: Any) -> dict[str, Any]:
    where = placement_for(world_size, backend, args.ranks_per_gpu, mps)
    spec = WorldSpec(world_size, 1, backend, where.env, where.devices, where.ranks_per_gpu)
    world = World(spec, timeout=600.0)
    row: dict[str, Any] = {
        "world_size": world_size,
        "gpus": len(where.devices) if where.devices else 0,
        "ranks_per_gpu": where.ranks_per_gpu,
        "by_layers": {},
    }
    try:
        t0 = time.perf_counter()
        world.call(fns.bare_plan, (factory, plan_of(1).to_json(indent=None), 1), {})
        row["startup_and_first_example_s"] = time.perf_counter() - t0
        for length in lengths:
            text = plan_of(length).to_json(indent=None)
            for _ in range(2):  # warm-up: module caches, allocator
                world.call(run_plan, (factory, text), {})
            warm, minimal = [], []
            for _ in range(args.examples):
                t0 = time.perf_counter()
                world.call(run_plan, (factory, text), {})
                warm.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                world.call(run_plan, (factory, text), {"probes": False, "after_cleanup": False})
                minimal.append(time.perf_counter() - t0)
            bare_runs = world.call(fns.bare_plan, (factory, text, args.examples), {})
            bare = [max(per_rank) for per_rank in zip(*bare_runs, strict=True)]
            entry: dict[str, Any] = {
                "warm_s": stats(warm),
                "warm_minimal_s": stats(minimal),
                "bare_s": stats(bare),
            }
            entry["overhead_vs_bare"] = (entry["warm_minimal_s"]["median"] - entry["bare_s"]["median"]) / entry[
                "bare_s"
            ]["median"]
            entry["full_checks_vs_bare"] = entry["warm_s"]["median"] / entry["bare_s"]["median"]
            if length in args.spawn_at:
                spawn = [spawn_example(world_size, backend, where, factory, text) for _ in range(args.spawns)]
                entry["spawn_s"] = stats(spawn)
                entry["spawn_over_warm"] = entry["spawn_s"]["median"] / entry["warm_s"]["median"]
            row["by_layers"][str(length)] = entry
            log(f"ws{world_size} layers {length}: {json.dumps(entry)}")
        row["world_starts"] = world.starts
    finally:
        world.close()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="JSON file to write")
    parser.add_argument("--backend", choices=("sim", "flashinfer"), default="sim")
    parser.add_argument("--manager", default="reference")
    parser.add_argument("--world-sizes", default="2,4")
    parser.add_argument("--layers", default="1,2,4,8", help="plan lengths")
    parser.add_argument("--examples", type=int, default=10, help="timed examples per plan length")
    parser.add_argument("--spawns", type=int, default=3, help="spawned worlds per measured plan length")
    parser.add_argument("--spawn-at", default="2", help="plan lengths at which the spawn baseline runs")
    parser.add_argument(
        "--ranks-per-gpu",
        default="1",
        help="flashinfer: ranks per GPU, an integer >= 1 or auto (several ranks share a GPU; NVLink not exercised)",
    )
    parser.add_argument(
        "--mps", default="auto", help="flashinfer: auto (use a running daemon), off, or start (a private daemon)"
    )
    args = parser.parse_args(argv)
    args.spawn_at = {int(x) for x in args.spawn_at.split(",") if x}
    try:
        args.ranks_per_gpu = parse_ranks_per_gpu(args.ranks_per_gpu, "--ranks-per-gpu")
        args.mps = parse_mps(args.mps, "--mps")
    except MnnvlUsageError as exc:
        parser.error(str(exc))
    factory = resolve(args.manager)
    from pytest_mnnvl.worlds import mps as mps_module

    mps = None
    if args.backend == "flashinfer":
        try:
            mps = mps_module.open_session(args.mps, True, os.environ, mps_module.find_control(), None)
        except mps_module.MpsStartError as exc:
            parser.error(str(exc).replace("--mnnvl-mps=", "--mps "))
    data: dict[str, Any] = {
        "environment": environment(args.backend),
        "manager": args.manager,
        "ranks_per_gpu": str(args.ranks_per_gpu),
        "mps": mps.state.to_dict() if mps is not None else None,
        "worlds": [],
    }
    try:
        for ws in (int(x) for x in args.world_sizes.split(",")):
            try:
                lengths = [int(x) for x in args.layers.split(",")]
                data["worlds"].append(bench_world(ws, args.backend, factory, lengths, args, mps))
            except Exception as exc:
                data["worlds"].append({"world_size": ws, "error": f"{type(exc).__name__}: {exc}"[:3000]})
                log(f"ws{ws} failed: {exc}")
            with open(args.output, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2)
    finally:
        if mps is not None:
            mps.close()
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
