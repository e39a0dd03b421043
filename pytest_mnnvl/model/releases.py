"""Which FlashInfer release is installed, for the code whose truth differs between releases.

FlashInfer 0.7.4 replaced 0.7.2.post1's one-sided API (``MoeAlltoAll`` and its process-wide
``_WORKSPACE_CACHE``) by ``flashinfer.moe_ep``'s ``NVLinkOneSidedAlltoAll``, which owns a
refcounted workspace with fixed dispatch and combine regions. The workspace arithmetic (the
oracle), the handle calls (the reference manager, adapters, round trips), FlashInfer's allocation
records and the leak expectation all follow the release; each keeps one module per release and
picks it with :func:`current`.

The version is read from the package metadata, never by importing FlashInfer (the plugin's import
stays cheap). Without FlashInfer installed the answer is :data:`DEFAULT` (0.7.2.post1, the release
checked against GPUs), so the pure-Python tools still work; any other installed release is an
error naming it and the supported ones.
"""

from __future__ import annotations

import functools
from importlib import metadata

V072 = "0.7.2.post1"
V074 = "0.7.4"
#: Oldest first. Keep in step with the sim's ``backends.sim.RELEASES`` (a test checks it).
SUPPORTED = (V072, V074)
#: The release assumed when FlashInfer is not installed at all.
DEFAULT = V072
DISTRIBUTION = "flashinfer-python"


class UnsupportedRelease(RuntimeError):
    """The installed FlashInfer is none of :data:`SUPPORTED`."""


def installed() -> str | None:
    """The installed ``flashinfer-python`` version, or ``None``."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def check(release: str) -> str:
    """``release`` if it is supported, else :class:`UnsupportedRelease` naming what is."""
    if release not in SUPPORTED:
        raise UnsupportedRelease(
            f"FlashInfer {release!r} is not supported by pytest-mnnvl: supported releases are {', '.join(SUPPORTED)}"
        )
    return release


@functools.cache
def current() -> str:
    """The release the installed FlashInfer is (:data:`DEFAULT` when none is installed)."""
    found = installed()
    return DEFAULT if found is None else check(found)


def resolve(release: str | None) -> str:
    """``release`` checked, or :func:`current` for ``None``."""
    return current() if release is None else check(release)
