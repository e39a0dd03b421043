"""CUDA MPS for the flashinfer ranks (``--mnnvl-mps=auto|off|start``).

Several ranks time-slice one GPU unless CUDA's Multi-Process Service merges their work (a 64-token round trip at
hidden 2048 took 12.8 ms on 2 ranks and 31.5 ms on 4 without MPS, 4.2 and 5.6 ms with it, one H200). What this
module relies on, as seen with the CUDA 13.0 control program on that H200 (driver 580.159.04):

* At its first CUDA call a process connects to the control daemon whose Unix socket ``control`` lies in
  ``CUDA_MPS_PIPE_DIRECTORY`` (default ``/tmp/nvidia-mps``); when that fails it runs without MPS. So ``off``
  points the ranks at an empty directory of this session's: a rank there ran beside a live MPS server, without it.
* ``echo get_server_list | nvidia-cuda-mps-control`` exits 0 when a daemon answers at that directory and 1
  (``Cannot find MPS control daemon process``) when none does, stale socket files included: the detection.
* Two control daemons cannot both serve one GPU: while one's server ran, a client of a second daemon failed with
  ``CUDA-capable device(s) is/are busy or unavailable``. So ``start`` refuses where a daemon already answers.
* FlashInfer's combine kernel has every block spin on its peers' flags. Under MPS the ranks' kernels share the
  SMs, so the blocks of some ranks can fill the GPU while the peers they wait for cannot get an SM: a 4-rank
  world on one H200 hung in DeepSeek-sized round trips (hidden 7168) under MPS and passed time-sliced. So a rank
  of a world with ``k`` ranks per GPU gets ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=100//k`` (unless it is set
  already): each rank's kernels then fit beside its peers' (:meth:`MpsState.rank_env`).
* ``nvidia-cuda-mps-control -f`` runs the daemon in the foreground (it then logs to stdout, not to
  ``CUDA_MPS_LOG_DIRECTORY``); ``quit`` ends it and its server in under a second and leaves its socket files
  behind. A private daemon is therefore kept by :mod:`pytest_mnnvl.worlds._mps_keeper`, a child process that quits it
  and removes its directories when the session ends or dies.

``auto`` (the default) starts nothing: the ranks inherit the session's environment, so a running daemon is used
and its state is only reported. Nothing here ever quits or changes a daemon this session did not start. The
control program's path is a parameter everywhere (found on ``PATH`` by default), so that the lifecycle can be
tested on machines without NVIDIA's driver.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pytest_mnnvl.probes.probe import Probe
from pytest_mnnvl.worlds import _mps_keeper

MODES = ("auto", "off", "start")
CONTROL = "nvidia-cuda-mps-control"
DEFAULT_PIPE_DIRECTORY = "/tmp/nvidia-mps"
PIPE_ENV = _mps_keeper.PIPE_ENV
LOG_ENV = _mps_keeper.LOG_ENV
#: A client's share of the GPU's SMs under MPS, read when its CUDA context is created.
ACTIVE_THREAD_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
#: How long a private daemon may take to open its control socket.
START_TIMEOUT_S = 15.0
#: How long ``get_server_list`` may take to answer.
QUERY_TIMEOUT_S = 5.0
#: Longest AF_UNIX path (``sun_path`` is 108 bytes with its NUL); the daemon's longest socket name is 18 bytes.
_MAX_SOCKET_PATH = 107
_LONGEST_SOCKET = "pipe/control_privileged"


class MpsStartError(RuntimeError):
    """``--mnnvl-mps=start`` could not start its daemon: the command and what it said."""


@dataclass(frozen=True)
class MpsState:
    """Whether the flashinfer ranks of this session run under MPS, and why.

    ``on`` is None where it cannot be told (a control socket but no control program to ask). ``env`` is what
    each rank's environment gets on top of the session's (empty: the ranks inherit it)."""

    mode: str
    on: bool | None
    reason: str
    env: tuple[tuple[str, str], ...] = ()
    #: The private daemon's pid (``start`` only).
    started_pid: int | None = None

    def label(self) -> str:
        return {True: "MPS on", False: "MPS off", None: "MPS unknown"}[self.on]

    def rank_env(self, ranks_per_gpu: int, environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
        """What a rank of a world with ``ranks_per_gpu`` ranks per GPU gets on top of ``environ``: :attr:`env`,
        and where MPS may be on, that rank's share of the SMs (so that spinning peers cannot starve it)."""
        env = dict(self.env)
        if self.on is not False and ranks_per_gpu > 1 and ACTIVE_THREAD_ENV not in environ:
            env[ACTIVE_THREAD_ENV] = str(100 // ranks_per_gpu)
        return tuple(sorted(env.items()))

    def describe(self) -> str:
        return f"{self.label()} (--mnnvl-mps={self.mode}: {self.reason})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "on": self.on,
            "reason": self.reason,
            "env": dict(self.env),
            "started_pid": self.started_pid,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MpsState:
        env = tuple(sorted((str(k), str(v)) for k, v in dict(data.get("env") or {}).items()))
        return cls(str(data["mode"]), data["on"], str(data["reason"]), env, data.get("started_pid"))


def find_control(path: str | None = None) -> str | None:
    """``nvidia-cuda-mps-control`` on ``path`` (default ``PATH``), or None."""
    return shutil.which(CONTROL, path=path)


def pipe_directory(environ: Mapping[str, str]) -> str:
    return environ.get(PIPE_ENV) or DEFAULT_PIPE_DIRECTORY


def daemon_answers(control: str, pipe_dir: str, timeout: float = QUERY_TIMEOUT_S) -> Probe[bool | None]:
    """Ask ``control`` whether a daemon answers at ``pipe_dir`` (``get_server_list``; changes nothing)."""
    env = dict(os.environ, **{PIPE_ENV: pipe_dir})
    command = f"echo get_server_list | {control}"
    try:
        done = subprocess.run(
            [control], input=b"get_server_list\n", env=env, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return Probe(None, f"`{command}` gave no answer within {timeout:g} s")
    except OSError as exc:
        return Probe(None, f"`{command}` could not run: {exc}")
    said = (done.stdout + done.stderr).decode(errors="replace").strip()
    if done.returncode == 0:
        return Probe(True, f"a control daemon answers at {pipe_dir}")
    return Probe(False, f"no control daemon answers at {pipe_dir} (`{command}`: {said or f'exit {done.returncode}'})")


def detect(environ: Mapping[str, str], control: str | None) -> Probe[bool | None]:
    """Whether the session's environment leads a CUDA process to a running MPS control daemon."""
    pipe_dir = pipe_directory(environ)
    if not os.path.exists(os.path.join(pipe_dir, _mps_keeper.CONTROL_SOCKET)):
        return Probe(False, f"no MPS control daemon ({pipe_dir}/control is absent)")
    if control is None:
        return Probe(None, f"{pipe_dir}/control exists, but {CONTROL} is not on PATH to ask whether a daemon answers")
    return daemon_answers(control, pipe_dir)


def _socket_fits(root: str) -> bool:
    return len(os.fsencode(os.path.join(root, _LONGEST_SOCKET))) <= _MAX_SOCKET_PATH


def make_root(base: str | None, prefix: str = "mnnvl-mps-") -> str:
    """A new directory under ``base`` (the session's temporary directory), or under the system's temporary
    directory when ``base`` is too deep for the daemon's sockets (``sun_path``)."""
    if base is not None:
        root = tempfile.mkdtemp(prefix=prefix, dir=base)
        if _socket_fits(root):
            return root
        os.rmdir(root)
    root = tempfile.mkdtemp(prefix=prefix)
    if not _socket_fits(root):
        os.rmdir(root)
        raise MpsStartError(f"no temporary directory short enough for MPS sockets: {root!r} is too long")
    return root


class PrivateDaemon:
    """An MPS control daemon of this session, kept by :mod:`pytest_mnnvl.worlds._mps_keeper` in its own session so
    that it is quit and its directory removed at the end, also when this process is SIGKILLed."""

    def __init__(self, control: str, root: str, keeper: subprocess.Popen[bytes], pid: int) -> None:
        self.control = control
        self.root = root
        self.pipe_dir = os.path.join(root, "pipe")
        self.log_dir = os.path.join(root, "log")
        self.pid = pid
        self._keeper: subprocess.Popen[bytes] | None = keeper
        self.stopped: str | None = None

    @classmethod
    def start(cls, control: str, root: str, timeout: float = START_TIMEOUT_S) -> PrivateDaemon:
        """Start ``control -f`` with its pipe and log directories under ``root``; raise :class:`MpsStartError`
        (the command and its output) when it does not come up within ``timeout``."""
        command = [sys.executable, "-I", "-S", _mps_keeper.__file__, control, root, f"{timeout:g}"]
        shown = f"{PIPE_ENV}={root}/pipe {LOG_ENV}={root}/log {control} -f"
        try:
            keeper = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as exc:
            raise MpsStartError(f"--mnnvl-mps=start: could not run `{shown}`: {exc}") from None
        assert keeper.stdout is not None
        line = _read_line(keeper, timeout + 5.0)
        if line.startswith("ready "):
            daemon = cls(control, root, keeper, int(line.split()[1]))
            atexit.register(daemon.stop)
            return daemon
        rest = _drain(keeper)
        shutil.rmtree(root, ignore_errors=True)
        said = (line.removeprefix("failed ") + (" " + rest if rest else "")).strip()
        raise MpsStartError(f"--mnnvl-mps=start: `{shown}` did not start: {said or 'no answer'}")

    def env(self) -> tuple[tuple[str, str], ...]:
        return ((LOG_ENV, self.log_dir), (PIPE_ENV, self.pipe_dir))

    def stop(self, timeout: float = 30.0) -> str:
        """Quit the daemon and remove its directories (idempotent); what happened, in words."""
        keeper, self._keeper = self._keeper, None
        if keeper is None:
            return self.stopped or "already stopped"
        assert keeper.stdin is not None
        with contextlib.suppress(OSError):
            keeper.stdin.write(b"stop\n")
            keeper.stdin.close()
        line = _read_line(keeper, timeout)
        try:
            keeper.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            # A keeper that hangs: end it and what it started (its own session, its own process group).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(keeper.pid, 9)
            keeper.wait()
        if keeper.stdout is not None:
            keeper.stdout.close()
        shutil.rmtree(self.root, ignore_errors=True)
        self.stopped = line.removeprefix("stopped ") or "the keeper gave no answer"
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        return self.stopped


def _read_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    """One line of ``process``'s stdout within ``timeout`` ('' if none came)."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], min(left, 0.2))
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _drain(process: subprocess.Popen[bytes]) -> str:
    try:
        process.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    assert process.stdout is not None
    with contextlib.suppress(OSError, ValueError):
        rest = process.stdout.read().decode(errors="replace").strip()
        process.stdout.close()
        return rest
    return ""


class MpsSession:
    """What this session did about MPS: its :class:`MpsState`, and what :meth:`close` must undo."""

    def __init__(self, state: MpsState, daemon: PrivateDaemon | None = None, scratch: str | None = None) -> None:
        self.state = state
        self.daemon = daemon
        self._scratch = scratch

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def open_session(
    mode: str,
    gpu: bool,
    environ: Mapping[str, str],
    control: str | None,
    tmp_base: str | None,
    start_timeout: float = START_TIMEOUT_S,
    idle_reason: str = "not used: the ranks run no GPU (backend sim)",
) -> MpsSession:
    """Apply ``--mnnvl-mps=mode`` for a session whose ranks run on GPUs (``gpu``) or not (``idle_reason``
    says why). ``control`` is the control program (None: not installed); ``tmp_base`` is where directories
    go. Raises :class:`MpsStartError`."""
    if mode not in MODES:
        raise ValueError(f"--mnnvl-mps={mode!r} is not valid; allowed: {', '.join(MODES)}")
    if not gpu:
        return MpsSession(MpsState(mode, False, idle_reason))
    found = detect(environ, control)
    if mode == "auto":
        why = {
            True: f"{found.reason}, not started by this session: the ranks use it",
            False: f"{found.reason}; none is started in auto mode",
            None: found.reason,
        }[found.value]
        return MpsSession(MpsState(mode, found.value, why))
    if mode == "off":
        scratch = make_root(tmp_base, "mnnvl-no-mps-")
        reason = f"the ranks' {PIPE_ENV} is an empty directory, so CUDA finds no control daemon"
        if found.value:
            reason += (
                f"; {found.reason} and is left alone (a GPU in EXCLUSIVE_PROCESS mode would then refuse the ranks)"
            )
        return MpsSession(MpsState(mode, False, reason, ((PIPE_ENV, scratch),)), scratch=scratch)
    if control is None:
        raise MpsStartError(
            f"--mnnvl-mps=start: {CONTROL} is not on PATH (it comes with the NVIDIA driver); use --mnnvl-mps=auto "
            "or --mnnvl-mps=off"
        )
    if found.value:
        raise MpsStartError(
            f"--mnnvl-mps=start: {found.reason}, not started by this session (left alone); a second daemon's "
            "server cannot share a GPU with it (CUDA: 'CUDA-capable device(s) is/are busy or unavailable'); use "
            "--mnnvl-mps=auto to run on it"
        )
    daemon = PrivateDaemon.start(control, make_root(tmp_base), start_timeout)
    reason = f"private daemon (pid {daemon.pid}) at {daemon.root}, started by this session and stopped at its end"
    return MpsSession(MpsState(mode, True, reason, daemon.env(), daemon.pid), daemon=daemon)
