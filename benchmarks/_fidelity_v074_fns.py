"""What ``sim_fidelity_v074.py`` runs on every rank, on the sim and on real GPUs alike: plain data out.

Each case builds FlashInfer 0.7.4's ``NVLinkOneSidedAlltoAll`` through ``flashinfer.moe_ep.create_communication``
(a manager's path), dispatches seeded inputs, combines seeded expert outputs and returns what a faithful sim
must reproduce exactly: the layout metainfo, per-source receive counts, the received rows as a sorted set
(slot order is the GPU's atomics), the combined output's bytes, and the exact text of every error.
"""

from __future__ import annotations

import hashlib
from typing import Any

#: (name, num_experts, top_k, tokens, hidden, dispatch format, options)
CASES: tuple[tuple[str, int, int, int, int, str | None, dict[str, Any]], ...] = (
    ("bf16 k2", 8, 2, 64, 2048, None, {}),
    ("bf16 k4 uneven", 16, 4, 48, 1024, None, {}),
    ("bf16 k8", 16, 8, 32, 512, None, {}),
    ("bf16 k3", 24, 3, 40, 768, None, {}),
    ("bf16 fp8 combine", 8, 2, 64, 2048, None, {"use_low_precision_combine": True}),
    ("bf16 eplb", 8, 2, 32, 512, None, {"eplb_stats_num_experts": 8}),
)


def _digest(t: Any) -> str:
    return hashlib.sha256(t.contiguous().cpu().view(-1).view(__import__("torch").uint8).numpy().tobytes()).hexdigest()


def _row_key(row: Any, ids: Any) -> str:
    import torch

    return hashlib.sha256(row.view(torch.uint8).numpy().tobytes() + ids.numpy().tobytes()).hexdigest()[:16]


def _error(fn: Any) -> str | None:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def run_cases(ctx: Any, seed: int) -> list[dict[str, Any]]:
    import torch
    from flashinfer.comm.comm_backend import TorchDistBackend
    from flashinfer.moe_ep import BootstrapConfig, MoEEpCommParams, NVLinkOneSidedConfig, create_communication

    ep, me, device = ctx.ep_size, ctx.ep_rank, ctx.device
    out = []
    for index, (name, experts, top_k, tokens, hidden, _fmt, options) in enumerate(CASES):
        comm: Any = create_communication(
            BootstrapConfig(world_size=ep, rank=me, process_group=ctx.cpu_group),
            MoEEpCommParams(experts, top_k, tokens, hidden, dtype=torch.bfloat16),
            NVLinkOneSidedConfig(comm_backend=TorchDistBackend(ctx.cpu_group), **options),
        )
        try:
            g = torch.Generator().manual_seed(seed * 7919 + index * 101 + me)
            n = tokens - (me % 3)  # uneven local batches
            x = torch.randn(n, hidden, generator=g).to(torch.bfloat16)
            ids = torch.randint(0, experts, (n, top_k), generator=g, dtype=torch.int32)
            w = torch.rand(n, top_k, generator=g)
            eplb = options.get("eplb_stats_num_experts", 0)
            stats = (torch.arange(eplb, dtype=torch.int32) + 100 * me).to(device) if eplb else None
            res = comm.dispatch(x.to(device), ids.to(device), w.to(device), eplb_local_stats=stats)
            rx = res.hidden_states.view(ep, tokens, hidden).cpu()
            rids = res.topk_ids.view(ep, tokens, top_k).cpu()
            received = []
            for source in range(ep):
                valid = [t for t in range(tokens) if int(rids[source, t, 0]) != -1]
                received.append(sorted(_row_key(rx[source, t], rids[source, t]) for t in valid))
            counts = [len(rows) for rows in received]
            expert_out = (res.hidden_states.float() * 0.5 + float(me)).to(torch.bfloat16)
            y = comm.combine(expert_out).cpu()
            gathered = None if res.eplb_gathered_stats is None else res.eplb_gathered_stats.cpu().tolist()
            out.append(
                {
                    "case": name,
                    "metainfo": [int(v) for v in comm.metainfo.tolist()],
                    "row_bytes": int(comm.workspace.size(1)),
                    "counts": counts,
                    "received": received,
                    "combined": _digest(y),
                    "eplb": gathered,
                }
            )
        finally:
            comm.destroy()
    out.append(_errors(ctx))
    return out


def _errors(ctx: Any) -> dict[str, Any]:
    """The host checks that must fire with FlashInfer's exact text."""
    import torch
    from flashinfer.comm.comm_backend import TorchDistBackend
    from flashinfer.fused_moe.api import QuantFormat
    from flashinfer.moe_ep import BootstrapConfig, MoEEpCommParams, NVLinkOneSidedConfig, create_communication

    ep, me, device = ctx.ep_size, ctx.ep_rank, ctx.device
    comm: Any = create_communication(
        BootstrapConfig(world_size=ep, rank=me, process_group=ctx.cpu_group),
        MoEEpCommParams(8, 2, 64, 1024, dtype=torch.bfloat16, dispatch_format=QuantFormat.NVFP4),
        NVLinkOneSidedConfig(comm_backend=TorchDistBackend(ctx.cpu_group)),
    )
    try:
        g = torch.Generator().manual_seed(5 + me)
        x = torch.randn(64, 1024, generator=g).to(torch.bfloat16).to(device)
        ids = torch.randint(0, 8, (64, 2), generator=g, dtype=torch.int32).to(device)
        w = torch.rand(64, 2, generator=g).to(device)
        return {
            "case": "errors",
            "bf16 into an nvfp4 workspace": _error(lambda: comm.dispatch(x, ids, w)),
            "runtime over capacity": _error(lambda: comm.dispatch(x, ids, w, runtime_max_tokens_per_rank=65)),
            "old keyword": _error(lambda: comm.dispatch(x, ids, w, max_tokens_per_rank=64)),
        }
    finally:
        comm.destroy()
