"""What a sweep costs before it runs: Gflops, compute and accelerator-hours per run (plan), and each run's GPUs in the simulated queue (schedule)."""
