"""A second correct manager, of another design than the reference: vLLM 0.33's shape, on ``flashinfer.moe_ep``.

Shape: ``moe_ep``: ``initialize(max_num_tokens, top_k, num_experts, hidden_size, dispatch_format=None,
extra_payload_bytes_per_token=0)``, the handle at ``manager.communication`` (a ``flashinfer.moe_ep``
``NVLinkOneSidedAlltoAll``, built through ``create_communication`` on FlashInfer 0.7.2.post1 and 0.7.4 alike).

Where it differs from :class:`~pytest_mnnvl.managers.reference.ReferenceManager`, so that the suite is shown to
pass a correct manager it was not written around:

- its growth state is a :class:`Reach` (largest token count, hidden size and dispatched activation bytes
  seen), not a byte :class:`~pytest_mnnvl.managers.handles.Capacity`; the activation bytes of a layer are what
  FlashInfer's own ``MoEEpCommParams.dispatch_bytes_per_token`` says for its format, plus its extra payload;
- one union of formats is not a format, so it builds with the narrowest format FlashInfer offers at the grown
  hidden size and reserves the rest as ``extra_payload_bytes_per_token`` (the kernels only see capacities);
- a different ``top_k``/``num_experts`` raises :class:`ExpertLayoutChanged` before any state is touched;
- it offers its own forward-pass path (``mnnvl_dispatch``/``mnnvl_combine``: ``communication.dispatch`` and
  ``combine`` with ``flashinfer.moe_ep``'s own keywords), which the suite sends a batch through.

What every correct manager must do it does too: a rebuild builds the new handle first, barriers on the EP group
(never the world), then drops and frees the old one, so a failed build leaves the working handle; superseded
handles are freed (``destroy()``; on 0.7.2, whose ``destroy()`` only drops a reference while ``MoeAlltoAll``
caches the workspace process-wide, also that cache entry's eviction, through the release's handle builder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pytest_mnnvl.managers import handles
from pytest_mnnvl.managers.handles import Capacity
from pytest_mnnvl.managers.reference import COMBINE_BYTES_PER_ELEMENT, ROUTING_BYTES_PER_TOP_K, EpComm
from pytest_mnnvl.model.releases import V074

__all__ = ["ExpertLayoutChanged", "MoeEpManager", "Reach"]


class ExpertLayoutChanged(ValueError):
    """A layer asks for another ``top_k`` or ``num_experts`` than the live workspace routes for: one
    ``NVLinkOneSidedAlltoAll`` is built for exactly one of each, so the manager refuses rather than grows."""


@dataclass(frozen=True)
class Reach:
    """The largest layer the workspace must serve, one maximum per dimension (grown, never shrunk)."""

    max_num_tokens: int
    hidden_size: int
    #: Activations as dispatched (format bytes, scales included) plus the extra payload, per token.
    activation_bytes_per_token: int

    def admits(self, other: Reach) -> bool:
        return (
            other.max_num_tokens <= self.max_num_tokens
            and other.hidden_size <= self.hidden_size
            and other.activation_bytes_per_token <= self.activation_bytes_per_token
        )

    def grown_by(self, other: Reach) -> Reach:
        return Reach(
            max(self.max_num_tokens, other.max_num_tokens),
            max(self.hidden_size, other.hidden_size),
            max(self.activation_bytes_per_token, other.activation_bytes_per_token),
        )

    def capacity(self, top_k: int) -> Capacity:
        """The bytes per token FlashInfer's one-sided kernels need for this reach (routing ids and weights added)."""
        return Capacity(
            self.max_num_tokens,
            self.activation_bytes_per_token + top_k * ROUTING_BYTES_PER_TOP_K,
            self.hidden_size * COMBINE_BYTES_PER_ELEMENT,
        )


def _positive(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")
    return value


class MoeEpManager:
    """Per-dimension union-grow manager of the ``moe_ep`` shape, built on ``flashinfer.moe_ep``."""

    mnnvl_shape = "moe_ep"
    mnnvl_policy = "per_dimension"

    def __init__(self, cpu_group: Any) -> None:
        self.cpu_group = cpu_group
        self.rank = int(cpu_group.rank())
        self.world_size = int(cpu_group.size())
        self._api = handles.api()
        self._builder = self._api.builder(self.rank, self.world_size)
        self.communication: Any = None
        self._forget()

    def _forget(self) -> None:
        self.initialized = False
        self.reach: Reach | None = None
        self.top_k = 0
        self.num_experts = 0

    # ---- the protocol -----------------------------------------------------------------------

    def initialize(
        self,
        max_num_tokens: int,
        top_k: int,
        num_experts: int,
        hidden_size: int,
        dispatch_format: Any = None,
        extra_payload_bytes_per_token: int = 0,
    ) -> None:
        """Serve this layer: keep the live handle where its reach admits the layer, else rebuild for the union."""
        for name, value in (
            ("max_num_tokens", max_num_tokens),
            ("top_k", top_k),
            ("num_experts", num_experts),
            ("hidden_size", hidden_size),
        ):
            _positive(name, value)
        if not isinstance(extra_payload_bytes_per_token, int) or extra_payload_bytes_per_token < 0:
            raise ValueError(f"extra_payload_bytes_per_token={extra_payload_bytes_per_token!r} must be an integer >= 0")
        if self.initialized and (top_k, num_experts) != (self.top_k, self.num_experts):
            raise ExpertLayoutChanged(
                f"initialize(top_k={top_k}, num_experts={num_experts}): the live flashinfer.moe_ep workspace routes "
                f"top_k={self.top_k} over num_experts={self.num_experts}; MoE layers sharing it must agree"
            )
        activation = _activation_bytes(num_experts, top_k, hidden_size, dispatch_format)
        wanted = Reach(max_num_tokens, hidden_size, activation + extra_payload_bytes_per_token)
        if self.initialized and self.reach is not None and self.reach.admits(wanted):
            return
        target = wanted if self.reach is None else self.reach.grown_by(wanted)
        self._replace(target, top_k, num_experts)

    def cleanup(self) -> None:
        """Free the workspace and forget the reach (EP-collective: every rank of the group calls it)."""
        old = self.communication
        if old is not None:
            self._barrier()
            self._free(old, keep=None)
        self.communication = None
        self._forget()

    # ---- its own forward-pass path ------------------------------------------------------------

    def mnnvl_dispatch(self, hidden_states: Any, topk_ids: Any, topk_weights: Any) -> Any:
        """What an engine's prepare step calls: ``flashinfer.moe_ep``'s dispatch, the received hidden states."""
        return self.communication.dispatch(hidden_states, topk_ids, topk_weights).hidden_states

    def mnnvl_combine(self, expert_output: Any) -> Any:
        """What an engine's finalize step calls: ``flashinfer.moe_ep``'s combine of the experts' output."""
        return self.communication.combine(expert_output)

    # ---- actions --------------------------------------------------------------------------------

    def _replace(self, target: Reach, top_k: int, num_experts: int) -> None:
        """Build first; the old handle is dropped only once every EP rank holds the new one."""
        capacity = target.capacity(top_k)
        new = self._build(capacity, top_k, num_experts)
        old = self.communication
        try:
            self._barrier()
        except BaseException:
            self._free(new, keep=old)
            raise
        self.communication = new
        self.reach = target
        self.top_k = top_k
        self.num_experts = num_experts
        self.initialized = True
        if old is not None:
            self._free(old, keep=new)

    def _build(self, capacity: Capacity, top_k: int, num_experts: int) -> Any:
        comm = EpComm(self.cpu_group)
        if self._api.RELEASE == V074:  # its builder already builds through create_communication
            return self._builder.build(capacity, top_k, num_experts, comm)
        return _create_v072(self.rank, self.world_size, capacity, top_k, num_experts, comm)

    def _free(self, old: Any, keep: Any) -> None:
        """Free ``old``'s workspace unless ``keep`` shares it; the callers have passed an EP barrier."""
        inner = self._api.round_trip_handle(old)
        if inner is old:  # 0.7.4: the communication owns a refcounted share of its workspace
            self._builder.release(old, keep)
            return
        if inner is not None:  # 0.7.2: evict the MoeAlltoAll cache entry, then drop the wrapper's reference
            self._builder.release(inner, None if keep is None else self._api.round_trip_handle(keep))
        old.destroy()

    def _barrier(self) -> None:
        import torch
        import torch.distributed as dist

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        dist.barrier(group=self.cpu_group)


def _activation_bytes(num_experts: int, top_k: int, hidden_size: int, dispatch_format: Any) -> int:
    """Bytes of one token's dispatched activations (scales included), as FlashInfer's own params count them."""
    from flashinfer.moe_ep import MoEEpCommParams

    params = MoEEpCommParams(num_experts, top_k, 1, hidden_size, dispatch_format=dispatch_format)
    return int(params.dispatch_bytes_per_token)


def _create_v072(ep_rank: int, ep_size: int, capacity: Capacity, top_k: int, num_experts: int, comm: Any) -> Any:
    """``create_communication`` on 0.7.2.post1 (no CFT or Lamport options there), with the same parameters for a
    capacity as 0.7.4's builder: FlashInfer sizes the ``MoeAlltoAll`` it wraps from them."""
    from flashinfer.fused_moe import QuantFormat
    from flashinfer.moe_ep import BootstrapConfig, MoEEpCommParams, NVLinkOneSidedConfig, create_communication

    from pytest_mnnvl.managers.handles_v074 import parameters

    p = parameters(capacity, top_k)
    return create_communication(
        BootstrapConfig(world_size=ep_size, rank=ep_rank, process_group=comm.group),
        MoEEpCommParams(
            num_experts,
            top_k,
            p["max_tokens_per_rank"],
            p["hidden_size"],
            dispatch_format=getattr(QuantFormat, p["dispatch_format"]),
        ),
        NVLinkOneSidedConfig(comm_backend=comm, extra_payload_bytes_per_token=p["extra_payload_bytes_per_token"]),
    )
