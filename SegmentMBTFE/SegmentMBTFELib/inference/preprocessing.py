"""nnU-Net's inference preprocessing: transpose, crop to non-zero, normalise, resample to the model's spacing.

Each step follows nnU-Net v2's DefaultPreprocessor in order and in float32, so the network sees the
same numbers as under nnU-Net. The seg-mask resampling nnU-Net also does at inference is skipped: only
the cascade needs a segmentation, and then it is the previous stage's.
"""
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
from scipy.ndimage import binary_fill_holes

from ..errors import InputError, ModelError
from ..models.folder import Configuration
from .resampling import compute_new_shape, resample


@dataclass
class Preprocessed:
    data: np.ndarray                     # (C, *shape) float32 at the model's spacing
    shape_before_cropping: tuple         # transposed original shape
    bbox: List[List[int]]                # half-open crop box in the transposed original
    shape_after_cropping: tuple
    spacing: List[float]                 # transposed original spacing (z, y, x order permuted)
    model_spacing: List[float]           # the spacing `data` is at (3 entries, also for 2D models)


def preprocess(channels: List[np.ndarray], spacing_zyx, configuration: Configuration, transpose_forward,
               intensity_properties: dict, previous_stage: Optional[np.ndarray] = None,
               foreground_labels=()) -> Preprocessed:
    data, nonzero, spacing, shape_before, bbox = transpose_and_crop(channels, spacing_zyx, transpose_forward)
    crop = tuple(slice(lo, hi) for lo, hi in bbox)
    shape_after_cropping = data.shape[1:]

    target = configuration.spacing
    if len(target) < data.ndim - 1:  # 2D model on a 3D volume: keep the slice axis as it is
        target = [spacing[0]] + target
    new_shape = compute_new_shape(shape_after_cropping, spacing, target)
    normalize(data, nonzero, configuration, intensity_properties)
    data = resample(data, new_shape, spacing, target, **resampling_kwargs(configuration, "data"))
    if previous_stage is not None:
        data = np.concatenate([data, _previous_stage_channels(previous_stage, transpose_forward, crop, new_shape,
                                                               spacing, target, configuration, foreground_labels)])
    return Preprocessed(data, shape_before, bbox, shape_after_cropping, spacing, list(target))


def transpose_and_crop(channels: List[np.ndarray], spacing_zyx, transpose_forward):
    """The channels stacked in float32, in the plans' axis order, cropped to the box of non-zero voxels (holes
    filled), as nnU-Net v1 and v2 both start: (data, its non-zero mask, spacing, shape before cropping, box)."""
    data = np.stack([np.asarray(c, dtype=np.float32) for c in channels])
    data = data.transpose([0, *(t + 1 for t in transpose_forward)])
    spacing = [float(spacing_zyx[t]) for t in transpose_forward]
    shape_before = data.shape[1:]
    nonzero = binary_fill_holes(np.any(data != 0, axis=0))
    bbox = bounding_box(nonzero)
    crop = tuple(slice(lo, hi) for lo, hi in bbox)
    return data[(slice(None),) + crop], nonzero[crop], spacing, shape_before, bbox


def bounding_box(mask: np.ndarray) -> List[List[int]]:
    """Half-open [start, end) per axis of the True voxels; the whole extent when there are none."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append([int(hits[0]), int(hits[-1]) + 1] if hits.size else [0, mask.shape[axis]])
    return box


def normalize(data: np.ndarray, nonzero: np.ndarray, configuration: Configuration, intensity_properties: dict):
    """In place, per channel, with the scheme the plans name (nnU-Net's default_normalization_schemes)."""
    schemes = configuration["normalization_schemes"]
    use_mask = configuration.get("use_mask_for_norm") or [False] * len(schemes)
    for c in range(data.shape[0]):
        scheme = schemes[c] if c < len(schemes) else schemes[-1]
        x = data[c]
        if scheme == "ZScoreNormalization":
            if use_mask[c]:
                values = x[nonzero]
                x[nonzero] = (values - values.mean()) / max(values.std(), 1e-8)
            else:
                mean, std = x.mean(), x.std()
                x -= mean
                x /= max(std, 1e-8)
        elif scheme == "CTNormalization":
            stats = intensity_properties.get(str(c))
            if stats is None:
                raise ModelError(f"plans.json lacks the intensity statistics CT normalisation needs for channel {c}.")
            np.clip(x, stats["percentile_00_5"], stats["percentile_99_5"], out=x)
            x -= stats["mean"]
            x /= max(stats["std"], 1e-8)
        elif scheme == "RescaleTo01Normalization":
            x -= x.min()
            x /= np.clip(x.max(), 1e-8, None)
        elif scheme == "RGBTo01Normalization":
            if x.min() < 0 or x.max() > 255:
                raise InputError(f"Channel {c} should be an RGB image (0..255) but holds values outside that range.")
            x /= 255.0
        elif scheme != "NoNormalization":
            raise ModelError(f"Unsupported normalization scheme '{scheme}' in plans.json.")


def resampling_kwargs(configuration: Configuration, what: str) -> dict:
    """Order, z-order and separate-z choice for `what` ("data" or "probabilities") from the plans."""
    function = str(configuration.get(f"resampling_fn_{what}", "resample_data_or_seg_to_shape"))
    kwargs = configuration.get(f"resampling_fn_{what}_kwargs") or {}
    if function.endswith("resample_torch_fornnunet") or function.endswith("resample_torch_simple"):
        # nnU-Net's torch resampling: linear in-plane, nearest along a separate z axis.
        return {"order": 1, "order_z": 0, "force_separate_z": kwargs.get("force_separate_z")}
    if not function.endswith("resample_data_or_seg_to_shape") and not function.endswith("resample_data_or_seg_to_spacing"):
        raise ModelError(f"Unsupported resampling function '{function}' in plans.json.")
    default_order = 3 if what == "data" else 1
    try:
        orders = int(kwargs.get("order", default_order)), int(kwargs.get("order_z", 0))
    except (TypeError, ValueError):
        orders = (-1, -1)
    if not all(0 <= order <= 5 for order in orders):
        raise ModelError(f"plans.json: the resampling orders for {what} must be whole numbers from 0 to 5.")
    return {"order": orders[0], "order_z": orders[1], "force_separate_z": kwargs.get("force_separate_z")}


def resample_label_map(seg: np.ndarray, new_shape, spacing, target, configuration: Configuration) -> np.ndarray:
    """A label map resampled as nnU-Net resamples training segmentations: each label's mask linearly,
    kept where it reaches 0.5 (labels in increasing order, so a later label wins a tie)."""
    if tuple(seg.shape) == tuple(new_shape):
        return seg
    kwargs = resampling_kwargs(configuration, "data")
    kwargs["order"] = 1
    out = np.zeros(new_shape, dtype=seg.dtype)
    for label in np.unique(seg):
        if label != 0:
            mask = resample((seg == label).astype(np.float32)[None], new_shape, spacing, target, **kwargs)[0]
            out[mask >= 0.5] = label
    return out


def _previous_stage_channels(previous, transpose_forward, crop, new_shape, spacing, target, configuration, labels):
    """One-hot channels of the previous cascade stage's label map, cropped and resampled like the image."""
    seg = np.asarray(previous).transpose(transpose_forward)[crop]
    channels = []
    for label in labels:
        mask = (seg == label).astype(np.float32)[None]
        kwargs = resampling_kwargs(configuration, "data")
        kwargs["order"] = 1  # nnU-Net resamples segmentations per label with linear interpolation
        resized = resample(mask, new_shape, spacing, target, **kwargs)[0]
        channels.append((resized >= 0.5).astype(np.float32))
    return np.stack(channels) if channels else np.zeros((0, *new_shape), np.float32)
