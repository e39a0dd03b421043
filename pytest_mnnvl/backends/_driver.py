"""The CUDA driver calls ``flashinfer.comm.mnnvl`` makes, answered on the host.

``MnnvlMemory`` reaches the driver only through the module global ``cuda`` of
``flashinfer/comm/mnnvl.py`` (``cuda.bindings.driver``). The sim swaps that one name for a
:class:`SimDriver`: FlashInfer's allocation algorithm (size allgather, fabric vote, bump
allocator, fd exchange over SCM_RIGHTS, per-rank mapping, refcounted teardown) then runs as
written, and only the leaves below do host work. Types and enums (``CUmemAllocationProp``,
``CUresult``, …) are the real ones from cuda-python, which import without a driver. Any other
driver call raises, so an unexpected path (multicast above all) fails loudly instead of
touching hardware.
"""

from __future__ import annotations

import os
from typing import Any

from ._shm import GRANULARITY, SimMemHandle, VirtualMemory


class SimDriver:
    """Duck-typed ``cuda.bindings.driver`` for one rank: device ``device_index`` of a POSIX-fd platform."""

    def __init__(self, real: Any, device_index: int, label: str, vm: VirtualMemory | None = None) -> None:
        self._real = real
        self._device_index = device_index
        self._label = label
        self.vm = vm or VirtualMemory()
        self._ok = real.CUresult.CUDA_SUCCESS
        self._posix = real.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        attr = real.CUdevice_attribute
        # A single-node H100 box without IMEX: POSIX fds and VMM yes, FABRIC and multicast no.
        self._attributes = {
            attr.CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED: 0,
            attr.CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED: 1,
            attr.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: 1,
            attr.CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED: 0,
        }

    def __getattr__(self, name: str) -> Any:
        if name.startswith("cu"):
            raise NotImplementedError(
                f"pytest-mnnvl sim backend: the CUDA driver call {name} is not emulated "
                "(only the MnnvlMemory allocation path of MoeAlltoAll is)"
            )
        return getattr(self._real, name)

    def _result(self, value: Any = None) -> tuple[Any, ...]:
        return (self._ok,) if value is None else (self._ok, value)

    def cuCtxGetDevice(self) -> tuple[Any, ...]:
        return self._result(self._real.CUdevice(self._device_index))

    def cuDeviceGetAttribute(self, attrib: Any, dev: Any) -> tuple[Any, ...]:
        return self._result(int(self._attributes.get(attrib, 0)))

    def cuMemGetAllocationGranularity(self, prop: Any = None, option: Any = None) -> tuple[Any, ...]:
        return self._result(GRANULARITY)

    def cuMemCreate(self, size: int, prop: Any, flags: int = 0) -> tuple[Any, ...]:
        if prop.requestedHandleTypes != self._posix:
            raise NotImplementedError(
                "pytest-mnnvl sim backend: only POSIX fd handles are emulated, got "
                f"{prop.requestedHandleTypes!r} (the sim reports no FABRIC support)"
            )
        return self._result(self.vm.create(int(size), self._label))

    def cuMemExportToShareableHandle(self, handle: SimMemHandle, handle_type: Any, flags: int = 0) -> Any:
        return self._result(self.vm.export(handle))

    def cuMemImportFromShareableHandle(self, os_handle: Any, handle_type: Any) -> tuple[Any, ...]:
        return self._result(self.vm.import_fd(int(os_handle)))

    def cuMemAddressReserve(self, size: int, alignment: int, addr: Any = 0, flags: int = 0) -> Any:
        return self._result(self._real.CUdeviceptr(self.vm.reserve(int(size), int(alignment))))

    def cuMemMap(self, ptr: Any, size: int, offset: int, handle: SimMemHandle, flags: int = 0) -> Any:
        if offset:
            raise NotImplementedError("pytest-mnnvl sim backend: cuMemMap with a non-zero offset")
        self.vm.map(int(ptr), int(size), handle)
        return self._result()

    def cuMemSetAccess(self, ptr: Any, size: int, desc: Any, count: int) -> tuple[Any, ...]:
        self.vm.check_mapped(int(ptr), int(size))
        return self._result()

    def cuMemUnmap(self, ptr: Any, size: int) -> tuple[Any, ...]:
        self.vm.unmap(int(ptr), int(size))
        return self._result()

    def cuMemRelease(self, handle: SimMemHandle) -> tuple[Any, ...]:
        self.vm.release(handle)
        return self._result()

    def cuMemAddressFree(self, ptr: Any, size: int) -> tuple[Any, ...]:
        self.vm.free(int(ptr), int(size))
        return self._result()


def process_label(rank: int) -> str:
    """The memfd name suffix of a rank: rank and pid, so leaks are attributable."""
    return f"r{rank}-p{os.getpid()}"
