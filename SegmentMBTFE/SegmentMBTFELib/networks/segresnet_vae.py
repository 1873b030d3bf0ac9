"""SegResNetVAE: the BraTS-2018 winner (Myronenko 2018, "3D MRI brain tumor segmentation using autoencoder
regularization"), built from an nnU-Net plans architecture (PlainConvUNet's arguments), in 3D and 2D.

As in the paper: an initial convolution with the plans' first width ("initial filters"), then per level
pre-activation residual blocks (norm, ReLU, conv, norm, ReLU, conv, plus the input) with GroupNorm; levels are
joined by a strided convolution that widens to the next level; the light decoder reduces the width with a 1x1
convolution, up-samples linearly, adds the encoder's output of that level (additive skips) and runs one residual
block. The VAE branch (training only) takes the bottleneck: GroupNorm, ReLU, a stride-2 convolution to 16
channels, a dense layer to the mean and the standard deviation of a 128-dim latent, a sample of it, a dense
layer back, a 1x1 convolution and up-sampling to the bottleneck, then per level a 1x1 convolution, up-sampling
and a residual block (no skips), and a 1x1 convolution to the input's channels: the reconstruction. Its losses,
with the paper's weights 0.1 and 0.1: L_KL = 1/N sum(mu^2 + sigma^2 - log sigma^2 - 1) (N: voxels of the input)
and L_L2 = the mean squared reconstruction error (`vae_loss()` after a training forward pass).

Choices the paper leaves open (options in the plans, which the checkpoint keeps, so the engine rebuilds exactly):
- `blocks_down` (default [1, 2, 2, 4] as the paper, then 4 for deeper plans) and `blocks_up` (1 per level).
- GroupNorm with `norm_op_kwargs.num_groups` (8, the paper's), eps 1e-5, affine: the trainer writes these and
  ReLU into the plans' `norm_op` / `nonlin`, replacing nnU-Net's instance norm and leaky ReLU.
- Down-sampling convs use the plans' kernel and stride of the level (anisotropic [1,2,2] as planned); the VAE's
  stride-2 conv halves only axes of at least 2 voxels. Up-sampling is linear interpolation to the skip's size.
- `vae_latent` (128), `vae_kl_weight` / `vae_l2_weight` (0.1 / 0.1); sigma = softplus of its dense output (so it
  is positive; MONAI's choice); the VAE's dense layers are sized for `vae_input_size`, the plans' patch size.
  The VAE decoder has its own weights (the paper's VU blocks), not the segmentation decoder's.
- Segmentation heads: GroupNorm, ReLU, 1x1 conv (as MONAI's SegResNet) on every decoder level, for nnU-Net's
  deep supervision in training; inference uses the top one.
- `vae`: false builds the network without the VAE branch: what the engine runs (the branch is not needed to
  segment, so checkpoints with or without its weights load).
MONAI's SegResNetVAE (monai.networks.nets.segresnet, Apache-2.0) served as the model; nothing of it is imported.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import conv_dim, per_stage

VAE_CHANNELS = 16  # the paper's VD block: a stride-2 convolution to 16 channels


def make_norm(norm_op, channels: int, norm_op_kwargs: Optional[dict]) -> nn.Module:
    """`norm_op` for `channels` (GroupNorm takes its groups from the kwargs); Identity when there is none."""
    if norm_op is None:
        return nn.Identity()
    kwargs = dict(norm_op_kwargs or {})
    if norm_op is nn.GroupNorm:
        groups = int(kwargs.pop("num_groups", 8))
        if channels % groups:
            raise ValueError(f"GroupNorm with {groups} groups needs widths divisible by {groups}; one is {channels}")
        return nn.GroupNorm(groups, channels, **kwargs)
    return norm_op(channels, **kwargs)


class _Layers:
    """The plans' layer choices, to build convolutions, norms and nonlinearities with."""

    def __init__(self, conv_op, conv_bias, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs):
        self.conv_op, self.conv_bias, self.dim = conv_op, conv_bias, conv_dim(conv_op)
        self.norm_op, self.norm_op_kwargs, self.nonlin, self.nonlin_kwargs = norm_op, norm_op_kwargs, nonlin, \
            nonlin_kwargs

    def conv(self, cin, cout, kernel, stride=1, bias=None):
        kernel = per_stage(kernel, self.dim, "kernel size")
        return self.conv_op(cin, cout, kernel, stride, padding=[(k - 1) // 2 for k in kernel],
                            bias=self.conv_bias if bias is None else bias)

    def norm(self, channels):
        return make_norm(self.norm_op, channels, self.norm_op_kwargs)

    def act(self):
        return self.nonlin(**(self.nonlin_kwargs or {})) if self.nonlin is not None else nn.Identity()


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(act(norm(conv(act(norm(x))))))."""

    def __init__(self, layers: _Layers, channels: int, kernel):
        super().__init__()
        self.norm1, self.act1, self.conv1 = layers.norm(channels), layers.act(), layers.conv(channels, channels, kernel)
        self.norm2, self.act2, self.conv2 = layers.norm(channels), layers.act(), layers.conv(channels, channels, kernel)

    def forward(self, x):
        return x + self.conv2(self.act2(self.norm2(self.conv1(self.act1(self.norm1(x))))))


def _upsample(x, size):
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return F.interpolate(x, size=list(size), mode=mode, align_corners=False)


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size + 2 * ((kernel - 1) // 2) - kernel) // stride + 1


def default_blocks_down(n_stages: int):
    return ([1, 2, 2, 4] + [4] * max(0, n_stages - 4))[:n_stages]


class SegResNetEncoder(nn.Module):
    def __init__(self, layers: _Layers, input_channels, widths, kernels, strides, blocks_down, dropout):
        super().__init__()
        self.output_channels, self.kernel_sizes, self.strides = widths, kernels, strides
        self.stem = layers.conv(input_channels, widths[0], kernels[0])
        self.dropout = dropout if dropout is not None else nn.Identity()
        stages = []
        for s, width in enumerate(widths):
            down = [layers.conv(widths[s - 1], width, kernels[s], strides[s])] if s else []
            stages.append(nn.Sequential(*down, *[ResBlock(layers, width, kernels[s]) for _ in range(blocks_down[s])]))
        self.stages = nn.Sequential(*stages)

    def forward(self, x):
        x = self.dropout(self.stem(x))
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class SegResNetDecoder(nn.Module):
    """1x1 conv to the level's width, linear up-sampling, + the encoder's output, residual blocks; heads."""

    def __init__(self, layers: _Layers, encoder: SegResNetEncoder, num_classes, blocks_up, deep_supervision):
        super().__init__()
        self.deep_supervision = deep_supervision
        widths, n = encoder.output_channels, len(encoder.output_channels)
        self.reduce = nn.ModuleList(layers.conv(widths[-(u + 1)], widths[-(u + 2)], 1) for u in range(n - 1))
        self.stages = nn.ModuleList(
            nn.Sequential(*[ResBlock(layers, widths[-(u + 2)], encoder.kernel_sizes[-(u + 2)])
                            for _ in range(blocks_up[u])]) for u in range(n - 1))
        self.seg_layers = nn.ModuleList(
            nn.Sequential(layers.norm(widths[-(u + 2)]), layers.act(),
                          layers.conv(widths[-(u + 2)], num_classes, 1, bias=True)) for u in range(n - 1))

    def forward(self, skips):
        x, outputs = skips[-1], []
        for u, (reduce, stage) in enumerate(zip(self.reduce, self.stages)):
            skip = skips[-(u + 2)]
            x = stage(_upsample(reduce(x), skip.shape[2:]) + skip)
            if self.deep_supervision or u == len(self.stages) - 1:
                outputs.append(self.seg_layers[u](x))
        return outputs[::-1] if self.deep_supervision else outputs[-1]


class VAEBranch(nn.Module):
    """Reconstructs the input from the bottleneck through a sampled latent (the paper's VD, VDraw, VU, VUp, Vend)."""

    def __init__(self, layers: _Layers, input_channels, widths, kernels, strides, input_size, latent, kl_weight,
                 l2_weight):
        super().__init__()
        size = [int(s) for s in per_stage(input_size, layers.dim, "vae_input_size")]
        for kernel, stride in zip(kernels, strides):
            size = [_conv_out(s, k, st) for s, k, st in zip(size, kernel, stride)]
        self.bottleneck_size = size
        down_stride = [2 if s >= 2 else 1 for s in size]
        self.latent_size = [_conv_out(s, 3, st) for s, st in zip(size, down_stride)]
        elements = VAE_CHANNELS * int(torch.tensor(self.latent_size).prod())
        self.down = nn.Sequential(layers.norm(widths[-1]), layers.act(),
                                  layers.conv(widths[-1], VAE_CHANNELS, 3, down_stride, bias=True))
        self.fc_mean, self.fc_std = nn.Linear(elements, latent), nn.Linear(elements, latent)
        self.fc_up = nn.Linear(latent, elements)
        self.act = layers.act()
        self.up_conv = layers.conv(VAE_CHANNELS, widths[-1], 1)
        n = len(widths)
        self.reduce = nn.ModuleList(layers.conv(widths[-(u + 1)], widths[-(u + 2)], 1) for u in range(n - 1))
        self.blocks = nn.ModuleList(ResBlock(layers, widths[-(u + 2)], kernels[-(u + 2)]) for u in range(n - 1))
        self.end = layers.conv(widths[0], input_channels, 1, bias=True)
        self.kl_weight, self.l2_weight = float(kl_weight), float(l2_weight)

    def forward(self, image, bottleneck, level_sizes: Sequence):
        """(reconstruction, KL loss) for a batch whose encoder outputs had `level_sizes` (top level first)."""
        x = self.down(bottleneck).flatten(1)
        if x.shape[1] != self.fc_mean.in_features:
            raise ValueError(f"the VAE branch was built for the plans' patch size; it cannot train on patches of "
                             f"{list(image.shape[2:])}")
        # float32 whatever autocast chose: 1e-8 and small sigmas vanish in float16
        mean, std = self.fc_mean(x).float(), F.softplus(self.fc_std(x).float())
        z = mean + std * torch.randn_like(std)
        kl = (mean.square() + std.square() - torch.log(std.square() + 1e-8) - 1).sum(1).mean() / image[0, 0].numel()
        x = self.act(self.fc_up(z)).view(-1, VAE_CHANNELS, *self.latent_size)
        x = self.act(_upsample(self.up_conv(x), self.bottleneck_size))
        for u, (reduce, block) in enumerate(zip(self.reduce, self.blocks)):
            x = block(_upsample(reduce(x), level_sizes[-(u + 2)]))
        return self.end(x), kl


class SegResNetVAE(nn.Module):
    """PlainConvUNet's arguments (`n_conv_per_stage*` are not used: the residual blocks are `blocks_down`/
    `blocks_up`) plus the options in the module docstring."""

    def __init__(self, input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                 n_conv_per_stage, num_classes, n_conv_per_stage_decoder, conv_bias=False, norm_op=None,
                 norm_op_kwargs=None, dropout_op=None, dropout_op_kwargs=None, nonlin=None, nonlin_kwargs=None,
                 deep_supervision=False, nonlin_first=False, blocks_down=None, blocks_up=None, vae=True,
                 vae_input_size=None, vae_latent=128, vae_kl_weight=0.1, vae_l2_weight=0.1):
        super().__init__()
        if n_stages < 2:
            raise ValueError("SegResNetVAE needs at least two levels")
        dim = conv_dim(conv_op)
        layers = _Layers(conv_op, conv_bias, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs)
        widths = per_stage(features_per_stage, n_stages, "features_per_stage")
        kernels = [per_stage(k, dim, "kernel size") for k in per_stage(kernel_sizes, n_stages, "kernel_sizes")]
        strides = [per_stage(s, dim, "stride") for s in per_stage(strides, n_stages, "strides")]
        blocks_down = per_stage(default_blocks_down(n_stages) if blocks_down is None else blocks_down, n_stages,
                                "blocks_down")
        blocks_up = per_stage([1] * (n_stages - 1) if blocks_up is None else blocks_up, n_stages - 1, "blocks_up")
        dropout = dropout_op(**(dropout_op_kwargs or {})) if dropout_op is not None else None
        self.encoder = SegResNetEncoder(layers, input_channels, widths, kernels, strides, blocks_down, dropout)
        self.decoder = SegResNetDecoder(layers, self.encoder, num_classes, blocks_up, deep_supervision)
        if vae:
            if vae_input_size is None:
                raise ValueError("the VAE branch needs vae_input_size (the patch size it trains on)")
            self.vae = VAEBranch(layers, input_channels, widths, kernels, strides, vae_input_size, vae_latent,
                                 vae_kl_weight, vae_l2_weight)
        self.vae_terms = None

    def forward(self, x):
        skips = self.encoder(x)
        self.vae_terms = None
        if self.training and hasattr(self, "vae"):
            reconstruction, kl = self.vae(x, skips[-1], [s.shape[2:] for s in skips])
            self.vae_terms = {"kl": kl, "l2": F.mse_loss(reconstruction.float(), x.float())}
        return self.decoder(skips)

    def vae_loss(self):
        """0.1 L_KL + 0.1 L_L2 of the last training forward pass (0 when it ran without the VAE branch)."""
        if self.vae_terms is None:
            return 0.0
        return self.vae.kl_weight * self.vae_terms["kl"] + self.vae.l2_weight * self.vae_terms["l2"]
