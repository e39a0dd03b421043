"""Which memory handle type FlashInfer would pick here: FABRIC or POSIX fds.

FlashInfer >= 0.6.16 uses FABRIC handles only when every rank's GPU has
``CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED`` *and* NVML reports its fabric state as completed with
a non-zero cluster UUID. The CUDA attribute cannot be read without initialising CUDA, so only the NVML
half is probed here; older releases choose by ``platform.machine()``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pytest_mnnvl.probes.flashinfer import FdExchange, flashinfer_info
from pytest_mnnvl.probes.gpus import gpu_inventory
from pytest_mnnvl.probes.nvml import _import_nvml, _init_failure, _nvml_error, _shutdown
from pytest_mnnvl.probes.probe import Probe, _cached

HandleType = Literal["fabric", "posix_fd"]
IMEX_CHANNELS = "/dev/nvidia-caps-imex-channels"


@dataclass(frozen=True)
class FabricState:
    """NVML's view of one GPU's fabric: ``state`` (NVML_GPU_FABRIC_STATE_*, ``None`` on error)."""

    state: int | None
    cluster_uuid_set: bool
    error: str = ""


FABRIC_STATE_COMPLETED = 3


def fabric_states_from_nvml(nvml: Any, nvml_indices: Sequence[int]) -> list[FabricState]:
    """``nvmlDeviceGetGpuFabricInfoV`` (or the older call) for each GPU; failures become errors."""
    import ctypes

    try:
        nvml.nvmlInit()
    except Exception as exc:
        return [FabricState(None, False, _init_failure(exc)) for _ in nvml_indices]
    states = []
    try:
        for index in nvml_indices:
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                if hasattr(nvml, "nvmlDeviceGetGpuFabricInfoV") and hasattr(nvml, "c_nvmlGpuFabricInfoV_t"):
                    info = nvml.c_nvmlGpuFabricInfoV_t()
                    nvml.nvmlDeviceGetGpuFabricInfoV(handle, ctypes.byref(info))
                else:
                    info = nvml.c_nvmlGpuFabricInfo_t()
                    nvml.nvmlDeviceGetGpuFabricInfo(handle, ctypes.byref(info))
                states.append(FabricState(int(info.state), any(info.clusterUuid)))
            except Exception as exc:
                states.append(FabricState(None, False, _nvml_error(exc)))
    finally:
        _shutdown(nvml)
    return states


def choose_handle_type(
    fd_exchange: FdExchange | None,
    machine: str,
    fabric: Sequence[FabricState],
    imex_channels: bool,
) -> Probe[HandleType | None]:
    """The handle type FlashInfer would pick (pure). ``fabric`` has one entry per rank's GPU."""
    if fd_exchange == "pidfd_getfd":
        if machine.lower() in ("aarch64", "arm64"):
            return Probe("fabric", f"FlashInfer < 0.6.16 picks FABRIC on {machine} whatever the GPUs report")
        return Probe("posix_fd", f"FlashInfer < 0.6.16 picks POSIX fds on {machine} (FABRIC only on aarch64)")
    if not fabric:
        return Probe(None, "no GPU visible: FlashInfer would not allocate at all")
    lacking = []
    for i, st in enumerate(fabric):
        if st.state is None:
            lacking.append(f"GPU{i}: NVML fabric info unavailable ({st.error})")
        elif st.state < FABRIC_STATE_COMPLETED:
            lacking.append(f"GPU{i}: fabric state {st.state} (< completed)")
        elif not st.cluster_uuid_set:
            lacking.append(f"GPU{i}: zero cluster UUID")
    if lacking:
        return Probe(
            "posix_fd",
            "POSIX fds: FlashInfer uses FABRIC only when every GPU has a completed fabric with a cluster "
            f"UUID, and here {'; '.join(lacking)}",
        )
    reason = (
        "FABRIC: NVML reports a completed fabric with a cluster UUID on every GPU (assuming "
        "CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED, which cannot be read without initialising CUDA)"
    )
    if not imex_channels:
        reason += (
            f"; {IMEX_CHANNELS} is absent, so cuMemCreate will likely fail without IMEX: set "
            "MnnvlMemory._fabric_supported = False on every rank to force POSIX fds"
        )
    return Probe("fabric", reason)


@_cached
def handle_type() -> Probe[HandleType | None]:
    """Which memory handle type the installed FlashInfer would choose for the visible GPUs.

    FlashInfer ANDs the answer over the ranks' GPUs; this ANDs it over every visible GPU. The CUDA
    half of FlashInfer's test (the FABRIC-supported device attribute) is assumed, not read."""
    import platform

    info = flashinfer_info()
    if not info.installed:
        return Probe(None, "FlashInfer is not installed")
    inventory = gpu_inventory()
    fabric: list[FabricState] = []
    if info.fd_exchange != "pidfd_getfd" and inventory.count:
        nvml, why = _import_nvml()
        indices = [g.nvml_index for g in inventory.gpus]
        if nvml is None:
            fabric = [FabricState(None, False, why) for _ in indices]
        else:
            physical = iter(fabric_states_from_nvml(nvml, [i for i in indices if i is not None]))
            fabric = [FabricState(None, False, "MIG instance") if i is None else next(physical) for i in indices]
    return choose_handle_type(info.fd_exchange, platform.machine(), fabric, os.path.isdir(IMEX_CHANNELS))
