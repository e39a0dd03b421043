# Source this on a GPU runner with no registry: restores an offline FlashInfer bundle carried in .gpu/, the JIT
# cache, and keeps NVLink multicast off.
#
#   . benchmarks/gpu_env.sh                                   # the shared 0.7.2.post1 bundle (.gpu/fi-trim.tar.xz)
#   MNNVL_GPU_BUNDLE=.gpu/bundle-0.7.4 . benchmarks/gpu_env.sh  # a bundle built by `python -m pytest_mnnvl.cli.bundle`
#   MNNVL_GPU_BUNDLE=.gpu/fi-0.7.4 . benchmarks/gpu_env.sh      # the shared hand-made 0.7.4 folder (fi074-*.tar.xz)
#
# A carried JIT cache only hits when FlashInfer, tvm-ffi and the workspace sit at the paths the cache was built
# with: ninja compares whole command lines (-I/tmp/fi/..., -isystem /tmp/site/tvm_ffi/include) and rebuilds on any
# difference (minutes on 16 cores instead of seconds). The shared bundle was built at the paths below; a
# cli.bundle bundle is restored under /tmp/mnnvl-bundle/<its release>, so a cache built there once (the `jit` step
# of gpu_suite.sh brings it back) hits on every later runner.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if [ -n "${MNNVL_GPU_BUNDLE:-}" ] && [ -f "$MNNVL_GPU_BUNDLE/fi074-trim.tar.xz" ]; then
  # Its JIT cache (jitcache-h200.tar.xz) was built with FlashInfer at /tmp/fi074, tvm-ffi at /tmp/site074 and
  # the workspace at /tmp/fiws074: restored there, it hits.
  if [ ! -d /tmp/fi074/flashinfer ]; then
    mkdir -p /tmp/fi074 /tmp/site074 /tmp/fiws074
    for _part in "$MNNVL_GPU_BUNDLE"/fi074-*.tar.xz; do tar -xJf "$_part" -C /tmp/fi074 || return 2; done
    python3 -m pip install -q --no-index --no-deps --target /tmp/site074 "$MNNVL_GPU_BUNDLE"/../apache_tvm_ffi-*.whl \
      || return 2
    [ -f "$MNNVL_GPU_BUNDLE/jitcache-h200.tar.xz" ] && tar -xJf "$MNNVL_GPU_BUNDLE/jitcache-h200.tar.xz" -C /tmp/fiws074
    unset _part
  fi
  export PYTHONPATH="/tmp/fi074:/tmp/site074:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export FLASHINFER_WORKSPACE_BASE=/tmp/fiws074
elif [ -n "${MNNVL_GPU_BUNDLE:-}" ]; then
  _release=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["flashinfer"])' \
    "$MNNVL_GPU_BUNDLE/bundle.json") || return 2
  _exports=$(PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python3 -m pytest_mnnvl.cli.bundle restore \
    "$MNNVL_GPU_BUNDLE" --into "/tmp/mnnvl-bundle/$_release") || return 2
  eval "$_exports"  # PYTHONPATH: the bundle's site folder, then this checkout and what was there
  export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/mnnvl-bundle/$_release/workspace}
  unset _release _exports
else
  if [ ! -d /tmp/fi/flashinfer ]; then
    mkdir -p /tmp/fi /tmp/site /tmp/fiws
    tar -xJf .gpu/fi-trim.tar.xz -C /tmp/fi
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/apache_tvm_ffi-*.whl
    [ -f .gpu/jitcache.tar.xz ] && tar -xJf .gpu/jitcache.tar.xz -C /tmp/fiws
  fi
  export PYTHONPATH="/tmp/fi:/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export FLASHINFER_WORKSPACE_BASE=/tmp/fiws
fi
# Bytecode for torch, the unpacked bundle and this checkout, at both optimization levels (see .ci/bytecode).
bash .ci/bytecode python3 || return 2
