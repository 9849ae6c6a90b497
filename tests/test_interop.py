"""diffusers and official weights in and out: exact maps, DiTPipeline round trip, import, init_from, samplers.

Everything is built here (a tiny DiT, a tiny AutoencoderKL) and loaded offline from tmp folders.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import cli
from harness.models.checkpoint import save_checkpoint
from harness.models.diffusion import create_diffusion, guided_model_fn
from harness.errors import HarnessError
from harness.interop.convert import (diffusers_config, from_diffusers_state_dict, import_weights, read_source,
                             to_diffusers_state_dict)
from harness.models.dit import build_model
from harness.training.runtime import rng_state
from harness.config.vocab import SAMPLERS
from harness.sampling.samplers import DIFFUSERS_SCHEDULERS, model_evaluations, provenance, sample_loop
from harness.config.spec import DataSpec, EvalSpec, RunSpec, TrainSpec, load_spec
from test_autoencoder import tiny_vae
from tolerance import fp32_bound, rel_err

EXE = Path(sys.executable).with_name("harness")
MODEL = "DiT-2x32x2/2"
# float32 roundings one forward of the tiny DiT may take in another order in another code or kernel (ten DDIM
# steps below are bounded by 256 of them, ~25 a step): 64 for one forward, and measured 0 on this machine
FORWARD = 64


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random (the zero-initialised adaLN and final layers too), so outputs depend on all."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def vae_run(tmp_path: Path, num_classes: int = 1000, conditioning: str = "adaLN-Zero") -> RunSpec:
    """A run in the latent space of a tiny SD-style VAE saved to tmp: 64 px -> 4 x 8 x 8 latents."""
    vae_dir = tmp_path / "vae"
    if not vae_dir.exists():
        tiny_vae().save_pretrained(vae_dir)
    data = DataSpec(dataset="imagefolder", path=str(tmp_path / "absent"), image_size=64, autoencoder="sd-vae-ft-ema",
                    autoencoder_path=str(vae_dir), num_classes=num_classes)
    return RunSpec(run_id="tiny-vae", sweep="test", model=MODEL, conditioning=conditioning, seed=0, data=data,
                   train=TrainSpec(steps=1), eval=EvalSpec(at_steps=[1]))


def write_checkpoint(tmp_path: Path, run: RunSpec, model: torch.nn.Module) -> Path:
    sd = model.state_dict()
    return save_checkpoint(tmp_path / "run" / "checkpoints", 1, {
        "model": {k: v + 1 for k, v in sd.items()}, "ema": sd, "opt": {}, "step": 1, "rng": rng_state(),
        "data_pos": 0, "run": run.to_dict()})


def test_state_dict_maps_exactly_and_only_the_timestep_frequencies_differ():
    from diffusers import DiTTransformer2DModel

    ours = randomised(build_model(MODEL, input_size=8, in_channels=4, num_classes=10))
    theirs = DiTTransformer2DModel(**diffusers_config(ours)).eval()
    missing, unexpected = theirs.load_state_dict(to_diffusers_state_dict(ours.state_dict(), 2), strict=False)
    assert missing == [] and unexpected == []  # pos_embed: a non-persistent table diffusers rebuilds
    back = from_diffusers_state_dict(theirs.state_dict(), 2, "test")
    assert set(back) == set(ours.state_dict()) - {"pos_embed"}
    assert all(torch.equal(back[k], ours.state_dict()[k]) for k in back)
    assert torch.equal(theirs.pos_embed.pos_embed, ours.pos_embed)

    x, y = torch.randn(4, 4, 8, 8), torch.tensor([0, 3, 9, 10])  # 10: the null class
    t = torch.tensor([999, 500, 20, 1])
    with torch.no_grad():
        ref = theirs(x, timestep=t, class_labels=y).sample
        stock_gap = rel_err(ours(x, t, y), ref)
        # one forward of each code, relative to the outputs' scale: FORWARD roundings in another order
        assert rel_err(ours(x, torch.zeros_like(t), y),
                       theirs(x, timestep=torch.zeros_like(t), class_labels=y).sample) < fp32_bound(FORWARD)
        ours.t_embedder.freq_shift = 1  # diffusers' frequency spacing: then the codes agree everywhere
        assert rel_err(ours(x, t, y), ref) < fp32_bound(FORWARD)
    assert stock_gap > 1e-3  # the documented difference is real for t > 0, not a mapping error (0.14 measured)


def _pipeline_latents(pipe, labels, seeds, steps, cfg):
    """DiTPipeline's latents just before the VAE decode (the decode input times the scaling factor)."""
    seen = []
    decode = pipe.vae.decode

    def spy(z, *a, **k):
        seen.append(z.clone())
        return decode(z, *a, **k)

    pipe.vae.decode = spy
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    pipe(class_labels=labels, guidance_scale=cfg, generator=gens, num_inference_steps=steps, output_type="pt")
    return seen[0] * pipe.vae.config.scaling_factor


@pytest.mark.parametrize("cfg", [1.0, 1.5])
def test_export_loads_in_dit_pipeline_and_ddim_matches_ours(tmp_path, cfg):
    from diffusers import DiTPipeline

    run = vae_run(tmp_path)
    model = randomised(build_model(MODEL, input_size=8, in_channels=4, num_classes=1000))
    ckpt = write_checkpoint(tmp_path, run, model)
    out = tmp_path / "export"
    assert cli.main(["export", str(ckpt.parent.parent), "--to", "diffusers", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model_index.json", "scheduler", "transformer", "vae"]
    pipe = DiTPipeline.from_pretrained(out, local_files_only=True)
    labels, seeds, steps = [1, 7, 999], [11, 12, 13], 10
    theirs = _pipeline_latents(pipe, labels, seeds, steps, cfg)

    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    y = torch.tensor(labels)
    diffusion = create_diffusion(f"ddim{steps}")  # DDIMScheduler's "leading" spacing: 0, 100, ..., 900
    net = lambda x, t, y: model(x, t, y)  # noqa: E731
    fn = guided_model_fn(net, cfg, None) if cfg != 1.0 else net  # DiTPipeline guides every latent channel
    if cfg != 1.0:
        noise, y = torch.cat([noise, noise]), torch.cat([y, torch.full_like(y, 1000)])
    with torch.no_grad():
        stock = diffusion.ddim_sample_loop(fn, tuple(noise.shape), noise=noise, model_kwargs={"y": y})[:3]
        model.t_embedder.freq_shift = 1
        same_code = diffusion.ddim_sample_loop(fn, tuple(noise.shape), noise=noise, model_kwargs={"y": y})[:3]
    # Ten DDIM steps of a random model: the latents reach ~100s, so a float32 reordering anywhere moves
    # them by ~1e-4 absolute; relative to their scale the two codes agree to a few dozen roundings (~1e-6
    # measured), and 256 roundings bounds ten steps of ~25 differently ordered roundings each.
    assert rel_err(same_code, theirs) < fp32_bound(256)
    print(f"cfg {cfg}: max |latent difference| / scale, ours (official frequencies) vs DiTPipeline: "
          f"{rel_err(stock, theirs):.3g} (same frequencies: {rel_err(same_code, theirs):.3g})")


@pytest.mark.slow
def test_export_refuses_blocks_diffusers_lacks_and_keeps_no_folder(tmp_path):
    run = vae_run(tmp_path, conditioning="cross-attention")
    ckpt = write_checkpoint(tmp_path, run, build_model(MODEL, "cross-attention", input_size=8, in_channels=4,
                                                       num_classes=1000))
    proc = subprocess.run([str(EXE), "export", str(ckpt), "--to", "diffusers", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cross-attention" in proc.stderr and "no diffusers counterpart" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_import_from_diffusers_and_official_gives_the_same_outputs(tmp_path):
    from diffusers import DiTTransformer2DModel

    src = randomised(build_model(MODEL, input_size=8, in_channels=4, num_classes=10), seed=3)
    theirs = DiTTransformer2DModel(**diffusers_config(src)).eval()
    theirs.load_state_dict(to_diffusers_state_dict(src.state_dict(), 2), strict=False)
    theirs.save_pretrained(tmp_path / "hf" / "transformer")
    official = tmp_path / "official.pt"
    torch.save(src.state_dict(), official)  # the released checkpoints are plain state dicts in our layout

    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([900, 40, 3]), torch.tensor([1, 2, 10])
    for source, fmt, ref_fn, shift in ((tmp_path / "hf", "diffusers", lambda: theirs(x, timestep=t, class_labels=y).sample, 1),
                                       (official, "official", lambda: src(x, t, y), 0)):
        out = tmp_path / f"{fmt}.pt"
        assert cli.main(["import", str(source), "--from", fmt, str(out)]) == 0
        model = build_model(MODEL, input_size=8, in_channels=4, num_classes=10).eval()
        sd = torch.load(out, weights_only=True)
        sd["pos_embed"] = model.pos_embed.detach()
        model.load_state_dict(sd)
        model.t_embedder.freq_shift = shift  # a diffusers source runs with diffusers' frequencies
        with torch.no_grad():
            assert rel_err(model(x, t, y), ref_fn()) < fp32_bound(FORWARD), fmt


def test_corrupt_and_wrong_sources_get_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(HarnessError, match=r"bad\.pt: cannot be read as a weights file"):
        read_source(bad)
    with pytest.raises(HarnessError, match="no such file"):
        read_source(tmp_path / "absent.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HarnessError, match="not a diffusers DiT folder"):
        import_weights(tmp_path / "empty", "diffusers", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


# ----------------------------------------------------------------------------- init_from in a sweep
SWEEP = """name: {name}
models: [{model}]
conditioning: [{block}]
data: {{dataset: digits, image_size: 8, autoencoder: identity, num_classes: 10, flip: false}}
train: {{steps: {steps}, global_batch: 16, lr: 1.0e-3, ema_decay: 0.9, ckpt_every: 2, log_every: 1, init_from: {src}}}
eval: {{at_steps: {at}, num_samples: 20, sampling_steps: [3], sampler: {sampler}, cfg_scales: [1.0],
       metrics: [fid], features: digits, reference: digits, batch_size: 20}}
launcher: {{kind: debug}}
"""


def sweep_file(tmp_path: Path, name: str, src: Path, model: str = MODEL, block: str = "adaLN-Zero", steps: int = 2,
               at: str = "[0, 2]", sampler: str = "ddim") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SWEEP.format(name=name, model=model, block=block, steps=steps, src=src, at=at, sampler=sampler))
    return path


@pytest.fixture
def digits_weights(tmp_path):
    """A diffusers folder of a digits DiT, imported with `harness import` (the writer init_from reads)."""
    from diffusers import DiTTransformer2DModel

    src = randomised(build_model(MODEL, input_size=8, in_channels=1, num_classes=10), seed=5)
    theirs = DiTTransformer2DModel(**diffusers_config(src))
    theirs.load_state_dict(to_diffusers_state_dict(src.state_dict(), 2), strict=False)
    theirs.save_pretrained(tmp_path / "hf")
    return import_weights(tmp_path / "hf", "diffusers", tmp_path / "weights.pt")


@pytest.mark.slow
def test_sweep_with_init_from_fine_tunes_and_evaluates(tmp_path, digits_weights):
    from harness.launch.dispatch import dispatch

    spec = load_spec(sweep_file(tmp_path, "ft", digits_weights, sampler="dpm-solver++"))
    [status] = dispatch(spec, tmp_path / "results", "debug")
    assert status.state == "done", status
    records = [json.loads(line) for line in (status.dir / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2]
    assert all(np.isfinite(r["fid"]) for r in records)
    assert records[0]["sampler_impl"] == "diffusers.DPMSolverMultistepScheduler"
    assert records[0]["model_evaluations"] == 3
    moved = tmp_path / "moved" / "w.pt"
    moved.parent.mkdir()
    shutil.copy(digits_weights, moved)
    assert load_spec(sweep_file(tmp_path, "ft2", moved)).expand()[0].run_id == spec.expand()[0].run_id
    sd = torch.load(digits_weights, weights_only=True)
    sd["final_layer.linear.bias"] += 1
    torch.save(sd, moved)
    assert load_spec(sweep_file(tmp_path, "ft3", moved)).expand()[0].run_id != spec.expand()[0].run_id


def test_eval_only_sweep_trains_nothing_and_records_step_0(tmp_path, digits_weights):
    from harness.launch.dispatch import dispatch

    spec = load_spec(sweep_file(tmp_path, "ev", digits_weights, steps=0, at="[0]"))
    [status] = dispatch(spec, tmp_path / "results", "debug")
    assert status.state == "done", status
    [rec] = [json.loads(line) for line in (status.dir / "eval.jsonl").read_text().splitlines()]
    assert rec["step"] == 0 and np.isfinite(rec["fid"]) and rec["sampler_impl"].startswith("harness.")
    assert not (status.dir / "checkpoints").exists() or not list((status.dir / "checkpoints").glob("*.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("case,match", [
    ("shape", r"weights\.pt: blocks\.0\.\S+ has shape \[\d+.*\], run \S+ \(DiT-2x64x2/2, adaLN-Zero\) wants \["),
    ("block", r"weights\.pt: holds the 'adaLN-Zero' block, but run .* asks for 'adaLN'"),
    ("corrupt", r"weights\.pt: cannot be read as a weights file"),
    ("missing", r"absent\.pt: no such file or folder"),
])
def test_bad_init_from_is_one_line_and_writes_nothing(tmp_path, digits_weights, case, match):
    src = digits_weights
    model, block = MODEL, "adaLN-Zero"
    if case == "shape":
        model = "DiT-2x64x2/2"
    elif case == "block":
        block = "adaLN"
    elif case == "corrupt":
        src.write_bytes(src.read_bytes()[:200])
    else:
        src = tmp_path / "absent.pt"
    path = sweep_file(tmp_path, "bad", src, model=model, block=block)
    proc = subprocess.run([str(EXE), "sweep", str(path), "--results", str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "train.init_from" in proc.stderr
    assert __import__("re").search(match, proc.stderr), proc.stderr
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------- samplers
def test_every_sampler_recovers_a_point_mass(tmp_path):
    """With the exact epsilon of data = one point c, every sampler must land on c: checks timesteps,
    input scaling and the update of each scheduler against our process."""
    c = torch.tensor([0.5, -0.25, 0.8]).reshape(1, 3, 1, 1)
    acp = torch.as_tensor(create_diffusion(None).alphas_cumprod, dtype=torch.float64)

    def exact_eps(x, t, y):
        a = torch.as_tensor(np.interp(t.double().cpu().numpy(), np.arange(1000), acp.numpy())).reshape(-1, 1, 1, 1)
        return ((x.double() - a.sqrt() * c) / (1 - a).sqrt()).float()

    noise = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    for sampler in SAMPLERS:
        x0 = sample_loop(sampler, exact_eps, noise, 25, {"y": torch.zeros(4, dtype=torch.long)}, learn_sigma=False,
                         generator=torch.Generator().manual_seed(1))
        err = (x0 - c).abs().max().item()
        assert err < 0.05, f"{sampler}: {err}"


def test_diffusers_schedulers_share_our_process():
    """samplers.PROCESS and the exported scheduler's config derive from harness.models.diffusion: every
    diffusers scheduler they build has our alphas_cumprod (diffusers' are float32: each beta rounded
    once, then a product of T factors rounded once each, so 2T roundings)."""
    from diffusers import DDIMScheduler

    from harness.interop.convert import SCHEDULER_CONFIG
    from harness.sampling.samplers import make_scheduler

    ours = create_diffusion(None).alphas_cumprod
    for scheduler in [DDIMScheduler(**SCHEDULER_CONFIG)] + [make_scheduler(s) for s in DIFFUSERS_SCHEDULERS]:
        theirs = scheduler.alphas_cumprod.double().numpy()
        assert rel_err(theirs, ours) <= fp32_bound(2 * len(ours)), type(scheduler).__name__


def test_sampler_records_name_implementation_and_compute():
    assert set(DIFFUSERS_SCHEDULERS) <= set(SAMPLERS)
    import diffusers

    assert provenance("unipc") == {"sampler_impl": "diffusers.UniPCMultistepScheduler",
                                   "sampler_version": diffusers.__version__}
    assert provenance("ddim")["sampler_impl"] == "harness.models.diffusion.ddim_sample_loop"
    assert model_evaluations("heun", 10) == 19 and model_evaluations("dpm-solver++", 10) == 10


def test_reproduce_spec_needs_the_official_checkpoint_and_checks_it(tmp_path, monkeypatch):
    from harness.launch.preflight import require_init_weights

    spec = Path(__file__).resolve().parent.parent / "sweeps" / "reproduce.yaml"
    monkeypatch.delenv("DIT_XL_2_256", raising=False)
    with pytest.raises(HarnessError, match=r"reproduce\.yaml:\d+: train\.init_from: .*unset environment variable "
                                           r"DIT_XL_2_256\. Fix: export DIT_XL_2_256="):
        load_spec(spec)
    small = tmp_path / "small.pt"
    torch.save(build_model(MODEL, input_size=32, in_channels=4).state_dict(), small)
    monkeypatch.setenv("DIT_XL_2_256", str(small))
    loaded = load_spec(spec)   # the spec layer is torch-free: whether the weights fit is pre-flight's question
    with pytest.raises(HarnessError, match=r"reproduce\.yaml: train\.init_from: .*small\.pt: .* has shape \[192\], "
                                           r"run .*DiT-XL/2.* wants \[6912\]"):
        require_init_weights(loaded)


def test_sampler_comparison_sweeps_reuse_the_mini_runs():
    sweeps = Path(__file__).resolve().parent.parent / "sweeps"
    mini = {r.run_id for r in load_spec(sweeps / "mini.yaml").expand()}
    ddim, dpm = (load_spec(sweeps / f"mini-sampler-{k}.yaml") for k in ("ddim", "dpm"))
    assert (ddim.eval.sampler, dpm.eval.sampler) == ("ddim", "dpm-solver++")
    assert ddim.eval.sampling_steps == dpm.eval.sampling_steps  # equal model evaluations, step for step
    assert {r.run_id for r in ddim.expand()} == {r.run_id for r in dpm.expand()} <= mini
