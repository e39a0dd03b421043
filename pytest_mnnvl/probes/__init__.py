"""What this machine can do, asked once per session without importing torch: GPUs, links, FlashInfer, handle
types, fd exchange, ptrace."""
