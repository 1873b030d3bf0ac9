"""Primus (Wald, Roy, Isensee et al. 2025): nnU-Net 2.8's transformer, as its `nnUNet_Primus*_Trainer`s build it.

A patch embedding turns the (8 x 8 x 8)-strided input into tokens, an EVA-02 transformer (timm's `EvaBlock`:
rotary position embedding on 3D token coordinates, absolute position embedding, SwiGLU MLP, LayerNorm inside
attention and MLP, LayerScale) mixes them, and a transposed-convolution decoder brings them back to voxels.
Three versions differ only in the embedding: V1 one strided conv, V2 a residual stem and three strided residual
stages (ReLU), V3 the same with LeakyReLU, wider stages and learned-scale projections of every level to the token
grid. Sizes S/B/M/L set the width, depth and heads (dynamic-network-architectures' `_PRIMUS_CONFIGS`).

Why written here instead of importing dynamic-network-architectures: its Primus imports timm and einops, and timm
imports torchvision, whose CUDA builds fight with the torch Slicer users have (and whose PyPI build does not even
import against a CPU torch). The blocks are a few dozen lines; module names are dynamic-network-architectures' and
timm's, so nnU-Net's checkpoints load with strict key matching, and every operation is done in the order theirs is
(the token reshapes as einops does them, the rotary embedding's float32 arithmetic as timm's), so the numbers are
the same (Testing/test_primus.py compares both on random weights and against nnUNetPredictor).

Inference only needs the eval-mode path: drop path, dropout and patch dropout (MAE pretraining) are identities
there and are left out; the network is still trainable (fine-tuning) without them.
"""
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .blocks import StackedResidualBlocks

# dynamic_network_architectures.architectures.primus._PRIMUS_CONFIGS: size -> (embed_dim, depth, heads)
SIZES = {"S": (396, 12, 6), "B": (792, 12, 12), "M": (864, 16, 12), "L": (1056, 24, 16)}
VERSIONS = ("v1", "v2", "v3")
PATCH_EMBED = (8, 8, 8)  # every nnU-Net Primus trainer embeds 8 x 8 x 8 voxels per token
CLASS_PATH = "SegmentMBTFELib.networks.primus.Primus"


# ---------------------------------------------------------------------------------------------- transformer

def _rotated(x: torch.Tensor) -> torch.Tensor:
    """timm's `rot`: [x0, x1, x2, x3] -> [-x1, x0, -x3, x2]."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


def _apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    sin, cos = rope.chunk(2, -1)
    return x * cos + _rotated(x) * sin


def rope_table(grid: Sequence[int], dim: int) -> torch.Tensor:
    """timm's RotaryEmbeddingCat(dim, in_pixels=False, feat_shape=grid, ref_feat_shape=grid).get_embed():
    (tokens, 2 * 3 * (dim // 4) * 2) float32 sin then cos, the same float32 operations in the same order."""
    bands_n = dim // 4
    exponent = torch.arange(0, bands_n, 1, dtype=torch.int64).to(torch.float32) / bands_n
    bands = 1.0 / (10000 ** exponent)
    axes = [torch.arange(s, dtype=torch.int64).to(torch.float32) + 0.0 for s in grid]
    axes = [t / s * s for t, s in zip(axes, grid)]  # timm rescales to the reference grid (here the same)
    position = torch.stack(torch.meshgrid(axes, indexing="ij"), dim=-1).unsqueeze(-1) * bands
    tokens = int(np.prod(grid))
    sin = position.sin().reshape(tokens, -1).repeat_interleave(2, -1)
    cos = position.cos().reshape(tokens, -1).repeat_interleave(2, -1)
    return torch.cat([sin, cos], -1)


class Attention(nn.Module):
    """timm's EvaAttention with separate q/k/v projections (no k bias), rotary embedding and inner LayerNorm."""

    def __init__(self, dim: int, heads: int, inner_norm: bool):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=True)
        self.norm = nn.LayerNorm(dim) if inner_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        b, n, c = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        # timm concatenates the (here zero) prefix tokens with the rotated ones: the copy makes q and k
        # contiguous, which the attention kernel's summation order depends on
        q = torch.cat([q[:, :, :0, :], _apply_rope(q, rope)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :0, :], _apply_rope(k, rope)], dim=2).type_as(v)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(self.norm(x.transpose(1, 2).reshape(b, n, c)))


class SwiGLU(nn.Module):
    """timm's SwiGLU with separate gate and value projections and a LayerNorm before the output projection."""

    def __init__(self, dim: int, hidden: int, inner_norm: bool):
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.act = nn.SiLU()
        self.norm = nn.LayerNorm(hidden) if inner_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.norm(self.act(self.fc1_g(x)) * self.fc1_x(x)))


class EvaBlock(nn.Module):
    """timm's EvaBlock (pre-norm, LayerScale `gamma_1`/`gamma_2` when trained with init_values)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, layer_scale: bool, inner_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, inner_norm)
        self.gamma_1 = nn.Parameter(0.1 * torch.ones(dim)) if layer_scale else None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio), inner_norm)
        self.gamma_2 = nn.Parameter(0.1 * torch.ones(dim)) if layer_scale else None

    def forward(self, x, rope):
        if self.gamma_1 is None:
            x = x + self.attn(self.norm1(x), rope)
            return x + self.mlp(self.norm2(x))
        x = x + self.gamma_1 * self.attn(self.norm1(x), rope)
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class Eva(nn.Module):
    """dynamic-network-architectures' Eva: absolute + rotary position embedding, the blocks, a final LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, grid: Sequence[int], layer_scale=True, inner_norm=True):
        super().__init__()
        if dim % heads or (dim // heads) % 6:
            raise ValueError(f"a width of {dim} with {heads} heads has no 3D rotary embedding")
        self.pos_embed = nn.Parameter(torch.zeros(1, int(np.prod(grid)), dim))
        self.register_buffer("rope", rope_table(grid, round(dim // heads / 1.5)), persistent=False)
        self.blocks = nn.ModuleList([EvaBlock(dim, heads, 4 * 2 / 3, layer_scale, inner_norm) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x, self.rope)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------- embedding, decoder

class PatchEmbed(nn.Module):
    """V1: one convolution with kernel = stride = the token size."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv3d(channels, dim, PATCH_EMBED, PATCH_EMBED, 0)

    def forward(self, x):
        return self.proj(x)


def _residual(n, channels_in, channels_out, kernel, stride, bias, nonlin):
    return StackedResidualBlocks(n, nn.Conv3d, channels_in, channels_out, kernel, stride, bias, nn.InstanceNorm3d,
                                 {"eps": 1e-5, "affine": True}, None, None, nonlin, {"inplace": True})


class ResidualEmbed(nn.Module):
    """V2 (PatchEmbed_deeper: 32/32/64/128, ReLU) and V3 (PatchEmbedDeeperControlled: 32/64/256/1024, LeakyReLU,
    each level also projected onto the token grid with a learned scale): a residual stem, three stride-2 stages."""

    def __init__(self, channels: int, dim: int, widths, nonlin, skips: bool):
        super().__init__()
        self.skips = skips
        self.stem = _residual(1, channels, widths[0], [3, 3, 3], 1, True, nonlin)
        self.stages = nn.ModuleList([_residual(1, a, b, 3, 2, False, nonlin) for a, b in zip(widths, widths[1:])])
        self.final_proj = nn.Conv3d(widths[-1], dim, 1, 1, 0)
        if skips:
            levels = len(widths) - 1
            self.proj_to_tokens = nn.ModuleList([nn.Conv3d(w, dim, 2 ** (levels - i), 2 ** (levels - i), 0)
                                                 for i, w in enumerate(widths[:-1])])
            self.scale_proj_to_tokens = nn.ParameterList([nn.Parameter(torch.tensor(1e-5)) for _ in widths[:-1]])

    def forward(self, x):
        x = self.stem(x)
        skip = self.scale_proj_to_tokens[0] * self.proj_to_tokens[0](x) if self.skips else None
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if self.skips and i < len(self.stages) - 1:
                skip = skip + self.scale_proj_to_tokens[i + 1] * self.proj_to_tokens[i + 1](x)
        x = self.final_proj(x)
        return x + skip if self.skips else x


class LayerNormNd(nn.Module):
    """dynamic-network-architectures' channel LayerNorm for (N, C, ...) tensors, eps 1e-6."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        index = (None, slice(None), *([None] * (x.ndim - 2)))
        return self.weight[index] * x + self.bias[index]


def decoder_widths(dim: int, outputs: int, stages: int):
    """PatchDecode's channel rule ("don't question me"), as it computes it: geometric, rounded to 8."""
    reduction = (dim / (2 * outputs)) ** (1 / stages)
    widths = [dim] + [int(max(8, np.round((dim / reduction ** (x + 1) + 1e-6) / 8) * 8)) for x in range(stages)]
    widths[-1] = outputs
    return widths


class PatchDecode(nn.Module):
    """Stride-2 transposed convolutions back to voxels, LayerNormNd + GELU between them."""

    def __init__(self, dim: int, outputs: int):
        super().__init__()
        stages = int(np.log(max(PATCH_EMBED)) / np.log(2))
        strides = [[2 if (p / 2 ** n) % 2 == 0 else 1 for p in PATCH_EMBED] for n in range(stages)][::-1]
        widths = decoder_widths(dim, outputs, stages)
        layers = [nn.Sequential(nn.ConvTranspose3d(widths[s], widths[s + 1], strides[s], strides[s]),
                                LayerNormNd(widths[s + 1]), nn.GELU()) for s in range(stages - 1)]
        layers.append(nn.ConvTranspose3d(widths[-2], widths[-1], strides[-1], strides[-1]))
        self.decode = nn.Sequential(*layers)

    def forward(self, x):
        return self.decode(x)


# ---------------------------------------------------------------------------------------------- the network

class Primus(nn.Module):
    """Primus `version` ("v1", "v2", "v3") of `size` ("S", "B", "M", "L") for patches of `input_shape` voxels
    (each a multiple of 8: the absolute position embedding has one entry per token of the patch)."""
    # inference/channels_last.py: measured per batch of 2 tiles of 32x40x32, V1-S 170 ms either way, V3-S 669 ms NCDHW
    # against 760 ms channels-last (its 1024-wide stage and LayerNorms); NCDHW is also nnU-Net's order, bit for bit
    channels_last_helps = False

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, *, version: str,
                 size: str, input_shape: Sequence[int]):
        super().__init__()
        if version not in VERSIONS or size not in SIZES:
            raise ValueError(f"Primus comes in versions {VERSIONS} and sizes {tuple(SIZES)}, not {version} {size}")
        shape = [int(s) for s in input_shape]
        if len(shape) != 3 or any(s <= 0 or s % p for s, p in zip(shape, PATCH_EMBED)):
            raise ValueError(f"Primus needs a 3D patch whose sides are multiples of 8, not {shape}")
        dim, depth, heads = SIZES[size]
        self.version, self.size, self.input_shape = version, size, shape
        self.deep_supervision = deep_supervision  # Primus has one output only; kept for the engine's interface
        self.down_projection = PatchEmbed(input_channels, dim) if version == "v1" else \
            ResidualEmbed(input_channels, dim, (32, 32, 64, 128), nn.ReLU, False) if version == "v2" else \
            ResidualEmbed(input_channels, dim, (32, 64, 256, 1024), nn.LeakyReLU, True)
        self.up_projection = PatchDecode(dim, num_classes)
        self.eva = Eva(dim, depth, heads, [s // p for s, p in zip(shape, PATCH_EMBED)])
        self.register_buffer("mask_token", torch.zeros(1, 1, dim))  # MAE pretraining's; in every checkpoint

    def forward(self, x):
        x = self.down_projection(x)
        b, c, w, h, d = x.shape
        # einops' "b c w h d -> b (w h d) c" and back, as views and copies in the same places
        x = self.eva(x.permute(0, 2, 3, 4, 1).reshape(b, w * h * d, c))
        return self.up_projection(x.reshape(b, w, h, d, c).permute(0, 4, 1, 2, 3))


def primus_architecture(version: str, size: str, patch_size: Optional[Sequence[int]]) -> dict:
    """The architecture entry (as plans carry one) of the Primus a trainer builds for `patch_size`."""
    return {"network_class_name": CLASS_PATH, "_kw_requires_import": [],
            "arch_kwargs": {"version": version, "size": size,
                            "input_shape": [int(p) for p in patch_size] if patch_size is not None else None}}

