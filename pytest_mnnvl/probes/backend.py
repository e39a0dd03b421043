"""Whether a world can run FlashInfer's one-sided all-to-all here, and so what ``--mnnvl-backend=auto``
picks.

A world runs it over NVLink (one GPU per rank, every pair linked) or, when ``--mnnvl-ranks-per-gpu``
lets ranks share, on the GPUs of its :class:`~pytest_mnnvl.worlds.sharing.GpuPlan` (this process's, or
this xdist worker's, share of the GPUs). The skip reasons and the auto choice combine the GPU, NVLink and
FlashInfer probes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Literal

from pytest_mnnvl.probes.flashinfer import FlashInferInfo, flashinfer_info, missing_one_sided_text
from pytest_mnnvl.probes.gpus import GpuInventory, _int_env, gpu_inventory, missing_for_multi_gpu
from pytest_mnnvl.probes.links import nvlink_p2p
from pytest_mnnvl.probes.probe import Probe
from pytest_mnnvl.worlds.sharing import GpuPlan, RanksPerGpu, plan_gpus, setting_text


def one_sided_reason(
    n: int, info: FlashInferInfo, multi_gpu: str | None, link: Probe[bool | None] | None
) -> str | None:
    """Pure core of :func:`missing_for_one_sided`; ``link`` is the NVLink probe of the first n GPUs."""
    if not info.installed:
        return info.reason
    if not info.one_sided:
        return (
            f"FlashInfer {info.version} at {info.location} has no one-sided all-to-all ({missing_one_sided_text()}):"
            " install a supported flashinfer-python release, e.g. 0.7.2.post1 or 0.7.4"
        )
    if multi_gpu is not None:
        return f"one-sided all-to-all {multi_gpu}"
    if link is not None and link.value is False:
        return f"one-sided all-to-all over GPUs 0..{n - 1}: {link.reason}"
    return None


def missing_for_one_sided(n: int = 2) -> str | None:
    """``None`` when FlashInfer's one-sided module is installed, ``n`` GPUs are visible and the first
    ``n`` have NVLink P2P between every pair. An NVLink answer NVML cannot give does not skip."""
    info = flashinfer_info()
    multi = missing_for_multi_gpu(n) if info.installed and info.one_sided else None
    link = nvlink_p2p(range(n)) if info.installed and info.one_sided and multi is None else None
    return one_sided_reason(n, info, multi, link)


def shared_mode(ranks_per_gpu: RanksPerGpu) -> bool:
    """Whether ``--mnnvl-ranks-per-gpu`` lets ranks share GPUs (``auto`` or N > 1)."""
    return ranks_per_gpu != 1


def _worker_split(env: Mapping[str, str]) -> tuple[int, int]:
    """(this xdist worker's index, the worker count) as the GPUs are split between workers."""
    worker = env.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    return index, max(_int_env(env, "PYTEST_XDIST_WORKER_COUNT"), 1)


def world_gpu_plan(
    world_size: int, ranks_per_gpu: RanksPerGpu, inventory: GpuInventory, env: Mapping[str, str]
) -> GpuPlan:
    """The :class:`~pytest_mnnvl.worlds.sharing.GpuPlan` of a world of ``world_size`` ranks here (pure); raises
    ``ValueError`` with the reason when it does not fit this process's share of the GPUs."""
    index, count = _worker_split(env)
    available = [gpu.uuid or str(gpu.nvml_index) for gpu in inventory.gpus]
    return plan_gpus(world_size, available, ranks_per_gpu, index, count)


def shared_one_sided_reason(
    world_size: int,
    ranks_per_gpu: RanksPerGpu,
    info: FlashInferInfo,
    inventory: GpuInventory,
    env: Mapping[str, str],
    link: Callable[[tuple[int, ...]], Probe[bool | None]],
) -> str | None:
    """Pure core of :func:`missing_for_one_sided` in shared-GPU mode: FlashInfer's one-sided module, a GPU plan
    that fits this process's share, and NVLink only between the GPUs of the plan when it has several (``link``
    is the NVLink probe of CUDA ordinals). The reason names the mode."""
    mode = f"shared-GPU mode ({setting_text(ranks_per_gpu)})"
    if not info.installed:
        return f"{mode}: {info.reason}"
    if not info.one_sided:
        return f"{mode}: {one_sided_reason(world_size, info, None, None)}"
    try:
        plan = world_gpu_plan(world_size, ranks_per_gpu, inventory, env)
    except ValueError as exc:
        return f"one-sided all-to-all: {exc} [{inventory.reason}]"  # the text names the mode
    if plan.nvlink_exercised:
        ids = [gpu.uuid or str(gpu.nvml_index) for gpu in inventory.gpus]
        probe = link(tuple(ids.index(device) for device in plan.devices))
        if probe.value is False:
            return f"one-sided all-to-all, {mode}, {plan.describe()}: {probe.reason}"
    return None


def missing_for_one_sided_shared(world_size: int, ranks_per_gpu: RanksPerGpu) -> str | None:
    """``None`` when a world of ``world_size`` ranks can run FlashInfer's one-sided all-to-all here with
    ``--mnnvl-ranks-per-gpu=ranks_per_gpu`` (one GPU is enough in shared mode); else why not."""
    if not shared_mode(ranks_per_gpu):
        return missing_for_one_sided(world_size)
    return shared_one_sided_reason(
        world_size, ranks_per_gpu, flashinfer_info(), gpu_inventory(), os.environ, nvlink_p2p
    )


def auto_backend(
    ranks_per_gpu: RanksPerGpu, nvlink_world: str | None, shared_world: str | None
) -> Probe[Literal["sim", "flashinfer"]]:
    """What ``--mnnvl-backend=auto`` picks (pure): FlashInfer when a 2-rank world runs it here, over NVLink
    (``nvlink_world``: the skip reason of :func:`missing_for_one_sided`, None when it can) or, when
    ``ranks_per_gpu`` allows sharing, on a shared GPU (``shared_world``: the reason of
    :func:`missing_for_one_sided_shared`); else the sim, with the reason."""
    if nvlink_world is None:
        return Probe("flashinfer", "FlashInfer's one-sided module and >= 2 NVLink GPUs are here")
    if not shared_mode(ranks_per_gpu):
        return Probe("sim", nvlink_world)
    if shared_world is None:
        return Probe("flashinfer", "FlashInfer's one-sided module and a GPU for ranks to share are here")
    return Probe("sim", shared_world)


def resolve_auto_backend(ranks_per_gpu: RanksPerGpu) -> Probe[Literal["sim", "flashinfer"]]:
    """:func:`auto_backend` on this machine's probes."""
    nvlink_world = missing_for_one_sided(2)
    shared_world = missing_for_one_sided_shared(2, ranks_per_gpu) if shared_mode(ranks_per_gpu) else None
    return auto_backend(ranks_per_gpu, nvlink_world, shared_world)
