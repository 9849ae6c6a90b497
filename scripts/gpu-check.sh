#!/usr/bin/env bash
# Device check for the latent stage and evaluation (issue 15), on one GPU, in a few minutes:
# training, VAE-encode (latent stage) and end-to-end sampling throughput of DiT-XL/2 at 256 px, bf16
# training and bf16-autocast encoding (the latent job's settings), fp32 sampling (sample_images').
# Feed the printed figures to `harness plan --throughput T --sampling-throughput S --latent-throughput L`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PY" -m harness bench --model DiT-XL/2 --batch 64 --steps 5 --warmup 2 --precision bf16 \
    --latents --sampling-steps 50 ${VAE:+--autoencoder-path "$VAE"}
