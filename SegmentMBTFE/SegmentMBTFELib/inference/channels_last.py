"""The torch network on the CPU in channels-last memory: the same numbers, up to 1.7x faster per tile here.

Why: oneDNN, which runs torch's CPU convolutions, computes 3D (and 2D) convolutions in channels-last order
(NDHWC). Given nnU-Net's usual NCDHW tensors it reorders every layer's input and output; given channels-last
tensors it does not. Instance normalisation is the catch: torch computes it by reshaping to (1, N*C, ...),
which a channels-last tensor can only do through two full copies, and its channels-last batch norm sums the
statistics one voxel after another in float32, 100x less exact than its NCDHW path (1e-3 of a standard
deviation on a nearly constant tile: the air around a body, where instance normalisation divides a tiny
spread by itself). So the instance and group norms here compute their statistics on the (voxels x
channels) matrix a channels-last sample already is, with torch's pairwise sums and the two-pass variance:
as exact as torch's NCDHW path, without the copies.

The output layer gives its logits back in NCDHW order, computed as one matrix product per tile (a 1x1x1
convolution is one) straight into that order: the sliding window adds each tile into the NCDHW sum of all
tiles, which took 2.7x longer from a channels-last tile, and a separate reordering copy cost as much as it saved.

Per tile against NCDHW (README, *The OpenVINO backend*): nnU-Net's U-Nets, UNet++ and the 3D U-Net 1.2-1.7x,
MBTFE-UNet and SegResNetVAE about 1.0x (as exact; left channels-last for one code path). A network whose class says
`channels_last_helps = False` runs as it is: Primus, a transformer whose convolutions are its patch embedding and
decoder (V1 the same speed either way, V3 14% slower channels-last, and NCDHW is nnU-Net's very order).

Only for inference on the CPU: the network's parameters are made channels-last and its norms and output
layer are given the classes below for the duration of a `with channels_last(network, device, outputs):`
block, then restored, so training and the GPU see the network as it was. Other layers (convolutions,
transposed convolutions, batch norm, activations, concatenation) take channels-last tensors natively.
"""
from contextlib import contextmanager

import torch
from torch import nn


def _normalised(x: torch.Tensor, groups: int, weight, bias, eps: float) -> torch.Tensor:
    """Group normalisation (instance normalisation when groups == channels) of a channels-last batch."""
    channels = x.shape[1]
    out = torch.empty_like(x)
    for sample, result in zip(x, out):
        rows = sample.movedim(0, -1).reshape(-1, groups, channels // groups)  # a view: voxels x groups x channels
        centred = result.movedim(0, -1).view(rows.shape)
        count = rows.shape[0] * rows.shape[2]
        # the voxels first, on their own: torch sums one dimension pairwise, but not two at once
        torch.sub(rows, rows.sum(0).sum(-1, keepdim=True) / count, out=centred)
        scale = torch.rsqrt((centred * centred).sum(0).sum(-1, keepdim=True) / count + eps)
        if weight is None:
            centred.mul_(scale)
        else:
            centred.mul_(scale * weight.view(groups, -1)).add_(bias.view(groups, -1))
    return out


def _is_channels_last(x: torch.Tensor) -> bool:
    layout = {5: torch.channels_last_3d, 4: torch.channels_last}.get(x.dim())
    return layout is not None and x.is_contiguous(memory_format=layout) and not x.requires_grad


class _ChannelsLastInstanceNorm:
    def forward(self, x):
        if not _is_channels_last(x):
            return super().forward(x)
        return _normalised(x, x.shape[1], self.weight, self.bias, self.eps)


class ChannelsLastInstanceNorm3d(_ChannelsLastInstanceNorm, nn.InstanceNorm3d):
    pass


class ChannelsLastInstanceNorm2d(_ChannelsLastInstanceNorm, nn.InstanceNorm2d):
    pass


class ChannelsLastGroupNorm(nn.GroupNorm):
    def forward(self, x):
        if not _is_channels_last(x):
            return super().forward(x)
        return _normalised(x, self.num_groups, self.weight, self.bias, self.eps)


class _OutputLayer:
    """A 1x1(x1) convolution whose channels-last input gives logits in the ordinary (NCDHW) order."""

    def forward(self, x):
        if not _is_channels_last(x):
            return super().forward(x)
        out = torch.empty((x.shape[0], self.out_channels, *x.shape[2:]), dtype=x.dtype)
        weight = self.weight.reshape(self.out_channels, self.in_channels)
        bias = torch.zeros(self.out_channels) if self.bias is None else self.bias
        for sample, result in zip(x, out):
            voxels = sample.movedim(0, -1).reshape(-1, self.in_channels)  # a view, as in _normalised
            torch.addmm(bias[:, None], weight, voxels.t(), out=result.view(self.out_channels, -1))
        return out


class ChannelsLastOutputConv3d(_OutputLayer, nn.Conv3d):
    pass


class ChannelsLastOutputConv2d(_OutputLayer, nn.Conv2d):
    pass


_REPLACEMENTS = {nn.InstanceNorm3d: ChannelsLastInstanceNorm3d, nn.InstanceNorm2d: ChannelsLastInstanceNorm2d,
                 nn.GroupNorm: ChannelsLastGroupNorm}
_OUTPUT_LAYERS = {nn.Conv3d: ChannelsLastOutputConv3d, nn.Conv2d: ChannelsLastOutputConv2d}


def _replacement(module: nn.Module, outputs: int):
    """The class `module` takes in the block, or None."""
    kind = type(module)
    if kind in _REPLACEMENTS and not getattr(module, "track_running_stats", False):
        return _REPLACEMENTS[kind]
    if kind in _OUTPUT_LAYERS and module.out_channels == outputs and module.groups == 1 and \
            all(k == 1 for k in (*module.kernel_size, *module.stride, *module.dilation)) and \
            not any(module.padding) and module.padding_mode == "zeros":
        return _OUTPUT_LAYERS[kind]
    return None


@contextmanager
def channels_last(network: nn.Module, device: torch.device, outputs: int):
    """Within the block, `network` (a torch module) runs channels-last when `device` is the CPU; else as it is.
    `outputs`: the number of logits the network gives per voxel (its pointwise convolutions with as many output
    channels are its output layers)."""
    if device.type != "cpu" or not isinstance(network, nn.Module) or not getattr(network, "channels_last_helps", True):
        yield network
        return
    # The class is swapped in place rather than the module replaced: nnU-Net's blocks hold the same norm
    # module twice (as `norm` and inside `all_modules`), and a swap keeps both references and the weights.
    swapped = [(m, type(m), new) for m in network.modules() if (new := _replacement(m, outputs))]
    layout = torch.channels_last_3d if any(isinstance(m, nn.Conv3d) for m in network.modules()) \
        else torch.channels_last
    try:
        for module, _, replacement in swapped:
            module.__class__ = replacement
        yield _reordered(network, layout)
    finally:
        for module, original, _ in swapped:
            module.__class__ = original
        _reordered(network, torch.contiguous_format)


def _reordered(network: nn.Module, layout) -> nn.Module:
    # Outside inference mode: parameters made inside it could not be trained later (a fine-tune of this model).
    with torch.inference_mode(False), torch.no_grad():
        return network.to(memory_format=layout)
