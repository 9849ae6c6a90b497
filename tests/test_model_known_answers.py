"""The DiT forward pass against the paper's equations written out independently (issue 16).

`reference_forward` reads the model's weights and recomputes its output with plain tensor algebra:
patchify as a reshape and a matrix product, the 2-D sin-cos positions from their formula, the
timestep frequencies, LayerNorm, multi-head attention as softmax(QK^T / sqrt(d)) V, the tanh GELU,
each conditioning block as the paper describes it, the final layer and unpatchify as index loops.
It shares no code with harness.models. Everything runs in float64 with every weight random (the
zero initialisations would hide the modulation and the final layer), so agreement is to 1e-10; only the
positions (stored in float32) and the timestep frequencies (computed in float32, as the official DiT does)
are rounded to float32 first, on both sides.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from harness.errors import HarnessError
from harness.models.dit import build_model
from harness.models.dit import sincos_pos_embed_2d
from harness.config.registry import ModelShape, check_conditioning, check_shape, resolve_shape
from tolerance import fp32_bound, fp64_bound, rel_err

BLOCKS = ("adaLN-Zero", "adaLN", "cross-attention", "in-context")
# float64 roundings between the module's forward and the reference (other sums, other order), relative to the
# outputs' scale (~26 with 0.3 N(0, 1) weights): bounded by the summed lengths of the dot products along the
# network (~940: timestep MLP 256 + 32, per block 32 + 32 + 16 + 16 + 32 + 32 + 128, the patch and final
# layers); 63 measured
FORWARD64 = 1024


def _linear(x, layer):
    return x @ layer.weight.T + layer.bias


def _layer_norm(x, norm, affine, eps=1e-6):
    """LayerNorm over D; `affine`: the norm's own scale and bias (blocks without adaLN), else none."""
    out = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    if not affine:
        assert norm.weight is None and norm.bias is None
        return out
    return out * norm.weight + norm.bias


def _attention(q, k, v, heads):
    """q (N, T, D), k and v (N, S, D): heads split along D, softmax(QK^T/sqrt(d)) V, heads concatenated."""
    n, t, d = q.shape
    split = lambda z: z.reshape(n, z.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(n, t, d)


def _self_attention(x, attn, heads):
    qkv = _linear(x, attn.qkv)  # (N, T, 3D), laid out [q | k | v] as in the official checkpoints
    d = x.shape[-1]
    return _linear(_attention(qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:], heads), attn.proj)


def _mlp(x, mlp):
    h = _linear(x, mlp.fc1)
    h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    return _linear(h, mlp.fc2)


def _positions(d, g):
    """(g*g, d): token (i, j) -> [sin(j w), cos(j w), sin(i w), cos(i w)], w_k = 10000^(-k / (d/4))."""
    w = [10000 ** (-k / (d / 4)) for k in range(d // 4)]
    rows = []
    for i in range(g):
        for j in range(g):
            rows.append([math.sin(j * a) for a in w] + [math.cos(j * a) for a in w]
                        + [math.sin(i * a) for a in w] + [math.cos(i * a) for a in w])
    return torch.tensor(rows, dtype=torch.float64)


def reference_forward(m, x, t, y, shift=0):
    """The DiT of the paper on m's weights: x (N, C, H, W), t (N,), y (N,) -> (N, C_out, H, W)."""
    n, c, h, _ = x.shape
    p, heads = m.patch_size, m.blocks[0].attn.heads
    g, d = h // p, m.pos_embed.shape[-1]
    patches = x.reshape(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * p * p)
    conv = m.x_embedder.proj
    tokens = patches @ conv.weight.reshape(d, -1).T + conv.bias + _positions(d, g).float()  # stored in float32
    half = 128  # the frequencies in float32 whatever the model's dtype, as the official DiT computes them
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - shift))
    args = t.float()[:, None] * freqs
    te = m.t_embedder.mlp
    t_emb = _linear(torch.nn.functional.silu(_linear(torch.cat([args.cos(), args.sin()], -1).double(), te[0])), te[2])
    y_emb = m.y_embedder.embedding_table.weight[y]
    cond = t_emb + y_emb
    if m.conditioning == "in-context":
        tokens = torch.cat([t_emb[:, None], y_emb[:, None], tokens], 1)
    mod = lambda z, shift_, scale: z * (1 + scale[:, None]) + shift_[:, None]  # noqa: E731
    adaln = m.conditioning in ("adaLN-Zero", "adaLN")
    for b in m.blocks:
        if adaln:
            chunks = _linear(torch.nn.functional.silu(cond), b.adaLN_modulation[1]).chunk(
                6 if m.conditioning == "adaLN-Zero" else 4, dim=1)
            if m.conditioning == "adaLN-Zero":
                s1, sc1, g1, s2, sc2, g2 = chunks
            else:
                (s1, sc1, s2, sc2), g1, g2 = chunks, torch.ones_like(cond), torch.ones_like(cond)
            tokens = tokens + g1[:, None] * _self_attention(mod(_layer_norm(tokens, b.norm1, False), s1, sc1), b.attn,
                                                            heads)
            tokens = tokens + g2[:, None] * _mlp(mod(_layer_norm(tokens, b.norm2, False), s2, sc2), b.mlp)
            continue
        tokens = tokens + _self_attention(_layer_norm(tokens, b.norm1, True), b.attn, heads)
        if m.conditioning == "cross-attention":
            context = torch.stack([t_emb, y_emb], 1)
            kv = _linear(context, b.cross_attn.kv)
            q = _linear(_layer_norm(tokens, b.norm_cross, True), b.cross_attn.q)
            tokens = tokens + _linear(_attention(q, kv[..., :d], kv[..., d:], heads), b.cross_attn.proj)
        tokens = tokens + _mlp(_layer_norm(tokens, b.norm2, True), b.mlp)
    if m.conditioning == "in-context":
        tokens = tokens[:, 2:]
    fl = m.final_layer
    tokens = _layer_norm(tokens, fl.norm_final, not adaln)
    if adaln:
        s, sc = _linear(torch.nn.functional.silu(cond), fl.adaLN_modulation[1]).chunk(2, dim=1)
        tokens = mod(tokens, s, sc)
    patch_out = _linear(tokens, fl.linear)  # (N, T, p*p*C_out), ordered (row in patch, column, channel)
    c_out = m.out_channels
    out = torch.empty(n, c_out, h, h, dtype=torch.float64)
    for i in range(g):
        for j in range(g):
            for a in range(p):
                for bb in range(p):
                    out[:, :, i * p + a, j * p + bb] = patch_out[:, i * g + j, (a * p + bb) * c_out:(a * p + bb + 1) * c_out]
    return out


def _random_model(conditioning, seed=0):
    model = build_model("DiT-2x32x2/2", conditioning, input_size=8, in_channels=3, num_classes=5).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "pos_embed":  # fixed positions: the reference computes its own
                param.copy_(0.3 * torch.randn(param.shape, generator=gen, dtype=torch.float64))
    return model.eval()


def _inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 3, 8, 8, generator=gen, dtype=torch.float64), torch.tensor([0.0, 17.0, 999.0],
            dtype=torch.float64), torch.tensor([0, 4, 5]))  # label 5 is the null class


@pytest.mark.parametrize("conditioning", BLOCKS)
def test_forward_equals_the_papers_equations(conditioning):
    model = _random_model(conditioning)
    x, t, y = _inputs()
    with torch.no_grad():
        got = model(x, t, y)
    assert got.shape == (3, 6, 8, 8)
    assert rel_err(got, reference_forward(model, x, t, y)) < fp64_bound(FORWARD64)


def test_diffusers_timestep_spacing_follows_freq_shift():
    model = _random_model("adaLN-Zero")
    model.t_embedder.freq_shift = 1
    x, t, y = _inputs()
    with torch.no_grad():
        got = model(x, t, y)
    assert rel_err(got, reference_forward(model, x, t, y, shift=1)) < fp64_bound(FORWARD64)
    assert rel_err(got, reference_forward(model, x, t, y, shift=0)) > 1e-3   # 0.89 measured


def test_positions_are_the_sincos_formula_in_float32():
    got = sincos_pos_embed_2d(16, 3)
    assert got.dtype.name == "float32" and got.shape == (9, 16)
    # one rounding of float64 values in [-1, 1] to float32 (the float64 formulas agree to ~1e-16)
    assert rel_err(torch.from_numpy(got).double(), _positions(16, 3)) <= fp32_bound(1) + fp64_bound(8)
    with pytest.raises(AssertionError, match="^dim must be a multiple of 4$"):
        sincos_pos_embed_2d(6, 2)


@pytest.mark.parametrize("conditioning", ["adaLN-Zero", "cross-attention"])   # the latter passes its context
def test_gradient_checkpointing_is_the_same_step_and_recomputes_blocks_only_when_asked(conditioning):
    """Checkpointing (training only) must give the same output and gradients, silently; the blocks run
    twice per step with it (recomputed in backward) and once without it, or in eval mode."""
    def step(checkpointing, training):
        model = _random_model(conditioning).train(training)
        model.grad_checkpointing = checkpointing
        calls = []
        model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
        x, t, y = _inputs()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = model(x, t, y, force_drop=torch.zeros(3))
            out.square().sum().backward()
        return out.detach(), [p.grad for p in model.parameters() if p.requires_grad], len(calls)

    plain_out, plain_grads, plain_calls = step(False, True)
    ckpt_out, ckpt_grads, ckpt_calls = step(True, True)
    assert (plain_calls, ckpt_calls) == (1, 2)
    assert torch.equal(plain_out, ckpt_out)   # the same forward ops on the same inputs
    # gradients reach ~4e4: relative, in case backward sums a parameter's contributions in another order
    assert all(rel_err(b, a) < fp64_bound(FORWARD64) for a, b in zip(plain_grads, ckpt_grads))
    assert step(True, False)[2] == 1
    assert _random_model("adaLN").grad_checkpointing is False


def test_positions_are_fixed_and_the_output_width_follows_learn_sigma():
    model = build_model("DiT-2x32x2/2", "adaLN", input_size=8, in_channels=3, num_classes=5, learn_sigma=False)
    assert not model.pos_embed.requires_grad
    assert model.out_channels == 3 and model(torch.randn(1, 3, 8, 8), torch.ones(1), torch.ones(1).long()).shape[1] == 3


def test_build_model_defaults_are_the_papers_latent_setting():
    model = build_model("DiT-S/8")   # 32x32x4 SD-VAE latents of 256 px ImageNet, 1,000 classes, sigma learned
    assert (model.input_size, model.in_channels, model.out_channels, model.num_classes) == (32, 4, 8, 1000)
    assert model.y_embedder.dropout == 0.1 and model.conditioning == "adaLN-Zero"
    assert model.blocks[0].mlp.fc1.out_features == 4 * 384


def test_initialisation_statistics():
    """N(0, 0.02) embeddings and timestep MLP; the patch projection xavier-uniform over its flattened
    (D, C*p*p) shape; zero final layer; adaLN-Zero's modulation zero."""
    torch.manual_seed(0)
    model = build_model("DiT-2x64x2/4", "adaLN-Zero", input_size=8, in_channels=4, num_classes=1000)
    for w in (model.y_embedder.embedding_table.weight, model.t_embedder.mlp[0].weight, model.t_embedder.mlp[2].weight):
        assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    proj = model.x_embedder.proj.weight
    bound = math.sqrt(6 / (64 + 4 * 4 * 4))
    assert proj.abs().max() <= bound and proj.abs().max() > 0.95 * bound
    zero = [model.final_layer.linear.weight, model.final_layer.linear.bias,
            model.final_layer.adaLN_modulation[1].weight, model.final_layer.adaLN_modulation[1].bias]
    zero += [p for b in model.blocks for p in b.adaLN_modulation[1].parameters()]
    assert all(not p.any() for p in zero)


def test_label_dropout_zero_draws_no_random_numbers():
    model = build_model("DiT-2x32x2/2", "adaLN-Zero", input_size=8, in_channels=1, num_classes=10,
                        class_dropout_prob=0.0).train()
    state = torch.get_rng_state()
    model.y_embedder(torch.arange(10))
    assert torch.equal(state, torch.get_rng_state())


def test_shape_checks_name_the_field_and_the_fix():
    for field in ("depth", "hidden", "heads", "patch"):
        values = {"depth": 2, "hidden": 32, "heads": 2, "patch": 2, field: 0}
        with pytest.raises(HarnessError) as err:
            check_shape(ModelShape("DiT-x", "custom", **values))
        assert str(err.value) == "model 'DiT-x': depth, hidden, heads and patch must be positive"
    with pytest.raises(HarnessError) as err:
        check_shape(ModelShape("DiT-x", "custom", 2, 6, 2, 2))
    assert str(err.value) == ("model 'DiT-x': hidden size 6 must be a multiple of 4 (2-D sin-cos positional "
                              "embedding)")
    with pytest.raises(HarnessError) as err:
        check_shape(resolve_shape("DiT-S/8"), input_size=12)
    assert str(err.value).endswith("patch size 8 does not divide the input side 12; patch sizes that divide it: "
                                   "[1, 2, 4]")
    with pytest.raises(HarnessError, match=r"patch sizes that divide it: \[1, 2, 4, 8, 16\]$"):
        check_shape(ModelShape("DiT-x", "custom", 2, 32, 2, 5), input_size=32)
    with pytest.raises(HarnessError, match=r"use one of DiT-S/8, DiT-S/4, DiT-S/2, DiT-B/8"):
        resolve_shape("DiT-M/2")
    with pytest.raises(HarnessError, match="use one of in-context, cross-attention, adaLN, adaLN-Zero$"):
        check_conditioning("film")


def test_a_custom_shape_keeps_its_name():
    shape = resolve_shape("DiT-4x64x2/2")
    assert shape.to_dict() == {"name": "DiT-4x64x2/2", "size": "4x64x2", "depth": 4, "hidden": 64, "heads": 2,
                               "patch": 2}
