"""CPU ranks forked from a zygote: one import of torch and FlashInfer per pool and environment, the same ranks.

Real processes throughout: the zygote is started, forks real ranks of real worlds, is killed, and every process
it had must be gone. Where a fork would not be equivalent to a spawn (another backend, a thread count torch reads
itself, a zygote whose imports failed), the ranks are spawned and the reason is counted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_mnnvl.errors import RankCrashed
from pytest_mnnvl.worlds.pool import Pool, rank_world_env
from pytest_mnnvl.worlds.world import WorldSpec
from pytest_mnnvl.worlds.zygote import RankStarts, SharedZygote, Zygote, Zygotes
from tests import zygote_rank_fns as fns
from tests.conftest import pid_alive

RANKFNS = """
import os

def parent_and_threads(ctx):
    import torch

    return os.getppid(), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
"""

TEST = """
import os

import rankfns


def test_parents(mnnvl_world):
    seen = mnnvl_world(2).run(rankfns.parent_and_threads) + mnnvl_world(4).run(rankfns.parent_and_threads)
    print("PARENTS=" + ",".join(str(p) for p, _, _ in seen) + " SESSION=" + str(os.getpid()))
    assert all(str(t) == omp for _, t, omp in seen), seen
"""


def _parents(result: pytest.RunResult) -> tuple[set[int], int]:
    (line,) = [line for line in result.outlines if "PARENTS=" in line]
    parents, _, session = line.partition("PARENTS=")[2].partition(" SESSION=")
    return {int(p) for p in parents.split(",")}, int(session.split()[0])


def test_a_sessions_cpu_ranks_are_forked_from_one_zygote(rank_tester: pytest.Pytester) -> None:
    rank_tester.makepyfile(rankfns=RANKFNS, test_it=TEST)
    result = rank_tester.runpytest_subprocess("-s", "-vv", "--mnnvl-backend=sim")
    result.assert_outcomes(passed=1)
    parents, session = _parents(result)
    assert len(parents) == 1 and session not in parents, (parents, session)
    result.stdout.fnmatch_lines(["mnnvl: rank starts: 6 forked from 1 zygote (torch and FlashInfer imported once*"])


def test_zygote_off_spawns_every_rank_and_says_why(
    rank_tester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_MNNVL_ZYGOTE", "0")
    rank_tester.makepyfile(rankfns=RANKFNS, test_it=TEST)
    result = rank_tester.runpytest_subprocess("-s", "-vv", "--mnnvl-backend=sim")
    result.assert_outcomes(passed=1)
    parents, session = _parents(result)
    assert parents == {session}
    result.stdout.fnmatch_lines(["mnnvl: rank starts: 6 spawned (PYTEST_MNNVL_ZYGOTE=0)"])


def test_what_is_never_forked_is_counted_and_starts_no_zygote() -> None:
    zygotes = Zygotes()
    env = dict(os.environ)
    assert zygotes.spawn(env, "flashinfer", 1) is None
    assert zygotes.spawn(env, "sim", None) is None
    assert zygotes.spawn(env, "sim", 10_000) is None
    assert zygotes.spawn({**env, "PYTEST_MNNVL_ZYGOTE": "0"}, "sim", 1) is None
    assert (zygotes.starts.zygotes, zygotes.starts.forked) == (0, 0)
    assert dict(zygotes.starts.spawned) == {
        "the flashinfer backend": 1,
        "torch reads their thread count itself": 2,
        "PYTEST_MNNVL_ZYGOTE=0": 1,
    }


def test_the_zygote_imports_with_no_gpu_and_its_ranks_get_their_own_devices_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a GPU host the imports must not reach cuInit (its thread would be forked), yet a rank sees the GPUs its
    world was given: the zygote's environment (read from /proc, as the kernel started it) against the rank's."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    pool = Pool(timeout=60.0)
    try:
        seen = pool.world(WorldSpec(2, backend="sim")).run(fns.devices_here_and_in_parent)
        (zygote,) = _zygote_pids(pool)
    finally:
        pool.close()
    assert seen == [(zygote, "0", None, "", "1")] * 2, seen


def test_a_zygote_left_with_a_second_thread_is_refused(tmp_path: Path) -> None:
    """What the CUDA driver does on a GPU host, done here by a sitecustomize that starts a thread."""
    (tmp_path / "sitecustomize.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    zygotes = Zygotes()
    try:
        assert zygotes.spawn(env, "sim", 1) is None
    finally:
        zygotes.close()
    (reason,) = zygotes.starts.spawned
    assert "the imports left 2 threads running (a fork keeps only one)" in reason, reason


def test_a_zygote_whose_imports_fail_is_refused_and_its_ranks_spawned(tmp_path: Path) -> None:
    broken = tmp_path / "flashinfer"
    broken.mkdir()
    (broken / "__init__.py").write_text('raise ImportError("broken on purpose")\n')
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    zygotes = Zygotes()
    try:
        assert zygotes.spawn(env, "sim", 1) is None
        assert zygotes.spawn(env, "sim", 1) is None  # refused once: not tried again
    finally:
        zygotes.close()
    ((reason, count),) = zygotes.starts.spawned.items()
    assert count == 2 and zygotes.starts.zygotes == 0
    assert "the backend's imports failed: ImportError: broken on purpose" in reason, reason


def _zygote_pids(pool: Pool) -> list[int]:
    return [z.pid for z in pool.zygotes._by_key.values() if isinstance(z, Zygote)]


def _gone(pids: list[int], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(pid_alive(pid) for pid in pids)


def test_a_killed_zygote_takes_its_ranks_and_the_next_world_starts_clean() -> None:
    pool = Pool(timeout=60.0)
    try:
        world = pool.world(WorldSpec(2, backend="sim"))
        first = world.run(fns.pid_parent_threads)
        ranks = [pid for pid, _, _, _ in first]
        (zygote,) = _zygote_pids(pool)
        assert {parent for _, parent, _, _ in first} == {zygote}
        os.kill(zygote, signal.SIGKILL)
        assert _gone([zygote, *ranks]), "the zygote's ranks outlived it"
        try:
            again = world.run(fns.pid_parent_threads)
        except RankCrashed:
            again = world.run(fns.pid_parent_threads)
        (fresh,) = _zygote_pids(pool)
        assert fresh != zygote and {parent for _, parent, _, _ in again} == {fresh}, (zygote, fresh, again)
    finally:
        pool.close()
    assert _gone([fresh, *(pid for pid, _, _, _ in again)]), "something outlived pool.close()"


def test_a_forked_rank_killed_by_a_signal_is_reported_with_it() -> None:
    pool = Pool(timeout=60.0)
    try:
        world = pool.world(WorldSpec(2, backend="sim"))
        with pytest.raises(RankCrashed, match="SIGSEGV"):
            world.run(fns.segfault_on_rank_1)
    finally:
        pool.close()


def test_ranks_start_in_the_directory_their_world_was_started_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = Pool(timeout=60.0)
    try:
        seen = []
        for size, name in ((2, "a"), (3, "b")):  # two worlds, the same environment, two directories
            (tmp_path / name).mkdir()
            monkeypatch.chdir(tmp_path / name)
            seen.append(set(pool.world(WorldSpec(size, backend="sim")).run(fns.cwd)))
        assert seen == [{str(tmp_path / "a")}, {str(tmp_path / "b")}]
        assert pool.zygotes.starts.zygotes == 2
    finally:
        pool.close()


# ---- the session's shared zygote (xdist) ---------------------------------------------------------------

XDIST_TEST = """
import os
from pathlib import Path

import pytest
import rankfns


@pytest.mark.parametrize("size", [2, 4])
def test_parents(mnnvl_world, size):
    seen = mnnvl_world(size).run(rankfns.parent_and_threads)
    worker = os.environ["PYTEST_XDIST_WORKER"]
    with open(Path(__file__).parent / f"parents-{worker}-{size}.txt", "w") as f:
        f.write(" ".join(str(p) for p, _, _ in seen) + " " + str(os.getpid()))
"""


def test_xdist_workers_fork_their_ranks_from_one_zygote_the_controller_started(rank_tester: pytest.Pytester) -> None:
    rank_tester.makepyfile(rankfns=RANKFNS, test_it=XDIST_TEST)
    result = rank_tester.runpytest_subprocess("-vv", "-n", "2", "--dist", "each", "--mnnvl-backend=sim")
    result.assert_outcomes(passed=4)
    parents, workers = set(), set()
    for found in rank_tester.path.glob("parents-*.txt"):
        *ranks, worker = (int(pid) for pid in found.read_text().split())
        parents.update(ranks)
        workers.add(worker)
    assert len(workers) == 2 and len(parents) == 1 and not parents & workers, (parents, workers)
    result.stdout.fnmatch_lines(
        [
            "mnnvl: rank starts: 12 forked from the session's shared zygote (used by 2 workers; its imports took"
            " *.* s, a worker waited up to *.* s for them)"
        ]
    )
    assert not pid_alive(parents.pop()), "the shared zygote outlived its session"


def _shared(env: dict[str, str] | None = None) -> SharedZygote:
    world_env, _ = rank_world_env(WorldSpec(2), env)
    return SharedZygote(world_env, "sim", os.getcwd())


WORKER = """
import os, sys, time
from pytest_mnnvl.worlds.pool import Pool
from pytest_mnnvl.worlds.world import WorldSpec
from pytest_mnnvl.worlds.zygote import SharedAddress
from tests import zygote_rank_fns as fns

name, key, log, mark = sys.argv[1:5]  # the abstract name without its leading NUL (no argv holds one)
pool = Pool(timeout=60.0, shared_zygote=SharedAddress("\\0" + name, key, log))
world = pool.world(WorldSpec(2, backend="sim"))
ranks = world.run(fns.pid_parent_threads)
print(" ".join(f"{pid}:{parent}" for pid, parent, _, _ in ranks), flush=True)
world.call(fns.sleep_long, (mark,), timeout=900)  # killed in it: only the zygote can stop these ranks
"""


def test_a_worker_that_dies_takes_its_ranks_and_the_shared_zygote_serves_the_others(tmp_path: Path) -> None:
    shared = _shared()
    pool = Pool(timeout=60.0, shared_zygote=shared.address)
    address = shared.address
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, address.address[1:], address.key, address.log, str(tmp_path / "busy")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        line = worker.stdout.readline()
        ranks = [tuple(int(x) for x in pair.split(":")) for pair in line.split()]
        assert len(ranks) == 2 and {parent for _, parent in ranks} == {shared.process.pid}, line
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("busy-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list(tmp_path.glob("busy-*"))) == 2, "the ranks never started the long call"
        worker.kill()
        worker.wait()
        assert _gone([pid for pid, _ in ranks]), "a dead worker's ranks outlived it"
        assert shared.process.poll() is None
        mine = pool.world(WorldSpec(2, backend="sim")).run(fns.pid_parent_threads)
        assert {parent for _, parent, _, _ in mine} == {shared.process.pid}
        assert (pool.zygotes.starts.forked_shared, pool.zygotes.starts.zygotes) == (2, 0)
    finally:
        worker.kill()
        pool.close()
        shared.close()
    assert _gone([shared.process.pid, *(pid for pid, _, _, _ in mine)])


OWNER = """
import os, time
from pytest_mnnvl.worlds.pool import Pool, rank_world_env
from pytest_mnnvl.worlds.world import WorldSpec
from pytest_mnnvl.worlds.zygote import SharedZygote
from tests import zygote_rank_fns as fns

shared = SharedZygote(rank_world_env(WorldSpec(2))[0], "sim", os.getcwd())
pool = Pool(timeout=60.0, shared_zygote=shared.address)
ranks = pool.world(WorldSpec(2, backend="sim")).run(fns.pid_parent_threads)
print(shared.process.pid, shared.address.log, *(pid for pid, _, _, _ in ranks), flush=True)
time.sleep(600)
"""


def test_a_killed_session_takes_its_shared_zygote_and_every_rank_with_it() -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        zygote, _log, *ranks = owner.stdout.readline().split()
        pids = [int(zygote), *(int(pid) for pid in ranks)]
        assert len(pids) == 3 and all(pid_alive(pid) for pid in pids)
        owner.kill()
        owner.wait()
        assert _gone(pids), "the shared zygote or a rank outlived the session that started it"
    finally:
        owner.kill()


def test_a_shared_zygote_whose_imports_fail_is_not_used_and_says_why(tmp_path: Path) -> None:
    broken = tmp_path / "flashinfer"
    broken.mkdir()
    (broken / "__init__.py").write_text('raise ImportError("broken on purpose")\n')
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    shared = _shared(env)
    zygotes = Zygotes(shared.address)
    try:
        world_env, threads = rank_world_env(WorldSpec(2), env)
        assert zygotes.spawn(world_env, "sim", threads) is None
        assert shared.process.poll() is None  # still there, saying the same to every worker
    finally:
        zygotes.close()
        shared.close()
    line = zygotes.describe()
    assert "the shared zygote not used by 1 worker: the backend's imports failed: ImportError: broken on purpose" in (
        line
    ), line
    assert "1 spawned (no zygote: the backend's imports failed" in line, line


def test_ranks_of_another_environment_get_a_zygote_of_their_own() -> None:
    shared = _shared()
    pool = Pool(timeout=60.0, shared_zygote=shared.address)
    try:
        spec = WorldSpec(2, backend="sim", env=(("MNNVL_TEST_OTHER", "1"),))
        parents = {parent for _, parent, _, _ in pool.world(spec).run(fns.pid_parent_threads)}
        assert parents != {shared.process.pid} and len(parents) == 1
        assert (pool.zygotes.starts.forked, pool.zygotes.starts.zygotes, pool.zygotes.starts.forked_shared) == (2, 1, 0)
    finally:
        pool.close()
        shared.close()


def test_the_shared_zygote_turns_away_another_user() -> None:
    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root")
    shared = _shared()
    try:
        pid = os.fork()
        if pid == 0:  # as nobody: connected, then closed without a word
            code = 1
            try:
                os.setuid(65534)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(shared.address.address)
                sock.settimeout(120.0)
                code = 0 if sock.recv(1) == b"" else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # This user is still served.
        zygote = Zygote.connect(shared.address)
        assert zygote.pid == shared.process.pid
        zygote.close()
    finally:
        shared.close()


def test_rank_starts_travel_from_workers_and_add_up() -> None:
    one = RankStarts(forked=2, zygotes=1, forked_shared=6, shared_users=1, import_s=3.0, shared_import_s=4.0)
    one.spawned["the flashinfer backend"] += 4
    other = RankStarts.from_dict({**one.to_dict(), "shared_wait_s": 2.5})
    one.shared_wait_s = 1.5
    total = RankStarts()
    total.add(RankStarts.from_dict(one.to_dict()))
    total.add(other)
    assert total.to_dict() == {
        "forked": 4,
        "zygotes": 2,
        "forked_shared": 12,
        "shared_users": 2,
        "spawned": {"the flashinfer backend": 8},
        "shared_failures": {},
        # Own zygotes' imports add up; the shared zygote is one (its import once), its longest wait is the wait.
        "import_s": 6.0,
        "shared_import_s": 4.0,
        "shared_wait_s": 2.5,
    }
    assert total.describe() == (
        "mnnvl: rank starts: 12 forked from the session's shared zygote (used by 2 workers; its imports took 4.0 s,"
        " a worker waited up to 2.5 s for them); 4 forked from 2 zygotes (torch and FlashInfer imported once per"
        " zygote: 6.0 s in all); 8 spawned (the flashinfer backend)"
    )


def test_a_zygote_says_how_long_its_imports_took_and_how_long_it_was_waited_for() -> None:
    env, _ = rank_world_env(WorldSpec(2))
    began = time.monotonic()
    zygote = Zygote.start(env, "sim", os.getcwd())
    try:
        elapsed = time.monotonic() - began
        # torch alone takes a good part of a second to import anywhere; the wait covers the import.
        assert 0.2 < zygote.import_s <= zygote.waited_s <= elapsed, (zygote.import_s, zygote.waited_s, elapsed)
    finally:
        zygote.close()
