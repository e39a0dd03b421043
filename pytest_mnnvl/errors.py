"""The ways a rank world can fail, one exception type each, with stable message heads.

Tests match on the first line (``MnnvlRankError: 1 of 2 ranks raised``), so the wording of the
first line is part of the contract; the per-rank sections follow it.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping


class MnnvlError(Exception):
    """Base of every failure the rank world reports."""


class MnnvlUsageError(MnnvlError, ValueError):
    """A bad option, marker argument or fixture argument; names the value and what is allowed."""


class WorldStartError(MnnvlError):
    """The world could not be started: a rank died or did not reach the rendezvous in time."""


class RankError(MnnvlError):
    """User code raised on some ranks; one ``[rank r]`` section per failing rank."""

    def __init__(self, tracebacks: Mapping[int, str], world_size: int, note: str = "") -> None:
        self.tracebacks = dict(sorted(tracebacks.items()))
        self.world_size = world_size
        head = f"{len(self.tracebacks)} of {world_size} ranks raised"
        body = "".join(f"\n\n[rank {rank}]\n{tb.rstrip()}" for rank, tb in self.tracebacks.items())
        super().__init__(head + (f" ({note})" if note else "") + body)


class RankCrashed(MnnvlError):
    """A rank process ended in the middle of a call: a signal, ``os._exit`` or an interpreter abort."""

    def __init__(self, rank: int, returncode: int | None, during: str) -> None:
        self.rank = rank
        self.returncode = returncode
        # Under torchrun the peers are not the crashed rank's parent: its exit status is the agent's to log.
        how = describe_exit(returncode) if returncode is not None else "crashed (exit status: see torchrun's log)"
        super().__init__(f"rank {rank} {how} during {during}")


class WorldDeadlock(MnnvlError):
    """A call did not finish on every rank within the timeout: every rank's stack is attached."""

    def __init__(
        self,
        timeout: float,
        pending: list[int],
        stacks: Mapping[int, str],
        blocked_in: Mapping[int, str],
        during: str = "a call",
    ) -> None:
        self.timeout = timeout
        self.pending = pending
        self.stacks = dict(sorted(stacks.items()))
        self.blocked_in = dict(blocked_in)
        ranks = ", ".join(str(r) for r in pending)
        lines = [f"deadlock: ranks [{ranks}] still running {during} after {timeout:g} s"]
        for rank, stack in self.stacks.items():
            where = self.blocked_in.get(rank)
            state = "still running" if rank in pending else "returned"
            lines.append("")
            lines.append(f"[rank {rank}] {state}" + (f", blocked in {where}" if where else ""))
            lines.append(stack.rstrip() or "(no stack: the rank did not answer the dump signal)")
        super().__init__("\n".join(lines))


def describe_exit(returncode: int) -> str:
    """``was killed by SIGKILL`` / ``exited with code 3``: how a rank process ended."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"
