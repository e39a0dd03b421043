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
"""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
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
#: The zygote's own environment for its imports (never its ranks'): no GPU, and torch's availability check by NVML
#: (which, with no GPU visible, asks nothing), so no import reaches ``cuInit`` and its driver thread.
IMPORT_ENV = {"CUDA_VISIBLE_DEVICES": "", "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
#: How long a zygote may take to import (a cold page cache and a CUDA build of torch on a busy machine).
READY_TIMEOUT_S = 120.0
_HEADER = struct.Struct("!I")


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get(ZYGOTE_ENV, "1").strip() != "0"


def key_of(env: Mapping[str, str], cwd: str) -> tuple[tuple[str, str], ...]:
    """What makes two ranks' zygote the same: their environment less :data:`PER_RANK`, and the working directory
    (the first entry of a ``-m`` interpreter's ``sys.path``, and where a rank function's relative paths point)."""
    return (("", cwd), *sorted((k, v) for k, v in env.items() if k not in PER_RANK))


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


class Zygote:
    """One zygote process: started with ``env`` (less :data:`PER_RANK`), ready once its imports are done."""

    def __init__(self, env: Mapping[str, str], backend: str, cwd: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_env = {k: v for k, v in env.items() if k not in PER_RANK}
        # One thread while importing (OpenBLAS, OpenMP): forking a process with other threads is unsafe.
        child_env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **IMPORT_ENV)
        self._sock = ours
        self._lock = threading.Lock()
        self._exited = threading.Condition()
        self._exits: dict[int, int] = {}
        self._replies: list[tuple[str, Any]] = []
        self._closed = False
        # Its own output (import warnings) goes to a file, read only to say why it failed: a pipe nobody reads
        # would fill and stop it.
        self._output = tempfile.TemporaryFile()  # noqa: SIM115 - kept for the life of the zygote
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pytest_mnnvl.worlds.zygote", str(theirs.fileno()), backend],
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=self._output,
                stderr=subprocess.STDOUT,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
                cwd=cwd,
            )
        finally:
            theirs.close()
        self._reader = threading.Thread(target=self._read, name="mnnvl-zygote-reader", daemon=True)
        self._reader.start()
        try:
            kind, detail = self._reply(READY_TIMEOUT_S)
        except BaseException:  # an interrupt while it imports: nothing left running
            self.close()
            raise
        if kind != "ready":
            self.close()
            raise ZygoteUnavailable(str(detail))

    @property
    def alive(self) -> bool:
        return not self._closed and self.process.poll() is None

    def fork(self, env: Mapping[str, str], threads: int) -> ForkedProcess:
        """A new rank with ``env`` as its whole environment and ``threads`` torch threads."""
        read_end, write_end = os.pipe()
        try:
            with self._lock:
                _send(self._sock, ("fork", dict(env), threads), fds=[write_end])
                kind, detail = self._reply(10.0)
        except OSError as exc:
            os.close(read_end)
            raise ZygoteUnavailable(f"the zygote is gone: {exc}") from None
        finally:
            os.close(write_end)
        if kind != "forked":
            os.close(read_end)
            raise ZygoteUnavailable(str(detail))
        return ForkedProcess(int(detail), os.fdopen(read_end, "rb"), self)

    def exit_code(self, pid: int) -> int | None:
        with self._exited:
            code = self._exits.get(pid)
            if code is None and (self._closed or self.process.poll() is not None) and not _exists(pid):
                code = -signal.SIGKILL  # the zygote died first: its children die with it (PDEATHSIG)
            return code

    def wait_for_exit(self, timeout: float) -> None:
        with self._exited:
            self._exited.wait(timeout)

    def close(self) -> None:
        """Stop the zygote (its ranks, forked with PDEATHSIG on it, die with it)."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5.0)
        self._output.close()

    def output_tail(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            self._output.seek(0)
            return self._output.read().decode(errors="replace")[-2000:]
        return ""

    def _reply(self, timeout: float) -> tuple[str, Any]:
        deadline = time.monotonic() + timeout
        with self._exited:
            while not self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed or self.process.poll() is not None:
                    output = self.output_tail() if self.process.poll() is not None else ""
                    state = "exited" if self.process.poll() is not None else f"no answer within {timeout:g} s"
                    return "error", f"zygote {state}" + (f":\n{output}" if output.strip() else "")
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
                    self._exited.notify_all()
                    return
                if message[0] == "exit":
                    self._exits[int(message[1])] = int(message[2])
                else:
                    self._replies.append(message)
                self._exited.notify_all()


class Zygotes:
    """The pool's zygotes, one per rank environment, started on first use and closed with the pool."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[tuple[str, str], ...], Zygote | str] = {}
        #: Ranks forked, zygotes started, and why the other ranks were spawned (reason -> ranks).
        self.forked = 0
        self.started = 0
        self.spawned: collections.Counter[str] = collections.Counter()

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
                zygote = Zygote(env, backend, cwd)
            except (ZygoteUnavailable, OSError) as exc:
                reason = self._by_key[key] = f"no zygote: {exc}"
                return self._spawn(reason)
            self.started += 1
            self._by_key[key] = zygote
        try:
            process = zygote.fork(env, threads)
        except ZygoteUnavailable as exc:
            zygote.close()
            reason = self._by_key[key] = f"no zygote: {exc}"
            return self._spawn(reason)
        self.forked += 1
        return process

    def _spawn(self, reason: str) -> ForkedProcess | None:
        """None (spawn this rank), counted under ``reason``."""
        self.spawned[reason.splitlines()[0][:200]] += 1
        return None

    def describe(self) -> str:
        """One line for the terminal summary: how this session's ranks started."""
        parts = []
        if self.forked:
            zygotes = f"{self.started} zygote{'s' if self.started != 1 else ''}"
            parts.append(f"{self.forked} forked from {zygotes} (torch and FlashInfer imported once per zygote)")
        parts += [f"{n} spawned ({reason})" for reason, n in self.spawned.most_common()]
        return "mnnvl: rank starts: " + ("; ".join(parts) if parts else "none")

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


def _child(sock: socket.socket, wake: tuple[int, int], fd: int, env: dict[str, str], threads: int) -> None:
    """In the forked rank: its own session, output and environment, then the rank's main."""
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock.close()
        for end in wake:
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


def _serve(sock: socket.socket, backend: str) -> None:
    from pytest_mnnvl.worlds.rank import die_with_parent_signal

    # Without the watchdog thread a rank starts: a zygote must stay one thread, so its loop checks the parent.
    parent = die_with_parent_signal()
    reason = _preload(backend)
    _send(sock, ("ready", None) if reason is None else ("refused", reason))
    if reason is not None:
        return
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    while True:
        ready, _, _ = select.select([sock.fileno(), wake_read], [], [], 1.0)
        if os.getppid() != parent:
            return
        if wake_read in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_read, 512)
        _reap(sock)
        if sock.fileno() not in ready:
            continue
        fds: list[int] = []
        message = _receive(sock, fds)
        if message is None:
            return  # the pool is gone: so are we, and our ranks with us
        _kind, env, threads = message
        pid = os.fork()
        if pid == 0:
            _child(sock, (wake_read, wake_write), fds[0], env, threads)
        for fd in fds:
            os.close(fd)
        _send(sock, ("forked", pid))


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, ("exit", pid, os.waitstatus_to_exitcode(status)))


if __name__ == "__main__":
    _serve(socket.socket(fileno=int(sys.argv[1])), sys.argv[2])
