"""Hooks pytest-mnnvl adds, for plugins and conftest files that need to steer it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pytest_mnnvl.worlds.pool import WorldSpec


@pytest.hookspec(firstresult=True)
def pytest_mnnvl_select_backend(config: pytest.Config, requested: str) -> str | None:
    """Choose the backend for ``--mnnvl-backend=auto`` (``requested`` is then ``"auto"``).

    Return ``"sim"`` or ``"flashinfer"`` to decide, or ``None`` to leave it to the built-in probe
    (FlashInfer when its one-sided module is installed and >=2 NVLink GPUs are visible).
    """


def pytest_mnnvl_rank_env(config: pytest.Config, spec: WorldSpec) -> dict[str, Any] | None:
    """Return extra environment variables for the ranks of a world about to start.

    Every implementation is called; later results win on conflicts. Multicast stays off whatever
    is returned: ``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` and
    ``NVSHMEM_DISABLE_NVLS=1`` are always set last.
    """
