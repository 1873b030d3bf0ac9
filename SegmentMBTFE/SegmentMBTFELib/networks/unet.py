"""nnU-Net's U-Nets (PlainConvUNet, ResidualEncoderUNet), rebuilt from plans with checkpoint-compatible names.

The decoder keeps a reference to the encoder (`decoder.encoder`) exactly as dynamic-network-architectures
does, because nnU-Net state dicts repeat every encoder tensor under that prefix.
"""
import torch
from torch import nn

from .blocks import StackedConvBlocks, StackedResidualBlocks, conv_dim, per_stage


class _Encoder(nn.Module):
    """Shared bookkeeping the decoder reads (strides, kernels, widths, the ops to reuse) and the forward pass."""

    def forward(self, x):
        """Every stage's output: the skips, the last one being the bottleneck."""
        stem = self._modules.get("stem")  # ResidualEncoder's first convolution, before the stages
        if stem is not None:
            x = stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips

    def _remember(self, conv_op, features, strides, kernel_sizes, conv_bias, norm_op, norm_op_kwargs,
                  dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs):
        dim = conv_dim(conv_op)
        self.output_channels = list(features)
        self.strides = [per_stage(s, dim, "stride") for s in strides]
        self.kernel_sizes = [per_stage(k, dim, "kernel size") for k in kernel_sizes]
        self.conv_op, self.conv_bias = conv_op, conv_bias
        self.norm_op, self.norm_op_kwargs = norm_op, norm_op_kwargs
        self.dropout_op, self.dropout_op_kwargs = dropout_op, dropout_op_kwargs
        self.nonlin, self.nonlin_kwargs = nonlin, nonlin_kwargs
        self.return_skips = True


class PlainConvEncoder(_Encoder):
    def __init__(self, input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                 n_conv_per_stage, conv_bias=False, norm_op=None, norm_op_kwargs=None, dropout_op=None,
                 dropout_op_kwargs=None, nonlin=None, nonlin_kwargs=None, nonlin_first=False):
        super().__init__()
        features = per_stage(features_per_stage, n_stages, "features_per_stage")
        kernel_sizes = per_stage(kernel_sizes, n_stages, "kernel_sizes")
        strides = per_stage(strides, n_stages, "strides")
        n_convs = per_stage(n_conv_per_stage, n_stages, "n_conv_per_stage")
        stages, channels = [], input_channels
        for s in range(n_stages):
            # Each stage is wrapped in a Sequential: nnU-Net's keys read encoder.stages.S.0.convs...
            stages.append(nn.Sequential(StackedConvBlocks(
                n_convs[s], conv_op, channels, features[s], kernel_sizes[s], strides[s], conv_bias, norm_op,
                norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs, nonlin_first)))
            channels = features[s]
        self.stages = nn.Sequential(*stages)
        self._remember(conv_op, features, strides, kernel_sizes, conv_bias, norm_op, norm_op_kwargs,
                       dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs)


class ResidualEncoder(_Encoder):
    def __init__(self, input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                 n_blocks_per_stage, conv_bias=False, norm_op=None, norm_op_kwargs=None, dropout_op=None,
                 dropout_op_kwargs=None, nonlin=None, nonlin_kwargs=None, stem_channels=None):
        super().__init__()
        features = per_stage(features_per_stage, n_stages, "features_per_stage")
        kernel_sizes = per_stage(kernel_sizes, n_stages, "kernel_sizes")
        strides = per_stage(strides, n_stages, "strides")
        n_blocks = per_stage(n_blocks_per_stage, n_stages, "n_blocks_per_stage")
        ops = (conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs)
        stem_channels = stem_channels or features[0]
        self.stem = StackedConvBlocks(1, conv_op, input_channels, stem_channels, kernel_sizes[0], 1, *ops)
        stages, channels = [], stem_channels
        for s in range(n_stages):
            stages.append(StackedResidualBlocks(n_blocks[s], conv_op, channels, features[s], kernel_sizes[s],
                                                strides[s], *ops))
            channels = features[s]
        self.stages = nn.Sequential(*stages)
        self._remember(conv_op, features, strides, kernel_sizes, *ops)


class UNetDecoder(nn.Module):
    """Transposed conv up, concatenate the skip, convolve with the skip stage's kernel, 1x1 segmentation head."""

    def __init__(self, encoder, num_classes, n_conv_per_stage, deep_supervision, nonlin_first=False,
                 kernel_sizes=None):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.encoder = encoder
        self.num_classes = num_classes
        n = len(encoder.output_channels)
        n_convs = per_stage(n_conv_per_stage, n - 1, "n_conv_per_stage_decoder")
        transpconv_op = nn.ConvTranspose2d if conv_dim(encoder.conv_op) == 2 else nn.ConvTranspose3d
        stages, transpconvs, seg_layers = [], [], []
        for s in range(1, n):
            below, skip = encoder.output_channels[-s], encoder.output_channels[-(s + 1)]
            stride = encoder.strides[-s]
            transpconvs.append(transpconv_op(below, skip, stride, stride, bias=encoder.conv_bias))
            stages.append(StackedConvBlocks(
                n_convs[s - 1], encoder.conv_op, 2 * skip, skip,
                kernel_sizes[s - 1] if kernel_sizes else encoder.kernel_sizes[-(s + 1)], 1,
                encoder.conv_bias, encoder.norm_op, encoder.norm_op_kwargs, encoder.dropout_op,
                encoder.dropout_op_kwargs, encoder.nonlin, encoder.nonlin_kwargs, nonlin_first))
            seg_layers.append(encoder.conv_op(skip, num_classes, 1, 1, 0, bias=True))
        self.stages = nn.ModuleList(stages)
        self.transpconvs = nn.ModuleList(transpconvs)
        self.seg_layers = nn.ModuleList(seg_layers)

    def forward(self, skips):
        x = skips[-1]
        outputs = []
        last = len(self.stages) - 1
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(torch.cat((up(x), skips[-(s + 2)]), 1))
            if self.deep_supervision or s == last:
                outputs.append(self.seg_layers[s](x))
        # Highest resolution first, as nnU-Net's deep-supervision loss expects.
        return outputs[::-1] if self.deep_supervision else outputs[-1]


class PlainConvUNet(nn.Module):
    def __init__(self, input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                 n_conv_per_stage, num_classes, n_conv_per_stage_decoder, conv_bias=False, norm_op=None,
                 norm_op_kwargs=None, dropout_op=None, dropout_op_kwargs=None, nonlin=None, nonlin_kwargs=None,
                 deep_supervision=False, nonlin_first=False, decoder_kernel_sizes=None):
        """decoder_kernel_sizes: one kernel per decoder stage, deepest first, where they differ from the skip
        stages' (nnU-Net v1's Generic_UNet convolves decoder step u with conv_kernel_sizes[-(u + 1)])."""
        super().__init__()
        self.encoder = PlainConvEncoder(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                                        n_conv_per_stage, conv_bias, norm_op, norm_op_kwargs, dropout_op,
                                        dropout_op_kwargs, nonlin, nonlin_kwargs, nonlin_first)
        self.decoder = UNetDecoder(self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision,
                                   nonlin_first, decoder_kernel_sizes)

    def forward(self, x):
        return self.decoder(self.encoder(x))


class ResidualEncoderUNet(nn.Module):
    def __init__(self, input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                 n_blocks_per_stage, num_classes, n_conv_per_stage_decoder, conv_bias=False, norm_op=None,
                 norm_op_kwargs=None, dropout_op=None, dropout_op_kwargs=None, nonlin=None, nonlin_kwargs=None,
                 deep_supervision=False, stem_channels=None):
        super().__init__()
        self.encoder = ResidualEncoder(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                                       n_blocks_per_stage, conv_bias, norm_op, norm_op_kwargs, dropout_op,
                                       dropout_op_kwargs, nonlin, nonlin_kwargs, stem_channels)
        self.decoder = UNetDecoder(self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision)

    def forward(self, x):
        return self.decoder(self.encoder(x))
