"""The sim backend: FlashInfer's own MoeAlltoAll and moe_ep on CPU ranks, with only the CUDA leaves replaced.

Every rank function lives in :mod:`tests.sim_rank_fns`; the worlds are warm and shared between tests.
Expected numbers were measured on 2×/4×H100 with the real FlashInfer, not taken from the sim.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

import pytest

from pytest_mnnvl.errors import RankCrashed
from pytest_mnnvl.model import releases

from . import sim_rank_fns as fns
from .conftest import pid_alive

if TYPE_CHECKING:
    from pytest_mnnvl.worlds.factory import WorldFactory

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    # 0.7.2.post1's API throughout (MoeAlltoAll, its functional moe_a2a_*); 0.7.4's is tests/test_sim_v074.py.
    pytest.mark.skipif(
        releases.installed() != releases.V072,
        reason=f"needs flashinfer-python {releases.V072} installed (found {releases.installed() or 'none'})",
    ),
]

COMBINE_MESSAGE = (
    "Check failed: (combinePayloadOffset >= 0 && combinePayloadOffset + payloadBytes <= sizePerRank) "
    "is false: workspace insufficient for combine payload region"
)
AUX_T256 = 45_440  # aux bytes at max_num_tokens=256 (ep 2 and 4 alike)
#: Measured with FlashInfer on H100s: T=256, H=4096, top_k=2; NVFP4 and bf16 dispatch, bf16 combine.
NVFP4_WS = {2: 5_427_584, 4: 10_809_728}
BF16_WS = {2: 8_442_240, 4: 16_839_040}
WORLD_SIZES = pytest.mark.parametrize("ep", [2, 4])
SIM = "sim"  # these tests are about the sim itself, whatever --mnnvl-backend says


def _a128(x: int) -> int:
    return (x + 127) // 128 * 128


@WORLD_SIZES
def test_nvfp4_workspace_then_bf16_layer(mnnvl_world: WorldFactory, ep: int) -> None:
    """Dispatch borrows the combine region and passes; combine fails with FlashInfer's text; 64 pass."""
    results = mnnvl_world(world_size=ep, backend=SIM).run(fns.nvfp4_then_bf16, NVFP4_WS[ep])
    bf16_dispatch_bytes = 2 * 4096 + 2 * 4 + 2 * 4
    for r in results:
        assert r["nvfp4_round"] is None
        assert r["bf16_dispatch"] is None
        assert r["combine_offset"] == _a128(AUX_T256 + ep * 256 * bf16_dispatch_bytes)
        assert r["combine_offset"] + ep * 256 * 4096 * 2 > NVFP4_WS[ep]
        kind, message, _ = r["bf16_combine"]
        assert (kind, message) == ("RuntimeError", COMBINE_MESSAGE)
        kind, message, where = r["cascade"]
        assert (kind, message) == ("AssertionError", "dispatch called twice without combine")
        assert where.endswith(os.path.join("flashinfer", "comm", "trtllm_moe_alltoall.py"))
        assert r["small_ok"] and r["same_workspace"]


@WORLD_SIZES
def test_dispatch_too_small(mnnvl_world: WorldFactory, ep: int) -> None:
    """bf16 at hidden 8192 on a workspace sized for NVFP4 at 4096 fails at dispatch; state stays idle."""
    need = AUX_T256 + ep * 256 * (2 * 8192 + 2 * 4 + 2 * 4)
    message = (
        "Check failed: (sizePerRank >= requiredSize) is false: workspace size per rank insufficient, "
        f"need {need} bytes but has {NVFP4_WS[ep]}"
    )
    for r in mnnvl_world(world_size=ep, backend=SIM).run(fns.dispatch_too_small, NVFP4_WS[ep], 8192):
        assert r[:2] == ("RuntimeError", message)
        assert r[3] == "idle"


@WORLD_SIZES
def test_unequal_allocation_sizes(mnnvl_world: WorldFactory, ep: int) -> None:
    """FlashInfer's own collective size check fires on every rank, before anything is allocated."""
    for (kind, message, where), cached in mnnvl_world(world_size=ep, backend=SIM).run(fns.unequal_sizes, 1 << 20):
        assert (kind, message) == ("AssertionError", "Not all rank allocating same size.")
        assert where.endswith(os.path.join("flashinfer", "comm", "mnnvl.py"))
        assert cached == 0


@pytest.mark.parametrize(
    ("ep", "num_experts", "top_k"),
    [(2, 8, 4), (2, 7, 6), (4, 8, 2), (4, 10, 8)],
    ids=["ep2-E8-k4", "ep2-E7-k6-uneven", "ep4-E8-k2", "ep4-E10-k8-uneven"],
)
def test_round_trip_numerics(mnnvl_world: WorldFactory, ep: int, num_experts: int, top_k: int) -> None:
    """Bytes reach exactly the owner ranks; combine sums one slot per distinct owner rank, unweighted."""
    results = mnnvl_world(world_size=ep, backend=SIM).run(fns.round_trip, num_experts, top_k, 64, 32)
    for r in results:
        assert r == {
            "delivered": True,
            "metainfo": True,
            "aux": True,
            "ones": True,
            "scaled": True,
            "flag_epoch": 4,  # two dispatch + combine rounds, one epoch each
        }


def test_dispatch_twice_comes_from_flashinfer(mnnvl_world: WorldFactory) -> None:
    for kind, message, where in mnnvl_world(world_size=2, backend=SIM).run(fns.dispatch_twice):
        assert (kind, message) == ("AssertionError", "dispatch called twice without combine")
        assert where.endswith(os.path.join("flashinfer", "comm", "trtllm_moe_alltoall.py"))


def test_workspace_cache_lifetime_and_records(mnnvl_world: WorldFactory) -> None:
    """Same key shares; a new size allocates again; _reset_workspace evicts; memory goes with the last holder.

    Numbers are per rank: FlashInfer rounds 3 MiB and 5 MiB up to its 2 MiB granularity.
    """
    mib = 1 << 20
    for r in mnnvl_world(world_size=2, backend=SIM).run(fns.cache_lifetime):
        assert r["start"] == (0, 0, 0, 0, 0)
        assert r["same_key_shared"]
        # (workspaces, allocations, live bytes per rank, evicted-but-held, memfds: own row + one peer row)
        assert r["one"] == (1, 1, 4 * mib, 0, 2)
        assert r["distinct"]
        assert r["two"] == (2, 2, 10 * mib, 0, 4)
        assert r["mapped_two"] == 2 * (4 + 6) * mib
        assert r["after_reset"] == (1, 1, 4 * mib, 0, 2)
        assert r["evicted_but_held"] == (0, 1, 4 * mib, 1, 2)  # the leak a grow-only manager leaves
        assert r["end"] == (0, 0, 0, 0, 0)
        assert r["mapped_end"] == 0


@WORLD_SIZES
def test_create_communication_runs_on_the_sim(mnnvl_world: WorldFactory, ep: int) -> None:
    """flashinfer.moe_ep's NVLinkOneSidedAlltoAll (vLLM 0.33's path) round-trips, output= included."""
    results = mnnvl_world(world_size=ep, backend=SIM).run(fns.via_create_communication, 128, 2, 8, 16)
    for r in results:
        assert r["ok"] and r["into_ok"]
        assert r["recorded"] == [r["size"]]


def test_sim_exposes_flashinfer_names(mnnvl_world: WorldFactory) -> None:
    for r in mnnvl_world(world_size=2, backend=SIM).run(fns.signatures):
        assert r == {"size_fn": True, "classes": True, "fi_size": NVFP4_WS[2], "installed": True}


def test_skipped_call_times_out_like_a_trap(mnnvl_world: WorldFactory) -> None:
    """A peer that never dispatches: the kernel's own timeout text, then a sticky 'launch failure'."""
    started = time.monotonic()
    results = mnnvl_world(world_size=2, backend=SIM).run(fns.skip_dispatch, 1.0)
    assert time.monotonic() - started < 20
    assert results[1] is None
    (kind, message, _), sticky = results[0]
    assert kind == "SimKernelTimeout"
    assert message.startswith("dispatch: ---Rank 0 timed out waiting for completion flag from rank 1 ")
    assert sticky is not None and "unspecified launch failure" in sticky[1]


def _memfd_holders(labels: list[str]) -> list[str]:
    """Every fd in the system that still points at one of the sim's memfds with these labels."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if any(label in target for label in labels):
                found.append(f"{pid}: {target}")
    return found


def _dev_shm() -> set[str]:
    # Python multiprocessing semaphores of unrelated processes come and go here; they are not ours.
    return {name for name in os.listdir("/dev/shm") if not name.startswith("sem.mp-")}


def test_nothing_left_behind_after_sigkill(mnnvl_world: WorldFactory) -> None:
    """Rows are memfds: nothing under /dev/shm ever; a SIGKILLed rank's memory dies with the processes."""
    shm_before = _dev_shm()
    world = mnnvl_world(world_size=2, backend=SIM, env={"PYTEST_MNNVL_SIM_TEST_WORLD": "sigkill"})
    held = world.run(fns.hold_workspace)
    pids = [pid for pid, _, _, _ in held]
    assert [(memfds, mapped, shm) for _, memfds, mapped, shm in held] == [(2, 2 * (4 << 20), [])] * 2
    assert _dev_shm() == shm_before
    os.kill(pids[1], signal.SIGKILL)
    # The pool sees the death during the next call (RankCrashed), or, when its rank process reported the exit
    # first (a forked rank's zygote reaps it at once), before it: then the call runs on a fresh world.
    try:
        fresh = world.run(fns.noop)
    except RankCrashed:
        pass
    else:
        assert not set(fresh) & set(pids), (fresh, pids)
    world.close()
    deadline = time.monotonic() + 10
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(pid) for pid in pids)
    assert _dev_shm() == shm_before
    assert _memfd_holders([f"-p{pid}" for pid in pids]) == []
    leftovers = [d for d in os.listdir("/tmp") if any(d.startswith(f"cuda_fd_xchg_{pid}_") for pid in pids)]
    assert leftovers == []
