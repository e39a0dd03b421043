"""How long the installed FlashInfer release's one-sided all-to-all module takes to JIT-build, cold and warm.

An air-gapped runner either carries a compiled cache or pays this build once per fresh machine (every world on
the flashinfer backend waits for it). The first call of the loader every rank calls runs where nothing is
compiled yet (cold: nvcc + ninja; ``cold`` in the JSON says whether it was); the second loads it in a fresh
process (warm: the hit a carried cache gives). With ``--cache-out`` the
compiled workspace is written as a ``tar.xz`` to put beside an offline bundle (it only hits at the same paths).

    python benchmarks/jit_build.py OUT.json [--workspace DIR] [--cache-out jitcache.tar.xz]

Needs a CUDA GPU, nvcc and FlashInfer 0.7.2.post1 or 0.7.4 importable.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_CHILD = """
import importlib, sys, time
module, loader, args = sys.argv[1], sys.argv[2], sys.argv[3:]
t0 = time.monotonic()
getattr(importlib.import_module(module), loader)(*args)
print(f"{time.monotonic() - t0:.3f}")
"""


def build_once(release: str, workspace: Path) -> float:
    """Seconds the release's op-module loader (the one the flashinfer backend calls in every rank) took in a fresh
    process with ``workspace`` as FlashInfer's workspace base: a build when nothing is compiled there yet."""
    from pytest_mnnvl.backends.flashinfer import OP_MODULES

    module, loader, args, _ = OP_MODULES[release]
    env = {**os.environ, "FLASHINFER_WORKSPACE_BASE": str(workspace)}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, module, loader, *args], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{module}.{loader}{tuple(args)} failed:\n{done.stderr[-4000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="JSON file to write")
    parser.add_argument("--workspace", type=Path, help="the workspace base to build in (default: a new empty folder)")
    parser.add_argument("--cache-out", type=Path, help="write the compiled workspace here as tar.xz")
    args = parser.parse_args(argv)

    from _environment import environment

    from pytest_mnnvl.backends.flashinfer import OP_MODULES

    env = environment("flashinfer")
    release = env["flashinfer"]
    if release not in OP_MODULES:
        parser.error(f"FlashInfer {release} is installed: supported releases are {', '.join(OP_MODULES)}")
    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="mnnvl-jit-"))
    workspace.mkdir(parents=True, exist_ok=True)
    compiled_before = sorted(str(p.relative_to(workspace)) for p in workspace.rglob("*.so"))
    t0 = time.monotonic()
    first = build_once(release, workspace)
    first_wall = time.monotonic() - t0
    t0 = time.monotonic()
    second = build_once(release, workspace)
    second_wall = time.monotonic() - t0
    result = {
        "environment": env,
        "loader": ".".join(OP_MODULES[release][:2]) + repr(OP_MODULES[release][2]),
        "workspace": str(workspace),
        "cold": not compiled_before,
        "compiled_before": compiled_before,
        "first_build_and_load_s": round(first, 2),
        "first_process_s": round(first_wall, 2),
        "second_build_and_load_s": round(second, 2),
        "second_process_s": round(second_wall, 2),
        "nvcc_jobs_env": {k: os.environ[k] for k in ("MAX_JOBS", "FLASHINFER_NVCC_THREADS") if k in os.environ},
    }
    if args.cache_out is not None:
        with tarfile.open(args.cache_out, "w:xz") as tar:
            tar.add(workspace, arcname=".")
        result["cache_bytes"] = args.cache_out.stat().st_size
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
