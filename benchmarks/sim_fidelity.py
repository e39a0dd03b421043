"""How faithful are ``pytest_mnnvl.model.sizing`` and the sim backend to the real FlashInfer all-to-all?

Run on a machine with ≥2 GPUs and FlashInfer (the JIT module builds on first use)::

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
import gc
import json
import os
import platform
import queue as queue_module
import random
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any

for _key, _value in {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}.items():
    os.environ.setdefault(_key, _value)  # inherited by the ranks: no NVLink multicast anywhere

FORMATS = ("bf16", "nvfp4", "mxfp8", "fp8_block")
TOKENS = (1, 7, 128, 256, 1000, 2048, 8192)
HIDDEN = (2048, 4096, 7168)
TOP_K = (2, 8)


def payload_layout(fmt: str, hidden: int, top_k: int) -> list[tuple[str, int]]:
    """(dtype name, elements per token) of each dispatch payload, in vLLM's order: activations, scales, ids, weights."""
    head = {
        "bf16": [("bfloat16", hidden)],
        "nvfp4": [("uint8", hidden // 2), ("uint8", hidden // 16)],
        "mxfp8": [("float8_e4m3fn", hidden), ("uint8", (hidden + 127) // 128 * 128 // 32)],
        "fp8_block": [("float8_e4m3fn", hidden), ("float32", hidden // 128)],
    }[fmt]
    return [*head, ("int32", top_k), ("float32", top_k)]


_ITEMSIZE = {"bfloat16": 2, "uint8": 1, "float8_e4m3fn": 1, "float32": 4, "int32": 4}


def bytes_per_token(fmt: str, hidden: int, top_k: int) -> list[int]:
    return [_ITEMSIZE[d] * n for d, n in payload_layout(fmt, hidden, top_k)]


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
                            dispatch = sum(bytes_per_token(fmt, hidden, top_k))
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
                                    "combine_bytes": 2 * hidden,
                                    "predicted": sizing.workspace_size_per_rank(ep, tokens, dispatch, 2 * hidden, eplb),
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
        ws = sizing.workspace_size_per_rank(
            ep, max_tokens, sum(bytes_per_token(sized_for, hidden, top_k)), 2 * hidden, eplb
        )
        if rng.random() < 0.5:
            ws = max(sizing.aux_size(ep, max_tokens, eplb) + 128, int(ws * rng.uniform(0.25, 1.3)) // 128 * 128)
        check = sizing.check_round_trip(
            ep,
            runtime,
            bytes_per_token(fmt, hidden, top_k),
            2 * hidden,
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


# --- inside the ranks -------------------------------------------------------------------------


def _rank_grid(ctx: Any, points: list[dict[str, Any]]) -> list[Any]:
    from flashinfer.comm import trtllm_moe_alltoall as a2a

    module = a2a.get_moe_alltoall_module("trtllm")
    got = []
    for p in points:
        if p["kind"] == "aux":
            got.append(int(module.moe_a2a_get_aux_data_size(p["ep"], p["tokens"], p["eplb"])))
        else:
            got.append(
                int(
                    a2a.moe_a2a_get_workspace_size_per_rank(
                        p["ep"], p["tokens"], p["dispatch_bytes"], p["combine_bytes"], p["eplb"]
                    )
                )
            )
    return got


def _make_payloads(case: dict[str, Any], n: int, ids: Any, device: Any, gen: Any) -> list[Any]:
    import torch

    payloads = []
    for dtype_name, elems in payload_layout(case["format"], case["hidden"], case["top_k"])[:-2]:
        dtype = getattr(torch, dtype_name)
        if dtype_name == "bfloat16":
            payloads.append(torch.randn(n, elems, generator=gen).to(dtype).to(device))
        elif dtype_name == "float32":
            payloads.append(torch.rand(n, elems, generator=gen).to(device))
        else:
            raw = torch.randint(0, 120, (n, elems), generator=gen, dtype=torch.uint8)
            payloads.append(raw.view(dtype).to(device))
    weights = torch.rand(n, case["top_k"], generator=gen).to(device)
    return [*payloads, ids, weights]


def _owners(ids: Any, num_experts: int, ep: int) -> Any:
    import torch

    bounds, start = [], 0
    for r in range(ep):
        start += num_experts // ep + (1 if r < num_experts % ep else 0)
        bounds.append(start)
    return torch.bucketize(ids.long(), torch.tensor(bounds, device=ids.device), right=True)


def _rank_cases(ctx: Any, cases: list[dict[str, Any]], free: bool) -> list[dict[str, Any]]:
    import torch
    import torch.distributed as dist
    from flashinfer.comm.comm_backend import TorchDistBackend
    from flashinfer.comm.mapping import Mapping
    from flashinfer.comm.mnnvl import MnnvlConfig
    from flashinfer.comm.trtllm_moe_alltoall import MoeAlltoAll

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    ep, me = ctx.ep_size, ctx.ep_rank
    device = ctx.device
    comm = TorchDistBackend(ctx.cpu_group)
    mapping = Mapping(world_size=ep, rank=me, gpus_per_node=ep, tp_size=ep, moe_ep_size=ep)
    out = []
    for case in cases:
        started = time.perf_counter()
        record: dict[str, Any] = {"index": case["index"], "dispatch": None, "combine": None}
        a2a = None
        try:
            a2a = MoeAlltoAll(
                mapping,
                case["max_tokens"],
                case["top_k"],
                case["num_experts"],
                workspace_size_per_rank=case["workspace_size_per_rank"],
                mnnvl_config=MnnvlConfig(comm_backend=comm),
                eplb_stats_num_experts=case["eplb"],
            )
            runtime = case["runtime_tokens"]
            n = max(0, runtime - (me % 2) * (runtime // 3))
            gen = torch.Generator().manual_seed(case["index"] * 100 + me)
            ids = torch.argsort(torch.rand(n, case["num_experts"], generator=gen), dim=1)[:, : case["top_k"]]
            ids = ids.to(torch.int32).contiguous().to(device)
            payloads = _make_payloads(case, n, ids, device, gen)
            id_index = len(payloads) - 2
            try:
                recv = a2a.dispatch(
                    ids, payloads, runtime, invalid_token_expert_id=-1, expert_id_payload_index=id_index
                )
            except RuntimeError as exc:
                record["dispatch"] = str(exc)
                out.append(record)
                continue
            hidden = case["hidden"]
            combine_in = torch.ones(ep, runtime, hidden, dtype=torch.bfloat16, device=device)
            if case["format"] == "bf16":
                combine_in = (recv[0] * float(me + 1)).contiguous()
            try:
                combined = a2a.combine(combine_in, runtime)
            except RuntimeError as exc:
                record["combine"] = str(exc)
                out.append(record)
                continue
            owners = _owners(ids, case["num_experts"], ep)
            present = torch.stack([(owners == r).any(dim=1) for r in range(ep)], dim=1).float()
            if case["format"] == "bf16":
                scale = (present * torch.arange(1, ep + 1, device=present.device).float()).sum(dim=1)
                want = payloads[0].float() * scale[:, None]
                record["numerics_ok"] = bool(torch.allclose(combined.float(), want, rtol=2e-2, atol=2e-2))
            else:
                want = present.sum(dim=1)[:, None].expand(-1, hidden)
                record["numerics_ok"] = bool(torch.equal(combined.float(), want.float()))
            counts: list[Any] = [None] * ep
            dist.all_gather_object(
                counts,
                (owners == torch.arange(ep, device=owners.device)[:, None, None]).any(dim=2).sum(dim=1).cpu().tolist(),
                group=ctx.cpu_group,
            )
            received = [int((recv[id_index][s, :, 0] >= 0).sum()) for s in range(ep)]
            record["counts_ok"] = received == [counts[s][me] for s in range(ep)]
        except Exception as exc:  # anything else is a finding in itself
            record["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            record["seconds"] = round(time.perf_counter() - started, 4)
            if a2a is not None and free:
                comm.barrier()  # nobody reads a peer row any more
                a2a._reset_workspace()
            del a2a
            gc.collect()
        out.append(record)
    return out


def _rank_main(rank: int, ep: int, backend: str, store: str, job: dict[str, Any], queue: Any) -> None:
    result: Any
    try:
        import importlib

        import torch
        import torch.distributed as dist

        from pytest_mnnvl.worlds.layout import Layout, RankContext, build_groups

        device: Any = "cpu"
        if backend == "flashinfer":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        dist.init_process_group("gloo", store=dist.FileStore(store, ep), rank=rank, world_size=ep)
        ep_group, cpu_group, world = build_groups(Layout(ep, 1), rank, False)
        ctx = RankContext(
            rank=rank,
            world_size=ep,
            pp_size=1,
            pp_stage=0,
            ep_rank=rank,
            ep_size=ep,
            ep_group=ep_group,
            cpu_group=cpu_group,
            ep_group_ranks=list(range(ep)),
            device=device,
            backend=backend,
            world_group=world,
        )
        importlib.import_module(f"pytest_mnnvl.backends.{backend}").install(ctx)
        result = {
            "grid": _rank_grid(ctx, job["grid"]) if rank == 0 else None,
            "cases": _rank_cases(ctx, job["cases"], job["free"]),
        }
    except BaseException:
        result = {"fatal": traceback.format_exc()}
    queue.put((rank, result))
    queue.close()
    queue.join_thread()
    os._exit(0)


def run_world(backend: str, ep: int, job: dict[str, Any], timeout: float) -> list[Any]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="sim_fidelity_") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, args=(r, ep, backend, store, job, queue)) for r in range(ep)]
        for p in procs:
            p.start()
        results: list[Any] = [None] * ep
        deadline = time.monotonic() + timeout
        try:
            while any(r is None for r in results) and time.monotonic() < deadline:
                try:
                    rank, value = queue.get(timeout=1.0)
                    results[rank] = value
                except queue_module.Empty:
                    for rank, p in enumerate(procs):
                        if results[rank] is None and p.exitcode not in (None, 0):
                            results[rank] = {"fatal": f"rank {rank} died with exit code {p.exitcode}"}
            for rank, value in enumerate(results):
                if value is None:
                    results[rank] = {"fatal": f"rank {rank} sent nothing within {timeout:g} s"}
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    return results


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="JSON file to write")
    parser.add_argument(
        "--backend",
        choices=("auto", "flashinfer", "sim"),
        default="auto",
        help="auto: real + sim when ≥2 GPUs and FlashInfer are usable, else sim only",
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
    args = parser.parse_args(argv)

    from pytest_mnnvl.backends import flashinfer as real_backend

    reason = real_backend.available()
    backends = ["sim"] if args.backend == "sim" else ["flashinfer", "sim"]
    if args.backend == "auto" and reason is not None:
        backends = ["sim"]
    if args.backend == "flashinfer" and reason is not None:
        print(f"flashinfer backend unusable: {reason}", file=sys.stderr)
        return 2
    gpus = real_backend._visible_gpu_count() or 0
    eps = [int(e) for e in args.ep.split(",")] if args.ep else ([2, 4] if gpus >= 4 else [2])

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
