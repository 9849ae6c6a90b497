"""Sampling: the samplers (ours and diffusers') and batched sampling from a model or a checkpoint."""
