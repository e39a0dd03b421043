"""Which GPUs this process would see, without initialising CUDA, and whether a test's GPU count fits.

NVML enumerates the physical GPUs (or, without ``pynvml``, the driver's ``/proc`` files);
``CUDA_VISIBLE_DEVICES`` is then applied the way the CUDA runtime applies it (ordinals or ``GPU-`` UUID
prefixes; an invalid entry hides itself and every later one; a repeated entry hides everything; an empty
value means no GPU). CUDA numbers devices fastest-first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; NVML
numbers them by PCI bus id. On a box of identical GPUs both orders agree, which is the case this harness
targets. Under pytest-xdist each worker gets its share of the GPUs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pytest_mnnvl.probes.nvml import _import_nvml, _init_failure, _nvml_error, _shutdown, _text
from pytest_mnnvl.probes.probe import _cached

PROC_NVIDIA_GPUS = "/proc/driver/nvidia/gpus"


@dataclass(frozen=True)
class VisibleDevices:
    """``CUDA_VISIBLE_DEVICES`` as the CUDA runtime reads it.

    ``entries`` is ``None`` when the variable is unset (every GPU is visible); otherwise the
    entries CUDA keeps, in order: ``int`` ordinals and ``str`` UUID prefixes (``GPU-…``/``MIG-…``).
    ``note`` says what was dropped and why ('' when nothing was).
    """

    raw: str | None
    entries: tuple[int | str, ...] | None
    note: str = ""


_ORDINAL = re.compile(r"\+?(\d+)")


def parse_visible_devices(value: str | None) -> VisibleDevices:
    """Parse ``CUDA_VISIBLE_DEVICES`` (pure).

    An entry is an ordinal read like ``strtoul`` (leading digits count: ``1gpu`` is 1) or a UUID
    prefix starting ``GPU-``/``MIG-``. The first entry that is neither (``-1``, ``''``, ``none``)
    ends the list; a repeated entry makes the whole list empty, as CUDA then exposes no device.
    """
    if value is None:
        return VisibleDevices(None, None)
    kept: list[int | str] = []
    note = ""
    for part in value.split(","):
        entry = part.strip()
        token: int | str
        if entry[:4].upper() in ("GPU-", "MIG-"):
            token = entry[:4].upper() + entry[4:].lower()
        else:
            match = _ORDINAL.match(entry)
            if match is None:
                if not value.strip():
                    note = "CUDA_VISIBLE_DEVICES is empty: CUDA exposes no GPU"
                else:
                    note = f"entry {entry!r} is not a device ordinal or UUID: CUDA ignores it and every entry after it"
                break
            token = int(match.group(1))
        if token in kept:
            return VisibleDevices(value, (), f"entry {entry!r} is repeated: CUDA then exposes no GPU at all")
        kept.append(token)
    return VisibleDevices(value, tuple(kept), note)


def resolve_visible(visible: VisibleDevices, uuids: Sequence[str]) -> tuple[tuple[int | str, ...], str]:
    """Map the parsed entries onto the physical GPUs (pure).

    ``uuids`` are the physical GPUs' UUIDs in NVML order. Returns, per visible device in CUDA
    order, its NVML index (``int``) or its MIG UUID (``str``, not resolved further), and a note.
    An ordinal past the last GPU or a UUID prefix that matches no GPU (or several) hides itself
    and every later entry, as in CUDA.
    """
    if visible.entries is None:
        return tuple(range(len(uuids))), ""
    out: list[int | str] = []
    note = visible.note
    lowered = [u.lower() for u in uuids]
    for entry in visible.entries:
        resolved: int | str | None
        if isinstance(entry, int):
            resolved = entry if entry < len(uuids) else None
            why = f"ordinal {entry} does not exist ({len(uuids)} GPU(s) present)"
        elif entry.startswith("MIG-"):
            resolved, why = entry, ""
        else:
            hits = [i for i, u in enumerate(lowered) if u.startswith(entry.lower())]
            resolved = hits[0] if len(hits) == 1 else None
            why = f"UUID {entry!r} matches {len(hits)} GPU(s)"
        if resolved is None:
            note = f"{why}: CUDA hides it and every entry after it"
            break
        if resolved in out:
            return (), f"{entry!r} names a GPU already listed: CUDA then exposes no GPU at all"
        out.append(resolved)
    return tuple(out), note


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as this process's CUDA would see it."""

    index: int
    """CUDA ordinal in this process (after ``CUDA_VISIBLE_DEVICES``)."""
    name: str
    uuid: str
    nvml_index: int | None
    """NVML's (physical, PCI-ordered) index; ``None`` for a MIG instance."""


@dataclass(frozen=True)
class GpuInventory:
    gpus: tuple[GpuInfo, ...]
    physical_count: int | None
    """GPUs the driver shows before ``CUDA_VISIBLE_DEVICES``; ``None`` when unknown."""
    visible_devices: str | None
    """Raw ``CUDA_VISIBLE_DEVICES`` (``None`` when unset)."""
    source: Literal["nvml", "procfs", "none"]
    reason: str

    @property
    def count(self) -> int:
        return len(self.gpus)

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.gpus]


def _assemble(
    physical: Sequence[tuple[str, str]], env: Mapping[str, str], source: Literal["nvml", "procfs"], how: str
) -> GpuInventory:
    raw = env.get("CUDA_VISIBLE_DEVICES")
    visible = parse_visible_devices(raw)
    resolved, note = resolve_visible(visible, [uuid for _, uuid in physical])
    gpus = []
    for ordinal, ref in enumerate(resolved):
        if isinstance(ref, int):
            gpus.append(GpuInfo(ordinal, physical[ref][0], physical[ref][1], ref))
        else:
            gpus.append(GpuInfo(ordinal, "MIG instance", ref, None))
    reason = f"{how}: {len(physical)} GPU(s) present"
    if raw is not None:
        reason += f", CUDA_VISIBLE_DEVICES={raw!r} leaves {len(gpus)}"
    if note:
        reason += f" ({note})"
    order = env.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    if order != "PCI_BUS_ID" and len({name for name, _ in physical}) > 1:
        reason += (
            "; GPUs differ and CUDA_DEVICE_ORDER is not PCI_BUS_ID, so CUDA's numbering may differ "
            "from NVML's: export CUDA_DEVICE_ORDER=PCI_BUS_ID"
        )
    return GpuInventory(tuple(gpus), len(physical), raw, source, reason)


def inventory_from_nvml(nvml: Any, env: Mapping[str, str]) -> GpuInventory:
    """Enumerate GPUs through an NVML-like object (``pynvml`` or a test fake) and apply ``env``."""
    raw = env.get("CUDA_VISIBLE_DEVICES")
    try:
        nvml.nvmlInit()
    except Exception as exc:
        return GpuInventory((), None, raw, "none", _init_failure(exc))
    try:
        physical = []
        for i in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            physical.append((_text(nvml.nvmlDeviceGetName(handle)), _text(nvml.nvmlDeviceGetUUID(handle))))
    except Exception as exc:
        return GpuInventory((), None, raw, "none", f"NVML enumeration failed: {_nvml_error(exc)}")
    finally:
        _shutdown(nvml)
    return _assemble(physical, env, "nvml", "NVML")


def inventory_from_procfs(root: str | os.PathLike[str], env: Mapping[str, str]) -> GpuInventory:
    """Enumerate GPUs from ``/proc/driver/nvidia/gpus/<pci>/information`` (no NVML needed)."""
    raw = env.get("CUDA_VISIBLE_DEVICES")
    base = Path(root)
    if not base.is_dir():
        return GpuInventory((), None, raw, "none", f"{base} is absent: no NVIDIA driver loaded")
    physical = []
    for entry in sorted(base.iterdir(), key=lambda p: p.name.lower()):
        try:
            info = (entry / "information").read_text(errors="replace")
        except OSError:
            continue
        fields = dict((k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in info.splitlines()) if v)
        physical.append((fields.get("Model", "NVIDIA GPU"), fields.get("GPU UUID", entry.name)))
    return _assemble(physical, env, "procfs", f"{base}")


@_cached
def gpu_inventory() -> GpuInventory:
    """The GPUs this process would see (names, UUIDs, NVML indexes), honouring
    ``CUDA_VISIBLE_DEVICES``. NVML first; without pynvml, the driver's ``/proc`` files."""
    nvml, why = _import_nvml()
    if nvml is not None:
        inv = inventory_from_nvml(nvml, os.environ)
        if inv.source != "none" or not Path(PROC_NVIDIA_GPUS).is_dir():
            return inv
        why = inv.reason
    fallback = inventory_from_procfs(PROC_NVIDIA_GPUS, os.environ)
    return GpuInventory(
        fallback.gpus,
        fallback.physical_count,
        fallback.visible_devices,
        fallback.source,
        f"{why}; {fallback.reason}",
    )


def gpu_count() -> int:
    """Number of GPUs visible to this process (0 when there is no driver)."""
    return gpu_inventory().count


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env.get(name, "") or 0)
    except ValueError:
        return 0


def multi_gpu_reason(n: int, inventory: GpuInventory, env: Mapping[str, str]) -> str | None:
    """Pure core of :func:`missing_for_multi_gpu`."""
    workers = _int_env(env, "PYTEST_XDIST_WORKER_COUNT")
    have = inventory.count
    if workers > 1:
        share = have // workers
        if share >= n:
            return None
        return (
            f"needs {n} GPUs per pytest-xdist worker, but {have} visible GPU(s) split between {workers} "
            f"workers leave {share} to {env.get('PYTEST_XDIST_WORKER', 'this worker')}: run with fewer "
            f"workers (-n {max(have // max(n, 1), 1)} or -n 0) or on a machine with more GPUs "
            f"[{inventory.reason}]"
        )
    if have >= n:
        return None
    hint = (
        f"CUDA_VISIBLE_DEVICES={inventory.visible_devices!r} limits this process: widen or unset it"
        if inventory.visible_devices is not None
        else f"run on a machine with at least {n} GPUs"
    )
    return f"needs {n} GPUs, {have} visible to this process ({inventory.reason}); {hint}"


def missing_for_multi_gpu(n: int = 2) -> str | None:
    """``None`` when at least ``n`` GPUs are visible to this process (or this xdist worker's share)."""
    return multi_gpu_reason(n, gpu_inventory(), os.environ)
