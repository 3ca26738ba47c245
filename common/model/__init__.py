"""Models: architectures, masks, checkpoints, compaction and supervised training."""
