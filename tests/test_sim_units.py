"""The sim backend's pieces in the test process itself: no ranks, no install, no FlashInfer import."""

from __future__ import annotations

import os
import sys

import pytest

from pytest_mnnvl.backends import _kernels, _shm, records, sim
from pytest_mnnvl.backends import flashinfer as real


@pytest.mark.parametrize(
    ("ep", "dispatch", "expected"),
    [
        (2, 2048 + 256 + 16, 5_427_584),
        (2, 8192 + 16, 8_442_240),
        (4, 2048 + 256 + 16, 10_809_728),
        (4, 8192 + 16, 16_839_040),
    ],
)
def test_size_function_without_install(ep: int, dispatch: int, expected: int) -> None:
    """Numbers measured with FlashInfer on 2×/4×H100 (T=256, H=4096, top_k=2)."""
    assert not sim.installed()
    assert sim.moe_a2a_get_workspace_size_per_rank(ep, 256, dispatch, 8192) == expected
    assert sim.moe_a2a_get_workspace_size_per_rank(ep, 256, 0, 0, backend="trtllm") == 45_440


def test_size_function_rejects_unknown_backends() -> None:
    with pytest.raises(ValueError, match="Unknown MoE all-to-all backend 'nccl'"):
        sim.moe_a2a_get_workspace_size_per_rank(2, 8, 1, 1, backend="nccl")
    with pytest.raises(NotImplementedError, match="cake"):
        sim.moe_a2a_get_workspace_size_per_rank(2, 8, 1, 1, backend="cake")


def test_check_formats_follow_tvm_ffi() -> None:
    with pytest.raises(RuntimeError) as info:
        _kernels.check(False, "a >= b", "too small")
    assert str(info.value) == "Check failed: (a >= b) is false: too small"
    with pytest.raises(RuntimeError) as info:
        _kernels.check_eq(3, 2, "workspace.size(0)", "epSize", "first dim")
    assert str(info.value) == "Check failed: workspace.size(0) == epSize (3 vs. 2) : first dim"


def test_owner_ranks_are_contiguous_blocks() -> None:
    import torch

    ids = torch.arange(7).view(-1, 1)
    # E=7 over 2 ranks: rank 0 owns 4 experts, rank 1 owns 3.
    assert _kernels.owner_ranks(ids, 7, 2).flatten().tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert _kernels.owner_ranks(torch.arange(8).view(-1, 1), 8, 4).flatten().tolist() == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    # C division truncates: a small negative id lands on rank 0, as on a GPU.
    assert _kernels.owner_ranks(torch.tensor([[-1]]), 8, 2).item() == 0
    targets = torch.tensor([[1, 1, 0, 1], [2, 3, 2, 3]])
    assert _kernels.first_occurrence(targets).tolist() == [
        [True, False, True, False],
        [True, True, False, False],
    ]


def test_memfd_rows_map_into_one_strided_view() -> None:
    """Two 'ranks' in one process: the same rows mapped twice, writes through one seen through the other."""
    import torch

    vm = _shm.VirtualMemory()
    rows = [vm.create(_shm.GRANULARITY, f"unit-{i}") for i in range(2)]
    stride = 1 << 29
    starts = [vm.reserve(2 * stride, stride) for _ in range(2)]

    def share(row: _shm.SimMemHandle) -> _shm.SimMemHandle:
        exported = vm.export(row)  # what travels over SCM_RIGHTS; FlashInfer closes it after import
        try:
            return vm.import_fd(exported)
        finally:
            os.close(exported)

    peers = [[share(row) for row in rows] for _ in starts]
    try:
        for start, handles in zip(starts, peers, strict=True):
            for i, handle in enumerate(handles):
                vm.map(start + i * stride, _shm.GRANULARITY, handle)
                vm.check_mapped(start + i * stride, _shm.GRANULARITY)
        views = [_shm.strided_tensor(start, 4096, stride, 2, torch.uint8) for start in starts]
        assert views[0].shape == (2, 4096) and views[0].stride() == (stride, 1)
        views[0][1, 10:14] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
        _shm.memory_fence()
        assert views[1][1, 10:14].tolist() == [1, 2, 3, 4]
        assert len(_shm.live_memfds()) >= 6
        with pytest.raises(_shm.SimMemoryError, match="overlaps"):
            vm.map(starts[0], _shm.GRANULARITY, peers[0][0])
        with pytest.raises(_shm.SimMemoryError, match="still live"):
            vm.free(starts[0], 2 * stride)
    finally:
        for start, handles in zip(starts, peers, strict=True):
            for i, handle in enumerate(handles):
                vm.unmap(start + i * stride, _shm.GRANULARITY)
                vm.release(handle)
            vm.free(start, 2 * stride)
        for row in rows:
            vm.release(row)
    assert _shm.live_memfds() == [] and _shm.mapped_memfd_bytes() == 0
    with pytest.raises(_shm.SimMemoryError, match="released"):
        vm.release(rows[0])


def test_records_are_empty_without_flashinfer() -> None:
    if "flashinfer.comm.trtllm_moe_alltoall" in sys.modules:
        pytest.skip("FlashInfer was imported in this process by another test")
    snap = records.snapshot()
    assert snap.workspaces == () and snap.allocations == () and snap.live_bytes_per_rank == 0


def test_flashinfer_backend_says_why_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    reason = real.available()
    assert reason is not None and ("GPU" in reason or "driver" in reason or "installed" in reason)


def test_importing_the_backends_imports_no_flashinfer() -> None:
    code = (
        "import sys; import pytest_mnnvl.backends.sim, pytest_mnnvl.backends.flashinfer, "
        "pytest_mnnvl.backends.records; print(any(m.startswith('flashinfer') for m in sys.modules))"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.strip() == "False"


def test_an_unsupported_flashinfer_release_gets_one_clear_error() -> None:
    """Named: the installed version, the supported ones, and which of their pieces it lacks (a subprocess:
    finding the pieces imports FlashInfer)."""
    import subprocess
    from importlib import metadata

    code = "from pytest_mnnvl.backends import sim; sim.release_for('0.7.3')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert out.returncode == 1
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "RuntimeError: pytest-mnnvl sim backend: flashinfer-python 0.7.3 is installed, but the sim supports only "
        "0.7.2.post1, 0.7.4; pieces it lacks per supported release: "
    )
    assert line.endswith(". Install a supported one (pip install --no-deps flashinfer-python==0.7.4)")
    gaps = {
        "0.7.2.post1": "0.7.2.post1: nothing missing, but this version was not checked; 0.7.4: "
        "flashinfer.jit.comm.gen_nvlink_one_sided_alltoall_module, ",
        "0.7.4": "0.7.2.post1: flashinfer.comm.trtllm_moe_alltoall; 0.7.4: nothing missing, but this version "
        "was not checked.",
    }
    assert gaps[metadata.version("flashinfer-python")] in line
    assert sim.SUPPORTED_FLASHINFER_VERSIONS == ("0.7.2.post1", "0.7.4")
    assert [sim.release_for(v).__name__.rsplit(".", 1)[1] for v in sim.SUPPORTED_FLASHINFER_VERSIONS] == [
        "_sim_v072",
        "_sim_v074",
    ]
