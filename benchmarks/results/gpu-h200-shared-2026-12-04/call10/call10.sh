#!/usr/bin/env bash
# Device call 10 (2026-12-04): 16 cores vs 2 after the faster round-trip verification (static share, the default).
set -uo pipefail
R=$OUT/r10; mkdir -p $R
exec > >(tee $R/steps.log) 2>&1
{ date -u; nproc; cat /sys/fs/cgroup/cpu.max 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 --version
  python3 -c 'import torch; print(torch.__version__)'; git log -1 --oneline 2>/dev/null
} > $R/env.txt 2>&1
cat $R/env.txt
echo "== gpu_env"; time . benchmarks/gpu_env.sh
echo "== examples"; CUDA_VISIBLE_DEVICES= timeout 250 python3 benchmarks/bench_threads.py $R --suites examples \
  --configs share-n4,share-n8,share-c2 --repeat 3
echo "== conformance"; CUDA_VISIBLE_DEVICES= timeout 250 python3 benchmarks/bench_threads.py $R --suites conformance \
  --configs share-n8,share-n4,share-n2-c2 --repeat 3
date -u
cd $OUT && tar -cJf r10.tar.xz r10
