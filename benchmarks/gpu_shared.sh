#!/usr/bin/env bash
# Shared-GPU worlds on a ONE-GPU machine, in one command: examples/ and conformance/ on real FlashInfer with every
# rank of ws2-pp1, ws4-pp1 and ws4-pp2 on the one GPU (--mnnvl-ranks-per-gpu=auto), first without MPS
# (--mnnvl-mps=off: time-sliced), then under a private MPS daemon of the session (--mnnvl-mps=start), plus the GPU
# tests of the sharing and MPS code (tests/test_sharing.py, tests/test_mps.py: the real nvidia-cuda-mps-control).
#
#   bash benchmarks/gpu_shared.sh OUTDIR
#
# OUTDIR gets steps.log, one log per step, JUnit XML, and the conformance reports (conformance-mps-off.json/.md,
# conformance-mps-start.json/.md). With .gpu/fi-trim.tar.xz present (the offline bundle, see benchmarks/gpu_env.sh)
# it is restored first. Each step runs under its own time limit (stopped with SIGINT, so pytest still writes its
# summary and report), and no step starts past the whole run's budget: MNNVL_SHARED_BUDGET seconds (default 530,
# under 9 minutes); MNNVL_STEP_TIMEOUT_<STEP> overrides a step's limit (TESTS, EXAMPLES, CONFORMANCE).
# A shared world builds its groups on gloo and does not exercise NVLink: these runs check the managers and the
# harness on real FlashInfer kernels, not the links.
set -uo pipefail
OUT=${1:?usage: gpu_shared.sh OUTDIR}
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
if [ -f .gpu/fi-trim.tar.xz ]; then
  # shellcheck source=benchmarks/gpu_env.sh
  . benchmarks/gpu_env.sh
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${MNNVL_SHARED_BUDGET:-530}
START=$SECONDS
PYTEST=("$PY" -m pytest -p pytest_mnnvl -p no:cacheprovider -p no:randomly)
SHARED=(--mnnvl-backend=flashinfer --mnnvl-ranks-per-gpu=auto --mnnvl-world-sizes=2,4 --mnnvl-pp=1,2)

step_limit() {  # the step's limit, cut to what is left of the budget (0: no time left)
  local name=${1^^} default=$2 var left
  var="MNNVL_STEP_TIMEOUT_${name}"
  left=$((BUDGET - (SECONDS - START) - 15))
  local limit=${!var:-$default}
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 20 ]; then limit=0; fi
  echo "$limit"
}

run_step() {
  local name=$1 limit=$2
  shift 2
  if [ "$limit" -le 0 ]; then
    echo "=== $name not run: the ${BUDGET}s budget is spent" | tee -a "$OUT/steps.log"
    return
  fi
  local t0=$SECONDS rc
  echo "=== $name (limit ${limit}s) $(date -u +%FT%TZ): $*" | tee -a "$OUT/steps.log"
  timeout -s INT -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/steps.log"
  tail -n 15 "$OUT/$name.log"
}

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  command -v nvidia-cuda-mps-control || echo "nvidia-cuda-mps-control: not on PATH"
  "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
  "$PY" -c 'import flashinfer; print("flashinfer", flashinfer.__version__)'
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

run_step tests "$(step_limit tests 120)" "${PYTEST[@]}" tests/test_sharing.py tests/test_mps.py -k test_gpu_ -v -rs \
  --mnnvl-ranks-per-gpu=auto --junitxml="$OUT/tests.xml"
for mps in off start; do
  run_step "examples-mps-$mps" "$(step_limit examples 100)" "${PYTEST[@]}" examples/ "${SHARED[@]}" \
    --mnnvl-mps="$mps" -v -rs --junitxml="$OUT/examples-mps-$mps.xml"
  run_step "conformance-mps-$mps" "$(step_limit conformance 150)" "${PYTEST[@]}" conformance/ "${SHARED[@]}" \
    --mnnvl-mps="$mps" --mnnvl-report="$OUT/conformance-mps-$mps.json" --junitxml="$OUT/conformance-mps-$mps.xml"
done
# A private daemon must be gone with its session: none of ours may be left.
pgrep -af '^[^ ]*nvidia-cuda-mps-control -f' | tee -a "$OUT/steps.log" || echo "no private MPS daemon left" | tee -a "$OUT/steps.log"
echo "=== total $((SECONDS - START))s (budget ${BUDGET}s)" | tee -a "$OUT/steps.log"
