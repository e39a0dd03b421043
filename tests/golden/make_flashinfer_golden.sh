#!/usr/bin/env bash
# Regenerates flashinfer_host_checks.json from the installed FlashInfer's own C++ source.
#
# The aux-offset walk and the host check statements are cut out of trtllm_moe_alltoall.cu (by line
# number, for flashinfer-python 0.7.2.post1), compiled into a tiny TVM FFI module with g++, loaded
# with tvm_ffi and called from Python: the messages recorded are the real str(RuntimeError) Python
# sees. Nothing of FlashInfer is stored in this repository; only the numbers and texts it produces.
# Usage: tests/golden/make_flashinfer_golden.sh [path/to/venv]   (needs g++, no GPU)
set -euo pipefail
VENV=${1:-.venv}
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CU="$SITE/flashinfer/data/csrc/trtllm_moe_alltoall.cu"
META="$SITE/flashinfer/data/csrc/nv_internal/tensorrt_llm/thop"
TVM="$SITE/tvm_ffi"
VERSION=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("flashinfer-python"))')
[ "$VERSION" = "0.7.2.post1" ] || { echo "line numbers are for 0.7.2.post1, found $VERSION" >&2; exit 1; }
OUT=$(cd "$(dirname "$0")" && pwd)/flashinfer_host_checks.json
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cut_lines() { sed -n "$1p" "$CU"; }
{
  echo '#include <tvm/ffi/function.h>'
  echo '#include <tvm/ffi/error.h>'
  echo '#include <cstdint>'
  echo '#include <cstddef>'
  echo '#include "moeAlltoAllMeta.h"'
  echo 'namespace tl_throughput { constexpr int kMaxTopK = 22; constexpr int kMaxPayloads = 6; constexpr int kMaxRanks = 64; }'
  echo 'namespace fi_throughput = torch_ext::moe_alltoall;'
  echo 'constexpr size_t kCachelineAlignment = 128;'
  echo 'constexpr size_t kInt32Bytes = sizeof(int32_t);'
  cut_lines 50,52; echo '}'
  cut_lines 106,146
  echo 'int64_t aux_offset(int64_t ep, int64_t t, int64_t eplb, int64_t index) { return calculateOffsets(ep, t, eplb)[index]; }'
  echo 'void too_many_payloads(int64_t numPayloads) {'; cut_lines 195,197; echo '}'
  echo 'void scalar_args(int64_t epSize, int64_t epRank, int64_t runtimeMaxTokensPerRank, int64_t numExperts, int64_t topK) {'
  cut_lines 222,228; echo '}'
  echo 'void misaligned(int64_t totalBytesNeeded, int64_t elementSize, int64_t i) {'; cut_lines 269,271; echo '}'
  echo 'void dispatch_size(int64_t payloadOffset, int64_t totalBytesNeeded, int64_t sizePerRank) {'
  echo '  std::array<int64_t, 10> offsets{}; offsets[9] = payloadOffset;'
  cut_lines 280,282; echo '}'
  echo 'void combine_size(int64_t combinePayloadOffset, int64_t payloadBytes, int64_t sizePerRank) {'
  cut_lines 429,430; echo '}'
  for f in aux_offset too_many_payloads scalar_args misaligned dispatch_size combine_size; do
    echo "TVM_FFI_DLL_EXPORT_TYPED_FUNC($f, $f);"
  done
} > "$WORK/checks.cc"
g++ -std=c++17 -O1 -shared -fPIC -I"$TVM/include" -I"$META" \
  "$WORK/checks.cc" -L"$TVM/lib" -ltvm_ffi -Wl,-rpath,"$TVM/lib" -o "$WORK/checks.so"
"$VENV/bin/python" - "$WORK/checks.so" "$OUT" "$VERSION" <<'PY'
import json, sys
import tvm_ffi

mod = tvm_ffi.load_module(sys.argv[1])

def err(name, *args):
    try:
        mod[name](*args)
    except Exception as exc:  # record exactly what Python sees
        return {"name": name, "args": list(args), "type": type(exc).__name__, "str": str(exc)}
    return {"name": name, "args": list(args), "type": None, "str": None}

grid = []
for ep in (1, 2, 3, 4, 8, 16, 64):  # 7 x 16 = 112 points
    for t in (1, 2, 7, 31, 32, 64, 100, 128, 255, 256, 1000, 1024, 2048, 4097, 8192, 16384):
        eplb = (ep * t) % 3 * 128
        grid.append({"ep": ep, "max_num_tokens": t, "eplb_stats_num_experts": eplb,
                     "offsets": [mod["aux_offset"](ep, t, eplb, i) for i in range(10)]})
checks = [
    err("dispatch_size", 45440, 4227072, 4000000),
    err("dispatch_size", 45440, 1212416, 5452160),
    err("combine_size", 4272512, 4194304, 5452160),
    err("combine_size", -128, 4, 5452160),
    err("too_many_payloads", 7),
    err("too_many_payloads", 0),
    err("scalar_args", 65, 0, 1, 64, 2),
    err("scalar_args", 2, 2, 1, 8, 2),
    err("scalar_args", 2, 0, 0, 8, 2),
    err("scalar_args", 4, 0, 1, 2, 2),
    err("scalar_args", 2, 0, 1, 8, 23),
    err("misaligned", 9, 4, 2),
]
json.dump({"flashinfer_version": sys.argv[3],
           "source": "flashinfer/data/csrc/trtllm_moe_alltoall.cu compiled by make_flashinfer_golden.sh",
           "aux_grid": grid, "checks": checks}, open(sys.argv[2], "w"), indent=1)
print(len(grid), "grid points;", len(checks), "checks ->", sys.argv[2])
PY
