"""The persistent rank pool: worlds of rank processes, started once and reused until they fail.

Spawning a world (processes, imports, rendezvous) costs seconds; a call on a warm world costs
milliseconds. A :class:`World` is therefore kept per (world size, PP, backend, environment, GPUs)
and reused across tests and Hypothesis examples. Any failure — an exception on a rank, a crash, a
timeout, even a skip — tears the world down (kill by recorded PID, TERM then KILL, whole process
group), and the next call starts a fresh one, so every example after a failure starts clean.

The pool never waits without a deadline: every receive is bounded by the call timeout, a crashed
rank is seen through its socket closing (at once), and a timeout dumps every rank's Python stack
(``faulthandler`` on a signal, which works while the main thread is stuck in C) plus what each rank
waits in (a collective, a sim flag wait: :mod:`pytest_mnnvl.worlds.audit`) and its CPU time before the
deadline, then kills the world: a deadlock, or a world that is merely slow (:mod:`pytest_mnnvl.worlds.stall`).

Each world keeps its socket and files in a ``mnnvl-world-*`` directory that names its owner process
(:class:`WorldOwner`). A teardown removes it, and a first SIGINT/SIGTERM cannot cut a teardown short
(:mod:`pytest_mnnvl.worlds.interrupts`); what a SIGKILLed owner leaves behind is removed by the next world
started with the same temporary directory (:func:`reap_dead_worlds`), never a live owner's.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pickle
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import IO, Any, NoReturn, Protocol

from pytest_mnnvl.errors import (
    MnnvlUsageError,
    PythonFrame,
    WorldStartError,
    describe_exit,
)
from pytest_mnnvl.worlds import interrupts, stall, threads, verdict
from pytest_mnnvl.worlds.world import RankWorld, WorldPool, WorldSpec, function_reference
from pytest_mnnvl.worlds.zygote import SharedAddress, Zygotes

#: Never enable NVLink multicast in a rank: MoeAlltoAll does not need it and it has harmed hosts.
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
#: How long ranks that did not fail may keep running after a peer raised, before they are stopped.
PEER_FAILURE_GRACE_S = 2.0
#: How long a rank gets to write its stack after the dump signal.
STACK_DUMP_WAIT_S = 0.5
#: How long a rank gets to leave on TERM before KILL.
TERM_GRACE_S = 1.0
#: How long a world may take to start when no startup timeout is set: FlashInfer's first use JIT-builds
#: its one-sided module (about 3 minutes on 16 cores), everything else starts in seconds.
DEFAULT_STARTUP_TIMEOUT_S = {"flashinfer": 900.0}
DEFAULT_STARTUP_TIMEOUT_OTHER_S = 120.0
#: Lines of each rank's output kept for crash reports.
OUTPUT_TAIL_LINES = 40
#: A world's directory: this prefix in the temporary directory, and in it the file naming its owner.
WORLD_DIR_PREFIX = "mnnvl-world-"
#: Longest AF_UNIX path ``bind`` takes (``sun_path`` is 108 bytes with its terminating NUL).
MAX_SOCKET_PATH = 107
OWNER_FILE = "owner.json"


def rank_world_env(spec: WorldSpec, environ: dict[str, str] | None = None) -> tuple[dict[str, str], int | None]:
    """What every rank of a world of ``spec`` starts with (from ``environ``, by default this process's), and the
    torch thread count the harness chose for each (None: the user's or torch's own)."""
    env = dict(os.environ if environ is None else environ)
    env.update(dict(spec.env))
    # Before torch is imported in the rank: its share of the cores, unless the user chose (threads.py).
    count = threads.set_in_rank_env(env, spec.world_size)
    env.update(MULTICAST_OFF)
    if spec.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(spec.devices)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["PYTHONUNBUFFERED"] = "1"
    return env, count


class RankProcess(Protocol):
    """What the pool uses of a rank process: a ``subprocess.Popen``, or a rank forked by a zygote."""

    @property
    def pid(self) -> int: ...

    @property
    def stdout(self) -> IO[bytes] | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


@dataclass
class _Rank:
    rank: int
    process: RankProcess
    stack_path: str
    status_path: str
    fatal_path: str
    conn: Connection | None = None
    output: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=OUTPUT_TAIL_LINES))
    reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


class World(RankWorld):
    """A warm world of ``spec.world_size`` rank processes; see the module docstring."""

    def __init__(
        self,
        spec: WorldSpec,
        timeout: float,
        startup_timeout: float | None = None,
        tmp_root: str | None = None,
        zygotes: Zygotes | None = None,
    ) -> None:
        self.spec = spec
        #: Where CPU ranks are forked from instead of spawned (:mod:`pytest_mnnvl.worlds.zygote`), if anywhere.
        self._zygotes = zygotes
        self.timeout = timeout
        default = DEFAULT_STARTUP_TIMEOUT_S.get(spec.backend, DEFAULT_STARTUP_TIMEOUT_OTHER_S)
        self.startup_timeout = startup_timeout if startup_timeout is not None else max(default, timeout)
        self._tmp_root = tmp_root
        self._ranks: list[_Rank] = []
        self._dir: str | None = None
        self._listener: socket.socket | None = None
        #: What the ranks' torch threads are (a slow world's advice says it).
        self._threads = ""
        self.starts = 0
        self.calls = 0

    # -- public -------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.spec.world_size

    @property
    def pp(self) -> int:
        return self.spec.pp

    @property
    def backend(self) -> str:
        return self.spec.backend

    @property
    def alive(self) -> bool:
        return bool(self._ranks) and all(r.process.poll() is None for r in self._ranks)

    @property
    def pids(self) -> list[int]:
        """PIDs of the current rank processes, in rank order (starts the world if needed)."""
        self._ensure_started()
        return [r.pid for r in self._ranks]

    def call(
        self,
        fn: Callable[..., Any],
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> list[Any]:
        __tracebackhide__ = True
        reference = function_reference(fn)
        try:
            payload = pickle.dumps((tuple(args), dict(kwargs or {})))
        except Exception as exc:
            raise MnnvlUsageError(f"the arguments to {reference[2]} could not be pickled: {exc!r}") from None
        self._ensure_started()
        self.calls += 1
        message = pickle.dumps(("call", *reference, payload))
        for r in self._ranks:
            assert r.conn is not None
            with contextlib.suppress(OSError):  # a rank that is gone is reported as a crash below
                r.conn.send_bytes(message)
        return self._collect(reference[2], self.timeout if timeout is None else timeout)

    def agree(self, value: Any, what: str = "value") -> Any:
        """``value`` itself: this one process draws what the ranks run and sends them the same."""
        return value

    def close(self) -> None:
        """Stop the ranks politely if they are idle, then make sure they are gone."""
        for r in self._ranks:
            if r.conn is not None:
                with contextlib.suppress(OSError):
                    r.conn.send_bytes(pickle.dumps(("stop",)))
        self._teardown(polite=True)

    # -- start --------------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._ranks and self.alive:
            return
        if self._ranks:
            self._teardown()
        try:
            self._start()
        except BaseException:
            self._teardown()
            raise

    @staticmethod
    def _rank_env(world_env: dict[str, str], boot: dict[str, Any]) -> dict[str, str]:
        from pytest_mnnvl.worlds.rank import BOOT_ENV

        return {**world_env, "PYTEST_MNNVL_RANK": str(boot["rank"]), BOOT_ENV: json.dumps(boot)}

    def _start(self) -> None:
        self.starts += 1
        reap_dead_worlds(self._tmp_root)
        with interrupts.deferred():  # no directory without its owner record
            self._dir = tempfile.mkdtemp(prefix=WORLD_DIR_PREFIX, dir=self._tmp_root)
            WorldOwner.of(os.getpid()).write(self._dir)
        address = os.path.join(self._dir, "ctl.sock")
        if len(os.fsencode(address)) > MAX_SOCKET_PATH:
            # A deep temporary directory (pytester's, a CI workspace) would not fit sun_path: use an
            # abstract socket instead (Linux; no file, gone with the listener), named after the world dir.
            address = "\0" + os.path.basename(self._dir)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(address)
        listener.listen(self.world_size)
        self._listener = listener
        sys_path = [p for p in sys.path if p]
        world_env, thread_count = rank_world_env(self.spec)
        self._threads = threads.describe(world_env, self.world_size)
        for rank in range(self.world_size):
            boot = {
                "rank": rank,
                "world_size": self.world_size,
                "pp": self.pp,
                "backend": self.backend,
                "address": address,
                "store_path": os.path.join(self._dir, "store"),
                "stack_path": os.path.join(self._dir, f"stack-{rank}.txt"),
                "fatal_path": os.path.join(self._dir, f"fatal-{rank}.txt"),
                "status_path": os.path.join(self._dir, f"status-{rank}.txt"),
                "sys_path": sys_path,
                "ranks_per_gpu": self.spec.ranks_per_gpu,
            }
            env = self._rank_env(world_env, boot)
            process: RankProcess | None = None
            if self._zygotes is not None and self.spec.devices is None:
                process = self._zygotes.spawn(env, self.backend, thread_count)
            if process is None:
                process = subprocess.Popen(
                    [sys.executable, "-m", "pytest_mnnvl.worlds.rank"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            r = _Rank(rank, process, str(boot["stack_path"]), str(boot["status_path"]), str(boot["fatal_path"]))
            r.reader = threading.Thread(target=_forward_output, args=(r,), daemon=True)
            r.reader.start()
            self._ranks.append(r)
        deadline = time.monotonic() + self.startup_timeout
        self._accept_all(listener, deadline)
        self._await_ready(deadline)

    def _accept_all(self, listener: socket.socket, deadline: float) -> None:
        pending = self.world_size
        while pending:
            self._check_start_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorldStartError(self._start_failure_text("did not connect to the pool in time"))
            ready, _, _ = select.select([listener], [], [], min(left, 0.05))
            if not ready:
                continue
            sock, _ = listener.accept()
            conn = Connection(sock.detach())
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise WorldStartError(self._start_failure_text("connected but sent nothing"))
            _, rank, _pid = conn.recv()
            self._ranks[rank].conn = conn
            pending -= 1

    def _await_ready(self, deadline: float) -> None:
        waiting = {r.rank for r in self._ranks}
        while waiting:
            conns: dict[Any, int] = {self._ranks[i].conn: i for i in waiting}
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorldStartError(
                    self._start_failure_text(
                        f"ranks {sorted(waiting)} did not finish the rendezvous within {self.startup_timeout:g} s"
                    )
                )
            for conn in wait(list(conns), timeout=min(left, 0.1)):
                rank = conns[conn]
                try:
                    kind, detail = self._ranks[rank].conn.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    code = self._ranks[rank].process.wait()
                    raise WorldStartError(
                        self._start_failure_text(f"rank {rank} {describe_exit(code)} while starting")
                    ) from None
                if kind == "start-error":
                    raise WorldStartError(f"rank {rank} failed to start {self.spec.describe()}:\n{detail}")
                waiting.discard(rank)

    def _check_start_alive(self) -> None:
        for r in self._ranks:
            code = r.process.poll()
            if code is not None:
                raise WorldStartError(self._start_failure_text(f"rank {r.rank} {describe_exit(code)} while starting"))

    def _start_failure_text(self, what: str) -> str:
        return f"could not start {self.spec.describe()}: {what}" + self._output_tails()

    # -- collect ------------------------------------------------------------------------------
    def _collect(self, name: str, timeout: float) -> list[Any]:
        __tracebackhide__ = True
        deadline = time.monotonic() + timeout
        # Each rank's CPU time from here to the deadline tells a computing rank from an idle one (stall.py).
        sample_at = deadline - stall.CPU_WINDOW_S
        cpu_before: tuple[float, dict[int, float | None], dict[int, bool | None]] | None = None
        results: dict[int, tuple[str, Any]] = {}
        first_failure: float | None = None
        by_conn: dict[Any, _Rank] = {r.conn: r for r in self._ranks}
        while len(results) < self.world_size:
            now = time.monotonic()
            if first_failure is not None and now - first_failure >= PEER_FAILURE_GRACE_S:
                break
            if cpu_before is None and now >= sample_at:
                cpu_before = self._cpu_sample(now)
            if now >= deadline:
                if first_failure is not None:
                    break
                self._raise_timeout(name, timeout, results, cpu_before)
            waiting: list[Any] = [r.conn for r in self._ranks if r.rank not in results]
            wake = deadline if cpu_before is not None else sample_at
            ready = wait(waiting, timeout=max(0.0, min(wake - now, 0.2)))
            for conn in ready:
                r = by_conn[conn]
                outcome = _receive(r)
                if outcome is None:
                    self._raise_crash(r, name)
                results[r.rank] = outcome
                if outcome[0] != "ok" and first_failure is None:
                    first_failure = time.monotonic()
        return self._verdict(name, results)

    def _verdict(self, name: str, results: dict[int, tuple[str, Any]]) -> list[Any]:
        __tracebackhide__ = True
        if verdict.failed(results, self.world_size):
            self._teardown()
        return verdict.outcomes(results, self.world_size)

    def _raise_crash(self, crashed: _Rank, name: str) -> NoReturn:
        __tracebackhide__ = True
        try:
            code = crashed.process.wait(timeout=TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            code = crashed.process.poll() or 0
        stack = _fatal_stack(crashed.fatal_path) if code < 0 else ()
        tails = self._output_tails(only=crashed.rank)
        self._teardown()
        raise verdict.crashed(crashed.rank, code, f"{name}()", stack, tails)

    def _raise_timeout(
        self,
        name: str,
        timeout: float,
        results: dict[int, tuple[str, Any]],
        cpu_before: tuple[float, dict[int, float | None], dict[int, bool | None]] | None,
    ) -> NoReturn:
        """The call passed its deadline: :class:`WorldTooSlow` when every running rank gets somewhere, else
        :class:`WorldDeadlock` (:mod:`pytest_mnnvl.worlds.stall`); every rank's stack attached, the world stopped."""
        __tracebackhide__ = True
        from pytest_mnnvl.worlds import audit
        from pytest_mnnvl.worlds.rank import DUMP_SIGNAL

        pending = [r.rank for r in self._ranks if r.rank not in results]
        waits = {r.rank: audit.waiting_in(r.status_path) for r in self._ranks if r.rank in pending}
        if cpu_before is None or time.monotonic() - cpu_before[0] < stall.MIN_CPU_WINDOW_S:
            # A call shorter than the window (a programmatic timeout): measure a short window now.
            if cpu_before is None:
                cpu_before = self._cpu_sample(time.monotonic())
            time.sleep(max(0.0, cpu_before[0] + stall.MIN_CPU_WINDOW_S - time.monotonic()))
        now, after, running = self._cpu_sample(time.monotonic())
        shares = stall.cpu_shares(cpu_before[1], after, now - cpu_before[0])
        runnable = {rank: bool(cpu_before[2].get(rank)) and bool(running.get(rank)) for rank in running}
        for r in self._ranks:
            if r.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(r.pid, DUMP_SIGNAL)
        stacks = _read_stacks(self._ranks, STACK_DUMP_WAIT_S)
        self._teardown()
        ranks = [
            stall.RankAtDeadline.of(
                rank,
                returned=rank not in pending,
                wait=waits.get(rank),
                cpu_share=shares.get(rank),
                where=stall.where(stall.main_thread_frames(stacks.get(rank, ""))),
                runnable=runnable.get(rank, False),
            )
            for rank in range(self.world_size)
        ]
        raise verdict.late(ranks, self.backend, timeout, stacks, f"in {name}()", self._threads)

    def _cpu_sample(self, now: float) -> tuple[float, dict[int, float | None], dict[int, bool | None]]:
        """(when, each rank's CPU seconds so far, whether its main thread is runnable): one end of the window."""
        cpu = {r.rank: stall.process_cpu_seconds(r.pid) for r in self._ranks}
        return now, cpu, {r.rank: stall.main_thread_runnable(r.pid) for r in self._ranks}

    # -- teardown -----------------------------------------------------------------------------
    def _teardown(self, polite: bool = False) -> None:
        """Make sure every rank process (and anything it started) is gone; never raises, except a first
        interrupt that came meanwhile, once everything is gone (a second one skips the grace periods)."""
        with interrupts.deferred():
            self._stop_ranks(polite)

    def _stop_ranks(self, polite: bool) -> None:
        ranks, self._ranks = self._ranks, []
        if polite:
            _wait_all(ranks, TERM_GRACE_S, interruptible=True)
        for sig, grace in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, 5.0)):
            alive = [r for r in ranks if r.process.poll() is None]
            if not alive:
                break
            if sig == signal.SIGTERM and interrupts.hurry():
                continue
            for r in alive:
                _signal_group(r.pid, sig)
            _wait_all(alive, grace, interruptible=sig == signal.SIGTERM)
        for r in ranks:
            # The session's own group is separate: kill leftovers of the rank's group too.
            _signal_group(r.pid, signal.SIGKILL)
            if r.conn is not None:
                r.conn.close()
            if r.process.stdout is not None and r.reader is not None:
                r.reader.join(timeout=1.0)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _output_tails(self, only: int | None = None) -> str:
        parts = []
        for r in self._ranks:
            if only is not None and r.rank != only:
                continue
            if r.reader is not None:
                r.reader.join(timeout=0.2 if r.process.poll() is not None else 0)
            if r.output:
                parts.append(f"\n\n[rank {r.rank}] last output:\n" + "".join(r.output).rstrip())
        return "".join(parts)


def _receive(r: _Rank) -> tuple[str, Any] | None:
    """One outcome from a rank, or ``None`` when its socket closed (the rank is gone)."""
    assert r.conn is not None
    try:
        data = r.conn.recv_bytes()
    except (EOFError, OSError):
        return None
    outcome: tuple[str, Any] = pickle.loads(data)
    return outcome


def _forward_output(r: _Rank) -> None:
    """Keep each rank's output (for crash reports) and pass it on, prefixed, to our stderr; long native
    backtraces cut short (:class:`_NativeTrimmer`)."""
    assert r.process.stdout is not None
    trimmer = _NativeTrimmer()

    def emit(lines: list[str]) -> None:
        for line in lines:
            r.output.append(line)
            with contextlib.suppress(OSError):
                os.write(2, f"[rank {r.rank}] {line}".encode())

    for raw in iter(r.process.stdout.readline, b""):
        emit(trimmer.feed(raw.decode(errors="replace")))
    emit(trimmer.close())
    r.process.stdout.close()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _wait_all(ranks: list[_Rank], grace: float, interruptible: bool = False) -> None:
    """Wait up to ``grace`` for the ranks to end; ``interruptible``: stop waiting when :func:`interrupts.hurry`."""
    deadline = time.monotonic() + grace
    for r in ranks:
        while r.process.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0 or (interruptible and interrupts.hurry()):
                return
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.process.wait(timeout=min(left, 0.05))


@dataclass(frozen=True)
class WorldOwner:
    """The process a world's directory belongs to. A pid alone may be reused by the time anyone looks, so
    its start time is kept too (``/proc``), and the host and pid namespace: elsewhere the pid means nothing."""

    pid: int
    #: Clock ticks after boot (``/proc/PID/stat`` field 22); None where there is no ``/proc``.
    started: int | None
    host: str
    pid_namespace: str | None

    @classmethod
    def of(cls, pid: int) -> WorldOwner:
        return cls(pid, _process_start(pid), socket.gethostname(), _pid_namespace())

    def write(self, directory: str) -> None:
        """Written whole or not at all (a reaper reading it half-written would keep the directory anyway)."""
        path = os.path.join(directory, OWNER_FILE)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(
                {"pid": self.pid, "started": self.started, "host": self.host, "pid_namespace": self.pid_namespace}, f
            )
        os.replace(path + ".tmp", path)

    @classmethod
    def read(cls, directory: str) -> WorldOwner | None:
        try:
            with open(os.path.join(directory, OWNER_FILE), encoding="utf-8") as f:
                data = json.load(f)
            return cls(int(data["pid"]), data["started"], str(data["host"]), data["pid_namespace"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def is_dead(self) -> bool:
        """True only when provably gone: same host and pid namespace, and no live process with that pid
        and start time. Anything it cannot tell counts as alive."""
        if self.host != socket.gethostname() or self.pid_namespace != _pid_namespace():
            return False
        if os.path.isdir("/proc/self"):
            started = _process_start(self.pid)
            return started is None or (self.started is not None and started != self.started)
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
        return False


def _process_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot), or None if there is no such live process (a zombie is not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is field 3 (the state); the start time is field 22.
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def reap_dead_worlds(root: str | None = None) -> list[str]:
    """Remove the world directories under ``root`` (default: the temporary directory) whose owner is dead: a
    SIGKILLed session could not remove its own. Only this user's, only with an owner record (one without may
    be a world being started this instant); returns the directories removed."""
    root = root or tempfile.gettempdir()
    removed: list[str] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(WORLD_DIR_PREFIX):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        owner = WorldOwner.read(entry.path)
        if owner is None or owner.pid == os.getpid() or not owner.is_dead():
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if not os.path.exists(entry.path):
            removed.append(entry.path)
    return removed


#: ``  File "x.py", line 12 in f``: a frame of faulthandler's dump (no comma before ``in``).
_FAULTHANDLER_FRAME = re.compile(r'^\s+File "(?P<file>.*)", line (?P<line>\d+) in (?P<function>.+)$')
#: ``  File "ceval.c", line 4769, in _PyEval_EvalFrameDefault``: a frame line without a source line after it,
#: as crash handlers print native frames (FlashInfer's FFI library prints ~40 on a segfault).
_NATIVE_FRAME = re.compile(r'^\s+File ".*", line \d+, in ')
#: A run of more such lines than this is cut to its first :data:`NATIVE_FRAMES_KEPT`: the pool reads the
#: Python stack from faulthandler instead, and forty C frames only push the rank's real output out of view.
#: A Python traceback alternates frame and source lines, so its runs stay short.
NATIVE_RUN_MAX = 8
NATIVE_FRAMES_KEPT = 3


def _fatal_stack(path: str) -> tuple[PythonFrame, ...]:
    """The crashed thread's frames from a rank's faulthandler dump, most recent call first; () without one."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return ()
    frames: list[PythonFrame] = []
    current = False
    for line in text.splitlines():
        if line.startswith("Current thread ") or line.startswith("Stack (most recent call first)"):
            current = True
            continue
        match = _FAULTHANDLER_FRAME.match(line)
        if current and match:
            frames.append(PythonFrame(match["file"], int(match["line"]), match["function"]))
        elif current and frames:
            break  # the blank line after the crashed thread's frames
    return tuple(frames)


class _NativeTrimmer:
    """Passes a rank's output lines through, cutting each run of more than :data:`NATIVE_RUN_MAX` native
    frame lines to its first :data:`NATIVE_FRAMES_KEPT` and a count; holds back at most that many lines."""

    def __init__(self) -> None:
        self.run = 0
        self.held: list[str] = []

    def feed(self, line: str) -> list[str]:
        if not _NATIVE_FRAME.match(line):
            return [*self.close(), line]
        self.run += 1
        if self.run <= NATIVE_FRAMES_KEPT:
            return [line]
        if self.run <= NATIVE_RUN_MAX:
            self.held.append(line)
        else:
            self.held.clear()
        return []

    def close(self) -> list[str]:
        """The end of a run (or of the output): what was held back, or the count of what was cut."""
        cut = self.run - NATIVE_FRAMES_KEPT
        out = [f"  ... ({cut} more native frames trimmed)\n"] if self.run > NATIVE_RUN_MAX else self.held
        self.run, self.held = 0, []
        return out


def _read_stacks(ranks: list[_Rank], wait_s: float) -> dict[int, str]:
    """Read every rank's faulthandler dump, waiting briefly until each has written all of it.

    A rank busy computing writes its dump while the parent reads: a dump read too early held only its first
    thread's header, and the verdict named "an unknown frame". A dump counts as whole once it holds the rank's
    main thread (its stack starts in the rank's ``main``); what there is at ``wait_s`` is returned as it is."""
    deadline = time.monotonic() + wait_s
    stacks: dict[int, str] = {}
    while True:
        for r in ranks:
            try:
                with open(r.stack_path, encoding="utf-8", errors="replace") as f:
                    stacks[r.rank] = f.read()
            except OSError:
                stacks[r.rank] = ""
        if all(_holds_rank_main(text) for text in stacks.values()) or time.monotonic() >= deadline:
            return stacks
        time.sleep(0.02)


def _holds_rank_main(dump: str) -> bool:
    return any(
        frame.function == "main" and frame.file.endswith(stall.RANK_MAIN) for frame in stall.main_thread_frames(dump)
    )


class Pool(WorldPool):
    """Warm worlds keyed by :class:`WorldSpec`, at most ``max_warm`` alive (least recently used go)."""

    def __init__(
        self,
        timeout: float,
        max_warm: int = 2,
        tmp_root: str | None = None,
        startup_timeout: float | None = None,
        shared_zygote: SharedAddress | None = None,
    ) -> None:
        self.timeout = timeout
        self.startup_timeout = startup_timeout
        self.max_warm = max_warm
        self.tmp_root = tmp_root
        self._worlds: collections.OrderedDict[WorldSpec, World] = collections.OrderedDict()
        self.zygotes = Zygotes(shared_zygote)

    def world(self, spec: WorldSpec) -> World:
        world = self._worlds.pop(spec, None)
        if world is None:
            world = World(
                spec, self.timeout, startup_timeout=self.startup_timeout, tmp_root=self.tmp_root, zygotes=self.zygotes
            )
        self._worlds[spec] = world
        while len(self._worlds) > self.max_warm:
            _, oldest = self._worlds.popitem(last=False)
            oldest.close()
        return world

    def close(self) -> None:
        while self._worlds:
            _, world = self._worlds.popitem()
            world.close()
        self.zygotes.close()
