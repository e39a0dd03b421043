# Source this on a GPU runner with no registry: restores the offline FlashInfer bundle carried in .gpu/
# (see `python -m pytest_mnnvl.bundle`), the JIT cache, and keeps NVLink multicast off.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
MNNVL_FI_ROOT=${MNNVL_FI_ROOT:-/tmp/mnnvl-fi}
if [ ! -d "$MNNVL_FI_ROOT/site/flashinfer" ]; then
  mkdir -p "$MNNVL_FI_ROOT/site" "$MNNVL_FI_ROOT/ws"
  tar -xJf .gpu/fi-trim.tar.xz -C "$MNNVL_FI_ROOT/site"
  python3 -m pip install -q --no-index --no-deps --target "$MNNVL_FI_ROOT/site" .gpu/apache_tvm_ffi-*.whl
  [ -f .gpu/jitcache.tar.xz ] && tar -xJf .gpu/jitcache.tar.xz -C "$MNNVL_FI_ROOT/ws"
fi
export PYTHONPATH="$MNNVL_FI_ROOT/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FLASHINFER_WORKSPACE_BASE="$MNNVL_FI_ROOT/ws"
