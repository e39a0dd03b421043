"""The reference manager: what a correct one-sided workspace manager does, written to be checked.

Shape: PR #42976's (vLLM ≤ 0.32): ``Manager(cpu_group)``, ``initialize(max_num_tokens, top_k,
num_experts, hidden_size, x_bytes_per_token, x_sf_bytes_per_token)``, ``cleanup()``, attributes
``initialized``, ``workspace_size``, ``max_num_tokens``, ``top_k``, ``num_experts``, ``moe_alltoall``
(not vLLM's ``mapping``: it is not part of the protocol).
That shape hands the manager a FlashInfer ``MoeAlltoAll``, the object every backend and every vLLM
release dispatches through, so the reference needs no ``flashinfer.moe_ep`` and runs wherever
FlashInfer's one-sided all-to-all exists.

Policy: **per dimension** (``mnnvl_policy``). The manager keeps the largest token count, dispatch
bytes per token and combine bytes per token seen, and sizes the workspace for their product. The
other policy in use (vLLM 0.32's total need, ``max_l need(l)``) is cheaper, but a handle built for
``max T`` tokens accepts any runtime token count up to ``max T`` from *every* layer, and FlashInfer's
combine check moves with the current layer's dispatch bytes: a layer declared at few tokens, run at
``max T``, fails ``combinePayloadOffset`` under the total-need policy. Per dimension covers every
combination the handle admits; the price is memory, never correctness.

Beyond vLLM it: checks ``top_k``/``num_experts`` with an exception (``python -O`` keeps it) before
touching any state; builds the new handle *before* dropping the old one, so a failed build leaves
the previous, working state; and frees superseded workspaces. FlashInfer keeps every workspace alive
in ``MoeAlltoAll._WORKSPACE_CACHE`` until ``_reset_workspace()`` evicts it, so a manager that only
drops its reference leaks one workspace per rebuild. Every collective stays on the EP group: the
manager's own barrier and FlashInfer's allocation collectives (through :class:`EpComm`).

torch and FlashInfer are imported inside methods: resolving ``mutant:<name>`` (these classes'
subclasses) at pytest start-up stays cheap.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

#: Bytes per token of the routing payloads every layout adds: int32 expert ids + fp32 weights.
ROUTING_BYTES_PER_TOP_K = 4 + 4
#: Combine is bf16 expert output.
COMBINE_BYTES_PER_ELEMENT = 2


class ShapeMismatch(ValueError):
    """``top_k`` or ``num_experts`` differs from the layers the live workspace was built for.

    FlashInfer's dispatch requires the handle's ``top_k`` exactly and routes by ``num_experts``; a
    shared workspace cannot serve two values, so this is refused, not grown.
    """


@dataclass(frozen=True)
class Capacity:
    """What a workspace must hold per rank, one number per dimension."""

    max_num_tokens: int
    dispatch_bytes_per_token: int
    combine_bytes_per_token: int

    def covers(self, other: Capacity) -> bool:
        return (
            self.max_num_tokens >= other.max_num_tokens
            and self.dispatch_bytes_per_token >= other.dispatch_bytes_per_token
            and self.combine_bytes_per_token >= other.combine_bytes_per_token
        )

    def union(self, other: Capacity) -> Capacity:
        return Capacity(
            max(self.max_num_tokens, other.max_num_tokens),
            max(self.dispatch_bytes_per_token, other.dispatch_bytes_per_token),
            max(self.combine_bytes_per_token, other.combine_bytes_per_token),
        )


class EpComm:
    """FlashInfer comm backend (``Get_rank``/``Get_size``/``allgather``/``bcast``/``barrier``/``Split``)
    over one torch.distributed group, so MNNVL allocation collectives stay on that group.

    FlashInfer's own ``TorchDistBackend.Split`` builds a new process group per allocation (a
    collective over the world); the manager builds its ``Mapping`` with one PP stage and one CP
    rank, so every rank asks for colour 0 and ``Split`` can return this same communicator.
    """

    def __init__(self, group: Any) -> None:
        self.group = group

    def Get_rank(self) -> int:
        import torch.distributed as dist

        return int(dist.get_rank(self.group))

    def Get_size(self) -> int:
        import torch.distributed as dist

        return int(dist.get_world_size(self.group))

    def allgather(self, data: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.Get_size()
        dist.all_gather_object(out, data, group=self.group)
        return out

    def bcast(self, data: Any, root: int) -> Any:
        import torch.distributed as dist

        src = dist.get_global_rank(self.group, root) if self.group is not None else root
        box = [data]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def Split(self, color: int, key: int) -> EpComm:
        if color != 0:
            raise NotImplementedError(
                f"pytest-mnnvl EpComm: Split(color={color}) — the manager's Mapping has one PP stage and one "
                "CP rank, so FlashInfer should ask for colour 0 only"
            )
        return self


def _require_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return value


class ReferenceManager:
    """Union-grow, never-shrink, EP-scoped one-sided workspace manager (PR #42976 shape)."""

    mnnvl_shape = "pr42976"
    mnnvl_policy = "per_dimension"

    def __init__(self, cpu_group: Any) -> None:
        self.cpu_group = cpu_group
        self.rank = int(cpu_group.rank())
        self.world_size = int(cpu_group.size())
        self.moe_alltoall: Any = None
        self._reset()

    def _reset(self) -> None:
        self.initialized = False
        self.capacity: Capacity | None = None
        self.workspace_size = 0
        self.max_num_tokens = 0
        self.top_k = 0
        self.num_experts = 0
        #: The capacity of the layer being initialized (mutants read it).
        self._pending: Capacity | None = None

    # ---- the protocol ---------------------------------------------------------------------

    def initialize(
        self,
        max_num_tokens: int,
        top_k: int,
        num_experts: int,
        hidden_size: int,
        x_bytes_per_token: int,
        x_sf_bytes_per_token: int,
    ) -> None:
        """Make the live workspace serve this layer: skip if it already does, else grow to the union."""
        _require_int("max_num_tokens", max_num_tokens, 1)
        _require_int("top_k", top_k, 1)
        _require_int("num_experts", num_experts, 1)
        _require_int("hidden_size", hidden_size, 1)
        _require_int("x_bytes_per_token", x_bytes_per_token, 1)
        _require_int("x_sf_bytes_per_token", x_sf_bytes_per_token, 0)
        if self.initialized:
            self._check_shape(top_k, num_experts)
        want = self._layer_capacity(max_num_tokens, top_k, hidden_size, x_bytes_per_token, x_sf_bytes_per_token)
        self._pending = want
        if self.initialized and self._fits(want):
            return
        self._rebuild(self._target(want), top_k, num_experts)

    def cleanup(self) -> None:
        """Free the workspace (EP-collective: every rank of the group calls it) and start over."""
        handle = self.moe_alltoall
        if handle is not None:
            self._quiesce()
            self._barrier()
            self._release(handle)
        self.moe_alltoall = None
        self._reset()

    # ---- decisions (one hook per decision, so each mutant changes exactly one) ---------------

    def _mismatch(self, top_k: int, num_experts: int) -> ShapeMismatch | None:
        if top_k == self.top_k and num_experts == self.num_experts:
            return None
        return ShapeMismatch(
            f"initialize(top_k={top_k}, num_experts={num_experts}) but the live one-sided workspace serves "
            f"top_k={self.top_k}, num_experts={self.num_experts}; every MoE layer sharing it must use the same values"
        )

    def _check_shape(self, top_k: int, num_experts: int) -> None:
        error = self._mismatch(top_k, num_experts)
        if error is not None:
            raise error

    def _layer_capacity(
        self, max_num_tokens: int, top_k: int, hidden_size: int, x_bytes_per_token: int, x_sf_bytes_per_token: int
    ) -> Capacity:
        dispatch = x_bytes_per_token + x_sf_bytes_per_token + top_k * ROUTING_BYTES_PER_TOP_K
        return Capacity(max_num_tokens, dispatch, hidden_size * COMBINE_BYTES_PER_ELEMENT)

    def _fits(self, want: Capacity) -> bool:
        return self.capacity is not None and self.capacity.covers(want)

    def _target(self, want: Capacity) -> Capacity:
        return want if self.capacity is None else self.capacity.union(want)

    def _size_for(self, capacity: Capacity) -> int:
        from flashinfer.comm.trtllm_moe_alltoall import moe_a2a_get_workspace_size_per_rank

        return int(
            moe_a2a_get_workspace_size_per_rank(
                self.world_size,
                capacity.max_num_tokens,
                capacity.dispatch_bytes_per_token,
                capacity.combine_bytes_per_token,
            )
        )

    # ---- actions --------------------------------------------------------------------------

    def _rebuild(self, target: Capacity, top_k: int, num_experts: int) -> None:
        """New handle first; only once every rank has it (barrier) is the old one dropped and freed."""
        new = self._build(target, top_k, num_experts)
        old = self.moe_alltoall
        try:
            self._quiesce()
            self._barrier()
        except BaseException:
            self._retire(new, keep=old)
            raise
        self._commit(new, target, top_k, num_experts)
        if old is not None:
            self._retire(old, keep=new)

    def _build(self, target: Capacity, top_k: int, num_experts: int) -> Any:
        return self._construct(target.max_num_tokens, self._size_for(target), top_k, num_experts)

    def _construct(self, max_num_tokens: int, size_per_rank: int, top_k: int, num_experts: int) -> Any:
        """One FlashInfer ``MoeAlltoAll`` (a collective allocation over :meth:`_comm`)."""
        import torch
        from flashinfer.comm import Mapping, MoeAlltoAll
        from flashinfer.comm.mnnvl import MnnvlConfig

        gpus_per_node = torch.cuda.device_count() or self.world_size
        mapping = Mapping(
            self.world_size, self.rank, gpus_per_node, tp_size=self.world_size, moe_ep_size=self.world_size
        )
        with warnings.catch_warnings():
            # Deprecated in favour of flashinfer.moe_ep in 0.7.1; still what vLLM's managers use.
            warnings.filterwarnings("ignore", "MoeAlltoAll is deprecated", DeprecationWarning)
            return MoeAlltoAll(
                mapping,
                max_num_tokens,
                top_k,
                num_experts,
                workspace_size_per_rank=size_per_rank,
                mnnvl_config=MnnvlConfig(comm_backend=self._comm()),
            )

    def _comm(self) -> Any:
        return EpComm(self.cpu_group)

    def _barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.cpu_group)

    def _quiesce(self) -> None:
        """This rank's kernels are done with the workspace (GPU only; the sim runs synchronously)."""
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def _commit(self, handle: Any, target: Capacity, top_k: int, num_experts: int) -> None:
        self.moe_alltoall = handle
        self.capacity = target
        self.workspace_size = int(handle.workspace_size_per_rank)
        self.max_num_tokens = int(handle.max_num_tokens)
        self.top_k = top_k
        self.num_experts = num_experts
        self.initialized = True

    def _retire(self, old: Any, keep: Any) -> None:
        """Free a superseded handle's workspace, unless ``keep`` shares it (same cache geometry)."""
        if keep is not None and getattr(old, "mnnvl_mem", None) is getattr(keep, "mnnvl_mem", None):
            return
        self._release(old)

    def _release(self, handle: Any) -> None:
        """Evict the workspace from FlashInfer's process-wide cache; the memory goes with the last
        reference. Callers have passed an EP barrier, so no peer still reads or writes it."""
        try:
            handle._reset_workspace()
        except KeyError:
            pass  # already evicted (another handle of the same geometry was released first)
        except RuntimeError:
            pass  # unmapped for a checkpoint: nothing mapped to free here
