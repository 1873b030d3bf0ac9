"""UNet++ (Zhou et al. 2018, "UNet++: A Nested U-Net Architecture for Medical Image Segmentation"), built from
an nnU-Net plans architecture (PlainConvUNet's arguments).

The network: encoder nodes X(i,0) are nnU-Net's encoder stages (strides and kernels from the plans, so an
anisotropic first pooling such as [1,2,2] is used as planned); every other node X(i,j), j >= 1, convolves the
concatenation of all the nodes before it on its level, X(i,0..j-1), with the up-sampled node below, X(i+1,j-1)
(the nested, densely connected skip pathways). A 1x1 head on each top node X(0,1)..X(0,n-1) gives the deep
supervision outputs (all at full resolution, deepest path first; the trainer weights them equally, as the
paper averages their losses). At inference one head is used: X(0,n-1), or X(0,L) when the network is pruned
to depth L (`prune_depth`, the paper's inference-time pruning: only nodes X(i,j) with i + j <= L run).

Choices the paper leaves open (fixed here; `prune_depth` is the only option and is kept in the checkpoint's plans):
- The backbone is nnU-Net's: stage s has `n_conv_per_stage[s]` conv-norm-nonlinearity units, the first strided
  (nnU-Net's learned down-sampling instead of the paper's max pooling), with the plans' layers.
- Up-sampling is a transposed convolution per node, kernel = stride = the level's stride, from the width below
  to the node's width (as nnU-Net's decoder and MONAI's BasicUNetPlusPlus `UpCat` with deconv).
- Node X(i,j) has the width of level i and `n_conv_per_stage_decoder` convs of that level (nnU-Net's decoder
  count for the stage), with the level's kernel.
- Weights are initialised as nnU-Net initialises PlainConvUNet (He, a=1e-2).
MONAI's BasicUNetPlusPlus (monai.networks.nets.basic_unetplusplus, Apache-2.0) served as the model for the
nested layout; nothing of it is imported (the runtime needs only torch).
"""
from typing import Optional

import torch
from torch import nn

from .blocks import StackedConvBlocks, conv_dim, per_stage
from .unet import PlainConvEncoder


class NestedDecoder(nn.Module):
    """The nodes X(i,j), j >= 1, their up-sampling convolutions and the heads on X(0,1)..X(0,n-1)."""

    def __init__(self, encoder: PlainConvEncoder, num_classes: int, n_conv_per_stage, deep_supervision: bool,
                 prune_depth: Optional[int] = None, nonlin_first: bool = False):
        super().__init__()
        n = len(encoder.output_channels)
        if n < 2:
            raise ValueError("UNet++ needs at least two stages")
        self.depth = n - 1
        self.prune_depth = check_prune_depth(prune_depth, self.depth)
        self.deep_supervision = deep_supervision
        n_convs = per_stage(n_conv_per_stage, n - 1, "n_conv_per_stage_decoder")
        transposed = nn.ConvTranspose2d if conv_dim(encoder.conv_op) == 2 else nn.ConvTranspose3d
        widths = encoder.output_channels
        self.nodes, self.ups = nn.ModuleDict(), nn.ModuleDict()
        for j in range(1, n):
            for i in range(n - j):
                stride = encoder.strides[i + 1]
                self.ups[f"{i}_{j}"] = transposed(widths[i + 1], widths[i], stride, stride, bias=encoder.conv_bias)
                # nnU-Net's decoder counts its stages from the bottom: level i is decoder stage n - 2 - i
                self.nodes[f"{i}_{j}"] = StackedConvBlocks(
                    n_convs[n - 2 - i], encoder.conv_op, (j + 1) * widths[i], widths[i], encoder.kernel_sizes[i], 1,
                    encoder.conv_bias, encoder.norm_op, encoder.norm_op_kwargs, encoder.dropout_op,
                    encoder.dropout_op_kwargs, encoder.nonlin, encoder.nonlin_kwargs, nonlin_first)
        self.seg_layers = nn.ModuleList(encoder.conv_op(widths[0], num_classes, 1, 1, 0, bias=True)
                                        for _ in range(1, n))

    def forward(self, skips):
        # training (deep supervision) always runs the full network; inference may be pruned
        depth = self.depth if self.deep_supervision else (self.prune_depth or self.depth)
        grid = {(i, 0): skip for i, skip in enumerate(skips[:depth + 1])}
        for j in range(1, depth + 1):
            for i in range(depth + 1 - j):
                below = self.ups[f"{i}_{j}"](grid[(i + 1, j - 1)])
                grid[(i, j)] = self.nodes[f"{i}_{j}"](torch.cat([grid[(i, k)] for k in range(j)] + [below], 1))
        if self.deep_supervision:  # deepest path first: nnU-Net validates on the first output
            return [self.seg_layers[j - 1](grid[(0, j)]) for j in range(depth, 0, -1)]
        return self.seg_layers[depth - 1](grid[(0, depth)])


def check_prune_depth(prune_depth, depth: int) -> Optional[int]:
    if prune_depth is None:
        return None
    if isinstance(prune_depth, bool) or not isinstance(prune_depth, int) or not 1 <= prune_depth <= depth:
        raise ValueError(f"prune_depth must be a whole number from 1 to {depth} (or null), not {prune_depth!r}")
    return prune_depth


class _PrunableEncoder(PlainConvEncoder):
    """PlainConvEncoder that stops after the stages a pruned UNet++ uses."""

    def forward(self, x, stages: Optional[int] = None):
        skips = []
        for stage in list(self.stages)[:stages]:
            x = stage(x)
            skips.append(x)
        return skips


class UNetPlusPlus(nn.Module):
    """PlainConvUNet's arguments plus `prune_depth` (None: the full depth n - 1)."""

    def __init__(self, input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                 n_conv_per_stage, num_classes, n_conv_per_stage_decoder, conv_bias=False, norm_op=None,
                 norm_op_kwargs=None, dropout_op=None, dropout_op_kwargs=None, nonlin=None, nonlin_kwargs=None,
                 deep_supervision=False, nonlin_first=False, prune_depth=None):
        super().__init__()
        self.encoder = _PrunableEncoder(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes,
                                        strides, n_conv_per_stage, conv_bias, norm_op, norm_op_kwargs, dropout_op,
                                        dropout_op_kwargs, nonlin, nonlin_kwargs, nonlin_first)
        self.decoder = NestedDecoder(self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision,
                                     prune_depth, nonlin_first)

    def forward(self, x):
        decoder = self.decoder
        depth = decoder.depth if decoder.deep_supervision else (decoder.prune_depth or decoder.depth)
        return decoder(self.encoder(x, depth + 1))

    # the trainer weights the deep-supervision outputs equally (all are full resolution; see nnunet_trainer)
    deep_supervision_weighting = "equal"
