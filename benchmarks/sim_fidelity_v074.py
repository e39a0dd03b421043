"""Sim vs real FlashInfer 0.7.4 on the same cases: layouts, receive counts, rows, combined bytes, errors.

Run on a machine with one CUDA GPU and FlashInfer 0.7.4 (the real ranks share that GPU, each its own
process and CUDA context, FlashInfer's comm backend on a gloo group; only ``MnnvlMemory.supports_mnnvl``
is answered True, the question a one-GPU box without NVLink fails)::

    python benchmarks/sim_fidelity_v074.py OUT.json --ep 2,4

The sim side runs in a pytest-mnnvl sim world on the same machine's CPU. Every field of every case must be
equal (the combined output byte for byte: the sim claims FlashInfer's reduction order and FP8 rounding).
Exit status 1 on any disagreement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _fidelity_v074_fns as fns
from _environment import environment


class _Ctx:
    """The fields of a rank context the case functions read."""

    def __init__(self, ep_rank: int, ep_size: int, cpu_group: Any, device: Any) -> None:
        self.rank = self.ep_rank = ep_rank
        self.ep_size = ep_size
        self.cpu_group = cpu_group
        self.device = device


def _real_rank(rank: int, ep: int, store_path: str, seed: int, queue: Any) -> None:
    try:
        import torch
        import torch.distributed as dist
        from flashinfer.comm.mnnvl import MnnvlMemory

        for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
            os.environ[name] = "1" if name != "NCCL_NVLS_ENABLE" else "0"
        torch.cuda.set_device(0)
        store = dist.FileStore(store_path, ep)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=ep)
        group = dist.new_group(list(range(ep)), backend="gloo")
        # The one platform question a GPU without NVLink answers "no" to; everything else is FlashInfer's.
        MnnvlMemory.supports_mnnvl = staticmethod(lambda: True)  # type: ignore[method-assign]
        queue.put((rank, "ok", fns.run_cases(_Ctx(rank, ep, group, torch.device("cuda", 0)), seed)))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def real(ep: int, seed: int, timeout: float) -> list[Any]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = tempfile.mktemp(prefix="fid074-store-")
    procs = [ctx.Process(target=_real_rank, args=(r, ep, store, seed, queue)) for r in range(ep)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(ep):
            rank, status, value = queue.get(timeout=timeout)
            if status != "ok":
                raise RuntimeError(f"real rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(ep)]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--ep", default="2,4")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=240.0)
    args = parser.parse_args(argv)
    eps = [int(e) for e in args.ep.split(",")]
    report: dict[str, Any] = {"environment": environment("flashinfer+sim"), "seed": args.seed, "runs": []}
    disagreements: list[dict[str, Any]] = []
    for ep in eps:
        try:
            got_real = real(ep, args.seed, args.timeout)
            got_sim = sim(ep, args.seed, args.timeout)
        except Exception as exc:
            disagreements.append({"ep": ep, "field": "run", "real": f"{type(exc).__name__}: {exc}"[:4000]})
            print(f"ep {ep}: could not run: {exc}"[:2000])
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
