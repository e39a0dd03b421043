"""The sim's leaves that only FlashInfer 0.7.2.post1 has (the common ones are in :mod:`.sim`).

1. **The compiled op module.** ``flashinfer.comm.trtllm_moe_alltoall.gen_moe_alltoall_module``
   (the JIT spec factory) returns a spec whose ``build_and_load()`` gives
   :class:`~pytest_mnnvl.backends._kernels.SimMoeA2AModule`: ``moe_a2a_initialize``, ``…_dispatch``,
   ``…_combine``, ``…_combine_into``, ``…_sanitize_expert_ids``, ``…_get_aux_data_size``,
   ``…_get_metainfo_index_pairs``. FlashInfer's own ``_get_moe_alltoall_module_for_target``
   wrappers still sit on top (its cache is cleared once). Nothing is compiled. Only
   ``backend="trtllm"`` exists (``"cake"`` is Blackwell-only anyway).
2. **``moe_a2a_combine``'s ``output.is_cuda`` test.** The functional combine refuses a CPU
   ``output=`` tensor before reaching the op module; the sim wraps that function (the smallest
   enclosing piece) so a CPU ``output`` goes to ``moe_a2a_combine_into`` after FlashInfer's
   contiguity check. Without ``output`` FlashInfer's function runs as is.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

_A2A = "flashinfer.comm.trtllm_moe_alltoall"
#: What this release must have for the steps below: (module, attribute path).
PIECES: tuple[tuple[str, str], ...] = (
    (_A2A, "gen_moe_alltoall_module"),
    (_A2A, "get_moe_alltoall_module"),
    (_A2A, "moe_a2a_combine"),
    (_A2A, "MoeAlltoAll"),
)


def install_leaves() -> None:
    """Replace the op module and wrap the functional combine (steps 1 and 2 above)."""
    import flashinfer.comm
    import flashinfer.comm.trtllm_moe_alltoall as a2a

    from . import _kernels

    a2a.gen_moe_alltoall_module = _kernels.SimJitSpec  # type: ignore[assignment]
    clear = getattr(a2a.get_moe_alltoall_module, "cache_clear", None)
    if clear is not None:
        clear()
    wrapped = _combine_accepting_cpu_output(a2a.moe_a2a_combine, a2a)
    if getattr(flashinfer.comm, "moe_a2a_combine", None) is a2a.moe_a2a_combine:
        flashinfer.comm.moe_a2a_combine = wrapped
    a2a.moe_a2a_combine = wrapped


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
