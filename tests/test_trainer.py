"""The Trainer's steps against known answers (issue 16): what it builds from the spec (model, EMA,
optimizer, folder, TF32), how it resumes (checkpoint, RNG states, init_from), what a step reads and
logs (train.jsonl, the job log), when it checkpoints, retains and stops. Tiny real runs on the CPU;
the pure pieces (data order, batches, step randomness) are in test_train_pieces.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.errors import HarnessError
from harness.training.runtime import Dist, derive_seed
from harness.training.train import step_randomness
from tolerance import fp32_bound, rel_err

#: the smallest evaluation that runs every metric: 7 images, one batch, 2 DDPM steps
TINY_EVAL = dict(num_samples=7, batch_size=7, sampler="ddpm", sampling_steps=[2])

def test_the_train_log_line_is_its_known_answers(tmp_path, monkeypatch, caplog):
    """train.jsonl of a real 2-step run: at step 1 the adaLN-Zero model predicts exactly zero noise, so
    the logged mse is the mean square of the step's own noise (from step_randomness); throughput, TFLOP/s
    and the rate follow from each other; the clock is a counter (one tick of 1/1024 s per read), so
    steps_per_s and wall_s are deterministic numbers, not timings."""
    import types

    import harness.training.train as train_mod
    from harness.models.flops import model_gflops
    from harness.io import read_jsonl
    from harness.training.runtime import train_tflops
    from train_tiny import tiny_run

    ticks = iter(range(1000, 10**6))
    clock = types.SimpleNamespace(perf_counter=lambda: next(ticks) / 1024, time=train_mod.time.time,
                                  sleep=train_mod.time.sleep)
    monkeypatch.setattr(train_mod, "time", clock)
    run = tiny_run(steps=2, ckpt_every=100, warmup_steps=4, lr=2e-3)
    caplog.set_level("INFO", logger="harness.training.train")
    train_mod.run_training(run, tmp_path)
    first, second = read_jsonl(tmp_path / "train.jsonl")
    for rec in (first, second):   # the job log's line says the same as train.jsonl
        assert f"step {rec['step']} loss {rec['loss']:.4f} ({rec['steps_per_s']:.2f} steps/s)" in caplog.messages
    noise = step_randomness(run.seed, 1, 16, 1000, (1, 8, 8), run.train.class_dropout, torch.Generator(), 0, 16)[1]
    assert first["mse"] == pytest.approx(noise.double().square().mean().item(), rel=1e-5)
    assert first["loss"] == pytest.approx(first["mse"] + first["vb"], rel=1e-6)
    assert (first["step"], second["step"]) == (1, 2)
    assert (first["lr"], second["lr"]) == pytest.approx((5e-4, 1e-3))     # warmup over 4 steps
    gflops = model_gflops(run.model, run.conditioning, 8, 1, 10)[0]
    for rec in (first, second):
        ticks_per_step = 1024 / rec["steps_per_s"]       # one step over a few ticks of the counter clock
        assert ticks_per_step == pytest.approx(round(ticks_per_step), abs=1e-9) and 1 <= ticks_per_step <= 16
        assert rec["images_per_s"] == pytest.approx(rec["steps_per_s"] * 16, rel=1e-12)
        assert rec["tflops_per_device"] == pytest.approx(train_tflops(gflops, rec["images_per_s"]), rel=1e-12)
        assert rec["micro_batch"] == 16
        if not torch.cuda.is_available():   # on the CPU: no peak to compare with, and compile=auto stays eager
            assert rec["mfu"] is None and rec["compiled"] is False and rec["graphs"] is None and rec["compile_mode"] is None
    assert 0 < first["wall_s"] < second["wall_s"] < 100 / 1024   # ticks since training began


def test_without_gflops_training_goes_on_and_logs_no_tflops(tmp_path, monkeypatch, caplog):
    """Throughput bookkeeping never stops training: if fvcore cannot count the model, train.jsonl says None."""
    import harness.models.flops
    from harness.io import read_jsonl
    from harness.cost.plan import record_run
    from harness.training.train import run_training
    from train_tiny import tiny_run

    def no_count(*args, **kwargs):
        raise RuntimeError("fvcore is not installed")

    record_run(tiny_run(steps=1), tmp_path)   # as a sweep's planner wrote it (it counts the Gflops itself)
    monkeypatch.setattr(harness.models.flops, "model_gflops", no_count)
    run_training(tiny_run(steps=1), tmp_path)
    (line,) = read_jsonl(tmp_path / "train.jsonl")
    assert line["tflops_per_device"] is None and line["mfu"] is None and line["images_per_s"] > 0
    assert ("no Gflops for DiT-2x32x2/2 (fvcore is not installed): train.jsonl records no TFLOP/s"
            in caplog.messages)


def test_a_non_finite_loss_stops_at_the_next_logged_step(tmp_path):
    """Checked at every logged step, not only at checkpoints: nothing is logged past the bad step."""
    from harness.io import read_jsonl
    from harness.training.train import run_training
    from train_tiny import tiny_run

    with pytest.raises(HarnessError) as err:
        run_training(tiny_run(steps=6, lr=1e30, ckpt_every=100), tmp_path)
    assert str(err.value).startswith(f"{tmp_path}: the training loss became NaN or Inf at step 2. Fix:")
    assert [r["step"] for r in read_jsonl(tmp_path / "train.jsonl")] == [1]


def test_the_run_log_says_how_it_trains_and_why_it_stopped(tmp_path, caplog):
    from harness.training.step import attention_backends
    from harness.training.train import run_training
    from train_tiny import tiny_run

    caplog.set_level("INFO", logger="harness.training.train")
    run_training(tiny_run(steps=4, ckpt_every=100), tmp_path, stop_at=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "harness.training.train"]
    assert ("training tiny: per-GPU batch 16 in micro-batches of 16 (global batch 16 over 1 rank), fp32, eager, "
            "attention: "
            f"{attention_backends(torch.device('cpu'), 'fp32')}") in lines
    assert lines[-1] == "stopping at step 2 as asked (stop_at)"


def test_a_checkpoint_and_done_record_what_wrote_them(tmp_path):
    """The checkpoint carries the run's spec and the world size beside the weights; `done` its step and time."""
    import json
    import time

    from harness.training.train import run_training
    from train_tiny import final_state, tiny_run

    run = tiny_run(steps=2, ckpt_every=100)
    before = time.time()
    run_training(run, tmp_path)
    state = final_state(tmp_path, 2)
    assert (state["step"], state["data_pos"], state["world_size"]) == (2, 2 * run.train.global_batch, 1)
    assert state["run"] == run.to_dict()
    done = json.loads((tmp_path / "done").read_text())
    assert done["step"] == 2 and before <= done["time"] <= time.time()


def test_the_training_arrays_are_the_runs_own_image_folder_and_autoencoder(tmp_path, monkeypatch):
    """An image folder run trains on the cache of data.path (its ${VAR} expanded) at data.image_size; a VAE
    run loads its weights from data.autoencoder_path (none there: the error names that folder)."""
    from dataclasses import replace

    from PIL import Image

    from harness.data.datasets import ImageFolder
    from harness.config.spec import DataSpec
    from harness.training.train import load_training_arrays
    from train_tiny import tiny_run

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    monkeypatch.setenv("IMAGES", str(tmp_path / "imgs"))
    data = DataSpec(dataset="imagefolder", path="${IMAGES}", image_size=8, num_classes=2)
    latents, labels = load_training_arrays(replace(tiny_run(), data=data))
    folder = ImageFolder(tmp_path / "imgs", 8)
    assert latents.shape == (6, 2, 3, 8, 8) and labels.tolist() == folder.labels.tolist() == [0, 0, 0, 1, 1, 1]
    for i in range(6):   # the identity autoencoder: each image's pixels, and its mirror image, stored float32 as
        # the folder gives them (the same decode, resize and x / 127.5 - 1; encode returns its input): exact
        assert np.array_equal(latents[i, 0], folder[i][0].numpy())
        assert np.array_equal(latents[i, 1], folder[i][0].numpy()[..., ::-1])
    vae = replace(data, autoencoder="sd-vae-ft-ema", autoencoder_path=str(tmp_path / "no-vae"))
    with pytest.raises(HarnessError) as err:
        load_training_arrays(replace(tiny_run(), data=vae))
    assert str(err.value).startswith(f"{tmp_path / 'no-vae'}: no sd-vae-ft-ema weights here")


def test_a_second_trainer_waits_for_the_run_folders_lock(tmp_path, caplog):
    """One trainer per run folder: while another process holds RUN_DIR's lock, training waits and writes
    nothing; once it is released, the run trains to the end."""
    import threading
    import time

    from harness.io import file_lock
    from harness.config.layout import RunFolder
    from harness.training.train import run_training
    from train_tiny import tiny_run

    folder = RunFolder(tmp_path)
    caplog.set_level("WARNING", logger="harness.io")
    waiting = f"{folder.lock} is held by another process; waiting for it"
    with file_lock(folder.lock):
        trainer = threading.Thread(target=run_training, args=(tiny_run(steps=1), tmp_path))
        trainer.start()
        deadline = time.monotonic() + 60
        while waiting not in caplog.messages and trainer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waiting in caplog.messages
        assert not folder.train_log.exists() and not folder.checkpoints.exists()
    trainer.join(120)
    assert not trainer.is_alive() and folder.done.exists()


def test_the_trainer_refuses_a_batch_its_ranks_cannot_split_and_sets_tf32_only_for_cuda(tmp_path):
    """Built in this process with a stand-in Dist (world 3: no process group is joined before the check).
    On the CPU the global TF32 switches stay as they were (tests/test_cuda.py checks they are set on a GPU)."""
    from harness.training.train import Trainer
    from train_tiny import tf32_off, tiny_run

    with pytest.raises(HarnessError) as err:
        Trainer(tiny_run(), tmp_path, Dist(rank=0, world=3))
    assert str(err.value) == (f"{tmp_path}/run.json: train.global_batch: 16 does not split over 3 ranks. "
                              "Fix: use a multiple of 3.")
    with tf32_off():
        trainer = Trainer(tiny_run(), tmp_path / "runs" / "new", Dist())   # its folder made, parents too
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    assert (tmp_path / "runs" / "new" / "run.json").exists()
    assert (trainer.geometry.per_rank, trainer.step, trainer.data_pos, trainer.shape) == (16, 0, 0, (1, 8, 8))
    assert (trainer.geometry.global_batch, trainer.geometry.ranks) == (16, 1)


def test_an_evaluation_only_trainer_takes_its_shape_from_the_spec_and_reads_no_data(tmp_path, monkeypatch):
    """train.steps 0 (evaluating train.init_from's weights): no latent cache is opened or built."""
    import harness.training.train as train_mod
    from train_tiny import tiny_run

    monkeypatch.setattr(train_mod, "load_training_arrays", lambda run: pytest.fail("read the training data"))
    trainer = train_mod.Trainer(tiny_run(steps=0), tmp_path, Dist())
    assert trainer.shape == (1, 8, 8) and trainer.latents is None and trainer.order.n == 0


def test_the_trainer_builds_the_spec_s_model_ema_and_optimizer(tmp_path, monkeypatch):
    """The model of the run's name and conditioning, initialised under derive_seed(seed, 0), its label dropout
    the spec's; the EMA a frozen copy in eval mode; AdamW with the spec's weight decay (its learning rate is
    set at every step, from the warmup schedule); the wait for rank 0's latent cache bounded and explained."""
    from dataclasses import replace

    import harness.training.train as train_mod
    from harness.models.dit import build_model
    from harness.training.runtime import seed_everything
    from train_tiny import tiny_run

    waits = []
    monkeypatch.setattr(train_mod, "bounded_barrier", lambda dist, why, timeout: waits.append((dist.world, why, timeout)))
    base = tiny_run(weight_decay=0.03, class_dropout=0.25)
    run = replace(base, conditioning="in-context", seed=5)
    trainer = train_mod.Trainer(run, tmp_path, Dist())
    assert waits == [(1, "waiting for rank 0 to build the latent cache", train_mod.LATENT_BUILD_TIMEOUT)]
    seed_everything(derive_seed(5, 0))
    expected = build_model(run.model, "in-context", input_size=8, in_channels=1, num_classes=10, class_dropout_prob=0.25)
    assert trainer.model.conditioning == "in-context" and trainer.model.y_embedder.dropout == 0.25
    assert trainer.model.state_dict().keys() == expected.state_dict().keys()
    for name, w in expected.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], w), name
        assert torch.equal(trainer.ema.state_dict()[name], w), name
    assert not trainer.ema.training and not any(p.requires_grad for p in trainer.ema.parameters())
    assert [p.requires_grad for p in trainer.model.parameters()] == [p.requires_grad for p in expected.parameters()]
    assert [g["weight_decay"] for g in trainer.opt.param_groups] == [0.03]
    other = train_mod.Trainer(replace(run, seed=6), tmp_path / "other", Dist())
    assert not torch.equal(other.model.x_embedder.proj.weight, trainer.model.x_embedder.proj.weight)


def test_a_resumed_run_says_which_checkpoint_it_resumed(tmp_path, caplog):
    from harness.models.checkpoint import checkpoint_path
    from harness.training.train import run_training
    from train_tiny import tiny_run

    run_training(tiny_run(steps=4), tmp_path, stop_at=2)
    caplog.set_level("INFO", logger="harness.training.train")
    run_training(tiny_run(steps=4), tmp_path)
    assert f"resumed {checkpoint_path(tmp_path / 'checkpoints', 2)} at step 2" in caplog.messages


def test_resume_restores_the_global_rngs_of_the_checkpoint_and_a_fresh_run_seeds_them(tmp_path):
    """One rank: the global torch/numpy/python RNGs continue from the checkpoint's saved state; a fresh run
    seeds them from (seed, rank). Nothing in today's step draws from them (step_randomness has its own
    generator), but a model with dropout would."""
    import random

    from dataclasses import replace

    from harness.training.runtime import seed_everything, set_rng_state
    from harness.training.train import Trainer, run_training
    from train_tiny import final_state, tiny_run

    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    fresh = Trainer(replace(tiny_run(steps=4), seed=3), tmp_path / "fresh", Dist())
    fresh.resume()
    got = draws()
    seed_everything(derive_seed(3, 0))   # (seed, rank); derive_seed(3) is the same (trailing zeros), (0, 3) is not
    assert got == draws()
    run_training(tiny_run(steps=4), tmp_path / "run", stop_at=2)
    resumed = Trainer(tiny_run(steps=4), tmp_path / "run", Dist())
    resumed.resume()
    got = draws()
    set_rng_state(final_state(tmp_path / "run", 2)["rng"])
    assert resumed.step == 2 and got == draws()


def test_train_init_from_starts_model_and_ema_from_its_weights_and_steps_0_evaluates_them(tmp_path):
    """init_from a harness checkpoint: the new run's model and EMA both start from its EMA weights, with a
    fresh optimizer; with train.steps 0 the run only evaluates them, at step 0, from memory (no checkpoint)."""
    from harness.models.checkpoint import checkpoint_path
    from harness.io import read_jsonl
    from harness.training.train import Trainer, run_training
    from train_tiny import final_state, tiny_run

    run_training(tiny_run(steps=2), tmp_path / "source")
    source = checkpoint_path(tmp_path / "source" / "checkpoints", 2)
    ema = final_state(tmp_path / "source", 2)["ema"]
    fine_tune = Trainer(tiny_run(steps=4, init_from=str(source)), tmp_path / "fine-tune", Dist())
    fine_tune.resume()
    for net in (fine_tune.model, fine_tune.ema):   # pos_embed: the model keeps its own fixed sin-cos table
        assert all(torch.equal(w, ema[k]) for k, w in net.state_dict().items() if k != "pos_embed")
        # the EMA's copy of the fixed table (values in [-1, 1]) drifts by rounding: 3 a step, 2 steps
        assert rel_err(net.pos_embed, ema["pos_embed"]) <= fp32_bound(6)
    assert fine_tune.step == 0 and fine_tune.opt.state_dict()["state"] == {}
    evaluate = tiny_run(steps=0, init_from=str(source), at_steps=[0],
                        eval=TINY_EVAL)
    run_training(evaluate, tmp_path / "evaluate")
    assert [r["step"] for r in read_jsonl(tmp_path / "evaluate" / "eval.jsonl")] == [0]
    assert not (tmp_path / "evaluate" / "checkpoints").exists() or not any((tmp_path / "evaluate" / "checkpoints").iterdir())


def test_prepare_step_applies_grad_checkpointing_and_keys_the_auto_micro_batch_by_configuration(tmp_path, monkeypatch):
    """train.grad_checkpointing reaches the model; micro_batch 'auto' is probed once and cached under the
    key of this model, block, shape, classes, device, precision, compilation and per-GPU batch."""
    import json

    from harness.training.microbatch import _cache_file, cache_key
    from harness.training.train import Trainer
    from train_tiny import tiny_run

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    trainer = Trainer(tiny_run(grad_checkpointing=True, micro_batch="auto"), tmp_path / "run", Dist())
    trainer.prepare_step()
    assert trainer.model.grad_checkpointing is True and trainer.model.training
    key = cache_key("DiT-2x32x2/2", "adaLN-Zero", (1, 8, 8), 10, torch.device("cpu"), "fp32", False, 16)
    assert json.loads(_cache_file().read_text()) == {key: trainer.train_step.micro_batch}


def test_a_finished_run_called_again_only_writes_a_missing_done(tmp_path, caplog):
    """Killed after its last checkpoint but before `done`: the next call writes done with the final step,
    and neither call builds the training step again."""
    import json

    from harness.training.train import run_training
    from train_tiny import tiny_run

    run_training(tiny_run(steps=2), tmp_path)
    (tmp_path / "done").unlink()
    caplog.set_level("INFO", logger="harness.training.train")
    run_training(tiny_run(steps=2), tmp_path)
    assert json.loads((tmp_path / "done").read_text())["step"] == 2
    assert not [m for m in caplog.messages if m.startswith("training tiny")]


def test_data_flip_reaches_the_batches_the_model_trains_on(tmp_path):
    """data.flip on and off train different weights from the same seed (16 draws: some images are mirrored)."""
    from dataclasses import replace

    from harness.training.train import run_training
    from train_tiny import final_state, tiny_run

    for flip in (True, False):
        run = tiny_run(steps=2)
        run_training(replace(run, data=replace(run.data, flip=flip)), tmp_path / str(flip))
    on, off = final_state(tmp_path / "True", 2)["model"], final_state(tmp_path / "False", 2)["model"]
    assert not torch.equal(on["x_embedder.proj.weight"], off["x_embedder.proj.weight"])


def test_the_logged_loss_is_the_exact_mean_of_its_window_and_the_test_delay_sleeps_each_step(tmp_path, monkeypatch):
    """Step losses are summed in float64: a spike of 1e8 followed by three steps of 1 logs (1e8 + 3) / 4
    exactly (a float32 sum would drop the ones). The step itself is replaced by one that returns these
    losses (the accumulation and the log line are what is tested). HARNESS_TEST_STEP_DELAY_S sleeps
    before every step (the kill and requeue tests rely on it)."""
    import types

    import harness.training.step as step_mod
    import harness.training.train as train_mod
    from harness.io import read_jsonl
    from train_tiny import tiny_run

    losses = iter([1e8, 1.0, 1.0, 1.0])
    monkeypatch.setattr(step_mod.TrainStep, "__call__",
                        lambda self, batch, lr: torch.full((3,), next(losses) * 16, dtype=torch.float32))
    slept = []
    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(
        perf_counter=train_mod.time.perf_counter, time=train_mod.time.time, sleep=slept.append))
    monkeypatch.setenv(train_mod.STEP_DELAY_ENV, "0.25")
    train_mod.run_training(tiny_run(steps=4, log_every=4, ckpt_every=100), tmp_path)
    (line,) = read_jsonl(tmp_path / "train.jsonl")
    assert line["step"] == 4 and line["loss"] == line["mse"] == line["vb"] == (1e8 + 3) / 4
    assert slept == [0.25] * 4


def test_retention_keeps_the_newest_checkpoints_and_those_at_the_evaluation_steps(tmp_path):
    """keep_last 1 with eval.at_steps [2]: of the checkpoints at 2, 4, 6, 8, steps 2 (evaluated, so its
    weights stay for later evaluation settings) and 8 (the newest) remain."""
    from harness.models.checkpoint import list_checkpoints
    from harness.training.train import run_training
    from train_tiny import tiny_run

    run_training(tiny_run(steps=8, ckpt_every=2, keep_last=1, at_steps=[2],
                          eval=TINY_EVAL), tmp_path)
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [2, 8]
