"""What FlashInfer itself records about live all-to-all workspaces, read inside a rank.

Two process-wide tables hold the truth, on GPUs and in the sim alike: the workspace table of the
release and ``MnnvlMemory.allocated_map`` (one record per mapped allocation, kept until its
``MnnvlMemory`` object is collected). The workspace table is

- FlashInfer 0.7.2.post1: ``MoeAlltoAll._WORKSPACE_CACHE``, one entry per workspace geometry, kept
  until ``_reset_workspace()`` (dropping a handle frees nothing);
- FlashInfer 0.7.4: ``NVLinkOneSidedAlltoAll._WORKSPACES``, one entry per layout, refcounted by the
  instances using it and removed by the ``destroy()`` of the last (a leak is an instance never
  destroyed).

Reading them, rather than a manager's own bookkeeping, is what makes a leaked, superseded workspace
measurable: it stays in the table or in the map, with its bytes, after the manager has moved on.
:attr:`MemorySnapshot.tables` names the tables read, so an empty snapshot never passes for "freed"
when nothing was readable.

Nothing here imports FlashInfer: a process that never imported it has no records.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any

from pytest_mnnvl.model import sizing_v074

_A2A_MODULE = "flashinfer.comm.trtllm_moe_alltoall"
_ONE_SIDED_MODULE = "flashinfer.moe_ep.backends.split.comm.nvlink_one_sided.communication"
_MNNVL_MODULE = "flashinfer.comm.mnnvl"
#: The tables, as :attr:`MemorySnapshot.tables` names them.
CACHE_072 = "MoeAlltoAll._WORKSPACE_CACHE"
TABLE_074 = "NVLinkOneSidedAlltoAll._WORKSPACES"
_LAYOUT_FIELDS = sizing_v074.WorkspaceLayout._fields


@dataclass(frozen=True)
class WorkspaceRecord:
    """One workspace-table entry: the geometry a workspace was built for and its allocation.

    ``refcount``: the instances sharing it (0.7.4; ``None`` on 0.7.2, whose cache counts none)."""

    workspace_size_per_rank: int
    ep_rank: int
    ep_size: int
    max_num_tokens: int
    eplb_stats_num_experts: int
    backend: str
    ptr: int | None
    aligned_size: int | None
    refcount: int | None = None


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
    #: The workspace tables found in this process (empty: FlashInfer's all-to-all was never imported).
    tables: tuple[str, ...] = ()

    @property
    def live_bytes_per_rank(self) -> int:
        """Physical bytes this rank backs for all mapped symmetric allocations."""
        return sum(a.aligned_size for a in self.allocations if a.mapped)

    @property
    def cached_bytes_per_rank(self) -> int:
        """Bytes held by allocations that a workspace-table entry still points at."""
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
            "tables": list(self.tables),
        }


def _field(record: Any, name: str, index: int, default: Any = None) -> Any:
    """Read a record field whether FlashInfer stores a dataclass (0.7) or a plain tuple (older)."""
    if hasattr(record, name):
        return getattr(record, name)
    if isinstance(record, tuple) and len(record) > index:
        return record[index]
    return default


def _table(module_name: str, cls_name: str, attribute: str) -> dict[Any, Any] | None:
    cls = getattr(sys.modules.get(module_name), cls_name, None)
    table = getattr(cls, attribute, None)
    return None if table is None else dict(table)


def snapshot() -> MemorySnapshot:
    """Read the tables now. Empty when FlashInfer's all-to-all was never imported in this process."""
    mnnvl = sys.modules.get(_MNNVL_MODULE)
    memory = getattr(mnnvl, "MnnvlMemory", None)
    allocated: dict[int, Any] = dict(getattr(memory, "allocated_map", None) or {})
    cache = _table(_A2A_MODULE, "MoeAlltoAll", "_WORKSPACE_CACHE")
    shared = _table(_ONE_SIDED_MODULE, "NVLinkOneSidedAlltoAll", "_WORKSPACES")
    tables = tuple(name for name, table in ((CACHE_072, cache), (TABLE_074, shared)) if table is not None)

    cached_ptrs: set[int] = set()
    workspaces = []
    for key, state in (shared or {}).items():
        # key: (ep_rank, ep_size, layout); state: 0.7.4's shared-workspace dict (emptied by the last destroy()).
        layout = dict(zip(_LAYOUT_FIELDS, key[2], strict=False)) if len(key) > 2 else {}
        mem = state.get("mnnvl_mem") if isinstance(state, dict) else None
        ptr = getattr(mem, "ptr", None)
        if ptr is not None:
            cached_ptrs.add(int(ptr))
        alloc = allocated.get(ptr) if ptr is not None else None
        workspaces.append(
            WorkspaceRecord(
                workspace_size_per_rank=int(layout.get("workspace_size", 0)),
                ep_rank=int(key[0]),
                ep_size=int(key[1]),
                max_num_tokens=int(layout.get("max_num_tokens", 0)),
                eplb_stats_num_experts=int(layout.get("eplb_stats_num_experts", 0)),
                backend="nvlink_one_sided",
                ptr=None if ptr is None else int(ptr),
                aligned_size=None if alloc is None else int(_field(alloc, "aligned_size", 3)),
                refcount=int(state.get("refcount", 0)) if isinstance(state, dict) else None,
            )
        )
    for key, entry in (cache or {}).items():
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
    return MemorySnapshot(tuple(workspaces), tuple(allocations), tables)


def live_bytes_per_rank() -> int:
    """Shortcut: :attr:`MemorySnapshot.live_bytes_per_rank` of :func:`snapshot`."""
    return snapshot().live_bytes_per_rank
