"""What a conformance session has seen: per test its outcome, per topology a halt, per failure whom it blames.

One :class:`Recorder` per process; under pytest-xdist each worker's additions travel to the controller
(:mod:`pytest_mnnvl.conformance.xdist_merge`), so the controller's Recorder is what one process running every
test would hold, and the report is written from it alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from pytest_mnnvl.errors import FailureKind, MnnvlError, failure_kind

if TYPE_CHECKING:
    from pytest_mnnvl.conformance.observations import PlanObservation
    from pytest_mnnvl.managers.compat import Incompatibility


RECORDER_KEY = pytest.StashKey["Recorder"]()


#: Characters of a failure's detail (tracebacks, stacks, output) kept in the report.
DETAIL_CHARS = 4000


@dataclass(frozen=True)
class Failure:
    """A failure that no invariant's check found: whom it blames, one line, and the evidence."""

    kind: FailureKind
    summary: str
    detail: str = ""

    @classmethod
    def of(cls, error: MnnvlError) -> Failure:
        """The failure a world's error stands for (:func:`pytest_mnnvl.errors.failure_kind` decides whom)."""
        from pytest_mnnvl.errors import RankCrashed, RankError
        from pytest_mnnvl.managers.compat import Incompatibility

        text = str(error)
        head, _, rest = text.partition("\n")
        if isinstance(error, RankError) and error.tracebacks:
            rank, tb = next(iter(error.tracebacks.items()))
            last = [line.strip() for line in tb.splitlines() if line.strip()]
            if last:
                head += f"; rank {rank}: {last[-1]}"
            incompatible = Incompatibility.parse(tb)
            if incompatible is not None:
                # The verdict is the summary (xdist and the halt carry it as is); the tracebacks stay as evidence.
                head = incompatible.line
        kind = failure_kind(error)
        detail = rest.strip("\n")
        if kind is FailureKind.INFRASTRUCTURE and isinstance(error, RankCrashed) and error.returncode is not None:
            hint = (
                "SIGKILL and SIGTERM come from outside the rank's code: the kernel's OOM killer (see dmesg), a job "
                "scheduler or a person. The harness sends them only to stop a world after its verdict."
            )
            detail = hint + (f"\n\n{detail}" if detail else "")
        return cls(kind, head, detail)

    @property
    def incompatibility(self) -> Incompatibility | None:
        """The compatibility verdict this manager error is (its summary is the verdict's line), or ``None``."""
        return _verdict_of(self.kind, self.summary)

    @property
    def label(self) -> str:
        """``incompatible`` for a compatibility verdict, else the kind's label (``manager error``)."""
        return "incompatible" if self.incompatibility is not None else self.kind.label

    @property
    def blame(self) -> str:
        if self.kind is FailureKind.MANAGER_ERROR:
            return "no invariant checked"
        return "not the manager's"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind.value, "summary": self.summary, "detail": self.detail[-DETAIL_CHARS:]}
        incompatible = self.incompatibility
        return out if incompatible is None else {**out, "incompatibility": incompatible.to_dict()}


def _verdict_of(kind: FailureKind, summary: str) -> Incompatibility | None:
    from pytest_mnnvl.managers.compat import Incompatibility

    return Incompatibility.parse(summary) if kind is FailureKind.MANAGER_ERROR else None


class AttributedError(Exception):
    """Raised for a :class:`Failure`: the test errs with it, no invariant is blamed, no plan is saved."""

    def __init__(self, failure: Failure) -> None:
        self.failure = failure
        text = f"{failure.label} ({failure.blame}): {failure.summary}"
        super().__init__(text + (f"\n\n{failure.detail}" if failure.detail else ""))


def hide_for_attributed(excinfo: pytest.ExceptionInfo[BaseException]) -> bool:
    """``__tracebackhide__`` of the frames that raise an :class:`AttributedError`: its message is the
    report; the plugin's source around the ``raise`` is not."""
    return excinfo.errisinstance(AttributedError)


class ManagerError(AttributedError):
    """The manager raised or crashed outside any invariant's check."""


class InfrastructureError(AttributedError):
    """The machine or the harness failed: a rank killed from outside (SIGKILL/SIGTERM), a world that did not start."""


def attributed(failure: Failure) -> AttributedError:
    return (ManagerError if failure.kind is FailureKind.MANAGER_ERROR else InfrastructureError)(failure)


@dataclass
class Halt:
    """The failure after which the rest of a topology's tests are skipped (each would replay the same plans:
    a hang costs its timeout again, a crash crashes again); ``skipped`` lists them."""

    nodeid: str
    topology: str
    kind: FailureKind
    summary: str
    skipped: list[str] = field(default_factory=list)

    @property
    def incompatibility(self) -> Incompatibility | None:
        return _verdict_of(self.kind, self.summary)

    def skip_reason(self) -> str:
        incompatible = self.incompatibility
        if incompatible is not None:
            return (
                f"not run: {incompatible.line} (found by {self.nodeid.rpartition('::')[2]}); "
                f"the rest of {self.topology} is skipped"
            )
        what = {
            FailureKind.VIOLATION: "a deadlock",
            FailureKind.MANAGER_ERROR: "a manager error",
            FailureKind.INFRASTRUCTURE: "an infrastructure failure",
        }[self.kind]
        return (
            f"not run: {self.nodeid.rpartition('::')[2]} ended in {what} on {self.topology} ({self.summary}); "
            "the rest of this topology is skipped"
        )

    def to_dict(self) -> dict[str, Any]:
        out = {"test": self.nodeid, "failure_kind": self.kind.value, "error": self.summary, "skipped": self.skipped}
        incompatible = self.incompatibility
        return out if incompatible is None else {**out, "incompatibility": incompatible.to_dict()}


@dataclass
class Recorder:
    """Everything the report needs, gathered while the session runs."""

    started: float = field(default_factory=time.time)
    profile: str = ""
    tests: dict[str, dict[str, Any]] = field(default_factory=dict)
    examples: int = 0
    plan_runs: int = 0
    cache_hits: int = 0
    plan_seconds: float = 0.0
    initialize_calls: int = 0
    rebuilds: int = 0
    max_size_per_rank: int = 0
    #: Per topology, the failure that ended it for this session (:class:`Halt`).
    broken: dict[tuple[int, int], Halt] = field(default_factory=dict)
    #: Tests skipped because of an earlier failure (a halt, the manager not loading): the kind of that failure.
    skipped_after: dict[str, FailureKind] = field(default_factory=dict)
    #: Tests that failed without a violation, by node id (the report's ``failure``).
    failures: dict[str, Failure] = field(default_factory=dict)
    loaded: set[tuple[tuple[int, ...], str]] = field(default_factory=set)
    #: The first failure to import the manager in the ranks (test id, error): every later test skips
    #: on it instead of importing again (a failed vLLM import can take minutes and may not be re-entrant).
    load_error: tuple[str, str] | None = None
    #: What the ranks observed, per (manager, topology, plan JSON): every invariant test of a plan judges it.
    cache: dict[tuple[Any, ...], list[PlanObservation]] = field(default_factory=dict)
    #: Each test's place in the session's collection: the report lists tests in this order, with or without
    #: pytest-xdist (whose controller hears of them in the order they finish).
    order: dict[str, int] = field(default_factory=dict)

    def test(self, nodeid: str) -> dict[str, Any]:
        return self.tests.setdefault(nodeid, {"nodeid": nodeid})

    def position(self, nodeid: str) -> int:
        return self.order.get(nodeid, len(self.order))

    def ordered_tests(self) -> list[dict[str, Any]]:
        return sorted(self.tests.values(), key=lambda entry: self.position(entry["nodeid"]))

    def halt(self, topology: tuple[int, int], nodeid: str, kind: FailureKind, summary: str) -> None:
        """End ``topology`` for the rest of the session on this failure (the first one stays)."""
        ws, pp = topology
        self.broken.setdefault(topology, Halt(nodeid, f"ws{ws}-pp{pp}", kind, summary))


#: The kinds that are pytest errors (``E``, ``<error>``), not failures: no invariant was found violated.
ERROR_KINDS = (FailureKind.MANAGER_ERROR.value, FailureKind.INFRASTRUCTURE.value)
