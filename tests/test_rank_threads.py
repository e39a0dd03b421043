"""Each rank's torch runs its share of the machine's cores, not a pool sized for the whole machine.

Every case runs a real pytest session (pytester subprocess) whose rank function reports what torch in the
rank really got: ``torch.get_num_threads()`` and ``OMP_NUM_THREADS``. The share is
max(1, usable cores // (ranks of the world × worlds running at once)); a user's setting (pytest's
environment, a ``pytest_mnnvl_rank_env`` hook) wins.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_mnnvl.worlds import threads

RANKFNS = """
import os
import torch

def threads(ctx):
    return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"), os.environ.get("MKL_NUM_THREADS")
"""

TEST = """
import json
import rankfns

def test_threads(mnnvl_world):
    out = mnnvl_world({world_size}, backend="plain").run(rankfns.threads)
    print("SEEN=" + json.dumps(out))
"""


def _threads_seen(result: pytest.RunResult) -> list[list[object]]:
    import json

    lines = [line.partition("SEEN=")[2] for line in result.outlines if "SEEN=" in line]
    assert len(lines) == 1, result.stdout.str()
    seen: list[list[object]] = json.loads(lines[0].rpartition("]")[0] + "]")
    return seen


def _session(rank_tester: pytest.Pytester, world_size: int = 2, *args: str) -> pytest.RunResult:
    rank_tester.makepyfile(rankfns=RANKFNS)
    rank_tester.makepyfile(test_it=TEST.format(world_size=world_size))
    result = rank_tester.runpytest_subprocess("-s", *args)
    result.assert_outcomes(passed=1)
    return result


def _torch_threads_with(variable: str | None = None, value: str = "") -> int:
    """What torch itself makes of ``variable=value`` on this machine (it caps the count at the cores it sees);
    with no variable, torch's own default."""
    env = {k: v for k, v in os.environ.items() if k not in threads.USER_VARIABLES}
    if variable is not None:
        env[variable] = value
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


def _expected_share(world_size: int, worlds: int = 1) -> int:
    # Written out here rather than taken from the plugin: the formula the README documents.
    cpus = len(os.sched_getaffinity(0))
    limit = threads.cgroup_cpu_limit()
    usable = min(cpus, max(1, int(limit))) if limit is not None else cpus
    return max(1, usable // (world_size * worlds))


@pytest.fixture
def no_user_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*threads.USER_VARIABLES, threads.POLICY_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("no_user_threads")
@pytest.mark.parametrize("world_size", [2, 4])
def test_default_is_the_ranks_share(rank_tester: pytest.Pytester, world_size: int) -> None:
    share = _expected_share(world_size)
    result = _session(rank_tester, world_size)
    assert _threads_seen(result) == [[share, str(share), None]] * world_size
    result.stdout.fnmatch_lines(
        [
            f"mnnvl: rank threads: {share} intra-op thread* per rank of a 2-rank world, "
            f"{_expected_share(4)} per rank of a 4-rank world (* usable cores, 1 world at a time*"
        ]
    )


@pytest.mark.usefixtures("no_user_threads")
def test_xdist_workers_divide_the_machine_further(rank_tester: pytest.Pytester) -> None:
    rank_tester.makepyfile(rankfns=RANKFNS)
    rank_tester.makepyfile(
        test_it="""
        import rankfns
        import pytest

        @pytest.mark.parametrize("n", [0, 1])
        def test_threads(mnnvl_world, n):
            out = mnnvl_world(2, backend="plain").run(rankfns.threads)
            print("SEEN=", out)
            assert [list(o) for o in out] == [[{share}, "{share}", None]] * 2
        """.format(share=_expected_share(2, worlds=2))
    )
    result = rank_tester.runpytest_subprocess("-n", "2")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["mnnvl: rank threads: * (* usable cores, 2 worlds at a time: xdist workers;*"])


@pytest.mark.usefixtures("no_user_threads")
def test_the_parents_environment_wins(rank_tester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    result = _session(rank_tester)
    assert _threads_seen(result) == [[_torch_threads_with("OMP_NUM_THREADS", "3"), "3", None]] * 2
    result.stdout.fnmatch_lines(["mnnvl: rank threads: OMP_NUM_THREADS=3 from the environment*"])


@pytest.mark.usefixtures("no_user_threads")
def test_mkl_num_threads_alone_is_a_user_setting_too(
    rank_tester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    result = _session(rank_tester)
    assert _threads_seen(result) == [[_torch_threads_with("MKL_NUM_THREADS", "1"), None, "1"]] * 2


@pytest.mark.usefixtures("no_user_threads")
def test_a_rank_env_hook_wins(rank_tester: pytest.Pytester) -> None:
    rank_tester.makeconftest(
        """
        def pytest_mnnvl_rank_env(config, spec):
            return {"OMP_NUM_THREADS": 2}
        """
    )
    result = _session(rank_tester)
    assert _threads_seen(result) == [[_torch_threads_with("OMP_NUM_THREADS", "2"), "2", None]] * 2


@pytest.mark.usefixtures("no_user_threads")
def test_torch_policy_keeps_torchs_own_default(rank_tester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old behaviour, for comparisons: every rank's pool sized for the whole machine."""
    monkeypatch.setenv(threads.POLICY_ENV, "torch")
    result = _session(rank_tester)
    assert _threads_seen(result) == [[_torch_threads_with(), None, None]] * 2
    result.stdout.fnmatch_lines([f"mnnvl: rank threads: torch's default ({threads.POLICY_ENV}=torch)*"])


@pytest.mark.usefixtures("no_user_threads")
@pytest.mark.parametrize("value", ["lots", "0", "-2", ""])
def test_a_bad_policy_is_a_usage_error(
    rank_tester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(threads.POLICY_ENV, value)
    rank_tester.makepyfile(test_it="def test_nothing():\n    pass\n")
    result = rank_tester.runpytest_subprocess()
    if value == "":
        result.assert_outcomes(passed=1)  # empty is unset
        return
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"ERROR: {threads.POLICY_ENV}={value!r} is not valid; allowed: share (the default), torch, or a count >= 1"]
    )


@pytest.mark.usefixtures("no_user_threads")
def test_a_fixed_count_for_every_rank(rank_tester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(threads.POLICY_ENV, "2")
    result = _session(rank_tester)
    assert _threads_seen(result) == [[_torch_threads_with("OMP_NUM_THREADS", "2"), "2", None]] * 2


def test_cgroup_quota_caps_the_usable_cores(tmp_path: Path) -> None:
    """cgroup v2 ``cpu.max`` and v1 ``cpu.cfs_quota_us``, read as the kernel writes them (a container's CPU limit
    is a quota, not an affinity mask)."""
    v2 = tmp_path / "v2"
    (v2 / "job").mkdir(parents=True)
    (v2 / "job" / "cpu.max").write_text("250000 100000\n")
    proc_v2 = tmp_path / "cgroup-v2"
    proc_v2.write_text("0::/job\n")
    assert threads.cgroup_cpu_limit(str(v2), str(proc_v2)) == 2.5
    (v2 / "job" / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(str(v2), str(proc_v2)) is None

    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "job").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu,cpuacct" / "job" / "cpu.cfs_period_us").write_text("100000\n")
    proc_v1 = tmp_path / "cgroup-v1"
    proc_v1.write_text("4:memory:/job\n3:cpu,cpuacct:/job\n0::/\n")
    assert threads.cgroup_cpu_limit(str(v1), str(proc_v1)) == 4.0
    (v1 / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_cpu_limit(str(v1), str(proc_v1)) is None
    assert threads.cgroup_cpu_limit(str(tmp_path / "absent"), str(proc_v1)) is None


def test_share_formula() -> None:
    assert threads.share(2, cores=16, worlds=1) == 8
    assert threads.share(4, cores=16, worlds=2) == 2
    assert threads.share(4, cores=2, worlds=1) == 1
    assert threads.share(64, cores=16, worlds=8) == 1


def test_worlds_at_once_are_the_xdist_workers() -> None:
    assert threads.worlds_at_once({"PYTEST_XDIST_WORKER_COUNT": "3"}) == 3
    assert threads.worlds_at_once({}) == 1
    assert threads.worlds_at_once({"PYTEST_XDIST_WORKER_COUNT": "zero"}) == 1
    # What a spawned rank of an xdist worker gets: the share of a world among 3 concurrent ones.
    env = {"PYTEST_XDIST_WORKER_COUNT": "3"}
    threads.set_in_rank_env(env, 2)
    assert env["OMP_NUM_THREADS"] == str(threads.share(2, worlds=3))
    env = {"PYTEST_XDIST_WORKER_COUNT": "3", "MKL_NUM_THREADS": "5"}
    threads.set_in_rank_env(env, 2)
    assert "OMP_NUM_THREADS" not in env
