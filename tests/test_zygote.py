"""CPU ranks forked from a zygote: one import of torch and FlashInfer per pool and environment, the same ranks.

Real processes throughout: the zygote is started, forks real ranks of real worlds, is killed, and every process
it had must be gone. Where a fork would not be equivalent to a spawn (another backend, a thread count torch reads
itself, a zygote whose imports failed), the ranks are spawned and the reason is counted."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from pytest_mnnvl.errors import RankCrashed
from pytest_mnnvl.worlds.pool import Pool
from pytest_mnnvl.worlds.world import WorldSpec
from pytest_mnnvl.worlds.zygote import Zygote, Zygotes
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
    assert (zygotes.started, zygotes.forked) == (0, 0)
    assert dict(zygotes.spawned) == {
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
    (reason,) = zygotes.spawned
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
    ((reason, count),) = zygotes.spawned.items()
    assert count == 2 and zygotes.started == 0
    assert "the backend's imports failed: ImportError: broken on purpose" in reason, reason


def _zygote_pids(pool: Pool) -> list[int]:
    return [z.process.pid for z in pool.zygotes._by_key.values() if isinstance(z, Zygote)]


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
        assert pool.zygotes.started == 2
    finally:
        pool.close()
