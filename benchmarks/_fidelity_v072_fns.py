"""What ``sim_fidelity.py`` runs on every rank of a world (sim or real GPUs alike), and the layer each case is.

A case's payloads are its :class:`~pytest_mnnvl.model.layers.LayerSpec`'s (vLLM's order: activations, scales,
int32 ids, fp32 weights), so the benchmark sends the layout the oracle, the sim and the conformance suite
agree on; the contents are seeded random values per (case, rank), so the sim and the GPU get the same bytes.
Functions here are imported by name in the ranks (a pool world cannot run a function of ``__main__``).
"""

from __future__ import annotations

import gc
import time
import warnings
from typing import Any

from pytest_mnnvl.model.layers import LayerSpec

#: mxfp8 scales cover ``hidden`` rounded up to 128 elements, as vLLM pads them.
MX_ALIGNMENT = 128


def layer_of(
    fmt: str, hidden: int, top_k: int, num_experts: int | None = None, max_tokens: int = 1, eplb: int = 0
) -> LayerSpec:
    """The layer of a grid point or a case (a grid point only needs its payload sizes: experts = ``top_k``)."""
    return LayerSpec(
        fmt,  # type: ignore[arg-type]  # LayerSpec converts the JSON spelling
        hidden,
        top_k,
        num_experts if num_experts is not None else top_k,
        max_tokens,
        eplb_stats_num_experts=eplb,
        mx_alignment=MX_ALIGNMENT if fmt == "mxfp8" else 0,
    )


def case_layer(case: dict[str, Any]) -> LayerSpec:
    return layer_of(
        case["format"], case["hidden"], case["top_k"], case["num_experts"], case["max_tokens"], case["eplb"]
    )


def run_job(ctx: Any, grid: list[dict[str, Any]], cases: list[dict[str, Any]], free: bool) -> dict[str, Any]:
    """Rank 0 evaluates FlashInfer's size functions on the grid; every rank runs every case."""
    return {"grid": _rank_grid(grid) if ctx.rank == 0 else None, "cases": _rank_cases(ctx, cases, free)}


def _rank_grid(points: list[dict[str, Any]]) -> list[int]:
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


def _make_payloads(layer: LayerSpec, n: int, ids: Any, device: Any, gen: Any) -> list[Any]:
    """The layer's payloads with seeded random contents: bf16 normal, fp32 uniform, bytes in 0..119 (finite
    as e4m3); the ids are the routing's, the weights drawn last."""
    import torch

    payloads = []
    for payload in layer.dispatch_payloads:
        if payload.name in ("topk_ids", "topk_weights"):
            continue
        elems = payload.bytes_per_token // payload.element_size
        if payload.element_size == 2:
            payloads.append(torch.randn(n, elems, generator=gen).to(torch.bfloat16).to(device))
        elif payload.element_size == 4:
            payloads.append(torch.rand(n, elems, generator=gen).to(device))
        else:
            payloads.append(torch.randint(0, 120, (n, elems), generator=gen, dtype=torch.uint8).to(device))
    weights = torch.rand(n, layer.top_k, generator=gen).to(device)
    return [*payloads, ids, weights]


def _owners(ids: Any, num_experts: int, ep: int) -> Any:
    """Each selected expert's owner rank (FlashInfer's contiguous expert blocks)."""
    import torch

    from pytest_mnnvl.conformance.roundtrip import experts_owned

    bounds = [block.stop for block in experts_owned(num_experts, ep)]
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
            layer = case_layer(case)
            a2a = MoeAlltoAll(
                mapping,
                layer.max_num_tokens,
                layer.top_k,
                layer.num_experts,
                workspace_size_per_rank=case["workspace_size_per_rank"],
                mnnvl_config=MnnvlConfig(comm_backend=comm),
                eplb_stats_num_experts=layer.eplb_stats_num_experts,
            )
            runtime = case["runtime_tokens"]
            n = max(0, runtime - (me % 2) * (runtime // 3))
            gen = torch.Generator().manual_seed(case["index"] * 100 + me)
            ids = torch.argsort(torch.rand(n, layer.num_experts, generator=gen), dim=1)[:, : layer.top_k]
            ids = ids.to(torch.int32).contiguous().to(device)
            payloads = _make_payloads(layer, n, ids, device, gen)
            id_index = len(payloads) - 2
            try:
                recv = a2a.dispatch(
                    ids, payloads, runtime, invalid_token_expert_id=-1, expert_id_payload_index=id_index
                )
            except RuntimeError as exc:
                record["dispatch"] = str(exc)
                out.append(record)
                continue
            hidden = layer.hidden_size
            combine_in = torch.ones(ep, runtime, hidden, dtype=torch.bfloat16, device=device)
            if case["format"] == "bf16":
                combine_in = (recv[0] * float(me + 1)).contiguous()
            try:
                combined = a2a.combine(combine_in, runtime)
            except RuntimeError as exc:
                record["combine"] = str(exc)
                out.append(record)
                continue
            owners = _owners(ids, layer.num_experts, ep)
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
