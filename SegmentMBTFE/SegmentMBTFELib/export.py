"""From logits at the model's spacing to a label map (and probabilities) in the input's own grid.

nnU-Net's export: resample logits back to the cropped shape (kept in fp16, as nnU-Net stores them),
argmax (or sigmoid > 0.5 per region, later regions overwriting earlier ones), paste the crop into the
full volume, undo the transpose.
"""
from typing import Optional, Tuple

import numpy as np
import torch

from .modelfolder import Labels
from .preprocessing import Preprocessed
from .resampling import resample


def export(logits: torch.Tensor, pre: Preprocessed, labels: Labels, transpose_backward, resampling: dict,
           with_probabilities=False) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(label map, probabilities or None), both in the original (untransposed) array order."""
    logits = logits.cpu().numpy()
    logits = resample(logits, pre.shape_after_cropping, pre.model_spacing, pre.spacing, **resampling)
    probabilities = _probabilities(logits, labels) if with_probabilities else None
    labelmap = _labels(logits, labels, probabilities)
    crop = tuple(slice(lo, hi) for lo, hi in pre.bbox)
    dtype = np.uint8 if len(labels.foreground_labels) < 255 else np.uint16
    full = np.zeros(pre.shape_before_cropping, dtype=dtype)
    full[crop] = labelmap
    full = full.transpose(transpose_backward)
    if probabilities is not None:
        outside = np.zeros((probabilities.shape[0], *pre.shape_before_cropping), dtype=np.float32)
        if not labels.has_regions:
            outside[0] = 1  # outside the crop is background with certainty
        outside[(slice(None),) + crop] = probabilities
        probabilities = outside.transpose([0, *(t + 1 for t in transpose_backward)])
    return full, probabilities


def _probabilities(logits: np.ndarray, labels: Labels) -> np.ndarray:
    t = torch.from_numpy(logits).float()
    return (torch.sigmoid(t) if labels.has_regions else torch.softmax(t, 0)).numpy()


def _labels(logits: np.ndarray, labels: Labels, probabilities: Optional[np.ndarray]) -> np.ndarray:
    if not labels.has_regions:
        return logits.argmax(0)  # ties go to the lowest index, as in nnU-Net
    if probabilities is None:
        probabilities = _probabilities(logits, labels)
    labelmap = np.zeros(logits.shape[1:], dtype=np.uint16)
    for i, value in enumerate(labels.regions_class_order):
        labelmap[probabilities[i] > 0.5] = value
    return labelmap
