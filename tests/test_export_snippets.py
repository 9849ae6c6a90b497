"""`harness export`: the exported folder's README snippet, run as a user would (from inside the folder), loads
and samples offline -- a DiTPipeline for latent-space runs, the transformer and scheduler for pixel-space runs --
and the pixel-space samples equal the harness's own DDIM sampling of the same weights."""
from __future__ import annotations

import re

import numpy as np
import torch

from harness import cli
from harness.models.diffusion import create_diffusion
from harness.models.dit import build_model
from harness.config.spec import DataSpec, EvalSpec, RunSpec, TrainSpec
from test_interop import MODEL, randomised, vae_run, write_checkpoint
from tolerance import fp32_bound, rel_err


def readme_snippet(folder) -> str:
    (code,) = re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), flags=re.S)
    return code


def run_snippet(folder, monkeypatch) -> dict:
    """Execute the README's Python as written, with the export folder as the working directory."""
    monkeypatch.chdir(folder)
    namespace: dict = {}
    exec(compile(readme_snippet(folder), str(folder / "README.md"), "exec"), namespace)  # noqa: S102 (our own file)
    return namespace


def test_pixel_space_export_samples_like_the_harness(tmp_path, monkeypatch, capsys):
    run = RunSpec(run_id="digits-px", sweep="test", model=MODEL, conditioning="adaLN-Zero", seed=0, data=DataSpec(),
                  train=TrainSpec(steps=1), eval=EvalSpec(at_steps=[1]))
    model = randomised(build_model(MODEL, input_size=8, in_channels=1, num_classes=10))
    ckpt = write_checkpoint(tmp_path, run, model)
    out = tmp_path / "export"
    assert cli.main(["export", str(ckpt.parent.parent), "--to", "diffusers", str(out)]) == 0
    assert "DiTPipeline needs a VAE" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "scheduler", "transformer"]
    theirs = run_snippet(out, monkeypatch)
    assert theirs["images"].dtype == torch.uint8 and tuple(theirs["images"].shape) == (4, 1, 8, 8)

    labels = theirs["labels"]
    noise = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model.t_embedder.freq_shift = 1  # diffusers' timestep frequencies (README: the one documented difference)
    with torch.no_grad():
        ours = create_diffusion("ddim50").ddim_sample_loop(lambda x, t, y: model(x, t, y), tuple(noise.shape),
                                                          noise=noise, model_kwargs={"y": labels})
    # 50 DDIM steps of ~25 differently ordered float32 roundings each
    print(f"pixel export vs harness DDIM-50: relative error {rel_err(theirs['x'], ours):.3g}")
    assert rel_err(theirs["x"], ours) < fp32_bound(50 * 25)


def test_latent_space_export_snippet_loads_the_pipeline_and_samples(tmp_path, monkeypatch):
    run = vae_run(tmp_path)
    ckpt = write_checkpoint(tmp_path, run, randomised(build_model(MODEL, input_size=8, in_channels=4,
                                                                  num_classes=1000)))
    out = tmp_path / "export"
    assert cli.main(["export", str(ckpt), "--to", "diffusers", str(out)]) == 0
    images = run_snippet(out, monkeypatch)["images"]
    assert images.shape == (4, 64, 64, 3) and np.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
