"""Mutants: the reference manager with exactly one known defect each.

A conformance suite is only as good as the bugs it kills. Each class below changes one decision or
action of :class:`~pytest_mnnvl.managers.reference.ReferenceManager` and names, in
``mnnvl_invariant``, the invariant (a name in :mod:`~pytest_mnnvl.conformance.catalog`) that must
catch it (``mnnvl_also``: others that may). Several are bugs that shipped or nearly shipped (vLLM
before PR #42976, PR #44946, PR #40893); the others sit where a weaker suite would look away: behind
a later, larger layer; only on one rank; only with PP; only under ``python -O``; only after a
failure; only after ``cleanup``.

Every mutant keeps declaring the reference's policy: it claims to be correct, as buggy code does.

The decisions a mutant changes are the reference's, the same on every FlashInfer release, so most
defects are the same on FlashInfer 0.7.2.post1 and 0.7.4. Where a release changes how a defect
shows, ``mnnvl_releases`` says so per release (:class:`OnRelease`): another invariant catches it
there (FlashInfer 0.7.4 refuses the asymmetric allocation, the wrong-size communicator itself), or
the defect cannot exist there at all (0.7.4 frees what the leak mutant leaks; it has no byte-size
parameter for the total-need policy). The mutation matrix reads it: a mutant whose defect cannot
exist on a release is *not applicable* there, never counted as killed, and ``mutant:<name>`` is
refused on that release with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from pytest_mnnvl.conformance.catalog import INVARIANTS
from pytest_mnnvl.conformance.catalog import SHOULD as SHOULD_INVARIANTS
from pytest_mnnvl.managers.reference import Capacity, EpComm, ReferenceManager, ShapeMismatch
from pytest_mnnvl.model import releases

#: Re-exported: the conformance invariants every mutant names one of.
__all__ = ["INVARIANTS", "MUTANTS", "SHOULD_INVARIANTS", "Mutant", "OnRelease", "catalog"]


@dataclass(frozen=True)
class OnRelease:
    """How one mutant's defect shows on one FlashInfer release: ``invariant`` catches it there, or it
    cannot exist there (``None``); ``reason`` says why it differs from the mutant's ``mnnvl_invariant``."""

    invariant: str | None
    reason: str


class Mutant(ReferenceManager):
    """Base of the catalog: ``mnnvl_mutant`` is the name used in ``mutant:<name>``."""

    mnnvl_mutant = ""
    mnnvl_invariant = ""
    mnnvl_also: tuple[str, ...] = ()
    #: Releases on which the defect shows differently (see the module docstring); the others use
    #: ``mnnvl_invariant``.
    mnnvl_releases: ClassVar[Mapping[str, OnRelease]] = {}

    @classmethod
    def invariant_on(cls, release: str | None = None) -> str | None:
        """The invariant that must catch the defect on ``release`` (default: the installed one), or
        ``None`` where the defect cannot exist."""
        found = cls.mnnvl_releases.get(releases.resolve(release))
        return cls.mnnvl_invariant if found is None else found.invariant

    @classmethod
    def applies_to(cls, release: str | None = None) -> bool:
        return cls.invariant_on(release) is not None

    @classmethod
    def release_note(cls, release: str | None = None) -> str:
        """Why the defect shows differently on ``release`` ("" where it does not)."""
        found = cls.mnnvl_releases.get(releases.resolve(release))
        return "" if found is None else found.reason


class FirstCallWins(Mutant):
    """The first layer sizes the workspace for good; later, larger layers are skipped (vLLM before
    PR #42976). Caught by **covers**: an NVFP4-sized workspace, then a bf16 layer's combine fails
    FlashInfer's combinePayloadOffset check at full tokens (on 0.7.4 its dispatch fails first, the
    fixed dispatch region's capacity check)."""

    mnnvl_mutant = "first_call_wins"
    mnnvl_invariant = "covers"

    def _fits(self, want: Capacity) -> bool:
        return self.capacity is not None


class ScaleBytesLeftOut(Mutant):
    """The dispatch need omits the scale payload (``x_sf_bytes_per_token``), as the test fixed by
    PR #44946 under-declared it. Caught by **covers**, right after the quantized layer's own
    ``initialize``; a later bf16 layer grows the workspace and hides it, so a check only at the end
    misses it (seen on 2×H100)."""

    mnnvl_mutant = "scale_bytes_left_out"
    mnnvl_invariant = "covers"

    def _layer_capacity(
        self, max_num_tokens: int, top_k: int, hidden_size: int, x_bytes_per_token: int, x_sf_bytes_per_token: int
    ) -> Capacity:
        return super()._layer_capacity(max_num_tokens, top_k, hidden_size, x_bytes_per_token, 0)


class TokensNotGrown(Mutant):
    """Grows bytes per token but keeps the first layer's max tokens. Caught by **covers**: the handle's
    max tokens stay below a later layer's (``runtime_max_tokens_per_rank exceeds max_num_tokens``)."""

    mnnvl_mutant = "tokens_not_grown"
    mnnvl_invariant = "covers"
    mnnvl_also = ("covers_cross_product",)

    def _target(self, want: Capacity) -> Capacity:
        if self.capacity is None:
            return want
        grown = self.capacity.union(want)
        return Capacity(self.capacity.max_num_tokens, grown.dispatch_bytes_per_token, grown.combine_bytes_per_token)


class CombineFromLastLayer(Mutant):
    """On a rebuild, sizes the combine region for the layer being initialized, not the widest layer
    seen. Caught by **covers** on the *earlier* layers: a wide layer's combine fails once a narrower
    layer with more tokens or bytes triggered the rebuild."""

    mnnvl_mutant = "combine_from_last_layer"
    mnnvl_invariant = "covers"
    mnnvl_also = ("no_shrink",)

    def _target(self, want: Capacity) -> Capacity:
        if self.capacity is None:
            return want
        grown = self.capacity.union(want)
        return Capacity(grown.max_num_tokens, grown.dispatch_bytes_per_token, want.combine_bytes_per_token)


class ShrinkToCurrent(Mutant):
    """Rebuilds to exactly the current layer whenever it differs from the live workspace, smaller
    included. Caught by **no_shrink** (also covers for earlier layers, and no_needless_rebuild)."""

    mnnvl_mutant = "shrink_to_current"
    mnnvl_invariant = "no_shrink"
    mnnvl_also = ("covers", "no_needless_rebuild")

    def _fits(self, want: Capacity) -> bool:
        return self.capacity == want

    def _target(self, want: Capacity) -> Capacity:
        return want


class RebuildEveryCall(Mutant):
    """Rebuilds (same union size) on every ``initialize``, fitting or not. Caught by
    **no_needless_rebuild**: a dominated layer changes the handle and issues collectives."""

    mnnvl_mutant = "rebuild_every_call"
    mnnvl_invariant = "no_needless_rebuild"
    mnnvl_also = ("minimal_rebuilds",)

    def _fits(self, want: Capacity) -> bool:
        return False


class RebuildsUnlessDominated(Mutant):
    """Skips only when one layer the live handle already serves dominates the new one, instead of
    asking whether the (union) capacity covers it: a layer with the tokens of one and the bytes of
    another rebuilds to the same size. Passes the MUST (it never rebuilds for a dominated layer);
    caught by **minimal_rebuilds** (per-dimension policy)."""

    mnnvl_mutant = "rebuilds_unless_dominated"
    mnnvl_invariant = "minimal_rebuilds"

    def _reset(self) -> None:
        super()._reset()
        self._served: list[Capacity] = []

    def _fits(self, want: Capacity) -> bool:
        if any(layer.covers(want) for layer in self._served):
            self._served.append(want)
            return True
        return False

    def _commit(self, handle: Any, target: Capacity, top_k: int, num_experts: int) -> None:
        super()._commit(handle, target, top_k, num_experts)
        assert self._pending is not None
        self._served = [self._pending]


class Asymmetric(Mutant):
    """EP rank 0 builds its handle for the current layer's token count instead of the union's (the
    bytes, and so the collective allocation, still agree). Caught by **ep_symmetry**: rank 0's handle
    reports fewer max tokens than its peers once a layer with fewer tokens triggers a rebuild."""

    mnnvl_mutant = "asymmetric"
    mnnvl_invariant = "ep_symmetry"
    mnnvl_also = ("covers", "no_shrink")

    mnnvl_releases: ClassVar[Mapping[str, OnRelease]] = {
        releases.V074: OnRelease(
            "covers",
            "0.7.4 derives the workspace size from the token count, so rank 0's handle is a smaller allocation "
            "than its peers'; MnnvlMemory's size all-gather refuses it on every rank ('Not all rank allocating "
            "same size.'), and initialize raises for a valid layer before any rank holds an asymmetric handle",
        )
    }

    def _build(self, target: Capacity, top_k: int, num_experts: int) -> Any:
        tokens = target.max_num_tokens
        if self.rank == 0 and self._pending is not None:
            tokens = self._pending.max_num_tokens
        return self._builder.build(target, top_k, num_experts, self._comm(), max_num_tokens=tokens)


class SkewedExpertCount(Mutant):
    """EP rank 0 builds its handles for the physical expert count, one redundant (EPLB) slot per EP rank
    added (``num_experts + ep``), its peers for the logical count. ``num_experts`` is no part of the
    allocation on either release (0.7.2's size all-gather, 0.7.4's votes and layout leave it out), so no
    rank refuses it; only the routing differs: rank 0's dispatch sends tokens to the owners of other
    expert blocks than its peers'. Caught by **ep_symmetry**, the one check that names the cause: the
    ranks' handles disagree on ``num_experts`` from the first layer on (every round trip delivers rows
    to the wrong ranks, so each invariant that round-trips fails too, covers first)."""

    mnnvl_mutant = "skewed_expert_count"
    mnnvl_invariant = "ep_symmetry"
    mnnvl_also = ("covers", "cleanup", "shape_mismatch", "mismatch_survives_O", "failed_rebuild_consistent")

    def _build(self, target: Capacity, top_k: int, num_experts: int) -> Any:
        if self.rank == 0:
            num_experts += self.world_size
        return super()._build(target, top_k, num_experts)


class WorldBarrier(Mutant):
    """The post-build barrier runs on the world group, not the EP group (vLLM before PR #42976).
    With PP, stages rebuild different numbers of times and the world barrier never completes.
    Caught by **pp_deadlock_freedom** (and collective_scope); invisible with PP = 1."""

    mnnvl_mutant = "world_barrier"
    mnnvl_invariant = "pp_deadlock_freedom"
    mnnvl_also = ("collective_scope",)

    def _barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


class _WorldCollectives(EpComm):
    """Reports the EP group's rank and size, but runs its collectives on the world group: ``group=``
    forgotten in each call (FlashInfer 0.7.4 checks rank and size against the EP group, so a comm backend
    over the world group as a whole is refused before it gathers anything)."""

    def allgather(self, data: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, data)
        return out

    def bcast(self, data: Any, root: int) -> Any:
        import torch.distributed as dist

        box = [data]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, root))
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


class WorldCommBackend(Mutant):
    """FlashInfer's allocation collectives (votes, size all-gather, handle exchange, barrier) run over the
    world group instead of the EP group: the manager's comm backend says it is the EP group but forgets
    ``group=`` in its collectives — the wrong-group sizing of PR #40893 in another guise. The manager's own
    barrier is right, so a suite that audits only barriers misses it. Caught by **collective_scope** with
    PP > 1 (also pp_deadlock_freedom)."""

    mnnvl_mutant = "world_comm_backend"
    mnnvl_invariant = "collective_scope"
    mnnvl_also = ("pp_deadlock_freedom",)

    def _comm(self) -> Any:
        return _WorldCollectives(self.cpu_group)


class AcceptsMismatch(Mutant):
    """No ``top_k``/``num_experts`` check: a different value is silently grown into (or skipped).
    Caught by **shape_mismatch**."""

    mnnvl_mutant = "accepts_mismatch"
    mnnvl_invariant = "shape_mismatch"

    def _check_shape(self, top_k: int, num_experts: int) -> None:
        return None


class MismatchRaisesLate(Mutant):
    """Raises on a ``top_k``/``num_experts`` mismatch, but only after rebuilding for the new values.
    Caught by **shape_mismatch** ("raises, and changes no state"): the live handle changed."""

    mnnvl_mutant = "mismatch_raises_late"
    mnnvl_invariant = "shape_mismatch"

    def _check_shape(self, top_k: int, num_experts: int) -> None:
        return None

    def initialize(
        self,
        max_num_tokens: int,
        top_k: int,
        num_experts: int,
        hidden_size: int,
        x_bytes_per_token: int,
        x_sf_bytes_per_token: int,
    ) -> None:
        error = self._mismatch(top_k, num_experts) if self.initialized else None
        if error is None:
            super().initialize(max_num_tokens, top_k, num_experts, hidden_size, x_bytes_per_token, x_sf_bytes_per_token)
            return
        want = self._layer_capacity(max_num_tokens, top_k, hidden_size, x_bytes_per_token, x_sf_bytes_per_token)
        self._pending = want
        self._rebuild(self._target(want), top_k, num_experts)
        raise error


class AssertOnlyMismatch(Mutant):
    """Checks ``top_k``/``num_experts`` with ``assert``, as vLLM does: ``python -O`` strips it and a
    mismatch is accepted. Passes shape_mismatch without -O. Caught by **mismatch_survives_O**."""

    mnnvl_mutant = "assert_only_mismatch"
    mnnvl_invariant = "mismatch_survives_O"

    def _check_shape(self, top_k: int, num_experts: int) -> None:
        assert top_k == self.top_k, f"top_k {top_k} != {self.top_k}"
        assert num_experts == self.num_experts, f"num_experts {num_experts} != {self.num_experts}"


class MismatchForgetsCapacity(Mutant):
    """Refuses a ``top_k``/``num_experts`` mismatch before touching the handle, its sizes or its shape, but
    on the way out drops its record of the capacity it built (``capacity``, which no snapshot reads): the
    next layer of the original shape that fits is rebuilt anyway, for that layer alone. Passes the snapshot
    checks (it raised, nothing a snapshot reads moved, the first layer still round-trips). Caught by
    **shape_mismatch** on what follows: that layer's rebuild decision is not a fresh manager's."""

    mnnvl_mutant = "mismatch_forgets_capacity"
    mnnvl_invariant = "shape_mismatch"

    def _check_shape(self, top_k: int, num_experts: int) -> None:
        try:
            super()._check_shape(top_k, num_experts)
        except ShapeMismatch:
            self.capacity = None
            raise


class CleanupKeepsHandle(Mutant):
    """``cleanup()`` marks the manager uninitialized but keeps (and never frees) the handle.
    Caught by **cleanup**: the handle is still there afterwards."""

    mnnvl_mutant = "cleanup_keeps_handle"
    mnnvl_invariant = "cleanup"
    mnnvl_also = ("frees_superseded",)

    def cleanup(self) -> None:
        self._reset()


class CleanupStaysInitialized(Mutant):
    """``cleanup()`` frees the handle but leaves ``initialized`` and the capacity set, so the next
    ``initialize`` of a layer that fits is skipped and no handle exists. Caught by **cleanup**
    (manager still initialized; initialize afterwards leaves no working handle)."""

    mnnvl_mutant = "cleanup_stays_initialized"
    mnnvl_invariant = "cleanup"
    mnnvl_also = ("covers",)

    def cleanup(self) -> None:
        handle = self.moe_alltoall
        if handle is not None:
            self._quiesce()
            self._barrier()
            self._release(handle)
        self.moe_alltoall = None


class ReinitializesLiveWorkspace(Mutant):
    """When a layer fits the live handle, re-runs FlashInfer's ``moe_a2a_initialize`` on it to start the
    layer from clean counters, with no EP barrier first: it zeroes this rank's row while a slower peer
    may still be reading its combine slots there (silent corruption on GPUs, only when the timing is
    unlucky; on 0.7.4 too: its fixed combine region is in that row). Caught by workspace_race_free
    (the sim judges the order, not the timing)."""

    mnnvl_mutant = "reinitializes_live_workspace"
    mnnvl_invariant = "workspace_race_free"

    def initialize(self, *args: Any, **kwargs: Any) -> None:
        handle = self.moe_alltoall
        super().initialize(*args, **kwargs)
        if handle is not None and handle is self.moe_alltoall:
            self._handles.reinitialize(handle)


class LeaksSuperseded(Mutant):
    """Drops superseded handles without evicting their workspaces from FlashInfer's cache (what vLLM
    does): one workspace leaks per rebuild. Caught by **frees_superseded**."""

    mnnvl_mutant = "leaks_superseded"
    mnnvl_invariant = "frees_superseded"
    mnnvl_releases: ClassVar[Mapping[str, OnRelease]] = {
        releases.V074: OnRelease(
            None,
            "0.7.4 has no cache to evict: dropping a handle is destroy() (what vLLM 0.33 does), and the destroy() "
            "of a workspace's last user frees it, so nothing leaks (skips_destroy is 0.7.4's leak)",
        )
    }

    def _retire(self, old: Any, keep: Any) -> None:
        self._builder.drop(old)


class SkipsDestroy(Mutant):
    """Never releases superseded handles: no ``destroy()`` on 0.7.4, whose ``_WORKSPACES`` entry then
    keeps the workspace mapped (its refcount never reaches 0): one workspace leaks per rebuild.
    Caught by **frees_superseded**."""

    mnnvl_mutant = "skips_destroy"
    mnnvl_invariant = "frees_superseded"
    mnnvl_releases: ClassVar[Mapping[str, OnRelease]] = {
        releases.V072: OnRelease(
            None,
            "0.7.2's MoeAlltoAll has no destroy(): a superseded handle left unreleased is leaks_superseded's "
            "defect, and that mutant shows it there",
        )
    }

    def _retire(self, old: Any, keep: Any) -> None:
        return None


class HalfUpdatedOnFailure(Mutant):
    """Records the grown capacity before building the new handle; when the build fails the manager
    is still ``initialized`` with the old, smaller handle, and retrying the layer is skipped as
    "fits". Caught by **failed_rebuild_consistent**."""

    mnnvl_mutant = "half_updated_on_failure"
    mnnvl_invariant = "failed_rebuild_consistent"

    def _rebuild(self, target: Capacity, top_k: int, num_experts: int) -> None:
        self.capacity = target
        super()._rebuild(target, top_k, num_experts)


class StaleAfterFailedRebuild(Mutant):
    """When a rebuild raises, keeps the live handle and every field a snapshot reads, but stops trusting its
    record of the capacity it built (the failure might have left it half-grown), so that the retry rebuilds even
    where the layer looks as if it fits; only ``cleanup()`` clears that mark, the retry's successful rebuild does
    not: from the failure on, every layer the handle fits is rebuilt anyway (the same union size, a new collective
    allocation and handle each time, where a fresh manager keeps its handle). Passes the snapshot and retry checks
    (it raised, nothing a snapshot reads moved, the previous layer still round-trips, the retry must rebuild
    anyway and serves its layer). Caught by **failed_rebuild_consistent** on what follows the retry: the next layer
    that fits gets another rebuild decision than on a fresh manager that never saw the failure."""

    mnnvl_mutant = "stale_after_failed_rebuild"
    mnnvl_invariant = "failed_rebuild_consistent"

    def _reset(self) -> None:
        super()._reset()
        self._stale = False

    def _fits(self, want: Capacity) -> bool:
        return not self._stale and super()._fits(want)

    def _rebuild(self, target: Capacity, top_k: int, num_experts: int) -> None:
        try:
            super()._rebuild(target, top_k, num_experts)
        except Exception:
            self._stale = True
            raise


class TotalNeed(Mutant):
    """Grows the total need (``max need(l)``, and max tokens), as vLLM 0.32 does, declaring that
    policy honestly. The workspace misses max tokens × max payload of layers seen apart. Caught by
    **covers_cross_product** (a SHOULD) on every plan where that differs; and, like vLLM 0.32.0, by the
    MUST ``covers`` where an earlier, wider layer must still fit once a later one raised the token count
    (the pinned ``total-need-mtp`` plan, ``examples/plans/total-need-gap.json``)."""

    mnnvl_mutant = "total_need"
    mnnvl_invariant = "covers_cross_product"
    mnnvl_policy = "total"
    mnnvl_releases: ClassVar[Mapping[str, OnRelease]] = {
        releases.V074: OnRelease(
            None,
            "0.7.4's NVLinkOneSidedAlltoAll takes no byte size per rank, only per-token dimensions, so no manager "
            "can size it by a single total need (the policy cannot be followed, nor judged, there)",
        )
    }

    def _fits(self, want: Capacity) -> bool:
        return (
            self.initialized
            and self._size_for(want, self.top_k) <= self.workspace_size
            and want.max_num_tokens <= self.max_num_tokens
        )

    def _target(self, want: Capacity) -> Capacity:
        tokens = max(want.max_num_tokens, self.max_num_tokens)
        return Capacity(tokens, want.dispatch_bytes_per_token, want.combine_bytes_per_token)

    def _build(self, target: Capacity, top_k: int, num_experts: int) -> Any:
        assert self._pending is not None
        size = max(self._size_for(self._pending, top_k), self.workspace_size)
        return self._builder.build_sized(target.max_num_tokens, size, top_k, num_experts, self._comm())  # type: ignore[attr-defined]


def _region_needs(capacity: Capacity) -> tuple[int, int]:
    """(dispatch, combine) bytes of one capacity at its own max tokens, per EP peer."""
    tokens = capacity.max_num_tokens
    return tokens * capacity.dispatch_bytes_per_token, tokens * capacity.combine_bytes_per_token


def _spread(need: int, tokens: int) -> int:
    """Bytes per token that hold ``need`` bytes over ``tokens`` tokens (rounded up)."""
    return -(-need // tokens)


class RegionTotalNeed(Mutant):
    """Keeps, per region, the largest need one layer declared (its max tokens × its dispatch bytes per
    token; the same for combine) and builds for the largest token count with that need spread over it
    (``ceil(max_l T_l·b_l / max T)`` bytes per token): vLLM 0.32's total-need policy written in the
    per-token parameters 0.7.4 takes, and a byte size on 0.7.2. Every layer fits at its own declared
    tokens, so the MUST covers passes, but the handle admits the largest token count from every layer
    and a wide layer run at it overflows its region. Caught by **covers_cross_product** (a SHOULD), on
    both releases; it declares the per-dimension policy, so minimal_rebuilds may catch it too."""

    mnnvl_mutant = "region_total_need"
    mnnvl_invariant = "covers_cross_product"
    mnnvl_also = ("minimal_rebuilds",)

    def _fits(self, want: Capacity) -> bool:
        have = self.capacity
        if have is None or have.max_num_tokens < want.max_num_tokens:
            return False
        return all(kept >= asked for kept, asked in zip(_region_needs(have), _region_needs(want), strict=True))

    def _target(self, want: Capacity) -> Capacity:
        have = self.capacity
        if have is None:
            return want
        tokens = max(have.max_num_tokens, want.max_num_tokens)
        dispatch, combine = (
            max(kept, asked) for kept, asked in zip(_region_needs(have), _region_needs(want), strict=True)
        )
        return Capacity(tokens, _spread(dispatch, tokens), _spread(combine, tokens))


MUTANTS: dict[str, type[Mutant]] = {
    cls.mnnvl_mutant: cls
    for cls in (
        FirstCallWins,
        ScaleBytesLeftOut,
        TokensNotGrown,
        CombineFromLastLayer,
        ShrinkToCurrent,
        RebuildEveryCall,
        RebuildsUnlessDominated,
        Asymmetric,
        SkewedExpertCount,
        WorldBarrier,
        WorldCommBackend,
        AcceptsMismatch,
        MismatchRaisesLate,
        AssertOnlyMismatch,
        MismatchForgetsCapacity,
        CleanupKeepsHandle,
        CleanupStaysInitialized,
        ReinitializesLiveWorkspace,
        LeaksSuperseded,
        SkipsDestroy,
        HalfUpdatedOnFailure,
        StaleAfterFailedRebuild,
        TotalNeed,
        RegionTotalNeed,
    )
}


def catalog() -> list[dict[str, Any]]:
    """One row per mutant (name, class, defect, invariant, also, and per release the invariant that
    catches it there, ``None`` where it cannot exist, with the reason): for reports and the README table."""
    rows = []
    for name, cls in MUTANTS.items():
        doc = " ".join((cls.__doc__ or "").split())
        rows.append(
            {
                "name": name,
                "class": cls.__qualname__,
                "defect": doc.split(". Caught by")[0].rstrip(".") + ".",
                "invariant": cls.mnnvl_invariant,
                "also": list(cls.mnnvl_also),
                "releases": {
                    release: {"invariant": cls.invariant_on(release), "reason": cls.release_note(release)}
                    for release in releases.SUPPORTED
                },
            }
        )
    return rows
