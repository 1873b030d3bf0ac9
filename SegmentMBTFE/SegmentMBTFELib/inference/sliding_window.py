"""Sliding-window prediction with Gaussian tile weighting and mirroring test-time augmentation.

The tile grid, the Gaussian, the order of the mirrored passes and the fp16 accumulators are nnU-Net
v2's (`nnunetv2/inference/sliding_window_prediction.py`, `predict_from_raw_data.py`), so the summed
logits are the ones nnU-Net computes. We write the loop ourselves rather than using MONAI's inferer
because nnU-Net's evenly spread steps and fp16 weight map differ from MONAI's and decide the result.
"""
import itertools
from functools import lru_cache
from typing import List, Optional, Sequence

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from ..progress import Progress
from ..tensors import to_tensor


def tile_starts(image_size: Sequence[int], patch_size: Sequence[int], step_size: float) -> List[List[int]]:
    """Evenly spaced tile starts per axis; neighbours overlap by at least 1 - step_size of a patch."""
    starts = []
    for size, patch in zip(image_size, patch_size):
        n = int(np.ceil((size - patch) / (patch * step_size))) + 1
        if n > 1:
            starts.append([int(np.round((size - patch) / (n - 1) * i)) for i in range(n)])
        else:
            starts.append([0])
    return starts


def tiles(image_size: Sequence[int], patch_size: Sequence[int], step_size: float) -> List[tuple]:
    """Index tuples (channel slice first) of every tile, in nnU-Net's order (last axis innermost).

    A 2D model on a 3D volume visits every slice of the first axis with 2D tiles over the other two.
    """
    if len(patch_size) == len(image_size) - 1:
        starts = tile_starts(image_size[1:], patch_size, step_size)
        return [(slice(None), d, *(slice(s, s + p) for s, p in zip(corner, patch_size)))
                for d in range(image_size[0]) for corner in itertools.product(*starts)]
    starts = tile_starts(image_size, patch_size, step_size)
    return [(slice(None), *(slice(s, s + p) for s, p in zip(corner, patch_size)))
            for corner in itertools.product(*starts)]


@lru_cache(maxsize=4)
def _gaussian(patch_size: tuple) -> np.ndarray:
    centre = np.zeros(patch_size)
    centre[tuple(p // 2 for p in patch_size)] = 1
    g = gaussian_filter(centre, [p / 8 for p in patch_size], 0, mode="constant", cval=0)
    return g / (np.max(g) / 10)


def gaussian_weights(patch_size: Sequence[int], device) -> torch.Tensor:
    """nnU-Net's tile weight: a Gaussian with sigma patch/8, peak 10, in fp16, zeros lifted to the smallest value."""
    g = to_tensor(_gaussian(tuple(int(p) for p in patch_size))).to(device=device, dtype=torch.float16)
    zero = g == 0
    g[zero] = torch.min(g[~zero])
    return g


def pad_to_patch(data: torch.Tensor, patch_size: Sequence[int]):
    """Zero-pad the trailing axes shorter than the patch, centred; returns (padded, slices that undo it)."""
    spatial = data.shape[-len(patch_size):]
    extra = [max(p - s, 0) for s, p in zip(spatial, patch_size)]
    if not any(extra):
        return data, (slice(None),) * data.ndim
    pad = []
    for e in reversed(extra):  # F.pad wants the last axis first
        pad += [e // 2, e - e // 2]
    padded = torch.nn.functional.pad(data, pad, mode="constant", value=0)
    lead = data.ndim - len(patch_size)
    undo = (slice(None),) * lead + tuple(slice(e // 2, e // 2 + s) for e, s in zip(extra, spatial))
    return padded, undo


def mirror_combinations(mirror_axes: Optional[Sequence[int]]) -> List[tuple]:
    """Every non-empty combination of the (batch-shifted) mirror axes, in itertools order as nnU-Net."""
    if not mirror_axes:
        return []
    axes = [a + 2 for a in mirror_axes]
    return [c for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]


def network_batch_size(patch_size, first_features: int, device) -> int:
    """How many patches (tiles x mirrored copies) go through the network at once.

    On the CPU, torch runs a batch of one small 3D patch through its slow reference convolution
    (`slow_conv3d`) and only batches of two or more through oneDNN, 5-8x faster here; so we never send a
    single patch. Beyond two, bigger batches gain little; the cap of 8 holds one tile's mirrored copies
    in 3D, and the memory bound keeps the first stage's activations of a batch near 256 MB (fp32).
    """
    voxels = int(np.prod(patch_size)) * max(int(first_features), 1) * 4
    return max(2, min(8, (256 << 20) // voxels))


def _run(network, batch: torch.Tensor) -> torch.Tensor:
    if batch.shape[0] == 1 and batch.device.type == "cpu":
        return network(torch.cat([batch, batch]))[:1]  # see network_batch_size
    return network(batch)


def run_passes(network, copies: torch.Tensor, batch_size: int, progress: Optional[Progress] = None) -> list:
    """The network's outputs for `copies`, `batch_size` at a time, with a cancel point before every pass: a
    big tile's mirrored copies can take several passes of seconds each on a CPU, and a cancel should not
    wait for all of them."""
    outputs = []
    for i in range(0, copies.shape[0], batch_size):
        if progress is not None:
            progress.check_cancel()
        outputs.append(_run(network, copies[i:i + batch_size]))
    return outputs


def predict_tiles(network, patches: torch.Tensor, flips: List[tuple], batch_size: int, pass_entropy=None,
                  progress: Optional[Progress] = None):
    """Logits of each patch averaged over its mirrored copies, summed in nnU-Net's order.

    All copies of all patches run through the network in batches; flipping back and averaging happen
    per patch afterwards, so the sums are those of nnU-Net's one-pass-at-a-time loop. With `pass_entropy`
    (logits (n, C, *patch) -> (n, *patch)) it also returns the mean over the copies of each one's entropy.
    `progress` is checked for a cancel before every network pass (run_passes).
    """
    copies = torch.cat([patches] + [torch.flip(patches, axes) for axes in flips]) if flips else patches
    outputs = run_passes(network, copies, batch_size, progress)
    outputs = torch.cat(outputs) if len(outputs) > 1 else outputs[0]  # logits are big: no copy when one batch
    n = patches.shape[0]
    prediction = outputs[:n]
    entropy = pass_entropy(prediction) if pass_entropy else None  # before the sum below changes it
    for k, axes in enumerate(flips, start=1):
        copy = torch.flip(outputs[k * n:(k + 1) * n], axes)
        if pass_entropy:
            entropy += pass_entropy(copy)
        prediction += copy
    if flips:
        prediction /= len(flips) + 1
        if pass_entropy:
            entropy /= len(flips) + 1
    return prediction if pass_entropy is None else (prediction, entropy)


@torch.inference_mode()
def predict_logits(network, data: torch.Tensor, patch_size, num_heads: int, *, step_size=0.5, mirror_axes=None,
                   device=torch.device("cpu"), results_device=torch.device("cpu"), batch_size: int = 2,
                   progress: Optional[Progress] = None, pass_entropy=None):
    """Sliding-window logits (fp16, on `results_device`) for preprocessed `data` (C, *spatial). With
    `pass_entropy` (see predict_tiles) also the Gaussian-weighted mean of each pass's entropy (float32):
    (logits, expected entropy)."""
    progress = progress or Progress()
    padded, undo = pad_to_patch(data, patch_size)
    padded = padded.to(results_device)
    spatial = padded.shape[1:]
    logits = torch.zeros((num_heads, *spatial), dtype=torch.half, device=results_device)
    weights = torch.zeros(spatial, dtype=torch.half, device=results_device)
    expected = torch.zeros(spatial, dtype=torch.float32, device=results_device) if pass_entropy else None
    gaussian = gaussian_weights(patch_size, results_device)
    flips = mirror_combinations(mirror_axes)
    all_tiles = tiles(spatial, patch_size, step_size)
    # At most two tiles per step, and a cancel is checked before every network pass (predict_tiles), so a
    # cancel waits for the pass that is running: two tiles, or (with TTA) one tile's mirrored copies at most.
    per_step = max(1, min(2, batch_size // (len(flips) + 1)))
    for first in range(0, len(all_tiles), per_step):
        group = all_tiles[first:first + per_step]
        progress.report(first / len(all_tiles), f"tile {first + 1} of {len(all_tiles)}")
        patches = torch.stack([padded[tile] for tile in group]).to(device, non_blocking=True)
        predictions = predict_tiles(network, patches, flips, batch_size, pass_entropy, progress)
        if pass_entropy:
            predictions, entropies = predictions
            for tile, entropy in zip(group, entropies.to(results_device)):
                expected[tile[1:]] += entropy * gaussian
        predictions = predictions.to(results_device)
        for i, (tile, prediction) in enumerate(zip(group, predictions)):
            if i:
                progress.report((first + i) / len(all_tiles), f"tile {first + i + 1} of {len(all_tiles)}")
            prediction *= gaussian
            logits[tile] += prediction
            weights[tile[1:]] += gaussian
    progress.report(1.0, f"tile {len(all_tiles)} of {len(all_tiles)}")
    torch.div(logits, weights, out=logits)
    if any(float(low) == -np.inf or float(high) == np.inf for low, high in map(torch.aminmax, logits)):
        # per channel, and by min/max: torch.isinf on the whole fp16 tensor makes a float32 copy of it (3.5 GB
        # for 26 classes of a 512 x 512 x 300 CT at 1.5 mm) and takes seconds
        raise FloatingPointError("The summed logits overflowed fp16.")
    if pass_entropy:
        return logits[undo], (expected / weights)[undo[1:]]
    return logits[undo]
