"""Launching a sweep: plan, pre-flight, dispatch, the job inside Slurm, the local pool, status and repair."""
