"""Bringing vLLM's own ``FlashInferNVLinkOneSidedManager`` up inside a rank, unmodified.

Runs in rank processes only, after the backend's ``install`` (the sim already swaps FlashInfer's
CUDA leaves and makes ``torch.accelerator.current_device_index``/``synchronize``/``empty_cache``
host no-ops, which vLLM 0.33 calls). What is left is vLLM's side, and only the smallest part of it
(gloo world, one ``new_group`` per EP group, then vLLM's real manager class on it):

1. ``VLLM_HAS_FLASHINFER_CUBIN=1``: vLLM's ``has_flashinfer()`` otherwise wants ``flashinfer-cubin``
   or nvcc + ninja on PATH, and the class's ``__init__`` asserts it. Set before vLLM reads it.
2. Parallel-state stand-ins: ``All2AllManagerBase.__init__`` reads ``get_dp_group()`` and
   ``get_tp_group()`` (their ``rank_in_group`` and ``world_size`` only). With the harness's
   layout (EP = one PP stage's ranks) that is DP = 1 and TP = the EP group, exactly what
   ``initialize_model_parallel`` would build for that world. Set only when vLLM's real groups are
   not initialized; ``in_the_same_node_as`` (a real gloo collective) runs as is.
3. vLLM ≤ 0.32 imports FlashInfer's names into ``all2all`` at module import under
   ``has_flashinfer_nvlink_one_sided()``, and its ``mnnvl_compat`` asserts the two-sided module at
   import time. With FlashInfer 0.7.2 installed and (1) set both checks pass for real; nothing is
   injected unless they fail, and then the failure is reported rather than papered over.

vLLM's class, its parent and its barriers run as shipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

#: vLLM's class; imported inside ranks only, after :func:`manager_class` set up what vLLM needs first.
VLLM_CLASS = ("vllm.distributed.device_communicators.all2all", "FlashInferNVLinkOneSidedManager")
#: Where vLLM <= 0.32 imports ``MoeAlltoAll`` from (FlashInfer 0.7.2.post1 has it; 0.7.4 removed it).
PR42976_FLASHINFER_MODULE = "flashinfer.comm.trtllm_moe_alltoall"
#: vLLM releases checked here, by shape.
SUPPORTED = {"0.33.0": "moe_ep", "0.32.0": "pr42976"}


@dataclass
class _GroupView:
    """What ``All2AllManagerBase`` reads from vLLM's ``GroupCoordinator``: a rank and a size."""

    rank_in_group: int
    world_size: int


def _enable_flashinfer_checks() -> None:
    os.environ.setdefault("VLLM_HAS_FLASHINFER_CUBIN", "1")


def _install_parallel_state(cpu_group: Any) -> None:
    import vllm.distributed.parallel_state as ps

    if getattr(ps, "_DP", None) is None:
        ps._DP = _GroupView(0, 1)
    if getattr(ps, "_TP", None) is None:
        ps._TP = _GroupView(int(cpu_group.rank()), int(cpu_group.size()))


def manager_class() -> type:
    """Import vLLM's manager class, with FlashInfer visible to vLLM's availability checks."""
    _enable_flashinfer_checks()
    import importlib

    module = importlib.import_module(VLLM_CLASS[0])
    cls: type = getattr(module, VLLM_CLASS[1])
    _check_flashinfer_names(module)
    return cls


def _check_flashinfer_names(module: Any) -> None:
    from pytest_mnnvl.managers.adapters import detect_shape

    shape = detect_shape(getattr(module, VLLM_CLASS[1]))
    if shape.name == "pr42976":
        missing = [n for n in ("MoeAlltoAll", "Mapping", "MnnvlConfig") if not hasattr(module, n)]
        if missing:
            import importlib

            # What vLLM imports them from: on a FlashInfer without it (0.7.4) this raises the ModuleNotFoundError
            # that is the real cause (a compatibility verdict), not the availability check's False.
            importlib.import_module(PR42976_FLASHINFER_MODULE)
            raise RuntimeError(
                f"vLLM's all2all module did not import FlashInfer's {', '.join(missing)}: its "
                "has_flashinfer_nvlink_one_sided() was False at import (is flashinfer-python installed, "
                "and VLLM_HAS_FLASHINFER_CUBIN=1 set before vLLM was imported?)"
            )


def make_manager(cpu_group: Any) -> Any:
    """``FlashInferNVLinkOneSidedManager(cpu_group)``, as vLLM's EP communicator builds it."""
    cls = manager_class()
    _install_parallel_state(cpu_group)
    return cls(cpu_group)


#: vLLM 0.33's prepare/finalize for this manager: what its fused-MoE layer calls around the experts.
PREPARE_FINALIZE = (
    "vllm.model_executor.layers.fused_moe.prepare_finalize.flashinfer_nvlink_one_sided",
    "FlashInferNVLinkOneSidedPrepareAndFinalize",
)


@dataclass
class _EpGroupView:
    """What the prepare/finalize's ``__init__`` reads from ``get_ep_group()``: the communicator's manager."""

    device_communicator: Any


@dataclass
class _CommunicatorView:
    all2all_manager: Any


def dispatch_path(manager: Any, layer: Any) -> Any:
    """vLLM's own ``FlashInferNVLinkOneSidedPrepareAndFinalize`` around ``manager``, built for ``layer``, as a
    :class:`~pytest_mnnvl.managers.adapters.DispatchPath` (``None`` for the PR #42976 shape, whose path is not
    wired in). Its ``__init__`` (which initializes the manager for the layer, as the model's layer does) sees the
    manager through a stand-in EP group; ``prepare`` runs under a forward context without DP metadata (DP = 1,
    as :func:`_install_parallel_state` has it) with the input quantization deferred (the batch is bf16, so
    vLLM's quantization kernels, CUDA ones, never run), ``finalize`` as shipped. Both call FlashInfer with
    vLLM's own keywords."""
    import importlib

    import torch

    from pytest_mnnvl.managers.adapters import DispatchPath, detect_shape, moe_ep_kwargs

    if detect_shape(type(manager)).name != "moe_ep":
        return None
    import vllm.distributed.parallel_state as ps
    from vllm.forward_context import ForwardContext, override_forward_context
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG
    from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import TopKWeightAndReduceNoOP

    cls = getattr(importlib.import_module(PREPARE_FINALIZE[0]), PREPARE_FINALIZE[1])
    previous = getattr(ps, "_EP", None)
    ps._EP = _EpGroupView(_CommunicatorView(manager))
    try:
        prepare_finalize = cls(**moe_ep_kwargs(layer), num_dispatchers=int(manager.world_size))
    finally:
        ps._EP = previous
    routed: dict[str, Any] = {}

    def dispatch(hidden_states: Any, topk_ids: Any, topk_weights: Any) -> Any:
        context = ForwardContext(no_compile_layers={}, attn_metadata={}, slot_mapping={})
        with override_forward_context(context):
            received = prepare_finalize.prepare(
                hidden_states,
                topk_weights,
                topk_ids,
                layer.num_experts,
                None,
                False,
                FUSED_MOE_UNQUANTIZED_CONFIG,
                defer_input_quant=True,
            )
        routed.update(tokens=hidden_states.shape[0], topk_ids=topk_ids, topk_weights=topk_weights)
        return received[0]

    def combine(expert_output: Any) -> Any:
        output = torch.empty(
            (routed["tokens"], layer.hidden_size), dtype=expert_output.dtype, device=expert_output.device
        )
        prepare_finalize.finalize(
            output, expert_output, routed["topk_weights"], routed["topk_ids"], False, TopKWeightAndReduceNoOP()
        )
        return output

    return DispatchPath(f"vLLM's {PREPARE_FINALIZE[1]}.prepare/finalize", dispatch, combine)


def version() -> str:
    """The imported vLLM's version string (inside a rank)."""
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))
