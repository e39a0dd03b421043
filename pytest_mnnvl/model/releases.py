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
from collections.abc import Mapping, Sequence
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


def install_command(release: str = SUPPORTED[-1]) -> str:
    """How to install ``release`` (``--no-deps``: its metadata pulls CUDA-only packages)."""
    return f"pip install --no-deps flashinfer-python=={release}"


def _not_supported(release: str) -> str:
    return f"FlashInfer {release!r} is not supported by pytest-mnnvl: supported releases are {', '.join(SUPPORTED)}"


def check(release: str) -> str:
    """``release`` if it is supported, else :class:`UnsupportedRelease` naming what is."""
    if release not in SUPPORTED:
        raise UnsupportedRelease(_not_supported(release))
    return release


def header_note(version: str | None) -> str:
    """What the report header adds to an installed ``version``: nothing when it is supported (or unknown)."""
    if version is None or version in SUPPORTED:
        return ""
    return f"; UNSUPPORTED: pytest-mnnvl supports {', '.join(SUPPORTED)}"


def unsupported_text(release: str, absent: Mapping[str, Sequence[str]]) -> str:
    """The one line a session with the unsupported ``release`` installed gets: the release, the supported
    ones, what it lacks of each (``absent``: supported release -> its modules not found in the installed
    package) and what to install. The modules are told from files, because importing a release nobody
    checked may fail in any way."""
    parts = [_not_supported(release)]
    for supported, modules in absent.items():
        if modules:
            parts.append(f"it lacks {supported}'s {', '.join(modules)}")
        else:
            parts.append(f"it has {supported}'s modules but was never checked against them")
    return f"{'; '.join(parts)}. FlashInfer worlds (sim, GPU) need a supported release: {install_command()}"


@functools.cache
def current() -> str:
    """The release the installed FlashInfer is (:data:`DEFAULT` when none is installed)."""
    found = installed()
    return DEFAULT if found is None else check(found)


def resolve(release: str | None) -> str:
    """``release`` checked, or :func:`current` for ``None``."""
    return current() if release is None else check(release)
