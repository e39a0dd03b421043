"""Rank worlds under torchrun (``--mnnvl-launcher=torchrun``): every torchrun worker runs the whole pytest
session and *is* one rank (SPMD), so a world can span hosts (multi-node NVLink domains, GB200 NVL72).

Two planes, on purpose:

- **control**: torchrun's own TCPStore (the agent's, ``MASTER_ADDR:MASTER_PORT``) under a prefix of this
  run. Every exchange (collection digest, each test's outcome, each call's result, a plan to agree on)
  is a ``set`` plus a bounded poll, so a dead or hung peer costs a timeout, never a hang, and leaves the
  plane usable (a gloo group that timed out is not);
- **data**: the process groups :mod:`pytest_mnnvl.worlds.rank` builds for the pool's ranks (``init_world`` +
  ``make_context``), over the same store under ``gen<N>/``. Any failed call rebuilds them (destroy, then
  init a new generation) before the next call, as the pool starts a fresh world after a failure.

A call runs ``fn(ctx, …)`` in each rank's main thread. A watchdog thread publishes the rank's stack, what
it waits in (a collective, a sim flag wait: :mod:`pytest_mnnvl.worlds.audit`) and its CPU time over the last
half second when the deadline passes; every audited gloo collective gets the time left as its timeout, so
a rank blocked in one is released just after the deadline. Each rank publishes exactly one status per call
(its outcome, or "late" with that evidence), and every rank derives the same verdict from the same
statuses: results, ``RankError``, ``WorldDeadlock`` or ``WorldTooSlow`` (:mod:`pytest_mnnvl.worlds.stall`), or
``RankCrashed`` (a rank that published nothing: it is gone).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from pytest_mnnvl.errors import MnnvlError, PythonFrame
from pytest_mnnvl.worlds import verdict
from pytest_mnnvl.worlds.world import RankWorld, WorldPool, WorldSpec, function_reference

#: How long a rank waits after its own deadline for the statuses (stacks) of late peers.
LATE_GRACE_S = 2.0
#: Extra time a blocked gloo collective gets past the call's deadline (the watchdog speaks first).
COLLECTIVE_SLACK_S = 0.5
#: How long the survivors wait for each other once torchrun is stopping the world (SIGTERM) or a rank is gone;
#: a wait ends as soon as every rank not known to be gone has answered, so this is paid only for a rank that
#: vanished silently. One second was too little for a loaded 2-core machine (a live peer counted as gone).
TERM_GRACE_S = 3.0
#: How long a new generation of process groups may take to form (a late rank has to come back first).
REBUILD_TIMEOUT_S = 60.0
#: How long the ranks wait for each other at the end of the session.
FINAL_SYNC_S = 30.0
#: Signal the watchdog sends to the main thread to stop a call stuck in Python code (sleep, loops).
INTERRUPT_SIGNAL = signal.SIGUSR2


class Terminated(Exception):
    """torchrun's agent is stopping this rank (SIGTERM): a peer failed or the run was interrupted."""


class CallInterrupted(Exception):
    """The call passed its deadline on this rank; its peers report the deadlock."""


class WorldLost(MnnvlError):
    """The torchrun world cannot run calls any more (a rank is gone or never came back)."""


@dataclass(frozen=True)
class TorchrunEnv:
    """What torchrun tells each worker about the world it belongs to."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    run_id: str
    restart_count: int
    agent_store: bool

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> TorchrunEnv:
        env = os.environ if environ is None else environ
        return cls(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env["LOCAL_RANK"]),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            node_rank=int(env.get("GROUP_RANK", "0")),
            master_addr=env["MASTER_ADDR"],
            master_port=int(env["MASTER_PORT"]),
            run_id=env["TORCHELASTIC_RUN_ID"],
            restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
            agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "") == "True",
        )

    def describe(self) -> str:
        return f"torchrun rank {self.rank} of {self.world_size} (node {self.node_rank}, local rank {self.local_rank})"


def shared_seed(environ: Mapping[str, str] | None = None) -> int:
    """A seed every worker of one torchrun run derives alike (test order, Hypothesis), without talking."""
    env = os.environ if environ is None else environ
    key = f"{env.get('TORCHELASTIC_RUN_ID', '')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return zlib.crc32(key.encode())


@dataclass
class _Call:
    base: str
    deadline: float
    name: str
    done: bool = False
    late: bool = False
    #: Set when the call returned on this rank: the watchdog, measuring CPU time before the deadline, stops.
    finished: threading.Event = field(default_factory=threading.Event)


class SpmdSession:
    """This process's seat in the torchrun world: control plane, process groups, calls, verdicts."""

    def __init__(self, env: TorchrunEnv, backend: str, timeout: float) -> None:
        self.env = env
        self.rank = env.rank
        self.world_size = env.world_size
        self.backend = backend
        self.timeout = timeout
        self.generation = 0
        self.dead: set[int] = set()
        self.broken: str | None = None
        self.terminating = False
        self.calls = 0
        self.pids: list[int] = []
        self.hosts: list[str] = []
        self.plan_disagreements: list[dict[str, Any]] = []
        self._seq = 0
        self._own_keys: dict[int, list[str]] = {}
        self._store: Any = None
        self._side: Any = None
        self._device: Any = None
        self._pg_ready = False
        self._needs_rebuild = False
        self._contexts: dict[tuple[int, str], Any] = {}
        self._lock = threading.Lock()
        self._in_fn = False
        self._call: _Call | None = None
        self._main_ident = threading.main_thread().ident
        fd, self._status_path = tempfile.mkstemp(prefix=f"mnnvl-torchrun-rank{env.rank}-", suffix=".status")
        os.close(fd)

    # -- control plane --------------------------------------------------------------------------
    def connect(self) -> None:
        """Join torchrun's store, take SIGTERM and the interrupt signal, say hello (pids, hosts)."""
        if self._store is not None:
            return
        import datetime

        import torch.distributed as dist

        from pytest_mnnvl.worlds.pool import MULTICAST_OFF

        os.environ.update(MULTICAST_OFF)  # before any NCCL communicator exists in this process
        prefix = f"pytest_mnnvl/{self.env.run_id}/{self.env.restart_count}/"
        # With the c10d rendezvous the agent hosts the store; otherwise rank 0 does (as env:// would).
        host = self.rank == 0 and not self.env.agent_store
        timeout = datetime.timedelta(seconds=REBUILD_TIMEOUT_S)
        server = dist.TCPStore(
            self.env.master_addr, self.env.master_port, None, host, timeout=timeout, wait_for_workers=False
        )
        side = server if host else dist.TCPStore(self.env.master_addr, self.env.master_port, None, False, timeout)
        self._store = dist.PrefixStore(prefix, server)
        self._side = dist.PrefixStore(prefix, side)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)
            signal.signal(INTERRUPT_SIGNAL, self._on_interrupt)
        from pytest_mnnvl.worlds import threads

        # The ranks are these pytest processes, torch is imported: the share of this host's ranks, in-process
        # (torchrun's own OMP_NUM_THREADS=1 for --nproc-per-node > 1, or the user's setting, is left alone).
        threads.apply_in_process(self.env.local_world_size)
        hello = self.exchange("hello", (os.getpid(), socket.gethostname()), REBUILD_TIMEOUT_S)
        missing = [r for r in range(self.world_size) if r not in hello]
        if missing:
            raise WorldLost(f"ranks {missing} did not join this torchrun session within {REBUILD_TIMEOUT_S:g} s")
        self.pids = [hello[r][0] for r in range(self.world_size)]
        self.hosts = [hello[r][1] for r in range(self.world_size)]

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.terminating = True
        if self._in_fn:
            raise Terminated("torchrun is stopping this world (SIGTERM): a peer failed")

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        if self._in_fn:
            raise CallInterrupted("the call passed its deadline on this rank")

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        for old in self._own_keys.pop(seq - 2, []):
            with contextlib.suppress(Exception):
                self._store.delete_key(old)
        return seq

    def _publish(self, seq: int, key: str, value: bytes, side: bool = False) -> None:
        (self._side if side else self._store).set(key, value)
        self._own_keys.setdefault(seq, []).append(key)

    def alive_ranks(self) -> list[int]:
        return [r for r in range(self.world_size) if r not in self.dead]

    def _gather(self, base: str, deadline: float) -> dict[int, bytes]:
        """Read ``base/<rank>`` of every live rank, polling until ``deadline`` (shortened on SIGTERM)."""
        got: dict[int, bytes] = {}
        pause = 0.001
        while True:
            for r in self.alive_ranks():
                if r not in got and self._store.check([f"{base}/{r}"]):
                    got[r] = self._store.get(f"{base}/{r}")
            if all(r in got for r in self.alive_ranks()):
                return got
            now = time.monotonic()
            if self.terminating:
                deadline = min(deadline, now + TERM_GRACE_S)
            if now >= deadline:
                return got
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def exchange(self, name: str, value: Any, timeout: float) -> dict[int, Any]:
        """All-gather ``value`` over the store: ``{rank: value}`` of the live ranks that answered in time."""
        if self._store is None:
            self.connect()
        seq = self._next_seq()
        base = f"x/{seq}"
        self._publish(seq, f"{base}/{self.rank}", pickle.dumps((name, value)))
        out: dict[int, Any] = {}
        for r, raw in self._gather(base, time.monotonic() + timeout).items():
            their_name, their_value = pickle.loads(raw)
            if their_name != name:
                self.broken = f"ranks are out of step: rank {self.rank} is at {name!r}, rank {r} at {their_name!r}"
                raise WorldLost(self.broken + " (the ranks must collect and run the same tests in the same order)")
            out[r] = their_value
        return out

    def agree(self, value: Any, what: str = "value") -> Any:
        """Rank 0's ``value`` on every rank; a rank whose own value differs is recorded."""
        values = self.exchange(f"agree:{what}", value, self.timeout)
        chosen = values.get(0, value)
        differing = sorted(r for r, v in values.items() if v != chosen)
        if differing:
            self.plan_disagreements.append({"what": what, "ranks": differing})
        return chosen

    def roll_call(self, tag: str, wait_s: float) -> list[int]:
        """Ranks that reach ``tag`` within ``wait_s`` (fixed keys: works even when ranks are out of step); done
        early once every rank not already known to be gone is here."""
        if self._store is None:
            return [self.rank]
        with contextlib.suppress(Exception):
            self._store.set(f"{tag}/{self.rank}", b"1")
        deadline = time.monotonic() + wait_s
        while True:
            here = [r for r in range(self.world_size) if self._check(f"{tag}/{r}")]
            if set(here) >= set(self.alive_ranks()) or time.monotonic() >= deadline:
                return here
            time.sleep(0.01)

    def _check(self, key: str) -> bool:
        try:
            return bool(self._store.check([key]))
        except Exception:
            return False

    # -- data plane -----------------------------------------------------------------------------
    def _init_groups(self) -> None:
        import datetime

        import torch.distributed as dist

        from pytest_mnnvl.worlds import audit
        from pytest_mnnvl.worlds.rank import init_world

        store = dist.PrefixStore(f"gen{self.generation}/", self._store)
        try:
            self._device = init_world(
                store,
                self.rank,
                self.world_size,
                self.backend,
                device_index=self.env.local_rank,  # one GPU per local rank, on every node
                timeout=datetime.timedelta(seconds=REBUILD_TIMEOUT_S),
            )
        except Exception as exc:
            self.broken = f"the process groups (generation {self.generation}) could not be formed: {exc}"
            raise WorldLost(self.broken) from None
        audit.install(self._status_path)
        audit.set_before_collective(self._bound_collective)
        self._pg_ready = True

    def _rebuild(self) -> None:
        """New process groups after a failed call (a gloo group that timed out cannot be reused)."""
        import torch.distributed as dist

        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        self._contexts.clear()
        self._pg_ready = False
        self._needs_rebuild = False
        self.generation += 1
        self._init_groups()

    def context(self, pp: int, startup_timeout: float = REBUILD_TIMEOUT_S) -> Any:
        """The :class:`~pytest_mnnvl.worlds.layout.RankContext` of this rank in the PP layout ``pp``."""
        from pytest_mnnvl.worlds.layout import Layout
        from pytest_mnnvl.worlds.rank import make_context

        if self._store is None:
            self.connect()
        if self._needs_rebuild:
            self._rebuild()
        if not self._pg_ready:
            self._init_groups()
        ctx = self._contexts.get((pp, self.backend))
        if ctx is None:
            ctx = make_context(Layout(self.world_size, pp), self.rank, self.backend, self._device)
            # Installing a backend can take minutes (FlashInfer's JIT build): no call's clock starts before
            # every rank is ready.
            ready = self.exchange(f"ready:pp{pp}:gen{self.generation}", True, startup_timeout)
            late = [r for r in self.alive_ranks() if r not in ready]
            if late:
                self.broken = f"ranks {late} did not get ready within {startup_timeout:g} s"
                raise WorldLost(self.broken)
            self._contexts[(pp, self.backend)] = ctx
        return ctx

    def _bound_collective(self, group: Any) -> None:
        """Give a gloo collective issued inside a call the time left to the call's deadline."""
        call = self._call
        if call is None or call.done:
            return
        import datetime

        import torch
        import torch.distributed as dist

        left = max(call.deadline - time.monotonic(), 0.0) + COLLECTIVE_SLACK_S
        with contextlib.suppress(Exception):
            pg: Any = group or dist.group.WORLD
            backend = pg._get_backend(torch.device("cpu"))
            if isinstance(backend, dist.ProcessGroupGloo):
                backend._set_default_timeout(datetime.timedelta(seconds=left))

    # -- calls ----------------------------------------------------------------------------------
    def call(
        self,
        pp: int,
        fn: Callable[..., Any],
        args: Iterable[Any],
        kwargs: dict[str, Any],
        timeout: float,
        startup_timeout: float = REBUILD_TIMEOUT_S,
    ) -> Any:
        __tracebackhide__ = True
        from pytest_mnnvl.worlds.rank import _outcome

        if self.broken:
            raise WorldLost(f"the torchrun world cannot run calls any more: {self.broken}")
        name = getattr(fn, "__qualname__", repr(fn))
        ctx = self.context(pp, startup_timeout)
        self.calls += 1
        seq = self._next_seq()
        from pytest_mnnvl.worlds import stall

        state = _Call(f"c/{seq}", time.monotonic() + timeout, name)
        self._call = state
        # Starts measuring this rank's CPU time a little before the deadline (stall.py: computing or idle).
        timer = threading.Timer(max(0.0, timeout - stall.CPU_WINDOW_S), self._on_deadline, args=(state, seq))
        timer.daemon = True
        timer.start()
        try:
            with self._lock:
                self._in_fn = True
            outcome = _outcome(fn, ctx, tuple(args), dict(kwargs))
        finally:
            with self._lock:
                self._in_fn = False
                state.done = True
                late = state.late
            state.finished.set()
            timer.cancel()
            self._call = None
        if not late:
            self._publish(seq, f"{state.base}/{self.rank}", _dumps_status(("done", outcome)))
        statuses = {r: pickle.loads(raw) for r, raw in self._gather(state.base, state.deadline + LATE_GRACE_S).items()}
        return self._verdict(state, statuses, timeout)

    def _on_deadline(self, state: _Call, seq: int) -> None:
        """Watchdog: the call is still running here at its deadline; publish where, what it waits in and how
        busy it was since the timer fired (:mod:`pytest_mnnvl.worlds.stall`), then interrupt it."""
        from pytest_mnnvl.worlds import audit, stall

        main = threading.main_thread().native_id
        cpu0, t0, running0 = time.process_time(), time.monotonic(), stall.main_thread_runnable(os.getpid(), main)
        if state.finished.wait(max(0.0, max(state.deadline, t0 + stall.MIN_CPU_WINDOW_S) - t0)):
            return
        with self._lock:
            if state.done:
                return
            state.late = True
            elapsed = time.monotonic() - t0
            share = (time.process_time() - cpu0) / elapsed if elapsed > 0 else None
            runnable = bool(running0) and bool(stall.main_thread_runnable(os.getpid(), main))
            frame = sys._current_frames().get(self._main_ident or 0)
            stack = _call_stack(frame)
            wait = audit.waiting_in(self._status_path)
            status = ("late", stack, wait.to_line() if wait is not None else "", share, _where(frame), runnable)
            with contextlib.suppress(Exception):
                self._publish(seq, f"{state.base}/{self.rank}", _dumps_status(status), side=True)
            if self._in_fn and self._main_ident is not None:
                # Stops Python-level hangs; a gloo collective is released by its bounded timeout.
                signal.pthread_kill(self._main_ident, INTERRUPT_SIGNAL)

    def _verdict(self, state: _Call, statuses: dict[int, tuple[Any, ...]], timeout: float) -> Any:
        __tracebackhide__ = True
        during = f"{state.name}()"
        missing = [r for r in self.alive_ranks() if r not in statuses]
        if missing:
            self.dead.update(missing)
            self.broken = f"rank {missing[0]} left the world during {during}"
            others = f"; also gone: ranks {missing[1:]}" if missing[1:] else ""
            where = ", ".join(f"rank {r}: pid {self.pids[r]} on {self.hosts[r]}" for r in missing if self.pids)
            raise verdict.crashed(missing[0], None, during, more=f"{others} ({where}); the other ranks stop here")
        kinds = {r: s[0] for r, s in statuses.items()}
        if any(kind != "done" or statuses[r][1][0] != "ok" for r, kind in kinds.items()):
            self._needs_rebuild = True
        late = sorted(r for r, kind in kinds.items() if kind == "late")
        if late:
            from pytest_mnnvl.worlds import audit, stall, threads

            stacks = {
                r: (s[1] if s[0] == "late" else "(returned from the call; waiting for its peers)")
                for r, s in statuses.items()
            }
            ranks = [
                stall.RankAtDeadline.of(r, False, audit.Wait.from_line(s[2]), s[3], s[4], s[5])
                if s[0] == "late"
                else stall.RankAtDeadline.of(r, True, None, None)
                for r, s in sorted(statuses.items())
            ]
            described = threads.describe(os.environ, self.env.local_world_size) + " (ranks on this host)"
            raise verdict.late(ranks, self.backend, timeout, stacks, f"in {during}", described)
        return verdict.outcomes({r: s[1] for r, s in statuses.items()}, self.world_size)

    # -- end ------------------------------------------------------------------------------------
    def writer(self) -> int:
        """The rank that writes the report and JUnit: 0, or the lowest survivor when rank 0 is gone."""
        alive = self.alive_ranks()
        return alive[0] if alive else self.rank

    def settle_survivors(self) -> None:
        """When torchrun is stopping the world, find out who is still here (for :meth:`writer`)."""
        if self.terminating or self.broken:
            here = self.roll_call("survivors", TERM_GRACE_S)
            self.dead.update(r for r in range(self.world_size) if r not in here)

    def close(self) -> None:
        """Wait (bounded) for every live rank to finish the session, then leave the process groups."""
        if self._store is None:
            return
        wait_s = TERM_GRACE_S if (self.terminating or self.broken) else FINAL_SYNC_S
        self.roll_call("finished", wait_s)
        with contextlib.suppress(Exception):
            import torch.distributed as dist

            if dist.is_initialized() and not self.broken:
                dist.destroy_process_group()
        with contextlib.suppress(OSError):
            os.unlink(self._status_path)


def _call_stack(frame: Any) -> str:
    """The main thread's stack from the called function down (pytest's and our frames left out)."""
    if frame is None:
        return ""
    frames = traceback.extract_stack(frame)
    start = next((i + 1 for i, f in enumerate(frames) if f.name == "_outcome" and f.filename.endswith("rank.py")), 0)
    return "Stack of the main thread (most recent call last):\n" + "".join(traceback.format_list(frames[start:]))


def _where(frame: Any) -> PythonFrame | None:
    """The innermost frame of the main thread outside the standard library (where a computing rank is)."""
    from pytest_mnnvl.worlds import stall

    if frame is None:
        return None
    frames = [PythonFrame(f.filename, f.lineno or 0, f.name) for f in reversed(traceback.extract_stack(frame))]
    return stall.where(frames)


def _dumps_status(status: tuple[Any, ...]) -> bytes:
    try:
        return pickle.dumps(status)
    except Exception as exc:
        return pickle.dumps(("done", ("error", f"the result could not be pickled for the peers: {exc!r}")))


class SpmdWorld(RankWorld):
    """What ``mnnvl_world(...)`` returns under torchrun: a :class:`~pytest_mnnvl.worlds.world.RankWorld`."""

    def __init__(self, session: SpmdSession, spec: WorldSpec, timeout: float, startup_timeout: float) -> None:
        self.session = session
        self.spec = spec
        self.timeout = timeout
        self.startup_timeout = startup_timeout

    @property
    def world_size(self) -> int:
        return int(self.spec.world_size)

    @property
    def pp(self) -> int:
        return int(self.spec.pp)

    @property
    def backend(self) -> str:
        return str(self.spec.backend)

    @property
    def alive(self) -> bool:
        return self.session.broken is None

    @property
    def pids(self) -> list[int]:
        if not self.session.pids:
            self.session.connect()
        return list(self.session.pids)

    @property
    def starts(self) -> int:
        return self.session.generation + 1

    @property
    def calls(self) -> int:
        return self.session.calls

    def call(
        self,
        fn: Callable[..., Any],
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> list[Any]:
        __tracebackhide__ = True
        function_reference(fn)  # the same rule as the pool's, so a test runs under both launchers
        result: list[Any] = self.session.call(
            self.pp, fn, args, dict(kwargs or {}), self.timeout if timeout is None else timeout, self.startup_timeout
        )
        return result

    def agree(self, value: Any, what: str = "value") -> Any:
        """Rank 0's ``value`` on every rank (e.g. the plan Hypothesis drew there)."""
        return self.session.agree(value, what)

    def close(self) -> None:
        """Nothing to stop: the ranks are the pytest processes themselves."""


class SpmdPool(WorldPool):
    """The pool's surface under torchrun: one world, of torchrun's size; other sizes are skipped."""

    def __init__(self, session: SpmdSession, timeout: float, startup_timeout: float | None) -> None:
        self.session = session
        self.timeout = timeout
        self.startup_timeout = startup_timeout
        self._worlds: dict[WorldSpec, SpmdWorld] = {}

    def world(self, spec: WorldSpec) -> SpmdWorld:
        reason = self.unsupported(spec)
        if reason:
            _skip(reason)
        world = self._worlds.get(spec)
        if world is None:
            from pytest_mnnvl.worlds.pool import DEFAULT_STARTUP_TIMEOUT_OTHER_S, DEFAULT_STARTUP_TIMEOUT_S

            default = DEFAULT_STARTUP_TIMEOUT_S.get(spec.backend, DEFAULT_STARTUP_TIMEOUT_OTHER_S)
            startup = self.startup_timeout if self.startup_timeout is not None else max(default, self.timeout)
            world = self._worlds[spec] = SpmdWorld(self.session, spec, self.timeout, startup)
        return world

    def unsupported(self, spec: WorldSpec) -> str | None:
        """Why this torchrun session cannot give ``spec`` (``None`` when it can)."""
        s = self.session
        if spec.world_size != s.world_size:
            return (
                f"under --mnnvl-launcher=torchrun the world is torchrun's: {s.world_size} ranks, not "
                f"{spec.world_size}; run another torchrun session with {spec.world_size} processes in all "
                f"(or choose sizes with --mnnvl-world-sizes={s.world_size})"
            )
        if spec.backend not in (s.backend, "plain"):
            return (
                f"this torchrun session runs the {s.backend} backend; a {spec.backend} world needs its own "
                f"session (--mnnvl-backend={spec.backend})"
            )
        differing = {k: v for k, v in spec.env if os.environ.get(k) != v}
        if differing:
            return (
                f"a world with its own rank environment ({differing}) needs --mnnvl-launcher=spawn: under "
                "torchrun the ranks are the pytest processes; set it in torchrun's environment instead"
            )
        return None

    def close(self) -> None:
        self._worlds.clear()


def _skip(reason: str) -> NoReturn:
    import pytest

    raise pytest.skip.Exception(reason, _use_item_location=True)
