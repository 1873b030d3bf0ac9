"""Convolution blocks of nnU-Net's networks, with the exact module names of dynamic-network-architectures.

We write these instead of depending on `dynamic_network_architectures` so the runtime needs only torch
(that package pulls timm and torchvision, whose CUDA builds fight with the torch Slicer users have).
Module and attribute names are kept identical so nnU-Net checkpoints load with strict key matching,
including the `all_modules` aliases that nnU-Net's state dicts carry.
"""
from typing import Sequence

from torch import nn


def as_list(value, n):
    """A per-dimension (or per-stage) list from a scalar or a sequence."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def conv_dim(conv_op) -> int:
    return 2 if conv_op in (nn.Conv2d, nn.ConvTranspose2d) else 3


class ConvDropoutNormReLU(nn.Module):
    """conv -> [dropout] -> [norm] -> [nonlinearity]; `conv`/`norm` alias `all_modules.N` as in nnU-Net."""

    def __init__(self, conv_op, input_channels, output_channels, kernel_size, stride, conv_bias=False,
                 norm_op=None, norm_op_kwargs=None, dropout_op=None, dropout_op_kwargs=None,
                 nonlin=None, nonlin_kwargs=None, nonlin_first=False):
        super().__init__()
        dim = conv_dim(conv_op)
        kernel_size, self.stride = as_list(kernel_size, dim), as_list(stride, dim)
        self.input_channels, self.output_channels = input_channels, output_channels
        self.conv = conv_op(input_channels, output_channels, kernel_size, self.stride,
                            padding=[(k - 1) // 2 for k in kernel_size], dilation=1, bias=conv_bias)
        ops = [self.conv]
        if dropout_op is not None:
            self.dropout = dropout_op(**(dropout_op_kwargs or {}))
            ops.append(self.dropout)
        if norm_op is not None:
            self.norm = norm_op(output_channels, **(norm_op_kwargs or {}))
            ops.append(self.norm)
        if nonlin is not None:
            self.nonlin = nonlin(**(nonlin_kwargs or {}))
            ops.append(self.nonlin)
        if nonlin_first and norm_op is not None and nonlin is not None:
            ops[-1], ops[-2] = ops[-2], ops[-1]
        self.all_modules = nn.Sequential(*ops)

    def forward(self, x):
        return self.all_modules(x)


class StackedConvBlocks(nn.Module):
    """`num_convs` ConvDropoutNormReLU in a row; only the first one is strided."""

    def __init__(self, num_convs, conv_op, input_channels, output_channels, kernel_size, initial_stride,
                 conv_bias=False, norm_op=None, norm_op_kwargs=None, dropout_op=None, dropout_op_kwargs=None,
                 nonlin=None, nonlin_kwargs=None, nonlin_first=False):
        super().__init__()
        channels = as_list(output_channels, num_convs)
        common = dict(conv_bias=conv_bias, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, dropout_op=dropout_op,
                      dropout_op_kwargs=dropout_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs,
                      nonlin_first=nonlin_first)
        inputs = [input_channels] + channels[:-1]
        strides = [initial_stride] + [1] * (num_convs - 1)
        self.convs = nn.Sequential(*[
            ConvDropoutNormReLU(conv_op, i, o, kernel_size, s, **common) for i, o, s in zip(inputs, channels, strides)])
        self.output_channels = channels[-1]
        self.initial_stride = as_list(initial_stride, conv_dim(conv_op))

    def forward(self, x):
        return self.convs(x)


class BasicBlockD(nn.Module):
    """ResNet-D basic block: the shortcut average-pools before its 1x1 projection instead of striding it."""

    def __init__(self, conv_op, input_channels, output_channels, kernel_size, stride, conv_bias=False,
                 norm_op=None, norm_op_kwargs=None, dropout_op=None, dropout_op_kwargs=None,
                 nonlin=None, nonlin_kwargs=None):
        super().__init__()
        dim = conv_dim(conv_op)
        stride = as_list(stride, dim)
        self.conv1 = ConvDropoutNormReLU(conv_op, input_channels, output_channels, kernel_size, stride, conv_bias,
                                         norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs)
        self.conv2 = ConvDropoutNormReLU(conv_op, output_channels, output_channels, kernel_size, 1, conv_bias,
                                         norm_op, norm_op_kwargs)
        self.nonlin2 = nonlin(**(nonlin_kwargs or {})) if nonlin is not None else nn.Identity()
        shortcut = []
        if any(s != 1 for s in stride):
            pool = nn.AvgPool2d if dim == 2 else nn.AvgPool3d
            shortcut.append(pool(stride, stride))
        if input_channels != output_channels:
            shortcut.append(ConvDropoutNormReLU(conv_op, input_channels, output_channels, 1, 1, False,
                                                norm_op, norm_op_kwargs))
        self.skip = nn.Sequential(*shortcut)  # empty Sequential is the identity and has no parameters

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        out += self.skip(x)
        return self.nonlin2(out)


class StackedResidualBlocks(nn.Module):
    def __init__(self, n_blocks, conv_op, input_channels, output_channels, kernel_size, initial_stride,
                 conv_bias=False, norm_op=None, norm_op_kwargs=None, dropout_op=None, dropout_op_kwargs=None,
                 nonlin=None, nonlin_kwargs=None):
        super().__init__()
        channels = as_list(output_channels, n_blocks)
        common = (conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs)
        inputs = [input_channels] + channels[:-1]
        strides = [initial_stride] + [1] * (n_blocks - 1)
        self.blocks = nn.Sequential(*[
            BasicBlockD(conv_op, i, o, kernel_size, s, *common) for i, o, s in zip(inputs, channels, strides)])
        self.output_channels = channels[-1]

    def forward(self, x):
        return self.blocks(x)


def per_stage(values: Sequence, n: int, what: str):
    values = as_list(values, n)
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} entries, expected {n}")
    return values
