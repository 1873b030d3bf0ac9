"""How much memory a prediction would need, estimated from the plans' plain numbers before allocating.

A model folder can ask for absurd sizes (a patch of 10,000 voxels a side, a network of a million features):
allocating first would end in the operating system killing the process (no message at all) or in a machine
that swaps for an hour; so the size is estimated first and free_memory.refuse_unless_it_fits refuses a job that
cannot fit with what it would need and what there is. The estimates are upper bounds of the big arrays only;
they refuse the impossible, not the merely large.
"""
from typing import Sequence

import numpy as np


# ------------------------------------------------------------------------------------------- estimates

def network_bytes(architecture: dict, input_channels: int, outputs: int) -> float:
    """An upper bound of a U-Net's weights in bytes (fp32), from the plans' numbers alone.

    Each stage holds its encoder convolutions, its decoder convolutions and the up-convolution between
    them, each at most features x features x kernel; the first one of a stage reads the stage before.
    Values that are not numbers count as 1 (or 2 convolutions): building the network refuses them."""
    kwargs = architecture.get("arch_kwargs") or {}
    features = [_product(f) for f in _as_list(kwargs.get("features_per_stage"))]
    kernels = _as_list(kwargs.get("kernel_sizes")) or [3]
    encoder = _as_list(kwargs.get("n_conv_per_stage", kwargs.get("n_blocks_per_stage", 2)))
    decoder = _as_list(kwargs.get("n_conv_per_stage_decoder", 2))
    total, previous = 0.0, max(float(input_channels), 1.0)
    for stage, width in enumerate(features):
        kernel = _product(kernels[min(stage, len(kernels) - 1)])
        convolutions = _count(encoder, stage) * 2 + _count(decoder, stage) + 2  # x2: residual blocks, MBTFE branches
        total += kernel * width * (previous + width * convolutions)
        previous = width
    return 4.0 * (total + float(outputs) * (features[0] if features else 1.0))


def prediction_bytes(image_shape: Sequence[int], model_shape: Sequence[int], channels: int, heads: int,
                     patch: Sequence[int], first_features: int, batch: int, probabilities: bool = False) -> float:
    """An upper bound of one fold's big arrays when predicting a case.

    At the model's spacing: the float32 channels, a float64 resampling copy, fp16 logits and tile weights.
    Per tile batch: the float64 and fp16 Gaussian, and the first stage's activations (several live at once).
    Back in the image's grid: the input, the label map, and the export: one class at a time (float32, with
    the running maximum), or every class at once with the probabilities."""
    at_model = float(np.prod([max(int(s), int(p)) for s, p in zip(model_shape[-len(patch):], patch)]))
    if len(model_shape) > len(patch):
        at_model *= int(model_shape[0])
    voxels = float(np.prod([int(s) for s in image_shape]))
    tile = float(np.prod([int(p) for p in patch]))
    export = heads * 8 if probabilities else 12
    return (at_model * (channels * 4 + 8 + heads * 2 + 2) + tile * (10 + batch * first_features * 4 * 6)
            + voxels * (channels * 4 + 4 + export))


def _as_list(value):
    if isinstance(value, (list, tuple)):
        return list(value)
    return [] if value is None else [value]


def _product(value) -> float:
    """The product of the numbers in a (nested) list; anything else counts as 1."""
    if isinstance(value, (list, tuple)):
        return float(np.prod([_product(v) for v in value])) if value else 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return 1.0
    return min(abs(float(value)), 1e30)


def _count(values, index) -> float:
    """How many convolutions stage `index` has, from a per-stage list (numbers, or lists of them)."""
    value = values[min(index, len(values) - 1)] if values else 2
    if isinstance(value, (list, tuple)):
        return float(sum(_count([v], 0) for v in value))
    return _product(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 2.0
