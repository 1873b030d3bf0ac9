"""nnU-Net v1's prediction: the steps where v1 computes differently from v2 (NNUNET_INFERENCE_SPEC.md
section 6), as a model.Model whose folder is a models/nnunet_v1.V1ModelFolder:

- preprocessing: crop to non-zero, NaN -> 0, resample, and only then normalise with v1's schemes (`nonCT`
  z-score with + 1e-8, `CT` with the key `sd`, `CT2`, `noNorm`; the masked variants use the resampled mask);
  the cascade's previous stage is resized uncropped onto the preprocessed grid, one-hot, as v1's predict does;
- sliding window: softmax per forward pass; the passes of one tile weighted 1/2^|mirror axes| in v1's fixed
  8-branch order; the Gaussian (sigma patch/8, peak 1, float32) only when there is more than one tile; float32
  sums of probabilities, averaged over tiles and then folds (with uncertainty maps, each pass's own entropy is
  averaged alongside, and the maps are those of the averaged probabilities, as uncertainty.py defines them);
- export: the averaged probabilities resampled with the plans' `segmentation_export_params` (default order 1,
  z order 0), argmax; v1's postprocessing.json (`for_which_classes`, `min_valid_object_sizes`).
"""
from functools import lru_cache
from typing import List

import numpy as np
import scipy.ndimage
import torch
from scipy.ndimage import gaussian_filter, label

from ..errors import ModelError
from ..models.checkpoint import load_checkpoint
from ..models.folder import Configuration
from ..models.nnunet_v1_weights import mirror_axes_for, v2_weights
from ..networks import build_network
from ..progress import Progress
from ..tensors import to_tensor
from .export import export
from .model import Model
from .preprocessing import Preprocessed, transpose_and_crop
from .resampling import compute_new_shape, resample
from .sliding_window import pad_to_patch, run_passes, tiles
from .uncertainty import maps_at_model_spacing


# -- preprocessing ---------------------------------------------------------------------------------------------

def preprocess_v1(channels, spacing_zyx, configuration: Configuration, transpose_forward, intensity_properties,
                  previous_stage=None, foreground_labels=()):
    """v1's preprocess_test_case (+ predict's previous-stage channels): transpose, crop to non-zero, NaN -> 0,
    resample (order 3, z order 0; the non-zero mask linearly), then normalise."""
    data, nonzero, spacing, shape_before, bbox = transpose_and_crop(channels, spacing_zyx, transpose_forward)
    shape_after_cropping = data.shape[1:]
    data[np.isnan(data)] = 0
    target = configuration.spacing
    if len(target) < data.ndim - 1:   # PreprocessorFor2D keeps the slice spacing
        target = [spacing[0]] + target
    new_shape = compute_new_shape(shape_after_cropping, spacing, target)
    data = resample(data, new_shape, spacing, target, order=3, order_z=0, force_separate_z=None)
    masks = configuration.get("use_mask_for_norm") or []
    inside = None
    if any(masks):   # v1 resamples its seg (-1 outside, 0 inside) with order 1 per label, z order 0
        inside = resample(nonzero.astype(np.float32)[None], new_shape, spacing, target, order=1, order_z=0)[0] >= 0.5
    normalize_v1(data, inside, configuration, intensity_properties)
    if previous_stage is not None:
        data = np.vstack((data, _previous_stage_one_hot(previous_stage, transpose_forward, data.shape[1:],
                                                         foreground_labels))).astype(np.float32)
    return Preprocessed(data, shape_before, bbox, shape_after_cropping, spacing, list(target))


def normalize_v1(data: np.ndarray, inside, configuration: Configuration, intensity_properties: dict):
    """GenericPreprocessor.resample_and_normalize's normalisation, written as v1 writes it (same numpy types)."""
    schemes = configuration["normalization_schemes"]
    use_mask = configuration.get("use_mask_for_norm") or [False] * len(schemes)
    for c in range(len(data)):
        scheme = schemes[c]
        if scheme in ("CT", "CT2"):
            stats = intensity_properties.get(c, intensity_properties.get(str(c)))
            if not isinstance(stats, dict) or not all(k in stats for k in ("mean", "sd", "percentile_00_5",
                                                                             "percentile_99_5")):
                raise ModelError(f"The v1 plans lack the intensity statistics CT normalisation needs for channel {c}.")
            lower_bound, upper_bound = stats["percentile_00_5"], stats["percentile_99_5"]
            if scheme == "CT":
                data[c] = np.clip(data[c], lower_bound, upper_bound)
                data[c] = (data[c] - stats["mean"]) / stats["sd"]
            else:
                mask = (data[c] > lower_bound) & (data[c] < upper_bound)
                data[c] = np.clip(data[c], lower_bound, upper_bound)
                mn, sd = data[c][mask].mean(), data[c][mask].std()
                data[c] = (data[c] - mn) / sd
            if use_mask[c]:
                data[c][~inside] = 0
        elif scheme == "noNorm":
            pass
        elif use_mask[c]:
            data[c][inside] = (data[c][inside] - data[c][inside].mean()) / (data[c][inside].std() + 1e-8)
            data[c][~inside] = 0
        else:
            mn = data[c].mean()
            std = data[c].std()
            data[c] = (data[c] - mn) / (std + 1e-8)


def _previous_stage_one_hot(previous, transpose_forward, shape, labels) -> np.ndarray:
    """v1's predict: the lowres label map transposed, resized (uncropped, as v1 does) onto the preprocessed grid
    with resize_segmentation(order=1), one channel per foreground label."""
    seg = np.asarray(previous).transpose(transpose_forward)
    resized = np.zeros(shape, dtype=seg.dtype)
    zoom = [n / o for n, o in zip(shape, seg.shape)]
    for value in np.unique(seg):
        mask = scipy.ndimage.zoom((seg == value).astype(float), zoom, order=1, mode="nearest", grid_mode=True)
        resized[mask >= 0.5] = value
    return np.stack([(resized == label).astype(np.float32) for label in labels]) if len(labels) else \
        np.zeros((0, *shape), np.float32)


# -- sliding window --------------------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def _gaussian_v1(patch_size: tuple) -> np.ndarray:
    """SegmentationNetwork._get_gaussian: sigma patch/8, peak 1, float32, zeros lifted to the smallest value."""
    tmp = np.zeros(patch_size)
    tmp[tuple(p // 2 for p in patch_size)] = 1
    g = gaussian_filter(tmp, [p / 8 for p in patch_size], 0, mode="constant", cval=0)
    g = (g / np.max(g) * 1).astype(np.float32)
    g[g == 0] = np.min(g[g != 0])
    return g


def _v1_flips(mirror_axes, dims: int) -> List[tuple]:
    """The mirrored passes of _internal_maybe_mirror_and_pred_3D/2D, in v1's order (batch axes: +2)."""
    if not mirror_axes:
        return []
    axes = set(mirror_axes)
    if dims == 3:
        order = [((2,), (4,)), ((1,), (3,)), ((2, 1), (4, 3)), ((0,), (2,)), ((0, 2), (4, 2)), ((0, 1), (3, 2)),
                 ((0, 1, 2), (4, 3, 2))]
    else:
        order = [((1,), (3,)), ((0,), (2,)), ((0, 1), (3, 2))]
    return [flip for needed, flip in order if axes.issuperset(needed)]


def predict_probabilities_v1(network, data, patch_size, num_heads: int, *, step_size=0.5, mirror_axes=None,
                             device=None, results_device=None, batch_size: int = 2, progress=None, pass_entropy=None):
    """Sliding-window softmax probabilities (float32) as v1's predict_3D computes them; same arguments and
    results as sliding_window.predict_logits (with `pass_entropy`: (probabilities, mean entropy of the passes)),
    so model.Model runs it in place of that."""
    progress = progress or Progress()
    padded, undo = pad_to_patch(data, patch_size)
    padded = padded.to(results_device)
    spatial = padded.shape[1:]
    all_tiles = tiles(spatial, patch_size, step_size)
    per_window = len(all_tiles) // spatial[0] if len(patch_size) < len(spatial) else len(all_tiles)
    gaussian = to_tensor(_gaussian_v1(tuple(int(p) for p in patch_size))).to(results_device) \
        if per_window > 1 else None
    weight = gaussian if gaussian is not None else torch.ones(tuple(patch_size), device=results_device)
    probabilities = torch.zeros((num_heads, *spatial), dtype=torch.float32, device=results_device)
    counts = torch.zeros(spatial, dtype=torch.float32, device=results_device)
    expected = torch.zeros(spatial, dtype=torch.float32, device=results_device) if pass_entropy else None
    flips = _v1_flips(mirror_axes, len(patch_size))
    share = 1 / (2 ** len(mirror_axes)) if flips else 1
    per_step = max(1, batch_size // (len(flips) + 1))
    for first in range(0, len(all_tiles), per_step):
        group = all_tiles[first:first + per_step]
        progress.report(first / len(all_tiles), f"tile {first + 1} of {len(all_tiles)}")
        patches = torch.stack([padded[tile] for tile in group]).to(device)
        copies = torch.cat([patches] + [torch.flip(patches, axes) for axes in flips])
        outputs = torch.cat([o.float() for o in run_passes(network, copies, batch_size, progress)])
        n = len(group)
        result = torch.zeros((n, num_heads, *patch_size), dtype=torch.float32, device=device)
        entropy = 0
        for k, axes in enumerate([()] + flips):
            softmax = torch.softmax(outputs[k * n:(k + 1) * n], 1)
            result += share * (torch.flip(softmax, axes) if axes else softmax)
            if pass_entropy:   # each pass's own entropy (uncertainty.py), averaged over the passes
                each = pass_entropy(outputs[k * n:(k + 1) * n])
                entropy = entropy + (torch.flip(each, [a - 1 for a in axes]) if axes else each) / (len(flips) + 1)
        if gaussian is not None:
            result *= gaussian.to(device)
        result = result.to(results_device)
        for i, (tile, prediction) in enumerate(zip(group, result)):
            probabilities[tile] += prediction
            counts[tile[1:]] += weight
            if pass_entropy:
                expected[tile[1:]] += entropy[i].to(results_device) * weight
    progress.report(1.0, f"tile {len(all_tiles)} of {len(all_tiles)}")
    probabilities /= counts
    if pass_entropy:
        return probabilities[undo], (expected / counts)[undo[1:]]
    return probabilities[undo]


# -- postprocessing --------------------------------------------------------------------------------------------

def remove_all_but_largest_component_v1(labelmap: np.ndarray, recipe: dict, voxel_volume: float) -> np.ndarray:
    """postprocessing/connected_components.py::remove_all_but_the_largest_connected_component: per class (or
    group of classes) keep the largest 6-connected object(s); with min_valid_object_sizes, only smaller objects
    below that volume (mm3) go."""
    sizes_min = recipe.get("min_valid_object_sizes")
    for c in recipe["for_which_classes"]:
        mask = np.isin(labelmap, c if isinstance(c, tuple) else [c])
        components, count = label(mask.astype(int))
        if count == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=count + 1)[1:] * voxel_volume
        largest = sizes.max()
        for index, size in enumerate(sizes, start=1):
            if size != largest and (sizes_min is None or size < sizes_min[c]):
                labelmap[(components == index) & mask] = 0
    return labelmap


# -- the model -------------------------------------------------------------------------------------------------

class V1Model(Model):
    """An nnU-Net v1 model: weights mapped onto PlainConvUNet, predicted with v1's arithmetic."""
    _preprocess = staticmethod(preprocess_v1)
    _sliding_window = staticmethod(predict_probabilities_v1)
    _export = staticmethod(lambda *args, **kwargs: export(*args, given_probabilities=True, **kwargs))
    # uncertainty.py reads logits: the log of v1's averaged probabilities has those very probabilities as softmax
    _maps_at_model_spacing = staticmethod(lambda probabilities, expected, regions: maps_at_model_spacing(
        torch.log(probabilities.float().clamp_min(1e-30)), expected, regions))

    def _read_checkpoint(self, path) -> dict:
        checkpoint = load_checkpoint(path, weights_key="state_dict", kind="an nnU-Net v1 checkpoint")
        template = getattr(self, "_template", None)
        if template is None:
            n_in = len(self.folder.channel_names) + (len(self.folder.labels.foreground_labels)
                                                     if self.folder.configuration.previous_stage else 0)
            template = self._template = build_network(self.folder.configuration.architecture, n_in,
                                                      self.folder.labels.num_heads)
        return {"network_weights": v2_weights(checkpoint["state_dict"], template),
                "trainer_name": self.folder.trainer_name, "epoch": checkpoint.get("epoch"),
                "inference_allowed_mirroring_axes": mirror_axes_for(self.folder.trainer_name,
                                                                    len(self.folder.configuration.patch_size))}

    def finish(self, case):
        """v1 postprocesses the written label map, with the image's voxel volume for object sizes."""
        recipe = self.postprocessing if case.postprocess else None
        case.postprocess = False
        prediction = super().finish(case)
        if recipe:
            voxel_volume = float(np.prod(case.volume.spacing, dtype=np.float64))
            labels = prediction.labels.array
            prediction.labels = prediction.labels.with_array(
                remove_all_but_largest_component_v1(labels, recipe, voxel_volume), name="segmentation")
            prediction.settings["postprocessing"] = True
        return prediction
