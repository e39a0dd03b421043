"""``sim``: FlashInfer's own one-sided MoE all-to-all, running on CPU ranks.

Everything FlashInfer implements in Python runs unmodified inside each rank: ``MoeAlltoAll``
with its process-wide ``_WORKSPACE_CACHE`` and phase asserts, ``MnnvlMemory`` (allocation
bookkeeping, the fabric vote, the bump allocator, the SCM_RIGHTS fd exchange, teardown),
``Mapping``, ``MnnvlConfig``, ``TorchDistBackend`` and ``flashinfer.moe_ep``
(``create_communication``, ``NVLinkOneSidedAlltoAll``). A manager under test, vLLM's included,
therefore meets FlashInfer's real sizing, caching, collectives and error messages, and API drift
between FlashInfer releases shows up here first. :func:`install` replaces only the leaves that
need a GPU, each at the lowest level where it can be swapped cleanly:

1. **The compiled op module.** ``flashinfer.comm.trtllm_moe_alltoall.gen_moe_alltoall_module``
   (the JIT spec factory) returns a spec whose ``build_and_load()`` gives
   :class:`~pytest_mnnvl.backends._kernels.SimMoeA2AModule`: ``moe_a2a_initialize``, ``…_dispatch``,
   ``…_combine``, ``…_combine_into``, ``…_sanitize_expert_ids``, ``…_get_aux_data_size``,
   ``…_get_metainfo_index_pairs``. FlashInfer's own ``_get_moe_alltoall_module_for_target``
   wrappers still sit on top (its cache is cleared once). Nothing is compiled. Only
   ``backend="trtllm"`` exists (``"cake"`` is Blackwell-only anyway).
2. **The CUDA driver under ``MnnvlMemory``.** The module global ``cuda`` of
   ``flashinfer.comm.mnnvl`` becomes a :class:`~pytest_mnnvl.backends._driver.SimDriver`:
   ``cuMemCreate`` → a memfd row, ``cuMemExportToShareableHandle``/``…Import…`` → fd dup,
   ``cuMemAddressReserve`` → a ``PROT_NONE`` reservation, ``cuMemMap`` → ``MAP_FIXED|MAP_SHARED``
   at ``start + i * rank_stride``, ``cuMemSetAccess`` → a mapped-range check, ``cuMemUnmap`` /
   ``cuMemRelease`` / ``cuMemAddressFree`` → unmap/close/munmap, ``cuCtxGetDevice`` → device 0,
   ``cuDeviceGetAttribute`` → a single-node H100 without IMEX (no FABRIC, so FlashInfer takes its
   POSIX-fd path), ``cuMemGetAllocationGranularity`` → 2 MiB. Other driver calls raise.
3. **``pack_strided_memory`` in ``flashinfer.comm.mnnvl``**, which wraps the rows in a CUDA DLPack
   capsule (device type hard-coded to CUDA), builds the same ``[ep_size, size]`` strided uint8
   view as a CPU tensor over the mapped range instead.
4. **Device queries.** ``MnnvlMemory.initialized`` is preset (its ``initialize()`` only creates a
   CUDA context and starts NVML); ``MnnvlMemory.support_nvlink`` (an NVML scan of NVLink states)
   answers "all links up"; ``nvlink_platform_supported`` in ``moe_ep``'s ``nvlink_common`` and
   ``nvlink_one_sided.communication`` (``torch.cuda.is_available()`` + NVML) is replaced by one
   that asks ``MnnvlMemory.supports_mnnvl()``; ``torch.cuda.synchronize``/``current_device`` and
   ``torch.accelerator.current_device_index``/``synchronize``/``empty_cache`` (FlashInfer calls
   the first in ``_reset_workspace``; vLLM calls the others) become host no-ops. JIT, streams,
   events and PDL are not on the path (``device_support_pdl`` is False for CPU tensors).
5. **``moe_a2a_combine``'s ``output.is_cuda`` test.** The functional combine refuses a CPU
   ``output=`` tensor before reaching the op module; the sim wraps that function (the smallest
   enclosing piece) so a CPU ``output`` goes to ``moe_a2a_combine_into`` after FlashInfer's
   contiguity check. Without ``output`` FlashInfer's function runs as is.

A race detector (:mod:`pytest_mnnvl.backends._hazards`) judges every dispatch write and every
``initialize`` against the combine reads of peers that nothing has yet ordered before it, and raises
``WorkspaceRace`` (on every rank) where a GPU would silently corrupt a slower peer's combine: the
verdict depends on the program's synchronisation, never on timing.

The ranks synchronise the way the kernels do, through completion flags in the shared rows, with a
bounded spin (``PYTEST_MNNVL_SIM_KERNEL_TIMEOUT``, default 60 s): a rank that skips a call makes
its peers fail with the kernel's timeout text instead of hanging forever.

Supported FlashInfer: 0.7.2.post1 (checked in full here). :func:`install` verifies every piece it
replaces exists and names the missing one otherwise.

After :func:`install`, this module exposes FlashInfer's ``MoeAlltoAll``, ``Mapping``,
``MnnvlConfig`` and ``moe_a2a_get_workspace_size_per_rank``; the last also works outside ranks,
without install or FlashInfer (pure arithmetic from :mod:`pytest_mnnvl.sizing`).
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

from pytest_mnnvl import sizing

#: FlashInfer releases the sim was checked against, piece by piece.
SUPPORTED_FLASHINFER_VERSIONS = ("0.7.2.post1",)
_FLASHINFER_NAMES = {
    "MoeAlltoAll": "flashinfer.comm.trtllm_moe_alltoall",
    "Mapping": "flashinfer.comm.mapping",
    "MnnvlConfig": "flashinfer.comm.mnnvl",
    "MnnvlMemory": "flashinfer.comm.mnnvl",
}
_installed_pid: int | None = None


def moe_a2a_get_workspace_size_per_rank(
    ep_size: int,
    max_num_tokens: int,
    total_dispatch_payload_size_per_token: int,
    combine_payload_size_per_token: int,
    eplb_stats_num_experts: int = 0,
    *,
    backend: str = "trtllm",
) -> int:
    """FlashInfer's sizing function with FlashInfer's signature, computed without a GPU or a JIT build."""
    if backend == "cake":
        raise NotImplementedError("pytest-mnnvl sim backend: backend='cake' (Blackwell only) is not emulated")
    if backend != "trtllm":
        raise ValueError(f"Unknown MoE all-to-all backend {backend!r}; expected 'trtllm' or 'cake'")
    return sizing.workspace_size_per_rank(
        ep_size,
        max_num_tokens,
        total_dispatch_payload_size_per_token,
        combine_payload_size_per_token,
        eplb_stats_num_experts,
    )


def __getattr__(name: str) -> Any:
    # FlashInfer's own classes, imported on first use so that importing this module stays cheap.
    module_name = _FLASHINFER_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)


def installed() -> bool:
    """Whether :func:`install` ran in this process."""
    return _installed_pid == os.getpid()


def _require(module: Any, name: str, version: str) -> Any:
    if not hasattr(module, name):
        raise RuntimeError(
            f"pytest-mnnvl sim backend: flashinfer {version} has no {module.__name__}.{name}, one of the "
            "pieces the sim replaces; supported FlashInfer versions: " + ", ".join(SUPPORTED_FLASHINFER_VERSIONS)
        )
    return getattr(module, name)


def install(ctx: Any) -> None:
    """Swap FlashInfer's GPU leaves for host ones in this rank process (idempotent)."""
    global _installed_pid
    if installed():
        return
    import warnings

    import flashinfer
    import flashinfer.comm
    import flashinfer.comm.mnnvl as mnnvl
    import flashinfer.comm.trtllm_moe_alltoall as a2a

    from pytest_mnnvl import audit

    from . import _driver, _hazards, _kernels, _shm

    version = str(getattr(flashinfer, "__version__", "unknown"))
    if version not in SUPPORTED_FLASHINFER_VERSIONS:
        warnings.warn(
            f"pytest-mnnvl sim backend: flashinfer {version} is untested (tested: "
            f"{', '.join(SUPPORTED_FLASHINFER_VERSIONS)})",
            RuntimeWarning,
            stacklevel=2,
        )
    for name in ("gen_moe_alltoall_module", "get_moe_alltoall_module", "moe_a2a_combine", "MoeAlltoAll"):
        _require(a2a, name, version)
    for name in ("cuda", "pack_strided_memory", "MnnvlMemory"):
        _require(mnnvl, name, version)
    memory = mnnvl.MnnvlMemory
    for name in ("support_nvlink", "initialized", "allocated_map"):
        _require(memory, name, version)

    # 1. the compiled module
    a2a.gen_moe_alltoall_module = _kernels.SimJitSpec  # type: ignore[assignment]
    clear = getattr(a2a.get_moe_alltoall_module, "cache_clear", None)
    if clear is not None:
        clear()
    # 2. + 3. the driver under MnnvlMemory, and the strided view over the rows
    rank = int(getattr(ctx, "rank", 0))
    mnnvl.cuda = _driver.SimDriver(mnnvl.cuda, 0, _driver.process_label(rank))
    mnnvl.pack_strided_memory = _pack_strided_memory(_shm.strided_tensor)
    # 4. device queries
    memory.initialized = True
    memory.support_nvlink = staticmethod(_all_nvlinks_up)  # type: ignore[method-assign]
    _install_platform_probe(memory)
    _install_torch_device_stubs(_kernels.raise_if_sticky)
    # 5. CPU output= for the functional combine
    wrapped = _combine_accepting_cpu_output(a2a.moe_a2a_combine, a2a)
    if getattr(flashinfer.comm, "moe_a2a_combine", None) is a2a.moe_a2a_combine:
        flashinfer.comm.moe_a2a_combine = wrapped
    a2a.moe_a2a_combine = wrapped
    # 6. the race detector learns of every completed collective (see _hazards)
    _hazards.set_global_rank(rank)
    audit.ensure_installed()
    audit.add_after_collective(_hazards.on_collective)
    _installed_pid = os.getpid()


def _pack_strided_memory(build: Any) -> Any:
    def pack_strided_memory(
        ptr: int, segment_size: int, segment_stride: int, num_segments: int, dtype: Any, dev_id: int
    ) -> Any:
        return build(ptr, segment_size, segment_stride, num_segments, dtype)

    return pack_strided_memory


def _all_nvlinks_up(need_all_up: bool = True) -> bool:
    return True


def _install_platform_probe(memory: Any) -> None:
    """Point both names of ``nvlink_platform_supported`` at a probe that skips the CUDA/NVML checks."""
    try:
        from flashinfer.moe_ep.backends.split.comm import nvlink_common
        from flashinfer.moe_ep.backends.split.comm.nvlink_one_sided import communication
    except ImportError:  # an older FlashInfer without moe_ep: nothing to patch
        return

    def nvlink_platform_supported() -> bool:
        return bool(memory.supports_mnnvl())

    nvlink_common.nvlink_platform_supported = nvlink_platform_supported
    communication.nvlink_platform_supported = nvlink_platform_supported


def _install_torch_device_stubs(raise_if_sticky: Any) -> None:
    """Host answers for the device calls FlashInfer and vLLM make on the all-to-all path."""
    import torch

    def synchronize(device: Any = None) -> None:
        raise_if_sticky()

    def current_device() -> int:
        return 0

    def current_device_index() -> int:
        return 0

    def empty_cache() -> None:
        return None

    torch.cuda.synchronize = synchronize
    torch.cuda.current_device = current_device
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        accelerator.current_device_index = current_device_index
        accelerator.synchronize = synchronize
        accelerator.empty_cache = empty_cache


def _combine_accepting_cpu_output(original: Any, a2a: Any) -> Any:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def moe_a2a_combine(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        output = call["output"]
        if output is None or output.is_cuda:
            return original(*args, **kwargs)
        if not output.is_contiguous():
            raise ValueError(f"output must be contiguous, got stride={output.stride()}")
        module = a2a.get_moe_alltoall_module(call["backend"])
        module.moe_a2a_combine_into(
            call["payload"],
            call["local_num_tokens"],
            call["workspace"],
            call["metainfo"],
            call["runtime_max_tokens_per_rank"],
            call["ep_rank"],
            call["ep_size"],
            call["top_k"],
            call["combine_payload_offset"],
            call["payload_in_workspace"],
            call["output_dtype"],
            call["output_scales"],
            call["output_scalar_scale"],
            call["sf_layout"],
            call["use_low_precision"],
            bool(call["enable_pdl"]),
            call["enable_rank_mask"],
            call["active_rank_mask"],
            output,
        )
        return output

    moe_a2a_combine.__signature__ = signature  # type: ignore[attr-defined]
    return moe_a2a_combine
