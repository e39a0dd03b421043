"""The report path's advisory lock: two sessions given the same ``--mnnvl-report`` are told so at start, not
surprised at the end when the last one to finish has overwritten the other's report.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


class ReportLock:
    """``PATH.lock``, held (``flock``) for the session: a second session given the same report path finds it
    held and is told by whom. Advisory: it only warns; the last session to finish writes the report."""

    def __init__(self, path: str) -> None:
        self.path = os.path.realpath(path) + ".lock"
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """None when this session now holds the lock (or locks cannot be taken there); else who holds it."""
        try:
            import fcntl
        except ImportError:
            return None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "its pid not written yet"
                os.close(fd)
                return holder
            except OSError:  # no locks on this filesystem (ENOLCK): nothing to warn with
                os.close(fd)
                return None
            try:
                current = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except OSError:
                current = False
            if not current:  # its holder released and removed it after we opened it: lock the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            since = datetime.datetime.now().isoformat(timespec="seconds")
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n".encode())
            self._fd = fd
            return None
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it: whoever opens the path next gets a new file
        os.close(self._fd)
        self._fd = None
