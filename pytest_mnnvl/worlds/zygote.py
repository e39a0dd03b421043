"""A warm parent that forks a CPU world's ranks: torch and FlashInfer are imported once, not once per rank.

A spawned rank spends most of its start importing torch, FlashInfer and the sim (about 3 s of CPU each, more
with a CUDA build of torch); a world of 4 ranks pays that 4 times, and xdist workers starting worlds at once
pay it on every core. A zygote is started once per pool and rank environment, imports what the ranks import
(:data:`PRELOAD`, and the backend's ``preload()``), then forks each rank on request: the child takes its own
session (process group), its output pipe, its environment and its torch thread count, and runs the same
:func:`pytest_mnnvl.worlds.rank.main` a spawned rank runs.

Only where forking is safe and equivalent to spawning: the ``sim`` and ``plain`` backends (never CUDA: a
forked CUDA context is unusable); ranks whose torch thread count the harness chose, at most the usable cores
(applied with ``torch.set_num_threads`` after the fork, as torch would have read ``OMP_NUM_THREADS`` at import; a
user's own setting is read by torch itself, so those ranks are spawned); and a zygote that is still one thread with
CUDA untouched after its imports (else it says why and every rank is spawned as before). The zygote imports with
:data:`IMPORT_ENV`, no GPU visible and torch's NVML availability check: on a host with an NVIDIA driver FlashInfer's
and tvm-ffi's import-time ``torch.cuda.is_available()`` would otherwise call ``cuInit``, which starts the driver's
own thread even with no GPU visible (measured on an H200 host), and with one visible FlashInfer reads its
capability, initializing CUDA. A CPU rank never uses what those imports compute from the GPU (FlashInfer's JIT
target architectures); it gets its whole environment back, and the driver, if it is ever used, starts in the rank.
``PYTEST_MNNVL_ZYGOTE=0`` turns it off.

The zygote reaps its children and sends each exit status to the pool, which sees a forked rank through
:class:`ForkedProcess` exactly as it sees a ``subprocess.Popen``: pid, ``poll``, ``wait``, ``stdout``. It dies
with the pool (``PR_SET_PDEATHSIG``), and its ranks die with it.

Under xdist the controller starts one more, the session's :class:`SharedZygote`, as its workers start: its
import then runs once per machine, while the workers start and collect, instead of once per worker after that
(the serial part of a worker's first world). A worker forks from it the ranks whose environment is the one it
imported with (:func:`key_of`, less what xdist sets per worker: :data:`PER_PROCESS`), and from a zygote of its own
any other; one it cannot use (refused, gone) is counted and replaced by its own. The shared zygote listens on an
abstract socket, serves connections from its own user only, kills what it forked for a worker whose connection
closes, and dies with the controller.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import pickle
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any

#: Turns the zygote off (``0``); anything else, or unset, leaves it on.
ZYGOTE_ENV = "PYTEST_MNNVL_ZYGOTE"
#: Backends whose ranks may be forked (no GPU is touched in them).
FORKABLE_BACKENDS = ("sim", "plain")
#: What every rank imports before its first call.
PRELOAD = ("torch", "torch.distributed", "pytest_mnnvl.worlds.rank", "pytest_mnnvl.worlds.layout")
#: Variables that differ between the ranks of one zygote, or between the tests that start them (pytest's
#: ``PYTEST_CURRENT_TEST``); every other variable keys the zygote. Each rank still gets its whole environment.
PER_RANK = ("PYTEST_MNNVL_RANK_BOOT", "PYTEST_MNNVL_RANK", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTEST_CURRENT_TEST")
#: Variables xdist sets in its workers (the worker's id and count, the run's id, the controller's terminal size):
#: the session's shared zygote, started without them, serves every worker (no import reads them; each rank still
#: gets its own).
PER_PROCESS = ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID", "COLUMNS", "LINES")
#: The zygote's own environment for its imports (never its ranks'): no GPU, and torch's availability check by NVML
#: (which, with no GPU visible, asks nothing), so no import reaches ``cuInit`` and its driver thread.
IMPORT_ENV = {"CUDA_VISIBLE_DEVICES": "", "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
#: How long a zygote may take to import (a cold page cache and a CUDA build of torch on a busy machine).
READY_TIMEOUT_S = 120.0
_HEADER = struct.Struct("!I")


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get(ZYGOTE_ENV, "1").strip() != "0"


def key_of(env: Mapping[str, str], cwd: str) -> str:
    """What makes two ranks' zygote the same (a digest): their environment less :data:`PER_RANK` and
    :data:`PER_PROCESS`, and the working directory (the first entry of a ``-m`` interpreter's ``sys.path``, and
    where a rank function's relative paths point)."""
    items = [("", cwd), *sorted((k, v) for k, v in env.items() if k not in PER_RANK and k not in PER_PROCESS)]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


# ---- the pool's side -------------------------------------------------------------------------------


class ZygoteUnavailable(Exception):
    """The zygote could not start, or refused to fork (its reason): the ranks are spawned instead."""


class ForkedProcess:
    """A rank forked by a zygote, seen as the pool sees a ``subprocess.Popen``."""

    def __init__(self, pid: int, stdout: IO[bytes], zygote: Zygote) -> None:
        self.pid = pid
        self.stdout = stdout
        self._zygote = zygote
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"rank pid {self.pid}", timeout or 0.0)
            self._zygote.wait_for_exit(min(left, 0.05) if left is not None else 0.05)
        assert self.returncode is not None
        return self.returncode


def _launch(
    env: Mapping[str, str], backend: str, cwd: str, sock: socket.socket, output: IO[bytes]
) -> subprocess.Popen[bytes]:
    """A zygote process serving ``sock`` (a connection, or a listening socket it accepts connections on)."""
    child_env = {k: v for k, v in env.items() if k not in PER_RANK}
    # One thread while importing (OpenBLAS, OpenMP): forking a process with other threads is unsafe.
    child_env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **IMPORT_ENV)
    return subprocess.Popen(
        [sys.executable, "-m", "pytest_mnnvl.worlds.zygote", str(sock.fileno()), backend],
        env=child_env,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT,
        pass_fds=(sock.fileno(),),
        start_new_session=True,
        cwd=cwd,
    )


class Zygote:
    """A connection to a zygote: one this pool started (:meth:`start`, its own process), or the session's
    shared one (:meth:`connect`, started by the session's main process); ready once its imports are done."""

    def __init__(
        self, sock: socket.socket, process: subprocess.Popen[bytes] | None, output: IO[bytes] | str, what: str
    ) -> None:
        self._sock = sock
        #: The zygote's process where this pool started it (None: the session's shared zygote).
        self.process = process
        #: Its output (import warnings, a crash): a file of ours, or the shared zygote's log by path.
        self._output = output
        self.what = what
        self.pid = process.pid if process is not None else 0
        #: Seconds its imports took (its own measure), and seconds this connection waited for it to be ready.
        self.import_s = 0.0
        self.waited_s = 0.0
        self._lock = threading.Lock()
        self._exited = threading.Condition()
        self._exits: dict[int, int] = {}
        self._replies: list[tuple[str, Any]] = []
        self._closed = False
        self._eof = False
        self._reader = threading.Thread(target=self._read, name="mnnvl-zygote-reader", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, env: Mapping[str, str], backend: str, cwd: str) -> Zygote:
        """A zygote of this pool's own, started with ``env`` (less :data:`PER_RANK`)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Its output goes to a file, read only to say why it failed: a pipe nobody reads would fill and stop it.
        output = tempfile.TemporaryFile()  # noqa: SIM115 - kept for the life of the zygote
        try:
            process = _launch(env, backend, cwd, theirs, output)
        except BaseException:
            ours.close()
            output.close()
            raise
        finally:
            theirs.close()
        zygote = cls(ours, process, output, "the zygote")
        zygote._await_ready()
        return zygote

    @classmethod
    def connect(cls, shared: SharedAddress) -> Zygote:
        """A connection to the session's shared zygote (it may still be importing: this waits for it)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(shared.address)
        except OSError as exc:
            sock.close()
            raise ZygoteUnavailable(f"the session's shared zygote cannot be reached: {exc}") from None
        zygote = cls(sock, None, shared.log, "the session's shared zygote")
        zygote._await_ready()
        return zygote

    def _await_ready(self) -> None:
        began = time.monotonic()
        try:
            kind, detail = self._reply(READY_TIMEOUT_S)
        except BaseException:  # an interrupt while it imports: nothing left running
            self.close()
            raise
        if kind != "ready":
            self.close()
            raise ZygoteUnavailable(str(detail))
        self.waited_s = time.monotonic() - began
        pid, import_s = detail
        self.pid, self.import_s = int(pid), float(import_s)

    @property
    def alive(self) -> bool:
        return not self._gone()

    def _gone(self) -> bool:
        return self._closed or self._eof or (self.process is not None and self.process.poll() is not None)

    def fork(self, env: Mapping[str, str], threads: int) -> ForkedProcess:
        """A new rank with ``env`` as its whole environment and ``threads`` torch threads."""
        read_end, write_end = os.pipe()
        try:
            with self._lock:
                _send(self._sock, ("fork", dict(env), threads), fds=[write_end])
                kind, detail = self._reply(10.0)
        except OSError as exc:
            os.close(read_end)
            raise ZygoteUnavailable(f"{self.what} is gone: {exc}") from None
        finally:
            os.close(write_end)
        if kind != "forked":
            os.close(read_end)
            raise ZygoteUnavailable(str(detail))
        return ForkedProcess(int(detail), os.fdopen(read_end, "rb"), self)

    def exit_code(self, pid: int) -> int | None:
        with self._exited:
            code = self._exits.get(pid)
            if code is None and self._gone() and not _exists(pid):
                # Our zygote died first (its children die with it: PDEATHSIG), or the shared zygote killed our
                # ranks when our connection closed.
                code = -signal.SIGKILL
            return code

    def wait_for_exit(self, timeout: float) -> None:
        with self._exited:
            self._exited.wait(timeout)

    def close(self) -> None:
        """Stop our zygote (its ranks, forked with PDEATHSIG on it, die with it), or leave the shared one (it kills
        the ranks it forked for us that are still running)."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if self.process is not None:
            _stop(self.process)
        if not isinstance(self._output, str):
            self._output.close()

    def output_tail(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            if isinstance(self._output, str):
                with open(self._output, "rb") as log:
                    return log.read().decode(errors="replace")[-2000:]
            self._output.seek(0)
            return self._output.read().decode(errors="replace")[-2000:]
        return ""

    def _reply(self, timeout: float) -> tuple[str, Any]:
        deadline = time.monotonic() + timeout
        with self._exited:
            while not self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self._gone():
                    ended = self._eof or (self.process is not None and self.process.poll() is not None)
                    output = self.output_tail() if ended else ""
                    state = "exited" if ended else f"no answer within {timeout:g} s"
                    return "error", f"{self.what} {state}" + (f":\n{output}" if output.strip() else "")
                self._exited.wait(min(left, 0.1))
            return self._replies.pop(0)

    def _read(self) -> None:
        while True:
            try:
                message = _receive(self._sock)
            except OSError:
                message = None
            with self._exited:
                if message is None:
                    self._eof = True
                    self._exited.notify_all()
                    return
                if message[0] == "exit":
                    self._exits[int(message[1])] = int(message[2])
                else:
                    self._replies.append(message)
                self._exited.notify_all()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5.0)


# ---- the session's shared zygote ---------------------------------------------------------------------


@dataclass(frozen=True)
class SharedAddress:
    """How an xdist worker reaches the session's shared zygote, and which rank environment it serves."""

    #: An abstract AF_UNIX name (leading NUL): no file to leave behind; peers of another user are turned away.
    address: str
    #: :func:`key_of` the environment it imported with: only ranks of that environment are forked from it.
    key: str
    #: Its output, read to say why it failed.
    log: str

    def to_dict(self) -> dict[str, str]:
        return {"address": self.address, "key": self.key, "log": self.log}

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> SharedAddress:
        return cls(str(data["address"]), str(data["key"]), str(data["log"]))


class SharedZygote:
    """The session's zygote, started by its main process (the xdist controller) as its workers start, so that
    the imports run once per machine while the workers start and collect, not once per worker after that.

    It is not waited for here: a worker's first world connects and waits for it to be ready. It serves every
    worker that connects from the same user, kills the ranks it forked for a worker whose connection closes (a
    worker that crashed), dies with the main process (PDEATHSIG), and is stopped by :meth:`close`."""

    def __init__(self, env: Mapping[str, str], backend: str, cwd: str, log_dir: str | None = None) -> None:
        name = f"\0mnnvl-zygote-{os.getpid()}-{secrets.token_hex(6)}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept for the life of the zygote
            prefix="mnnvl-zygote-", suffix=".log", dir=log_dir, delete=False
        )
        try:
            listener.bind(name)
            listener.listen(128)
            self.process = _launch(env, backend, cwd, listener, self._log)
        except BaseException:
            self._log.close()
            os.unlink(self._log.name)
            raise
        finally:
            listener.close()
        self.address = SharedAddress(name, key_of(env, cwd), self._log.name)

    def close(self) -> None:
        _stop(self.process)
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)


@dataclass
class RankStarts:
    """How a session's ranks started: forked from a zygote (whose), or spawned and why; summed over xdist
    workers by the controller."""

    #: Ranks forked from zygotes this process started, and how many it started.
    forked: int = 0
    zygotes: int = 0
    #: Ranks forked from the session's shared zygote, and how many processes (xdist workers) used it.
    forked_shared: int = 0
    shared_users: int = 0
    spawned: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Why a process could not use the shared zygote (it started its own instead).
    shared_failures: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Seconds the imports of this process's own zygotes took, summed; the shared zygote's import, and the longest
    #: a process waited for it (the serial part of its first world: what a worker's first test pays).
    import_s: float = 0.0
    shared_import_s: float = 0.0
    shared_wait_s: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.forked or self.forked_shared or self.spawned)

    def add(self, other: RankStarts) -> None:
        self.forked += other.forked
        self.zygotes += other.zygotes
        self.forked_shared += other.forked_shared
        self.shared_users += other.shared_users
        self.spawned.update(other.spawned)
        self.shared_failures.update(other.shared_failures)
        self.import_s += other.import_s
        self.shared_import_s = max(self.shared_import_s, other.shared_import_s)
        self.shared_wait_s = max(self.shared_wait_s, other.shared_wait_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "forked": self.forked,
            "zygotes": self.zygotes,
            "forked_shared": self.forked_shared,
            "shared_users": self.shared_users,
            "spawned": dict(self.spawned),
            "shared_failures": dict(self.shared_failures),
            "import_s": self.import_s,
            "shared_import_s": self.shared_import_s,
            "shared_wait_s": self.shared_wait_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RankStarts:
        return cls(
            int(data["forked"]),
            int(data["zygotes"]),
            int(data["forked_shared"]),
            int(data["shared_users"]),
            _counter(data["spawned"]),
            _counter(data["shared_failures"]),
            float(data["import_s"]),
            float(data["shared_import_s"]),
            float(data["shared_wait_s"]),
        )

    def describe(self) -> str:
        """One line for the terminal summary."""
        parts = []
        if self.forked_shared:
            users = f"{self.shared_users} worker{'s' if self.shared_users != 1 else ''}"
            parts.append(
                f"{self.forked_shared} forked from the session's shared zygote (used by {users}; its imports took"
                f" {self.shared_import_s:.1f} s, a worker waited up to {self.shared_wait_s:.1f} s for them)"
            )
        if self.forked:
            zygotes = f"{self.zygotes} zygote{'s' if self.zygotes != 1 else ''}"
            took = f"{self.import_s:.1f} s" + (" in all" if self.zygotes != 1 else "")
            parts.append(f"{self.forked} forked from {zygotes} (torch and FlashInfer imported once per zygote: {took})")
        parts += [f"{n} spawned ({reason})" for reason, n in self.spawned.most_common()]
        parts += [
            f"the shared zygote not used by {n} worker{'s' if n != 1 else ''}: {reason}"
            for reason, n in self.shared_failures.most_common()
        ]
        return "mnnvl: rank starts: " + ("; ".join(parts) if parts else "none")


def _counter(data: Mapping[str, Any]) -> collections.Counter[str]:
    return collections.Counter({str(k): int(v) for k, v in dict(data).items()})


class Zygotes:
    """The pool's zygotes, one per rank environment, started on first use and closed with the pool; the
    session's shared zygote (``shared``), where there is one, for the environment it serves."""

    def __init__(self, shared: SharedAddress | None = None) -> None:
        self._shared = shared
        self._by_key: dict[str, Zygote | str] = {}
        self.starts = RankStarts()

    def spawn(self, env: Mapping[str, str], backend: str, threads: int | None) -> ForkedProcess | None:
        """A rank forked from the zygote for ``env`` with ``threads`` torch threads (the harness's choice), or
        None where it must be spawned: another backend, no thread count of ours (the user's setting or torch's
        default is read by torch at import, which a fork cannot repeat), more threads than cores (torch caps what
        it reads at import), or a zygote that refused (see the module docstring)."""
        from pytest_mnnvl.worlds.threads import usable_cores

        if backend not in FORKABLE_BACKENDS:
            return self._spawn(f"the {backend} backend")
        if not enabled(env):
            return self._spawn(f"{ZYGOTE_ENV}=0")
        if threads is None or threads > usable_cores():
            return self._spawn("torch reads their thread count itself")
        cwd = os.getcwd()
        key = key_of(env, cwd)
        zygote = self._by_key.get(key)
        if isinstance(zygote, str):
            return self._spawn(zygote)  # refused before: spawn, as every rank of this environment
        if zygote is None or not zygote.alive:
            try:
                zygote = self._open(key, env, backend, cwd)
            except (ZygoteUnavailable, OSError) as exc:
                reason = self._by_key[key] = f"no zygote: {exc}"
                return self._spawn(reason)
            self._by_key[key] = zygote
        try:
            process = zygote.fork(env, threads)
        except ZygoteUnavailable as exc:
            zygote.close()
            reason = self._by_key[key] = f"no zygote: {exc}"
            return self._spawn(reason)
        if zygote.process is None:
            self.starts.forked_shared += 1
        else:
            self.starts.forked += 1
        return process

    def _open(self, key: str, env: Mapping[str, str], backend: str, cwd: str) -> Zygote:
        """The session's shared zygote the first time its environment is asked for (never again once used: one
        that died is replaced by our own), else a zygote of our own."""
        shared = self._shared
        if shared is not None and shared.key == key:
            self._shared = None
            try:
                zygote = Zygote.connect(shared)
            except ZygoteUnavailable as exc:
                self.starts.shared_failures[str(exc).splitlines()[0][:200]] += 1
            else:
                self.starts.shared_users = 1
                self.starts.shared_import_s = zygote.import_s
                self.starts.shared_wait_s = zygote.waited_s
                return zygote
        zygote = Zygote.start(env, backend, cwd)
        self.starts.zygotes += 1
        self.starts.import_s += zygote.import_s
        return zygote

    def _spawn(self, reason: str) -> ForkedProcess | None:
        """None (spawn this rank), counted under ``reason``."""
        self.starts.spawned[reason.splitlines()[0][:200]] += 1
        return None

    def describe(self) -> str:
        """One line for the terminal summary: how this session's ranks started."""
        return self.starts.describe()

    def close(self) -> None:
        for zygote in self._by_key.values():
            if isinstance(zygote, Zygote):
                zygote.close()
        self._by_key.clear()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- wire ------------------------------------------------------------------------------------------


def _send(sock: socket.socket, message: Any, fds: list[int] | None = None) -> None:
    data = pickle.dumps(message)
    frame = _HEADER.pack(len(data)) + data
    if fds:
        socket.send_fds(sock, [frame[:1]], fds)
        sock.sendall(frame[1:])
    else:
        sock.sendall(frame)


def _receive(sock: socket.socket, fds: list[int] | None = None) -> Any:
    """One message (None at EOF); a file descriptor sent with it is appended to ``fds``."""
    head = b""
    if fds is not None:
        data, received, _flags, _addr = socket.recv_fds(sock, 1, 4)
        if not data:
            return None
        fds.extend(received)
        head = data
    while len(head) < _HEADER.size:
        chunk = sock.recv(_HEADER.size - len(head))
        if not chunk:
            return None
        head += chunk
    (size,) = _HEADER.unpack(head)
    body = b""
    while len(body) < size:
        chunk = sock.recv(size - len(body))
        if not chunk:
            return None
        body += chunk
    return pickle.loads(body)


# ---- the zygote's side -----------------------------------------------------------------------------


def _threads_of_this_process() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _preload(backend: str) -> str | None:
    """Import what the ranks import; why forking would be unsafe now, or None."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    module = importlib.import_module(f"pytest_mnnvl.backends.{backend}")
    preload = getattr(module, "preload", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # the ranks must meet this error themselves, on a clean import
            return f"the backend's imports failed: {type(exc).__name__}: {exc}"
    import torch

    if torch.cuda.is_initialized():
        return "CUDA was initialized by the imports"
    threads = _threads_of_this_process()
    if threads != 1:
        return f"the imports left {threads} threads running (a fork keeps only one)"
    return None


def _child(inherited: list[int], fd: int, env: dict[str, str], threads: int) -> None:
    """In the forked rank: its own session, output and environment, then the rank's main. ``inherited``: the
    zygote's own descriptors (its connections, its listener, its wakeup pipe), closed first."""
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for end in inherited:
            with contextlib.suppress(OSError):
                os.close(end)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.environ.clear()
        os.environ.update(env)
        # Its argv is the zygote's; its name in top and /proc/PID/comm says what it is.
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            name = f"mnnvl-rank-{env.get('PYTEST_MNNVL_RANK', '?')}".encode()[:15]
            ctypes.CDLL(None, use_errno=True).prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME
        import torch

        torch.set_num_threads(threads)
        from pytest_mnnvl.worlds import rank

        rank.main()
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    except BaseException:
        import traceback

        with contextlib.suppress(Exception):
            traceback.print_exc()
            sys.stderr.flush()
        os._exit(70)
    os._exit(0)


class _Server:
    """The zygote's loop: one thread, ``select`` over its connections (and its listener, when shared), forking a
    rank per request and telling the connection that asked for it when it exits."""

    def __init__(self, hello: tuple[str, Any], listener: socket.socket | None) -> None:
        self.hello = hello
        self.listener = listener
        self.clients: list[socket.socket] = []
        #: Each live rank, and the connection it was forked for (None once that connection closed).
        self.owners: dict[int, socket.socket | None] = {}
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)

    def serve(self, parent: int) -> None:
        signal.set_wakeup_fd(self.wake_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        while True:
            watched: list[Any] = [*self.clients, self.wake_read]
            if self.listener is not None:
                watched.append(self.listener)
            ready, _, _ = select.select(watched, [], [], 1.0)
            if os.getppid() != parent:
                return
            if self.wake_read in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wake_read, 512)
            self.reap()
            if self.listener is not None and self.listener in ready:
                self.welcome(*self.listener.accept())
            for client in [c for c in self.clients if c in ready]:
                if not self.answer(client) and self.listener is None:
                    return  # our only pool is gone: so are we, and our ranks with us (PDEATHSIG)

    def welcome(self, client: socket.socket, _address: Any) -> None:
        """A new connection: from this user only (an abstract socket is visible to every user of the host)."""
        _pid, uid, _gid = struct.unpack("3i", client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.getuid():
            client.close()
            return
        try:
            _send(client, self.hello)
        except OSError:
            client.close()
            return
        if self.hello[0] == "ready":
            self.clients.append(client)
        else:
            client.close()

    def answer(self, client: socket.socket) -> bool:
        """Fork the rank ``client`` asks for; False once it closed (its ranks still running are killed)."""
        fds: list[int] = []
        try:
            message = _receive(client, fds)
        except OSError:
            message = None
        if message is None:
            for fd in fds:
                os.close(fd)
            self.drop(client)
            return False
        _kind, env, threads = message
        pid = os.fork()
        if pid == 0:
            inherited = [c.fileno() for c in self.clients] + [self.wake_read, self.wake_write]
            if self.listener is not None:
                inherited.append(self.listener.fileno())
            _child(inherited, fds[0], env, threads)
        for fd in fds:
            os.close(fd)
        self.owners[pid] = client
        with contextlib.suppress(OSError):
            _send(client, ("forked", pid))
        return True

    def drop(self, client: socket.socket) -> None:
        self.clients.remove(client)
        client.close()
        for pid, owner in self.owners.items():
            if owner is client:
                self.owners[pid] = None
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)  # each rank leads its own session

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            owner = self.owners.pop(pid, None)
            if owner is not None:
                with contextlib.suppress(OSError):
                    _send(owner, ("exit", pid, os.waitstatus_to_exitcode(status)))


def _serve(sock: socket.socket, backend: str) -> None:
    from pytest_mnnvl.worlds.rank import die_with_parent_signal

    # Without the watchdog thread a rank starts: a zygote must stay one thread, so its loop checks the parent.
    parent = die_with_parent_signal()
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 0
    began = time.monotonic()
    try:
        reason = _preload(backend)
    except BaseException as exc:  # torch itself, or the harness, failed to import: the ranks meet it themselves
        reason = f"its imports failed: {type(exc).__name__}: {exc}"
    took = round(time.monotonic() - began, 3)
    hello: tuple[str, Any] = ("ready", (os.getpid(), took)) if reason is None else ("refused", reason)
    server = _Server(hello, sock if listening else None)
    if not listening:
        _send(sock, hello)
        if reason is not None:
            return
        server.clients.append(sock)
    server.serve(parent)


if __name__ == "__main__":
    _serve(socket.socket(fileno=int(sys.argv[1])), sys.argv[2])
