"""The ways a rank world can fail, one exception type each, with stable message heads.

Tests match on the first line (``MnnvlRankError: 1 of 2 ranks raised``), so the wording of the
first line is part of the contract; the per-rank sections follow it. :func:`failure_kind` says whom a
failure outside any invariant's check blames (the manager, or the machine and harness).
"""

from __future__ import annotations

import enum
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class MnnvlError(Exception):
    """Base of every failure the rank world reports."""


class MnnvlUsageError(MnnvlError, ValueError):
    """A bad option, marker argument or fixture argument; names the value and what is allowed."""


class WorldStartError(MnnvlError):
    """The world could not be started: a rank died or did not reach the rendezvous in time."""


class HarnessFault(RuntimeError):
    """The suite's own readings disagree inside a rank (not the manager's doing): raised with :data:`HARNESS_FAULT`
    leading the message, which is how :func:`failure_kind` recognizes it in a rank's traceback text."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"{HARNESS_FAULT} {detail}")


#: Leads every :class:`HarnessFault`'s message (a rank's exception reaches the parent as traceback text only).
HARNESS_FAULT = "pytest-mnnvl harness fault:"


class RankError(MnnvlError):
    """User code raised on some ranks; one ``[rank r]`` section per failing rank."""

    def __init__(self, tracebacks: Mapping[int, str], world_size: int, note: str = "") -> None:
        self.tracebacks = dict(sorted(tracebacks.items()))
        self.world_size = world_size
        head = f"{len(self.tracebacks)} of {world_size} ranks raised"
        body = "".join(f"\n\n[rank {rank}]\n{tb.rstrip()}" for rank, tb in self.tracebacks.items())
        super().__init__(head + (f" ({note})" if note else "") + body)


@dataclass(frozen=True)
class PythonFrame:
    """One frame of a rank's Python stack as ``faulthandler`` wrote it at a fatal signal."""

    file: str
    line: int
    function: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.function}"


class RankCrashed(MnnvlError):
    """A rank process ended in the middle of a call: a signal, ``os._exit`` or an interpreter abort.

    ``python_stack``: the crashed thread's frames, most recent call first, when the rank died by a fatal
    signal that ``faulthandler`` caught (SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL); empty otherwise. The
    first line names the innermost frame outside the Python library (:func:`innermost_own_frame`)."""

    def __init__(
        self, rank: int, returncode: int | None, during: str, python_stack: Sequence[PythonFrame] = ()
    ) -> None:
        self.rank = rank
        self.returncode = returncode
        self.python_stack = tuple(python_stack)
        # Under torchrun the peers are not the crashed rank's parent: its exit status is the agent's to log.
        how = describe_exit(returncode) if returncode is not None else "crashed (exit status: see torchrun's log)"
        head = f"rank {rank} {how} during {during}"
        where = innermost_own_frame(self.python_stack)
        if where is not None:
            head += f" at {where}"
        text = head
        if self.python_stack:
            at = signal_name(-returncode) if returncode is not None and returncode < 0 else "the crash"
            text += f"\n\nPython stack of rank {rank} at {at} (most recent call first):"
            text += "".join(f'\n  File "{f.file}", line {f.line} in {f.function}' for f in self.python_stack)
        super().__init__(text)


class WorldTimeout(MnnvlError):
    """A call did not finish on every rank within the timeout; every rank's stack is attached.

    Never raised itself: the verdict is one of its two subclasses, :class:`WorldDeadlock` (some rank waits for
    a peer that will not come) or :class:`WorldTooSlow` (every rank still running computes, or waits for one
    that does: :mod:`pytest_mnnvl.worlds.stall`). Catch this class for "did not finish in time", whatever the cause.
    """

    def __init__(
        self,
        head: str,
        timeout: float,
        pending: list[int],
        stacks: Mapping[int, str],
        blocked_in: Mapping[int, str],
        states: Mapping[int, str] | None = None,
        details: Sequence[str] = (),
    ) -> None:
        self.timeout = timeout
        self.pending = pending
        self.stacks = dict(sorted(stacks.items()))
        self.blocked_in = dict(blocked_in)
        #: Per running rank, what it was doing beside a wait: ``computing (97% of a core)``, ``idle (...)``.
        self.states = dict(states or {})
        lines = [head, *details]
        for rank, stack in self.stacks.items():
            where = self.blocked_in.get(rank) if rank in pending else None
            state = self.states.get(rank) if rank in pending else None
            lines.append("")
            lines.append(
                f"[rank {rank}] {'still running' if rank in pending else 'returned'}"
                + (f", blocked in {where}" if where else "")
                + (f", {state}" if state else "")
            )
            lines.append(stack.rstrip() or "(no stack: the rank did not answer the dump signal)")
        super().__init__("\n".join(lines))


class WorldDeadlock(WorldTimeout):
    """Some rank waits (in a collective, on a peer's flag) for a rank that returned, is idle or waits back; or a
    rank is idle by itself. ``why`` names one such wait."""

    def __init__(
        self,
        timeout: float,
        pending: list[int],
        stacks: Mapping[int, str],
        blocked_in: Mapping[int, str],
        during: str = "a call",
        why: str = "",
        states: Mapping[int, str] | None = None,
    ) -> None:
        self.why = why
        ranks = ", ".join(str(r) for r in pending)
        head = f"deadlock: ranks [{ranks}] still running {during} after {timeout:g} s"
        super().__init__(head, timeout, pending, stacks, blocked_in, states, [why] if why else [])


class WorldTooSlow(WorldTimeout):
    """Slow, not deadlocked: every rank still running was computing at the deadline, or waiting for peers that
    were. Not a :class:`WorldDeadlock` on purpose: code that turns a deadlock into a verdict on the manager
    (the conformance suite's ``pp_deadlock_freedom``) must not blame it for a slow machine; catch
    :class:`WorldTimeout` for both. ``progress`` says who computes where; ``advice`` what to change."""

    def __init__(
        self,
        timeout: float,
        pending: list[int],
        stacks: Mapping[int, str],
        blocked_in: Mapping[int, str],
        during: str,
        progress: str,
        advice: str = "",
        states: Mapping[int, str] | None = None,
    ) -> None:
        self.progress = progress
        head = f"slow, not deadlocked: {progress}; still running {during} after {timeout:g} s"
        super().__init__(head, timeout, pending, stacks, blocked_in, states, [advice] if advice else [])


def signal_name(signum: int) -> str:
    """``SIGSEGV``, or ``signal 77`` for a number without a name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_exit(returncode: int) -> str:
    """``was killed by SIGKILL`` / ``exited with code 3``: how a rank process ended."""
    if returncode < 0:
        return f"was killed by {signal_name(-returncode)}"
    return f"exited with code {returncode}"


def innermost_own_frame(frames: Sequence[PythonFrame]) -> PythonFrame | None:
    """The innermost frame that is not the standard library's (``ctypes``, ``threading``, frozen importlib):
    where the manager (or the library it called) was when the rank died; ``None`` without frames."""
    import sysconfig

    paths = sysconfig.get_paths()
    stdlib = {os.path.realpath(paths[key]) for key in ("stdlib", "platstdlib")}
    packages = {os.path.realpath(paths[key]) for key in ("purelib", "platlib")}

    def library(frame: PythonFrame) -> bool:
        if frame.file.startswith("<"):
            return True  # <frozen importlib._bootstrap>, <string> is not a file a user can open either
        path = os.path.realpath(frame.file)
        inside = any(path.startswith(p + os.sep) for p in stdlib)
        return inside and not any(path.startswith(p + os.sep) for p in packages)

    own = [f for f in frames if not library(f)]
    return own[0] if own else (frames[0] if frames else None)


class FailureKind(enum.Enum):
    """What a failed conformance test blames; the report's ``failure_kind``.

    ``VIOLATION``: an invariant's check failed (its exception, plan and counterexample file). ``MANAGER_ERROR``:
    the manager raised or crashed outside any check (no plan is saved, no invariant blamed).
    ``INFRASTRUCTURE``: the machine or the harness, not the manager (a rank killed from outside, a world
    that would not start, the suite's own code)."""

    VIOLATION = "violation"
    MANAGER_ERROR = "manager_error"
    INFRASTRUCTURE = "infrastructure"

    @property
    def label(self) -> str:
        """How messages name the kind: ``manager error``, ``infrastructure failure``."""
        return _LABELS[self]


_LABELS = {
    FailureKind.VIOLATION: "violation",
    FailureKind.MANAGER_ERROR: "manager error",
    FailureKind.INFRASTRUCTURE: "infrastructure failure",
}


#: Deaths that come from outside the rank's code: the OOM killer and job schedulers send SIGKILL or SIGTERM,
#: and the pool sends them only while tearing a world down after its verdict. A manager that kills its own
#: rank this way is indistinguishable and is reported as infrastructure too.
EXTERNAL_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM})


def failure_kind(error: MnnvlError) -> FailureKind:
    """Who a world's failure (outside any invariant's check) blames.

    A crash by SIGKILL/SIGTERM, or one whose exit status this process cannot see (torchrun: the peers are not
    the rank's parent), is infrastructure; any other signal (SIGSEGV, SIGABRT, ...) or exit status during a
    call is the manager's. An exception raised in the ranks and a deadlock are the manager's too (its traceback
    or stacks are attached), except a :class:`HarnessFault` raised on every failing rank: the suite's own. A
    world that would not start, was lost, or was too slow for the timeout (every rank computing: the machine's
    load and the timeout, not the manager) is infrastructure.
    """
    if isinstance(error, RankCrashed):
        code = error.returncode
        if code is None or (code < 0 and -code in EXTERNAL_SIGNALS):
            return FailureKind.INFRASTRUCTURE
        return FailureKind.MANAGER_ERROR
    if isinstance(error, WorldTooSlow):
        return FailureKind.INFRASTRUCTURE
    if (
        isinstance(error, RankError)
        and error.tracebacks
        and all(HARNESS_FAULT in tb.strip().splitlines()[-1] for tb in error.tracebacks.values() if tb.strip())
    ):
        return FailureKind.INFRASTRUCTURE
    if isinstance(error, (RankError, WorldDeadlock)):
        return FailureKind.MANAGER_ERROR
    return FailureKind.INFRASTRUCTURE
