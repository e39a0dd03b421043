"""Shared-GPU worlds (``--mnnvl-ranks-per-gpu``): GPU assignment, group backends, the auto backend, markers,
options, and on a GPU a real world of two ranks on one GPU."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_mnnvl.errors import MnnvlUsageError
from pytest_mnnvl.probes.backend import auto_backend, resolve_auto_backend, shared_one_sided_reason
from pytest_mnnvl.probes.flashinfer import FlashInferInfo, flashinfer_info, flashinfer_info_at
from pytest_mnnvl.probes.gpus import GpuInfo, GpuInventory
from pytest_mnnvl.probes.probe import Probe
from pytest_mnnvl.worlds.layout import Layout
from pytest_mnnvl.worlds.pool import World, WorldSpec
from pytest_mnnvl.worlds.sharing import (
    NVLINK_NOT_EXERCISED,
    GpuPlan,
    SharingSummary,
    WorldLayout,
    gpu_of_rank,
    group_backends,
    plan_gpus,
)

GPUS = ["GPU-a", "GPU-b", "GPU-c", "GPU-d"]


# ---- rank -> GPU ------------------------------------------------------------------------------------


def test_consecutive_ranks_share_a_gpu_so_a_stage_stays_together() -> None:
    assert [gpu_of_rank(r, 2) for r in range(4)] == [0, 0, 1, 1]
    assert [gpu_of_rank(r, 1) for r in range(3)] == [0, 1, 2]
    # ws4-pp2 on two GPUs: each PP stage's EP group sits on one GPU.
    layout = Layout(4, 2)
    assert [{gpu_of_rank(r, 2) for r in layout.ep_group_ranks(s)} for s in range(2)] == [{0}, {1}]
    with pytest.raises(ValueError, match="ranks_per_gpu must be >= 1"):
        gpu_of_rank(0, 0)


@pytest.mark.parametrize(
    "world_size,gpus,setting,devices,per_gpu",
    [
        (2, 1, "auto", ("GPU-a",), 2),
        (4, 1, "auto", ("GPU-a",), 4),
        (4, 3, "auto", ("GPU-a", "GPU-b"), 2),  # ceil(4/3) = 2 ranks per GPU: two GPUs do
        (2, 2, "auto", ("GPU-a", "GPU-b"), 1),  # enough GPUs: one each, as without sharing
        (4, 4, 2, ("GPU-a", "GPU-b"), 2),  # an explicit N shares even where GPUs are plenty
        (3, 4, 2, ("GPU-a", "GPU-b"), 2),
        (2, 4, 8, ("GPU-a",), 2),  # N larger than the world: the whole world on one GPU
        (2, 2, 1, ("GPU-a", "GPU-b"), 1),
    ],
)
def test_plan_gpus(world_size: int, gpus: int, setting: int | str, devices: tuple[str, ...], per_gpu: int) -> None:
    plan = plan_gpus(world_size, GPUS[:gpus], setting)  # type: ignore[arg-type]
    assert (plan.devices, plan.ranks_per_gpu) == (devices, per_gpu)
    assert plan.shared == (world_size > len(devices))
    assert max(plan.gpu_of(r) for r in range(world_size)) == len(devices) - 1


def test_xdist_workers_never_share_a_gpu_even_in_auto_mode() -> None:
    """The GPUs are split between workers before any sharing: two worlds never run on one GPU at once."""
    worker0 = plan_gpus(4, GPUS[:2], "auto", 0, 2)
    worker1 = plan_gpus(4, GPUS[:2], "auto", 1, 2)
    assert (worker0.devices, worker1.devices) == (("GPU-a",), ("GPU-b",))
    assert worker0.ranks_per_gpu == worker1.ranks_per_gpu == 4
    for index in (0, 1):  # one GPU, two workers: neither may take it
        with pytest.raises(ValueError, match=r"owns 0 \(none\) of 1 visible, split between 2 .*workers never share"):
            plan_gpus(2, GPUS[:1], "auto", index, 2)


def test_plan_gpus_says_what_is_missing() -> None:
    with pytest.raises(ValueError, match=r"needs at least 1 GPU .*no GPU is visible to this process"):
        plan_gpus(2, [], "auto")
    with pytest.raises(ValueError, match=r"--mnnvl-ranks-per-gpu=2 needs 2 GPU\(s\), but this process owns 1"):
        plan_gpus(4, GPUS[:1], 2)
    with pytest.raises(ValueError, match=r"needs 2 GPUs, .*share GPUs with --mnnvl-ranks-per-gpu=auto"):
        plan_gpus(2, GPUS[:1], 1)


def test_group_backends() -> None:
    assert group_backends(gpu=False, shared=False) == group_backends(gpu=False, shared=True)
    assert (group_backends(False, False).default, group_backends(False, False).device) == ("gloo", "gloo")
    assert (group_backends(True, False).default, group_backends(True, False).device) == ("cpu:gloo,cuda:nccl", "nccl")
    # NCCL refuses two ranks on one device: a shared world is gloo throughout.
    assert (group_backends(True, True).default, group_backends(True, True).device) == ("gloo", "gloo")


def test_world_spec_checks_that_its_gpus_hold_the_world() -> None:
    spec = WorldSpec(4, 1, "flashinfer", devices=("GPU-a",), ranks_per_gpu=4)
    assert "4 ranks per GPU" in spec.describe()
    two = ("GPU-a", "GPU-b")
    assert WorldSpec(2, 1, "flashinfer", devices=two, ranks_per_gpu=2) != WorldSpec(2, 1, "flashinfer", devices=two)
    with pytest.raises(MnnvlUsageError, match=r"1 GPU\(s\) at 2 rank\(s\) per GPU cannot hold 4 ranks"):
        WorldSpec(4, 1, "flashinfer", devices=("GPU-a",), ranks_per_gpu=2)
    with pytest.raises(MnnvlUsageError, match=r"ranks_per_gpu=0\) is not valid"):
        WorldSpec(2, ranks_per_gpu=0)


def test_a_shared_world_builds_gloo_groups_and_its_ranks_know_it() -> None:
    """Real ranks (the sim, on CPU) build the groups of a world sharing GPUs: gloo device groups where NCCL
    would be refused, the gloo cpu_group still its own group; ``ranks_per_gpu`` travels to every rank."""
    world = World(WorldSpec(4, 2, "sim", ranks_per_gpu=2), timeout=120.0)
    try:
        out = world.run(_fn("shared_world_groups"))
    finally:
        world.close()
    assert [r["backends"] for r in out] == [("gloo", "gloo", "gloo")] * 4
    assert all(r["twin"] for r in out)
    assert [r["ep_sum"] for r in out] == [1, 1, 5, 5]  # EP groups {0,1} and {2,3}
    assert {r["ranks_per_gpu"] for r in out} == {2}
    assert {r["answered"] for r in out} == {()}  # the sim answers no platform query in FlashInfer's place


def _fn(name: str) -> object:
    from tests import sharing_rank_fns

    return getattr(sharing_rank_fns, name)


# ---- the auto backend and the markers, from probe records --------------------------------------------


def _inventory(count: int) -> GpuInventory:
    gpus = tuple(GpuInfo(i, "NVIDIA H200", GPUS[i], i) for i in range(count))
    return GpuInventory(gpus, count, None, "nvml", f"NVML: {count} GPU(s) present")


INSTALLED = FlashInferInfo(True, "0.7.4", "/site/flashinfer", True, True, "scm_rights", "flashinfer 0.7.4")


def test_shared_reason_from_probe_records() -> None:
    def no_link_needed(indices: tuple[int, ...]) -> Probe[bool | None]:
        raise AssertionError(f"one GPU needs no NVLink probe, asked for {indices}")

    assert shared_one_sided_reason(4, "auto", INSTALLED, _inventory(1), {}, no_link_needed) is None
    # Four ranks on three GPUs use two of them: NVLink between those two only.
    asked: list[tuple[int, ...]] = []

    def no_nvlink(indices: tuple[int, ...]) -> Probe[bool | None]:
        asked.append(indices)
        return Probe(False, "GPU0<->GPU1: no NVLink P2P")

    reason = shared_one_sided_reason(4, "auto", INSTALLED, _inventory(3), {}, no_nvlink)
    assert asked == [(0, 1)]
    assert reason == (
        "one-sided all-to-all, shared-GPU mode (--mnnvl-ranks-per-gpu=auto), 4 ranks on 2 GPUs: "
        "GPU0<->GPU1: no NVLink P2P"
    )
    none = shared_one_sided_reason(2, "auto", INSTALLED, _inventory(0), {}, no_link_needed)
    assert none is not None and "no GPU is visible to this process" in none and "shared-GPU mode" in none
    absent = shared_one_sided_reason(2, 2, flashinfer_info_at(None, None), _inventory(1), {}, no_link_needed)
    assert absent is not None and absent.startswith("shared-GPU mode (--mnnvl-ranks-per-gpu=2): flashinfer-python")
    # The xdist split applies: worker 1 of 2 owns no GPU of one.
    workers = {"PYTEST_XDIST_WORKER": "gw1", "PYTEST_XDIST_WORKER_COUNT": "2"}
    split = shared_one_sided_reason(2, "auto", INSTALLED, _inventory(1), workers, no_link_needed)
    assert split is not None and "split between 2 pytest-xdist worker(s)" in split


def test_auto_backend_decision() -> None:
    nvlink_missing = "one-sided all-to-all needs 2 GPUs, 1 visible"
    assert auto_backend(1, None, None).value == "flashinfer"
    assert auto_backend(1, nvlink_missing, None) == Probe("sim", nvlink_missing)
    # One GPU: only with sharing allowed, and only when a shared world fits.
    assert auto_backend("auto", nvlink_missing, None).value == "flashinfer"
    assert auto_backend(2, nvlink_missing, None).value == "flashinfer"
    assert auto_backend("auto", nvlink_missing, "no GPU") == Probe("sim", "no GPU")
    # Two NVLink GPUs win whatever the setting.
    assert auto_backend("auto", None, "unused").value == "flashinfer"


def test_auto_backend_on_this_machine_is_the_sim_and_says_why() -> None:
    probe = resolve_auto_backend("auto")
    assert probe.value == "sim"
    assert "shared-GPU mode (--mnnvl-ranks-per-gpu=auto)" in probe.reason


def test_sharing_summary() -> None:
    one = GpuPlan(4, ("GPU-a",), 4)
    two = GpuPlan(4, ("GPU-a", "GPU-b"), 2)
    each = GpuPlan(2, ("GPU-a", "GPU-b"), 1)
    summary = SharingSummary("auto", (WorldLayout("ws4-pp1", one),), "off", False, "no daemon")
    assert summary.text() == f"ws4-pp1 4 ranks on 1 GPU; MPS off; {NVLINK_NOT_EXERCISED}"
    data = summary.to_dict()
    assert data["worlds"] == {"ws4-pp1": {"ranks": 4, "gpus": 1, "ranks_per_gpu": 4, "shared": True}}
    assert (data["nvlink_exercised"], data["note"]) == (False, NVLINK_NOT_EXERCISED)
    mixed = SharingSummary("auto", (WorldLayout("ws2-pp1", each), WorldLayout("ws4-pp1", two)), "start", True, "")
    assert mixed.text() == (
        "ws2-pp1 2 ranks, one GPU each, ws4-pp1 4 ranks on 2 GPUs; MPS on; "
        "NVLink carries only the traffic between ranks on different GPUs"
    )
    assert mixed.to_dict()["nvlink_exercised"] is True
    unshared = SharingSummary(1, (WorldLayout("ws2-pp1", each),), "auto", None, "")
    assert (unshared.text(), unshared.to_dict()["note"]) == ("ws2-pp1 2 ranks, one GPU each; MPS unknown", None)
    skipped = SharingSummary("auto", (WorldLayout("ws2-pp1", None, "no GPU"),), "auto", False, "")
    assert skipped.text() == "ws2-pp1 skipped (skipped: no GPU); MPS off"
    assert skipped.to_dict()["nvlink_exercised"] is None  # nothing ran: no claim either way


def test_the_markdown_report_says_where_the_ranks_ran() -> None:
    from pytest_mnnvl.conformance import report

    one = GpuPlan(4, ("GPU-a",), 4)
    summary = SharingSummary(
        "auto", (WorldLayout("ws4-pp1", one), WorldLayout("ws4-pp2", None, "x")), "start", True, "ours"
    )
    (line,) = report._sharing_lines({"kind": "spawn", "gpu_sharing": summary.to_dict()})
    assert line == (
        "- GPU worlds (--mnnvl-ranks-per-gpu=auto): ws4-pp1 4 ranks on 1 GPU, ws4-pp2 skipped; "
        f"MPS on (--mnnvl-mps=start: ours); {NVLINK_NOT_EXERCISED}"
    )
    assert report._sharing_lines({"kind": "spawn", "gpu_sharing": None}) == []


def test_the_one_gpu_benchmark_script_parses() -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_shared.sh"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


# ---- FlashInfer's platform verdict ---------------------------------------------------------------------

#: The installed FlashInfer, and 0.7.4 where a checkout keeps it in .venv074 (the other supported release).
FLASHINFER_RELEASES = [
    Path(flashinfer_info().location or "/nonexistent/flashinfer"),
    *sorted((Path(__file__).resolve().parents[1] / ".venv074").glob("lib/python3*/site-packages/flashinfer")),
]


def _callers(package: Path, attribute: str) -> set[str]:
    """``module:function`` of every function in ``package`` that reads ``.attribute`` (its source, parsed)."""
    found = set()
    for path in sorted(package.rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if attribute not in text:  # parsing all of FlashInfer takes minutes; a read names it in the text
            continue
        tree = ast.parse(text)
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if any(isinstance(n, ast.Attribute) and n.attr == attribute for n in ast.walk(fn)):
                found.add(f"{path.relative_to(package).as_posix()}:{fn.name}")
    return found


@pytest.mark.parametrize("package", FLASHINFER_RELEASES, ids=lambda p: str(p))
def test_supports_mnnvl_gates_only_the_nvlink_platform_verdict(package: Path) -> None:
    """The shared-GPU answer is safe only while ``MnnvlMemory.supports_mnnvl`` decides nothing but
    ``nvlink_platform_supported`` (moe_ep's gate): read the installed FlashInfer's own source."""
    if not package.is_dir():
        pytest.skip(f"no FlashInfer at {package}")
    assert _callers(package, "supports_mnnvl") == {
        "moe_ep/backends/split/comm/nvlink_common.py:nvlink_platform_supported"
    }


ANSWER_CHECK = """
import json
from flashinfer.comm.mnnvl import MnnvlMemory
from pytest_mnnvl.backends import flashinfer as backend
before = {name: MnnvlMemory.__dict__[name] for name in vars(MnnvlMemory)}
answered = backend._answer_shared_gpu()
after = dict(vars(MnnvlMemory))
changed = sorted(name for name in set(before) | set(after) if before.get(name) is not after.get(name))
print(json.dumps({"answered": answered, "changed": changed, "verdict": MnnvlMemory.supports_mnnvl()}))
"""


@pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None, reason="FlashInfer is not installed")
def test_the_shared_gpu_answer_changes_supports_mnnvl_and_nothing_else() -> None:
    import json

    done = subprocess.run([sys.executable, "-c", ANSWER_CHECK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {
        "answered": ["flashinfer.comm.mnnvl.MnnvlMemory.supports_mnnvl -> True"],
        "changed": ["supports_mnnvl"],
        "verdict": True,
    }


# ---- options, markers and the header (pytest in a subprocess) ----------------------------------------


@pytest.mark.parametrize(
    "args,ini,message",
    [
        (["--mnnvl-ranks-per-gpu=0"], "", "--mnnvl-ranks-per-gpu='0' is not valid; allowed: an integer 1..64 or auto"),
        (["--mnnvl-ranks-per-gpu=-2"], "", "--mnnvl-ranks-per-gpu='-2' is not valid; allowed: an integer 1..64*"),
        (["--mnnvl-ranks-per-gpu=65"], "", "--mnnvl-ranks-per-gpu='65' is not valid*"),
        (["--mnnvl-ranks-per-gpu=two"], "", "--mnnvl-ranks-per-gpu='two' is not valid*or auto"),
        (["--mnnvl-ranks-per-gpu=²"], "", "--mnnvl-ranks-per-gpu='²' is not valid*"),
        (["--mnnvl-ranks-per-gpu=1.5"], "", "--mnnvl-ranks-per-gpu='1.5' is not valid*"),
        ([], "mnnvl_ranks_per_gpu = many", "--mnnvl-ranks-per-gpu='many' is not valid*"),
        (["--mnnvl-mps=on"], "", "--mnnvl-mps='on' is not valid; allowed: auto, off, start"),
        ([], "mnnvl_mps = always", "--mnnvl-mps='always' is not valid; allowed: auto, off, start"),
    ],
)
def test_bad_sharing_options_are_usage_errors(
    pytester: pytest.Pytester, args: list[str], ini: str, message: str
) -> None:
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])


def test_sharing_options_under_torchrun_are_usage_errors(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl", "--mnnvl-launcher=torchrun", "--mnnvl-ranks-per-gpu=2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: --mnnvl-ranks-per-gpu=2 --mnnvl-mps=auto is not valid with --mnnvl-launcher=torchrun*"]
    )


NO_GPU_TESTS = """
import pytest

def test_world(mnnvl_world):
    mnnvl_world(2)

@pytest.mark.requires_one_sided
def test_one_sided():
    pass

@pytest.mark.mnnvl(world_size=4)
def test_marked(mnnvl_world):
    mnnvl_world()

@pytest.mark.requires_multi_gpu(n=1)
def test_one_gpu():
    pass
"""


def test_shared_mode_without_a_gpu_skips_with_a_reason_that_says_so(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(NO_GPU_TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "pytest_mnnvl", "-rs", "--mnnvl-backend=flashinfer", "--mnnvl-ranks-per-gpu=auto", timeout=120
    )
    result.assert_outcomes(skipped=4)
    result.stdout.fnmatch_lines(
        [
            "mnnvl: GPU worlds (--mnnvl-ranks-per-gpu=auto --mnnvl-mps=auto): ws2-pp1 skipped, ws4-pp1 skipped, "
            "ws4-pp2 skipped (skipped: shared-GPU mode*no GPU is visible to this process*); MPS off",
            "mnnvl: MPS: no MPS control daemon*none is started in auto mode",
        ]
    )
    no_gpu = "shared-GPU mode (--mnnvl-ranks-per-gpu=auto) needs at least 1 GPU for a world of"
    result.stdout.fnmatch_lines(
        [
            f"SKIPPED [[]1[]] test_*.py:3: {no_gpu} 2 ranks, and no GPU is visible to this process*",
            f"SKIPPED [[]1[]] test_*.py:6: one-sided all-to-all: {no_gpu} 2 ranks*",
            f"SKIPPED [[]1[]] test_*.py:10: one-sided all-to-all: {no_gpu} 4 ranks*",
            # requires_multi_gpu(n) keeps counting physical GPUs.
            "SKIPPED [[]1[]] test_*.py:14: needs 1 GPU*, 0 visible*",
        ]
    )


def test_auto_backend_with_sharing_on_a_machine_without_gpus(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl", "--mnnvl-ranks-per-gpu=auto", "--mnnvl-mps=start")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        [
            "mnnvl: backend=auto -> sim*",
            "mnnvl: GPU worlds: --mnnvl-ranks-per-gpu=auto --mnnvl-mps=start has no effect: backend sim runs no GPU",
        ]
    )


# ---- on a GPU ------------------------------------------------------------------------------------------

SHARED_WORLD_TEST = """
import torch
import torch.distributed as dist

def facts(ctx):
    from flashinfer.comm.mnnvl import MnnvlMemory
    return {
        "device": str(ctx.device),
        "current": torch.cuda.current_device(),
        "visible": torch.cuda.device_count(),
        "default": dist.get_backend(),
        "ep": dist.get_backend(ctx.ep_group),
        "answered": ctx.answered_queries,
        "supports_mnnvl": MnnvlMemory.supports_mnnvl(),
        "support_nvlink_is_flashinfers": MnnvlMemory.support_nvlink.__module__ == "flashinfer.comm.mnnvl",
    }

def test_two_ranks_on_one_gpu(mnnvl_world):
    out = mnnvl_world(2).run(facts)
    assert [o["device"] for o in out] == ["cuda:0", "cuda:0"]
    assert {o["visible"] for o in out} == {1}
    assert {(o["default"], o["ep"]) for o in out} == {("gloo", "gloo")}
    assert {o["answered"] for o in out} == {("flashinfer.comm.mnnvl.MnnvlMemory.supports_mnnvl -> True",)}
    assert all(o["supports_mnnvl"] and o["support_nvlink_is_flashinfers"] for o in out)
"""


@pytest.mark.requires_one_sided
def test_gpu_two_ranks_share_one_gpu(pytester: pytest.Pytester) -> None:
    """On a GPU (run with ``--mnnvl-ranks-per-gpu=auto`` where there is one): a real flashinfer world of two
    ranks on one GPU, gloo groups, the one platform answer recorded in every rank's context."""
    pytester.makepyfile(SHARED_WORLD_TEST)
    result = pytester.runpytest_subprocess(
        "-p", "pytest_mnnvl", "--mnnvl-backend=flashinfer", "--mnnvl-ranks-per-gpu=2", "-v", timeout=1200
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["mnnvl: GPU worlds (--mnnvl-ranks-per-gpu=2 *): ws2-pp1 2 ranks on 1 GPU*"])


# ---- repro -----------------------------------------------------------------------------------------------

PLAN = Path(__file__).resolve().parents[1] / "examples" / "plans" / "deepseek-v3-r1-nvfp4-mtp.json"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ranks-per-gpu", "0"], "argument --ranks-per-gpu: '0' is not valid; allowed: an integer 1..64 or auto"),
        (["--mps", "on"], "argument --mps: invalid choice: 'on'"),
        (
            ["--backend", "flashinfer", "--ranks-per-gpu", "auto", "--mps", "start"],
            "--backend flashinfer: cannot run 2 ranks here: one-sided all-to-all: shared-GPU mode (--ranks-per-gpu "
            "auto) needs at least 1 GPU for a world of 2 ranks, and no GPU is visible to this process",
        ),
    ],
)
def test_repro_sharing_arguments(args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest_mnnvl", "repro", str(PLAN), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
