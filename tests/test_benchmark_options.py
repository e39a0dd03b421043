"""The benchmark scripts' options: a bad value is refused with its name and what is allowed, before anything
starts (a GPU call spent on a typo is minutes lost), and the sim places its worlds on no GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


@pytest.fixture(scope="module")
def bench_threads() -> object:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_threads as module
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.mark.parametrize(
    ("label", "parsed"),
    [
        ("share", ("share", 0, 0)),
        ("torch", ("torch", 0, 0)),
        ("share-n8", ("share", 8, 0)),
        ("share-c2", ("share", 0, 2)),
        ("torch-n2-c1", ("torch", 2, 1)),
    ],
)
def test_bench_threads_configurations(bench_threads: object, label: str, parsed: tuple[str, int, int]) -> None:
    config = bench_threads.parse_config(label)  # type: ignore[attr-defined]
    assert (config.policy, config.workers, config.cpus, config.spawn) == (*parsed, False)
    spawned = bench_threads.parse_config(label + "-spawn")  # type: ignore[attr-defined]
    assert (spawned.policy, spawned.workers, spawned.cpus, spawned.spawn) == (*parsed, True)


@pytest.mark.parametrize(
    "label",
    ["shared", "share-n0", "share-n", "share -n8", "torch-n-1", "", "share-c0", "share-c2-n2", "share-spawn-c2"],
)
def test_bench_threads_refuses_a_bad_configuration(bench_threads: object, label: str) -> None:
    with pytest.raises(ValueError, match=f"configuration {label!r} is not valid; allowed: share or torch"):
        bench_threads.parse_config(label)  # type: ignore[attr-defined]


def test_bench_threads_refuses_more_cpus_than_it_has(bench_threads: object) -> None:
    with pytest.raises(ValueError, match="configuration 'share-c9' asks for 9 CPUs; this process may use 8"):
        bench_threads.parse_config("share-c9", 8)  # type: ignore[attr-defined]


def test_bench_threads_cpu_set_is_a_subset_of_the_affinity(bench_threads: object) -> None:
    import os

    mine = os.sched_getaffinity(0)
    assert bench_threads.cpu_set(0) is None  # type: ignore[attr-defined]
    one = bench_threads.cpu_set(1)  # type: ignore[attr-defined]
    assert len(one) == 1 and one <= mine


def test_bench_threads_command_line_names_the_bad_configuration(tmp_path: Path) -> None:
    result = run_script("bench_threads.py", str(tmp_path), "--configs", "share,share-n2,fast")
    assert result.returncode == 2
    assert "--configs='share,share-n2,fast': configuration 'fast' is not valid" in result.stderr
    result = run_script("bench_threads.py", str(tmp_path), "--configs", "share,share")
    assert result.returncode == 2
    assert "distinct configurations" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ranks-per-gpu", "0"], "--ranks-per-gpu='0' is not valid; allowed: an integer 1..64 or auto"),
        (["--ranks-per-gpu", "two"], "--ranks-per-gpu='two' is not valid"),
        (["--mps", "on"], "--mps='on' is not valid; allowed: auto, off, start"),
    ],
)
def test_bench_example_refuses_bad_sharing_options(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_script("bench_example.py", str(tmp_path / "out.json"), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "out.json").exists()


def test_bench_example_places_a_sim_world_on_no_gpu() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_example
    finally:
        sys.path.remove(str(BENCHMARKS))
    where = bench_example.placement_for(4, "sim", "auto", None)
    assert where == bench_example.Placement(None, 1, ())
