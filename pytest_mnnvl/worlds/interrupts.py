"""SIGINT and SIGTERM while a session or a CLI command holds rank worlds: one clean stop, and say so.

SIGTERM is what ``timeout``, CI cancellation and ``docker stop`` send, and by default it ends Python on
the spot: no summary, no report, world directories left behind. While a :class:`Guard` is installed:

- the first SIGINT or SIGTERM raises ``KeyboardInterrupt("SIGTERM")`` in the main thread, so pytest (or
  the CLI) stops the way a Ctrl-C stops it: summaries, report, ranks stopped, directories removed;
- once the end has begun (:meth:`Guard.finishing`: pytest is reporting and tearing down), and for any
  second signal, nothing is raised: the signal is recorded, so the end cannot be cut short half-way
  (a report half written, ranks orphaned by a teardown that never finished). A second signal makes the
  pool kill the ranks without their grace periods (:func:`hurry`);
- the third ends the process at once, by that signal's default action.

Inside :func:`deferred` (the pool's teardown) even the first signal waits for the block to end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

#: The signals a guard takes over, in the order their names are tried.
SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: This many signals end the process at once (default action), whatever it is doing.
ABORT_AT = 3

_active: Guard | None = None


@dataclass(frozen=True)
class Interruption:
    """Why a session ended before its tests did: the signals received, in order, and what stopped it."""

    signals: tuple[str, ...]
    #: What pytest saw stop the run (``KeyboardInterrupt: SIGTERM``, ``Exit: ...``), or the first signal's name.
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"signals": list(self.signals), "reason": self.reason}

    def describe(self) -> str:
        if not self.signals:
            return f"interrupted ({self.reason})"
        more = f" ({len(self.signals)} signals)" if len(self.signals) > 1 else ""
        return f"interrupted by {self.signals[0]}{more}"


class Guard:
    """Owns SIGINT/SIGTERM between :meth:`install` and :meth:`restore` (see the module docstring); also
    records, installed or not, what pytest said stopped the session (:meth:`stopped`)."""

    def __init__(self) -> None:
        self.signals: list[str] = []
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}
        self._outer: Guard | None = None
        self._finishing = False
        self._depth = 0
        self._pending: str | None = None

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> bool:
        """Take the signals (idempotent); only the main thread can, so elsewhere this does nothing."""
        global _active
        if self.installed:
            return True
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._outer, _active = _active, self
        return True

    def restore(self) -> None:
        """Give the signals back to whoever had them before :meth:`install`."""
        global _active
        for sig, handler in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
        self._previous.clear()
        if _active is self:
            _active = self._outer

    def finishing(self) -> None:
        """From now on no signal raises: the session is writing its summaries and report, and tearing down."""
        self._finishing = True

    def stopped(self, reason: str) -> None:
        """What ended the run early, as pytest saw it (the first one counts)."""
        if self.reason is None:
            self.reason = reason

    def interruption(self) -> Interruption | None:
        if not self.signals and self.reason is None:
            return None
        return Interruption(tuple(self.signals), self.reason or f"{self.signals[0]} received")

    def exit_status(self, default: int = 130) -> int:
        """The shell's status for a process the first signal ended: 128 + its number."""
        return 128 + signal.Signals[self.signals[0]].value if self.signals else default

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        self.signals.append(name)
        if len(self.signals) >= ABORT_AT:
            _say(f"mnnvl: {name} again: ending now")
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self._finishing or len(self.signals) > 1:
            if len(self.signals) == 2:
                _say(f"mnnvl: {name}: stopping the ranks without waiting; one more ends the process at once")
            return
        if self._depth:
            self._pending = name
            return
        raise KeyboardInterrupt(name)


def _say(text: str) -> None:
    # os.write, not print: a handler may run in the middle of another write to the same stream.
    with contextlib.suppress(OSError):
        os.write(2, f"\n{text}\n".encode())


def hurry() -> bool:
    """A second signal came: whoever is stopping processes should not wait for them to leave politely."""
    return _active is not None and len(_active.signals) >= 2


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block that a first signal must not cut in two (stopping ranks and removing their directory): the
    ``KeyboardInterrupt`` comes when the block ends."""
    guard = _active
    if guard is None:
        yield
        return
    guard._depth += 1
    try:
        yield
    finally:
        guard._depth -= 1
        if guard._depth == 0 and guard._pending is not None:
            pending, guard._pending = guard._pending, None
            if not guard._finishing:
                raise KeyboardInterrupt(pending)


@contextlib.contextmanager
def guarded() -> Iterator[Guard]:
    """A guard for the length of a block (the CLI's commands)."""
    guard = Guard()
    guard.install()
    try:
        yield guard
    finally:
        guard.restore()
