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


def unsupported_release() -> str | None:
    """Why no FlashInfer world (``sim`` or ``flashinfer``) can run here, in one line, or ``None``: the installed
    FlashInfer is none of the supported releases. Checked once per session rather than failing in every rank
    with a traceback; ``plain`` worlds need no FlashInfer and are never refused. Without FlashInfer installed
    the answer is ``None``: the ranks then say it is missing."""
    from pytest_mnnvl.model import releases

    found = releases.installed()
    if found is None or found in releases.SUPPORTED:
        return None
    from pytest_mnnvl.backends import sim
    from pytest_mnnvl.probes.flashinfer import flashinfer_info

    return releases.unsupported_text(found, sim.absent_modules(flashinfer_info().location))
