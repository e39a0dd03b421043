"""``plain``: torch.distributed only, no FlashInfer stand-ins; for generic multi-rank tests."""

from __future__ import annotations

from typing import Any


def install(ctx: Any) -> None:
    """Nothing to install: the rank already has its process groups."""
