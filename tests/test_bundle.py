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
