"""Training a run: the one loop (train), a step's loss, checkpoints, exact resume, stop signals, DDP / FSDP."""
