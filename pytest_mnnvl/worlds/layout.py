"""PP × EP layout of a rank world, and the process groups built from it inside each rank.

vLLM lays ranks out as ``arange(world).reshape(ExtDP, DP, PP, PCP, TP)`` and its EP group is
DP × PCP × TP within one pipeline stage. With ExtDP = DP = PCP = 1 that is: stage ``s`` owns the
contiguous ranks ``[s * ep, (s + 1) * ep)``. Each stage therefore has its own EP group, and that is
what lets stages which rebuild a different number of times deadlock on a world-scoped barrier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple


class Topology(NamedTuple):
    """One (world size, PP) pair of ``--mnnvl-world-sizes`` × ``--mnnvl-pp``."""

    world_size: int
    pp: int


@dataclass(frozen=True)
class Layout:
    """Where every rank of a world sits: ``world_size = pp * ep``."""

    world_size: int
    pp: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.pp < 1:
            raise ValueError(f"pp must be >= 1, got {self.pp}")
        if self.world_size % self.pp:
            raise ValueError(
                f"world_size={self.world_size} is not divisible by pp={self.pp}: "
                "every pipeline stage needs the same EP size"
            )

    @property
    def ep(self) -> int:
        return self.world_size // self.pp

    def stage_of(self, rank: int) -> int:
        return rank // self.ep

    def ep_rank_of(self, rank: int) -> int:
        return rank % self.ep

    def ep_group_ranks(self, stage: int) -> list[int]:
        return list(range(stage * self.ep, (stage + 1) * self.ep))

    def all_ep_groups(self) -> list[list[int]]:
        return [self.ep_group_ranks(stage) for stage in range(self.pp)]


@dataclass
class RankContext:
    """What a function run on every rank receives as its first argument.

    ``ep_group`` is the device group of this rank's EP group (NCCL on GPU, gloo on CPU or on a shared GPU) and
    ``cpu_group`` its gloo twin: the group a manager is constructed with. ``ep_group_ranks`` are
    global ranks, in EP-rank order. ``scratch`` survives between calls on a warm world, for
    caches a test wants to keep (cleared when the world is recycled).
    """

    rank: int
    world_size: int
    pp_size: int
    pp_stage: int
    ep_rank: int
    ep_size: int
    ep_group: Any
    cpu_group: Any
    ep_group_ranks: list[int]
    device: Any
    backend: str
    world_group: Any = None
    scratch: dict[str, Any] = field(default_factory=dict)
    #: Consecutive ranks sharing one GPU (``--mnnvl-ranks-per-gpu``; 1: one GPU per rank, or CPU ranks).
    ranks_per_gpu: int = 1
    #: Platform queries the harness answered in place of FlashInfer in this rank, as ``"query -> answer"``
    #: (a shared-GPU world: :mod:`pytest_mnnvl.worlds.sharing`); empty when FlashInfer answered everything itself.
    answered_queries: tuple[str, ...] = ()


def build_groups(layout: Layout, rank: int, gpu: bool, shared: bool = False) -> tuple[Any, Any, Any]:
    """Create every stage's EP groups (collective on WORLD, same order on every rank).

    Returns ``(ep_group, cpu_group, world_cpu_group)`` for ``rank``. On CPU the device group and the
    gloo group are the same object; on GPUs the device group is NCCL, or gloo when ranks share a GPU
    (``shared``: NCCL refuses two ranks on one device), and the gloo ``cpu_group`` is its own group either way.
    """
    import torch.distributed as dist

    from pytest_mnnvl.worlds.sharing import group_backends

    device_backend = group_backends(gpu, shared).device
    mine: tuple[Any, Any] | None = None
    for ranks in layout.all_ep_groups():
        device_group = dist.new_group(ranks, backend=device_backend)
        cpu_group = dist.new_group(ranks, backend="gloo") if gpu else device_group
        if rank in ranks:
            mine = (device_group, cpu_group)
    assert mine is not None
    world_cpu = dist.new_group(list(range(layout.world_size)), backend="gloo") if gpu else dist.group.WORLD
    return mine[0], mine[1], world_cpu
