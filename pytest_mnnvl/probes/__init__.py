"""What this machine can do, asked once per session without importing torch, one module per thing probed:
:mod:`.gpus` (NVML inventory, ``CUDA_VISIBLE_DEVICES``), :mod:`.links` (NVLink), :mod:`.flashinfer` (the installed
release, its one-sided module and fd exchange), :mod:`.handles` (FABRIC vs POSIX fds), :mod:`.ptrace`, and on top
:mod:`.backend` (one-sided worlds, GPU plans, the auto backend) and :mod:`.header` (the report header's lines).
:mod:`.probe` holds the answer record and the cache; :mod:`.nvml` the lazy NVML access they share. Nothing heavy is
imported at module load: NVML (``pynvml``) is imported inside the probes, FlashInfer is never imported at all (its
files and metadata are read instead), and no probe touches ``torch.cuda``."""
