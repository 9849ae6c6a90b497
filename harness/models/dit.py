"""Diffusion Transformer (Peebles & Xie 2023) with the paper's four conditioning blocks.

Shapes: images or latents x (N, C, H, W); timesteps t (N,); labels y (N,) with the null class
`num_classes` for classifier-free guidance; tokens (N, T, D) with T = (H/p) * (W/p), D = hidden.
The adaLN-Zero model's state dict uses the keys of the officially released checkpoints.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from harness.config.registry import check_conditioning, check_shape, resolve_shape

ADALN = ("adaLN", "adaLN-Zero")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (N, T, D) scaled and shifted per sample by shift, scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos positional embedding, (grid*grid, dim): half the channels encode the
    row, half the column, each as [sin, cos] of the position at geometric frequencies."""
    assert dim % 4 == 0, "dim must be a multiple of 4"
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:  # (T,) -> (T, dim/2)
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (N,) -> (N, D): 256-d sinusoidal frequencies, then an MLP. `freq_shift` 0 spaces
    the frequencies as the official DiT (10000^(-i/128)); 1 as diffusers' DiT port (10000^(-i/127))."""

    def __init__(self, hidden: int, freq_dim: int = 256, freq_shift: int = 0):
        super().__init__()
        self.freq_dim, self.freq_shift = freq_dim, freq_shift
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def frequencies(t: torch.Tensor, dim: int, shift: int, max_period: float = 10000.0) -> torch.Tensor:
        """t (N,) -> (N, dim): [cos, sin] of t times max_period^(-i / (dim/2 - shift)), i < dim/2."""
        half = dim // 2
        steps = torch.arange(half, device=t.device, dtype=torch.float32)
        freqs = torch.exp(-math.log(max_period) * steps / (half - shift))
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = self.frequencies(t, self.freq_dim, shift=self.freq_shift).to(self.mlp[0].weight.dtype)
        return self.mlp(freqs)


class LabelEmbedder(nn.Module):
    """Labels (N,) -> (N, D). Row `num_classes` is the null class; in training, labels are
    replaced by it with probability `dropout` (classifier-free guidance)."""

    def __init__(self, num_classes: int, hidden: int, dropout: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop is not None:
            y = torch.where(force_drop.bool(), torch.full_like(y, self.num_classes), y)
        elif self.training and self.dropout > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention. (N, T, D) -> (N, T, D)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, D/heads)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class CrossAttention(nn.Module):
    """Image tokens (N, T, D) attend to condition tokens (N, S, D) -> (N, T, D)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.heads
        q = self.q(x).reshape(n, t, h, d // h).transpose(1, 2)
        k, v = self.kv(context).reshape(n, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, hidden: int, ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden, int(hidden * ratio))
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(int(hidden * ratio), hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """One transformer block with the chosen conditioning. x (N, T, D), c (N, D) = t + y
    embedding, context (N, 2, D) = [t, y] tokens (cross-attention only)."""

    def __init__(self, hidden: int, heads: int, conditioning: str, mlp_ratio: float):
        super().__init__()
        self.conditioning = conditioning
        affine = conditioning not in ADALN  # adaLN blocks regress the norm's scale and shift
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=affine, eps=1e-6)
        self.attn = Attention(hidden, heads)
        if conditioning == "cross-attention":
            self.norm_cross = nn.LayerNorm(hidden, eps=1e-6)
            self.cross_attn = CrossAttention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=affine, eps=1e-6)
        self.mlp = Mlp(hidden, mlp_ratio)
        if conditioning in ADALN:
            chunks = 6 if conditioning == "adaLN-Zero" else 4
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, chunks * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditioning == "adaLN-Zero":
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
            x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
            return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        if self.conditioning == "adaLN":
            shift1, scale1, shift2, scale2 = self.adaLN_modulation(c).chunk(4, dim=1)
            x = x + self.attn(modulate(self.norm1(x), shift1, scale1))
            return x + self.mlp(modulate(self.norm2(x), shift2, scale2))
        x = x + self.attn(self.norm1(x))
        if self.conditioning == "cross-attention":
            x = x + self.cross_attn(self.norm_cross(x), context)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """Tokens (N, T, D) -> patches (N, T, p*p*C_out); adaLN-modulated for the adaLN blocks."""

    def __init__(self, hidden: int, patch: int, out_channels: int, modulated: bool):
        super().__init__()
        self.modulated = modulated
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=not modulated, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        if modulated:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.norm_final(x)
        if self.modulated:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            x = modulate(x, shift, scale)
        return self.linear(x)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, H/p * W/p, D) by a stride-p convolution."""

    def __init__(self, patch: int, in_channels: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DiT(nn.Module):
    """Class-conditional DiT. forward(x (N, C, H, W), t (N,), y (N,)) -> (N, 2C, H, W) with
    learned sigma (epsilon, then the variance interpolation v), else (N, C, H, W)."""

    def __init__(self, *, input_size: int, patch_size: int, in_channels: int, hidden_size: int, depth: int,
                 num_heads: int, num_classes: int, class_dropout_prob: float, learn_sigma: bool, conditioning: str,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes, self.conditioning = num_classes, conditioning
        self.grad_checkpointing = False
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        self.register_parameter("pos_embed", nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False))
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, conditioning, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, conditioning in ADALN)
        self.initialize_weights()

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def initialize_weights(self) -> None:
        """The paper's initialisation: xavier-uniform linears and patch projection, N(0, 0.02)
        embeddings, fixed sin-cos positions, zero final layer, zero adaLN-Zero modulation."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        grid = int(self.num_tokens ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid)).unsqueeze(0))
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.data.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.conditioning == "adaLN-Zero":
            for block in self.blocks:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
        if self.final_layer.modulated:
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        p, c = self.patch_size, self.out_channels
        g = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        t_emb = self.t_embedder(t)  # (N, D)
        y_emb = self.y_embedder(y, force_drop)  # (N, D)
        c = t_emb + y_emb
        context = None
        if self.conditioning == "in-context":
            tokens = torch.cat([t_emb.unsqueeze(1), y_emb.unsqueeze(1), tokens], dim=1)
        elif self.conditioning == "cross-attention":
            context = torch.stack([t_emb, y_emb], dim=1)  # (N, 2, D)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                tokens = checkpoint(block, tokens, c, context, use_reentrant=False)
            else:
                tokens = block(tokens, c, context)
        if self.conditioning == "in-context":
            tokens = tokens[:, 2:]  # drop the condition tokens before the final layer
        return self.unpatchify(self.final_layer(tokens, c))


def build_model(name: str, conditioning: str = "adaLN-Zero", input_size: int = 32, in_channels: int = 4,
                num_classes: int = 1000, class_dropout_prob: float = 0.1, learn_sigma: bool = True) -> DiT:
    """A DiT from a registry name ("DiT-XL/2" or "DiT-4x64x2/2"); errors name the valid choices."""
    shape = resolve_shape(name)
    check_conditioning(conditioning)
    check_shape(shape, input_size)
    return DiT(input_size=input_size, patch_size=shape.patch, in_channels=in_channels, hidden_size=shape.hidden,
               depth=shape.depth, num_heads=shape.heads, class_dropout_prob=class_dropout_prob,
               num_classes=num_classes, learn_sigma=learn_sigma, conditioning=conditioning)
