"""DiT scaling harness."""
