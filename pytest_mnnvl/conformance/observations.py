"""What a rank observes while it runs a plan: typed records, built in the ranks and judged in the parent.

They cross the process boundary by pickle (rank → parent), so they hold builtins, tuples and
:class:`~pytest_mnnvl.managers.adapters.StateRecord` only, never a live FlashInfer object. The checks
(:mod:`pytest_mnnvl.conformance.invariants`) read their fields; a violation's expected/observed shows
plain values made from them (:meth:`Collective.plain`, :meth:`Decision.row`), so reports read as
before the records existed.
"""

from __future__ import annotations

import dataclasses
import enum
import traceback
from dataclasses import dataclass, field

from pytest_mnnvl.managers.adapters import StateRecord

#: The outcome of a call that passed (any other outcome text starts with ``error:``).
OK = "ok"


class Phase(str, enum.Enum):
    """Which call of a layer step failed: its ``initialize``, its own round trip, or the round trip again on
    the handle the stage ended with (``repro``'s final pass)."""

    INITIALIZE = "initialize"
    ROUND_TRIP = "round_trip"
    FINAL_PASS = "final_pass"


@dataclass(frozen=True)
class CallError:
    """What one rank's call raised, in full: ``repro`` shows it exactly as FlashInfer raised it; the suite's
    verdicts use :attr:`first_line`."""

    type: str
    message: str
    traceback: str = ""

    @classmethod
    def of(cls, exc: BaseException) -> CallError:
        return cls(type(exc).__name__, str(exc), "".join(traceback.format_exception(exc)))

    @property
    def first_line(self) -> str:
        return f"{self.type}: {self.message.splitlines()[0] if self.message else ''}"

    def to_dict(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message, "traceback": self.traceback}


@dataclass(frozen=True)
class Collective:
    """One torch.distributed collective issued inside a manager call, with the global ranks of its group."""

    name: str
    group_ranks: tuple[int, ...]

    def plain(self) -> tuple[str, tuple[int, ...]]:
        return (self.name, self.group_ranks)


def plain_collectives(calls: tuple[Collective, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """``calls`` as a violation shows them: ``[(name, group ranks), ...]``."""
    return [c.plain() for c in calls]


@dataclass(frozen=True)
class LayerStep:
    """One layer step of one rank: its ``initialize``, the handle after it, and its round trip."""

    #: The layer's index in this rank's PP stage.
    layer: int
    #: The first line of what ``initialize`` raised on this rank (``None``: it returned).
    raised: str | None
    state: StateRecord
    #: The live handle is another object than before this ``initialize`` (by kept reference).
    rebuilt: bool
    collectives: tuple[Collective, ...]
    #: The round trip's outcome agreed by the EP group (``ok`` or an ``error: ...`` line); ``None``: not run.
    round_trip: str | None = None
    #: With ``recheck``: every earlier layer round-tripped again after this ``initialize`` (index -> outcome).
    earlier_round_trips: dict[int, str] = field(default_factory=dict)
    #: The first line of what some rank of the EP group raised in this ``initialize`` (this one included).
    peer_raised: str | None = None
    #: This rank's own failure of the step in full, and where (``None``: this rank raised nothing).
    error: CallError | None = None
    phase: Phase | None = None
    #: ``repro``: the round trip was not repeated, this same layer passed as step ``same_as`` on this handle.
    same_as: int | None = None
    #: Where FlashInfer put the combine payload in the round trip (0.7.2 moves it per call).
    combine_payload_offset: int | None = None


@dataclass(frozen=True)
class Decision:
    """What every rank of an EP group must agree on about one step (stamps are per process, so left out)."""

    layer: int
    ok: bool
    rebuilt: bool
    initialized: bool
    handle: bool
    size_per_rank: int | None
    max_num_tokens: int | None
    top_k: int | None
    num_experts: int | None
    collectives: int
    #: FlashInfer 0.7.4's regions (``None`` on 0.7.2): peers must agree on them too.
    layout: tuple[int, ...] | None

    @classmethod
    def of(cls, step: LayerStep) -> Decision:
        s = step.state
        return cls(
            step.layer,
            step.raised is None,
            step.rebuilt,
            s.initialized,
            s.stamp is not None,
            s.size_per_rank,
            s.max_num_tokens,
            s.top_k,
            s.num_experts,
            len(step.collectives),
            s.layout,
        )

    def row(self) -> tuple[object, ...]:
        return dataclasses.astuple(self)


def decisions(steps: tuple[LayerStep, ...]) -> tuple[Decision, ...]:
    return tuple(Decision.of(step) for step in steps)


@dataclass(frozen=True)
class PlanObservation:
    """One rank's run of its PP stage of a plan (``conformance.rank.run_plan``)."""

    rank: int
    stage: int
    ep_rank: int
    ep_group: tuple[int, ...]
    #: The FlashInfer release the ranks ran: the workspace tables and the leak expectation follow it.
    release: str
    steps: tuple[LayerStep, ...] = ()
    #: Every earlier layer round-tripped after the last ``initialize`` (index -> outcome).
    late_round_trips: dict[int, str] = field(default_factory=dict)
    #: The cross-product probes' outcomes (probe index -> outcome).
    probes: dict[int, str] = field(default_factory=dict)
    #: Why the steps stopped early (an ``initialize`` raised somewhere), else ``None``.
    stopped: str | None = None
    final_has_handle: bool = False
    #: Workspaces in FlashInfer's table beyond those there before the plan, before and after ``cleanup()``.
    workspaces_before_cleanup: int = 0
    workspaces_at_end: int = 0
    #: The FlashInfer workspace tables this rank could read (``None``: the plan had no layer here).
    tables: tuple[str, ...] | None = None
    #: After ``cleanup()`` + re-``initialize`` (all ``None`` when that was not run).
    cleanup_raised: str | None = None
    after_cleanup: StateRecord | None = None
    reinit_raised: str | None = None
    reinit: StateRecord | None = None
    reinit_collectives: tuple[Collective, ...] = ()
    reinit_round_trip: str | None = None
    second_cleanup_raised: str | None = None
    #: Every EP peer's :func:`decisions`, all-gathered (one tuple per peer, in EP rank order).
    ep_view: tuple[tuple[Decision, ...], ...] = ()


@dataclass(frozen=True)
class MismatchObservation:
    """``initialize`` of a first layer, then of one with another top_k or num_experts (``rank.mismatch``)."""

    rank: int
    raised: str | None
    same_handle: bool
    before: StateRecord
    after: StateRecord
    collectives: tuple[Collective, ...]
    #: ``sys.flags.optimize`` in the rank (the ``-O`` check runs the ranks under PYTHONOPTIMIZE).
    optimize: int
    #: The first layer's round trip after the refused call (``None``: the handle had moved, not run).
    round_trip_after: str | None
    #: The rest of the plan after the refused call: layers of the first one's shape (one that fits the
    #: workspace, one that must grow it), plan indices 2.. (empty: not run, the refused call already failed).
    continuation: tuple[LayerStep, ...] = ()
    #: The same layers on a fresh manager that never saw the refused call (initialize: only the first layer).
    control: tuple[LayerStep, ...] = ()
    #: Why the control has no steps (its own first ``initialize`` raised), else ``None``.
    control_stopped: str | None = None


@dataclass(frozen=True)
class FailedCommitObservation:
    """A growth whose build succeeded and whose first barrier after it failed, then retried (``rank.failed_commit``)."""

    rank: int
    #: The manager issued a barrier after its build, so the injected failure happened (else nothing to judge).
    injected: bool
    raised: str | None
    same_handle: bool
    before: StateRecord
    after_failure: StateRecord
    #: FlashInfer's workspaces beyond the live handle's right after the failure, and after the same growth with no
    #: failure on a fresh manager: a failure may leave no more behind than the manager's own success does.
    extra_workspaces: int
    control_extra_workspaces: int
    retry_raised: str | None
    after_retry: StateRecord
    retry_round_trip: str | None


@dataclass(frozen=True)
class FailedRebuildObservation:
    """A growth whose allocation was made to fail, then retried (``rank.failed_rebuild``)."""

    rank: int
    raised: str | None
    same_handle: bool
    before: StateRecord
    after_failure: StateRecord
    first_round_trip: str | None
    retry_raised: str | None
    after_retry: StateRecord
    retry_round_trip: str | None
    cleanup_raised: str | None = None
    #: The rest of the plan after the retry, as in :class:`MismatchObservation` (one layer that fits, one that
    #: must grow), and the same on a fresh manager that initialized both layers with no failure in between.
    continuation: tuple[LayerStep, ...] = ()
    control: tuple[LayerStep, ...] = ()
    control_stopped: str | None = None
