"""How faithful are ``pytest_mnnvl.model.sizing`` and the sim backend to the real FlashInfer all-to-all?

Run on a machine with FlashInfer and ≥2 GPUs, or one GPU whose ranks share it (``--ranks-per-gpu``, default
auto; the JIT module builds on first use). Both sides run in pytest-mnnvl pool worlds, the real one on the GPUs
the ``mnnvl_world`` fixture would give it::

    python benchmarks/sim_fidelity.py results/fidelity-h100.json       # real + sim; ep 2 (and 4 with 4 GPUs)
    python benchmarks/sim_fidelity.py out.json --backend sim --ep 2,4  # CPU only: sim vs prediction

Three comparisons, all written to the JSON file named on the command line, with the card, date and
versions:

1. **sizing**: ``pytest_mnnvl.model.sizing.workspace_size_per_rank``/``aux_size`` against FlashInfer's own
   ``moe_a2a_get_workspace_size_per_rank``/``moe_a2a_get_aux_data_size`` on a grid (ep, tokens 1…8192,
   hidden sizes, dispatch formats, EPLB off/on), evaluated inside rank 0 of each backend.
2. **outcomes**: random workspaces, over- and under-sized for a layer at a random runtime batch: does
   dispatch pass, does combine pass, or which exact message do they raise — real vs the
   ``sizing.check_round_trip`` prediction vs the sim.
3. **numerics**: for the rounds that pass, the combine of ``x * (rank + 1)`` (bf16) or of ones (other
   formats) against the sum over each token's distinct owner ranks, and the per-source receive counts.

Exit status 1 if any comparison disagrees.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import time
from typing import Any

for _key, _value in {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}.items():
    os.environ.setdefault(_key, _value)  # inherited by the ranks: no NVLink multicast anywhere

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _fidelity_v072_fns as fns  # noqa: E402  # the rank functions, importable by name in every rank

from pytest_mnnvl.probes.backend import world_gpu_plan  # noqa: E402
from pytest_mnnvl.probes.gpus import gpu_inventory  # noqa: E402
from pytest_mnnvl.worlds.sharing import RanksPerGpu  # noqa: E402

FORMATS = ("bf16", "nvfp4", "mxfp8", "fp8_block")
TOKENS = (1, 7, 128, 256, 1000, 2048, 8192)
HIDDEN = (2048, 4096, 7168)
TOP_K = (2, 8)


# --- the grid and the random cases (parent side, pure arithmetic) ------------------------------------


def sizing_grid(eps: list[int]) -> list[dict[str, Any]]:
    from pytest_mnnvl.model import sizing

    points = []
    for ep in sorted({*eps, 1, 3, 8, 16, 64}):
        for tokens in TOKENS:
            for eplb in (0, 256):
                points.append(
                    {
                        "kind": "aux",
                        "ep": ep,
                        "tokens": tokens,
                        "eplb": eplb,
                        "predicted": sizing.aux_size(ep, tokens, eplb),
                    }
                )
    for ep in eps:
        for tokens in TOKENS:
            for hidden in HIDDEN:
                for fmt in FORMATS:
                    for top_k in TOP_K:
                        for eplb in (0, 256):
                            layer = fns.layer_of(fmt, hidden, top_k, max_tokens=tokens)
                            dispatch = layer.dispatch_bytes_per_token
                            points.append(
                                {
                                    "kind": "size",
                                    "ep": ep,
                                    "tokens": tokens,
                                    "hidden": hidden,
                                    "format": fmt,
                                    "top_k": top_k,
                                    "eplb": eplb,
                                    "dispatch_bytes": dispatch,
                                    "combine_bytes": layer.combine_bytes_per_token,
                                    "predicted": sizing.workspace_size_per_rank(
                                        ep, tokens, dispatch, layer.combine_bytes_per_token, eplb
                                    ),
                                }
                            )
    return points


def random_cases(ep: int, count: int, seed: int, max_tokens_cap: int) -> list[dict[str, Any]]:
    """Layers on workspaces sized for themselves, for another format, or scaled by 0.25…1.3."""
    from pytest_mnnvl.model import sizing

    rng = random.Random(seed * 1000 + ep)
    cases = []
    for index in range(count):
        fmt = rng.choice(FORMATS)
        hidden = rng.choice((256, 512, 1024, 2048))
        top_k = rng.choice(TOP_K)
        experts = ep * max(rng.choice((2, 4, 8)), -(-top_k // ep))
        max_tokens = rng.choice([t for t in (16, 64, 128, 256, 512) if t <= max_tokens_cap])
        runtime = rng.choice(sorted({1, max_tokens // 4 or 1, max_tokens // 2 or 1, max_tokens}))
        eplb = rng.choice((0, 0, experts))
        sized_for = rng.choice((fmt, rng.choice(FORMATS)))
        layer = fns.layer_of(fmt, hidden, top_k, experts, max_tokens, eplb)
        sized = fns.layer_of(sized_for, hidden, top_k, experts, max_tokens, eplb)
        ws = sizing.workspace_size_per_rank(
            ep, max_tokens, sized.dispatch_bytes_per_token, sized.combine_bytes_per_token, eplb
        )
        if rng.random() < 0.5:
            ws = max(sizing.aux_size(ep, max_tokens, eplb) + 128, int(ws * rng.uniform(0.25, 1.3)) // 128 * 128)
        check = sizing.check_round_trip(
            ep,
            runtime,
            layer.dispatch_payload_bytes_per_token,
            layer.combine_bytes_per_token,
            ws,
            sizing.aux_size(ep, max_tokens, eplb),
        )
        predicted = {
            "dispatch": None if check.dispatch.fits else check.dispatch.message,
            "combine": None if check.fits or not check.dispatch.fits else check.combine.message,
        }
        cases.append(
            {
                "index": index,
                "ep": ep,
                "format": fmt,
                "sized_for": sized_for,
                "hidden": hidden,
                "top_k": top_k,
                "num_experts": experts,
                "max_tokens": max_tokens,
                "runtime_tokens": runtime,
                "eplb": eplb,
                "workspace_size_per_rank": ws,
                "predicted": predicted,
            }
        )
    return cases


def run_world(backend: str, ep: int, job: dict[str, Any], timeout: float, ranks_per_gpu: RanksPerGpu) -> list[Any]:
    """``job`` on every rank of a fresh pool world; the real side on the GPUs the ``mnnvl_world`` fixture would
    give it (several ranks on one GPU where there are fewer GPUs than ranks, with ``--ranks-per-gpu``).
    A failed world is one ``{"fatal": ...}`` per rank, as the report has always recorded it."""
    from pytest_mnnvl.worlds.pool import World, WorldSpec

    try:
        spec = WorldSpec(ep, backend=backend)
        if backend == "flashinfer":
            plan = world_gpu_plan(ep, ranks_per_gpu, gpu_inventory(), os.environ)
            spec = WorldSpec(ep, backend=backend, devices=plan.devices, ranks_per_gpu=plan.ranks_per_gpu)
        world = World(spec, timeout=timeout)
    except Exception as exc:
        return [{"fatal": f"{type(exc).__name__}: {exc}"}] * ep
    try:
        return world.call(fns.run_job, (job["grid"], job["cases"], job["free"]), {})
    except Exception as exc:
        return [{"fatal": f"{type(exc).__name__}: {exc}"}] * ep
    finally:
        world.close()


# --- comparison and report ----------------------------------------------------------------------


def _meta(backends: list[str]) -> dict[str, Any]:
    import torch

    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "backends": backends,
    }
    try:
        import flashinfer

        meta["flashinfer"] = flashinfer.__version__
    except ImportError:
        meta["flashinfer"] = None
    if torch.cuda.is_available():
        meta["cards"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        meta["cuda"] = torch.version.cuda
    else:
        meta["cards"] = ["cpu"]
    return meta


def _outcome(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "dispatch": record.get("dispatch"),
        "combine": record.get("combine"),
        "error": record.get("error"),
    }


def _ranks_per_gpu(text: str) -> RanksPerGpu:
    from pytest_mnnvl.errors import MnnvlUsageError
    from pytest_mnnvl.settings import parse_ranks_per_gpu

    try:
        return parse_ranks_per_gpu(text, "--ranks-per-gpu")
    except MnnvlUsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="JSON file to write")
    parser.add_argument(
        "--backend",
        choices=("auto", "flashinfer", "sim"),
        default="auto",
        help="auto: real + sim when FlashInfer is usable on this box's GPUs (≥2, or 1 shared), else sim only",
    )
    parser.add_argument("--ep", default=None, help="EP sizes, e.g. 2,4 (default: 2, plus 4 with 4 GPUs)")
    parser.add_argument("--cases", type=int, default=24, help="random workspace cases per EP size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=512, help="largest max_num_tokens in random cases")
    parser.add_argument(
        "--free-workspaces",
        action="store_true",
        help="evict each case's workspace (_reset_workspace) and collect it; default keeps them cached",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per world (the JIT build included)")
    parser.add_argument(
        "--ranks-per-gpu",
        type=_ranks_per_gpu,
        default="auto",
        help="real ranks per GPU, as --mnnvl-ranks-per-gpu: N, or auto (one per GPU if there are enough, else shared)",
    )
    args = parser.parse_args(argv)

    from pytest_mnnvl.backends import flashinfer as real_backend
    from pytest_mnnvl.probes.backend import missing_for_one_sided_shared

    gpus = real_backend._visible_gpu_count() or 0
    eps = [int(e) for e in args.ep.split(",")] if args.ep else ([2, 4] if gpus >= 4 else [2])
    reason = real_backend.available()
    if reason is None or gpus:  # the largest world on this box's GPUs, shared ones included
        reason = missing_for_one_sided_shared(max(eps), args.ranks_per_gpu)
    backends = ["sim"] if args.backend == "sim" else ["flashinfer", "sim"]
    if args.backend == "auto" and reason is not None:
        backends = ["sim"]
    if args.backend == "flashinfer" and reason is not None:
        print(f"flashinfer backend unusable: {reason}", file=sys.stderr)
        return 2

    report: dict[str, Any] = {"meta": _meta(backends), "sizing": {}, "cases": [], "summary": {}}
    report["meta"]["reason_no_gpu"] = reason
    grid = sizing_grid(eps)
    disagreements = 0
    for ep in eps:
        cases = random_cases(ep, args.cases, args.seed, args.max_tokens)
        by_backend: dict[str, list[Any]] = {}
        for backend in backends:
            started = time.perf_counter()
            results = run_world(
                backend,
                ep,
                {"grid": grid if ep == eps[0] else [], "cases": cases, "free": args.free_workspaces},
                args.timeout,
                args.ranks_per_gpu,
            )
            fatal = [r["fatal"] for r in results if r and "fatal" in r]
            if fatal:
                report["summary"][f"{backend}_ep{ep}_fatal"] = fatal
                disagreements += 1
                continue
            report["summary"][f"{backend}_ep{ep}_seconds"] = round(time.perf_counter() - started, 2)
            by_backend[backend] = results
            if ep == eps[0]:
                mismatches = [
                    {**p, backend: got}
                    for p, got in zip(grid, results[0]["grid"], strict=True)
                    if got != p["predicted"]
                ]
                report["sizing"][backend] = {"points": len(grid), "mismatches": mismatches}
                disagreements += len(mismatches)
        for case in cases:
            entry: dict[str, Any] = {**case}
            outcomes = [case["predicted"] | {"error": None}]
            for backend, results in by_backend.items():
                per_rank = [r["cases"][case["index"]] for r in results]
                entry[backend] = per_rank
                outcomes.extend(_outcome(rec) for rec in per_rank)
                numerics = [rec.get("numerics_ok", True) and rec.get("counts_ok", True) for rec in per_rank]
                entry[f"{backend}_numerics_ok"] = all(numerics)
                disagreements += not all(numerics)
            entry["agree"] = all(o == outcomes[0] for o in outcomes)
            disagreements += not entry["agree"]
            report["cases"].append(entry)
    report["summary"]["cases"] = len(report["cases"])
    report["summary"]["disagreements"] = disagreements
    report["summary"]["outcomes"] = {
        kind: sum(
            1
            for c in report["cases"]
            if (c["predicted"]["dispatch"] is not None) == (kind == "dispatch")
            and (c["predicted"]["combine"] is not None) == (kind == "combine")
        )
        for kind in ("dispatch", "combine")
    }
    report["summary"]["outcomes"]["pass"] = sum(
        1 for c in report["cases"] if c["predicted"]["dispatch"] is None and c["predicted"]["combine"] is None
    )
    with open(args.output, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({"meta": report["meta"], "summary": report["summary"]}, indent=1))
    return 1 if disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
