"""Fine-tuning's patches: drawn as nnU-Net draws them and augmented in one resampling step (finetune.py trains on
them)."""
import math
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from ..inference.model import Model
from ..tensors import to_tensor


@dataclass
class TrainingData:
    """One corrected case as training sees it (finetune._training_data makes it)."""
    image: torch.Tensor                    # (C, Z, Y, X) float32, preprocessed as for prediction
    labels: np.ndarray                     # (Z, Y, X) int16 on the same grid
    foreground: Dict[int, np.ndarray]      # label -> (n, 3) voxel indices (at most 10000), for oversampling


class PatchSampler:
    """Patches at the plans' patch size, drawn as nnU-Net draws them (a third of each batch centred on a
    foreground voxel of a random label, the rest anywhere, small volumes padded; cases in shuffled rounds) and augmented in one
    resampling step: rotation (+-15 degrees; in-plane only for anisotropic patches, as nnU-Net's dummy-2D
    augmentation) and scaling (0.85-1.15), each with probability 0.2; mirroring on the model's mirroring
    axes; intensity scale (0.85-1.15) and shift (+-0.1 standard deviations), each with probability 0.3."""

    OVERSAMPLE_FOREGROUND = 0.33
    P_ROTATE, P_SCALE, P_INTENSITY = 0.2, 0.2, 0.3
    MAX_ANGLE, SCALE = math.radians(15), (0.85, 1.15)

    def __init__(self, model: Model, data: List[TrainingData], device, rng: np.random.Generator):
        self.patch = [int(p) for p in model.configuration.patch_size]
        self.is_2d = len(self.patch) == 2
        self.data, self.rng = data, rng
        self._rounds = {}  # "any" / "foreground" -> the cases still to draw in this round
        self.labels = [to_tensor(d.labels.astype(np.float32))[None, None].to(device) for d in data]
        self.mirror_axes = tuple(model.mirror_axes or ())
        self.in_plane_only = not self.is_2d and max(self.patch) / min(self.patch) > 3
        axes = [torch.arange(p, dtype=torch.float32, device=device) - (p - 1) / 2 for p in self.patch]
        self.offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)  # (*patch, dims) voxel offsets

    def batch(self, images: List[torch.Tensor], batch_size: int):
        random_ones = round(batch_size * (1 - self.OVERSAMPLE_FOREGROUND))
        xs, ys = [], []
        for b in range(batch_size):
            force = b >= random_ones
            k = self._next_case(force)
            x, y = self._sample(images[k], self.labels[k], self.data[k], force)
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys).long()

    def _next_case(self, with_foreground: bool) -> int:
        """Cases in shuffled rounds (every case once per round), so that however few iterations a time budget
        allows, each case is seen about equally often; foreground patches come from cases that have some."""
        key = "foreground" if with_foreground else "any"
        if not self._rounds.get(key):
            cases = [k for k, d in enumerate(self.data) if d.foreground or not with_foreground]
            self._rounds[key] = [int(k) for k in self.rng.permutation(cases)]
        return self._rounds[key].pop()

    def _sample(self, image, labels, data: TrainingData, force_foreground: bool):
        voxel = None
        if force_foreground:
            label = self.rng.choice(sorted(data.foreground))
            voxel = data.foreground[label][self.rng.integers(len(data.foreground[label]))]
        image, labels = image[None], labels
        if self.is_2d:  # a 2D model trains on slices along the first axis
            z = int(voxel[0]) if voxel is not None else int(self.rng.integers(image.shape[2]))
            image, labels = image[:, :, z], labels[:, :, z]
            voxel = voxel[1:] if voxel is not None else None
        shape = image.shape[2:]
        grid = self._grid(self._center(shape, voxel), self._matrix(), shape)
        x = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        y = F.grid_sample(labels, grid, mode="nearest", padding_mode="zeros", align_corners=True)
        flips = [2 + a for a in self.mirror_axes if self.rng.random() < 0.5]
        if flips:
            x, y = x.flip(flips), y.flip(flips)
        return self._intensity(x), y

    def _center(self, shape, voxel):
        """nnU-Net's patch placement: lower corners within [-pad/2, size + pad/2 - patch]."""
        center = []
        for axis, (size, patch) in enumerate(zip(shape, self.patch)):
            need = max(patch - size, 0)
            low, high = -(need // 2), size + need // 2 + need % 2 - patch
            corner = int(self.rng.integers(low, high + 1)) if voxel is None else \
                int(np.clip(int(voxel[axis]) - patch // 2, low, high))
            center.append(corner + (patch - 1) / 2)
        return center

    def _matrix(self) -> np.ndarray:
        """Output-patch offsets -> source offsets (voxels): rotation and scaling, or the identity."""
        dims = len(self.patch)
        matrix = np.eye(dims)
        if self.rng.random() < self.P_ROTATE:
            if dims == 2 or self.in_plane_only:
                matrix = rotation(dims, [(dims - 2, dims - 1, self._angle())]) @ matrix
            else:
                matrix = rotation(3, [(1, 2, self._angle()), (0, 2, self._angle()), (0, 1, self._angle())]) @ matrix
        if self.rng.random() < self.P_SCALE:
            matrix = matrix / self.rng.uniform(*self.SCALE)
        return matrix

    def _angle(self):
        return self.rng.uniform(-self.MAX_ANGLE, self.MAX_ANGLE)

    def _grid(self, center, matrix, shape):
        """grid_sample's normalised (x, y[, z]) grid for the patch around `center`."""
        m = to_tensor(np.asarray(matrix, np.float32)).to(self.offsets.device)
        source = self.offsets @ m.T + torch.tensor([float(c) for c in center], dtype=torch.float32, device=self.offsets.device)
        size = torch.tensor([max(s - 1, 1) for s in shape], dtype=torch.float32, device=self.offsets.device)
        return (2 * source / size - 1).flip(-1)[None]

    def _intensity(self, x):
        if self.rng.random() < self.P_INTENSITY:
            x = x * float(self.rng.uniform(*self.SCALE))
        if self.rng.random() < self.P_INTENSITY:
            x = x + float(self.rng.uniform(-0.1, 0.1))
        return x


def rotation(dims: int, planes) -> np.ndarray:
    """Product of rotations, each in the plane of two axes by an angle."""
    matrix = np.eye(dims)
    for a, b, angle in planes:
        r = np.eye(dims)
        r[a, a] = r[b, b] = math.cos(angle)
        r[a, b], r[b, a] = -math.sin(angle), math.sin(angle)
        matrix = r @ matrix
    return matrix
