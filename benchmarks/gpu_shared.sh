#!/usr/bin/env bash
# Shared-GPU worlds in one command (made for a ONE-GPU machine): benchmarks/gpu_suite.sh's GPU tests of the sharing
# and MPS code, then examples/ and the conformance suite with every rank of ws2-pp1, ws4-pp1 and ws4-pp2 sharing the
# GPUs (--mnnvl-ranks-per-gpu=auto), first time-sliced (MNNVL_MPS=off), then with a private MPS daemon per pytest
# session (MNNVL_MPS=start); at the end, no daemon of ours may be left.
#
#   bash benchmarks/gpu_shared.sh OUTDIR     # OUTDIR/tests, OUTDIR/mps-off, OUTDIR/mps-start: gpu_suite.sh's outputs
#
# With MNNVL_GPU_BUNDLE or .gpu/fi-trim.tar.xz present, the offline FlashInfer bundle is restored first
# (benchmarks/gpu_env.sh). MNNVL_SHARED_BUDGET seconds (default 530, under 9 minutes) is shared out between the three
# runs as each starts; gpu_suite.sh's MNNVL_STEP_TIMEOUT_<STEP> still set each step's own limit. A shared world
# builds its groups on gloo and does not exercise NVLink: these runs check the managers and the harness on real
# FlashInfer kernels, not the links.
set -uo pipefail
OUT=${1:?usage: gpu_shared.sh OUTDIR}
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
if [ -n "${MNNVL_GPU_BUNDLE:-}" ] || [ -f .gpu/fi-trim.tar.xz ]; then
  # shellcheck source=benchmarks/gpu_env.sh
  . benchmarks/gpu_env.sh
fi
BUDGET=${MNNVL_SHARED_BUDGET:-530}
START=$SECONDS
export MNNVL_RANKS_PER_GPU=auto MNNVL_WORLD_SIZES=2,4
runs=3
share() {  # this run's part of what is left of the budget
  local left=$((BUDGET - (SECONDS - START)))
  echo $((left / runs))
}
MNNVL_SUITE_BUDGET=$(share) bash benchmarks/gpu_suite.sh "$OUT/tests" env gputests
runs=2
for mps in off start; do
  MNNVL_MPS=$mps MNNVL_SUITE_BUDGET=$(share) bash benchmarks/gpu_suite.sh "$OUT/mps-$mps" examples reference
  runs=$((runs - 1))
done
# A private daemon must be gone with its session: none of ours may be left.
pgrep -af '^[^ ]*nvidia-cuda-mps-control -f' | tee -a "$OUT/steps.log" || echo "no private MPS daemon left" | tee -a "$OUT/steps.log"
echo "=== total $((SECONDS - START))s (budget ${BUDGET}s)" | tee -a "$OUT/steps.log"
