"""Which FlashInfer is installed and what it can do, found without importing it (importing it costs
seconds and may initialise CUDA).

``importlib.util.find_spec("flashinfer")`` locates it (a top-level lookup does not execute the package),
then its files decide: which one-sided all-to-all it has (:data:`ONE_SIDED_APIS`), ``moe_ep/``, and how
POSIX fds travel between ranks: ``comm/fd_exchange.py`` (over ``SCM_RIGHTS``: no ptrace needed,
releases >= 0.6.16) or its absence (``pidfd_getfd``: ptrace rights needed).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pytest_mnnvl.probes.probe import _cached

FdExchange = Literal["scm_rights", "pidfd_getfd"]
#: The one-sided all-to-all APIs the harness drives, by the file that ships each (relative to the package):
#: up to 0.7.2.post1 ``MoeAlltoAll`` over its op module; from 0.7.4 on ``flashinfer.moe_ep``'s
#: ``NVLinkOneSidedAlltoAll``, which owns its workspace and loads its own op module from this file.
ONE_SIDED_APIS = (
    ("comm/trtllm_moe_alltoall.py", "MoeAlltoAll"),
    ("moe_ep/backends/split/comm/nvlink_one_sided/kernels.py", "NVLinkOneSidedAlltoAll"),
)


@dataclass(frozen=True)
class FlashInferInfo:
    installed: bool
    version: str | None
    location: str | None
    """Directory of the ``flashinfer`` package."""
    one_sided: bool
    """A one-sided all-to-all of :data:`ONE_SIDED_APIS` is present (``one_sided_api`` names it)."""
    moe_ep: bool
    """``flashinfer/moe_ep`` (``NVLinkOneSidedAlltoAll``, 0.7.x) is present."""
    fd_exchange: FdExchange | None
    """How POSIX-fd handles travel between ranks; ``None`` when it cannot be told."""
    reason: str
    one_sided_api: str | None = None
    """``MoeAlltoAll`` or ``NVLinkOneSidedAlltoAll`` (see :data:`ONE_SIDED_APIS`); None without either."""

    @property
    def needs_ptrace(self) -> bool:
        return self.fd_exchange == "pidfd_getfd"


def release_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric release of a version string: ``'0.7.2.post1'`` -> ``(0, 7, 2)`` (pure)."""
    parts = []
    for piece in version.split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):
            break
    return tuple(parts)


def flashinfer_info_at(package_dir: str | os.PathLike[str] | None, version: str | None) -> FlashInferInfo:
    """Describe the FlashInfer package in ``package_dir`` from its files alone (pure but for reads)."""
    if package_dir is None:
        return FlashInferInfo(
            False,
            None,
            None,
            False,
            False,
            None,
            "flashinfer-python is not installed: pip install --no-deps flashinfer-python (plus its "
            "pure-Python imports, see the pytest-mnnvl README)",
        )
    root = Path(package_dir)
    comm = root / "comm"
    api = next((name for rel, name in ONE_SIDED_APIS if (root / rel).is_file()), None)
    one_sided = api is not None
    moe_ep = (root / "moe_ep").is_dir()
    if version is None:
        try:
            meta = (root / "_build_meta.py").read_text(errors="replace")
            found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", meta)
            version = found.group(1) if found else None
        except OSError:
            version = None
    shown = version or "unknown version"
    mechanism: FdExchange | None
    if (comm / "fd_exchange.py").is_file():
        mechanism = "scm_rights"
        how = "comm/fd_exchange.py present: fds pass over AF_UNIX SCM_RIGHTS, no ptrace needed"
    elif (comm / "mnnvl.py").is_file():
        mechanism = "pidfd_getfd"
        how = "no comm/fd_exchange.py: fds are fetched with pidfd_getfd, which needs ptrace rights over sibling ranks"
    else:
        mechanism = None
        how = "no comm/mnnvl.py: the fd exchange cannot be told"
    if mechanism is not None and version is not None:
        legacy = release_tuple(version) < (0, 6, 16)
        if legacy != (mechanism == "pidfd_getfd"):
            how += f" (unexpected for {version}: releases >= 0.6.16 ship fd_exchange.py)"
    parts = [
        f"flashinfer {shown} at {root}",
        f"one-sided {api} present" if one_sided else f"no one-sided all-to-all ({missing_one_sided_text()})",
        how,
    ]
    return FlashInferInfo(True, version, str(root), one_sided, moe_ep, mechanism, "; ".join(parts), api)


def missing_one_sided_text() -> str:
    """What a FlashInfer without a one-sided all-to-all lacks: every file of :data:`ONE_SIDED_APIS`."""
    return " and ".join(f"no {rel} ({name})" for rel, name in ONE_SIDED_APIS)


def _flashinfer_dir() -> tuple[str | None, str]:
    try:
        spec = importlib.util.find_spec("flashinfer")
    except (ImportError, ValueError) as exc:
        return None, f"find_spec('flashinfer') failed: {exc}"
    if spec is None:
        return None, ""
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [os.path.dirname(spec.origin)]
    for loc in locations:
        if (Path(loc) / "comm").is_dir():
            return loc, ""
    return (locations[0], "") if locations else (None, "flashinfer has no package directory")


@_cached
def flashinfer_info() -> FlashInferInfo:
    """The installed FlashInfer, found without importing it."""
    location, why = _flashinfer_dir()
    if location is None:
        info = flashinfer_info_at(None, None)
        return info if not why else FlashInferInfo(False, None, None, False, False, None, f"{why}; {info.reason}")
    version = None
    from importlib import metadata

    for dist in ("flashinfer-python", "flashinfer"):
        try:
            version = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            continue
    return flashinfer_info_at(location, version)
