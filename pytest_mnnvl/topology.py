"""PP × EP layout of a rank world, and the process groups built from it inside each rank.

vLLM lays ranks out as ``arange(world).reshape(ExtDP, DP, PP, PCP, TP)`` and its EP group is
DP × PCP × TP within one pipeline stage. With ExtDP = DP = PCP = 1 that is: stage ``s`` owns the
contiguous ranks ``[s * ep, (s + 1) * ep)``. Each stage therefore has its own EP group, and that is
what lets stages which rebuild a different number of times deadlock on a world-scoped barrier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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

    ``ep_group`` is the device group of this rank's EP group (NCCL on GPU, gloo on CPU) and
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


def build_groups(layout: Layout, rank: int, gpu: bool) -> tuple[Any, Any, Any]:
    """Create every stage's EP groups (collective on WORLD, same order on every rank).

    Returns ``(ep_group, cpu_group, world_cpu_group)`` for ``rank``. On CPU the device group and the
    gloo group are the same object.
    """
    import torch.distributed as dist

    mine: tuple[Any, Any] | None = None
    for ranks in layout.all_ep_groups():
        device_group = dist.new_group(ranks, backend="nccl" if gpu else "gloo")
        cpu_group = dist.new_group(ranks, backend="gloo") if gpu else device_group
        if rank in ranks:
            mine = (device_group, cpu_group)
    assert mine is not None
    world_cpu = dist.new_group(list(range(layout.world_size)), backend="gloo") if gpu else dist.group.WORLD
    return mine[0], mine[1], world_cpu


def assign_gpus(world_size: int, available: list[str], worker_index: int = 0, worker_count: int = 1) -> list[str]:
    """Pick ``world_size`` GPU ids for this pytest process, splitting ``available`` between xdist workers.

    Worker ``i`` of ``n`` owns the ``i``-th contiguous share; a world that does not fit its share
    is an error rather than two workers silently sharing a GPU.
    """
    share = len(available) // max(worker_count, 1)
    mine = available[worker_index * share : (worker_index + 1) * share]
    if world_size > len(mine):
        raise ValueError(
            f"a world of {world_size} ranks needs {world_size} GPUs, but this process owns {len(mine)} "
            f"({', '.join(mine) or 'none'}) of {len(available)} visible, split between {worker_count} "
            "pytest-xdist worker(s); run with fewer workers or more GPUs"
        )
    return mine[:world_size]
