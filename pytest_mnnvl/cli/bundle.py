"""Offline FlashInfer for air-gapped GPU runners: build a trimmed bundle, restore it there.

The flashinfer-python wheel is 62 MB (544 MB unpacked), mostly CUTLASS and kernels the one-sided
MoE all-to-all never compiles. What ``import flashinfer.comm`` and the JIT build of the release's
one-sided module need (0.7.2.post1: ``mnnvl_moe_alltoall``; 0.7.4: ``nvlink_one_sided_alltoall``, whose
kernels also include CUTLASS headers) is every ``.py`` file, the all-to-all CUDA sources and the headers
they include; with ``apache-tvm-ffi`` (the one dependency GPU images tend to lack) that is 15-22 MB of
``tar.xz``. ``restore`` unpacks it, installs the wheels into a folder, restores a JIT cache if one is
given (the first build drops from minutes to seconds), and prints the environment to use.

    python -m pytest_mnnvl.cli.bundle build --out bundle/ [--flashinfer 0.7.4]   # where PyPI is reachable
    python -m pytest_mnnvl.cli.bundle restore bundle/ --into /opt/fi              # on the GPU runner
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

DEFAULT_FLASHINFER = "0.7.2.post1"
DEFAULT_TVM_FFI = "0.1.15.post2"
#: Kept by every release, relative to the ``flashinfer`` package directory (``data/csrc/*.h``: top level only).
COMMON = ("*.py", "data/csrc/*.h", "data/csrc/nv_internal/*", "data/include/*", "data/spdlog/*", "data/cccl/*")
#: What each supported release's one-sided module adds: its CUDA sources (and for 0.7.4 the CUTLASS headers its
#: kernels include, ``cutlass/arch/barrier.h`` and what that pulls in).
KEEP_BY_RELEASE: dict[str, tuple[str, ...]] = {
    "0.7.2.post1": ("data/csrc/trtllm_moe_alltoall.cu",),
    "0.7.4": (
        "data/csrc/nvlink_one_sided_alltoall.cu",
        "data/csrc/nvlink_one_sided_lamport.cu",
        "data/cutlass/include/*",
        "data/cutlass/tools/util/*",
    ),
}
ARCHIVE = "flashinfer-trimmed.tar.xz"
MANIFEST = "bundle.json"
SIZE_LIMIT = 64 * 1024 * 1024


def keep(relative: str, release: str = DEFAULT_FLASHINFER) -> bool:
    """Whether a path inside the flashinfer package belongs in ``release``'s bundle."""
    top_level_h = relative.startswith("data/csrc/") and relative.count("/") == 2 and relative.endswith(".h")
    patterns = (*COMMON, *KEEP_BY_RELEASE[release])
    return top_level_h or any(fnmatch.fnmatch(relative, pattern) for pattern in patterns if pattern != "data/csrc/*.h")


def trim(
    package_dir: Path, dist_info: Path | None, archive: Path, preset: int = 6, release: str = DEFAULT_FLASHINFER
) -> list[str]:
    """Write ``release``'s kept files of an installed or unpacked ``flashinfer`` package to ``archive`` (xz
    ``preset``)."""
    names: list[str] = []
    with tarfile.open(archive, "w:xz", preset=preset) as tar:  # type: ignore[call-overload]  # preset: 0..9
        for path in sorted(package_dir.rglob("*")):
            relative = path.relative_to(package_dir).as_posix()
            if path.is_file() and "__pycache__" not in relative and keep(relative, release):
                tar.add(path, arcname=f"flashinfer/{relative}")
                names.append(relative)
        if dist_info is not None:
            tar.add(dist_info, arcname=dist_info.name)
    return names


def _download(requirements: Iterable[str], dest: Path, python_version: str) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(dest),
        "--python-version",
        python_version,
        "--platform",
        "manylinux_2_28_x86_64",
        *requirements,
    ]
    subprocess.run(command, check=True)


def build(out: Path, flashinfer: str, tvm_ffi: str, python_version: str, jit_cache: Path | None) -> Path:
    """Download the wheels, trim FlashInfer, write ``out`` (archive, wheels, manifest)."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mnnvl-bundle-") as tmp:
        work = Path(tmp)
        _download([f"flashinfer-python=={flashinfer}"], work, python_version)
        _download([f"apache-tvm-ffi=={tvm_ffi}"], out, python_version)
        wheel = next(work.glob("flashinfer_python-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(work / "unpacked")
        dist_info = next((work / "unpacked").glob("flashinfer_python-*.dist-info"))
        kept = trim(work / "unpacked" / "flashinfer", dist_info, out / ARCHIVE, release=flashinfer)
    if jit_cache is not None:
        with tarfile.open(out / "jitcache.tar.xz", "w:xz") as tar:
            tar.add(jit_cache, arcname=".")
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    manifest = {
        "flashinfer": flashinfer,
        "apache_tvm_ffi": tvm_ffi,
        "python": python_version,
        "files_kept": len(kept),
        "bytes": total,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if total > SIZE_LIMIT:
        raise SystemExit(f"bundle is {total / 2**20:.1f} MiB, over the {SIZE_LIMIT // 2**20} MiB a device call carries")
    return out


def restore(bundle: Path, into: Path) -> dict[str, str]:
    """Unpack a bundle into ``into``; return the environment that makes it importable."""
    site = into / "site"
    site.mkdir(parents=True, exist_ok=True)
    with tarfile.open(bundle / ARCHIVE) as tar:
        tar.extractall(site, filter="data")
    for wheel in sorted(bundle.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cache = bundle / "jitcache.tar.xz"
    if cache.exists():
        workspace = into / "workspace"
        workspace.mkdir(exist_ok=True)
        with tarfile.open(cache) as tar:
            tar.extractall(workspace, filter="data")
        env["FLASHINFER_WORKSPACE_BASE"] = str(workspace)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_mnnvl.cli.bundle", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download and trim FlashInfer into a folder (needs PyPI)")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument(
        "--flashinfer", default=DEFAULT_FLASHINFER, help=f"the release to bundle: {', '.join(KEEP_BY_RELEASE)}"
    )
    b.add_argument("--tvm-ffi", default=DEFAULT_TVM_FFI)
    b.add_argument("--python-version", default="3.12")
    b.add_argument("--jit-cache", type=Path, help="a $FLASHINFER_WORKSPACE_BASE folder to ship along")
    r = sub.add_parser("restore", help="unpack a bundle on the GPU runner and print the environment")
    r.add_argument("bundle", type=Path)
    r.add_argument("--into", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "build":
        if args.flashinfer not in KEEP_BY_RELEASE:
            parser.error(
                f"--flashinfer={args.flashinfer}: not a supported FlashInfer release (allowed: "
                f"{', '.join(KEEP_BY_RELEASE)}); a bundle keeps the files that release's one-sided module builds from"
            )
        if args.jit_cache is not None and not args.jit_cache.is_dir():
            parser.error(f"--jit-cache={args.jit_cache}: not a folder")
        print(build(args.out, args.flashinfer, args.tvm_ffi, args.python_version, args.jit_cache))
        return 0
    if not (args.bundle / ARCHIVE).is_file():
        parser.error(f"{args.bundle}: no {ARCHIVE} there; build one with `python -m pytest_mnnvl.cli.bundle build`")
    for name, value in restore(args.bundle, args.into).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
