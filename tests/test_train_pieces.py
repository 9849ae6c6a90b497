"""The training loop's pieces against known answers (issue 16): the warmup schedule, the batches a rank
reads (which samples, which flips, which labels, which slice), the step's timesteps, noise and label
drops, the NaN stop's message, and `harness train`'s standalone run and refusals. Tiny in-memory arrays;
no training (the Trainer's own steps are in test_trainer.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harness.errors import HarnessError
from harness.training.runtime import Dist, derive_seed
from harness.training.step import BatchGeometry
from harness.training.train import _TAG_EPOCH, _TAG_STEP, _NO_BAD, BatchSource, DataOrder, _check_finite, _lr_at, \
    step_randomness


def test_warmup_is_linear_to_the_spec_rate_then_flat():
    assert [_lr_at(s, 1e-4, 4) for s in (1, 2, 3, 4, 5, 100)] == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4, 1e-4],
                                                                               rel=1e-12)
    assert _lr_at(1, 3e-4, 0) == 3e-4 and _lr_at(7, 3e-4, -1) == 3e-4   # no warmup: the rate from step 1
    assert _lr_at(1, 1e-4, 1) == 1e-4


def test_seed_tags_have_their_own_slot():
    """A tagged seed (data order, step noise, evaluation) never equals a rank's seed: derive_seed(s, 1)
    was once the epoch-0 data-order seed derive_seed(s, _TAG_EPOCH=1, 0). Rank seeds are unchanged."""
    from harness.training.evaluation import TAG_EVAL

    for seed in (0, 3, 2**31 - 1):
        ranks = {derive_seed(seed, r, *step) for r in range(8) for step in ((), (0,), (1,), (7,))}
        tagged = {derive_seed(seed, *rest, tag=tag) for tag in (_TAG_EPOCH, _TAG_STEP, TAG_EVAL)
                  for rest in ((0,), (1,), (2, 50))}
        assert not ranks & tagged and len(tagged) == 3 * 3
    assert derive_seed(5, 1) == derive_seed(5, 1, 0) != derive_seed(5, 0, tag=1)
    # the rank seeds are what they were (SeedSequence of the parts alone); the tagged ones moved
    assert derive_seed(5, 0) == int(np.random.SeedSequence([5, 0]).generate_state(2, np.uint64)[0] >> 1)
    assert derive_seed(5, 0, tag=1) == int(np.random.SeedSequence([5, 0], spawn_key=(1,))
                                           .generate_state(2, np.uint64)[0] >> 1)


def test_an_epoch_is_a_seeded_permutation_with_seeded_flips():
    order = DataOrder(10, seed=3)
    g = torch.Generator().manual_seed(derive_seed(3, 2, tag=_TAG_EPOCH))
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
            src = BatchSource(lat, labels, DataOrder(12, seed=5), BatchGeometry(6, world), Dist(rank=rank, world=world),
                              flip)
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
    src = BatchSource(lat, labels, DataOrder(12, seed=1), BatchGeometry(4), Dist(), True)
    first = src.get(0)
    second = src.get(4)            # served by the read started during get(0)
    out_of_order = src.get(40)     # not the prefetched one: read directly
    src.close()
    fresh = BatchSource(lat, labels, DataOrder(12, seed=1), BatchGeometry(4), Dist(), True)
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
    src = BatchSource(lat, labels, DataOrder(12, seed=1), BatchGeometry(4), Dist(), True)
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
    g = torch.Generator().manual_seed(derive_seed(7, 3, tag=_TAG_STEP))
    from harness.models.diffusion import sample_timesteps
    assert torch.equal(t, sample_timesteps(8, 1000, torch.device("cpu"), g))
    assert torch.equal(noise, torch.randn((8, 2, 4, 4), generator=g))
    assert torch.equal(drop, torch.rand(8, generator=g) < 0.5) and drop.dtype == torch.bool
    other = step_randomness(7, 4, 8, 1000, (2, 4, 4), 0.5, gen, 0, 8)
    assert not torch.equal(other[1], noise)      # another step, other noise
    none = step_randomness(7, 3, 8, 1000, (2, 4, 4), 0.0, gen, 0, 8)[2]
    assert not none.any()
    # a label drops iff its uniform draw u is below class_dropout (P(drop) = p): at p = u exactly, it stays
    g = torch.Generator().manual_seed(derive_seed(7, 3, tag=_TAG_STEP))
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


def _standalone_args(**changes):
    import argparse

    base = dict(model="DiT-2x32x2/2", conditioning="adaLN-Zero", seed=0, data="digits", image_size=None,
                autoencoder=None, steps=None, batch=None, lr=None, precision=None, compile=False, overrides=[])
    return argparse.Namespace(**{**base, **changes})


def test_train_refuses_a_broken_run_json_and_a_standalone_run_compiles_only_when_asked(tmp_path, capsys):
    from harness.cli import main
    from harness.training.train import _standalone_run

    (tmp_path / "run.json").write_text("{not json")
    assert main(["train", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'run.json'}: not a valid run.json (" in err and "regenerate it with `harness sweep`" in err
    assert _standalone_run(_standalone_args(steps=3)).train.compile == "auto"
    folder = _standalone_run(_standalone_args(steps=3, data=str(tmp_path / "images"))).data
    assert (folder.dataset, folder.path, folder.image_size, folder.autoencoder, folder.num_classes) == (
        "imagefolder", str(tmp_path / "images"), 256, "sd-vae-ft-ema", 1000)   # the paper's ImageNet setting
    assert _standalone_run(_standalone_args(steps=3, compile=True)).train.compile is True


def test_a_standalone_run_takes_each_cli_argument_and_the_spec_defaults_for_the_rest():
    from dataclasses import replace

    from harness.config.spec import DataSpec, TrainSpec, make_run_id
    from harness.training.train import _standalone_run

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
    from harness.cost.plan import record_run
    from harness.training.train import _standalone_run

    record_run(_standalone_run(_standalone_args(steps=3)), tmp_path)
    assert main(["train", "--run-dir", str(tmp_path), *flag]) == 2
    assert (f"{tmp_path / 'run.json'} exists: --steps/--batch/--lr/--precision/--compile and KEY=VALUE only apply "
            "to a new standalone run; edit the sweep spec instead or use a new --run-dir") in capsys.readouterr().err


def test_train_reads_the_run_json_named_by_config_and_names_it_when_it_is_bad(tmp_path, capsys):
    from harness.cli import main

    config = tmp_path / "elsewhere.json"
    errors = []
    for text, says in (("{not json", "not a valid run.json ("), ('{"run_id": "x"}', "malformed run record ("),
                       ('{"bogus": 1}', "unknown keys ['bogus']")):
        config.write_text(text)
        assert main(["train", "--run-dir", str(tmp_path / "run"), "--config", str(config)]) == 2
        errors.append(capsys.readouterr().err)
        assert f"{config}: {says}" in errors[-1] and "regenerate it with `harness sweep`" in errors[-1]
    assert errors[0].rstrip().endswith("regenerate it with `harness sweep` or start a standalone run with --model")
