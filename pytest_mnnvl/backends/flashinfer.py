"""``flashinfer``: the real FlashInfer one-sided all-to-all on GPUs (imported lazily).

:func:`install` binds the rank to its GPU, forbids NVLink multicast (``MoeAlltoAll`` never needs
it; on these hosts a stray multicast object can take the GPUs out of service) and makes sure the
one-sided op module of the installed release (:data:`OP_MODULES`) can be built or loaded before any test
collective runs, so a missing JIT toolchain is one clear error, not a hang of the peers. Like the sim
backend, this module exposes FlashInfer's ``MoeAlltoAll``, ``Mapping``, ``MnnvlConfig`` and
``moe_a2a_get_workspace_size_per_rank`` (here the real ones; the first and last exist up to 0.7.2.post1).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from pytest_mnnvl.model.releases import V072, V074

FORCE_POSIX_FD_ENV = "PYTEST_MNNVL_FORCE_POSIX_FD"
#: The one platform query answered in a shared-GPU world, and the answer (see :func:`_answer_shared_gpu`).
SHARED_GPU_ANSWER = "flashinfer.comm.mnnvl.MnnvlMemory.supports_mnnvl -> True"
_FLASHINFER_NAMES = {
    "MoeAlltoAll": "flashinfer.comm.trtllm_moe_alltoall",
    "moe_a2a_get_workspace_size_per_rank": "flashinfer.comm.trtllm_moe_alltoall",
    "Mapping": "flashinfer.comm.mapping",
    "MnnvlConfig": "flashinfer.comm.mnnvl",
    "MnnvlMemory": "flashinfer.comm.mnnvl",
}
#: Per supported release, the loader of the one-sided op module its all-to-all calls (module, function, its
#: arguments) and the JIT module's name (for the error text).
OP_MODULES: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    V072: ("flashinfer.comm.trtllm_moe_alltoall", "get_moe_alltoall_module", ("trtllm",), "mnnvl_moe_alltoall"),
    V074: (
        "flashinfer.moe_ep.backends.split.comm.nvlink_one_sided.kernels",
        "get_nvlink_one_sided_alltoall_module",
        (),
        "nvlink_one_sided_alltoall",
    ),
}
_installed_pid: int | None = None
#: What :func:`install` answered in this process in FlashInfer's place, recorded on every context it is given.
_answered: tuple[str, ...] = ()


def __getattr__(name: str) -> Any:
    module_name = _FLASHINFER_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)


def _visible_gpu_count() -> int | None:
    """GPUs this process may use, without creating a CUDA context; None if no driver is found."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            present = int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        try:
            present = len(os.listdir("/proc/driver/nvidia/gpus"))
        except OSError:
            return None
    if visible is None:
        return present
    named = [part for part in visible.split(",") if part.strip()]
    return min(len(named), present)


def available() -> str | None:
    """Why this backend cannot run here, or None when it can (``--mnnvl-backend=auto``)."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    if importlib.util.find_spec("flashinfer") is None:
        return "flashinfer-python is not installed (pip install flashinfer-python apache-tvm-ffi)"
    count = _visible_gpu_count()
    if count is None:
        return "no NVIDIA driver found (NVML and /proc/driver/nvidia unavailable)"
    if count < 2:
        return f"{count} GPU(s) visible to this process; the one-sided all-to-all needs at least 2"
    return None


def _forbid_multicast() -> None:
    """Make any NVLink multicast creation raise in this process (the all-to-all path has none)."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("pytest-mnnvl: cuMulticastCreate is forbidden in test ranks (MoeAlltoAll never needs it)")

    driver.cuMulticastCreate = refuse


def _answer_shared_gpu() -> tuple[str, ...]:
    """Answer FlashInfer's NVLink platform question for ranks that share a GPU, and nothing else.

    ``flashinfer.moe_ep`` (0.7.2.post1 and 0.7.4 alike) asks each EP rank ``nvlink_platform_supported()``, which
    checks ``torch.cuda.is_available()`` and then ``MnnvlMemory.supports_mnnvl()``, an NVML scan that every
    NVLink of the rank's GPU is P2P-capable and up; ``create_communication`` raises "NVLink backends are not
    supported on EP ranks [...]" when a rank says no. On one GPU without NVLink the peers need no link at all
    (their rows are on the same device, mapped through POSIX-fd handles), so that one query is answered
    ``True``; CUDA availability, the handle type, the fd exchange, allocation and the kernels stay FlashInfer's.
    ``supports_mnnvl`` has no other caller in either release (0.7.2.post1's ``MoeAlltoAll`` never asks)."""
    from flashinfer.comm.mnnvl import MnnvlMemory

    def supports_mnnvl() -> bool:
        return True

    MnnvlMemory.supports_mnnvl = staticmethod(supports_mnnvl)  # type: ignore[method-assign]
    return (SHARED_GPU_ANSWER,)


def install(ctx: Any) -> None:
    """Bind this rank to ``ctx.device`` and load FlashInfer's one-sided module (idempotent); in a world whose
    ranks share a GPU (``ctx.ranks_per_gpu > 1``) also answer the NVLink platform query (recorded in
    ``ctx.answered_queries``)."""
    global _installed_pid, _answered
    if _installed_pid == os.getpid():
        ctx.answered_queries = _answered
        return
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            "pytest-mnnvl flashinfer backend: this torch build sees no CUDA device; use --mnnvl-backend=sim"
        )
    torch.cuda.set_device(ctx.device)
    _forbid_multicast()
    import importlib

    from flashinfer.comm.mnnvl import MnnvlMemory

    from pytest_mnnvl.model import releases

    release = releases.current()
    module_name, loader, args, jit_name = OP_MODULES[release]
    if os.environ.get(FORCE_POSIX_FD_ENV) == "1":
        # A fabric probe can read "supported" in a VM without IMEX; POSIX fds always work on one host. (0.7.4
        # has no such cache: its ranks vote on the handle type and fall back to POSIX fds themselves.)
        MnnvlMemory._fabric_supported = False
    if getattr(ctx, "ranks_per_gpu", 1) > 1:
        _answered = _answer_shared_gpu()
    try:
        getattr(importlib.import_module(module_name), loader)(*args)
    except Exception as exc:
        raise RuntimeError(
            f"pytest-mnnvl flashinfer backend: FlashInfer {release}'s one-sided all-to-all module ({jit_name}) "
            f"could not be built or loaded: {type(exc).__name__}: {exc}. It is JIT-compiled on first use "
            "(minutes; needs nvcc, cublasLt.h and a linkable libcuda). Point "
            "FLASHINFER_WORKSPACE_BASE at a prebuilt cache to skip the build, or use --mnnvl-backend=sim."
        ) from exc
    ctx.answered_queries = _answered
    _installed_pid = os.getpid()
