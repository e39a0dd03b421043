#!/usr/bin/env bash
# Device call 8 (2026-12-04): why the first world waits under xdist on 16 cores; then bench_threads.
set -uo pipefail
R=$OUT/r8; mkdir -p $R
exec > >(tee $R/steps.log) 2>&1
{ date -u; nproc; cat /sys/fs/cgroup/cpu.max 2>/dev/null; env | grep -E '^PYTHON' ; python3 -c 'import sys; print("dont_write_bytecode", sys.dont_write_bytecode)'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 --version
  python3 -c 'import torch; print(torch.__version__)'; git log -1 --oneline 2>/dev/null
  ls /usr/local/lib/python3.12/dist-packages/torch/__pycache__ 2>/dev/null | head -2; python3 -c 'import torch,os; d=os.path.dirname(torch.__file__); print(d, os.path.isdir(d+"/__pycache__"))'
  python3 -c 'import hypothesis,os; d=os.path.dirname(hypothesis.__file__); print(d, os.access(d, os.W_OK), sorted(os.listdir(d+"/__pycache__"))[:3] if os.path.isdir(d+"/__pycache__") else None)'
} > $R/env.txt 2>&1
cat $R/env.txt
imp() { CUDA_VISIBLE_DEVICES= PYTORCH_NVML_BASED_CUDA_CHECK=1 OMP_NUM_THREADS=1 /usr/bin/time -f "%e s wall %U user" python3 "$@" -c "import torch, torch.distributed, pytest_mnnvl.worlds.rank, pytest_mnnvl.worlds.layout; import pytest_mnnvl.backends.sim as s; s.preload()"; }
# 1. before any bytecode is written: the bundle as unpacked, the checkout as carried
tar -xJf .gpu/fi-trim.tar.xz -C /tmp/fi 2>/dev/null || { mkdir -p /tmp/fi /tmp/site; tar -xJf .gpu/fi-trim.tar.xz -C /tmp/fi; python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/apache_tvm_ffi-*.whl; }
export PYTHONPATH=/tmp/fi:/tmp/site:$PWD
ORIG=${PYTHONDONTWRITEBYTECODE-unset}; export PYTHONDONTWRITEBYTECODE=1
echo "== preload cold (no bytecode) x2, then -O"; imp; imp; imp -O
PYTHONDONTWRITEBYTECODE=1 CUDA_VISIBLE_DEVICES= python3 -X importtime -c "import torch, torch.distributed, pytest_mnnvl.worlds.rank; import pytest_mnnvl.backends.sim as s; s.preload()" 2> $R/importtime-cold.txt
echo "== pytest --co examples cold"; /usr/bin/time -f "%e s" python3 -m pytest -p pytest_mnnvl --co -q examples | tail -1
if [ "$ORIG" = unset ]; then unset PYTHONDONTWRITEBYTECODE; else export PYTHONDONTWRITEBYTECODE=$ORIG; fi; unset PYTHONPATH
# 2. the benchmark's own set-up (it compiles: .ci/bytecode)
echo "== gpu_env"; time . benchmarks/gpu_env.sh
echo "== preload warm x2, then -O"; imp; imp; imp -O
CUDA_VISIBLE_DEVICES= python3 -X importtime -c "import torch, torch.distributed, pytest_mnnvl.worlds.rank; import pytest_mnnvl.backends.sim as s; s.preload()" 2> $R/importtime-warm.txt
echo "== pytest --co examples warm"; /usr/bin/time -f "%e s" python3 -m pytest -p pytest_mnnvl --co -q examples | tail -1
echo "== bench_threads"; CUDA_VISIBLE_DEVICES= timeout 480 python3 benchmarks/bench_threads.py $R --configs share-n8,share-n4,share-c2,share-n2-c2,share --repeat 2
date -u
cd $OUT && tar -cJf r8.tar.xz r8
