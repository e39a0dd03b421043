"""Functions the FlashInfer 0.7.4 sim tests run inside every rank (module level, importable by name).

Each builds 0.7.4's own ``NVLinkOneSidedAlltoAll`` the way a manager does, through
``flashinfer.moe_ep.create_communication``, and destroys it before returning: the ranks stay warm
between tests and ``NVLinkOneSidedAlltoAll._WORKSPACES`` is process-wide.
"""

from __future__ import annotations

import gc
import traceback
from collections.abc import Callable
from typing import Any

import torch


def _comm(ctx: Any) -> Any:
    from flashinfer.comm.comm_backend import TorchDistBackend

    return TorchDistBackend(ctx.cpu_group)


def build(
    ctx: Any,
    num_experts: int,
    top_k: int,
    tokens: int,
    hidden: int,
    *,
    dispatch_format: str | None = None,
    dtype: torch.dtype | None = None,
    **config: Any,
) -> Any:
    """0.7.4's public path: ``create_communication(bootstrap, params, NVLinkOneSidedConfig(...))``."""
    from flashinfer.fused_moe.api import QuantFormat
    from flashinfer.moe_ep import BootstrapConfig, MoEEpCommParams, NVLinkOneSidedConfig, create_communication

    fmt = getattr(QuantFormat, dispatch_format) if dispatch_format else None
    return create_communication(
        BootstrapConfig(world_size=ctx.ep_size, rank=ctx.ep_rank, process_group=ctx.cpu_group),
        MoEEpCommParams(num_experts, top_k, tokens, hidden, dtype=dtype, dispatch_format=fmt),
        NVLinkOneSidedConfig(comm_backend=_comm(ctx), **config),
    )


def _error(fn: Callable[[], Any]) -> tuple[str, str] | None:
    """(type, message) of what ``fn`` raises, or None."""
    try:
        fn()
    except BaseException as exc:
        return type(exc).__name__, str(exc)
    return None


def _owners(ids: torch.Tensor, num_experts: int, ep: int) -> torch.Tensor:
    """Owner rank of each expert id: contiguous blocks of ``num_experts / ep`` (0.7.4 needs divisibility)."""
    return torch.div(ids.long(), num_experts // ep, rounding_mode="floor")


def _distinct_owners(owners: torch.Tensor, ep: int) -> torch.Tensor:
    """[tokens, ep] mask: does rank r own one of the token's experts."""
    return torch.stack([(owners == r).any(dim=1) for r in range(ep)], dim=1)


def _inputs(ctx: Any, n: int, hidden: int, num_experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed * 1000 + ctx.ep_rank)
    x = torch.randn(n, hidden, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, num_experts, (n, top_k), generator=g, dtype=torch.int32)  # repeats allowed
    return x, ids, torch.rand(n, top_k, generator=g)


def workspace_state() -> tuple[int, int, int, int]:
    """(workspaces, allocations, sim memfds held, bytes of sim rows mapped) of this process."""
    from flashinfer.comm.mnnvl import MnnvlMemory
    from flashinfer.moe_ep import NVLinkOneSidedAlltoAll

    from pytest_mnnvl.backends import _shm

    gc.collect()
    return (
        len(NVLinkOneSidedAlltoAll._WORKSPACES),
        len(MnnvlMemory.allocated_map),
        len(_shm.live_memfds()),
        _shm.mapped_memfd_bytes(),
    )


def round_trip(ctx: Any, num_experts: int, top_k: int, tokens: int, hidden: int, options: dict[str, Any]) -> dict:
    """Dispatch, check every delivered row, combine ones and scaled outputs, check the layout."""
    import torch.distributed as dist

    from pytest_mnnvl.model import sizing_v074

    ep, me = ctx.ep_size, ctx.ep_rank
    eplb = options.get("eplb_stats_num_experts", 0)
    low = options.get("use_low_precision_combine", False)
    masked = options.get("enable_rank_mask", False)
    comm = build(ctx, num_experts, top_k, tokens, hidden, **options)
    try:
        mask = comm.active_rank_mask(range(ep)) if masked else None
        n = tokens - me  # uneven local batches
        x, ids, w = _inputs(ctx, n, hidden, num_experts, top_k, 1)
        stats = (torch.arange(eplb, dtype=torch.int32) + 1000 * me) if eplb else None
        res = comm.dispatch(x, ids, w, eplb_local_stats=stats, active_rank_mask=mask)
        gathered: list[Any] = [None] * ep
        dist.all_gather_object(gathered, (x, ids, w, stats), group=ctx.cpu_group)
        rx = res.hidden_states.view(ep, tokens, hidden)
        rids = res.topk_ids.view(ep, tokens, top_k)
        rw = res.topk_weights.view(ep, tokens, top_k)
        delivered = res.tokens_per_rank == tokens
        for source, (sx, sids, sw, _) in enumerate(gathered):
            mine = (_owners(sids, num_experts, ep) == me).any(dim=1)
            count = int(mine.sum())
            got = sorted(
                zip(
                    rx[source, :count].view(torch.int16).tolist(),
                    rids[source, :count].tolist(),
                    rw[source, :count].tolist(),
                    strict=True,
                )
            )
            want = sorted(zip(sx[mine].view(torch.int16).tolist(), sids[mine].tolist(), sw[mine].tolist(), strict=True))
            delivered &= got == want
            delivered &= bool((rids[source, count:] == -1).all())  # padding rows: invalid_expert_id
        eplb_ok = (
            res.eplb_gathered_stats is None
            if not eplb
            else bool(torch.equal(res.eplb_gathered_stats, torch.stack([s for *_, s in gathered])))
        )
        owned = _distinct_owners(_owners(ids, num_experts, ep), ep)
        ones = comm.combine(torch.ones(ep * tokens, hidden, dtype=torch.bfloat16), active_rank_mask=mask)
        ones_ok = bool(torch.equal(ones.float(), owned.sum(dim=1, keepdim=True).float().expand(-1, hidden)))
        # Second round: the experts write straight into the fixed combine region (zero-copy).
        res = comm.dispatch(
            x, ids, w, runtime_max_tokens_per_rank=tokens, eplb_local_stats=stats, active_rank_mask=mask
        )
        buffer = comm.get_combine_input_buffer(torch.bfloat16)
        in_region = buffer.data_ptr() == comm.workspace[me].data_ptr() + int(comm.metainfo[15])
        buffer.copy_(res.hidden_states * float(me + 1))
        y = comm.combine(buffer, active_rank_mask=mask)
        contributions = [(x.float() * (r + 1)).to(torch.bfloat16) for r in range(ep)]
        if low:  # what travels: FP8 e4m3 (saturating)
            contributions = [c.float().clamp(-448, 448).to(torch.float8_e4m3fn) for c in contributions]
        expected = sum(c.float() * owned[:, r : r + 1] for r, c in enumerate(contributions))
        scaled_ok = bool(torch.allclose(y.float(), expected, rtol=1e-2, atol=1e-2))
        layout = sizing_v074.nvlink_one_sided_layout(
            ep, tokens, hidden, top_k, eplb_stats_num_experts=eplb, low_precision_combine=low
        )
        from flashinfer.comm.mnnvl import MnnvlMemory

        record = MnnvlMemory.allocated_map[comm._state["mnnvl_mem"].ptr]
        result = {
            "delivered": delivered,
            "eplb": eplb_ok,
            "ones": ones_ok,
            "in_region": in_region,
            "scaled": scaled_ok,
            "flag_epoch": int(comm.workspace[me, 0:4].view(torch.int32)[0]),  # 2 rounds, 2 epochs each
            "metainfo": comm.metainfo.tolist() == list(layout),
            "row_bytes": comm.workspace.size(1),
            "layout_bytes": layout.workspace_size,
            "aligned_bytes": record.aligned_size,
            "pdl": comm._enable_pdl,
            "cft_lamport": (comm._cft_enabled, comm.lamport_enabled),
        }
        del res, buffer
        return result
    finally:
        comm.destroy()


def nvfp4_then_bf16(ctx: Any) -> dict[str, Any]:
    """A workspace sized for NVFP4 dispatch, then a bf16 layer at full and small batch; an FP32 combine."""
    ep, h, t, k, e = ctx.ep_size, 4096, 256, 2, 8
    comm = build(ctx, e, k, t, h, dispatch_format="NVFP4")
    out: dict[str, Any] = {}
    try:
        x, ids, w = _inputs(ctx, t, h, e, k, 2)
        out["bf16_full"] = _error(lambda: comm.dispatch(x, ids, w))
        out["idle_after"] = comm._state["round_owner"] is None
        res = comm.dispatch(x[:64], ids[:64], w[:64], runtime_max_tokens_per_rank=64)
        y = comm.combine(torch.ones(ep * 64, h, dtype=torch.bfloat16))
        owned = _distinct_owners(_owners(ids[:64], e, ep), ep).sum(dim=1, keepdim=True).float()
        out["bf16_small_ok"] = bool(torch.equal(y.float(), owned.expand(-1, h)))
        packed = torch.randint(0, 255, (t, h // 2), dtype=torch.uint8)
        scales = torch.randint(0, 255, (t, h // 16), dtype=torch.uint8)
        res = comm.dispatch(packed, ids, w, hidden_states_scale=scales)
        out["nvfp4_dispatch_ok"] = tuple(res.hidden_states.shape) == (ep * t, h // 2)
        out["fp32_combine"] = _error(lambda: comm.combine(torch.ones(ep * t, h, dtype=torch.float32)))
        out["next_dispatch"] = _error(lambda: comm.dispatch(packed, ids, w, hidden_states_scale=scales))
        del res
        return out
    finally:
        comm.destroy()


def runtime_over_capacity(ctx: Any) -> dict[str, Any]:
    """Runtime token counts past the capacity: FlashInfer's Python check, its C++ checks, vLLM 0.33's call."""
    ep, me = ctx.ep_size, ctx.ep_rank
    comm = build(ctx, 8, 2, 32, 64)
    try:
        x, ids, w = _inputs(ctx, 32, 64, 8, 2, 3)
        module = comm._module

        def direct(runtime: int, local: int) -> None:
            module.moe_a2a_dispatch(
                ids[:local], [x[:local], ids[:local]], comm.workspace, comm.metainfo, runtime, me, ep, 2, 8,
                None, False, -1, -1, False, False, None, 300, False,
            )  # fmt: skip

        return {
            "python": _error(lambda: comm.dispatch(x, ids, w, runtime_max_tokens_per_rank=33)),
            "old_keyword": _error(lambda: comm.dispatch(x, ids, w, max_tokens_per_rank=32)),
            "cpp_runtime": _error(lambda: direct(33, 32)),
            "cpp_local": _error(lambda: comm.dispatch(x, ids, w, runtime_max_tokens_per_rank=16)),
            "direct_local": _error(lambda: direct(16, 32)),
            "idle_after": comm._state["round_owner"] is None,
        }
    finally:
        comm.destroy()


def destroy_frees(ctx: Any) -> dict[str, Any]:
    """Two instances of one layout share a workspace; the last ``destroy()`` (and last view) frees it."""
    from pytest_mnnvl.worlds import audit

    out: dict[str, Any] = {"start": workspace_state()}
    with audit.recording() as calls:
        a = build(ctx, 8, 2, 32, 64)
    out["collectives"] = [c.name for c in calls]
    b = build(ctx, 8, 2, 32, 64)
    try:
        out["shared"] = a.workspace.data_ptr() == b.workspace.data_ptr() and a._state is b._state
        out["refcount"] = a._state["refcount"]
        x, ids, w = _inputs(ctx, 32, 64, 8, 2, 4)
        res = a.dispatch(x, ids, w)
        a.combine(res.hidden_states)
        del res
        out["two"] = workspace_state()
        a.destroy()
        out["after_first"] = workspace_state()
        view = b.workspace[ctx.ep_rank]
        b.destroy()
        out["view_keeps"] = workspace_state()
        out["destroyed"] = _error(lambda: b.dispatch(x, ids, w))
        del view
        out["end"] = workspace_state()
        return out
    finally:
        a.destroy()
        b.destroy()


def bad_top_k(ctx: Any, top_k: int) -> tuple[str, str] | None:
    return _error(lambda: build(ctx, 8, top_k, 16, 64))


def skip_dispatch(ctx: Any) -> Any:
    """Rank 1 never dispatches: rank 0 fails after ``timeout_sec`` with the kernel's text, then stays trapped."""
    from pytest_mnnvl.backends import _kernels

    comm = build(ctx, 8, 2, 16, 64, timeout_sec=1)
    try:
        if ctx.ep_rank == 1:
            return None
        x, ids, w = _inputs(ctx, 16, 64, 8, 2, 5)
        err = _error(lambda: comm.dispatch(x, ids, w))
        sticky = _error(torch.cuda.synchronize)
        return err, sticky
    except BaseException:
        return traceback.format_exc()
    finally:
        _kernels.clear_sticky_error()
        comm.destroy()
