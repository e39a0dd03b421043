"""The keeper of a private CUDA MPS control daemon (``--mnnvl-mps=start``); run as a file, standard library only.

``python _mps_keeper.py CONTROL ROOT START_TIMEOUT`` starts ``CONTROL -f`` (the control daemon in the
foreground, so that it stays this process's child) with ``CUDA_MPS_PIPE_DIRECTORY=ROOT/pipe`` and
``CUDA_MPS_LOG_DIRECTORY=ROOT/log``, waits for its control socket, and answers ``ready PID`` on stdout. It then
waits for the session on stdin: a ``stop`` line, or end of file, which is what the session's death looks like,
SIGKILL included (the session holds the only write end of that pipe), or a SIGTERM of its own. Either way it
sends ``quit`` through ``CONTROL`` with the same directories (the daemon stops its MPS servers and exits), ends
the daemon with SIGTERM then SIGKILL if it is still there, removes ROOT, and answers ``stopped HOW``.

It only ever talks to the daemon it started: every command it runs names ROOT's pipe directory.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time

PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
LOG_ENV = "CUDA_MPS_LOG_DIRECTORY"
#: The daemon's Unix socket in its pipe directory; it exists once the daemon accepts clients (~25 ms on an H200).
CONTROL_SOCKET = "control"
#: The foreground daemon logs to stdout (``-d`` writes ``control.log`` itself): kept under this name.
LOG_FILE = "control.log"
QUIT_TIMEOUT_S = 10.0
EXIT_GRACE_S = 10.0
TERM_GRACE_S = 2.0


def _say(line: str) -> None:
    """One line to the session; it may be gone (SIGKILLed), which must not stop the cleanup."""
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, OSError):
        pass


def _log_tail(log_dir: str, limit: int = 2000) -> str:
    try:
        with open(os.path.join(log_dir, LOG_FILE), encoding="utf-8", errors="replace") as f:
            return f.read()[-limit:].strip()
    except OSError:
        return ""


def _term_with_keeper() -> None:
    """In the daemon, before exec: SIGTERM when this keeper dies (even SIGKILLed), so it never outlives us."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _quit(control: str, env: dict[str, str], daemon: subprocess.Popen[bytes], ask: bool = True) -> str:
    """``echo quit | CONTROL``, then wait; SIGTERM, then SIGKILL, whatever is still running. A daemon that
    has no socket yet cannot be asked (``ask=False``): it gets SIGTERM at once."""
    if daemon.poll() is not None:
        return f"the daemon had already exited ({daemon.returncode})"
    if not ask:
        return _signal_until_gone(daemon, "no socket yet", ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, 5.0)))
    how = "quit"
    try:
        subprocess.run(
            [control],
            input=b"quit\n",
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=QUIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        how = f"quit failed ({type(exc).__name__})"
    steps = ((None, EXIT_GRACE_S), (signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, 5.0))
    return _signal_until_gone(daemon, how, steps)


def _signal_until_gone(
    daemon: subprocess.Popen[bytes], how: str, steps: tuple[tuple[signal.Signals | None, float], ...]
) -> str:
    for sig, grace in steps:
        if sig is not None:
            daemon.send_signal(sig)
            how += f", then {sig.name}"
        try:
            daemon.wait(timeout=grace)
            return how
        except subprocess.TimeoutExpired:
            continue
    return how + " (still running)"


class _TermFlag:
    """SIGTERM only sets a flag and writes to a wake-up pipe the wait selects on: the handler never raises,
    so a signal that lands anywhere (mid-``write``, before the wait) cannot skip the cleanup."""

    def __init__(self) -> None:
        self.got = False
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum: int, frame: object) -> None:
        self.got = True
        with contextlib.suppress(OSError):
            os.write(self.write_fd, b"t")


def _wait(daemon: subprocess.Popen[bytes], term: _TermFlag) -> str:
    while True:
        if term.got:
            return "the keeper got SIGTERM"
        ready, _, _ = select.select([0, term.read_fd], [], [], 0.5)
        if term.got:
            return "the keeper got SIGTERM"
        if 0 in ready:
            data = os.read(0, 4096)
            if not data:
                return "the session is gone"
            if b"stop" in data:
                return "the session asked"
        if daemon.poll() is not None:
            return f"the daemon exited by itself ({daemon.returncode})"


def main(argv: list[str]) -> int:
    control, root, start_timeout = argv[0], argv[1], float(argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the session's to handle
    term = _TermFlag()
    term.install()
    pipe_dir, log_dir = os.path.join(root, "pipe"), os.path.join(root, "log")
    env = dict(os.environ, **{PIPE_ENV: pipe_dir, LOG_ENV: log_dir})
    try:
        os.makedirs(pipe_dir, exist_ok=True)
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, LOG_FILE), "ab") as log:
            daemon = subprocess.Popen(
                [control, "-f"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_term_with_keeper,
            )
    except OSError as exc:
        _say(f"failed {type(exc).__name__}: {exc}")
        shutil.rmtree(root, ignore_errors=True)
        return 1
    deadline = time.monotonic() + start_timeout
    while not os.path.exists(os.path.join(pipe_dir, CONTROL_SOCKET)):
        code = daemon.poll()
        if term.got:
            how = _quit(control, env, daemon, ask=False)
            shutil.rmtree(root, ignore_errors=True)
            _say(f"stopped the keeper got SIGTERM while the daemon started: {how}")
            return 0
        if code is not None or time.monotonic() >= deadline:
            what = f"exited with status {code}" if code is not None else f"made no socket in {start_timeout:g} s"
            if code is None:
                _quit(control, env, daemon, ask=False)
            _say(f"failed the daemon {what}; its output: {_log_tail(log_dir) or '(none)'}")
            shutil.rmtree(root, ignore_errors=True)
            return 1
        time.sleep(0.01)
    _say(f"ready {daemon.pid}")
    why = _wait(daemon, term)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the cleanup is what a SIGTERM asks for: let it finish
    how = _quit(control, env, daemon)
    shutil.rmtree(root, ignore_errors=True)
    _say(f"stopped {why}: {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
