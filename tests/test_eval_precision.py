"""bf16 (and compiled) sampling measures what fp32 sampling measures (issue 23), by the rule in
precision_check.py: the two FIDs of the same model, labels and seeds lie within their combined bootstrap
standard error; a planted batching error (every batch repeats the first batch's noise) does not."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from harness.data.autoencoder import IdentityAutoencoder
from harness.metrics import get_feature_extractor, load_reference
from harness.models.runmodel import model_from_checkpoint
from harness.training.train import run_training
from precision_check import fid_pair, nudged
from train_tiny import tiny_run

# fixed before the first run: 2,000 samples (4 batches of 500: the planted error leaves 500 distinct),
# DDIM-10, guidance 1.5 (the paper's best-FID scale), the digits feature space
N, BATCH, STEPS, CFG = 2000, 500, 10, 1.5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny DiT trained 300 steps on digits (its EMA): a model whose samples FID can rank."""
    run_dir = tmp_path_factory.mktemp("trained")
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, old))
    try:
        run_training(tiny_run(steps=300, global_batch=64, lr=2e-3, ema_decay=0.99, ckpt_every=300, log_every=100),
                     run_dir)
    finally:
        torch.set_num_threads(old)
    model, _, _ = model_from_checkpoint(run_dir / "checkpoints" / "step_0000300.pt")
    return model


@pytest.mark.slow
@pytest.mark.parametrize("plant", [False, True], ids=["bf16", "planted-error"])
def test_bf16_sampling_gives_the_fp32_fid_within_the_bootstrap_error(trained, plant):
    extractor = get_feature_extractor("digits")
    reference = load_reference("digits", extractor, image_size=8)
    r = fid_pair(trained, IdentityAutoencoder(), extractor, reference, N, 10, steps=STEPS, cfg_scale=CFG,
                 batch=BATCH, compile_bf16=False, plant=plant)
    figures = {k: r[k] for k in ("fp32", "bf16", "diff", "combined_se", "changed_pixels")}
    print("precision check (CPU):", json.dumps(figures))
    assert r["changed_pixels"] > 0.01, figures    # bf16 really ran: the samples differ by rounding
    assert r["passes"] is (not plant), figures


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_bf16_compiled_sampling_on_cuda_with_inception_features(tmp_path):
    """The GPU check's version: DiT-B/2 (nudged random weights) through the SD-VAE architecture and the
    Inception architecture (random weights), bf16 compiled against fp32 eager, against a reference of
    other fp32 samples; the figures go to $GPU_CHECK_OUT/precision.json when set."""
    from harness.models.dit import build_model
    from harness.sampling.bench import feature_network, sd_vae
    from harness.sampling.npz import save_npz
    from harness.sampling.sample import balanced_labels, sample_images

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = nudged(build_model("DiT-B/2", "adaLN-Zero", input_size=32, in_channels=4, num_classes=1000)).to(device)
    model.eval()
    ae = sd_vae(os.environ.get("VAE")).to(device)
    extractor = feature_network("inception", os.environ.get("INCEPTION_WEIGHTS"), device)
    # DDIM-10 as on the CPU (25 steps with two fp32 passes ran past 170 s on an H200 before finishing once)
    n, batch, steps = 1024, 256, 10
    labels = balanced_labels(n, 1000)
    ref_images = sample_images(model, None, labels, sampling_steps=steps, sampler="ddim", seed=1, batch_size=batch,
                               autoencoder=ae, guidance_channels="all", cfg_scale=CFG)
    path = save_npz(ref_images, labels, tmp_path / "reference.npz")   # other seeds, fp32: the reference set
    reference = load_reference(str(path), extractor, image_size=256)
    r = fid_pair(model, ae, extractor, reference, n, 1000, steps=steps, cfg_scale=CFG, batch=batch,
                 compile_bf16=True)
    figures = {k: r[k] for k in ("fp32", "bf16", "diff", "combined_se", "changed_pixels")}
    print("precision check (GPU):", json.dumps(figures))
    if os.environ.get("GPU_CHECK_OUT"):
        Path(os.environ["GPU_CHECK_OUT"], "precision.json").write_text(json.dumps(figures, indent=2))
    assert r["changed_pixels"] > 0.01 and r["passes"], figures
