"""Functions the sim tests run inside every rank (module level, so ranks can import them by name).

Each one leaves no workspace behind: the ranks stay warm between tests and FlashInfer's workspace
cache is process-wide, so a leftover entry would change the next test's records.
"""

from __future__ import annotations

import gc
import inspect
import os
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore", "MoeAlltoAll is deprecated", DeprecationWarning)

H_BIG, T_BIG, TOP_K_BIG, E_BIG = 4096, 256, 2, 8


def _comm(ctx: Any) -> Any:
    from flashinfer.comm.comm_backend import TorchDistBackend

    return TorchDistBackend(ctx.cpu_group)


def build(ctx: Any, workspace_size: int, max_tokens: int, top_k: int, num_experts: int, **kw: Any) -> Any:
    """FlashInfer's own MoeAlltoAll over the rank's EP group, the way vLLM builds it."""
    from pytest_mnnvl.backends.sim import Mapping, MnnvlConfig, MoeAlltoAll

    ep = ctx.ep_size
    mapping = Mapping(world_size=ep, rank=ctx.ep_rank, gpus_per_node=ep, tp_size=ep, moe_ep_size=ep)
    return MoeAlltoAll(
        mapping,
        max_num_tokens=max_tokens,
        top_k=top_k,
        num_experts=num_experts,
        workspace_size_per_rank=workspace_size,
        mnnvl_config=MnnvlConfig(comm_backend=_comm(ctx)),
        **kw,
    )


def drop_all_workspaces() -> None:
    """Evict every cached workspace and collect, so MnnvlMemory releases what nothing else holds."""
    from flashinfer.comm.trtllm_moe_alltoall import MoeAlltoAll

    MoeAlltoAll._WORKSPACE_CACHE.clear()
    gc.collect()


def _error(fn: Callable[[], Any]) -> tuple[str, str, str] | None:
    """(type, message, file of the raising frame) of what ``fn`` raises, or None."""
    try:
        fn()
    except BaseException as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        return type(exc).__name__, str(exc), frames[-1].filename if frames else ""
    return None


def _routing(ctx: Any, n: int, num_experts: int, top_k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + ctx.ep_rank)
    return torch.argsort(torch.rand(n, num_experts, generator=g), dim=1)[:, :top_k].to(torch.int32).contiguous()


def nvfp4_payloads(ctx: Any, n: int, hidden: int, top_k: int, num_experts: int) -> list[torch.Tensor]:
    """vLLM's NVFP4 dispatch layout: packed values, block scales, expert ids, weights."""
    g = torch.Generator().manual_seed(7 + ctx.ep_rank)
    ids = _routing(ctx, n, num_experts, top_k, 1)
    return [
        torch.randint(0, 255, (n, hidden // 2), generator=g, dtype=torch.uint8),
        torch.randint(0, 255, (n, hidden // 16), generator=g, dtype=torch.uint8),
        ids,
        torch.rand(n, top_k, generator=g),
    ]


def bf16_payloads(ctx: Any, n: int, hidden: int, top_k: int, num_experts: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11 + ctx.ep_rank)
    ids = _routing(ctx, n, num_experts, top_k, 2)
    return [torch.randn(n, hidden, generator=g).to(torch.bfloat16), ids, torch.rand(n, top_k, generator=g)]


def _round(a2a: Any, payloads: list[torch.Tensor], runtime: int, hidden: int) -> torch.Tensor:
    a2a.dispatch(payloads[-2], payloads, runtime)
    out = a2a.get_combine_payload_tensor_in_workspace(runtime, hidden, torch.bfloat16)
    out.fill_(1.0)
    return a2a.combine(out, runtime, payload_in_workspace=True)


def nvfp4_then_bf16(ctx: Any, workspace_size: int) -> dict[str, Any]:
    """The vLLM #42976 shape: a workspace sized for NVFP4, then a bf16 layer at full and small batch."""
    h, t, k, e = H_BIG, T_BIG, TOP_K_BIG, E_BIG
    result: dict[str, Any] = {}
    try:
        a2a = build(ctx, workspace_size, t, k, e)
        result["nvfp4_round"] = _error(lambda: _round(a2a, nvfp4_payloads(ctx, t, h, k, e), t, h))
        # Another payload layout next: every peer must be done reading its combine (TensorRT-LLM #19312).
        dist.barrier(group=ctx.cpu_group)
        bf16 = bf16_payloads(ctx, t, h, k, e)
        box: dict[str, Any] = {}

        def dispatch_full() -> None:
            box["recv"] = a2a.dispatch(bf16[1], bf16, t)
            box["offset"] = a2a._state.combine_payload_offset

        result["bf16_dispatch"] = _error(dispatch_full)
        result["combine_offset"] = box.get("offset")
        payload = torch.ones(ctx.ep_size, t, h, dtype=torch.bfloat16)
        result["bf16_combine"] = _error(lambda: a2a.combine(payload, t))
        # FlashInfer leaves the handle in the dispatched phase after the failed combine.
        result["cascade"] = _error(lambda: a2a.dispatch(bf16[1], bf16, t))
        fresh = build(ctx, workspace_size, t, k, e)  # same cache key: same workspace, idle state
        small = bf16_payloads(ctx, 64, h, k, e)
        fresh.dispatch(small[1], small, 64)
        combined = fresh.combine(torch.ones(ctx.ep_size, 64, h, dtype=torch.bfloat16), 64)
        owners = _distinct_owner_count(small[1], e, ctx.ep_size)
        result["small_ok"] = bool(torch.equal(combined.float(), owners[:, None].expand(-1, h).float()))
        result["same_workspace"] = fresh._WORKSPACE is a2a._WORKSPACE
        return result
    finally:
        drop_all_workspaces()


def dispatch_too_small(ctx: Any, workspace_size: int, hidden: int) -> tuple[Any, ...] | None:
    try:
        a2a = build(ctx, workspace_size, T_BIG, TOP_K_BIG, E_BIG)
        payloads = bf16_payloads(ctx, T_BIG, hidden, TOP_K_BIG, E_BIG)
        err = _error(lambda: a2a.dispatch(payloads[1], payloads, T_BIG))
        return (*err, a2a._state.phase) if err else None
    finally:
        drop_all_workspaces()


def unequal_sizes(ctx: Any, workspace_size: int) -> tuple[Any, ...]:
    from pytest_mnnvl.backends import records

    try:
        err = _error(lambda: build(ctx, workspace_size + 128 * ctx.ep_rank, 16, 2, 8))
        return (err, records.snapshot().workspace_count)
    finally:
        drop_all_workspaces()


def _distinct_owner_count(ids: torch.Tensor, num_experts: int, ep: int) -> torch.Tensor:
    owners = _owners(ids, num_experts, ep)
    return torch.stack([(owners == r).any(dim=1) for r in range(ep)], dim=1).sum(dim=1)


def _rank_weighted_owners(owners: torch.Tensor, ep: int) -> torch.Tensor:
    """What combine gives when rank r's experts return ``x * (r + 1)``: sum over distinct owners."""
    return torch.stack([(owners == r).any(dim=1).float() * (r + 1) for r in range(ep)], dim=1).sum(dim=1)


def _owners(ids: torch.Tensor, num_experts: int, ep: int) -> torch.Tensor:
    """Contiguous expert blocks, the first E % ep ranks one larger (written independently of the sim)."""
    bounds = []
    start = 0
    for r in range(ep):
        start += num_experts // ep + (1 if r < num_experts % ep else 0)
        bounds.append(start)
    return torch.bucketize(ids.long(), torch.tensor(bounds), right=True)


def round_trip(ctx: Any, num_experts: int, top_k: int, hidden: int, max_tokens: int) -> dict[str, Any]:
    """Dispatch three payloads, check every byte lands at the right rank, combine, check the sums."""
    import torch.distributed as dist

    from pytest_mnnvl.backends.sim import moe_a2a_get_workspace_size_per_rank
    from pytest_mnnvl.model import sizing

    ep, me = ctx.ep_size, ctx.ep_rank
    ws = moe_a2a_get_workspace_size_per_rank(ep, max_tokens, hidden * 2 + top_k * 8, hidden * 2)
    try:
        a2a = build(ctx, ws, max_tokens, top_k, num_experts)
        n = max_tokens - 3 * me  # uneven local batches
        g = torch.Generator().manual_seed(100 + me)
        x = torch.randn(n, hidden, generator=g).to(torch.bfloat16)
        ids = torch.randint(0, num_experts, (n, top_k), generator=g, dtype=torch.int32)  # repeats allowed
        w = torch.rand(n, top_k, generator=g)
        rx, rids, rw = a2a.dispatch(ids, [x, ids, w], max_tokens, invalid_token_expert_id=-1, expert_id_payload_index=1)
        gathered: list[Any] = [None] * ep
        dist.all_gather_object(gathered, (x, ids, w), group=ctx.cpu_group)
        delivered = True
        for source, (sx, sids, sw) in enumerate(gathered):
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
            delivered &= bool((rids[source, count:] == -1).all())
        offsets = list(sizing.aux_offsets(ep, max_tokens))
        index = type(a2a)._METAINFO_INDEX
        target_off = offsets[index["TOPK_TARGET_RANKS_OFFSET_INDEX"]]
        target_ranks = a2a.workspace[me, target_off : target_off + n * top_k * 4].view(torch.int32).view(n, top_k)
        owners = _owners(ids, num_experts, ep)
        first = torch.tensor([[owners[t, k] not in owners[t, :k] for k in range(top_k)] for t in range(n)])
        aux_ok = bool(torch.equal(target_ranks.long(), torch.where(first, owners, -1)))
        ones = torch.ones(ep, max_tokens, hidden, dtype=torch.bfloat16)
        combined_ones = a2a.combine(ones, max_tokens)
        count_ok = torch.equal(
            combined_ones.float(),
            _distinct_owner_count(ids, num_experts, ep)[:, None].expand(-1, hidden).float(),
        )
        rx2, _, _ = a2a.dispatch(ids, [x, ids, w], max_tokens)
        out = a2a.get_combine_payload_tensor_in_workspace(max_tokens, hidden, torch.bfloat16)
        out.copy_(rx2 * float(me + 1))
        y = a2a.combine(out, max_tokens, payload_in_workspace=True)
        scale = _rank_weighted_owners(owners, ep)
        scaled_ok = bool(torch.allclose(y.float(), x.float() * scale[:, None], rtol=2e-2, atol=2e-2))
        return {
            "delivered": delivered,
            "metainfo": a2a.metainfo.tolist() == offsets,
            "aux": aux_ok,
            "ones": bool(count_ok),
            "scaled": scaled_ok,
            "flag_epoch": int(a2a.workspace[me, 0:4].view(torch.int32)[0]),
        }
    finally:
        drop_all_workspaces()


def dispatch_twice(ctx: Any) -> tuple[Any, ...]:
    try:
        a2a = build(ctx, 1 << 20, 16, 2, 8)
        payloads = bf16_payloads(ctx, 16, 64, 2, 8)
        a2a.dispatch(payloads[1], payloads, 16)
        err = _error(lambda: a2a.dispatch(payloads[1], payloads, 16))
        a2a.combine(torch.zeros(ctx.ep_size, 16, 64, dtype=torch.bfloat16), 16)
        return err or ()
    finally:
        drop_all_workspaces()


def cache_lifetime(ctx: Any) -> dict[str, Any]:
    from pytest_mnnvl.backends import _shm, records

    def state() -> tuple[int, int, int, int, int]:
        snap = records.snapshot()
        return (
            snap.workspace_count,
            len(snap.allocations),
            snap.live_bytes_per_rank,
            len(snap.uncached_allocations),
            len(_shm.live_memfds()),
        )

    drop_all_workspaces()
    out: dict[str, Any] = {"start": state()}
    try:
        a = build(ctx, 3 << 20, 32, 2, 8)
        b = build(ctx, 3 << 20, 32, 2, 8)
        out["same_key_shared"] = a._WORKSPACE is b._WORKSPACE and a.workspace.data_ptr() == b.workspace.data_ptr()
        out["one"] = state()
        c = build(ctx, 5 << 20, 32, 2, 8)
        out["distinct"] = c.workspace.data_ptr() != a.workspace.data_ptr()
        out["two"] = state()
        out["mapped_two"] = _shm.mapped_memfd_bytes()
        c._reset_workspace()
        del c
        gc.collect()
        out["after_reset"] = state()
        a._reset_workspace()
        out["evicted_but_held"] = state()
        del a, b
        gc.collect()
        out["end"] = state()
        out["mapped_end"] = _shm.mapped_memfd_bytes()
        return out
    finally:
        drop_all_workspaces()


def via_create_communication(ctx: Any, hidden: int, top_k: int, num_experts: int, tokens: int) -> dict[str, Any]:
    """vLLM 0.33's path: flashinfer.moe_ep.create_communication → NVLinkOneSidedAlltoAll → MoeAlltoAll."""
    from flashinfer.moe_ep import BootstrapConfig, MoEEpCommParams, NVLinkOneSidedConfig, create_communication

    from pytest_mnnvl.backends import records

    ep, me = ctx.ep_size, ctx.ep_rank
    try:
        comm: Any = create_communication(
            BootstrapConfig(world_size=ep, rank=me, process_group=ctx.cpu_group),
            MoEEpCommParams(num_experts, top_k, tokens, hidden, dtype=torch.bfloat16),
            NVLinkOneSidedConfig(comm_backend=_comm(ctx)),
        )
        n = tokens - me
        g = torch.Generator().manual_seed(5 + me)
        x = torch.randn(n, hidden, generator=g).to(torch.bfloat16)
        ids = _routing(ctx, n, num_experts, top_k, 3)
        result = comm.dispatch(x, ids, torch.rand(n, top_k, generator=g))
        buffer = comm.get_combine_input_buffer(torch.bfloat16)
        buffer.copy_(result.hidden_states * float(me + 1))
        y = comm.combine(buffer)
        owners = _owners(ids, num_experts, ep)
        scale = _rank_weighted_owners(owners, ep)
        ok = bool(torch.allclose(y.float(), x.float() * scale[:, None], rtol=2e-2, atol=2e-2))
        result = comm.dispatch(x, ids)
        into = torch.empty(n, hidden, dtype=torch.bfloat16)
        back = comm.combine(result.hidden_states.clone(), output=into)
        into_ok = back is into and bool(
            torch.allclose(
                into.float(),
                x.float() * _distinct_owner_count(ids, num_experts, ep)[:, None].float(),
                rtol=2e-2,
                atol=2e-2,
            )
        )
        size = comm.alltoall.workspace_size_per_rank
        snap = records.snapshot()
        comm.destroy()
        return {
            "ok": ok,
            "into_ok": into_ok,
            "size": size,
            "recorded": [w.workspace_size_per_rank for w in snap.workspaces],
        }
    finally:
        drop_all_workspaces()


def signatures(ctx: Any) -> dict[str, Any]:
    import flashinfer.comm as fc
    from flashinfer.comm.mnnvl import MnnvlConfig

    from pytest_mnnvl.backends import sim

    def shape(fn: Any) -> list[tuple[str, str, Any]]:
        return [(p.name, str(p.kind), p.default) for p in inspect.signature(fn).parameters.values()]

    return {
        "size_fn": shape(sim.moe_a2a_get_workspace_size_per_rank) == shape(fc.moe_a2a_get_workspace_size_per_rank),
        "classes": sim.MoeAlltoAll is fc.MoeAlltoAll and sim.Mapping is fc.Mapping and sim.MnnvlConfig is MnnvlConfig,
        "fi_size": fc.moe_a2a_get_workspace_size_per_rank(ctx.ep_size, 256, 2320, 8192),
        "installed": sim.installed(),
    }


def skip_dispatch(ctx: Any, timeout_s: float) -> tuple[Any, ...] | None:
    """Rank 1 never dispatches: rank 0 must fail with the kernel's timeout text, and stay 'trapped'."""
    from pytest_mnnvl.backends import _kernels

    os.environ[_kernels.TIMEOUT_ENV] = str(timeout_s)
    try:
        a2a = build(ctx, 1 << 20, 16, 2, 8)
        if ctx.ep_rank == 1:
            return None
        payloads = bf16_payloads(ctx, 16, 64, 2, 8)
        err = _error(lambda: a2a.dispatch(payloads[1], payloads, 16))
        sticky = _error(lambda: torch.cuda.synchronize())
        return (err, sticky)
    finally:
        del os.environ[_kernels.TIMEOUT_ENV]
        _kernels.clear_sticky_error()
        drop_all_workspaces()


def hold_workspace(ctx: Any) -> tuple[int, int, int, list[str]]:
    """Build a workspace and keep it alive in the warm rank (for the SIGKILL test).

    Also returns whatever this process has open or mapped under /dev/shm (it should be nothing).
    """
    from pytest_mnnvl.backends import _shm

    ctx.scratch["held"] = build(ctx, 3 << 20, 32, 2, 8)
    shm = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/dev/shm"):
            shm.append(target)
    with open("/proc/self/maps") as maps:
        shm.extend(line.split()[-1] for line in maps if "/dev/shm" in line)
    return os.getpid(), len(_shm.live_memfds()), _shm.mapped_memfd_bytes(), shm


def noop(ctx: Any) -> int:
    return os.getpid()
