"""Where the model is unsure: entropy and disagreement maps, and a table per segment.

    prediction = model.predict(volumes, uncertainty=True)
    prediction.uncertainty["entropy"]        # Volume, 0 (certain) .. 1 (every class equally likely)
    prediction.uncertainty["disagreement"]   # Volume, 0 (the passes agree) .. 1; only with several passes
    rows = segment_statistics(prediction)    # volume in mL, mean probability, mean uncertainty per segment
    write_uncertainty(prediction, "case.seg.nrrd")  # case_entropy.nrrd, case_disagreement.nrrd, case_segments.csv

Entropy is that of the model's probabilities (nnU-Net's softmax of the averaged logits; for region models the
mean binary entropy of the regions' sigmoids), divided by its largest possible value so that 1 means "no idea".
With several passes (mirrored TTA copies, folds) the sliding window also averages each pass's own entropy
(Gaussian-weighted like the logits); the disagreement is the entropy of the averaged prediction minus that
average: zero where the passes say the same thing, largest where they are each sure of different labels
(the mutual information of a prediction ensemble, with nnU-Net's averaged prediction standing for the mean).

Both maps are computed at the model's spacing, one slab of slices at a time (memory: a few slices of every
class), and resampled to the input's grid like one class of logits, so they cost two extra volumes, not
another copy of every class.
"""
import csv
import io
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ..tensors import to_numpy

SLAB = 8                  # slices of the first axis per step when computing the maps from all classes
UNCERTAIN_ABOVE = 0.5     # default threshold of the table's "uncertain voxels" fraction
OUTSIDE = {"entropy": 0.0, "confidence": 1.0, "disagreement": 0.0}  # outside the crop: background for sure


def normalized_entropy(logits: torch.Tensor, regions: bool) -> torch.Tensor:
    """Per voxel, in [0, 1]: softmax entropy over the class axis (0) / log(classes), or, for regions, the mean
    binary entropy of the sigmoids / log 2. float32 in, float32 out."""
    if regions:
        p = torch.sigmoid(logits)
        binary = -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p))
        return binary.mean(0) / float(np.log(2))
    log_p = torch.log_softmax(logits, 0)
    return -(log_p.exp() * log_p).sum(0) / float(np.log(max(logits.shape[0], 2)))


def confidence(logits: torch.Tensor, regions: bool) -> torch.Tensor:
    """The probability of what the label map says: the largest softmax probability (for regions, per region
    the larger of p and 1 - p, averaged)."""
    if regions:
        p = torch.sigmoid(logits)
        return torch.maximum(p, 1 - p).mean(0)
    return torch.softmax(logits, 0).amax(0)


def maps_at_model_spacing(logits: torch.Tensor, expected_entropy: Optional[torch.Tensor], regions: bool) -> Dict:
    """{"entropy", "confidence"[, "disagreement"]} float32 arrays at the model's spacing, slab by slab."""
    spatial = logits.shape[1:]
    entropy = np.empty(spatial, np.float32)
    sure = np.empty(spatial, np.float32)
    for start in range(0, spatial[0], SLAB):
        slab = logits[:, start:start + SLAB].float()
        entropy[start:start + SLAB] = to_numpy(normalized_entropy(slab, regions))
        sure[start:start + SLAB] = to_numpy(confidence(slab, regions))
    maps = {"entropy": entropy, "confidence": sure}
    if expected_entropy is not None:
        maps["disagreement"] = np.clip(entropy - to_numpy(expected_entropy.float()), 0.0, 1.0)
    return maps


def segment_statistics(prediction, threshold: float = UNCERTAIN_ABOVE) -> List[dict]:
    """Per segment: voxels, volume (mL), mean probability, mean entropy and the fraction of its voxels whose
    entropy is above `threshold` (needs a prediction made with uncertainty=True)."""
    labels = prediction.labels
    maps = prediction.uncertainty or {}
    voxel_ml = float(np.prod(labels.spacing[:labels.array.ndim])) / 1000.0
    rows = []
    for value, name in prediction.segments:
        mask = labels.array == value
        count = int(mask.sum())
        row = {"segment": name, "label": int(value), "voxels": count, "volume_ml": count * voxel_ml}
        if "entropy" in maps and count:
            entropy = maps["entropy"].array[mask]
            row.update(mean_probability=float(maps["confidence"].array[mask].mean()),
                       mean_uncertainty=float(entropy.mean()),
                       uncertain_fraction=float((entropy > threshold).mean()))
        rows.append(row)
    return rows


WRITTEN_MAPS = ("entropy", "disagreement")   # confidence is kept for the table only


def write_uncertainty(prediction, output, threshold: float = UNCERTAIN_ABOVE) -> List[Path]:
    """Beside `output` (the label map or .seg.nrrd): <name>_entropy and <name>_disagreement in the input's
    grid (NRRD for a .seg.nrrd output, else the output's own format) and <name>_segments.csv (the table)."""
    from ..io.images import atomic_output, write_volume
    from ..io.writers import SEG_NRRD, probabilities_path
    output = Path(output)
    base = probabilities_path(output).with_suffix("")  # the output's name without its ending
    ending = ".nrrd" if output.name.lower().endswith(SEG_NRRD) else output.name[len(base.name):]
    written = []
    try:
        for name in WRITTEN_MAPS:
            if name in (prediction.uncertainty or {}):
                written.append(write_volume(prediction.uncertainty[name], base.with_name(f"{base.name}_{name}{ending}")))
        table = base.with_name(f"{base.name}_segments.csv")
        with atomic_output(table) as temporary:
            Path(temporary).write_text(statistics_csv(segment_statistics(prediction, threshold)))
        written.append(table)
    except BaseException:
        for done in written:
            done.unlink(missing_ok=True)
        raise
    return written


def statistics_csv(rows: List[dict]) -> str:
    columns = ["segment", "label", "voxels", "volume_ml", "mean_probability", "mean_uncertainty", "uncertain_fraction"]
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()
