"""Functions the zygote tests run in ranks (module level, importable by name in every rank)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any


def pid_parent_threads(ctx: Any) -> tuple[int, int, int, str | None]:
    """This rank's pid, its parent's (the zygote, when forked), torch's thread count and OMP_NUM_THREADS."""
    import torch

    return os.getpid(), os.getppid(), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")


def segfault_on_rank_1(ctx: Any) -> None:
    if ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(5)


def cwd(ctx: Any) -> str:
    return os.getcwd()


def devices_here_and_in_parent(ctx: Any) -> tuple[int, str | None, str | None, str | None, str | None]:
    """The parent's pid, then CUDA_VISIBLE_DEVICES and PYTORCH_NVML_BASED_CUDA_CHECK in this rank and in the
    environment its parent was started with."""
    with open(f"/proc/{os.getppid()}/environ", "rb") as f:
        parent = dict(item.decode().partition("=")[::2] for item in f.read().split(b"\0") if item)
    devices, check = "CUDA_VISIBLE_DEVICES", "PYTORCH_NVML_BASED_CUDA_CHECK"
    return os.getppid(), os.environ.get(devices), os.environ.get(check), parent.get(devices), parent.get(check)


def sleep_long(ctx: Any, mark: str) -> None:
    """Busy in a call (after touching ``mark``-RANK), so a rank does not see its pool's socket close: what a
    worker killed mid-test leaves."""
    with open(f"{mark}-{ctx.rank}", "w"):
        pass
    time.sleep(600)
