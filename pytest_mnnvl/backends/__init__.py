"""Backends a rank world runs on: ``sim`` (FlashInfer's Python on CPU) and ``flashinfer`` (real GPUs).

Each backend module exposes ``install(ctx)``, called once inside every rank before any user code,
never in the pytest parent.
"""

from __future__ import annotations

BACKENDS = ("sim", "flashinfer", "plain")
