"""The training loop's pieces against known answers (issue 16): the warmup schedule, the batches a rank
reads (which samples, which flips, which labels, which slice), the step's timesteps, noise and label
drops, and the NaN stop's message. Tiny in-memory arrays; no training."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harness.errors import HarnessError
from harness.runtime import Dist, derive_seed
from harness.train import _TAG_EPOCH, _TAG_STEP, _NO_BAD, BatchSource, DataOrder, _check_finite, _lr_at, \
    step_randomness


def test_warmup_is_linear_to_the_spec_rate_then_flat():
    assert [_lr_at(s, 1e-4, 4) for s in (1, 2, 3, 4, 5, 100)] == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4, 1e-4],
                                                                               rel=1e-12)
    assert _lr_at(1, 3e-4, 0) == 3e-4 and _lr_at(7, 3e-4, -1) == 3e-4   # no warmup: the rate from step 1
    assert _lr_at(1, 1e-4, 1) == 1e-4


def test_an_epoch_is_a_seeded_permutation_with_seeded_flips():
    order = DataOrder(10, seed=3)
    g = torch.Generator().manual_seed(derive_seed(3, _TAG_EPOCH, 2))
    perm, flips = torch.randperm(10, generator=g).numpy(), torch.randint(0, 2, (10,), generator=g).numpy()
    got = order.epoch(2)
    assert np.array_equal(got[0], perm) and np.array_equal(got[1], flips)
    idx, flip = order.take(25, 7)   # positions 25..31: the rest of epoch 2, then epoch 3
    assert np.array_equal(idx[:5], perm[5:]) and np.array_equal(flip[:5], flips[5:])
    assert np.array_equal(idx[5:], order.epoch(3)[0][:2]) and idx.dtype == np.int64
    assert sorted(order.take(20, 10)[0].tolist()) == list(range(10))


def _arrays(n=12, c=2, s=3):
    """latents (N, 2, C, S, S): [i, 0] filled with i, [i, 1] (the flipped copy) with -i; labels 100 + i."""
    lat = np.zeros((n, 2, c, s, s), np.float32)
    for i in range(n):
        lat[i, 0], lat[i, 1] = i, -i
    return lat, np.arange(100, 100 + n)


@pytest.mark.parametrize("flip", [True, False])
def test_a_rank_reads_its_slice_of_the_global_batch_in_the_data_order(flip):
    lat, labels = _arrays()
    order = DataOrder(12, seed=5)
    idx, flips = order.take(8, 6)
    want_x = np.stack([lat[i, f if flip else 0] for i, f in zip(idx, flips)])
    for world in (1, 2, 3):
        xs, ys = [], []
        for rank in range(world):
            src = BatchSource(lat, labels, DataOrder(12, seed=5), 6, Dist(rank=rank, world=world), flip)
            x, y = src.get(8)
            src.close()
            assert x.shape == (6 // world, 2, 3, 3) and x.dtype == torch.float32 and y.dtype == torch.int64
            xs.append(x)
            ys.append(y)
        assert np.array_equal(torch.cat(xs).numpy(), want_x)
        assert torch.cat(ys).tolist() == (100 + idx).tolist()
    if flip:
        assert flips.any() and not flips.all()   # both halves show up in this draw


def test_the_prefetched_batch_is_the_batch_that_was_asked_for():
    lat, labels = _arrays()
    src = BatchSource(lat, labels, DataOrder(12, seed=1), 4, Dist(), True)
    first = src.get(0)
    second = src.get(4)            # served by the read started during get(0)
    out_of_order = src.get(40)     # not the prefetched one: read directly
    src.close()
    fresh = BatchSource(lat, labels, DataOrder(12, seed=1), 4, Dist(), True)
    for pos, got in ((0, first), (4, second), (40, out_of_order)):
        want = fresh._read(pos)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    fresh.close()


def test_each_batch_is_read_once_the_next_one_ahead_and_close_waits_for_the_read_in_flight():
    """get(p) serves the read started by the get before it and starts the read of p + global batch; close()
    returns only once that read is over (no thread touches the cache after training returns)."""
    import threading
    import time

    lat, labels = _arrays()
    src = BatchSource(lat, labels, DataOrder(12, seed=1), 4, Dist(), True)
    reads, read = [], src._read
    started, release = threading.Event(), threading.Event()

    def logged(pos):
        reads.append(pos)
        if pos == 12:   # the read started by get(8): still running when close() is called
            started.set()
            release.wait(5)
            time.sleep(0.2)
        return read(pos)

    src._read = logged
    for pos in (0, 4, 8):
        src.get(pos)
    assert started.wait(5)   # running, not queued (close cancels only queued reads)
    release.set()
    src.close()
    assert reads == [0, 4, 8, 12] and all(not t.is_alive() for t in src._pool._threads)


def test_step_randomness_is_one_draw_for_the_global_batch_sliced_per_rank():
    gen = torch.Generator()
    whole = step_randomness(7, 3, 8, 1000, (2, 4, 4), 0.5, gen, 0, 8)
    parts = [step_randomness(7, 3, 8, 1000, (2, 4, 4), 0.5, gen, lo, lo + 2) for lo in (0, 2, 4, 6)]
    for k in range(3):
        assert torch.equal(torch.cat([p[k] for p in parts]), whole[k])
    t, noise, drop = whole
    g = torch.Generator().manual_seed(derive_seed(7, _TAG_STEP, 3))
    from harness.diffusion import sample_timesteps
    assert torch.equal(t, sample_timesteps(8, 1000, torch.device("cpu"), g))
    assert torch.equal(noise, torch.randn((8, 2, 4, 4), generator=g))
    assert torch.equal(drop, torch.rand(8, generator=g) < 0.5) and drop.dtype == torch.bool
    other = step_randomness(7, 4, 8, 1000, (2, 4, 4), 0.5, gen, 0, 8)
    assert not torch.equal(other[1], noise)      # another step, other noise
    none = step_randomness(7, 3, 8, 1000, (2, 4, 4), 0.0, gen, 0, 8)[2]
    assert not none.any()
    # a label drops iff its uniform draw u is below class_dropout (P(drop) = p): at p = u exactly, it stays
    g = torch.Generator().manual_seed(derive_seed(7, _TAG_STEP, 3))
    sample_timesteps(8, 1000, torch.device("cpu"), g), torch.randn((8, 2, 4, 4), generator=g)   # drawn first
    u = torch.rand(8, generator=g)
    at_u = step_randomness(7, 3, 8, 1000, (2, 4, 4), u[5].item(), gen, 0, 8)[2]
    assert torch.equal(at_u, u < u[5]) and not at_u[5]


def test_a_non_finite_loss_stops_with_its_first_step_and_the_fix(tmp_path: Path):
    _check_finite(torch.tensor(_NO_BAD), Dist(), tmp_path)   # no bad step: nothing happens
    with pytest.raises(HarnessError) as err:
        _check_finite(torch.tensor(17), Dist(), tmp_path)
    assert str(err.value) == (f"{tmp_path}: the training loss became NaN or Inf at step 17. Fix: lower train.lr in "
                              "the sweep spec, add train.warmup_steps, or use train.precision: fp32; the run resumes "
                              "from the last checkpoint before that step (checkpoints/).")


def test_the_train_log_line_is_its_known_answers(tmp_path, monkeypatch, caplog):
    """train.jsonl of a real 2-step run: at step 1 the adaLN-Zero model predicts exactly zero noise, so
    the logged mse is the mean square of the step's own noise (from step_randomness); throughput, TFLOP/s
    and the rate follow from each other; the clock is a counter (one tick of 1/1024 s per read), so
    steps_per_s and wall_s are deterministic numbers, not timings."""
    import types

    import harness.train as train_mod
    from harness.flops import model_gflops
    from harness.io import read_jsonl
    from harness.runtime import train_tflops
    from train_tiny import tiny_run

    ticks = iter(range(1000, 10**6))
    clock = types.SimpleNamespace(perf_counter=lambda: next(ticks) / 1024, time=train_mod.time.time,
                                  sleep=train_mod.time.sleep)
    monkeypatch.setattr(train_mod, "time", clock)
    run = tiny_run(steps=2, ckpt_every=100, warmup_steps=4, lr=2e-3)
    caplog.set_level("INFO", logger="harness.train")
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
            assert rec["mfu"] is None and rec["compiled"] is False and rec["graphs"] is None
    assert 0 < first["wall_s"] < second["wall_s"] < 100 / 1024   # ticks since training began


def test_without_gflops_training_goes_on_and_logs_no_tflops(tmp_path, monkeypatch, caplog):
    """Throughput bookkeeping never stops training: if fvcore cannot count the model, train.jsonl says None."""
    import harness.flops
    from harness.io import read_jsonl
    from harness.layout import write_run_json
    from harness.train import run_training
    from train_tiny import tiny_run

    def no_count(*args, **kwargs):
        raise RuntimeError("fvcore is not installed")

    write_run_json(tiny_run(steps=1), tmp_path)   # as a sweep's planner wrote it (it counts the Gflops itself)
    monkeypatch.setattr(harness.flops, "model_gflops", no_count)
    run_training(tiny_run(steps=1), tmp_path)
    (line,) = read_jsonl(tmp_path / "train.jsonl")
    assert line["tflops_per_device"] is None and line["mfu"] is None and line["images_per_s"] > 0
    assert ("no Gflops for DiT-2x32x2/2 (fvcore is not installed): train.jsonl records no TFLOP/s"
            in caplog.messages)


def test_a_non_finite_loss_stops_at_the_next_logged_step(tmp_path):
    """Checked at every logged step, not only at checkpoints: nothing is logged past the bad step."""
    from harness.io import read_jsonl
    from harness.train import run_training
    from train_tiny import tiny_run

    with pytest.raises(HarnessError) as err:
        run_training(tiny_run(steps=6, lr=1e30, ckpt_every=100), tmp_path)
    assert str(err.value).startswith(f"{tmp_path}: the training loss became NaN or Inf at step 2. Fix:")
    assert [r["step"] for r in read_jsonl(tmp_path / "train.jsonl")] == [1]


def test_the_run_log_says_how_it_trains_and_why_it_stopped(tmp_path, caplog):
    from harness.step import attention_backends
    from harness.train import run_training
    from train_tiny import tiny_run

    caplog.set_level("INFO", logger="harness.train")
    run_training(tiny_run(steps=4, ckpt_every=100), tmp_path, stop_at=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "harness.train"]
    assert ("training tiny: per-GPU batch 16 in micro-batches of 16, fp32, eager, attention: "
            f"{attention_backends(torch.device('cpu'), 'fp32')}") in lines
    assert lines[-1] == "stopping at step 2 as asked (stop_at)"


def test_train_refuses_a_broken_run_json_and_a_standalone_run_compiles_only_when_asked(tmp_path, capsys):
    import argparse

    from harness.cli import main
    from harness.train import _standalone_run

    (tmp_path / "run.json").write_text("{not json")
    assert main(["train", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'run.json'}: not a valid run.json (" in err and "regenerate it with `harness sweep`" in err
    args = argparse.Namespace(model="DiT-2x32x2/2", conditioning="adaLN-Zero", seed=0, data="digits", image_size=None,
                              autoencoder=None, steps=3, batch=None, lr=None, precision=None, compile=False)
    assert _standalone_run(args).train.compile == "auto"
    folder = _standalone_run(argparse.Namespace(**{**vars(args), "data": str(tmp_path / "images")})).data
    assert (folder.dataset, folder.path, folder.image_size, folder.autoencoder, folder.num_classes) == (
        "imagefolder", str(tmp_path / "images"), 256, "sd-vae-ft-ema", 1000)   # the paper's ImageNet setting
    assert _standalone_run(argparse.Namespace(**{**vars(args), "compile": True})).train.compile is True


def _standalone_args(**changes):
    import argparse

    base = dict(model="DiT-2x32x2/2", conditioning="adaLN-Zero", seed=0, data="digits", image_size=None,
                autoencoder=None, steps=None, batch=None, lr=None, precision=None, compile=False)
    return argparse.Namespace(**{**base, **changes})


def test_a_standalone_run_takes_each_cli_argument_and_the_spec_defaults_for_the_rest():
    from dataclasses import replace

    from harness.spec import DataSpec, TrainSpec, make_run_id
    from harness.train import _standalone_run

    plain = _standalone_run(_standalone_args())
    assert plain.data == DataSpec() and plain.train == replace(TrainSpec(), compile="auto")
    assert plain.eval.at_steps == [TrainSpec().steps]
    sized, encoded = (_standalone_run(_standalone_args(**kw)).data
                      for kw in ({"image_size": 16}, {"autoencoder": "sd-vae-ft-mse"}))
    assert (sized.dataset, sized.image_size, sized.autoencoder) == ("digits", 16, "identity")
    assert (encoded.dataset, encoded.image_size, encoded.autoencoder) == ("digits", 8, "sd-vae-ft-mse")
    run = _standalone_run(_standalone_args(steps=5, batch=4, lr=2e-3, precision="bf16", conditioning="in-context"))
    assert (run.train.steps, run.train.global_batch, run.train.lr, run.train.precision) == (5, 4, 2e-3, "bf16")
    assert run.eval.at_steps == [5] and (run.model, run.conditioning, run.sweep) == (
        "DiT-2x32x2/2", "in-context", "standalone")
    assert run.run_id == make_run_id("DiT-2x32x2/2", "in-context", 0, run.data, run.train)
    assert run.run_id != _standalone_run(_standalone_args(steps=5, batch=4, lr=2e-3, precision="bf16")).run_id


@pytest.mark.parametrize("flag", [["--steps", "5"], ["--batch", "8"], ["--lr", "0.1"], ["--precision", "bf16"],
                                  ["--compile"]])
def test_a_recorded_run_refuses_each_standalone_override(tmp_path, capsys, flag):
    from harness.cli import main
    from harness.layout import write_run_json
    from harness.train import _standalone_run

    write_run_json(_standalone_run(_standalone_args(steps=3)), tmp_path)
    assert main(["train", "--run-dir", str(tmp_path), *flag]) == 2
    assert (f"{tmp_path / 'run.json'} exists: --steps/--batch/--lr/--precision/--compile only apply to a new "
            "standalone run; edit the sweep spec instead or use a new --run-dir") in capsys.readouterr().err


def test_train_reads_the_run_json_named_by_config_and_names_it_when_it_is_bad(tmp_path, capsys):
    from harness.cli import main

    config = tmp_path / "elsewhere.json"
    for text, says in (("{not json", "not a valid run.json ("), ('{"run_id": "x"}', "malformed run record ("),
                       ('{"bogus": 1}', "unknown keys ['bogus']")):
        config.write_text(text)
        assert main(["train", "--run-dir", str(tmp_path / "run"), "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert f"{config}: {says}" in err and "regenerate it with `harness sweep`" in err
    config.write_text("{not json")
    main(["train", "--run-dir", str(tmp_path / "run"), "--config", str(config)])
    assert capsys.readouterr().err.rstrip().endswith(
        "regenerate it with `harness sweep` or start a standalone run with --model")


def test_a_checkpoint_and_done_record_what_wrote_them(tmp_path):
    """The checkpoint carries the run's spec and the world size beside the weights; `done` its step and time."""
    import json
    import time

    from harness.checkpoint import checkpoint_path, load_checkpoint
    from harness.train import run_training
    from train_tiny import tiny_run

    run = tiny_run(steps=2, ckpt_every=100)
    before = time.time()
    run_training(run, tmp_path)
    state = load_checkpoint(checkpoint_path(tmp_path / "checkpoints", 2))
    assert (state["step"], state["data_pos"], state["world_size"]) == (2, 2 * run.train.global_batch, 1)
    assert state["run"] == run.to_dict()
    done = json.loads((tmp_path / "done").read_text())
    assert done["step"] == 2 and before <= done["time"] <= time.time()


def test_the_training_arrays_are_the_runs_own_image_folder_and_autoencoder(tmp_path, monkeypatch):
    """An image folder run trains on the cache of data.path (its ${VAR} expanded) at data.image_size; a VAE
    run loads its weights from data.autoencoder_path (none there: the error names that folder)."""
    from dataclasses import replace

    from PIL import Image

    from harness.data import ImageFolder
    from harness.spec import DataSpec
    from harness.train import load_training_arrays
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
    for i in range(6):   # the identity autoencoder: each image's pixels, and its mirror image
        assert np.allclose(latents[i, 0], folder[i][0].numpy(), atol=1e-6)
        assert np.allclose(latents[i, 1], folder[i][0].numpy()[..., ::-1], atol=1e-6)
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
    from harness.layout import RunFolder
    from harness.train import run_training
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
    from harness.train import Trainer
    from train_tiny import tf32_off, tiny_run

    with pytest.raises(HarnessError) as err:
        Trainer(tiny_run(), tmp_path, Dist(rank=0, world=3))
    assert str(err.value) == (f"{tmp_path}/run.json: train.global_batch=16 is not divisible by the 3 ranks; "
                              "choose a batch that is a multiple of the GPU count")
    with tf32_off():
        trainer = Trainer(tiny_run(), tmp_path / "runs" / "new", Dist())   # its folder made, parents too
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    assert (tmp_path / "runs" / "new" / "run.json").exists()
    assert (trainer.per_rank, trainer.step, trainer.data_pos, trainer.shape) == (16, 0, 0, (1, 8, 8))


def test_an_evaluation_only_trainer_takes_its_shape_from_the_spec_and_reads_no_data(tmp_path, monkeypatch):
    """train.steps 0 (evaluating train.init_from's weights): no latent cache is opened or built."""
    import harness.train as train_mod
    from train_tiny import tiny_run

    monkeypatch.setattr(train_mod, "load_training_arrays", lambda run: pytest.fail("read the training data"))
    trainer = train_mod.Trainer(tiny_run(steps=0), tmp_path, Dist())
    assert trainer.shape == (1, 8, 8) and trainer.latents is None and trainer.order.n == 0


def test_the_trainer_builds_the_spec_s_model_ema_and_optimizer(tmp_path, monkeypatch):
    """The model of the run's name and conditioning, initialised under derive_seed(seed, 0), its label dropout
    the spec's; the EMA a frozen copy in eval mode; AdamW with the spec's weight decay (its learning rate is
    set at every step, from the warmup schedule); the wait for rank 0's latent cache bounded and explained."""
    from dataclasses import replace

    import harness.train as train_mod
    from harness.models import build_model
    from harness.runtime import seed_everything
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
    from harness.checkpoint import checkpoint_path
    from harness.train import run_training
    from train_tiny import tiny_run

    run_training(tiny_run(steps=4), tmp_path, stop_at=2)
    caplog.set_level("INFO", logger="harness.train")
    run_training(tiny_run(steps=4), tmp_path)
    assert f"resumed {checkpoint_path(tmp_path / 'checkpoints', 2)} at step 2" in caplog.messages


def test_resume_restores_the_global_rngs_of_the_checkpoint_and_a_fresh_run_seeds_them(tmp_path):
    """One rank: the global torch/numpy/python RNGs continue from the checkpoint's saved state; a fresh run
    seeds them from (seed, rank). Nothing in today's step draws from them (step_randomness has its own
    generator), but a model with dropout would."""
    import random

    from harness.checkpoint import checkpoint_path, load_checkpoint
    from harness.runtime import seed_everything, set_rng_state
    from harness.train import Trainer, run_training
    from train_tiny import tiny_run

    import dataclasses

    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    fresh = Trainer(dataclasses.replace(tiny_run(steps=4), seed=3), tmp_path / "fresh", Dist())
    fresh.resume()
    got = draws()
    seed_everything(derive_seed(3, 0))   # (seed, rank); derive_seed(3) is the same (trailing zeros), (0, 3) is not
    assert got == draws()
    run_training(tiny_run(steps=4), tmp_path / "run", stop_at=2)
    resumed = Trainer(tiny_run(steps=4), tmp_path / "run", Dist())
    resumed.resume()
    got = draws()
    set_rng_state(load_checkpoint(checkpoint_path(tmp_path / "run" / "checkpoints", 2))["rng"])
    assert resumed.step == 2 and got == draws()


def test_train_init_from_starts_model_and_ema_from_its_weights_and_steps_0_evaluates_them(tmp_path):
    """init_from a harness checkpoint: the new run's model and EMA both start from its EMA weights, with a
    fresh optimizer; with train.steps 0 the run only evaluates them, at step 0, from memory (no checkpoint)."""
    from harness.checkpoint import checkpoint_path, load_checkpoint
    from harness.io import read_jsonl
    from harness.train import Trainer, run_training
    from train_tiny import tiny_run

    run_training(tiny_run(steps=2), tmp_path / "source")
    source = checkpoint_path(tmp_path / "source" / "checkpoints", 2)
    ema = load_checkpoint(source)["ema"]
    fine_tune = Trainer(tiny_run(steps=4, init_from=str(source)), tmp_path / "fine-tune", Dist())
    fine_tune.resume()
    for net in (fine_tune.model, fine_tune.ema):   # pos_embed: the model keeps its own fixed sin-cos table
        assert all(torch.equal(w, ema[k]) for k, w in net.state_dict().items() if k != "pos_embed")
        torch.testing.assert_close(net.pos_embed, ema["pos_embed"], rtol=0, atol=1e-6)  # the EMA's copy: rounding
    assert fine_tune.step == 0 and fine_tune.opt.state_dict()["state"] == {}
    evaluate = tiny_run(steps=0, init_from=str(source), at_steps=[0],
                        eval=dict(num_samples=7, batch_size=7, sampler="ddpm", sampling_steps=[2]))
    run_training(evaluate, tmp_path / "evaluate")
    assert [r["step"] for r in read_jsonl(tmp_path / "evaluate" / "eval.jsonl")] == [0]
    assert not (tmp_path / "evaluate" / "checkpoints").exists() or not any((tmp_path / "evaluate" / "checkpoints").iterdir())


def test_prepare_step_applies_grad_checkpointing_and_keys_the_auto_micro_batch_by_configuration(tmp_path, monkeypatch):
    """train.grad_checkpointing reaches the model; micro_batch 'auto' is probed once and cached under the
    key of this model, block, shape, classes, device, precision, compilation and per-GPU batch."""
    import json

    from harness.microbatch import _cache_file, cache_key
    from harness.train import Trainer
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

    from harness.train import run_training
    from train_tiny import tiny_run

    run_training(tiny_run(steps=2), tmp_path)
    (tmp_path / "done").unlink()
    caplog.set_level("INFO", logger="harness.train")
    run_training(tiny_run(steps=2), tmp_path)
    assert json.loads((tmp_path / "done").read_text())["step"] == 2
    assert not [m for m in caplog.messages if m.startswith("training tiny")]


def test_data_flip_reaches_the_batches_the_model_trains_on(tmp_path):
    """data.flip on and off train different weights from the same seed (16 draws: some images are mirrored)."""
    from dataclasses import replace

    from harness.train import run_training
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

    import harness.step as step_mod
    import harness.train as train_mod
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
    from harness.checkpoint import list_checkpoints
    from harness.train import run_training
    from train_tiny import tiny_run

    run_training(tiny_run(steps=8, ckpt_every=2, keep_last=1, at_steps=[2],
                          eval=dict(num_samples=7, batch_size=7, sampler="ddpm", sampling_steps=[2])), tmp_path)
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [2, 8]
