"""How the probes talk to NVML: ``pynvml`` imported only when a probe runs, its errors turned into one
line that says what is missing (no driver, driver not loaded), and every session shut down again.

The GPU inventory, the NVLink report and the fabric-state probe all open NVML; one place keeps them
saying the same thing about the same failure.
"""

from __future__ import annotations

import contextlib
from typing import Any


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


def _shutdown(nvml: Any) -> None:
    with contextlib.suppress(Exception):
        nvml.nvmlShutdown()


def _import_nvml() -> tuple[Any, str]:
    try:
        import pynvml
    except Exception as exc:
        return None, f"pynvml is not importable ({exc}): pip install nvidia-ml-py"
    return pynvml, ""
