"""Shared-GPU worlds: several ranks of one world on one GPU (``--mnnvl-ranks-per-gpu=N|auto``).

Most CI runners and workstations have one GPU. FlashInfer's one-sided all-to-all still runs there: each rank
is its own process with its own CUDA context, and the peers map each other's workspace rows through POSIX-fd
handles, all on the same device. Only three things differ from a world of one GPU per rank, and this module
decides each of them (pure functions, no torch, no NVML):

* which GPU a rank uses: rank ``r`` takes GPU ``r // ranks_per_gpu`` of the GPUs its world was given
  (:func:`plan_gpus`, :func:`gpu_of_rank`). The visible GPUs are first split between pytest-xdist workers as
  for any GPU world, so two worlds never run on one GPU at the same time;
* which backend the process groups use: NCCL refuses two ranks on one device, so a shared world builds every
  group on gloo (:func:`group_backends`);
* FlashInfer's platform verdict: ``MnnvlMemory.supports_mnnvl`` (an NVML scan for NVLinks that are all up)
  says no on a GPU without NVLink, and ``flashinfer.moe_ep`` refuses the EP group on that verdict. The
  flashinfer backend answers that one query, and only in a shared world (:mod:`pytest_mnnvl.backends.flashinfer`).

What such a world does not test is NVLink itself: the bytes move within one GPU's memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: ``--mnnvl-ranks-per-gpu=auto``: as many ranks per GPU as a world needs when there are fewer GPUs than ranks.
AUTO: Literal["auto"] = "auto"
RanksPerGpu = int | Literal["auto"]
#: What a world whose ranks all sit on one GPU leaves untested, said wherever such a world is described.
NVLINK_NOT_EXERCISED = "NVLink itself is not exercised (the peers share one GPU's memory)"


@dataclass(frozen=True)
class GpuPlan:
    """The GPUs one world runs on: ``devices`` (distinct GPU ids, as ``CUDA_VISIBLE_DEVICES`` takes them) and
    how many consecutive ranks share each."""

    world_size: int
    devices: tuple[str, ...]
    ranks_per_gpu: int

    @property
    def shared(self) -> bool:
        """Some GPU runs more than one rank of this world."""
        return self.world_size > len(self.devices)

    def gpu_of(self, rank: int) -> int:
        return gpu_of_rank(rank, self.ranks_per_gpu)

    @property
    def nvlink_exercised(self) -> bool:
        """Some peers sit on different GPUs (only their traffic crosses NVLink)."""
        return len(self.devices) > 1

    def describe(self) -> str:
        """``4 ranks on 1 GPU`` or ``2 ranks, one GPU each``."""
        gpus = len(self.devices)
        if not self.shared:
            return f"{self.world_size} ranks, one GPU each"
        return f"{self.world_size} ranks on {gpus} GPU{'' if gpus == 1 else 's'}"


@dataclass(frozen=True)
class GroupBackends:
    """``default``: the string ``init_process_group`` takes; ``device``: the EP/PP groups' backend."""

    default: str
    device: str


def gpu_of_rank(rank: int, ranks_per_gpu: int) -> int:
    """The index, among its world's GPUs, of the GPU rank ``rank`` uses: consecutive ranks share one, so a PP
    stage's EP group stays on as few GPUs as it can."""
    if ranks_per_gpu < 1:
        raise ValueError(f"ranks_per_gpu must be >= 1, got {ranks_per_gpu}")
    return rank // ranks_per_gpu


def group_backends(gpu: bool, shared: bool) -> GroupBackends:
    """gloo on CPU ranks; NCCL (with a gloo twin) when every rank has its own GPU; gloo alone when ranks share
    a GPU, since NCCL refuses two ranks on one device."""
    if not gpu or shared:
        return GroupBackends("gloo", "gloo")
    return GroupBackends("cpu:gloo,cuda:nccl", "nccl")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def setting_text(setting: RanksPerGpu) -> str:
    return f"--mnnvl-ranks-per-gpu={setting}"


def plan_gpus(
    world_size: int,
    available: list[str],
    setting: RanksPerGpu = 1,
    worker_index: int = 0,
    worker_count: int = 1,
) -> GpuPlan:
    """The GPUs a world of ``world_size`` ranks runs on, from this process's share of ``available``.

    Worker ``i`` of ``n`` pytest-xdist workers owns the ``i``-th contiguous share of the visible GPUs, whatever
    the setting: a world that does not fit its share is an error (the caller skips), never two workers on one
    GPU. ``setting`` 1 gives each rank its own GPU; ``N`` puts up to N consecutive ranks on each GPU; ``auto``
    one rank per GPU when the share has enough GPUs, else as few ranks per GPU as fit the world on the share.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    share = len(available) // max(worker_count, 1)
    mine = available[worker_index * share : (worker_index + 1) * share]
    split = f"{len(available)} visible, split between {worker_count} pytest-xdist worker(s)"
    owned = f"this process owns {len(mine)} ({', '.join(mine) or 'none'}) of {split}"
    if setting == AUTO:
        if not mine:
            if not available:
                raise ValueError(
                    f"shared-GPU mode ({setting_text(setting)}) needs at least 1 GPU for a world of {world_size} "
                    "ranks, and no GPU is visible to this process; run where a GPU is visible, or use "
                    "--mnnvl-backend=sim"
                )
            raise ValueError(
                f"shared-GPU mode ({setting_text(setting)}) needs at least 1 GPU for a world of {world_size} "
                f"ranks, but {owned} (workers never share a GPU); run with fewer workers"
            )
        per_gpu = 1 if world_size <= len(mine) else _ceil_div(world_size, len(mine))
    else:
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
            raise ValueError(f"{setting_text(setting)} is not valid; allowed: an integer >= 1 or auto")
        per_gpu = min(setting, world_size)
    needed = _ceil_div(world_size, per_gpu)
    if needed > len(mine):
        if per_gpu == 1 and setting == 1:
            raise ValueError(
                f"a world of {world_size} ranks needs {world_size} GPUs, but {owned}; run with fewer workers or "
                "more GPUs, or share GPUs with --mnnvl-ranks-per-gpu=auto"
            )
        raise ValueError(
            f"a world of {world_size} ranks at {setting_text(setting)} needs {needed} GPU(s), but {owned}; run "
            "with fewer workers, more GPUs or more ranks per GPU"
        )
    return GpuPlan(world_size, tuple(mine[:needed]), per_gpu)


@dataclass(frozen=True)
class WorldLayout:
    """Where one topology's world runs: its :class:`GpuPlan`, or why it cannot run here (it is skipped)."""

    topology: str
    plan: GpuPlan | None
    skipped: str | None = None

    def describe(self) -> str:
        return f"{self.topology} {self.plan.describe()}" if self.plan is not None else f"{self.topology} skipped"


@dataclass(frozen=True)
class SharingSummary:
    """What a session's GPU worlds look like, for the report header, the JSON/Markdown report and the CLI:
    ``--mnnvl-ranks-per-gpu``, each topology's layout and whether the ranks run under MPS."""

    setting: RanksPerGpu
    worlds: tuple[WorldLayout, ...]
    mps_mode: str
    mps_on: bool | None
    mps_reason: str

    @property
    def shared(self) -> bool:
        return any(w.plan is not None and w.plan.shared for w in self.worlds)

    def nvlink_note(self) -> str:
        """What these worlds say about NVLink ('' when every world has a GPU per rank)."""
        plans = [w.plan for w in self.worlds if w.plan is not None]
        if not any(p.shared for p in plans):
            return ""
        if not any(p.nvlink_exercised for p in plans):
            return NVLINK_NOT_EXERCISED
        return "NVLink carries only the traffic between ranks on different GPUs"

    def nvlink_exercised(self) -> bool | None:
        """Whether any world's traffic crosses NVLink (None: no world can run here)."""
        plans = [w.plan for w in self.worlds if w.plan is not None]
        if not plans:
            return None
        return any(not p.shared or p.nvlink_exercised for p in plans)

    def mps_label(self) -> str:
        return {True: "MPS on", False: "MPS off", None: "MPS unknown"}[self.mps_on]

    def text(self) -> str:
        """``ws2-pp1 2 ranks on 1 GPU, ws4-pp1 4 ranks on 1 GPU; MPS off; NVLink itself is not exercised ...``"""
        parts = [", ".join(w.describe() for w in self.worlds) or "no world", self.mps_label()]
        skipped = next((w.skipped for w in self.worlds if w.skipped), None)
        if skipped:
            parts[0] += f" (skipped: {skipped})"
        note = self.nvlink_note()
        return "; ".join(parts + ([note] if note else []))

    def to_dict(self) -> dict[str, object]:
        return {
            "ranks_per_gpu": self.setting,
            "worlds": {
                w.topology: (
                    {
                        "ranks": w.plan.world_size,
                        "gpus": len(w.plan.devices),
                        "ranks_per_gpu": w.plan.ranks_per_gpu,
                        "shared": w.plan.shared,
                    }
                    if w.plan is not None
                    else {"skipped": w.skipped}
                )
                for w in self.worlds
            },
            "mps": {"mode": self.mps_mode, "on": self.mps_on, "reason": self.mps_reason},
            "nvlink_exercised": self.nvlink_exercised(),
            "note": self.nvlink_note() or None,
        }
