"""What this machine can run, probed without initialising CUDA in the calling process.

Every probe answers with a value *and* a human reason (why, and how to get what is missing), and is
cached for the life of the process (:func:`reset_cache` clears them, for tests). Nothing heavy is
imported at module load: NVML (``pynvml``) is imported inside the probes, FlashInfer is never
imported at all (its files and metadata are read instead), and no probe touches ``torch.cuda``.

The probes and the facts they rely on:

* GPUs: NVML enumerates the physical GPUs; ``CUDA_VISIBLE_DEVICES`` is then applied the way the
  CUDA runtime applies it (ordinals or ``GPU-`` UUID prefixes; an invalid entry hides itself and
  every later one; a repeated entry hides everything; an empty value means no GPU). CUDA numbers
  devices fastest-first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; NVML numbers them by PCI bus id.
  On a box of identical GPUs both orders agree, which is the case this harness targets.
* NVLink: ``nvmlDeviceGetP2PStatus(.., NVML_P2P_CAPS_INDEX_NVLINK)`` for every pair, plus a count
  of active links per pair (``NV18`` style) from ``nvmlDeviceGetNvLinkState`` and the remote end of
  each link. NVML may not answer NVLink queries inside a VM: that gives *unknown*, not *absent*.
* FlashInfer: located with ``importlib.util.find_spec("flashinfer")`` (a top-level lookup does not
  execute the package), then its files decide: ``comm/trtllm_moe_alltoall.py`` (one-sided
  ``MoeAlltoAll``), ``comm/fd_exchange.py`` (POSIX fds travel over ``SCM_RIGHTS``: no ptrace needed,
  releases >= 0.6.16) or its absence (``pidfd_getfd``: ptrace rights needed), ``moe_ep/``.
* Handle type: FlashInfer >= 0.6.16 uses FABRIC handles only when every rank's GPU has
  ``CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED`` *and* NVML reports its fabric state as
  completed with a non-zero cluster UUID. The CUDA attribute cannot be read without initialising
  CUDA, so only the NVML half is probed here; older releases choose by ``platform.machine()``.
* ptrace: ``pidfd_getfd`` on a sibling process needs a ``PTRACE_MODE_ATTACH`` check to pass:
  CAP_SYS_PTRACE (bit 19 of ``CapEff``), Yama's ``ptrace_scope`` and seccomp all play a part, so a
  live probe between two sibling child processes gives the verdict.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from pytest_mnnvl.worlds.sharing import GpuPlan, RanksPerGpu, plan_gpus, setting_text

T = TypeVar("T")

HandleType = Literal["fabric", "posix_fd"]
FdExchange = Literal["scm_rights", "pidfd_getfd"]

CAP_SYS_PTRACE = 19
"""Bit of CAP_SYS_PTRACE in the capability masks of ``/proc/<pid>/status``."""

YAMA_PTRACE_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"
PROC_NVIDIA_GPUS = "/proc/driver/nvidia/gpus"
IMEX_CHANNELS = "/dev/nvidia-caps-imex-channels"

FIX_PTRACE = (
    "run the container with --cap-add=SYS_PTRACE (this also lifts Docker's default seccomp block on "
    "pidfd_getfd), or set kernel.yama.ptrace_scope=0 with every rank under the same uid, or install "
    "flashinfer-python >= 0.6.16, which passes fds over SCM_RIGHTS and needs no ptrace"
)


@dataclass(frozen=True)
class Probe(Generic[T]):
    """The answer of one probe: ``value`` (``None`` where a tri-state answer could not be found)
    and ``reason``, a sentence saying why, and what to do when something is missing."""

    value: T
    reason: str


# --------------------------------------------------------------------------------------------------
# caching

_CACHED: list[Any] = []
_F = TypeVar("_F", bound=Callable[..., Any])


def _cached(fn: _F) -> _F:
    wrapped = functools.cache(fn)
    _CACHED.append(wrapped)
    return wrapped  # type: ignore[return-value]


def reset_cache() -> None:
    """Forget every cached probe result (tests, or after changing the environment)."""
    for fn in _CACHED:
        fn.cache_clear()


# --------------------------------------------------------------------------------------------------
# CUDA_VISIBLE_DEVICES


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


# --------------------------------------------------------------------------------------------------
# GPU inventory


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


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _nvml_error(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__


def _init_failure(exc: BaseException) -> str:
    text = _nvml_error(exc)
    if "Library Not Found" in text:
        return f"NVML: {text}: no NVIDIA driver on this machine (libnvidia-ml.so.1 missing)"
    if "Driver Not Loaded" in text:
        return f"NVML: {text}: the NVIDIA kernel driver is not loaded"
    return f"NVML init failed: {text}"


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


def _shutdown(nvml: Any) -> None:
    with contextlib.suppress(Exception):
        nvml.nvmlShutdown()


def _import_nvml() -> tuple[Any, str]:
    try:
        import pynvml
    except Exception as exc:
        return None, f"pynvml is not importable ({exc}): pip install nvidia-ml-py"
    return pynvml, ""


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


# --------------------------------------------------------------------------------------------------
# NVLink


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


# --------------------------------------------------------------------------------------------------
# FlashInfer


@dataclass(frozen=True)
class FlashInferInfo:
    installed: bool
    version: str | None
    location: str | None
    """Directory of the ``flashinfer`` package."""
    one_sided: bool
    """``flashinfer/comm/trtllm_moe_alltoall.py`` (``MoeAlltoAll``) is present."""
    moe_ep: bool
    """``flashinfer/moe_ep`` (``NVLinkOneSidedAlltoAll``, 0.7.x) is present."""
    fd_exchange: FdExchange | None
    """How POSIX-fd handles travel between ranks; ``None`` when it cannot be told."""
    reason: str

    @property
    def needs_ptrace(self) -> bool:
        return self.fd_exchange == "pidfd_getfd"


def release_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric release of a version string: ``'0.7.2.post1'`` -> ``(0, 7, 2)`` (pure)."""
    parts = []
    for piece in version.split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):
            break
    return tuple(parts)


def flashinfer_info_at(package_dir: str | os.PathLike[str] | None, version: str | None) -> FlashInferInfo:
    """Describe the FlashInfer package in ``package_dir`` from its files alone (pure but for reads)."""
    if package_dir is None:
        return FlashInferInfo(
            False,
            None,
            None,
            False,
            False,
            None,
            "flashinfer-python is not installed: pip install --no-deps flashinfer-python (plus its "
            "pure-Python imports, see the pytest-mnnvl README)",
        )
    root = Path(package_dir)
    comm = root / "comm"
    one_sided = (comm / "trtllm_moe_alltoall.py").is_file()
    moe_ep = (root / "moe_ep").is_dir()
    if version is None:
        try:
            meta = (root / "_build_meta.py").read_text(errors="replace")
            found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", meta)
            version = found.group(1) if found else None
        except OSError:
            version = None
    shown = version or "unknown version"
    mechanism: FdExchange | None
    if (comm / "fd_exchange.py").is_file():
        mechanism = "scm_rights"
        how = "comm/fd_exchange.py present: fds pass over AF_UNIX SCM_RIGHTS, no ptrace needed"
    elif (comm / "mnnvl.py").is_file():
        mechanism = "pidfd_getfd"
        how = "no comm/fd_exchange.py: fds are fetched with pidfd_getfd, which needs ptrace rights over sibling ranks"
    else:
        mechanism = None
        how = "no comm/mnnvl.py: the fd exchange cannot be told"
    if mechanism is not None and version is not None:
        legacy = release_tuple(version) < (0, 6, 16)
        if legacy != (mechanism == "pidfd_getfd"):
            how += f" (unexpected for {version}: releases >= 0.6.16 ship fd_exchange.py)"
    parts = [
        f"flashinfer {shown} at {root}",
        "one-sided MoeAlltoAll present" if one_sided else "no comm/trtllm_moe_alltoall.py (no MoeAlltoAll)",
        how,
    ]
    return FlashInferInfo(True, version, str(root), one_sided, moe_ep, mechanism, "; ".join(parts))


def _flashinfer_dir() -> tuple[str | None, str]:
    try:
        spec = importlib.util.find_spec("flashinfer")
    except (ImportError, ValueError) as exc:
        return None, f"find_spec('flashinfer') failed: {exc}"
    if spec is None:
        return None, ""
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [os.path.dirname(spec.origin)]
    for loc in locations:
        if (Path(loc) / "comm").is_dir():
            return loc, ""
    return (locations[0], "") if locations else (None, "flashinfer has no package directory")


@_cached
def flashinfer_info() -> FlashInferInfo:
    """The installed FlashInfer, found without importing it."""
    location, why = _flashinfer_dir()
    if location is None:
        info = flashinfer_info_at(None, None)
        return info if not why else FlashInferInfo(False, None, None, False, False, None, f"{why}; {info.reason}")
    version = None
    from importlib import metadata

    for dist in ("flashinfer-python", "flashinfer"):
        try:
            version = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            continue
    return flashinfer_info_at(location, version)


# --------------------------------------------------------------------------------------------------
# FABRIC vs POSIX-fd handles


@dataclass(frozen=True)
class FabricState:
    """NVML's view of one GPU's fabric: ``state`` (NVML_GPU_FABRIC_STATE_*, ``None`` on error)."""

    state: int | None
    cluster_uuid_set: bool
    error: str = ""


FABRIC_STATE_COMPLETED = 3


def fabric_states_from_nvml(nvml: Any, nvml_indices: Sequence[int]) -> list[FabricState]:
    """``nvmlDeviceGetGpuFabricInfoV`` (or the older call) for each GPU; failures become errors."""
    import ctypes

    try:
        nvml.nvmlInit()
    except Exception as exc:
        return [FabricState(None, False, _init_failure(exc)) for _ in nvml_indices]
    states = []
    try:
        for index in nvml_indices:
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                if hasattr(nvml, "nvmlDeviceGetGpuFabricInfoV") and hasattr(nvml, "c_nvmlGpuFabricInfoV_t"):
                    info = nvml.c_nvmlGpuFabricInfoV_t()
                    nvml.nvmlDeviceGetGpuFabricInfoV(handle, ctypes.byref(info))
                else:
                    info = nvml.c_nvmlGpuFabricInfo_t()
                    nvml.nvmlDeviceGetGpuFabricInfo(handle, ctypes.byref(info))
                states.append(FabricState(int(info.state), any(info.clusterUuid)))
            except Exception as exc:
                states.append(FabricState(None, False, _nvml_error(exc)))
    finally:
        _shutdown(nvml)
    return states


def choose_handle_type(
    fd_exchange: FdExchange | None,
    machine: str,
    fabric: Sequence[FabricState],
    imex_channels: bool,
) -> Probe[HandleType | None]:
    """The handle type FlashInfer would pick (pure). ``fabric`` has one entry per rank's GPU."""
    if fd_exchange == "pidfd_getfd":
        if machine.lower() in ("aarch64", "arm64"):
            return Probe("fabric", f"FlashInfer < 0.6.16 picks FABRIC on {machine} whatever the GPUs report")
        return Probe("posix_fd", f"FlashInfer < 0.6.16 picks POSIX fds on {machine} (FABRIC only on aarch64)")
    if not fabric:
        return Probe(None, "no GPU visible: FlashInfer would not allocate at all")
    lacking = []
    for i, st in enumerate(fabric):
        if st.state is None:
            lacking.append(f"GPU{i}: NVML fabric info unavailable ({st.error})")
        elif st.state < FABRIC_STATE_COMPLETED:
            lacking.append(f"GPU{i}: fabric state {st.state} (< completed)")
        elif not st.cluster_uuid_set:
            lacking.append(f"GPU{i}: zero cluster UUID")
    if lacking:
        return Probe(
            "posix_fd",
            "POSIX fds: FlashInfer uses FABRIC only when every GPU has a completed fabric with a cluster "
            f"UUID, and here {'; '.join(lacking)}",
        )
    reason = (
        "FABRIC: NVML reports a completed fabric with a cluster UUID on every GPU (assuming "
        "CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED, which cannot be read without initialising CUDA)"
    )
    if not imex_channels:
        reason += (
            f"; {IMEX_CHANNELS} is absent, so cuMemCreate will likely fail without IMEX: set "
            "MnnvlMemory._fabric_supported = False on every rank to force POSIX fds"
        )
    return Probe("fabric", reason)


@_cached
def handle_type() -> Probe[HandleType | None]:
    """Which memory handle type the installed FlashInfer would choose for the visible GPUs.

    FlashInfer ANDs the answer over the ranks' GPUs; this ANDs it over every visible GPU. The CUDA
    half of FlashInfer's test (the FABRIC-supported device attribute) is assumed, not read."""
    import platform

    info = flashinfer_info()
    if not info.installed:
        return Probe(None, "FlashInfer is not installed")
    inventory = gpu_inventory()
    fabric: list[FabricState] = []
    if info.fd_exchange != "pidfd_getfd" and inventory.count:
        nvml, why = _import_nvml()
        indices = [g.nvml_index for g in inventory.gpus]
        if nvml is None:
            fabric = [FabricState(None, False, why) for _ in indices]
        else:
            physical = iter(fabric_states_from_nvml(nvml, [i for i in indices if i is not None]))
            fabric = [FabricState(None, False, "MIG instance") if i is None else next(physical) for i in indices]
    return choose_handle_type(info.fd_exchange, platform.machine(), fabric, os.path.isdir(IMEX_CHANNELS))


# --------------------------------------------------------------------------------------------------
# ptrace


def parse_cap_eff(status_text: str) -> int | None:
    """The ``CapEff`` mask from the text of ``/proc/<pid>/status`` (pure); ``None`` if absent."""
    match = re.search(r"^CapEff:\s*([0-9a-fA-F]+)\s*$", status_text, re.MULTILINE)
    return int(match.group(1), 16) if match else None


def has_cap_sys_ptrace(cap_eff: int) -> bool:
    return bool(cap_eff >> CAP_SYS_PTRACE & 1)


def parse_yama_scope(text: str | None) -> int | None:
    """``ptrace_scope`` from the file's text (pure); ``None`` when the file is absent/unreadable."""
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def static_ptrace_verdict(cap_eff: int | None, yama_text: str | None) -> Probe[bool | None]:
    """Whether a process may ``pidfd_getfd`` a same-uid *sibling*, from the credentials alone (pure).

    Seccomp and other LSMs are not visible here: :func:`live_sibling_probe` settles it.
    """
    scope = parse_yama_scope(yama_text)
    if yama_text is None:
        yama = "Yama absent (no /proc/sys/kernel/yama/ptrace_scope): classic same-uid ptrace rules"
    elif scope is None:
        yama = f"Yama ptrace_scope unreadable ({yama_text.strip()!r})"
    else:
        yama = f"Yama ptrace_scope={scope}"
    if cap_eff is None:
        return Probe(None, f"CapEff not found in /proc/self/status; {yama}")
    cap = has_cap_sys_ptrace(cap_eff)
    caps = f"CapEff {cap_eff:016x}: CAP_SYS_PTRACE {'present' if cap else 'missing'}"
    if scope == 3:
        return Probe(
            False,
            f"{caps}; {yama}: no process may attach, not even root, until reboot; "
            "install flashinfer-python >= 0.6.16 (SCM_RIGHTS, no ptrace)",
        )
    if cap:
        return Probe(True, f"{caps}; {yama}")
    if yama_text is None or scope == 0:
        return Probe(True, f"{caps}; {yama}: same-uid siblings may attach")
    if scope == 1:
        return Probe(
            False,
            f"{caps}; {yama} lets a process attach only to its descendants, and ranks are siblings: " + FIX_PTRACE,
        )
    if scope == 2:
        return Probe(False, f"{caps}; {yama} requires CAP_SYS_PTRACE: {FIX_PTRACE}")
    return Probe(None, f"{caps}; {yama}")


# Child B of the live probe: pidfd_open + pidfd_getfd on child A, reporting what the kernel said.
_SIBLING_CHILD = """
import ctypes, sys
nr_open, nr_getfd, pid, fd = (int(a) for a in sys.argv[1:5])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(*args):
    ctypes.set_errno(0)
    r = libc.syscall(*(ctypes.c_long(a) for a in args))
    return r, ctypes.get_errno()
pidfd, err = call(nr_open, pid, 0)
if pidfd < 0:
    print("pidfd_open", err)
    raise SystemExit(0)
got, err = call(nr_getfd, pidfd, fd, 0)
print("pidfd_getfd", 0 if got >= 0 else err)
"""

_TARGET_CHILD = "import sys; sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.read()"


def _syscall_numbers(machine: str) -> tuple[int, int] | None:
    """pidfd_open / pidfd_getfd: one number on every Linux ABI since 5.1's unified table, but alpha."""
    if machine.startswith("alpha") or machine.startswith("ia64"):
        return None
    return 434, 438


def live_sibling_probe(timeout: float = 2.0) -> Probe[bool | None]:
    """Really try ``pidfd_getfd`` from one child process on an fd of its sibling.

    Child A holds a pipe as its stdin; child B, a sibling (not an ancestor) of A, as the ranks of
    a world are, opens a pidfd on A and fetches A's fd 0. Both children are always reaped within
    ``timeout`` seconds. ``None`` when the probe itself could not run.
    """
    if not sys.platform.startswith("linux"):
        return Probe(None, f"pidfd_getfd is Linux-only (platform {sys.platform})")
    import errno
    import platform
    import select
    import subprocess

    numbers = _syscall_numbers(platform.machine())
    if numbers is None:
        return Probe(None, f"pidfd syscall numbers unknown on {platform.machine()}")
    if not sys.executable:
        return Probe(None, "sys.executable is unknown: cannot start probe children")
    deadline = time.monotonic() + timeout
    target: subprocess.Popen[str] | None = None
    prober: subprocess.Popen[str] | None = None
    try:
        target = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _TARGET_CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert target.stdout is not None
        ready, _, _ = select.select([target.stdout], [], [], max(deadline - time.monotonic(), 0))
        if not ready or target.stdout.readline().strip() != "ready":
            return Probe(None, "live probe: the target child did not start in time")
        prober = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _SIBLING_CHILD, *map(str, numbers), str(target.pid), "0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = prober.communicate(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            return Probe(None, f"live probe: no answer within {timeout:g} s")
        words = out.split()
        if len(words) != 2 or not words[1].isdigit():
            return Probe(None, f"live probe failed to run: {(err or out).strip()[-300:]!r}")
        call, code = words[0], int(words[1])
        if code == 0:
            return Probe(True, "live probe: a child fetched its sibling's fd with pidfd_getfd")
        name = errno.errorcode.get(code, str(code))
        text = f"live probe: {call} on a sibling failed with {name} ({os.strerror(code)})"
        if code == errno.ENOSYS:
            return Probe(False, f"{text}: the kernel predates 5.6 or seccomp hides the call")
        if code == errno.EPERM and call == "pidfd_getfd":
            return Probe(False, f"{text}: ptrace access to sibling ranks is denied: {FIX_PTRACE}")
        return Probe(False, f"{text}: {FIX_PTRACE}")
    except OSError as exc:
        return Probe(None, f"live probe could not start a child: {exc}")
    finally:
        for child in (prober, target):
            if child is None:
                continue
            if child.stdin is not None:
                with contextlib.suppress(OSError):
                    child.stdin.close()
            try:
                child.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            for stream in (child.stdout, child.stderr):
                if stream is not None:
                    stream.close()


def combine_ptrace(static: Probe[bool | None], live: Probe[bool | None] | None) -> Probe[bool | None]:
    """The live verdict when there is one, else the static one; the reason keeps both (pure)."""
    if live is None:
        return Probe(static.value, f"{static.reason}; live probe skipped")
    if live.value is None:
        return Probe(static.value, f"{static.reason}; {live.reason}")
    if live.value is False and static.value:
        return Probe(False, f"{live.reason} (credentials look sufficient: {static.reason}; likely seccomp)")
    return Probe(live.value, f"{live.reason}; {static.reason}")


@_cached
def ptrace_credentials() -> Probe[bool | None]:
    """CapEff + Yama only (cheap, no child process)."""
    status = _read("/proc/self/status")
    return static_ptrace_verdict(parse_cap_eff(status or ""), _read(YAMA_PTRACE_SCOPE))


@_cached
def ptrace_status() -> Probe[bool | None]:
    """Whether this process's children could ``pidfd_getfd`` each other (sibling ranks): CapEff bit
    19, Yama's ptrace_scope and a live probe between two sibling children (about 50 ms)."""
    return combine_ptrace(ptrace_credentials(), live_sibling_probe())


def ptrace_required() -> Probe[bool | None]:
    """True iff the installed FlashInfer fetches peer fds with ``pidfd_getfd`` (< 0.6.16)."""
    info = flashinfer_info()
    if not info.installed:
        return Probe(False, "FlashInfer is not installed: nothing needs ptrace")
    if info.fd_exchange is None:
        return Probe(None, info.reason)
    if info.fd_exchange == "scm_rights":
        return Probe(False, f"FlashInfer {info.version} passes fds over SCM_RIGHTS: no ptrace needed")
    return Probe(True, f"FlashInfer {info.version} fetches peer fds with pidfd_getfd: ptrace rights needed")


# --------------------------------------------------------------------------------------------------
# skip reasons (None = satisfied)


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


def one_sided_reason(
    n: int, info: FlashInferInfo, multi_gpu: str | None, link: Probe[bool | None] | None
) -> str | None:
    """Pure core of :func:`missing_for_one_sided`; ``link`` is the NVLink probe of the first n GPUs."""
    if not info.installed:
        return info.reason
    if not info.one_sided:
        return (
            f"FlashInfer {info.version} at {info.location} has no comm/trtllm_moe_alltoall.py (one-sided "
            "MoeAlltoAll): install a flashinfer-python release that ships it, e.g. 0.7.2.post1"
        )
    if multi_gpu is not None:
        return f"one-sided all-to-all {multi_gpu}"
    if link is not None and link.value is False:
        return f"one-sided all-to-all over GPUs 0..{n - 1}: {link.reason}"
    return None


def missing_for_one_sided(n: int = 2) -> str | None:
    """``None`` when FlashInfer's one-sided module is installed, ``n`` GPUs are visible and the first
    ``n`` have NVLink P2P between every pair. An NVLink answer NVML cannot give does not skip."""
    info = flashinfer_info()
    multi = missing_for_multi_gpu(n) if info.installed and info.one_sided else None
    link = nvlink_p2p(range(n)) if info.installed and info.one_sided and multi is None else None
    return one_sided_reason(n, info, multi, link)


def shared_mode(ranks_per_gpu: RanksPerGpu) -> bool:
    """Whether ``--mnnvl-ranks-per-gpu`` lets ranks share GPUs (``auto`` or N > 1)."""
    return ranks_per_gpu != 1


def _worker_split(env: Mapping[str, str]) -> tuple[int, int]:
    """(this xdist worker's index, the worker count) as the GPUs are split between workers."""
    worker = env.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    return index, max(_int_env(env, "PYTEST_XDIST_WORKER_COUNT"), 1)


def world_gpu_plan(
    world_size: int, ranks_per_gpu: RanksPerGpu, inventory: GpuInventory, env: Mapping[str, str]
) -> GpuPlan:
    """The :class:`~pytest_mnnvl.worlds.sharing.GpuPlan` of a world of ``world_size`` ranks here (pure); raises
    ``ValueError`` with the reason when it does not fit this process's share of the GPUs."""
    index, count = _worker_split(env)
    available = [gpu.uuid or str(gpu.nvml_index) for gpu in inventory.gpus]
    return plan_gpus(world_size, available, ranks_per_gpu, index, count)


def shared_one_sided_reason(
    world_size: int,
    ranks_per_gpu: RanksPerGpu,
    info: FlashInferInfo,
    inventory: GpuInventory,
    env: Mapping[str, str],
    link: Callable[[tuple[int, ...]], Probe[bool | None]],
) -> str | None:
    """Pure core of :func:`missing_for_one_sided` in shared-GPU mode: FlashInfer's one-sided module, a GPU plan
    that fits this process's share, and NVLink only between the GPUs of the plan when it has several (``link``
    is the NVLink probe of CUDA ordinals). The reason names the mode."""
    mode = f"shared-GPU mode ({setting_text(ranks_per_gpu)})"
    if not info.installed:
        return f"{mode}: {info.reason}"
    if not info.one_sided:
        return f"{mode}: {one_sided_reason(world_size, info, None, None)}"
    try:
        plan = world_gpu_plan(world_size, ranks_per_gpu, inventory, env)
    except ValueError as exc:
        return f"one-sided all-to-all: {exc} [{inventory.reason}]"  # the text names the mode
    if plan.nvlink_exercised:
        ids = [gpu.uuid or str(gpu.nvml_index) for gpu in inventory.gpus]
        probe = link(tuple(ids.index(device) for device in plan.devices))
        if probe.value is False:
            return f"one-sided all-to-all, {mode}, {plan.describe()}: {probe.reason}"
    return None


def missing_for_one_sided_shared(world_size: int, ranks_per_gpu: RanksPerGpu) -> str | None:
    """``None`` when a world of ``world_size`` ranks can run FlashInfer's one-sided all-to-all here with
    ``--mnnvl-ranks-per-gpu=ranks_per_gpu`` (one GPU is enough in shared mode); else why not."""
    if not shared_mode(ranks_per_gpu):
        return missing_for_one_sided(world_size)
    return shared_one_sided_reason(
        world_size, ranks_per_gpu, flashinfer_info(), gpu_inventory(), os.environ, nvlink_p2p
    )


def auto_backend(
    ranks_per_gpu: RanksPerGpu, nvlink_world: str | None, shared_world: str | None
) -> Probe[Literal["sim", "flashinfer"]]:
    """What ``--mnnvl-backend=auto`` picks (pure): FlashInfer when a 2-rank world runs it here, over NVLink
    (``nvlink_world``: the skip reason of :func:`missing_for_one_sided`, None when it can) or, when
    ``ranks_per_gpu`` allows sharing, on a shared GPU (``shared_world``: the reason of
    :func:`missing_for_one_sided_shared`); else the sim, with the reason."""
    if nvlink_world is None:
        return Probe("flashinfer", "FlashInfer's one-sided module and >= 2 NVLink GPUs are here")
    if not shared_mode(ranks_per_gpu):
        return Probe("sim", nvlink_world)
    if shared_world is None:
        return Probe("flashinfer", "FlashInfer's one-sided module and a GPU for ranks to share are here")
    return Probe("sim", shared_world)


def resolve_auto_backend(ranks_per_gpu: RanksPerGpu) -> Probe[Literal["sim", "flashinfer"]]:
    """:func:`auto_backend` on this machine's probes."""
    nvlink_world = missing_for_one_sided(2)
    shared_world = missing_for_one_sided_shared(2, ranks_per_gpu) if shared_mode(ranks_per_gpu) else None
    return auto_backend(ranks_per_gpu, nvlink_world, shared_world)


def ptrace_reason(required: Probe[bool | None], status: Callable[[], Probe[bool | None]]) -> str | None:
    """Pure core of :func:`missing_for_ptrace`; ``status`` is only called when ptrace matters."""
    if required.value is False:
        return None
    current = status()
    if current.value is True:
        return None
    head = (
        "needs ptrace rights over sibling ranks (pidfd_getfd)"
        if required.value
        else f"may need ptrace rights ({required.reason})"
    )
    if current.value is None:
        return f"{head}, which could not be verified: {current.reason}"
    return f"{head}: {current.reason}"


def missing_for_ptrace() -> str | None:
    """``None`` when nothing needs ptrace (FlashInfer uses SCM_RIGHTS, or is absent) or when sibling
    processes can ``pidfd_getfd`` each other; else what is missing and how to get it."""
    return ptrace_reason(ptrace_required(), ptrace_status)


# --------------------------------------------------------------------------------------------------
# report header


def header_lines(live_ptrace: bool | None = None) -> list[str]:
    """Lines for pytest's report header, each already prefixed ``mnnvl: ``. ``live_ptrace=None`` runs
    the live sibling probe only when the installed FlashInfer needs ptrace (it costs two short child
    processes, ~50 ms); ``True``/``False`` force it on/off."""
    inv = gpu_inventory()
    lines = []
    if inv.count:
        names = ", ".join(f"{g.index}: {g.name}" for g in inv.gpus)
        env = f", CUDA_VISIBLE_DEVICES={inv.visible_devices}" if inv.visible_devices is not None else ""
        lines.append(f"mnnvl: GPUs: {inv.count} ({names}{env})")
    else:
        lines.append(f"mnnvl: GPUs: 0 ({inv.reason})")
    lines.append(f"mnnvl: links: {nvlink_summary()}")
    info = flashinfer_info()
    if info.installed:
        lines.append(
            f"mnnvl: FlashInfer: {info.version or 'unknown version'} (one-sided MoeAlltoAll: "
            f"{'yes' if info.one_sided else 'no'}, moe_ep: {'yes' if info.moe_ep else 'no'})"
        )
        ht = handle_type()
        lines.append(f"mnnvl: handle type: {ht.value or 'n/a'} ({ht.reason})")
        mech = {"scm_rights": "SCM_RIGHTS (no ptrace needed)", "pidfd_getfd": "pidfd_getfd (needs ptrace)"}
        lines.append(f"mnnvl: fd exchange: {mech.get(info.fd_exchange or '', 'unknown')}")
    else:
        lines.append("mnnvl: FlashInfer: not installed")
    live = ptrace_required().value is not False if live_ptrace is None else live_ptrace
    probe = ptrace_status() if live else combine_ptrace(ptrace_credentials(), None)
    verdict = {True: "ok", False: "denied", None: "unknown"}[probe.value]
    lines.append(f"mnnvl: ptrace: {verdict} ({probe.reason})")
    return lines
