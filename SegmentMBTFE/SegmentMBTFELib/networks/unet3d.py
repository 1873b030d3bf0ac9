"""The original 3D U-Net (Cicek et al. 2016, "3D U-Net: Learning Dense Volumetric Segmentation from Sparse
Annotation"), built from an nnU-Net plans architecture (PlainConvUNet's arguments), in 3D and 2D.

As in the paper: every level has conv-BN-ReLU units (the plans' `n_conv_per_stage`, two in nnU-Net's plans as in
the paper) whose last one doubles the channels ("channel doubling before max pooling": 32 -> 64 at the top,
64 -> 128 below, ...); levels are joined by max pooling; the decoder up-samples with a transposed convolution
that keeps the channels (512 -> 512 in the paper), concatenates the skip and convolves down to the skip's width;
a final 1x1 convolution gives the classes. The trainer's architecture names BatchNorm and ReLU (the paper's) as
the plans' `norm_op` / `nonlin`, so the checkpoint's plans state them.

Choices the paper leaves open or that nnU-Net's inference needs (fixed here, except `channel_doubling`):
- Widths: level s ends at the plans' `features_per_stage[s]`; its other convs have half of that
  (`channel_doubling`: true, the paper; false: every conv at the level's width).
- Convolutions are padded ("same"): the paper's unpadded convs shrink the output, which nnU-Net's sliding
  window, and every nnU-Net plan, cannot use. Kernels are the plans' (1x3x3 where nnU-Net plans anisotropy).
- Max pooling and the up-convolutions use the plans' strides (e.g. [1,2,2]) as kernel and stride.
- A 1x1 head per decoder level gives nnU-Net's deep-supervision outputs in training; inference uses the top one.
- Weights are initialised as nnU-Net initialises its networks (He, a=1e-2).
"""
import torch
from torch import nn

from .blocks import ConvDropoutNormReLU, as_list, conv_dim, per_stage


def _stage_widths(width: int, n_convs: int, doubling: bool):
    """Output widths of one level's convs: half the level's width, the last one doubling it."""
    return [max(1, width // 2) if doubling else width] * (n_convs - 1) + [width]


class UNet3DEncoder(nn.Module):
    def __init__(self, input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                 n_conv_per_stage, conv_bias=False, norm_op=None, norm_op_kwargs=None, dropout_op=None,
                 dropout_op_kwargs=None, nonlin=None, nonlin_kwargs=None, channel_doubling=True):
        super().__init__()
        dim = conv_dim(conv_op)
        self.output_channels = per_stage(features_per_stage, n_stages, "features_per_stage")
        self.kernel_sizes = [per_stage(k, dim, "kernel size") for k in per_stage(kernel_sizes, n_stages,
                                                                                   "kernel_sizes")]
        self.strides = [per_stage(s, dim, "stride") for s in per_stage(strides, n_stages, "strides")]
        n_convs = per_stage(n_conv_per_stage, n_stages, "n_conv_per_stage")
        self.ops = dict(conv_bias=conv_bias, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, dropout_op=dropout_op,
                        dropout_op_kwargs=dropout_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs)
        self.conv_op = conv_op
        pool = nn.MaxPool2d if dim == 2 else nn.MaxPool3d
        stages, channels = [], input_channels
        for s in range(n_stages):
            units = [pool(self.strides[s], self.strides[s])] if any(x > 1 for x in self.strides[s]) else []
            for width in _stage_widths(self.output_channels[s], n_convs[s], channel_doubling):
                units.append(ConvDropoutNormReLU(conv_op, channels, width, self.kernel_sizes[s], 1, **self.ops))
                channels = width
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)

    def forward(self, x):
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class UNet3DDecoder(nn.Module):
    def __init__(self, encoder: UNet3DEncoder, num_classes, n_conv_per_stage, deep_supervision):
        super().__init__()
        self.deep_supervision = deep_supervision
        n = len(encoder.output_channels)
        n_convs = per_stage(n_conv_per_stage, n - 1, "n_conv_per_stage_decoder")
        transposed = nn.ConvTranspose2d if conv_dim(encoder.conv_op) == 2 else nn.ConvTranspose3d
        widths = encoder.output_channels
        ups, stages, heads = [], [], []
        for u in range(n - 1):  # from the bottom up
            below, skip, stride = widths[-(u + 1)], widths[-(u + 2)], encoder.strides[-(u + 1)]
            ups.append(transposed(below, below, stride, stride, bias=encoder.ops["conv_bias"]))
            units, channels = [], below + skip
            for _ in range(n_convs[u]):
                units.append(ConvDropoutNormReLU(encoder.conv_op, channels, skip, encoder.kernel_sizes[-(u + 2)], 1,
                                                 **encoder.ops))
                channels = skip
            stages.append(nn.Sequential(*units))
            heads.append(encoder.conv_op(skip, num_classes, 1, 1, 0, bias=True))
        self.transpconvs, self.stages, self.seg_layers = (nn.ModuleList(m) for m in (ups, stages, heads))

    def forward(self, skips):
        x, outputs = skips[-1], []
        for u, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(torch.cat((up(x), skips[-(u + 2)]), 1))
            if self.deep_supervision or u == len(self.stages) - 1:
                outputs.append(self.seg_layers[u](x))
        return outputs[::-1] if self.deep_supervision else outputs[-1]


class UNet3D(nn.Module):
    """PlainConvUNet's arguments plus `channel_doubling` (see the module docstring)."""

    def __init__(self, input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                 n_conv_per_stage, num_classes, n_conv_per_stage_decoder, conv_bias=False, norm_op=None,
                 norm_op_kwargs=None, dropout_op=None, dropout_op_kwargs=None, nonlin=None, nonlin_kwargs=None,
                 deep_supervision=False, nonlin_first=False, channel_doubling=True):
        super().__init__()
        if nonlin_first:
            raise ValueError("the 3D U-Net applies the nonlinearity after the norm (nonlin_first must be false)")
        if not isinstance(channel_doubling, bool):
            raise ValueError(f"channel_doubling must be true or false, not {channel_doubling!r}")
        if n_stages < 2:
            raise ValueError("the 3D U-Net needs at least two levels")
        self.encoder = UNet3DEncoder(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                                     as_list(n_conv_per_stage, n_stages), conv_bias, norm_op, norm_op_kwargs,
                                     dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs, channel_doubling)
        self.decoder = UNet3DDecoder(self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision)

    def forward(self, x):
        return self.decoder(self.encoder(x))
