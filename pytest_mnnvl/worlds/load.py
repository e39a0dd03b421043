"""Which worlds of an xdist session are computing right now: the board a rank reads to size its thread pool.

The static share (usable cores // (ranks × xdist workers)) assumes every worker always runs a world of that
size. In practice workers run smaller or larger worlds, wait for the zygote, or run out of tests: the last long
test of a session then computes on one thread per rank while most of the machine is idle. The board is a small
shared file, one byte per xdist worker (its *slot*): how many ranks of the world that worker is running a call on
now, 0 while it runs none. The xdist controller makes it at session start, clears the slot of a worker that dies
and removes the file at the session's end; a worker marks its slot around each world call (:class:`Seat`); each
rank of that session reads the sum (:class:`pytest_mnnvl.worlds.threads.Follower`). One byte per slot: a store of
one byte is never torn, so no lock is needed, and a reader is off by at most the calls starting or ending as it reads.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

#: Slots on a board: xdist worker ``gwN`` takes slot ``N % SLOTS`` (a replacement worker's new number wraps).
SLOTS = 256
#: The board's path in the environment of a rank that follows it.
BOARD_ENV = "PYTEST_MNNVL_LOAD_BOARD"
#: The key of ``workerinput`` the path travels under to the xdist workers.
WIRE = "mnnvl_load_board"
#: The most ranks one slot holds (a byte).
MAX_RANKS = 255


class LoadBoard:
    """The board's file, mapped: :meth:`create` by the controller (which owns and removes it), :meth:`open` by a
    worker or a rank."""

    def __init__(self, path: str, mapped: mmap.mmap, owner: bool) -> None:
        self.path = path
        self._mapped = mapped
        self._owner = owner

    @classmethod
    def create(cls, directory: str | None = None) -> LoadBoard:
        fd, path = tempfile.mkstemp(prefix="mnnvl-load-", suffix=".board", dir=directory)
        try:
            os.ftruncate(fd, SLOTS)
            mapped = mmap.mmap(fd, SLOTS)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return cls(path, mapped, owner=True)

    @classmethod
    def open(cls, path: str, writable: bool = False) -> LoadBoard:
        """The board at ``path``; OSError where it is gone or not a board (its size says)."""
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size != SLOTS:
                raise OSError(f"{path} is not a load board: {size} bytes, a board has {SLOTS}")
            mapped = mmap.mmap(fd, SLOTS, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
        finally:
            os.close(fd)
        return cls(path, mapped, owner=False)

    def busy_ranks(self) -> int:
        """Ranks of this session computing now, over every worker."""
        return sum(self._mapped[:SLOTS])

    def mark(self, slot: int, ranks: int) -> None:
        """Worker ``slot`` runs a call on ``ranks`` ranks now (0: none)."""
        self._mapped[slot % SLOTS] = max(0, min(MAX_RANKS, ranks))

    def close(self) -> None:
        """Unmap; the owner also removes the file."""
        with contextlib.suppress(ValueError, BufferError):
            self._mapped.close()
        if self._owner:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def slot_of(worker_id: str) -> int | None:
    """xdist worker ``gw3``'s slot (3), or None for a name xdist does not give."""
    number = worker_id[2:] if worker_id.startswith("gw") else ""
    return int(number) % SLOTS if number.isascii() and number.isdigit() else None


@dataclass
class Seat:
    """A worker's slot on the session's board: marked while one of its worlds runs a call."""

    board: LoadBoard
    slot: int

    @contextlib.contextmanager
    def computing(self, ranks: int) -> Iterator[None]:
        self.board.mark(self.slot, ranks)
        try:
            yield
        finally:
            self.board.mark(self.slot, 0)
