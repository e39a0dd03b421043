# Source this on a GPU runner with no registry: restores the offline FlashInfer bundle carried in .gpu/
# (see `python -m pytest_mnnvl.cli.bundle`), the JIT cache, and keeps NVLink multicast off.
#
# The JIT cache only hits when FlashInfer, tvm-ffi and the workspace sit at the paths the cache was built
# with: ninja compares whole command lines (-I/tmp/fi/..., -isystem /tmp/site/tvm_ffi/include) and rebuilds
# on any difference (~3 min on 16 cores instead of ~9 s). The shared bundle was built at these paths.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if [ ! -d /tmp/fi/flashinfer ]; then
  mkdir -p /tmp/fi /tmp/site /tmp/fiws
  tar -xJf .gpu/fi-trim.tar.xz -C /tmp/fi
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/apache_tvm_ffi-*.whl
  [ -f .gpu/jitcache.tar.xz ] && tar -xJf .gpu/jitcache.tar.xz -C /tmp/fiws
fi
export PYTHONPATH="/tmp/fi:/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FLASHINFER_WORKSPACE_BASE=/tmp/fiws
