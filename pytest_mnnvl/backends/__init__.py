"""Backends a rank world runs on: ``sim`` (FlashInfer's Python on CPU) and ``flashinfer`` (real GPUs).

Each backend module exposes ``install(ctx)``, called once inside every rank before any user code,
never in the pytest parent.
"""

from __future__ import annotations

#: The backends a session runs its worlds on: the option's choices besides ``auto``, what a plugin's
#: ``pytest_mnnvl_select_backend`` may return, and the CLI's ``repro --backend``.
SESSION_BACKENDS = ("sim", "flashinfer")
#: What ``mnnvl_world(backend=...)`` takes: also ``plain`` (torch.distributed alone, no FlashInfer).
BACKENDS = (*SESSION_BACKENDS, "plain")
#: What ``--mnnvl-backend`` takes.
BACKEND_CHOICES = ("auto", *SESSION_BACKENDS)
