"""The sim's race detector: a write into workspace bytes a peer may still be reading.

FlashInfer 0.7.2.post1's combine region starts right after the *current* dispatch payloads, so two
round trips with different payload layouts use overlapping bytes: a rank that finishes its combine
and dispatches the next layer at once can overwrite the combine slots a slower peer is still reading
(TensorRT-LLM #19312). A GPU corrupts that peer's result silently, and only when the timing is
unlucky. The sim judges the *order* instead of the timing, so the verdict is the same on every run:

- every combine leaves a lease in the sidecar of each row it reads (the reader, the round, the byte
  range), before it raises its completion flags;
- after its own combine a rank counts every peer as "maybe still reading" until something orders the
  peer's reads before its own later writes: a completed EP-wide synchronising collective (barrier,
  all-reduce, all-gather, all-to-all, reduce-scatter over a group holding every rank of the workspace),
  or the completion flags of its next dispatch (each peer raises them after its combine);
- a dispatch payload write or an ``initialize`` that zeroes a row is checked against the leases of the
  peers still "maybe reading": an overlap raises :class:`WorkspaceRace` on the writer, and the
  workspace is poisoned so that every peer's next call or wait raises it too (nobody waits out a
  kernel timeout).

Releasing a workspace while a peer reads it is not a race: a peer's imported handle and mapping keep
the physical memory (CUDA frees it with the last reference; the sim's memfd rows behave the same).
Collectives that only order one way (broadcast, scatter, gather, reduce, send/recv) are not counted
as ordering, and neither is ordering through a third rank: a program that relies only on those is
reported as racing. ``PYTEST_MNNVL_SIM_RACES=allow`` (or :func:`allowed`) turns detection off, to
study the corruption itself.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pytest_mnnvl.worlds.audit import SYNCHRONISING

from ._shm import SIDECAR_BYTES, sidecar_at

RACES_ENV = "PYTEST_MNNVL_SIM_RACES"
RACE_MODES = ("raise", "allow")

# Sidecar layout, in int64 words: [0] owner's global rank + 1, [1] poisoned, [2] poison text bytes;
# poison text from byte 64; one lease per reader EP rank from byte 4096: (round, start, end, valid).
_OWNER, _POISONED, _TEXT_LEN = 0, 1, 2
_TEXT_AT, _TEXT_MAX = 64, 4096 - 64
_LEASES_AT, _LEASE_WORDS = 4096, 4
MAX_READERS = (SIDECAR_BYTES - _LEASES_AT) // (8 * _LEASE_WORDS)


class WorkspaceRace(RuntimeError):
    """A write into workspace bytes that a peer's combine may still be reading (see the module docstring)."""


@dataclass(frozen=True)
class Lease:
    """What one reader reads of one row in one combine round: bytes ``[start, end)``."""

    reader: int
    round: int
    start: int
    end: int


@dataclass(frozen=True)
class Write:
    """Bytes ``[start, end)`` of row ``row`` a call is about to write, and what they are."""

    row: int
    start: int
    end: int
    what: str


@dataclass
class _LastCombine:
    """This process's last combine on one workspace, and the peers not yet ordered after it."""

    round: int
    combine_offset: int
    pending: set[int] = field(default_factory=set)
    owners: tuple[int, ...] = ()


_state: dict[int, _LastCombine] = {}
_global_rank = -1
_harness_depth = 0
_allow_depth = 0


def _mode() -> str:
    value = os.environ.get(RACES_ENV, "raise").strip().lower() or "raise"
    if value not in RACE_MODES:
        raise RuntimeError(f"{RACES_ENV}={value!r} is not one of {', '.join(RACE_MODES)}")
    return value


def _active() -> bool:
    return _allow_depth == 0 and _mode() == "raise"


def set_global_rank(rank: int) -> None:
    """Which global rank this process is (the sim installs it; owners write it into their rows)."""
    global _global_rank
    _global_rank = int(rank)


@contextmanager
def allowed() -> Iterator[None]:
    """Inside the block races are not detected (an experiment that measures the corruption itself)."""
    global _allow_depth
    _allow_depth += 1
    try:
        yield
    finally:
        _allow_depth -= 1


@contextmanager
def harness_only() -> Iterator[None]:
    """Collectives inside the block order nothing for the detector: the harness's own bookkeeping
    (agreeing on outcomes) is not there in a forward pass, so it must not hide a manager's race."""
    global _harness_depth
    _harness_depth += 1
    try:
        yield
    finally:
        _harness_depth -= 1


def on_collective(name: str, group_ranks: Sequence[int]) -> None:
    """A collective completed in this process: peers it synchronised with are ordered now."""
    if _harness_depth or name not in SYNCHRONISING:
        return
    members = set(group_ranks)
    for last in _state.values():
        if not last.owners or set(last.owners) <= members:
            last.pending.clear()


_before_boundary: dict[int, set[int]] = {}


def synchronised() -> None:
    """Every rank of every workspace passed a common point (a world's call boundary): all ordered."""
    _before_boundary.clear()
    for key, last in _state.items():
        _before_boundary[key] = set(last.pending)
        last.pending.clear()


def undo_call_boundary() -> None:
    """The call boundary just passed was a tool's bookkeeping (a step-by-step replay of one forward
    pass): peers that were not ordered before it are not ordered now either."""
    for key, pending in _before_boundary.items():
        last = _state.get(key)
        if last is not None:
            last.pending |= pending
    _before_boundary.clear()


def _words(address: int, count: int, at: int = 0) -> Any:
    return (ctypes.c_int64 * count).from_address(address + at)


def _sidecar(workspace: Any, row: int) -> int:
    return sidecar_at(int(workspace[row].data_ptr()))


def _key(workspace: Any) -> int:
    return int(workspace[0].data_ptr())


def _poison(workspace: Any, text: str) -> None:
    data = text.encode()[:_TEXT_MAX]
    for row in range(workspace.size(0)):
        address = _sidecar(workspace, row)
        if not address:
            continue
        ctypes.memmove(address + _TEXT_AT, data, len(data))
        header = _words(address, 3)
        header[_TEXT_LEN] = len(data)
        header[_POISONED] = 1


def raise_if_poisoned(workspace: Any, me: int) -> None:
    """A peer found a race on this workspace: fail here too, with the peer's words."""
    address = _sidecar(workspace, me)
    if not address:
        return
    header = _words(address, 3)
    if header[_POISONED]:
        text = ctypes.string_at(address + _TEXT_AT, int(header[_TEXT_LEN])).decode(errors="replace")
        raise WorkspaceRace(f"pytest-mnnvl sim: this workspace is poisoned by a race a peer detected: {text}")


def on_initialize(workspace: Any, me: int) -> None:
    """Before ``initialize`` zeroes this rank's row: a peer may still read it. After: a fresh start."""
    size = int(workspace.size(1))
    check_writes(workspace, me, "moe_a2a_initialize", [Write(me, 0, size, "zeroes the whole row")])
    address = _sidecar(workspace, me)
    if address:
        ctypes.memset(address + _LEASES_AT, 0, SIDECAR_BYTES - _LEASES_AT)
        _words(address, 1)[_OWNER] = _global_rank + 1
    _state.pop(_key(workspace), None)


def lease(workspace: Any, me: int, round: int, reads: Sequence[tuple[int, int, int]]) -> None:
    """Publish this rank's combine reads ``(row, start, end)`` of ``round`` before its flags go up."""
    if me >= MAX_READERS:
        return
    for row, start, end in reads:
        address = _sidecar(workspace, row)
        if not address:
            continue
        words = _words(address, _LEASE_WORDS, _LEASES_AT + 8 * _LEASE_WORDS * me)
        words[3] = 0
        words[0], words[1], words[2] = round, start, end
        words[3] = 1 if end > start else 0


def combined(workspace: Any, me: int, round: int, combine_offset: int, active: Sequence[bool]) -> None:
    """This rank's combine of ``round`` is done; its peers may still be reading."""
    owners = []
    for row in range(workspace.size(0)):
        address = _sidecar(workspace, row)
        owners.append(int(_words(address, 1)[_OWNER]) - 1 if address else -1)
    pending = {peer for peer, on in enumerate(active) if on and peer != me}
    known = tuple(owners) if all(o >= 0 for o in owners) else ()
    _state[_key(workspace)] = _LastCombine(round, combine_offset, pending, known)


def dispatched(workspace: Any) -> None:
    """Every peer raised its flag of this dispatch, after its previous combine: all ordered now."""
    last = _state.get(_key(workspace))
    if last is not None:
        last.pending.clear()


def _read_lease(address: int, reader: int) -> Lease | None:
    words = _words(address, _LEASE_WORDS, _LEASES_AT + 8 * _LEASE_WORDS * reader)
    if not words[3]:
        return None
    return Lease(reader, int(words[0]), int(words[1]), int(words[2]))


def check_writes(workspace: Any, me: int, call: str, writes: Sequence[Write]) -> None:
    """Raise :class:`WorkspaceRace` if a write overlaps a lease of a peer not yet ordered after it."""
    raise_if_poisoned(workspace, me)
    last = _state.get(_key(workspace))
    if last is None or not last.pending or not _active():
        return
    for write in writes:
        address = _sidecar(workspace, write.row)
        if not address:
            continue
        for peer in sorted(last.pending):
            if peer >= MAX_READERS:
                continue
            held = _read_lease(address, peer)
            if held is None or held.round != last.round:
                continue
            lo, hi = max(write.start, held.start), min(write.end, held.end)
            if lo < hi:
                text = _race_text(me, call, write, held, lo, hi, last)
                _poison(workspace, text)
                raise WorkspaceRace(text)


def _race_text(me: int, call: str, write: Write, held: Lease, lo: int, hi: int, last: _LastCombine) -> str:
    row = "its own" if write.row == me else f"rank {write.row}'s"
    return (
        f"pytest-mnnvl sim: workspace race: rank {me}'s {call} writes bytes [{write.start}, {write.end}) of "
        f"{row} workspace row ({write.what}) while rank {held.reader} may still be reading bytes "
        f"[{held.start}, {held.end}) of that row in the combine of the previous round (combine region from "
        f"offset {last.combine_offset}); {hi - lo} bytes overlap from offset {lo}, and no EP-wide "
        "synchronising collective (barrier, all-gather, all-reduce, ...) ran between that combine and "
        f"this call on rank {me}. On a GPU rank {held.reader}'s combine result is silently corrupted when "
        f"it is slower ({_WHY.get(call, _WHY['dispatch'])}). Synchronise the EP group "
        "between round trips whose layouts differ, and before re-initializing a live workspace."
    )


#: Why a write of each kind can meet a peer's combine reads (the race text's explanation).
_WHY = {
    "dispatch": "TensorRT-LLM #19312: FlashInfer 0.7.2's combine region starts after the current dispatch "
    "payloads, so a layer with another payload layout moves it",
    "moe_a2a_initialize": "re-initializing zeroes the whole row, whichever part of it a peer's combine reads, on "
    "every FlashInfer release (0.7.4's fixed combine region included)",
}
