"""Training: the process group and seeds, the training step and micro-batching, the trainer, evaluation at steps, the throughput bench."""
