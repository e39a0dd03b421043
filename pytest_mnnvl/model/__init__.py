"""What FlashInfer computes, per release, without running it: layers and their payloads, workspace sizing, the
oracle a manager's workspace is judged by, and the real-model plans."""
