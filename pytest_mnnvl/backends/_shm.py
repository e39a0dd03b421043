"""Host-memory stand-ins for the CUDA virtual-memory calls behind FlashInfer's ``MnnvlMemory``.

On a GPU each rank's workspace row is physical memory (``cuMemCreate``) exported as a POSIX fd,
passed to the peers and mapped by every rank into one reserved virtual range, one row per
``rank_stride``. Here a row is an anonymous ``memfd`` file, and the reservation and the
mappings are plain ``mmap`` calls, so the same fds travel over FlashInfer's own SCM_RIGHTS
exchange and every rank really sees its peers' rows. A memfd has no name in any file system:
nothing is left in ``/dev/shm`` even when a rank is SIGKILLed, the kernel frees the pages with
the last fd and mapping.

Only Linux is supported (``memfd_create``, ``MAP_FIXED``).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Linux mmap flags (identical on x86_64 and aarch64); Python's mmap module lacks MAP_FIXED.
_PROT_NONE = 0x0
_PROT_READ = 0x1
_PROT_WRITE = 0x2
_PROT_EXEC = 0x4
_MAP_SHARED = 0x01
_MAP_PRIVATE = 0x02
_MAP_FIXED = 0x10
_MAP_ANONYMOUS = 0x20
_MAP_NORESERVE = 0x4000
_MAP_FAILED = ctypes.c_void_p(-1).value

#: What ``cuMemGetAllocationGranularity(RECOMMENDED)`` gives on H100: FlashInfer rounds sizes to it.
GRANULARITY = 2 << 20
#: Prefix of every memfd the sim creates (visible in ``/proc/<pid>/fd`` as ``memfd:<name>``).
MEMFD_PREFIX = "pytest-mnnvl-sim"
#: Bytes after each row's data in its memfd, never mapped into the workspace: the race detector's
#: bookkeeping for that row (who reads which bytes of it), shared by every rank holding the row.
SIDECAR_BYTES = 8192

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.restype = ctypes.c_int
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class SimMemoryError(RuntimeError):
    """A virtual-memory call the real driver would also have refused (bad range, double free)."""


def _os_error(call: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}")


def _mmap(addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    result = _libc.mmap(addr or None, length, prot, flags, fd, offset)
    if result is None or result == _MAP_FAILED:
        raise _os_error("mmap")
    return int(result)


def _munmap(addr: int, length: int) -> None:
    if _libc.munmap(addr, length) != 0:
        raise _os_error("munmap")


def _reserve_flags() -> int:
    return _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE


@dataclass(eq=False)
class SimMemHandle:
    """What ``cuMemCreate``/``cuMemImportFromShareableHandle`` return: one fd on one row's memfd."""

    fd: int
    size: int
    owner_pid: int
    released: bool = False
    #: Address of this process's mapping of the row's sidecar (see :data:`SIDECAR_BYTES`); 0 if none.
    sidecar: int = 0


@dataclass(eq=False)
class VirtualMemory:
    """Reservations and mappings of one process, checked the way the driver checks them."""

    reservations: dict[int, int] = field(default_factory=dict)
    mappings: dict[int, tuple[int, SimMemHandle]] = field(default_factory=dict)
    handles: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def create(self, size: int, name: str) -> SimMemHandle:
        """A fresh zero-filled row of ``size`` bytes (``cuMemCreate``)."""
        if size <= 0 or size % GRANULARITY:
            raise SimMemoryError(f"cuMemCreate: size {size} is not a positive multiple of {GRANULARITY}")
        fd = os.memfd_create(f"{MEMFD_PREFIX}-{name}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size + SIDECAR_BYTES)
            handle = SimMemHandle(fd, size, os.getpid(), sidecar=_map_sidecar(fd, size))
        except BaseException:
            os.close(fd)
            raise
        self.handles.add(id(handle))
        return handle

    def export(self, handle: SimMemHandle) -> int:
        """A new fd the caller owns (``cuMemExportToShareableHandle`` returns a fresh one too)."""
        self._check_live(handle, "cuMemExportToShareableHandle")
        return os.dup(handle.fd)

    def import_fd(self, fd: int) -> SimMemHandle:
        """Adopt a peer's row from a received fd; the caller keeps (and closes) ``fd`` itself."""
        own = os.dup(fd)
        size = os.fstat(own).st_size - SIDECAR_BYTES
        handle = SimMemHandle(own, size, os.getpid(), sidecar=_map_sidecar(own, size))
        self.handles.add(id(handle))
        return handle

    def reserve(self, size: int, alignment: int) -> int:
        """An inaccessible, aligned address range (``cuMemAddressReserve``)."""
        alignment = max(alignment, mmap.PAGESIZE)
        with self.lock:
            base = _mmap(0, size + alignment, _PROT_NONE, _reserve_flags())
            start = (base + alignment - 1) // alignment * alignment
            if start > base:
                _munmap(base, start - base)
            tail = base + size + alignment - (start + size)
            if tail:
                _munmap(start + size, tail)
            self.reservations[start] = size
        return start

    def _reservation_of(self, ptr: int, size: int) -> int:
        for start, length in self.reservations.items():
            if start <= ptr and ptr + size <= start + length:
                return start
        raise SimMemoryError(f"range [{ptr:#x}, {ptr + size:#x}) is not inside a reserved address range")

    def map(self, ptr: int, size: int, handle: SimMemHandle) -> None:
        """Map a row read-write at ``ptr`` inside a reservation (``cuMemMap``)."""
        self._check_live(handle, "cuMemMap")
        if size > handle.size:
            raise SimMemoryError(f"cuMemMap: {size} bytes requested from a {handle.size}-byte allocation")
        with self.lock:
            self._reservation_of(ptr, size)
            for start, (length, _) in self.mappings.items():
                if start < ptr + size and ptr < start + length:
                    raise SimMemoryError(f"cuMemMap: [{ptr:#x}, +{size}) overlaps a live mapping")
            got = _mmap(ptr, size, _PROT_READ | _PROT_WRITE, _MAP_SHARED | _MAP_FIXED, handle.fd)
            if got != ptr:
                raise SimMemoryError(f"cuMemMap: mapped at {got:#x}, wanted {ptr:#x}")
            self.mappings[ptr] = (size, handle)

    def check_mapped(self, ptr: int, size: int) -> None:
        """``cuMemSetAccess`` only needs the range to be mapped: rows are always read-write here."""
        with self.lock:
            entry = self.mappings.get(ptr)
        if entry is None or entry[0] < size:
            raise SimMemoryError(f"cuMemSetAccess: [{ptr:#x}, +{size}) is not mapped")

    def unmap(self, ptr: int, size: int) -> None:
        """Return a mapped range to the reservation (``cuMemUnmap``): later access faults."""
        with self.lock:
            entry = self.mappings.pop(ptr, None)
            if entry is None or entry[0] != size:
                if entry is not None:
                    self.mappings[ptr] = entry
                raise SimMemoryError(f"cuMemUnmap: [{ptr:#x}, +{size}) is not one mapping")
            _mmap(ptr, size, _PROT_NONE, _reserve_flags() | _MAP_FIXED)

    def release(self, handle: SimMemHandle) -> None:
        """Drop this process's reference to a row (``cuMemRelease``); pages go with the last one."""
        self._check_live(handle, "cuMemRelease")
        handle.released = True
        self.handles.discard(id(handle))
        if handle.sidecar:
            _munmap(handle.sidecar, SIDECAR_BYTES)
            handle.sidecar = 0
        os.close(handle.fd)

    def handle_at(self, ptr: int) -> SimMemHandle | None:
        """The row mapped exactly at ``ptr`` in this process (a workspace row's first byte), if any."""
        with self.lock:
            entry = self.mappings.get(ptr)
        return entry[1] if entry is not None else None

    def free(self, ptr: int, size: int) -> None:
        """Give a reservation back (``cuMemAddressFree``); every mapping in it must be gone."""
        with self.lock:
            length = self.reservations.get(ptr)
            if length is None or length != size:
                raise SimMemoryError(f"cuMemAddressFree: [{ptr:#x}, +{size}) is not one reservation")
            inside = [start for start in self.mappings if ptr <= start < ptr + size]
            if inside:
                raise SimMemoryError(f"cuMemAddressFree: {len(inside)} mapping(s) still live in the range")
            _munmap(ptr, size)
            del self.reservations[ptr]

    def __post_init__(self) -> None:
        _LIVE_VMS.add(self)

    def _check_live(self, handle: Any, call: str) -> None:
        if not isinstance(handle, SimMemHandle) or handle.released or id(handle) not in self.handles:
            raise SimMemoryError(f"{call}: invalid or released allocation handle {handle!r}")


_LIVE_VMS: weakref.WeakSet[VirtualMemory] = weakref.WeakSet()


def _map_sidecar(fd: int, size: int) -> int:
    # A raw mapping, not Python's mmap (which would hold a dup of the fd and change fd counts).
    return _mmap(0, SIDECAR_BYTES, _PROT_READ | _PROT_WRITE, _MAP_SHARED, fd, size)


def sidecar_at(ptr: int) -> int:
    """Address of the sidecar of the row mapped at ``ptr`` in this process (0 outside sim memory)."""
    for vm in list(_LIVE_VMS):
        handle = vm.handle_at(ptr)
        if handle is not None:
            return handle.sidecar
    return 0


def strided_tensor(
    ptr: int, segment_size: int, segment_stride: int, num_segments: int, dtype: Any, *, owner: Any = None
) -> Any:
    """A CPU ``[num_segments, segment_size / itemsize]`` view of mapped rows ``segment_stride`` apart.

    FlashInfer builds the same view over device memory with a CUDA DLPack capsule; a CPU tensor
    cannot come from that, so it is built over a raw buffer instead. Nothing is touched here:
    the gaps between rows stay inaccessible. ``owner`` (the allocation) lives as long as the
    view or any view of it, as the capsule's owner does: the mapping cannot go away under it.
    """
    import torch

    itemsize = torch.empty((), dtype=dtype).element_size()
    if segment_size % itemsize or segment_stride % itemsize:
        raise ValueError(f"segment size/stride must be multiples of the {dtype} item size {itemsize}")
    span = (num_segments - 1) * segment_stride + segment_size if num_segments else 0
    raw = (ctypes.c_char * max(span, itemsize)).from_address(ptr)
    if owner is not None:
        raw._owner = owner  # type: ignore[attr-defined]  # the tensor's storage holds ``raw``
    flat = torch.frombuffer(raw, dtype=dtype)
    return flat.as_strided((num_segments, segment_size // itemsize), (segment_stride // itemsize, 1))


def _machine_fence() -> Callable[[], None] | None:
    """A callable full memory fence (x86 ``mfence``, arm64 ``dmb ish``), or None if unavailable.

    Payloads may be copied with non-temporal stores (large ``memcpy``), which x86 does not order
    with a later plain store; the completion flag must not become visible before the payload.
    """
    code = {"x86_64": bytes.fromhex("0faef0c3"), "aarch64": bytes.fromhex("bf3b03d5c0035fd6")}.get(platform.machine())
    if code is None:
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=_PROT_READ | _PROT_WRITE)
        page.write(code)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        if _libc.mprotect(address, mmap.PAGESIZE, _PROT_READ | _PROT_EXEC) != 0:
            return None
    except (OSError, ValueError, TypeError):
        return None
    fence = ctypes.CFUNCTYPE(None)(address)
    fence._page = page  # type: ignore[attr-defined]  # keep the code page alive with the function
    fence()
    return fence


def _lock_fence() -> None:
    # A locked read-modify-write: a full barrier for ordinary stores (no machine-code fence here).
    _fallback_lock.acquire()
    _fallback_lock.release()


_fallback_lock = threading.Lock()
memory_fence: Callable[[], None] = _machine_fence() or _lock_fence


def live_memfds(pid: int | None = None) -> list[str]:
    """The sim's memfds a process still holds open (``memfd:pytest-mnnvl-sim-…`` fd links)."""
    fd_dir = f"/proc/{pid or os.getpid()}/fd"
    found = []
    try:
        entries = os.listdir(fd_dir)
    except OSError:
        return []
    for entry in entries:
        try:
            target = os.readlink(os.path.join(fd_dir, entry))
        except OSError:
            continue
        if target.startswith(f"/memfd:{MEMFD_PREFIX}"):
            found.append(target)
    return found


def mapped_memfd_bytes(pid: int | None = None) -> int:
    """Bytes of the sim's memfd rows mapped into a process (from ``/proc/<pid>/maps``)."""
    total = 0
    try:
        with open(f"/proc/{pid or os.getpid()}/maps") as maps:
            for line in maps:
                fields = line.split()
                # Rows are mapped from offset 0; a non-zero offset is a sidecar page, not workspace.
                if f"/memfd:{MEMFD_PREFIX}" in line and int(fields[2], 16) == 0:
                    lo, hi = fields[0].split("-")
                    total += int(hi, 16) - int(lo, 16)
    except OSError:
        return 0
    return total
