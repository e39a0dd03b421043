"""Sim vs real FlashInfer 0.7.4 on the same cases: layouts, receive counts, rows, combined bytes, errors.

Run on a machine with a CUDA GPU and FlashInfer 0.7.4. The real side runs in a pytest-mnnvl flashinfer world on
the GPUs the ``mnnvl_world`` fixture would give it (``--ranks-per-gpu``, default auto): on one GPU the ranks share
it, each its own process and CUDA context, FlashInfer's comm backend on a gloo group, and the backend answers
only ``MnnvlMemory.supports_mnnvl`` (the question a one-GPU box without NVLink fails)::

    python benchmarks/sim_fidelity_v074.py OUT.json --ep 2,4
    python benchmarks/sim_fidelity_v074.py OUT.json --ep 2 --backends sim   # CPU only: the sim side, uncompared

The sim side runs in a pytest-mnnvl sim world on the same machine's CPU. Every field of every case must be
equal (the combined output byte for byte: the sim claims FlashInfer's reduction order and FP8 rounding).
Exit status 1 on any disagreement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

for _key, _value in {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}.items():
    os.environ.setdefault(_key, _value)  # inherited by the ranks (the pool world sets them too): no NVLink multicast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _fidelity_v074_fns as fns  # noqa: E402
from _environment import environment  # noqa: E402

from pytest_mnnvl.worlds.sharing import RanksPerGpu  # noqa: E402


def real(ep: int, seed: int, timeout: float, ranks_per_gpu: RanksPerGpu = "auto") -> list[Any]:
    """The cases on a pytest-mnnvl flashinfer world, on the GPUs the ``mnnvl_world`` fixture would give it: on a
    one-GPU box every rank shares that GPU, and the backend answers the one NVLink platform query such a world
    fails (``MnnvlMemory.supports_mnnvl``); everything else is FlashInfer's."""
    from pytest_mnnvl.probes.backend import world_gpu_plan
    from pytest_mnnvl.probes.gpus import gpu_inventory
    from pytest_mnnvl.worlds.pool import World, WorldSpec

    plan = world_gpu_plan(ep, ranks_per_gpu, gpu_inventory(), os.environ)
    world = World(
        WorldSpec(ep, backend="flashinfer", devices=plan.devices, ranks_per_gpu=plan.ranks_per_gpu), timeout=timeout
    )
    try:
        return world.call(fns.run_cases, (seed,), {}, timeout=timeout)
    finally:
        world.close()


def sim(ep: int, seed: int, timeout: float) -> list[Any]:
    from pytest_mnnvl.worlds.pool import World, WorldSpec

    world = World(WorldSpec(ep, backend="sim"), timeout=timeout)
    try:
        return world.call(fns.run_cases, (seed,), {}, timeout=timeout)
    finally:
        world.close()


def compare(ep: int, got_real: list[Any], got_sim: list[Any]) -> list[dict[str, Any]]:
    out = []
    for rank, (r_cases, s_cases) in enumerate(zip(got_real, got_sim, strict=True)):
        for r_case, s_case in zip(r_cases, s_cases, strict=True):
            for key in sorted(set(r_case) | set(s_case)):
                if r_case.get(key) != s_case.get(key):
                    out.append(
                        {
                            "ep": ep,
                            "rank": rank,
                            "case": r_case.get("case"),
                            "field": key,
                            "real": r_case.get(key),
                            "sim": s_case.get(key),
                        }
                    )
    return out


def _ranks_per_gpu(text: str) -> RanksPerGpu:
    from pytest_mnnvl.errors import MnnvlUsageError
    from pytest_mnnvl.settings import parse_ranks_per_gpu

    try:
        return parse_ranks_per_gpu(text, "--ranks-per-gpu")
    except MnnvlUsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--ep", default="2,4")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=240.0)
    parser.add_argument(
        "--ranks-per-gpu",
        type=_ranks_per_gpu,
        default="auto",
        help="real ranks per GPU, as --mnnvl-ranks-per-gpu: N, or auto (one per GPU if there are enough, else shared)",
    )
    parser.add_argument(
        "--backends",
        choices=("flashinfer,sim", "sim"),
        default="flashinfer,sim",
        help="sim: the sim side only (no GPU; nothing is compared, each run's disagreements is null)",
    )
    args = parser.parse_args(argv)
    eps = [int(e) for e in args.ep.split(",")]
    sim_only = args.backends == "sim"
    report: dict[str, Any] = {
        "environment": environment("sim" if sim_only else "flashinfer+sim"),
        "seed": args.seed,
        "runs": [],
    }
    disagreements: list[dict[str, Any]] = []
    for ep in eps:
        try:
            got_real = None if sim_only else real(ep, args.seed, args.timeout, args.ranks_per_gpu)
            got_sim = sim(ep, args.seed, args.timeout)
        except Exception as exc:
            disagreements.append({"ep": ep, "field": "run", "real": f"{type(exc).__name__}: {exc}"[:4000]})
            print(f"ep {ep}: could not run: {exc}"[:2000])
            continue
        if got_real is None:
            report["runs"].append({"ep": ep, "real": None, "sim": got_sim, "disagreements": None})
            print(f"ep {ep}: {len(got_sim[0])} cases x {ep} ranks on the sim only, nothing compared")
            continue
        diff = compare(ep, got_real, got_sim)
        disagreements += diff
        report["runs"].append({"ep": ep, "real": got_real, "sim": got_sim, "disagreements": len(diff)})
        print(f"ep {ep}: {len(got_real[0])} cases x {ep} ranks, {len(diff)} disagreement(s)")
    report["disagreements"] = disagreements
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    for d in disagreements[:10]:
        print(json.dumps(d)[:500])
    return 1 if disagreements else 0


if __name__ == "__main__":
    raise SystemExit(main())
