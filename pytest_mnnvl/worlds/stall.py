"""Why a call did not finish in time: a deadlock, or a world that is merely slow.

At the deadline each rank is in one of four states (:class:`State`): it returned from the call; it waits
for peers (a torch.distributed collective, or the sim kernel's spin on a peer's completion flag: both write
what they wait for to the rank's status file before they block, :mod:`pytest_mnnvl.worlds.audit`); it computes
(its process used at least :data:`BUSY_SHARE` of a core over the last :data:`CPU_WINDOW_S`, or its main thread was
runnable at both ends of that window: on a machine loaded far past its cores a computing rank may get little
CPU, but it is never asleep); or it is idle
(neither: asleep, or blocked on a lock, a pipe, a store: a wait nobody announced).

A rank *gets somewhere* when it computes, or when every peer it waits for gets somewhere (a collective's
peers that already wait in the same collective have arrived). The world is **slow** when every rank still
running gets somewhere: it needs more time (or fewer threads per rank), not a fix. Otherwise it is a
**deadlock**: some rank waits, directly or through others, for a rank that returned, is idle, or waits back
(a cycle); a rank that is idle by itself is a hang too. On a GPU backend a busy host thread proves nothing
(CUDA's default synchronisation spins while a kernel waits for a peer that never comes), so there no rank
counts as computing and every late world is a deadlock, as it always was.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pytest_mnnvl.errors import PythonFrame, WorldDeadlock, WorldTimeout, WorldTooSlow, innermost_own_frame
from pytest_mnnvl.worlds.audit import Wait, WaitKind

#: Seconds before the deadline from which each rank's CPU time is measured.
CPU_WINDOW_S = 0.5
#: The shortest window worth judging; a shorter one is extended past the deadline.
MIN_CPU_WINDOW_S = 0.2
#: Share of one core above which a rank counts as computing. A rank asleep or blocked in C uses ~0; the
#: sim's flag wait ~0.05 (it announces itself anyway); a computing rank a whole core, or its share of an
#: oversubscribed machine (8 computing ranks on 2 cores: 0.25).
BUSY_SHARE = 0.1


class State(enum.Enum):
    RETURNED = "returned"
    WAITING = "waiting"
    COMPUTING = "computing"
    IDLE = "idle"


@dataclass(frozen=True)
class RankAtDeadline:
    """One rank at the deadline: its state and the evidence for it."""

    rank: int
    state: State
    wait: Wait | None = None
    #: CPU time per second of the window (1.0 = one core), None where it could not be measured.
    cpu_share: float | None = None
    #: Innermost frame of the rank's main thread outside the standard library (:func:`where`).
    where: PythonFrame | None = None

    @classmethod
    def of(
        cls,
        rank: int,
        returned: bool,
        wait: Wait | None,
        cpu_share: float | None,
        where: PythonFrame | None = None,
        runnable: bool = False,
    ) -> RankAtDeadline:
        """``runnable``: the rank's main thread was running or waiting for a CPU at both ends of the window."""
        if returned:
            state = State.RETURNED
        elif wait is not None:
            state = State.WAITING
        elif runnable or (cpu_share is not None and cpu_share >= BUSY_SHARE):
            state = State.COMPUTING
        else:
            state = State.IDLE
        return cls(rank, state, wait if not returned else None, cpu_share, where)

    def note(self) -> str:
        """What the per-rank section of a verdict says after ``still running``."""
        cpu = f"{self.cpu_share:.0%} of a core" if self.cpu_share is not None else "CPU time unknown"
        if self.state is State.COMPUTING:
            return f"computing ({cpu})"
        if self.state is State.IDLE:
            return f"idle ({cpu}; not in a collective or a flag wait)"
        return ""


@dataclass(frozen=True)
class Diagnosis:
    """The verdict on a late call: slow (every running rank gets somewhere) or a deadlock, and why."""

    slow: bool
    ranks: Mapping[int, RankAtDeadline]
    #: Running ranks that get nowhere (empty when slow).
    stuck: tuple[int, ...]
    #: One line: what the world was doing.
    why: str

    @property
    def pending(self) -> list[int]:
        return sorted(r for r, s in self.ranks.items() if s.state is not State.RETURNED)

    def error(self, timeout: float, stacks: Mapping[int, str], during: str, advice: str = "") -> WorldTimeout:
        """The exception the caller sees: :class:`WorldTooSlow` or :class:`WorldDeadlock`."""
        blocked = {r: s.wait.text for r, s in self.ranks.items() if s.wait is not None}
        notes = {r: s.note() for r, s in self.ranks.items() if s.note()}
        if self.slow:
            return WorldTooSlow(timeout, self.pending, stacks, blocked, during, self.why, advice, notes)
        return WorldDeadlock(timeout, self.pending, stacks, blocked, during, why=self.why, states=notes)


def _needs(state: RankAtDeadline, ranks: Mapping[int, RankAtDeadline]) -> set[int]:
    """The ranks ``state`` waits for: a flag wait's missing peers; a collective's members not in it yet."""
    assert state.wait is not None
    peers = state.wait.peers
    needed = set(peers) if peers is not None else set(ranks)
    needed.discard(state.rank)
    if state.wait.kind is WaitKind.COLLECTIVE:
        needed = {p for p in needed if not (p in ranks and ranks[p].wait == state.wait)}
    return needed


def diagnose(ranks: Sequence[RankAtDeadline], busy_is_progress: bool = True) -> Diagnosis:
    """Slow or deadlocked (see the module docstring). ``busy_is_progress``: False on GPU backends."""
    by_rank = {s.rank: s for s in ranks}
    moving = {s.rank for s in ranks if s.state is State.COMPUTING and busy_is_progress}
    changed = True
    while changed:
        changed = False
        for s in ranks:
            if s.state is State.WAITING and s.rank not in moving and _needs(s, by_rank) <= moving:
                moving.add(s.rank)
                changed = True
    running = [s for s in ranks if s.state is not State.RETURNED]
    stuck = tuple(s.rank for s in running if s.rank not in moving)
    if running and not stuck:
        return Diagnosis(True, by_rank, (), _progress(running))
    return Diagnosis(False, by_rank, stuck, _blockage(stuck, by_rank, busy_is_progress))


def _progress(running: list[RankAtDeadline]) -> str:
    """``every rank is computing (ranks [0, 1] in spin at test_it.py:5, 6)``, and who waits for them: ranks in
    one function are named together (a busy loop's ranks sit on different lines of it)."""
    computing = [s for s in running if s.state is State.COMPUTING]
    waiting = [s for s in running if s.state is State.WAITING]
    by_function: dict[tuple[str, str], list[RankAtDeadline]] = {}
    for s in computing:
        key = (s.where.function, os.path.basename(s.where.file)) if s.where is not None else ("", "")
        by_function.setdefault(key, []).append(s)
    parts = []
    for (function, file), group in by_function.items():
        ranks = _ranks([s.rank for s in group])
        lines = sorted({s.where.line for s in group if s.where is not None})
        at = f"{function} at {file}:{', '.join(map(str, lines))}" if function else "an unknown frame"
        parts.append(f"{ranks} in {at}")
    parts += [f"rank {s.rank} in {s.wait.text if s.wait else 'a wait'}" for s in waiting]
    head = "every rank is computing" if not waiting else "every rank is computing or waiting for one that is"
    return f"{head} ({'; '.join(parts)})"


def _blockage(stuck: tuple[int, ...], ranks: Mapping[int, RankAtDeadline], busy_is_progress: bool) -> str:
    """One line naming a rank that gets nowhere and what it waits for."""
    for rank in stuck:
        s = ranks[rank]
        if s.state is not State.WAITING:
            continue
        for peer in sorted(_needs(s, ranks)):
            other = ranks.get(peer)
            if other is None:
                what = "which is not in this world"
            elif other.state is State.RETURNED:
                what = "which returned from the call"
            elif other.state is State.IDLE:
                what = "which is idle (not computing, not in a collective or a flag wait)"
            elif other.state is State.COMPUTING and not busy_is_progress:
                what = "which is busy, but a busy host thread on a GPU backend may be spinning on the GPU"
            elif other.state is State.WAITING and other.wait is not None:
                what = f"which waits in {other.wait.text}"
            else:
                continue
            wait = s.wait.text if s.wait is not None else "a wait"
            return f"rank {rank} is blocked in {wait} and needs rank {peer}, {what}"
    idle = [r for r in stuck if ranks[r].state is State.IDLE]
    if idle:
        return f"{_ranks(idle)} idle: not computing, not in a collective or a flag wait"
    busy = [r for r in stuck if ranks[r].state is State.COMPUTING]
    if busy:
        return f"{_ranks(busy)} busy, but on a GPU backend a busy host thread may be spinning on the GPU"
    return f"{_ranks(list(stuck))} waiting for each other"


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {sorted(ranks)}"


# -- evidence --------------------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of every thread of ``pid`` so far (``/proc/PID/stat``), None without it."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # fields[0] is field 3 (the state); utime and stime are fields 14 and 15.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def main_thread_runnable(pid: int, tid: int | None = None) -> bool | None:
    """Whether the main thread of ``pid`` (or its thread ``tid``) is running or runnable now (``R`` in
    ``/proc/PID/[task/TID/]stat``): asleep, blocked in a lock, a pipe or a collective it is ``S``. None without it."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "R"
    except (OSError, IndexError):
        return None


def cpu_shares(
    before: Mapping[int, float | None], after: Mapping[int, float | None], seconds: float
) -> dict[int, float | None]:
    """CPU time per wall second between two :func:`process_cpu_seconds` readings, per rank."""
    shares: dict[int, float | None] = {}
    for rank, start in before.items():
        end = after.get(rank)
        shares[rank] = (end - start) / seconds if start is not None and end is not None and seconds > 0 else None
    return shares


_DUMP_FRAME = re.compile(r'^\s+File "(?P<file>.*)", line (?P<line>\d+) in (?P<function>.+)$')
#: The rank process's entry file, whose ``main`` starts a rank's main thread.
RANK_MAIN = os.path.join("pytest_mnnvl", "worlds", "rank.py")


def main_thread_frames(dump: str) -> tuple[PythonFrame, ...]:
    """The main thread's frames (most recent call first) in a rank's ``faulthandler`` dump of all threads: the
    thread whose stack starts in the rank's ``main``; else the thread the dump was taken on."""
    blocks: list[tuple[bool, list[PythonFrame]]] = []
    for line in dump.splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x", "Stack (most recent call first)")):
            blocks.append((line.startswith(("Current thread", "Stack")), []))
            continue
        match = _DUMP_FRAME.match(line)
        if match and blocks:
            blocks[-1][1].append(PythonFrame(match["file"], int(match["line"]), match["function"]))
    for _current, frames in blocks:
        if any(f.function == "main" and f.file.endswith(RANK_MAIN) for f in frames):
            return tuple(frames)
    return next((tuple(frames) for current, frames in blocks if current), ())


def where(frames: Sequence[PythonFrame]) -> PythonFrame | None:
    """The innermost frame outside the standard library: where a computing rank computes."""
    return innermost_own_frame(frames)


def advice(threads: str) -> str:
    """What to do about a slow world; ``threads`` says what the ranks ran with."""
    return (
        "give the call more time (--mnnvl-timeout=SECONDS, or timeout= of mnnvl_world or the mnnvl marker), "
        f"or the machine less work: fewer threads per rank or fewer worlds at once ({threads})"
    )
