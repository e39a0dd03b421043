"""What FlashInfer itself records about live all-to-all workspaces, read inside a rank.

Two process-wide tables hold the truth, on GPUs and in the sim alike:
``MoeAlltoAll._WORKSPACE_CACHE`` (one entry per workspace geometry, kept until
``_reset_workspace()``) and ``MnnvlMemory.allocated_map`` (one record per mapped allocation, kept
until its ``MnnvlMemory`` object is collected). Reading them, rather than a manager's own
bookkeeping, is what makes a leaked, superseded workspace measurable: it stays in the cache or
in the map, with its bytes, after the manager has moved on.

Nothing here imports FlashInfer: a process that never imported it has no records.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any

_A2A_MODULE = "flashinfer.comm.trtllm_moe_alltoall"
_MNNVL_MODULE = "flashinfer.comm.mnnvl"


@dataclass(frozen=True)
class WorkspaceRecord:
    """One ``_WORKSPACE_CACHE`` entry: the geometry a workspace was built for and its allocation."""

    workspace_size_per_rank: int
    ep_rank: int
    ep_size: int
    max_num_tokens: int
    eplb_stats_num_experts: int
    backend: str
    ptr: int | None
    aligned_size: int | None


@dataclass(frozen=True)
class AllocationRecord:
    """One ``MnnvlMemory.allocated_map`` entry: bytes this rank backs for one symmetric buffer."""

    ptr: int
    aligned_size: int
    comm_size: int
    comm_rank: int
    rank_stride: int
    mapped: bool
    cached: bool


@dataclass(frozen=True)
class MemorySnapshot:
    """Every live workspace and allocation of this process."""

    workspaces: tuple[WorkspaceRecord, ...]
    allocations: tuple[AllocationRecord, ...]

    @property
    def live_bytes_per_rank(self) -> int:
        """Physical bytes this rank backs for all mapped symmetric allocations."""
        return sum(a.aligned_size for a in self.allocations if a.mapped)

    @property
    def cached_bytes_per_rank(self) -> int:
        """Bytes held by allocations that a ``_WORKSPACE_CACHE`` entry still points at."""
        return sum(a.aligned_size for a in self.allocations if a.cached)

    @property
    def uncached_allocations(self) -> tuple[AllocationRecord, ...]:
        """Allocations no cache entry points at: evicted but still referenced by some object."""
        return tuple(a for a in self.allocations if not a.cached)

    @property
    def workspace_count(self) -> int:
        return len(self.workspaces)

    def to_dict(self) -> dict[str, Any]:
        return {
            "workspaces": [asdict(w) for w in self.workspaces],
            "allocations": [asdict(a) for a in self.allocations],
            "live_bytes_per_rank": self.live_bytes_per_rank,
            "cached_bytes_per_rank": self.cached_bytes_per_rank,
        }


def _field(record: Any, name: str, index: int, default: Any = None) -> Any:
    """Read a record field whether FlashInfer stores a dataclass (0.7) or a plain tuple (older)."""
    if hasattr(record, name):
        return getattr(record, name)
    if isinstance(record, tuple) and len(record) > index:
        return record[index]
    return default


def snapshot() -> MemorySnapshot:
    """Read both tables now. Empty when FlashInfer's all-to-all was never imported in this process."""
    a2a = sys.modules.get(_A2A_MODULE)
    mnnvl = sys.modules.get(_MNNVL_MODULE)
    cache: dict[Any, Any] = dict(getattr(getattr(a2a, "MoeAlltoAll", None), "_WORKSPACE_CACHE", None) or {})
    memory = getattr(mnnvl, "MnnvlMemory", None)
    allocated: dict[int, Any] = dict(getattr(memory, "allocated_map", None) or {})

    cached_ptrs: set[int] = set()
    workspaces = []
    for key, entry in cache.items():
        mem = entry.get("mnnvl_mem") if isinstance(entry, dict) else None
        ptr = getattr(mem, "ptr", None)
        if ptr is not None:
            cached_ptrs.add(int(ptr))
        alloc = allocated.get(ptr) if ptr is not None else None
        key_t = tuple(key) if isinstance(key, tuple) else (key,)
        workspaces.append(
            WorkspaceRecord(
                workspace_size_per_rank=int(entry.get("workspace_size_per_rank", key_t[0])),
                ep_rank=int(entry.get("ep_rank", key_t[1] if len(key_t) > 1 else 0)),
                ep_size=int(entry.get("ep_size", key_t[2] if len(key_t) > 2 else 1)),
                max_num_tokens=int(entry.get("max_num_tokens", key_t[3] if len(key_t) > 3 else 0)),
                eplb_stats_num_experts=int(entry.get("eplb_stats_num_experts", key_t[4] if len(key_t) > 4 else 0)),
                backend=str(key_t[5]) if len(key_t) > 5 else "trtllm",
                ptr=None if ptr is None else int(ptr),
                aligned_size=None if alloc is None else int(_field(alloc, "aligned_size", 3)),
            )
        )
    allocations = []
    for ptr, record in allocated.items():
        allocations.append(
            AllocationRecord(
                ptr=int(ptr),
                aligned_size=int(_field(record, "aligned_size", 3)),
                comm_size=int(_field(record, "comm_size", 1)),
                comm_rank=int(_field(record, "comm_rank", 2)),
                rank_stride=int(_field(record, "rank_stride", 6)),
                mapped=bool(_field(record, "mapped", 99, True)),
                cached=int(ptr) in cached_ptrs,
            )
        )
    workspaces.sort(key=lambda w: (w.workspace_size_per_rank, w.max_num_tokens))
    allocations.sort(key=lambda a: a.ptr)
    return MemorySnapshot(tuple(workspaces), tuple(allocations))


def live_bytes_per_rank() -> int:
    """Shortcut: :attr:`MemorySnapshot.live_bytes_per_rank` of :func:`snapshot`."""
    return snapshot().live_bytes_per_rank
