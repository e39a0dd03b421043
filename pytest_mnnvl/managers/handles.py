"""FlashInfer's all-to-all handle API, one module per release, behind one interface.

Every call the project makes on a FlashInfer handle goes through :func:`api`: building one for a
capacity (the reference manager, ``roundtrip.build_alltoall``), reading what it was built for (the
adapters), releasing it, a dispatch + combine (the verified round trip), failing its allocation on
purpose and evicting leftovers between plans (the conformance ranks). The releases differ in all of
these, so each has its module, selected from the installed version (:mod:`pytest_mnnvl.model.releases`):

- :mod:`.handles_v072`: FlashInfer 0.7.2.post1's ``MoeAlltoAll`` (one byte size per rank, a
  process-wide ``_WORKSPACE_CACHE`` that only ``_reset_workspace()`` empties);
- :mod:`.handles_v074`: FlashInfer 0.7.4's ``flashinfer.moe_ep`` ``NVLinkOneSidedAlltoAll``
  (per-dimension parameters, a refcounted ``_WORKSPACES`` entry per layout that the last
  ``destroy()`` frees).

What is the same on both (the capacity a manager decides, :class:`HandleFacts`, the injected failure)
lives here. torch and FlashInfer are imported inside the release modules' functions only.
"""

from __future__ import annotations

import importlib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

from pytest_mnnvl.model import releases

_MODULES = {
    releases.V072: "pytest_mnnvl.managers.handles_v072",
    releases.V074: "pytest_mnnvl.managers.handles_v074",
}


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


@dataclass(frozen=True)
class HandleFacts:
    """What FlashInfer's handle itself says it was built for (``None``: it cannot say, e.g. destroyed).

    ``layout`` is FlashInfer 0.7.4's 33-field metainfo (its fixed regions); 0.7.2 has none to give
    (its combine region moves with each call's payloads)."""

    size_per_rank: int | None
    max_num_tokens: int | None
    top_k: int | None
    num_experts: int | None
    layout: tuple[int, ...] | None = None


class InjectedBuildFailure(RuntimeError):
    """Raised by FlashInfer's workspace allocation inside ``inject_build_failure()``."""


class InjectedBarrierFailure(RuntimeError):
    """Raised by the first ``torch.distributed.barrier`` after a handle was built (``rank.inject_barrier_failure``)."""


class Builder(Protocol):
    """Builds and releases one release's handles for one EP rank (the reference manager's only contact
    with FlashInfer's constructors). ``comm`` is the FlashInfer comm backend the allocation collectives
    run over."""

    def size_for(self, capacity: Capacity, top_k: int) -> int:
        """Bytes per rank of the workspace :meth:`build` allocates for ``capacity``."""
        ...

    def build(
        self, capacity: Capacity, top_k: int, num_experts: int, comm: Any, *, max_num_tokens: int | None = None
    ) -> Any:
        """A handle for ``capacity`` (collective over ``comm``); ``max_num_tokens`` replaces the capacity's
        token count in what the handle is told (a mutant's asymmetry), the bytes staying ``capacity``'s
        where the release lets them."""
        ...

    def release(self, handle: Any, keep: Any = None) -> None:
        """Free ``handle``'s workspace (unless ``keep`` still uses it); callers have passed an EP barrier."""
        ...

    def drop(self, handle: Any) -> None:
        """What dropping a superseded handle takes at the least, without the manager's own release (what
        vLLM does): nothing on 0.7.2 (``MoeAlltoAll`` has no ``destroy``), ``destroy()`` on 0.7.4."""
        ...


class HandleApi(Protocol):
    """What a release module provides (see the module docstring)."""

    RELEASE: str
    #: The class name of the object round trips dispatch through.
    HANDLE_CLASS: str

    def builder(self, ep_rank: int, ep_size: int) -> Builder: ...

    def facts(self, a2a: Any) -> HandleFacts: ...

    def round_trip_handle(self, communication: Any) -> Any: ...

    def dispatch(self, a2a: Any, layer: Any, experts: Any, payloads: list[Any], tokens: int) -> tuple[Any, int | None]:
        """``(rows, combine_offset)``: the activation rows received, ``[ep, tokens, *]`` (their bytes start
        with the layer's activation payload), and the combine region's offset FlashInfer reported."""
        ...

    def combine(self, a2a: Any, payload: Any, tokens: int) -> Any: ...

    def reinitialize(self, a2a: Any) -> None: ...

    def inject_build_failure(self) -> AbstractContextManager[None]: ...

    def handle_type(self) -> type:
        """The FlashInfer class whose construction builds a workspace (``MoeAlltoAll``, ``NVLinkOneSidedAlltoAll``)."""
        ...

    def evict_all(self) -> int: ...


def module(release: str | None = None) -> ModuleType:
    """The handle module of ``release`` (default: the installed FlashInfer's)."""
    return importlib.import_module(_MODULES[releases.resolve(release)])


def api(release: str | None = None) -> HandleApi:
    """The handle API of ``release`` (default: the installed FlashInfer's)."""
    found: HandleApi = module(release)
    return found
