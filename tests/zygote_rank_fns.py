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
