"""FlashInfer 0.7.2.post1's handle: ``MoeAlltoAll`` (see :mod:`.handles`).

``MoeAlltoAll(mapping, max_num_tokens, top_k, num_experts, workspace_size_per_rank=...)`` takes the
byte size per rank and the token count apart, and keeps every workspace it allocated in the
process-wide ``MoeAlltoAll._WORKSPACE_CACHE`` (keyed by size, rank, EP size, max tokens, EPLB and
backend) until ``_reset_workspace()`` evicts it: dropping a handle frees nothing. It has no
``destroy``. ``flashinfer.moe_ep``'s ``NVLinkOneSidedAlltoAll`` wraps one in ``_alltoall``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pytest_mnnvl.managers.handles import Capacity, HandleFacts, InjectedBuildFailure
from pytest_mnnvl.model.releases import V072

RELEASE = V072
HANDLE_CLASS = "MoeAlltoAll"
_A2A = "flashinfer.comm.trtllm_moe_alltoall"


class Builder:
    """``MoeAlltoAll`` on one EP rank: the workspace sized by FlashInfer's own formula."""

    def __init__(self, ep_rank: int, ep_size: int) -> None:
        self.ep_rank = ep_rank
        self.ep_size = ep_size

    def size_for(self, capacity: Capacity, top_k: int) -> int:
        from flashinfer.comm.trtllm_moe_alltoall import moe_a2a_get_workspace_size_per_rank

        return int(
            moe_a2a_get_workspace_size_per_rank(
                self.ep_size,
                capacity.max_num_tokens,
                capacity.dispatch_bytes_per_token,
                capacity.combine_bytes_per_token,
            )
        )

    def build(
        self, capacity: Capacity, top_k: int, num_experts: int, comm: Any, *, max_num_tokens: int | None = None
    ) -> Any:
        tokens = capacity.max_num_tokens if max_num_tokens is None else max_num_tokens
        return self.build_sized(tokens, self.size_for(capacity, top_k), top_k, num_experts, comm)

    def build_sized(self, max_num_tokens: int, size_per_rank: int, top_k: int, num_experts: int, comm: Any) -> Any:
        """One ``MoeAlltoAll`` with exactly this byte size (a collective allocation over ``comm``).

        0.7.2 alone can size a workspace apart from its token count (vLLM 0.32's total-need policy)."""
        import torch
        from flashinfer.comm import Mapping, MoeAlltoAll
        from flashinfer.comm.mnnvl import MnnvlConfig

        gpus_per_node = torch.cuda.device_count() or self.ep_size
        mapping = Mapping(self.ep_size, self.ep_rank, gpus_per_node, tp_size=self.ep_size, moe_ep_size=self.ep_size)
        with warnings.catch_warnings():
            # Deprecated in favour of flashinfer.moe_ep in 0.7.1; still what vLLM's managers use.
            warnings.filterwarnings("ignore", "MoeAlltoAll is deprecated", DeprecationWarning)
            return MoeAlltoAll(
                mapping,
                max_num_tokens,
                top_k,
                num_experts,
                workspace_size_per_rank=size_per_rank,
                mnnvl_config=MnnvlConfig(comm_backend=comm),
            )

    def release(self, handle: Any, keep: Any = None) -> None:
        """Evict the workspace from FlashInfer's process-wide cache; the memory goes with the last
        reference. Not when ``keep`` shares it (same cache geometry: evicting would orphan ``keep``'s)."""
        if keep is not None and getattr(handle, "mnnvl_mem", None) is getattr(keep, "mnnvl_mem", None):
            return
        try:
            handle._reset_workspace()
        except KeyError:
            pass  # already evicted (another handle of the same geometry was released first)
        except RuntimeError:
            pass  # unmapped for a checkpoint: nothing mapped to free here

    def drop(self, handle: Any) -> None:
        return None


def builder(ep_rank: int, ep_size: int) -> Builder:
    return Builder(ep_rank, ep_size)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def facts(a2a: Any) -> HandleFacts:
    return HandleFacts(
        size_per_rank=_int_or_none(getattr(a2a, "workspace_size_per_rank", None)),
        max_num_tokens=_int_or_none(getattr(a2a, "max_num_tokens", None)),
        top_k=_int_or_none(getattr(a2a, "top_k", None)),
        num_experts=_int_or_none(getattr(a2a, "num_experts", None)),
    )


def round_trip_handle(communication: Any) -> Any:
    """The ``MoeAlltoAll`` a ``flashinfer.moe_ep`` communication wraps (``None`` once destroyed)."""
    # ``.alltoall`` raises once destroyed; ``_alltoall`` is None then. Read the field.
    return getattr(communication, "_alltoall", None)


def dispatch(a2a: Any, layer: Any, experts: Any, payloads: list[Any], tokens: int) -> tuple[Any, int | None]:
    """``MoeAlltoAll.dispatch`` with every payload of the layer, in its order (activations first)."""
    received = a2a.dispatch(experts, payloads, tokens)
    offset = getattr(getattr(a2a, "_state", None), "combine_payload_offset", None)
    return received[0], offset


def combine(a2a: Any, payload: Any, tokens: int) -> Any:
    return a2a.combine(payload, tokens)


def reinitialize(a2a: Any) -> None:
    """``moe_a2a_initialize`` on the live workspace again: zeroes this rank's row (a mutant's defect)."""
    from flashinfer.comm.trtllm_moe_alltoall import moe_a2a_initialize

    a2a.metainfo = moe_a2a_initialize(a2a.workspace, a2a.ep_rank, a2a.ep_size, a2a.max_num_tokens)


@contextmanager
def inject_build_failure() -> Iterator[None]:
    """Every ``MoeAlltoAll`` construction in this rank fails before it allocates (both manager shapes
    build through ``MoeAlltoAll.get_workspace``)."""
    from flashinfer.comm.trtllm_moe_alltoall import MoeAlltoAll

    original = MoeAlltoAll.__dict__["get_workspace"]

    def get_workspace(cls: type, *args: Any, **kwargs: Any) -> Any:
        raise InjectedBuildFailure("pytest-mnnvl: injected failure of MoeAlltoAll.get_workspace")

    MoeAlltoAll.get_workspace = classmethod(get_workspace)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        MoeAlltoAll.get_workspace = original  # type: ignore[method-assign]


def handle_type() -> type:
    from flashinfer.comm.trtllm_moe_alltoall import MoeAlltoAll

    return MoeAlltoAll


def evict_all() -> int:
    """Empty ``MoeAlltoAll._WORKSPACE_CACHE`` (nothing to do if FlashInfer's module was never imported)."""
    import sys

    module = sys.modules.get(_A2A)
    if module is None:
        return 0
    cache = module.MoeAlltoAll._WORKSPACE_CACHE
    count = len(cache)
    cache.clear()
    return count
