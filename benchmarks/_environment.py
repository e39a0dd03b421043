"""Where a benchmark ran: date, host, Python, torch/CUDA, FlashInfer, and the cards or CPU (one helper for every
benchmark's JSON, so results from different scripts compare field by field)."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any


def environment(backend: str) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "backend": backend,
    }
    try:
        env["flashinfer"] = md.version("flashinfer-python")
    except md.PackageNotFoundError:  # the offline bundle puts FlashInfer on PYTHONPATH without metadata
        import flashinfer

        env["flashinfer"] = getattr(flashinfer, "__version__", "unknown")
    if backend == "flashinfer":
        from pytest_mnnvl.probes.gpus import gpu_inventory

        env["cards"] = [g.name for g in gpu_inventory().gpus]
    else:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            env["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return env
