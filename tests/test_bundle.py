"""The offline bundle: trimming keeps what the one-sided module needs, and a restored bundle imports."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_mnnvl.cli import bundle


@pytest.mark.parametrize(
    "path,kept",
    [
        ("comm/trtllm_moe_alltoall.py", True),
        ("data/csrc/trtllm_moe_alltoall.cu", True),
        ("data/csrc/tvm_ffi_utils.h", True),
        ("data/csrc/nv_internal/tensorrt_llm/kernels/communicationKernels/moeAlltoAllKernels.cu", True),
        ("data/include/flashinfer/utils.cuh", True),
        ("data/csrc/batch_attention.cu", False),
        ("data/cutlass/include/cutlass/cutlass.h", False),
        ("data/csrc/sub/other.h", False),
    ],
)
def test_keep(path: str, kept: bool) -> None:
    assert bundle.keep(path) is kept


@pytest.mark.parametrize(
    "path,kept",
    [
        ("moe_ep/backends/split/comm/nvlink_one_sided/kernels.py", True),
        ("data/csrc/nvlink_one_sided_alltoall.cu", True),
        ("data/csrc/nvlink_one_sided_lamport.cu", True),
        ("data/cutlass/include/cutlass/arch/barrier.h", True),
        ("data/cutlass/tools/util/include/cutlass/util/device_memory.h", True),
        ("data/csrc/trtllm_moe_alltoall.cu", False),
        ("data/cutlass/examples/00_basic_gemm/basic_gemm.cu", False),
        ("data/csrc/batch_attention.cu", False),
    ],
)
def test_keep_for_0_7_4(path: str, kept: bool) -> None:
    """0.7.4's one-sided module is built from other sources, and its kernels include CUTLASS headers."""
    assert bundle.keep(path, "0.7.4") is kept


def test_every_supported_release_has_a_file_list() -> None:
    from pytest_mnnvl.model import releases

    assert tuple(bundle.KEEP_BY_RELEASE) == releases.SUPPORTED


def test_build_refuses_an_unsupported_release(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest_mnnvl.cli.bundle", "build", "--out", str(tmp_path), "--flashinfer", "0.8.0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "--flashinfer=0.8.0: not a supported FlashInfer release (allowed: 0.7.2.post1, 0.7.4)" in done.stderr
    assert not any(tmp_path.iterdir())  # refused before any download


def test_trim_and_restore_the_installed_flashinfer(tmp_path: Path) -> None:
    spec = importlib.util.find_spec("flashinfer")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("flashinfer-python is not installed: run `bash .ci/install`")
    package = Path(next(iter(spec.submodule_search_locations)))
    out = tmp_path / "bundle"
    out.mkdir()
    kept = bundle.trim(package, None, out / bundle.ARCHIVE, preset=0)
    assert "comm/trtllm_moe_alltoall.py" in kept and "data/csrc/trtllm_moe_alltoall.cu" in kept
    assert (out / bundle.ARCHIVE).stat().st_size < bundle.SIZE_LIMIT

    env = bundle.restore(out, tmp_path / "restored")
    site = env["PYTHONPATH"].split(os.pathsep)[0]
    code = "import flashinfer.comm, flashinfer.moe_ep, sys; print(flashinfer.comm.__file__)"
    # The restored folder goes first on sys.path: the import must come from there, not the venv.
    done = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path[:0] = {[site, *sys.path[1:]]!r}; {code}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith(site)


def test_restore_refuses_a_folder_without_a_bundle(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest_mnnvl.cli.bundle", "restore", str(tmp_path), "--into", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "no flashinfer-trimmed.tar.xz there" in done.stderr
