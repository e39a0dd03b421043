"""A late call is a deadlock only when some rank waits for a peer that will not come; a world whose ranks all
compute (or wait for ones that do) is slow, and says so.

Real sessions (pytester subprocesses) on real rank worlds, each a few seconds past a 1-2 s timeout: busy
loops, a barrier against a sleeping or a computing peer, the sim's flag wait against a peer that skipped its
dispatch or is still computing before it, and the conformance suite on a manager that computes past the
plan's timeout. The flag waits' status is checked on both kernels (0.7.2 and the 0.7.4 twin) in a real
process as well.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "conformance" / "test_invariants.py"

RANKFNS = """
import os
import time
import torch
import torch.distributed as dist


def spin(ctx, seconds=30.0):
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x += 1
    return x


def barrier_against(ctx, other):
    if ctx.rank == 0:
        if other == "sleep":
            time.sleep(30)
        else:
            spin(ctx)
    dist.barrier(group=ctx.cpu_group)
    return ctx.rank


def _a2a(ctx):
    from flashinfer.comm.comm_backend import TorchDistBackend
    from pytest_mnnvl.backends.sim import Mapping, MnnvlConfig, MoeAlltoAll

    ep = ctx.ep_size
    mapping = Mapping(world_size=ep, rank=ctx.ep_rank, gpus_per_node=ep, tp_size=ep, moe_ep_size=ep)
    return MoeAlltoAll(mapping, max_num_tokens=16, top_k=2, num_experts=8, workspace_size_per_rank=1 << 20,
                       mnnvl_config=MnnvlConfig(comm_backend=TorchDistBackend(ctx.cpu_group)))


def dispatch_unless(ctx, rank_one):
    a2a = _a2a(ctx)
    if ctx.rank == 1:
        if rank_one == "skips":
            return None
        spin(ctx)
    g = torch.Generator().manual_seed(ctx.rank)
    ids = torch.argsort(torch.rand(16, 8, generator=g), dim=1)[:, :2].to(torch.int32).contiguous()
    payloads = [torch.randn(16, 64, generator=g).to(torch.bfloat16), ids, torch.rand(16, 2, generator=g)]
    a2a.dispatch(ids, payloads, 16)
    return ctx.rank
"""


def _session(rank_tester: pytest.Pytester, body: str, *args: str) -> pytest.RunResult:
    rank_tester.makepyfile(rankfns=RANKFNS)
    rank_tester.makepyfile(test_it="import rankfns\n\n" + body)
    result = rank_tester.runpytest_subprocess(*args)
    result.assert_outcomes(failed=1)
    return result


def test_every_rank_computing_is_slow_not_a_deadlock(rank_tester: pytest.Pytester) -> None:
    result = _session(
        rank_tester,
        """
from pytest_mnnvl.errors import WorldDeadlock, WorldTimeout, WorldTooSlow

def test_it(mnnvl_world):
    try:
        mnnvl_world(2, backend="plain").run(rankfns.spin)
    except WorldTimeout as exc:
        print("CAUGHT", type(exc).__name__, isinstance(exc, WorldDeadlock))
        raise
""",
        "--mnnvl-timeout=1",
        "-s",
    )
    result.stdout.fnmatch_lines(["*CAUGHT WorldTooSlow False*"])
    result.stdout.fnmatch_lines(
        [
            "E *WorldTooSlow: slow, not deadlocked: every rank is computing (ranks [[]0, 1[]] in spin at "
            "rankfns.py:*); still running in spin() after 1 s",
            "E * give the call more time (--mnnvl-timeout=SECONDS, or timeout= of mnnvl_world or the mnnvl marker), "
            "or the machine less work: fewer threads per rank or fewer worlds at once (each of the 2 ranks runs "
            "OMP_NUM_THREADS=*",
        ]
    )
    result.stdout.fnmatch_lines(["E * [[]rank 0[]] still running, computing (*% of a core)"])
    assert "deadlock:" not in result.stdout.str()


def test_a_barrier_against_a_sleeping_peer_is_a_deadlock(rank_tester: pytest.Pytester) -> None:
    result = _session(
        rank_tester,
        """
def test_it(mnnvl_world):
    mnnvl_world(2, backend="plain").run(rankfns.barrier_against, "sleep")
""",
        "--mnnvl-timeout=1",
    )
    result.stdout.fnmatch_lines(
        [
            "E *WorldDeadlock: deadlock: ranks [[]0, 1[]] still running in barrier_against() after 1 s",
            "E * rank 1 is blocked in torch.distributed.barrier(group=[[]0, 1[]]) and needs rank 0, which is idle "
            "(not computing, not in a collective or a flag wait)",
        ]
    )
    result.stdout.fnmatch_lines(
        ["E * [[]rank 0[]] still running, idle (*% of a core; not in a collective or a flag wait)"]
    )
    result.stdout.fnmatch_lines(
        ["E * [[]rank 1[]] still running, blocked in torch.distributed.barrier(group=[[]0, 1[]])"]
    )


def test_a_barrier_against_a_computing_peer_is_slow(rank_tester: pytest.Pytester) -> None:
    """Rank 1 waits for rank 0, which is still computing: it will get there, given time."""
    result = _session(
        rank_tester,
        """
def test_it(mnnvl_world):
    mnnvl_world(2, backend="plain").run(rankfns.barrier_against, "spin")
""",
        "--mnnvl-timeout=1",
    )
    result.stdout.fnmatch_lines(
        [
            "E *WorldTooSlow: slow, not deadlocked: every rank is computing or waiting for one that is (rank 0 in "
            "spin at rankfns.py:*; rank 1 in torch.distributed.barrier(group=[[]0, 1[]])); still running in "
            "barrier_against() after 1 s",
        ]
    )


SIM_ENV = '{"PYTEST_MNNVL_SIM_KERNEL_TIMEOUT": "60"}'


def test_a_skipped_dispatch_leaves_its_peer_deadlocked_in_the_flag_wait(rank_tester: pytest.Pytester) -> None:
    result = _session(
        rank_tester,
        f"""
def test_it(mnnvl_world):
    mnnvl_world(2, backend="sim", env={SIM_ENV}).run(rankfns.dispatch_unless, "skips")
""",
        "--mnnvl-timeout=2",
    )
    result.stdout.fnmatch_lines(
        [
            "E *WorldDeadlock: deadlock: ranks [[]0[]] still running in dispatch_unless() after 2 s",
            "E * rank 0 is blocked in the sim dispatch kernel's wait for rank 1's completion flag and needs rank 1, "
            "which returned from the call",
        ]
    )
    result.stdout.fnmatch_lines(
        ["E * [[]rank 0[]] still running, blocked in the sim dispatch kernel's wait for rank 1's completion flag"]
    )
    result.stdout.fnmatch_lines(["E * [[]rank 1[]] returned"])


def test_a_peer_still_computing_before_its_dispatch_is_slow(rank_tester: pytest.Pytester) -> None:
    """The DeepSeek case: one rank spins on the flag of a peer that is still busy before its own dispatch."""
    result = _session(
        rank_tester,
        f"""
def test_it(mnnvl_world):
    mnnvl_world(2, backend="sim", env={SIM_ENV}).run(rankfns.dispatch_unless, "computes")
""",
        "--mnnvl-timeout=2",
    )
    result.stdout.fnmatch_lines(
        [
            "E *WorldTooSlow: slow, not deadlocked: every rank is computing or waiting for one that is (rank 1 in "
            "spin at rankfns.py:*; rank 0 in the sim dispatch kernel's wait for rank 1's completion flag); still "
            "running in dispatch_unless() after 2 s",
        ]
    )


FLAG_WAIT = """
import sys, threading, time
import torch
from pytest_mnnvl.worlds import audit
from pytest_mnnvl.model import sizing
from pytest_mnnvl.backends import _kernels, _kernels_v074

status, kernel, group = sys.argv[1], sys.argv[2], [int(r) for r in sys.argv[3].split(",") if r]
audit.install(status)
_kernels.set_ep_group_ranks(group)
ws = torch.zeros(2, 4096, dtype=torch.uint8)
if kernel == "v072":
    offsets = sizing.aux_offsets(2, 16)
    region = offsets.dispatch_completion_flags
    wait = lambda: _kernels._Rows(ws, offsets).signal_and_wait("dispatch", region, 0, [True, True], 1)
else:
    region = 0
    wait = lambda: _kernels_v074._complete_phase(ws, "combine", region, 0, [True, True], 1, 30)
thread = threading.Thread(target=wait)
thread.start()
deadline = time.monotonic() + 10
while audit.waiting_in(status) is None and time.monotonic() < deadline:
    time.sleep(0.01)
seen = audit.waiting_in(status)
ws[0, region + 4 : region + 8].view(torch.int32)[0] = 1  # the peer's flag arrives
thread.join(10)
after = audit.waiting_in(status)
print(repr((seen.kind.value, seen.text, seen.peers) if seen else None))
print(repr(after))
"""


@pytest.mark.parametrize(
    "kernel,group,peers,text",
    [
        ("v072", "4,5", (5,), "the sim dispatch kernel's wait for rank 5's completion flag"),
        ("v074", "4,5", (5,), "the sim combine kernel's wait for rank 5's completion flag"),
        (
            "v074",
            "",
            None,
            "the sim combine kernel's wait for the completion flags of EP ranks [1] (EP rank 0 of a group other "
            "than its own)",
        ),
    ],
)
def test_flag_waits_announce_whom_they_wait_for(
    tmp_path: Path, kernel: str, group: str, peers: tuple[int, ...] | None, text: str
) -> None:
    """In a real process (its torch.distributed is audited): the status while the wait spins, cleared after."""
    status = tmp_path / "status.txt"
    out = subprocess.run(
        [sys.executable, "-c", FLAG_WAIT, str(status), kernel, group],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    seen, after = out.stdout.splitlines()
    assert seen == repr(("peer_flag", text, peers))
    assert after == "None"


SPINNING_MANAGER = """
import time
from pytest_mnnvl.managers.reference import ReferenceManager


class SpinsInInitialize(ReferenceManager):
    \"\"\"Every rank computes far past the plan's timeout: a slow machine, not a manager that deadlocks.\"\"\"

    def initialize(self, *args, **kwargs):
        end = time.monotonic() + 60
        while time.monotonic() < end:
            pass
        return super().initialize(*args, **kwargs)
"""


@pytest.mark.skipif(not SUITE.exists(), reason="the conformance suite is not in this checkout")
def test_a_slow_world_in_the_conformance_suite_is_infrastructure_not_a_deadlock_verdict(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(slow_managers=SPINNING_MANAGER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pytester.path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    report = pytester.path / "out" / "report.json"
    result = pytester.runpytest_subprocess(
        "-p",
        "pytest_mnnvl",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        f"{SUITE}::test_covers",
        "--mnnvl-manager=slow_managers:SpinsInInitialize",
        "--mnnvl-backend=sim",
        "--mnnvl-world-sizes=2",
        "--mnnvl-pp=1",
        "--mnnvl-timeout=2",
        f"--mnnvl-report={report}",
        timeout=240,
    )
    assert result.ret == 1
    outcomes = result.parseoutcomes()
    assert outcomes.get("errors") == 1 and not outcomes.get("failed"), outcomes
    result.stdout.fnmatch_lines(
        [
            "*InfrastructureError: infrastructure failure (not the manager's): slow, not deadlocked: every rank is "
            "computing (ranks [[]0, 1[]] in initialize at slow_managers.py:*",
        ]
    )
    assert "PpDeadlockViolation" not in result.stdout.str()
    data = json.loads(report.read_text())
    covers = data["invariants"]["covers"]
    assert covers["status"] == "infrastructure", covers
    assert data["invariants"]["pp_deadlock_freedom"]["status"] == "not_run"
    assert data["failure_kinds"] == {"violation": 0, "manager_error": 0, "infrastructure": 1}
    assert not list((report.parent / "counterexamples").glob("*.json"))


SPMD_TESTS = """
import os
import time
import torch
import torch.distributed as dist

def spin(ctx):
    end = time.monotonic() + 8
    while time.monotonic() < end:
        pass
    return ctx.rank

def rank_zero_returns(ctx):
    if ctx.rank != 0:
        dist.barrier(group=ctx.cpu_group)
    return ctx.rank

def threads(ctx):
    return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")

def test_threads(mnnvl_world):
    print("SEEN=", mnnvl_world().run(threads))

def test_slow(mnnvl_world):
    mnnvl_world(timeout=2).run(spin)

def test_deadlock(mnnvl_world):
    mnnvl_world(timeout=2).run(rank_zero_returns)
"""


@pytest.mark.slow
def test_torchrun_ranks_tell_slow_from_deadlocked_and_keep_torchruns_thread_count(pytester: pytest.Pytester) -> None:
    """Under torchrun every rank derives the verdict from the peers' published evidence; torchrun's own
    OMP_NUM_THREADS=1 (4 processes per node, the variable unset) is left as it is."""
    from tests.test_torchrun import RECORDER, torchrun

    pytester.makepyfile(mnnvl_recorder=RECORDER, test_spmd=SPMD_TESTS)
    env_before = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        run = torchrun(pytester, "-s")
    finally:
        if env_before is not None:
            os.environ["OMP_NUM_THREADS"] = env_before
    for rank in range(4):
        outcomes = [(nodeid.split("::")[1], outcome) for nodeid, _, outcome in run.outcomes(rank)]
        assert outcomes == [("test_threads", "passed"), ("test_slow", "failed"), ("test_deadlock", "failed")]
    run.lines.fnmatch_lines(["*SEEN= [[](1, '1'), (1, '1'), (1, '1'), (1, '1')[]]*"])
    run.lines.fnmatch_lines(
        [
            "mnnvl: rank threads: OMP_NUM_THREADS=1 from the environment (torchrun sets OMP_NUM_THREADS=1 when "
            "--nproc-per-node > 1 and it is unset)"
        ]
    )
    run.lines.fnmatch_lines(
        [
            "*WorldTooSlow: slow, not deadlocked: every rank is computing (ranks [[]0, 1, 2, 3[]] in spin at "
            "test_spmd.py:*); still running in spin() after 2 s"
        ]
    )
    run.lines.fnmatch_lines(
        [
            "*WorldDeadlock: deadlock: ranks [[]1, 2, 3[]] still running in rank_zero_returns() after 2 s",
            "*rank 1 is blocked in torch.distributed.barrier(group=[[]0, 1, 2, 3[]]) and needs rank 0, which "
            "returned from the call",
        ]
    )


def _collective(name: str, group: tuple[int, ...]) -> Any:
    from pytest_mnnvl.worlds.audit import Wait, WaitKind

    return Wait(WaitKind.COLLECTIVE, f"torch.distributed.{name}(group={list(group)})", group)


def _flag(peers: tuple[int, ...] | None) -> Any:
    from pytest_mnnvl.worlds.audit import Wait, WaitKind

    return Wait(WaitKind.PEER_FLAG, f"the sim dispatch kernel's wait for {peers}", peers)


def test_the_verdict_rules_on_recorded_states() -> None:
    """The rules of pytest_mnnvl.worlds.stall on states as the pool records them (the sessions above show each one
    arising for real; these are the combinations too slow or too rare to stage)."""
    from pytest_mnnvl.errors import PythonFrame, WorldDeadlock, WorldTooSlow
    from pytest_mnnvl.worlds.stall import RankAtDeadline, diagnose

    busy = PythonFrame("/x/kernels.py", 7, "combine")

    def rank(r: int, wait: Any = None, cpu: float | None = 0.0, returned: bool = False) -> RankAtDeadline:
        return RankAtDeadline.of(r, returned, wait, cpu, busy if cpu else None)

    # Two ranks in different collectives, each needing the other: a cycle, whoever else computes.
    cycle = diagnose(
        [rank(0, _collective("barrier", (0, 1))), rank(1, _collective("all_reduce", (0, 1))), rank(2, cpu=1)]
    )
    assert not cycle.slow and cycle.stuck == (0, 1)
    assert cycle.why == (
        "rank 0 is blocked in torch.distributed.barrier(group=[0, 1]) and needs rank 1, which waits in "
        "torch.distributed.all_reduce(group=[0, 1])"
    )
    # Waiting through a chain that ends in a computing rank is progress.
    chain = diagnose([rank(0, _flag((1,))), rank(1, _collective("barrier", (1, 2))), rank(2, cpu=0.9)])
    assert chain.slow and chain.stuck == ()
    error = chain.error(5, {0: "", 1: "", 2: ""}, "in f()")
    assert isinstance(error, WorldTooSlow) and not isinstance(error, WorldDeadlock)
    assert str(error).startswith(
        "slow, not deadlocked: every rank is computing or waiting for one that is (rank 2 in combine at "
        "kernels.py:7; rank 0 in the sim dispatch kernel's wait for (1,); rank 1 in torch.distributed.barrier("
        "group=[1, 2])); still running in f() after 5 s"
    )
    # Members already in the same collective have arrived; the one missing returned.
    left = diagnose(
        [rank(0, returned=True), rank(1, _collective("barrier", (0, 1, 2))), rank(2, _collective("barrier", (0, 1, 2)))]
    )
    assert not left.slow and left.why.endswith("needs rank 0, which returned from the call")
    # A flag wait whose peers are unknown needs every other rank.
    unknown = diagnose([rank(0, _flag(None)), rank(1, returned=True)])
    assert not unknown.slow and unknown.why.endswith("needs rank 1, which returned from the call")
    # On a GPU backend a busy host thread is no progress.
    gpu = diagnose([rank(0, cpu=1.0), rank(1, _flag((0,)))], busy_is_progress=False)
    assert not gpu.slow and "a busy host thread on a GPU backend may be spinning on the GPU" in gpu.why
    # A rank asleep by itself is a hang; a rank whose main thread stays runnable computes, whatever its share.
    assert diagnose([rank(0, returned=True), rank(1, cpu=0.0)]).why == (
        "rank 1 idle: not computing, not in a collective or a flag wait"
    )
    starved = RankAtDeadline.of(1, False, None, 0.02, busy, runnable=True)
    assert diagnose([rank(0, returned=True), starved]).slow
