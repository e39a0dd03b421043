"""Whether the GPUs of a world are joined by NVLink, which FlashInfer's one-sided all-to-all maps peer
memory over.

``nvmlDeviceGetP2PStatus(.., NVML_P2P_CAPS_INDEX_NVLINK)`` for every pair, plus a count of active links
per pair (``NV18`` style) from ``nvmlDeviceGetNvLinkState`` and the remote end of each link. NVML may not
answer NVLink queries inside a VM: that gives *unknown*, not *absent*.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pytest_mnnvl.probes.gpus import GpuInventory, gpu_inventory
from pytest_mnnvl.probes.nvml import _import_nvml, _init_failure, _nvml_error, _shutdown, _text
from pytest_mnnvl.probes.probe import Probe, _cached


def _pci_key(bus_id: Any) -> tuple[int, ...] | None:
    """``'00000000:18:00.0'`` (any domain width, any case, bytes or str) -> comparable ints."""
    match = re.search(r"([0-9a-fA-F]+):([0-9a-fA-F]+):([0-9a-fA-F]+)\.([0-7])", _text(bus_id))
    return tuple(int(g, 16) for g in match.groups()) if match else None


@dataclass(frozen=True)
class _LinkCounts:
    to_gpu: dict[tuple[int, ...], int]
    to_switch: int
    error: str


def _link_counts(nvml: Any, handle: Any) -> _LinkCounts:
    """Active NVLinks of one GPU, grouped by what sits at the other end."""
    to_gpu: dict[tuple[int, ...], int] = {}
    to_switch = 0
    gpu_type = getattr(nvml, "NVML_NVLINK_DEVICE_TYPE_GPU", 0)
    switch_type = getattr(nvml, "NVML_NVLINK_DEVICE_TYPE_SWITCH", 2)
    errors = 0
    last = ""
    for link in range(int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18))):
        try:
            if not nvml.nvmlDeviceGetNvLinkState(handle, link):
                continue
        except Exception as exc:  # a link index the GPU does not have, or no NVLink support
            errors += 1
            last = _nvml_error(exc)
            continue
        try:
            kind = nvml.nvmlDeviceGetNvLinkRemoteDeviceType(handle, link)
        except Exception:
            kind = gpu_type
        if kind == switch_type:
            to_switch += 1
            continue
        try:
            key = _pci_key(nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId)
        except Exception:
            key = None
        if key is not None:
            to_gpu[key] = to_gpu.get(key, 0) + 1
    return _LinkCounts(to_gpu, to_switch, last if errors and not to_gpu and not to_switch else "")


def _p2p_status_text(nvml: Any, status: int) -> str:
    for name in dir(nvml):
        if name.startswith("NVML_P2P_STATUS_") and getattr(nvml, name) == status:
            return name[len("NVML_P2P_STATUS_") :].lower()
    return f"status {status}"


@dataclass(frozen=True)
class LinkReport:
    """NVLink P2P between GPUs (CUDA ordinals of this process)."""

    ok: bool | None
    """True: every pair has NVLink P2P; False: some pair has none; None: NVML could not say."""
    reason: str
    pairs: tuple[tuple[int, int, str], ...]
    """``(a, b, label)`` per pair, label like ``NV18``, ``NV18 via NVSwitch``, ``no NVLink``, ``?``."""

    def summary(self) -> str:
        if not self.pairs:
            return "none"
        labels = {label for _, _, label in self.pairs}
        if len(labels) == 1 and len(self.pairs) > 1:
            count = len({i for a, b, _ in self.pairs for i in (a, b)})
            return f"{labels.pop()} between every pair of {count} GPUs ({len(self.pairs)} pairs)"
        return ", ".join(f"GPU{a}<->GPU{b} {label}" for a, b, label in self.pairs)


def link_report_from_nvml(nvml: Any, inventory: GpuInventory, indices: Sequence[int]) -> LinkReport:
    """Check NVLink P2P between every pair of ``indices`` (CUDA ordinals) through NVML (or a fake)."""
    wanted = list(dict.fromkeys(indices))
    missing = [i for i in wanted if not 0 <= i < inventory.count]
    if missing:
        return LinkReport(
            False, f"GPU ordinal(s) {missing} not visible ({inventory.count} visible: {inventory.reason})", ()
        )
    if len(wanted) < 2:
        return LinkReport(True, "fewer than 2 GPUs: no pair needs a link", ())
    gpus = [inventory.gpus[i] for i in wanted]
    migs = [g.index for g in gpus if g.nvml_index is None]
    if migs:
        return LinkReport(False, f"GPU(s) {migs} are MIG instances, which have no NVLink P2P", ())
    try:
        nvml.nvmlInit()
    except Exception as exc:
        return LinkReport(None, _init_failure(exc), ())
    try:
        handles = {g.index: nvml.nvmlDeviceGetHandleByIndex(g.nvml_index) for g in gpus}
        bus: dict[int, tuple[int, ...] | None] = {}
        counts: dict[int, _LinkCounts] = {}
        for g in gpus:
            try:
                bus[g.index] = _pci_key(nvml.nvmlDeviceGetPciInfo(handles[g.index]).busId)
            except Exception:
                bus[g.index] = None
            counts[g.index] = _link_counts(nvml, handles[g.index])
        nvlink_index = getattr(nvml, "NVML_P2P_CAPS_INDEX_NVLINK", 2)
        status_ok = getattr(nvml, "NVML_P2P_STATUS_OK", 0)
        pairs: list[tuple[int, int, str]] = []
        bad: list[str] = []
        unknown: list[str] = []
        for x, a in enumerate(wanted):
            for b in wanted[x + 1 :]:
                key_b = bus[b]
                direct = counts[a].to_gpu.get(key_b, 0) if key_b is not None else 0
                via_switch = min(counts[a].to_switch, counts[b].to_switch)
                label = f"NV{direct}" if direct else f"NV{via_switch} via NVSwitch" if via_switch else "no NVLink"
                try:
                    status: int | None = int(nvml.nvmlDeviceGetP2PStatus(handles[a], handles[b], nvlink_index))
                    status_err = ""
                except Exception as exc:
                    status, status_err = None, _nvml_error(exc)
                pair = f"GPU{a}<->GPU{b}"
                if status == status_ok:
                    pass
                elif status is not None:
                    bad.append(f"{pair}: NVML NVLink P2P status {_p2p_status_text(nvml, status)}")
                elif direct or via_switch:
                    label += " (P2P status unavailable)"
                else:
                    link_err = counts[a].error or counts[b].error
                    unknown.append(f"{pair}: {status_err}" + (f"; link state: {link_err}" if link_err else ""))
                    label = "?"
                pairs.append((a, b, label))
    except Exception as exc:
        return LinkReport(None, f"NVML NVLink query failed: {_nvml_error(exc)}", ())
    finally:
        _shutdown(nvml)
    report = LinkReport(True, "", tuple(pairs))
    summary = report.summary()
    if bad:
        return LinkReport(
            False,
            f"no NVLink P2P path: {'; '.join(bad)} (links: {summary}). MoeAlltoAll maps peer memory over "
            "NVLink: use GPUs joined by NVLink (check `nvidia-smi topo -m`) and pick them with "
            "CUDA_VISIBLE_DEVICES",
            tuple(pairs),
        )
    if unknown:
        return LinkReport(
            None,
            f"NVML could not report NVLink P2P for {'; '.join(unknown)} (common inside VMs); treated as unknown",
            tuple(pairs),
        )
    return LinkReport(True, f"NVLink P2P between every pair: {summary}", tuple(pairs))


@_cached
def _link_report(indices: tuple[int, ...] | None) -> LinkReport:
    inventory = gpu_inventory()
    wanted = tuple(range(inventory.count)) if indices is None else indices
    if inventory.count < 2 and indices is None:
        return LinkReport(True, f"fewer than 2 GPUs visible: no pair needs a link ({inventory.reason})", ())
    nvml, why = _import_nvml()
    if nvml is None:
        return LinkReport(None, why, ())
    return link_report_from_nvml(nvml, inventory, wanted)


def nvlink_p2p(indices: Iterable[int] | None = None) -> Probe[bool | None]:
    """Whether every pair of the given GPUs (CUDA ordinals of this process; default: all visible)
    has an NVLink P2P path. ``None`` when NVML cannot tell. The reason carries the link summary."""
    report = _link_report(None if indices is None else tuple(indices))
    return Probe(report.ok, report.reason)


def nvlink_summary() -> str:
    """Links between all visible GPUs, e.g. ``NV18 between every pair of 2 GPUs (1 pairs)``,
    ``GPU0<->GPU1 NV4, …``, or ``none``."""
    report = _link_report(None)
    if report.ok is None and not report.pairs:
        return f"unknown ({report.reason})"
    return report.summary()
