"""The sim's leaves that only FlashInfer 0.7.4 has (the common ones are in :mod:`.sim`).

0.7.4 deleted ``flashinfer.comm.trtllm_moe_alltoall``: ``flashinfer.moe_ep``'s
``NVLinkOneSidedAlltoAll`` owns its workspace (a refcounted ``_WORKSPACES`` entry per layout,
freed by the last ``destroy()``) and calls a new op module directly. Its Python runs unmodified;
only these leaves change:

1. **The compiled op module.** ``flashinfer.jit.comm.gen_nvlink_one_sided_alltoall_module`` (where
   ``nvlink_one_sided.kernels.get_nvlink_one_sided_alltoall_module`` looks it up, on first use)
   returns a spec whose ``build_and_load()`` gives
   :class:`~pytest_mnnvl.backends._kernels_v074.SimNvlinkOneSidedModule`, the 15 functions of
   ``nvlink_one_sided_alltoall``. The loader's and ``layout_constants``' caches are cleared once.
2. **``device_support_pdl``** (``flashinfer.utils``, imported inside ``__init__``) reads the compute
   capability of a CUDA device: it answers for the simulated H100 (9.0, so PDL is on, which the
   host kernels ignore); non-CUDA devices still get False.
3. **``torch.cuda.is_current_stream_capturing``** (``enable_rank_mask=True`` asks it before each
   step) answers False: a host process captures no CUDA graph.

With POSIX-fd handles (the common driver has no FABRIC) 0.7.4 turns CFT counted writes off
without probing, and ``moe_a2a_lamport_available()`` is False, so every step takes the fence
kernels, as on an H100.
"""

from __future__ import annotations

import importlib
from typing import Any

_ONE_SIDED = "flashinfer.moe_ep.backends.split.comm.nvlink_one_sided"
#: What this release must have for the steps below: (module, attribute path).
PIECES: tuple[tuple[str, str], ...] = (
    ("flashinfer.jit.comm", "gen_nvlink_one_sided_alltoall_module"),
    (f"{_ONE_SIDED}.kernels", "get_nvlink_one_sided_alltoall_module.cache_clear"),
    (f"{_ONE_SIDED}.kernels", "layout_constants.cache_clear"),
    (f"{_ONE_SIDED}.communication", "NVLinkOneSidedAlltoAll._WORKSPACES"),
    ("flashinfer.utils", "device_support_pdl"),
    ("flashinfer.comm.mnnvl", "MnnvlMemory.uses_fabric_handles"),
)


def install_leaves() -> None:
    """Steps 1 to 3 above."""
    import torch

    from . import _kernels_v074

    # Looked up by name (not imported as symbols) so that this module also type-checks against 0.7.2.
    jit_comm: Any = importlib.import_module("flashinfer.jit.comm")
    kernels: Any = importlib.import_module(f"{_ONE_SIDED}.kernels")
    utils: Any = importlib.import_module("flashinfer.utils")
    jit_comm.gen_nvlink_one_sided_alltoall_module = _kernels_v074.SimJitSpec
    kernels.get_nvlink_one_sided_alltoall_module.cache_clear()
    kernels.layout_constants.cache_clear()
    utils.device_support_pdl = _device_support_pdl
    torch.cuda.is_current_stream_capturing = _not_capturing


def _device_support_pdl(device: Any) -> bool:
    from ._kernels import SIM_SM_VERSION

    return bool(getattr(device, "type", None) == "cuda" and SIM_SM_VERSION >= 90)


def _not_capturing() -> bool:
    return False
