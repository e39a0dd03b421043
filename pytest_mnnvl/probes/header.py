"""The ``mnnvl:`` lines of pytest's report header: what every probe found, so a run's log says what the
machine could do."""

from __future__ import annotations

from pytest_mnnvl.model import releases
from pytest_mnnvl.probes.flashinfer import flashinfer_info
from pytest_mnnvl.probes.gpus import gpu_inventory
from pytest_mnnvl.probes.handles import handle_type
from pytest_mnnvl.probes.links import nvlink_summary
from pytest_mnnvl.probes.ptrace import combine_ptrace, ptrace_credentials, ptrace_required, ptrace_status


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
            f"mnnvl: FlashInfer: {info.version or 'unknown version'} (one-sided: "
            f"{info.one_sided_api or 'none'}, moe_ep: {'yes' if info.moe_ep else 'no'}"
            f"{releases.header_note(info.version)})"
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
