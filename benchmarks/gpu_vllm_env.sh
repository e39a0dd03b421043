# shellcheck shell=bash
# Source this AFTER benchmarks/gpu_env.sh on a GPU runner with no registry, to make vLLM's own
# FlashInferNVLinkOneSidedManager importable for `--mnnvl-manager=vllm` (bundle: benchmarks/vllm_bundle.sh):
#
#   . benchmarks/gpu_env.sh && MNNVL_VLLM_VERSION=0.33.0 . benchmarks/gpu_vllm_env.sh
#
# MNNVL_VLLM_VERSION: 0.33.0 or 0.32.0; .gpu/vllm-$MNNVL_VLLM_VERSION-cp312.tar.xz must be there. It is unpacked
# once into /tmp/vllm-$MNNVL_VLLM_VERSION (MNNVL_VLLM_DIR overrides) and appended to PYTHONPATH.
#
# Why appended, after the image's own packages: a package the image already has (numpy, requests, packaging,
# filelock, tqdm, pynvml, typing_extensions, ...) keeps the image's version, so torch and FlashInfer see exactly what
# they see without vLLM. That is safe for vLLM's side: the bundle's dependencies are ordinary releases inside
# vLLM's own version ranges, the only ones vLLM's import uses are pure-Python APIs that are stable across releases
# (requests, packaging, filelock, tqdm, typing_extensions), and the bundle's numpy is left out on purpose (FlashInfer
# needs numpy, so an image where FlashInfer works has it). The one thing that must NOT come from the image is a
# second vLLM: if the image has one, it would win and the bundle would be ignored, so this script refuses that case
# rather than test the wrong code. An image transformers would win too; that only gets a warning (vLLM may still
# import with it, and fails loudly if not).
# Must be sourced from bash (uses `return`); it does not change shell options.

_mnnvl_vllm_fail() { echo "gpu_vllm_env.sh: $*" >&2; }
_mnnvl_vllm_env() {
  local version=${MNNVL_VLLM_VERSION:-} dir archive found
  case "$version" in
    0.33.0|0.32.0) ;;
    "") _mnnvl_vllm_fail "set MNNVL_VLLM_VERSION (allowed: 0.33.0, 0.32.0)"; return 2 ;;
    *) _mnnvl_vllm_fail "unsupported MNNVL_VLLM_VERSION '$version' (allowed: 0.33.0, 0.32.0)"; return 2 ;;
  esac
  archive=".gpu/vllm-$version-cp312.tar.xz"
  dir=${MNNVL_VLLM_DIR:-/tmp/vllm-$version}
  if [ ! -f "$dir/mnnvl-vllm-bundle.json" ]; then
    if [ ! -f "$archive" ]; then
      _mnnvl_vllm_fail "$archive not found (run from the checkout; build it with: bash benchmarks/vllm_bundle.sh $version)"
      return 1
    fi
    if ! { rm -rf "$dir" && mkdir -p "$dir" && tar -xJf "$archive" -C "$dir"; }; then
      _mnnvl_vllm_fail "could not unpack $archive into $dir"
      return 1
    fi
  fi
  case ":${PYTHONPATH:-}:" in
    *":$dir:"*) ;;
    *) export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$dir" ;;
  esac
  # vLLM's has_flashinfer() otherwise wants the flashinfer-cubin package or nvcc + ninja on PATH.
  export VLLM_HAS_FLASHINFER_CUBIN=1
  # On a GPU host vLLM would pick its CUDA platform, whose module imports the compiled vllm._C_stable_libtorch
  # (92 MB, built for another torch; not in the bundle) as soon as any vLLM module does
  # `from vllm.platforms import current_platform` at import. An explicit CPU target is vLLM's own switch for
  # "accelerator wheel on an accelerator host, CPU platform wanted"; the manager never consults the platform
  # (it talks to FlashInfer and torch.distributed directly), and the bundle was measured and checked with it.
  export VLLM_TARGET_DEVICE=cpu
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  # Which vLLM and transformers will really be imported (metadata only: importing vLLM costs 10-15 s).
  found=$(python3 - "$dir" <<'PY'
import importlib.util, os, sys
bundle = os.path.realpath(sys.argv[1])
for name in ("vllm", "transformers"):
    spec = importlib.util.find_spec(name)
    where = os.path.realpath(spec.origin) if spec and spec.origin else None
    if where is None or not where.startswith(bundle + os.sep):
        print(f"{name}: {name} resolves to {where or 'nothing'}, not to the bundle in {bundle}")
PY
) || { _mnnvl_vllm_fail "python3 failed while checking the bundle"; return 1; }
  case "$found" in
    *"vllm: "*) _mnnvl_vllm_fail "${found#*vllm: } (uninstall it or take it off PYTHONPATH)"; return 1 ;;
    *"transformers: "*) _mnnvl_vllm_fail "warning: ${found#transformers: }" ;;
  esac
  echo "gpu_vllm_env.sh: vLLM $version from $dir (VLLM_TARGET_DEVICE=cpu, VLLM_HAS_FLASHINFER_CUBIN=1)"
}
_mnnvl_vllm_env
