"""The reference manager: what a correct one-sided workspace manager does, written to be checked.

Shape: PR #42976's (vLLM ≤ 0.32): ``Manager(cpu_group)``, ``initialize(max_num_tokens, top_k,
num_experts, hidden_size, x_bytes_per_token, x_sf_bytes_per_token)``, ``cleanup()``, attributes
``initialized``, ``workspace_size``, ``max_num_tokens``, ``top_k``, ``num_experts``, ``moe_alltoall``
(not vLLM's ``mapping``: it is not part of the protocol). ``moe_alltoall`` holds the FlashInfer
handle round trips dispatch through: a ``MoeAlltoAll`` on FlashInfer 0.7.2.post1, an
``NVLinkOneSidedAlltoAll`` on 0.7.4 (which deleted ``MoeAlltoAll``).

Design: the manager's *decisions* are release-free and written once, here; its only contact with
FlashInfer's constructors is a small :class:`~pytest_mnnvl.managers.handles.Builder` per release
(``size_for(capacity)``, ``build(capacity, top_k, num_experts, comm)``, ``release(handle)``),
picked from the installed version the way the sim picks its leaves
(:mod:`pytest_mnnvl.managers.handles`). The releases disagree on how a capacity becomes a handle
(0.7.2: a byte size per rank and a token count, apart; 0.7.4: per-token parameters whose layout is
fixed regions, :mod:`pytest_mnnvl.managers.handles_v074`) and on what releasing means (0.7.2:
evict ``MoeAlltoAll._WORKSPACE_CACHE``; 0.7.4: ``destroy()``), never on what the manager must
decide, so a mutant that changes one decision has the same defect on both.

Policy: **per dimension** (``mnnvl_policy``). The manager keeps the largest token count, dispatch
bytes per token and combine bytes per token seen, and sizes the workspace for their product. The
other policy in use (vLLM 0.32's total need, ``max_l need(l)``) is cheaper, but a handle built for
``max T`` tokens accepts any runtime token count up to ``max T`` from *every* layer, and on 0.7.2
FlashInfer's combine check moves with the current layer's dispatch bytes: a layer declared at few
tokens, run at ``max T``, fails ``combinePayloadOffset`` under the total-need policy. On 0.7.4 the
dispatch and combine regions are fixed and sized apart, so per dimension is the only policy its API
can express. Per dimension covers every combination the handle admits; the price is memory, never
correctness.

Beyond vLLM it: checks ``top_k``/``num_experts`` with an exception (``python -O`` keeps it) before
touching any state; builds the new handle *before* dropping the old one, so a failed build leaves
the previous, working state; and frees superseded workspaces. FlashInfer 0.7.2 keeps every
workspace alive in ``MoeAlltoAll._WORKSPACE_CACHE`` until ``_reset_workspace()`` evicts it, so a
manager that only drops its reference leaks one workspace per rebuild; 0.7.4 frees a workspace with
the ``destroy()`` of its last user. Every collective stays on the EP group: the manager's own
barrier and FlashInfer's allocation collectives (through :class:`EpComm`; 0.7.4's ``__init__`` adds
three all-gathers of votes, on the same communicator).

torch and FlashInfer are imported inside methods: resolving ``mutant:<name>`` (these classes'
subclasses) at pytest start-up stays cheap.
"""

from __future__ import annotations

from typing import Any

from pytest_mnnvl.managers import handles
from pytest_mnnvl.managers.handles import Capacity

__all__ = [
    "COMBINE_BYTES_PER_ELEMENT",
    "ROUTING_BYTES_PER_TOP_K",
    "Capacity",
    "EpComm",
    "ReferenceManager",
    "ShapeMismatch",
]

#: Bytes per token of the routing payloads every layout adds: int32 expert ids + fp32 weights.
ROUTING_BYTES_PER_TOP_K = 4 + 4
#: Combine is bf16 expert output.
COMBINE_BYTES_PER_ELEMENT = 2


class ShapeMismatch(ValueError):
    """``top_k`` or ``num_experts`` differs from the layers the live workspace was built for.

    FlashInfer's dispatch requires the handle's ``top_k`` exactly and routes by ``num_experts``; a
    shared workspace cannot serve two values, so this is refused, not grown.
    """


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
        #: FlashInfer's handle calls for the installed release (the only release-specific part).
        self._handles = handles.api()
        self._builder = self._handles.builder(self.rank, self.world_size)
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

    def _size_for(self, capacity: Capacity, top_k: int) -> int:
        return self._builder.size_for(capacity, top_k)

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
        """One FlashInfer handle for ``target`` (a collective allocation over :meth:`_comm`)."""
        return self._builder.build(target, top_k, num_experts, self._comm())

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
        facts = self._handles.facts(handle)
        self.moe_alltoall = handle
        self.capacity = target
        self.workspace_size = int(facts.size_per_rank or 0)
        self.max_num_tokens = int(facts.max_num_tokens or 0)
        self.top_k = top_k
        self.num_experts = num_experts
        self.initialized = True

    def _retire(self, old: Any, keep: Any) -> None:
        """Free a superseded handle's workspace, unless ``keep`` shares it."""
        self._builder.release(old, keep)

    def _release(self, handle: Any) -> None:
        """Free the handle's workspace (0.7.2: evict it from FlashInfer's process-wide cache, the memory
        going with the last reference; 0.7.4: ``destroy()``). Callers have passed an EP barrier, so no
        peer still reads or writes it."""
        self._builder.release(handle)
