"""The DiT family: shapes, the four conditioning blocks, initialisation and checkpoint keys."""
import pytest
import torch

from harness.errors import HarnessError
from harness.config.registry import CONDITIONINGS, VARIANTS, resolve_shape
from harness.models.dit import build_model


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_output_shape_every_block_and_patch(conditioning, patch):
    model = build_model(f"DiT-2x64x4/{patch}", conditioning, input_size=16, in_channels=4, num_classes=10)
    x = torch.randn(3, 4, 16, 16)
    out = model(x, torch.tensor([0, 10, 999]), torch.tensor([1, 2, 10]))
    assert out.shape == (3, 8, 16, 16)
    assert torch.isfinite(out).all()


def test_every_named_variant_builds_with_the_paper_shape():
    expected = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    assert len(VARIANTS) == 12
    for name, shape in VARIANTS.items():
        assert (shape.depth, shape.hidden, shape.heads) == expected[shape.size]
        assert name.endswith(f"/{shape.patch}")
    with torch.device("meta"):
        model = build_model("DiT-S/2", input_size=32)
    assert len(model.blocks) == 12 and model.num_tokens == 256


def test_output_shape_of_a_paper_variant():
    model = build_model("DiT-S/8", input_size=32)
    out = model(torch.randn(2, 4, 32, 32), torch.tensor([3, 900]), torch.tensor([5, 1000]))
    assert out.shape == (2, 8, 32, 32)


def test_adaln_zero_blocks_start_as_identity_and_output_is_zero():
    model = build_model("DiT-2x64x4/2", "adaLN-Zero", input_size=8, in_channels=1, num_classes=10)
    x = torch.randn(4, 1, 8, 8)
    t, y = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 3])
    tokens = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    for block in model.blocks:
        assert torch.equal(block(tokens, c), tokens)
    assert torch.equal(model(x, t, y), torch.zeros(4, 2, 8, 8))


def test_other_blocks_are_not_identity_at_init():
    for conditioning in ("in-context", "cross-attention", "adaLN"):
        model = build_model("DiT-1x64x4/2", conditioning, input_size=8, in_channels=1, num_classes=10)
        tokens = torch.randn(2, 16, 64)
        c = torch.randn(2, 64)
        assert not torch.allclose(model.blocks[0](tokens, c, torch.randn(2, 2, 64)), tokens)


def test_label_dropout_and_null_class():
    model = build_model("DiT-1x32x2/2", input_size=8, in_channels=1, num_classes=10, class_dropout_prob=0.5)
    embedder = model.y_embedder
    assert embedder.embedding_table.num_embeddings == 11  # 10 classes + the null class
    y = torch.zeros(4000, dtype=torch.long)
    null = embedder.embedding_table.weight[10]
    embedder.train()
    dropped = (embedder(y) == null).all(dim=1).float().mean().item()
    assert 0.45 < dropped < 0.55
    embedder.eval()
    assert not (embedder(y) == null).all(dim=1).any()
    forced = embedder(torch.tensor([3, 3]), force_drop=torch.tensor([1, 0]))
    assert torch.equal(forced[0], null) and not torch.equal(forced[1], null)


def official_layout(depth: int, d: int, patch: int, channels: int, classes: int, tokens: int) -> dict:
    """Keys and shapes of the officially released adaLN-Zero checkpoints, written out by hand."""
    layout = {
        "pos_embed": (1, tokens, d),
        "x_embedder.proj.weight": (d, channels, patch, patch), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (classes + 1, d),
        "final_layer.linear.weight": (patch * patch * 2 * channels, d),
        "final_layer.linear.bias": (patch * patch * 2 * channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for n in range(depth):
        layout.update({
            f"blocks.{n}.attn.qkv.weight": (3 * d, d), f"blocks.{n}.attn.qkv.bias": (3 * d,),
            f"blocks.{n}.attn.proj.weight": (d, d), f"blocks.{n}.attn.proj.bias": (d,),
            f"blocks.{n}.mlp.fc1.weight": (4 * d, d), f"blocks.{n}.mlp.fc1.bias": (4 * d,),
            f"blocks.{n}.mlp.fc2.weight": (d, 4 * d), f"blocks.{n}.mlp.fc2.bias": (d,),
            f"blocks.{n}.adaLN_modulation.1.weight": (6 * d, d), f"blocks.{n}.adaLN_modulation.1.bias": (6 * d,),
        })
    return layout


def test_state_dict_matches_the_official_checkpoint_layout():
    with torch.device("meta"):
        model = build_model("DiT-XL/2", "adaLN-Zero", input_size=32, in_channels=4, num_classes=1000)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == official_layout(28, 1152, 2, 4, 1000, 256)  # no LayerNorm affine parameters


def test_a_file_in_the_official_layout_loads_strictly_with_weights_only(tmp_path):
    # a checkpoint written from the hand-made key list, not from our model's own state dict
    gen = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(shape, generator=gen) for k, shape in official_layout(2, 64, 2, 4, 10, 16).items()}
    torch.save(weights, tmp_path / "DiT-tiny-2-8x8.pt")
    model = build_model("DiT-2x64x4/2", input_size=8, in_channels=4, num_classes=10)
    model.load_state_dict(torch.load(tmp_path / "DiT-tiny-2-8x8.pt", weights_only=True), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key


@pytest.mark.parametrize("name, message", [
    ("DiT-XXL/2", "DiT-S/2"),                  # unknown names list the valid ones
    ("DiT-4x66x4/2", "not divisible by 4 heads"),
    ("DiT-4x64x2/3", "does not divide"),
])
def test_bad_models_name_the_valid_choices(name, message):
    with pytest.raises(HarnessError, match=message):
        build_model(name, input_size=8, in_channels=1, num_classes=10)


def test_unknown_conditioning_is_rejected():
    with pytest.raises(HarnessError, match="adaLN-Zero"):
        build_model("DiT-S/2", "film", input_size=32)


def test_resolve_custom_shape():
    shape = resolve_shape("DiT-6x128x4/2")
    assert (shape.depth, shape.hidden, shape.heads, shape.patch, shape.size) == (6, 128, 4, 2, "6x128x4")
