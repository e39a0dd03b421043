"""Inside a rank: see every torch.distributed collective, who it involves, and which one is running.

One wrapper serves two needs. The conformance suite records the collectives a manager issues
during ``initialize`` (to judge their scope by group membership), and the pool needs to say which
collective a hung rank is blocked in. The second is written to a small per-rank status file before
the call enters C, so the parent can read it even when the rank's main thread is stuck. The sim's
kernels write the same status while they wait for a peer's completion flag (:class:`Wait`): at a
timeout, a rank waiting for a peer tells a deadlock from a world that is merely slow
(:mod:`pytest_mnnvl.worlds.stall`).
"""

from __future__ import annotations

import enum
import functools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

#: Collectives (and point-to-point calls) that can block on peers.
COLLECTIVES = (
    "barrier",
    "monitored_barrier",
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
    "send",
    "recv",
)
#: The collectives after which every member has seen every other member enter (the others order one way).
SYNCHRONISING = frozenset(
    {
        "barrier",
        "monitored_barrier",
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_object",
        "all_to_all",
        "all_to_all_single",
        "reduce_scatter",
        "reduce_scatter_tensor",
    }
)


@dataclass(frozen=True)
class CollectiveCall:
    """One collective as issued: its name and the global ranks of its group, in group order."""

    name: str
    group_ranks: tuple[int, ...]

    def describe(self) -> str:
        return f"torch.distributed.{self.name}(group={list(self.group_ranks)})"


class WaitKind(enum.Enum):
    """What a rank can be waiting in for its peers."""

    #: A torch.distributed collective (or send/recv): every rank of ``peers`` has to enter it.
    COLLECTIVE = "collective"
    #: The sim kernel's spin on peers' completion flags: ``peers`` are those whose flag is still missing.
    PEER_FLAG = "peer_flag"


@dataclass(frozen=True)
class Wait:
    """What a rank waits for, written to its status file before it blocks: one JSON line.

    ``peers``: global ranks, the collective's group (this rank included) or the ranks whose flag is missing;
    ``None`` when the rank cannot tell (a workspace over a group other than its EP group)."""

    kind: WaitKind
    text: str
    peers: tuple[int, ...] | None

    def to_line(self) -> str:
        peers = list(self.peers) if self.peers is not None else None
        return json.dumps({"kind": self.kind.value, "text": self.text, "peers": peers})

    @classmethod
    def from_line(cls, line: str) -> Wait | None:
        """The record, or None for an empty status; a line that is not one of ours stays readable as text."""
        line = line.strip()
        if not line:
            return None
        try:
            data = json.loads(line)
            peers = data["peers"]
            return cls(WaitKind(data["kind"]), str(data["text"]), tuple(int(p) for p in peers) if peers else None)
        except (ValueError, KeyError, TypeError):
            return cls(WaitKind.COLLECTIVE, line, None)


class _Auditor:
    def __init__(self) -> None:
        self.status_path: str | None = None
        self.recordings: list[list[CollectiveCall]] = []
        self.installed = False
        #: Called with the group before each collective: torchrun worlds bound its gloo timeout there.
        self.before: Callable[[Any], None] | None = None
        #: Called with (name, group ranks) after each collective that returned: the sim's race detector.
        self.after: list[Callable[[str, tuple[int, ...]], None]] = []
        self._fd: int | None = None
        self._fd_path: str | None = None

    def set_status(self, text: str) -> None:
        if self.status_path is None:
            return
        # Set before the collective starts, read by the parent on a timeout. The file stays open:
        # opening it per call cost ~1 ms, twice per collective (a third of a small plan's harness time).
        if self._fd_path != self.status_path:
            if self._fd is not None:
                os.close(self._fd)
            self._fd = os.open(self.status_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            self._fd_path = self.status_path
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        if text:
            os.pwrite(self._fd, text.encode(), 0)


_AUDITOR = _Auditor()


def _group_ranks(group: Any) -> tuple[int, ...]:
    import torch.distributed as dist

    if group is None or group is dist.group.WORLD:
        return tuple(range(dist.get_world_size()))
    return tuple(dist.get_process_group_ranks(group))


def _wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def collective(*args: Any, **kwargs: Any) -> Any:
        group = kwargs.get("group")
        if group is None:
            # Every collective in torch.distributed takes `group` by keyword or as the first
            # positional argument that is a ProcessGroup.
            group = next((a for a in args if type(a).__name__ in ("ProcessGroup", "ProcessGroupGloo")), None)
        call = CollectiveCall(name, _group_ranks(group))
        for recording in _AUDITOR.recordings:
            recording.append(call)
        _AUDITOR.set_status(Wait(WaitKind.COLLECTIVE, call.describe(), call.group_ranks).to_line())
        if _AUDITOR.before is not None:
            _AUDITOR.before(group)
        try:
            result = original(*args, **kwargs)
        finally:
            _AUDITOR.set_status("")
        for hook in _AUDITOR.after:
            hook(call.name, call.group_ranks)
        return result

    collective.__mnnvl_audit__ = True  # type: ignore[attr-defined]
    return collective


def install(status_path: str | None = None) -> None:
    """Wrap torch.distributed's collectives in this process (idempotent)."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    _AUDITOR.status_path = status_path
    if _AUDITOR.installed:
        return
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None or getattr(original, "__mnnvl_audit__", False):
            continue
        wrapped = _wrap(name, original)
        setattr(dist, name, wrapped)
        if getattr(c10d, name, None) is original:
            setattr(c10d, name, wrapped)
    _AUDITOR.installed = True


def ensure_installed() -> None:
    """Wrap the collectives if nothing has yet, keeping any status file already set."""
    if not _AUDITOR.installed:
        install(_AUDITOR.status_path)


def set_before_collective(hook: Callable[[Any], None] | None) -> None:
    """Run ``hook(group)`` before every audited collective (``None`` removes it)."""
    _AUDITOR.before = hook


def add_after_collective(hook: Callable[[str, tuple[int, ...]], None]) -> None:
    """Run ``hook(name, group_ranks)`` after every audited collective that returned (once per hook)."""
    if hook not in _AUDITOR.after:
        _AUDITOR.after.append(hook)


@contextmanager
def recording() -> Iterator[list[CollectiveCall]]:
    """Collect every collective issued inside the block, in order (nesting is allowed)."""
    calls: list[CollectiveCall] = []
    _AUDITOR.recordings.append(calls)
    try:
        yield calls
    finally:
        _AUDITOR.recordings.remove(calls)


def set_waiting(kind: WaitKind, text: str, peers: Sequence[int] | None) -> None:
    """Rank side: this rank now waits for ``peers`` (the sim's flag waits; collectives are wrapped)."""
    _AUDITOR.set_status(Wait(kind, text, tuple(peers) if peers is not None else None).to_line())


def clear_waiting() -> None:
    """Rank side: the wait :func:`set_waiting` announced is over."""
    _AUDITOR.set_status("")


def waiting_in(status_path: str) -> Wait | None:
    """Parent side: what a rank waits for and has not stopped waiting for (a collective, a peer's flag), or None."""
    try:
        with open(status_path, encoding="utf-8", errors="replace") as f:
            return Wait.from_line(f.read())
    except OSError:
        return None


def blocked_in(status_path: str) -> str:
    """Parent side: the text of :func:`waiting_in` (``torch.distributed.barrier(group=[0, 1])``), or ``""``."""
    wait = waiting_in(status_path)
    return wait.text if wait is not None else ""
