"""Capability probes: pure parsing with injected inputs, a hand-written NVML fake (this machine has no
GPU), and the real live sibling ``pidfd_getfd`` probe, FlashInfer lookup and import cost here."""

from __future__ import annotations

import ctypes
import os
import pkgutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_mnnvl import probes
from pytest_mnnvl.probes.backend import missing_for_one_sided, one_sided_reason
from pytest_mnnvl.probes.flashinfer import FlashInferInfo, flashinfer_info, flashinfer_info_at, release_tuple
from pytest_mnnvl.probes.gpus import (
    GpuInventory,
    gpu_count,
    gpu_inventory,
    inventory_from_nvml,
    inventory_from_procfs,
    missing_for_multi_gpu,
    multi_gpu_reason,
    parse_visible_devices,
    resolve_visible,
)
from pytest_mnnvl.probes.handles import FabricState, choose_handle_type, fabric_states_from_nvml, handle_type
from pytest_mnnvl.probes.header import header_lines
from pytest_mnnvl.probes.links import link_report_from_nvml, nvlink_p2p, nvlink_summary
from pytest_mnnvl.probes.probe import Probe, reset_cache
from pytest_mnnvl.probes.ptrace import (
    combine_ptrace,
    has_cap_sys_ptrace,
    live_sibling_probe,
    missing_for_ptrace,
    parse_cap_eff,
    parse_yama_scope,
    ptrace_reason,
    ptrace_required,
    ptrace_status,
    static_ptrace_verdict,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    reset_cache()
    yield
    reset_cache()


# --------------------------------------------------------------------------------------------------
# a small NVML fake


class FakeNVMLError(Exception):
    pass


class FakeFabricInfo(ctypes.Structure):
    _fields_ = [("clusterUuid", ctypes.c_uint8 * 16), ("state", ctypes.c_uint)]


class FakeNvml:
    NVML_P2P_CAPS_INDEX_NVLINK = 2
    NVML_P2P_STATUS_OK = 0
    NVML_P2P_STATUS_GPU_NOT_SUPPORTED = 2
    NVML_P2P_STATUS_NOT_SUPPORTED = 5
    NVML_NVLINK_MAX_LINKS = 18
    NVML_NVLINK_DEVICE_TYPE_GPU = 0
    NVML_NVLINK_DEVICE_TYPE_SWITCH = 2
    c_nvmlGpuFabricInfoV_t = FakeFabricInfo

    def __init__(
        self,
        gpus: list[tuple[str, str, str]],
        *,
        links: dict[tuple[int, int], tuple[int, str]] | None = None,
        p2p: dict[tuple[int, int], int | Exception] | None = None,
        fabric: list[tuple[int, bytes] | Exception] | None = None,
        init_error: Exception | None = None,
    ) -> None:
        self.gpus = gpus  # (name, uuid, bus id)
        self.links = links or {}  # (gpu, link) -> (remote type, remote bus id)
        self.p2p = p2p or {}
        self.fabric = fabric or []
        self.init_error = init_error
        self.refcount = 0

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.refcount += 1

    def nvmlShutdown(self) -> None:
        self.refcount -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        assert self.refcount > 0, "NVML used outside init/shutdown"
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return self.gpus[h][0].encode()

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self.gpus[h][1]

    def nvmlDeviceGetPciInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(busId=self.gpus[h][2].encode())

    def nvmlDeviceGetNvLinkState(self, h: int, link: int) -> int:
        if not self.links:
            raise FakeNVMLError("Not Supported")
        return 1 if (h, link) in self.links else 0

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, h: int, link: int) -> int:
        return self.links[h, link][0]

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h: int, link: int) -> SimpleNamespace:
        return SimpleNamespace(busId=self.links[h, link][1])

    def nvmlDeviceGetP2PStatus(self, a: int, b: int, index: int) -> int:
        assert index == self.NVML_P2P_CAPS_INDEX_NVLINK
        got = self.p2p.get((min(a, b), max(a, b)), FakeNVMLError("Not Supported"))
        if isinstance(got, Exception):
            raise got
        return got

    def nvmlDeviceGetGpuFabricInfoV(self, h: int, ref: Any) -> int:
        got = self.fabric[h]
        if isinstance(got, Exception):
            raise got
        info = ref._obj
        info.state = got[0]
        info.clusterUuid[:] = list(got[1])
        return 0


H100 = "NVIDIA H100 80GB HBM3"
UUIDS = ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000", "GPU-aaaa3333-0000"]
BUSES = ["00000000:18:00.0", "00000000:2A:00.0", "00000000:3a:00.0"]


def fake_gpus(n: int) -> list[tuple[str, str, str]]:
    return [(H100, UUIDS[i], BUSES[i]) for i in range(n)]


def nv_links(pairs: dict[tuple[int, int], int]) -> dict[tuple[int, int], tuple[int, str]]:
    """Direct GPU-GPU links: ``{(a, b): count}`` -> the per-link table of both ends."""
    table: dict[tuple[int, int], tuple[int, str]] = {}
    used = {i: 0 for i in range(3)}
    for (a, b), count in pairs.items():
        for _ in range(count):
            table[a, used[a]] = (0, BUSES[b].lower())
            table[b, used[b]] = (0, BUSES[a].lower())
            used[a] += 1
            used[b] += 1
    return table


# --------------------------------------------------------------------------------------------------
# CUDA_VISIBLE_DEVICES


@pytest.mark.parametrize(
    ("value", "entries"),
    [
        (None, None),
        ("", ()),
        ("   ", ()),
        ("0,1", (0, 1)),
        (" 1 , 0 ", (1, 0)),
        ("0,-1,1", (0,)),
        ("-1", ()),
        ("1gpu2,2ampere", (1, 2)),
        ("+3", (3,)),
        ("0,,1", (0,)),
        ("none", ()),
        ("0,1,0", ()),
        ("GPU-ABCD,gpu-EF01", ("GPU-abcd", "GPU-ef01")),
        ("MIG-1234", ("MIG-1234",)),
        ("0,GPU-ab,x,2", (0, "GPU-ab")),
    ],
)
def test_parse_visible_devices(value: str | None, entries: tuple[int | str, ...] | None) -> None:
    assert parse_visible_devices(value).entries == entries


def test_parse_visible_devices_notes() -> None:
    assert "empty" in parse_visible_devices("").note
    assert "'-1'" in parse_visible_devices("0,-1,1").note
    assert "repeated" in parse_visible_devices("0,1,0").note
    assert parse_visible_devices("0,1").note == ""


def test_resolve_visible() -> None:
    def resolve(value: str | None) -> tuple[int | str, ...]:
        return resolve_visible(parse_visible_devices(value), UUIDS)[0]

    assert resolve(None) == (0, 1, 2)
    assert resolve("2,0") == (2, 0)
    assert resolve("0,5,1") == (0,)  # an ordinal past the end truncates
    assert resolve("GPU-bbbb,0") == (1, 0)  # a unique UUID prefix
    assert resolve("GPU-aaaa,1") == ()  # ambiguous prefix: matches GPUs 0 and 2
    assert resolve("GPU-AAAA3333-0000") == (2,)
    assert resolve("1,GPU-bbbb") == ()  # the same GPU twice
    assert resolve("MIG-x") == ("MIG-x",)
    _, note = resolve_visible(parse_visible_devices("0,7"), UUIDS)
    assert "ordinal 7 does not exist" in note


# --------------------------------------------------------------------------------------------------
# inventory


def test_inventory_from_nvml_honours_visible_devices() -> None:
    nvml = FakeNvml(fake_gpus(3))
    inv = inventory_from_nvml(nvml, {"CUDA_VISIBLE_DEVICES": "2,0"})
    assert inv.count == 2 and inv.physical_count == 3 and inv.source == "nvml"
    assert [(g.index, g.nvml_index, g.uuid) for g in inv.gpus] == [(0, 2, UUIDS[2]), (1, 0, UUIDS[0])]
    assert inv.names == [H100, H100]
    assert "CUDA_VISIBLE_DEVICES='2,0' leaves 2" in inv.reason
    assert nvml.refcount == 0
    assert inventory_from_nvml(nvml, {}).count == 3
    assert inventory_from_nvml(nvml, {"CUDA_VISIBLE_DEVICES": ""}).count == 0


def test_inventory_nvml_failures() -> None:
    inv = inventory_from_nvml(FakeNvml([], init_error=FakeNVMLError("NVML Shared Library Not Found")), {})
    assert inv.count == 0 and inv.source == "none" and "no NVIDIA driver" in inv.reason
    inv = inventory_from_nvml(FakeNvml([], init_error=FakeNVMLError("Driver Not Loaded")), {})
    assert "kernel driver is not loaded" in inv.reason


def test_inventory_mixed_gpus_warns_about_order() -> None:
    nvml = FakeNvml([("NVIDIA H100", UUIDS[0], BUSES[0]), ("NVIDIA A10", UUIDS[1], BUSES[1])])
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in inventory_from_nvml(nvml, {}).reason
    assert "CUDA_DEVICE_ORDER" not in inventory_from_nvml(nvml, {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}).reason


def test_inventory_from_procfs(tmp_path: Path) -> None:
    for bus, uuid in [("0000:2a:00.0", UUIDS[1]), ("0000:18:00.0", UUIDS[0])]:
        (tmp_path / bus).mkdir()
        (tmp_path / bus / "information").write_text(f"Model: \t {H100}\nIRQ: 1\nGPU UUID: \t {uuid}\n")
    inv = inventory_from_procfs(tmp_path, {"CUDA_VISIBLE_DEVICES": "1"})
    assert inv.source == "procfs" and inv.physical_count == 2
    assert [(g.name, g.uuid, g.nvml_index) for g in inv.gpus] == [(H100, UUIDS[1], 1)]
    assert inventory_from_procfs(tmp_path / "absent", {}).count == 0


def test_gpu_count_on_this_machine_is_zero_and_cached() -> None:
    assert gpu_count() == 0
    assert gpu_inventory() is gpu_inventory()
    assert gpu_inventory().reason


# --------------------------------------------------------------------------------------------------
# NVLink


def inventory(nvml: FakeNvml, env: dict[str, str] | None = None) -> GpuInventory:
    return inventory_from_nvml(nvml, env or {})


def test_nvlink_direct_nv18() -> None:
    nvml = FakeNvml(fake_gpus(2), links=nv_links({(0, 1): 18}), p2p={(0, 1): 0})
    report = link_report_from_nvml(nvml, inventory(nvml), [0, 1])
    assert report.ok is True
    assert report.pairs == ((0, 1, "NV18"),)
    assert "NV18" in report.reason and nvml.refcount == 0


def test_nvlink_pair_labels_and_failure() -> None:
    links = nv_links({(0, 1): 4, (0, 2): 2})
    nvml = FakeNvml(fake_gpus(3), links=links, p2p={(0, 1): 0, (0, 2): 0, (1, 2): 5})
    report = link_report_from_nvml(nvml, inventory(nvml), [0, 1, 2])
    assert report.ok is False
    assert report.pairs == ((0, 1, "NV4"), (0, 2, "NV2"), (1, 2, "no NVLink"))
    assert "GPU1<->GPU2: NVML NVLink P2P status not_supported" in report.reason
    assert "CUDA_VISIBLE_DEVICES" in report.reason
    # the first two GPUs alone are fine
    assert link_report_from_nvml(nvml, inventory(nvml), [0, 1]).ok is True


def test_nvlink_via_switch() -> None:
    links = {(g, link): (2, "0000:ff:00.0") for g in range(2) for link in range(18)}
    nvml = FakeNvml(fake_gpus(2), links=links, p2p={(0, 1): 0})
    report = link_report_from_nvml(nvml, inventory(nvml), [0, 1])
    assert report.ok is True and report.pairs == ((0, 1, "NV18 via NVSwitch"),)


def test_nvlink_unknown_when_nvml_cannot_say() -> None:
    nvml = FakeNvml(fake_gpus(2))  # every NVLink query raises "Not Supported", as inside some VMs
    report = link_report_from_nvml(nvml, inventory(nvml), [0, 1])
    assert report.ok is None and "Not Supported" in report.reason
    # links seen but the P2P status query fails: the link counts decide
    nvml = FakeNvml(fake_gpus(2), links=nv_links({(0, 1): 18}))
    report = link_report_from_nvml(nvml, inventory(nvml), [0, 1])
    assert report.ok is True and report.pairs[0][2].startswith("NV18")


def test_nvlink_ordinals_follow_visible_devices() -> None:
    nvml = FakeNvml(fake_gpus(3), links=nv_links({(1, 2): 6}), p2p={(1, 2): 0, (0, 1): 2, (0, 2): 2})
    inv = inventory(nvml, {"CUDA_VISIBLE_DEVICES": "2,1"})
    report = link_report_from_nvml(nvml, inv, [0, 1])
    assert report.ok is True and report.pairs == ((0, 1, "NV6"),)
    assert link_report_from_nvml(nvml, inv, [0, 2]).ok is False  # ordinal 2 is not visible


def test_nvlink_on_this_machine() -> None:
    assert nvlink_summary() == "none"
    assert nvlink_p2p().value is True  # vacuous: no pair
    probe = nvlink_p2p([0, 1])
    assert probe.value is False and "not visible" in probe.reason


# --------------------------------------------------------------------------------------------------
# FlashInfer


def test_flashinfer_info_on_this_machine() -> None:
    already = "flashinfer" in sys.modules
    info = flashinfer_info()
    assert info.installed and info.version == "0.7.2.post1"
    assert info.one_sided and info.moe_ep
    assert info.fd_exchange == "scm_rights" and not info.needs_ptrace
    assert ("flashinfer" in sys.modules) == already  # looked up, never imported
    required = ptrace_required()
    assert required.value is False and "SCM_RIGHTS" in required.reason


def make_package(root: Path, files: list[str], build_version: str | None = None) -> Path:
    pkg = root / "flashinfer"
    for rel in files:
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text("")
    pkg.mkdir(exist_ok=True)
    if build_version:
        (pkg / "_build_meta.py").write_text(f'__version__ = "{build_version}"\n')
    return pkg


def test_flashinfer_info_legacy_release(tmp_path: Path) -> None:
    pkg = make_package(tmp_path, ["comm/mnnvl.py", "comm/trtllm_moe_alltoall.py"], "0.6.11.post2")
    info = flashinfer_info_at(pkg, None)
    assert info.version == "0.6.11.post2" and info.one_sided and not info.moe_ep
    assert info.fd_exchange == "pidfd_getfd" and info.needs_ptrace
    assert "pidfd_getfd" in info.reason and "unexpected" not in info.reason


def test_flashinfer_info_variants(tmp_path: Path) -> None:
    absent = flashinfer_info_at(None, None)
    assert not absent.installed and "pip install" in absent.reason
    pkg = make_package(tmp_path, ["comm/mnnvl.py", "comm/fd_exchange.py", "moe_ep/__init__.py"])
    info = flashinfer_info_at(pkg, "0.7.2.post1")
    assert info.fd_exchange == "scm_rights" and info.moe_ep and not info.one_sided
    odd = flashinfer_info_at(pkg, "0.6.3")
    assert "unexpected for 0.6.3" in odd.reason
    bare = make_package(tmp_path / "b", ["__init__.py"])
    assert flashinfer_info_at(bare, "1.0").fd_exchange is None


def test_release_tuple() -> None:
    assert release_tuple("0.7.2.post1") == (0, 7, 2)
    assert release_tuple("0.6.16rc1") == (0, 6, 16)
    assert release_tuple("0.6.15.post1") < (0, 6, 16) <= release_tuple("0.6.16")
    assert release_tuple("dev") == ()


# --------------------------------------------------------------------------------------------------
# handle type


def test_choose_handle_type_legacy_by_machine() -> None:
    assert choose_handle_type("pidfd_getfd", "x86_64", [], False).value == "posix_fd"
    assert choose_handle_type("pidfd_getfd", "aarch64", [], False).value == "fabric"


def test_choose_handle_type_fabric_rules() -> None:
    done = FabricState(3, True)
    assert choose_handle_type("scm_rights", "x86_64", [], True).value is None
    fabric = choose_handle_type("scm_rights", "x86_64", [done, done], True)
    assert fabric.value == "fabric" and "cannot be read without initialising CUDA" in fabric.reason
    assert "IMEX" in choose_handle_type("scm_rights", "x86_64", [done], False).reason
    for other in (FabricState(2, True), FabricState(3, False), FabricState(None, False, "Not Supported")):
        probe = choose_handle_type("scm_rights", "aarch64", [done, other], True)
        assert probe.value == "posix_fd" and "GPU1" in probe.reason


def test_fabric_states_from_nvml() -> None:
    nvml = FakeNvml(fake_gpus(3), fabric=[(3, b"\x01" + bytes(15)), (3, bytes(16)), FakeNVMLError("Not Supported")])
    states = fabric_states_from_nvml(nvml, [0, 1, 2])
    assert states == [FabricState(3, True), FabricState(3, False), FabricState(None, False, "Not Supported")]
    assert nvml.refcount == 0


def test_handle_type_on_this_machine() -> None:
    probe = handle_type()
    assert probe.value is None and "no GPU" in probe.reason


# --------------------------------------------------------------------------------------------------
# ptrace

STATUS = "Name:\tpython\nCapInh:\t0000000000000000\nCapEff:\t{}\nCapBnd:\t000001ffffffffff\n"


def test_parse_cap_eff() -> None:
    assert parse_cap_eff(STATUS.format("000001fffeffffff")) == 0x1FFFEFFFFFF
    assert has_cap_sys_ptrace(0x1FFFEFFFFFF)
    assert not has_cap_sys_ptrace(0x1FFFEFFFFFF & ~(1 << 19))
    assert has_cap_sys_ptrace(1 << 19) and not has_cap_sys_ptrace((1 << 18) | (1 << 20))
    assert parse_cap_eff("Name:\tx\n") is None


@pytest.mark.parametrize(
    ("cap_eff", "yama", "value", "words"),
    [
        (1 << 19, None, True, ["CAP_SYS_PTRACE present", "Yama absent"]),
        (0, None, True, ["same-uid siblings may attach"]),
        (0, "0\n", True, ["ptrace_scope=0"]),
        (1 << 19, "1\n", True, ["ptrace_scope=1"]),
        (0, "1\n", False, ["only to its descendants", "--cap-add=SYS_PTRACE", "ptrace_scope=0"]),
        (1 << 19, "2\n", True, ["ptrace_scope=2"]),
        (0, "2\n", False, ["requires CAP_SYS_PTRACE", "--cap-add=SYS_PTRACE"]),
        (1 << 19, "3\n", False, ["not even root", "0.6.16"]),
        (0, "garbage", None, ["unreadable"]),
        (None, "1\n", None, ["CapEff not found"]),
    ],
)
def test_static_ptrace_verdict(cap_eff: int | None, yama: str | None, value: bool | None, words: list[str]) -> None:
    probe = static_ptrace_verdict(cap_eff, yama)
    assert probe.value is value
    for word in words:
        assert word in probe.reason


def test_parse_yama_scope() -> None:
    assert [parse_yama_scope(t) for t in ("0\n", "1", " 2 ", "3\n", None, "x")] == [
        0,
        1,
        2,
        3,
        None,
        None,
    ]


def children_of(pid: int) -> list[int]:
    """Every process (zombies included) whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pidfd_getfd is Linux-only")
def test_live_sibling_probe_runs_for_real_and_reaps_children() -> None:
    before = children_of(os.getpid())
    probe = live_sibling_probe(timeout=2.0)
    assert probe.value is True, probe.reason  # root with every capability here (CapEff 1fffeffffff)
    assert "sibling" in probe.reason
    assert children_of(os.getpid()) == before


def test_ptrace_status_on_this_machine() -> None:
    status = ptrace_status()
    assert status.value is True
    assert "live probe" in status.reason and "CapEff" in status.reason
    assert ptrace_status() is status  # cached


def test_combine_ptrace() -> None:
    ok: Probe[bool | None] = Probe(True, "caps")
    denied: Probe[bool | None] = Probe(False, "eperm")
    unknown: Probe[bool | None] = Probe(None, "timeout")
    assert combine_ptrace(ok, denied).value is False
    assert "seccomp" in combine_ptrace(ok, denied).reason
    assert combine_ptrace(ok, unknown) == Probe(True, "caps; timeout")
    assert combine_ptrace(Probe(False, "scope 1"), Probe(True, "worked")).value is True
    assert combine_ptrace(ok, None).value is True


def test_ptrace_reason() -> None:
    calls: list[int] = []

    def status(value: bool | None) -> Any:
        def probe() -> Probe[bool | None]:
            calls.append(1)
            return Probe(value, "CAP_SYS_PTRACE missing: run with --cap-add=SYS_PTRACE")

        return probe

    assert ptrace_reason(Probe(False, "SCM_RIGHTS"), status(False)) is None
    assert calls == []  # SCM_RIGHTS: the live probe is not even needed
    assert ptrace_reason(Probe(True, "pidfd"), status(True)) is None
    denied = ptrace_reason(Probe(True, "pidfd"), status(False))
    assert denied is not None and "pidfd_getfd" in denied and "--cap-add=SYS_PTRACE" in denied
    unknown = ptrace_reason(Probe(None, "?"), status(None))
    assert unknown is not None and "could not be verified" in unknown


def test_missing_for_ptrace_on_this_machine() -> None:
    assert missing_for_ptrace() is None


# --------------------------------------------------------------------------------------------------
# skip reasons


def test_missing_for_multi_gpu_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    reason = missing_for_multi_gpu(2)
    assert reason is not None
    assert "needs 2 GPUs, 0 visible" in reason and "at least 2 GPUs" in reason
    assert "no NVIDIA driver" in reason
    assert missing_for_multi_gpu(0) is None


def test_missing_for_multi_gpu_mentions_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    reason = missing_for_multi_gpu(2)
    assert reason is not None and "CUDA_VISIBLE_DEVICES=''" in reason and "unset" in reason


def test_multi_gpu_reason_xdist_share() -> None:
    nvml = FakeNvml(fake_gpus(3))
    inv = inventory(nvml)
    assert multi_gpu_reason(2, inv, {}) is None
    env = {"PYTEST_XDIST_WORKER_COUNT": "2", "PYTEST_XDIST_WORKER": "gw1"}
    reason = multi_gpu_reason(2, inv, env)
    assert reason is not None and "pytest-xdist" in reason and "leave 1 to gw1" in reason
    assert "-n 1" in reason
    assert multi_gpu_reason(1, inv, env) is None


def test_flashinfer_info_knows_each_releases_one_sided_api(tmp_path: Path) -> None:
    """0.7.4 has no MoeAlltoAll: its one-sided all-to-all is moe_ep's NVLinkOneSidedAlltoAll, which loads its own
    op module; a probe that knew only 0.7.2's file refused every real world on 0.7.4 (seen on one H200)."""
    new = make_package(
        tmp_path / "new",
        ["comm/mnnvl.py", "comm/fd_exchange.py", "moe_ep/backends/split/comm/nvlink_one_sided/kernels.py"],
    )
    info = flashinfer_info_at(new, "0.7.4")
    assert info.one_sided and info.one_sided_api == "NVLinkOneSidedAlltoAll"
    assert "one-sided NVLinkOneSidedAlltoAll present" in info.reason
    legacy = flashinfer_info_at(make_package(tmp_path / "old", ["comm/trtllm_moe_alltoall.py"]), "0.7.2.post1")
    assert legacy.one_sided_api == "MoeAlltoAll"
    neither = flashinfer_info_at(make_package(tmp_path / "none", ["comm/mnnvl.py"]), "0.9.0")
    assert not neither.one_sided and neither.one_sided_api is None
    assert "trtllm_moe_alltoall.py" in neither.reason and "nvlink_one_sided/kernels.py" in neither.reason
    reason = one_sided_reason(2, neither, None, None) or ""
    assert "0.9.0" in reason and "nvlink_one_sided/kernels.py" in reason and "0.7.4" in reason


def test_the_flashinfer_backend_loads_each_supported_releases_op_module() -> None:
    """Every supported release has an op-module loader, and that function exists in that release's files (0.7.4's
    from the `.fi074` copy CI installs beside the venv's 0.7.2.post1)."""
    from pytest_mnnvl.backends.flashinfer import OP_MODULES
    from pytest_mnnvl.model import releases

    assert tuple(OP_MODULES) == releases.SUPPORTED
    installed = flashinfer_info()
    roots = {"0.7.4": REPO / ".fi074"}
    if installed.location and installed.version:
        roots.setdefault(installed.version, Path(installed.location).parent)
    for release, (module, loader, _, _) in OP_MODULES.items():
        root = roots.get(release)
        if root is None:
            pytest.skip(f"FlashInfer {release} is neither installed nor in .fi074: run `bash .ci/install`")
        source = root.joinpath(*module.split(".")).with_suffix(".py")
        if not source.is_file():
            pytest.skip(f"FlashInfer {release} is not at {root}: run `bash .ci/install`")
        assert f"def {loader}(" in source.read_text(), (release, source)
        assert flashinfer_info_at(root / "flashinfer", release).one_sided


def test_one_sided_reason() -> None:
    info = FlashInferInfo(True, "0.7.2.post1", "/x", True, True, "scm_rights", "ok")
    assert one_sided_reason(2, info, None, Probe(True, "NV18")) is None
    assert one_sided_reason(2, info, None, Probe(None, "VM")) is None  # unknown does not skip
    no_link = one_sided_reason(2, info, None, Probe(False, "no NVLink P2P path"))
    assert no_link is not None and "GPUs 0..1" in no_link and "no NVLink" in no_link
    few = one_sided_reason(2, info, "needs 2 GPUs, 1 visible", None)
    assert few == "one-sided all-to-all needs 2 GPUs, 1 visible"
    old = FlashInferInfo(True, "0.5.0", "/x", False, False, "pidfd_getfd", "")
    assert "trtllm_moe_alltoall.py" in (one_sided_reason(2, old, None, None) or "")  # names both APIs' files
    assert "not installed" in (one_sided_reason(2, flashinfer_info_at(None, None), None, None) or "")


def test_missing_for_one_sided_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    reason = missing_for_one_sided(2)
    assert reason is not None and reason.startswith("one-sided all-to-all needs 2 GPUs, 0 visible")


# --------------------------------------------------------------------------------------------------
# header and import cost


def test_header_lines_on_this_machine() -> None:
    lines = header_lines()
    text = "\n".join(lines)
    assert lines[0].startswith("mnnvl: GPUs: 0 (")
    assert "mnnvl: links: none" in lines
    assert "mnnvl: FlashInfer: 0.7.2.post1 (one-sided: MoeAlltoAll, moe_ep: yes)" in lines
    assert "mnnvl: handle type: n/a" in text
    assert "mnnvl: fd exchange: SCM_RIGHTS (no ptrace needed)" in lines
    assert lines[-1].startswith("mnnvl: ptrace: ok (") and "live probe skipped" in lines[-1]
    live = header_lines(live_ptrace=True)
    assert live[-1].startswith("mnnvl: ptrace: ok (live probe: a child fetched")


def test_header_with_fake_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml(fake_gpus(2), links=nv_links({(0, 1): 18}), p2p={(0, 1): 0}, fabric=[OSError("NA")] * 2)
    for module in ("gpus", "links", "handles"):  # each probe that opens NVML holds its own name for the import
        monkeypatch.setattr(f"pytest_mnnvl.probes.{module}._import_nvml", lambda: (nvml, ""))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    lines = header_lines(live_ptrace=False)
    assert lines[0] == f"mnnvl: GPUs: 2 (0: {H100}, 1: {H100}, CUDA_VISIBLE_DEVICES=0,1)"
    assert lines[1] == "mnnvl: links: GPU0<->GPU1 NV18"
    assert lines[3].startswith("mnnvl: handle type: posix_fd (")
    assert missing_for_multi_gpu(2) is None
    assert missing_for_one_sided(2) is None
    assert nvml.refcount == 0


PROBE_MODULES = ("backend", "flashinfer", "gpus", "handles", "header", "links", "nvml", "probe", "ptrace")


def test_probe_modules_are_all_listed() -> None:
    found = {m.name for m in pkgutil.iter_modules([str(Path(probes.__file__).parent)])}
    assert found == set(PROBE_MODULES)


def test_import_is_light() -> None:
    code = "; ".join(f"import pytest_mnnvl.probes.{name}" for name in PROBE_MODULES)
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert {f"pytest_mnnvl.probes.{name}" for name in PROBE_MODULES} <= imported
    heavy = {m for m in imported if m.split(".")[0] in {"torch", "flashinfer", "pynvml", "hypothesis"}}
    assert heavy == set()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pidfd_getfd is Linux-only")
def test_live_probe_reports_errno_and_reaps(monkeypatch: pytest.MonkeyPatch) -> None:
    # an unassigned syscall number: the kernel answers ENOSYS, as it does before Linux 5.6
    monkeypatch.setattr("pytest_mnnvl.probes.ptrace._syscall_numbers", lambda machine: (100_000, 100_001))
    before = children_of(os.getpid())
    probe = live_sibling_probe(timeout=2.0)
    assert probe.value is False and "ENOSYS" in probe.reason and "5.6" in probe.reason
    assert children_of(os.getpid()) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pidfd_getfd is Linux-only")
def test_live_probe_times_out_and_kills(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pytest_mnnvl.probes.ptrace._TARGET_CHILD", "import time; time.sleep(30)")
    before = children_of(os.getpid())
    probe = live_sibling_probe(timeout=0.2)
    assert probe.value is None and "did not start in time" in probe.reason
    assert children_of(os.getpid()) == before
