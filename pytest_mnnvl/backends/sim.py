"""``sim``: FlashInfer's own one-sided MoE all-to-all, running on CPU ranks.

Everything FlashInfer implements in Python runs unmodified inside each rank: 0.7.2.post1's
``MoeAlltoAll`` with its process-wide ``_WORKSPACE_CACHE`` and phase asserts, 0.7.4's
``NVLinkOneSidedAlltoAll`` with its refcounted ``_WORKSPACES``, ``MnnvlMemory`` (allocation
bookkeeping, the handle-type vote, the bump allocator, the SCM_RIGHTS fd exchange, teardown),
``Mapping``, ``MnnvlConfig``, ``TorchDistBackend`` and ``flashinfer.moe_ep``
(``create_communication``, ``NVLinkOneSidedAlltoAll``). A manager under test, vLLM's included,
therefore meets FlashInfer's real sizing, caching, collectives and error messages, and API drift
between FlashInfer releases shows up here first. :func:`install` replaces only the leaves that
need a GPU, each at the lowest level where it can be swapped cleanly. Each supported release has
one module with its own leaves (:data:`RELEASES`: the compiled op module above all); these are
common to all:

1. **The CUDA driver under ``MnnvlMemory``.** The module global ``cuda`` of
   ``flashinfer.comm.mnnvl`` becomes a :class:`~pytest_mnnvl.backends._driver.SimDriver`:
   ``cuMemCreate`` → a memfd row, ``cuMemExportToShareableHandle``/``…Import…`` → fd dup,
   ``cuMemAddressReserve`` → a ``PROT_NONE`` reservation, ``cuMemMap`` → ``MAP_FIXED|MAP_SHARED``
   at ``start + i * rank_stride``, ``cuMemSetAccess`` → a mapped-range check, ``cuMemUnmap`` /
   ``cuMemRelease`` / ``cuMemAddressFree`` → unmap/close/munmap, ``cuCtxGetDevice`` → device 0,
   ``cuDeviceGetAttribute`` → a single-node H100 without IMEX (no FABRIC, so FlashInfer takes its
   POSIX-fd path), ``cuMemGetAllocationGranularity`` → 2 MiB. Other driver calls raise.
2. **``pack_strided_memory`` in ``flashinfer.comm.mnnvl``**, which wraps the rows in a CUDA DLPack
   capsule (device type hard-coded to CUDA), builds the same ``[ep_size, size]`` strided uint8
   view as a CPU tensor over the mapped range instead; an ``owner=`` (0.7.4 passes the
   ``MnnvlMemory``) is kept alive by every view, as the capsule keeps it.
3. **Device queries.** ``MnnvlMemory.initialized`` is preset (its ``initialize()`` only creates a
   CUDA context and starts NVML); ``MnnvlMemory.support_nvlink`` (an NVML scan of NVLink states)
   answers "all links up"; ``nvlink_platform_supported`` in ``moe_ep``'s ``nvlink_common`` and
   ``nvlink_one_sided.communication`` (``torch.cuda.is_available()`` + NVML) is replaced by one
   that asks ``MnnvlMemory.supports_mnnvl()``; ``torch.cuda.synchronize``/``current_device`` and
   ``torch.accelerator.current_device_index``/``synchronize``/``empty_cache`` (FlashInfer calls
   the first in ``_reset_workspace`` and 0.7.4's ``destroy()``; vLLM calls the others) become
   host no-ops. JIT and streams are not on the path.

A race detector (:mod:`pytest_mnnvl.backends._hazards`) judges every dispatch write and every
``initialize`` against the combine reads of peers that nothing has yet ordered before it, and raises
``WorkspaceRace`` (on every rank) where a GPU would silently corrupt a slower peer's combine: the
verdict depends on the program's synchronisation, never on timing. Only 0.7.2.post1's op module
reports to it so far; 0.7.4's routes every shared-row access through ``_write_rows``/``_read_rows``
(:mod:`pytest_mnnvl.backends._kernels_v074`), the place to hook it in.

The ranks synchronise the way the kernels do, through completion flags in the shared rows, with a
bounded spin (``PYTEST_MNNVL_SIM_KERNEL_TIMEOUT``, default 60 s): a rank that skips a call makes
its peers fail with the kernel's timeout text instead of hanging forever.

Supported FlashInfer: 0.7.2.post1 (checked in full against GPUs) and 0.7.4 (checked against its
sources, CPU only). :func:`install` refuses any other installed release with one error naming it,
the supported ones and which of their pieces it lacks, and verifies that every piece it replaces
exists.

After :func:`install`, this module exposes FlashInfer's ``MoeAlltoAll`` (0.7.2.post1 only),
``Mapping``, ``MnnvlConfig`` and ``moe_a2a_get_workspace_size_per_rank``; the last is 0.7.2.post1's
arithmetic and also works outside ranks, without install or FlashInfer (:mod:`pytest_mnnvl.model.sizing`;
0.7.4's is :mod:`pytest_mnnvl.model.sizing_v074`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from pytest_mnnvl.model import sizing

from . import _sim_v072, _sim_v074

#: One module per FlashInfer release the sim was checked against, piece by piece: its ``PIECES``
#: (what must exist) and ``install_leaves()`` (the leaves only that release has).
RELEASES: dict[str, ModuleType] = {"0.7.2.post1": _sim_v072, "0.7.4": _sim_v074}
SUPPORTED_FLASHINFER_VERSIONS = tuple(RELEASES)
#: What every release must have for the common leaves: (module, attribute path).
_COMMON_PIECES: tuple[tuple[str, str], ...] = (
    ("flashinfer.comm.mnnvl", "cuda"),
    ("flashinfer.comm.mnnvl", "pack_strided_memory"),
    ("flashinfer.comm.mnnvl", "MnnvlMemory.support_nvlink"),
    ("flashinfer.comm.mnnvl", "MnnvlMemory.initialized"),
    ("flashinfer.comm.mnnvl", "MnnvlMemory.allocated_map"),
)
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


def missing_pieces(pieces: tuple[tuple[str, str], ...]) -> list[str]:
    """The ``module.attribute`` paths of ``pieces`` the installed FlashInfer lacks (imports them)."""
    missing: list[str] = []
    for module_name, path in pieces:
        try:
            target: Any = importlib.import_module(module_name)
        except Exception as exc:  # a module of another release may fail in any way on import
            gone = module_name if isinstance(exc, ModuleNotFoundError) else f"{module_name} ({type(exc).__name__})"
            if gone not in missing:
                missing.append(gone)
            continue
        for name in path.split("."):
            if not hasattr(target, name):
                missing.append(f"{module_name}.{path}")
                break
            target = getattr(target, name)
    return missing


def absent_modules(package_dir: str | os.PathLike[str] | None) -> dict[str, list[str]]:
    """Per supported release, the modules holding its pieces that have no source under ``package_dir`` (the
    installed ``flashinfer`` package's directory; ``None``: all of them). Read from files, not imported: the
    parent never imports FlashInfer, and a release nobody checked may fail on import in any way."""
    root = Path(package_dir) if package_dir is not None else None
    absent: dict[str, list[str]] = {}
    for supported, module in RELEASES.items():
        names = dict.fromkeys(name for name, _path in _COMMON_PIECES + module.PIECES)
        absent[supported] = [name for name in names if root is None or not _has_source(root, name)]
    return absent


def _has_source(root: Path, module_name: str) -> bool:
    base = root.joinpath(*module_name.split(".")[1:])
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def release_for(version: str) -> ModuleType:
    """The sim's module for FlashInfer ``version``, or one error naming what to install instead."""
    release = RELEASES.get(version)
    if release is not None:
        return release
    gaps = []
    for supported, module in RELEASES.items():
        missing = missing_pieces(_COMMON_PIECES + module.PIECES)
        gaps.append(
            f"{supported}: {', '.join(missing) if missing else 'nothing missing, but this version was not checked'}"
        )
    raise RuntimeError(
        f"pytest-mnnvl sim backend: flashinfer-python {version} is installed, but the sim supports only "
        f"{', '.join(RELEASES)}; pieces it lacks per supported release: {'; '.join(gaps)}. Install a "
        f"supported one (pip install --no-deps flashinfer-python=={SUPPORTED_FLASHINFER_VERSIONS[-1]})"
    )


def preload() -> None:
    """Import what :func:`install` imports, patching nothing: a zygote (:mod:`pytest_mnnvl.worlds.zygote`) runs
    it once before it forks ranks that each install the sim."""
    import flashinfer

    release = release_for(str(getattr(flashinfer, "__version__", "unknown")))
    missing_pieces(_COMMON_PIECES + release.PIECES)
    import flashinfer.comm.mnnvl

    from pytest_mnnvl.worlds import audit  # noqa: F401

    from . import _driver, _hazards, _kernels, _shm  # noqa: F401

    with contextlib.suppress(ImportError):
        from flashinfer.moe_ep.backends.split.comm import nvlink_common  # noqa: F401
        from flashinfer.moe_ep.backends.split.comm.nvlink_one_sided import communication  # noqa: F401


def install(ctx: Any) -> None:
    """Swap FlashInfer's GPU leaves for host ones in this rank process (idempotent)."""
    global _installed_pid
    if installed():
        return
    import flashinfer

    version = str(getattr(flashinfer, "__version__", "unknown"))
    release = release_for(version)
    missing = missing_pieces(_COMMON_PIECES + release.PIECES)
    if missing:
        raise RuntimeError(
            f"pytest-mnnvl sim backend: flashinfer {version} has no {', '.join(missing)}, pieces the sim "
            "replaces; supported FlashInfer versions: " + ", ".join(SUPPORTED_FLASHINFER_VERSIONS)
        )
    import flashinfer.comm.mnnvl as mnnvl

    from pytest_mnnvl.worlds import audit

    from . import _driver, _hazards, _kernels, _shm

    # the release's own leaves (the compiled module above all)
    release.install_leaves()
    # 1. + 2. the driver under MnnvlMemory, and the strided view over the rows
    rank = int(getattr(ctx, "rank", 0))
    mnnvl.cuda = _driver.SimDriver(mnnvl.cuda, 0, _driver.process_label(rank))
    mnnvl.pack_strided_memory = _pack_strided_memory(_shm.strided_tensor)
    # 3. device queries
    memory = mnnvl.MnnvlMemory
    memory.initialized = True
    memory.support_nvlink = staticmethod(_all_nvlinks_up)  # type: ignore[method-assign]
    _install_platform_probe(memory)
    _install_torch_device_stubs(_kernels.raise_if_sticky)
    # the race detector learns of every completed collective (see _hazards)
    _hazards.set_global_rank(rank)
    # a rank spinning on a peer's flag says for whom, so a timeout tells a deadlock from a slow world
    _kernels.set_ep_group_ranks(getattr(ctx, "ep_group_ranks", ()) or ())
    audit.ensure_installed()
    audit.add_after_collective(_hazards.on_collective)
    _installed_pid = os.getpid()


def _pack_strided_memory(build: Any) -> Any:
    def pack_strided_memory(
        ptr: int,
        segment_size: int,
        segment_stride: int,
        num_segments: int,
        dtype: Any,
        dev_id: int,
        *,
        owner: Any = None,
    ) -> Any:
        return build(ptr, segment_size, segment_stride, num_segments, dtype, owner=owner)

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
