"""From logits at the model's spacing to a label map (and probabilities) in the input's own grid.

nnU-Net's export: resample logits back to the cropped shape (kept in fp16, as nnU-Net stores them),
argmax (or sigmoid > 0.5 per region, later regions overwriting earlier ones), paste the crop into the
full volume, undo the transpose.

nnU-Net resamples every class's logits at once, so its memory grows with labels x voxels (a 25-label model
on a 512 x 512 x 300 CT: about 8 GB of float32 logits and their float64 copies). Without probabilities we
resample one class at a time and keep a running maximum and its index: the same argmax, ties to the lowest
class as numpy's, from one class at full resolution plus the running maximum (fp16) and the label map.
Regions are streamed the same way. Probabilities (asked for explicitly) still need every class at once.
"""
from typing import Optional, Tuple

import numpy as np
import torch

from ..models.folder import Labels
from ..tensors import to_numpy, to_tensor
from ..volume import label_dtype
from .preprocessing import Preprocessed
from .resampling import resample


def export(logits: torch.Tensor, pre: Preprocessed, labels: Labels, transpose_backward, resampling: dict,
           with_probabilities=False, given_probabilities=False,
           check_cancel=None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(label map, probabilities or None), both in the original (untransposed) array order.
    given_probabilities: `logits` are already probabilities (nnU-Net v1 averages and resamples those).
    check_cancel (Progress.check_cancel) is called before each class is resampled: on a big many-class image
    the export takes seconds (26 classes of a 512 x 512 x 300 CT: 7.4 s), too long for a cancel to wait."""
    logits = to_numpy(logits)
    if with_probabilities:
        logits = resample(logits, pre.shape_after_cropping, pre.model_spacing, pre.spacing, **resampling)
        probabilities = logits if given_probabilities else _probabilities(logits, labels)
        labelmap = _labels(logits, labels, probabilities)
    else:
        probabilities = None
        classes = _classes_resampled(logits, pre, resampling, check_cancel)
        labelmap = _streamed_regions(classes, labels) if labels.has_regions else _streamed_argmax(classes)
    crop = tuple(slice(lo, hi) for lo, hi in pre.bbox)
    dtype = label_dtype(max([*labels.all_labels, *(labels.regions_class_order or [])]))
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


def export_map(values: np.ndarray, pre: Preprocessed, transpose_backward, resampling: dict,
               outside: float) -> np.ndarray:
    """One float map at the model's spacing (an uncertainty map) in the input's grid, like one class of
    logits; `outside` fills what the crop to non-zero left out."""
    resampled = resample(values[None], pre.shape_after_cropping, pre.model_spacing, pre.spacing, **resampling)[0]
    full = np.full(pre.shape_before_cropping, outside, dtype=np.float32)
    full[tuple(slice(lo, hi) for lo, hi in pre.bbox)] = resampled
    return full.transpose(transpose_backward)


def _classes_resampled(logits: np.ndarray, pre: Preprocessed, resampling: dict, check_cancel=None):
    """Each class's logits resampled, one at a time, with a cancel point before each."""
    for index in range(logits.shape[0]):
        if check_cancel is not None:
            check_cancel()
        yield _resampled(logits, index, pre, resampling)


def _resampled(logits: np.ndarray, index: int, pre: Preprocessed, resampling: dict) -> np.ndarray:
    """One class's logits in the cropped input grid (fp16, as the all-at-once resampling keeps them)."""
    return resample(logits[index:index + 1], pre.shape_after_cropping, pre.model_spacing, pre.spacing,
                    **resampling)[0]


def _streamed_argmax(classes) -> np.ndarray:
    """argmax over classes given one at a time; a strictly larger value wins, so ties go to the lowest.
    In torch, whose fp16 comparisons run on both cores, 5x faster here than numpy's emulated ones."""
    best = to_tensor(np.array(next(classes), copy=True))
    labelmap, index = torch.zeros(best.shape, dtype=torch.uint8), 0
    better = torch.empty(best.shape, dtype=torch.bool)
    for index, value in enumerate(map(to_tensor, classes), start=1):
        if index > 255 and labelmap.dtype == torch.uint8:
            labelmap = labelmap.int()  # torch's wider unsigned types cannot be filled; converted below
        torch.gt(value, best, out=better)
        labelmap.masked_fill_(better, index)
        torch.maximum(best, value, out=best)
    return to_numpy(labelmap).astype(label_dtype(index), copy=False)


def _streamed_regions(classes, labels: Labels) -> np.ndarray:
    """Sigmoid > 0.5 per region, in regions_class_order, later regions overwriting earlier ones."""
    labelmap = None
    for value, logits in zip(labels.regions_class_order, classes):
        if labelmap is None:
            labelmap = np.zeros(logits.shape, dtype=label_dtype(max(labels.regions_class_order)))
        labelmap[to_numpy(torch.sigmoid(to_tensor(logits).float())) > 0.5] = value
    return labelmap


def _probabilities(logits: np.ndarray, labels: Labels) -> np.ndarray:
    t = to_tensor(logits).float()
    return to_numpy(torch.sigmoid(t) if labels.has_regions else torch.softmax(t, 0))


def _labels(logits: np.ndarray, labels: Labels, probabilities: Optional[np.ndarray]) -> np.ndarray:
    if not labels.has_regions:
        return logits.argmax(0)  # ties go to the lowest index, as in nnU-Net
    if probabilities is None:
        probabilities = _probabilities(logits, labels)
    labelmap = np.zeros(logits.shape[1:], dtype=label_dtype(max(labels.regions_class_order)))
    for i, value in enumerate(labels.regions_class_order):
        labelmap[probabilities[i] > 0.5] = value
    return labelmap
