"""A DICOM series' slices on one regular voxel grid, the way Slicer's DICOM scalar volume plugin does it.

ITK reads a series as if its slices were evenly spaced along the normal of the first slice: origin at the
first slice, the average distance between slices as spacing. Most series are like that, but not one with
missing slices or uneven spacing (every slice after a gap lands in the wrong place), nor a CT acquired with
a tilted gantry (each slice shifted within its plane from the one before). Slicer (DICOMScalarVolumePlugin.py,
`AcquisitionModeling`) compares where each slice is by its DICOM header with where ITK's grid put it and,
beyond a tolerance, adds a transform that moves every slice back to where it was acquired ("acquisition
geometry regularization"); its "harden" setting resamples that into the volume. A model needs voxels on a
regular grid, so we do what the hardened setting does: slices are placed where they were acquired and the
voxels resampled (linearly, between neighbouring slices) onto a regular grid perpendicular to the slices,
starting at the first slice, keeping its in-plane grid, with the most common distance between slices. The
label map then lies on that grid, which a note names.

Mixed orientations are split into one series per orientation before any of this (dicom_series.py), and
slices stacked at one position (two series mixed together) are refused: no grid can hold both.
"""
from typing import List, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

# Slicer's tolerance for "equally spaced" (DICOMUtils.getSortedImageFiles): positions rounded to two decimals
# in the header stay regular, and what is below it is far below any voxel.
TOLERANCE_MM = 0.01
SAME_POSITION_MM = 1e-3


def axes(orientation: Sequence[float]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row direction, column direction, slice normal) from Image Orientation (Patient), in LPS."""
    row, column = np.array(orientation[:3], float), np.array(orientation[3:6], float)
    return row, column, np.cross(row, column)


def slice_order(positions: np.ndarray, orientation: Sequence[float], what: str) -> List[int]:
    """Indices that sort the slices along their normal (as Slicer sorts them); slices sharing a position
    are refused, since they cannot be one volume."""
    along = positions @ axes(orientation)[2]
    order = np.argsort(along, kind="stable")
    if len(order) > 1 and np.min(np.diff(along[order])) < SAME_POSITION_MM:
        raise InputError(f"{what} has several slices at the same position; the folder probably mixes series, "
                         "put each series in its own folder.")
    return [int(i) for i in order]


def regularize(image: sitk.Image, positions: np.ndarray, orientation: Sequence[float], what: str
               ) -> Tuple[sitk.Image, str]:
    """(image, '') when every slice of ITK's `image` (read from the sorted slices at `positions`) is where it
    was acquired; otherwise the voxels resampled onto a regular grid, and a note saying why and onto what."""
    placed = np.array([image.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(len(positions))])
    if len(positions) < 2 or np.max(np.abs(placed - positions)) <= TOLERANCE_MM:
        return image, ""
    row, column, normal = axes(orientation)
    offsets = positions - positions[0]
    depth, in_plane = offsets @ normal, offsets @ np.stack([row, column], axis=1)
    step, count = _regular_steps(depth)
    array = _resample(sitk.GetArrayViewFromImage(image), depth, in_plane, image.GetSpacing()[:2], step, count)
    regular = sitk.GetImageFromArray(array)
    regular.SetSpacing((*image.GetSpacing()[:2], step))
    regular.SetOrigin(tuple(positions[0]))
    regular.SetDirection(tuple(np.stack([row, column, normal], axis=1).ravel()))
    return regular, _note(depth, in_plane, step, count, what)


def _regular_steps(depth: np.ndarray) -> Tuple[float, int]:
    """(distance between slices, number of slices) of a grid from the first slice to the last, with the
    most common distance (the median: missing slices are the exception)."""
    extent = float(depth[-1])
    count = max(int(round(extent / float(np.median(np.diff(depth))))), 1) + 1
    return extent / (count - 1), count


def _resample(array: np.ndarray, depth: np.ndarray, in_plane: np.ndarray, pixel: Sequence[float], step: float,
              count: int) -> np.ndarray:
    """Each target slice linearly between the two acquired slices around its depth, each of them first
    shifted within its plane onto the first slice's grid (a tilted gantry's shift; none otherwise)."""
    fill = float(array.min())
    out = np.empty((count,) + array.shape[1:], np.float32)
    for index in range(count):
        target = index * step
        below = int(np.clip(np.searchsorted(depth, target, side="right") - 1, 0, len(depth) - 2))
        weight = float(np.clip((target - depth[below]) / (depth[below + 1] - depth[below]), 0.0, 1.0))
        out[index] = (1 - weight) * _placed(array[below], in_plane[below], pixel, fill)
        if weight > 0:
            out[index] += weight * _placed(array[below + 1], in_plane[below + 1], pixel, fill)
    return out


def _placed(slice_: np.ndarray, offset_mm: np.ndarray, pixel: Sequence[float], fill: float) -> np.ndarray:
    """One slice (y, x) on the first slice's in-plane grid: moved by its in-plane offset (x, y in mm)."""
    shift = (offset_mm[1] / pixel[1], offset_mm[0] / pixel[0])
    if max(abs(s) for s in shift) < 1e-3:
        return slice_.astype(np.float32)
    from scipy.ndimage import shift as shifted
    return shifted(slice_.astype(np.float32), shift, order=1, mode="constant", cval=fill)


def _note(depth: np.ndarray, in_plane: np.ndarray, step: float, count: int, what: str) -> str:
    gaps = np.diff(depth)
    reasons = []
    if np.ptp(gaps) > TOLERANCE_MM:
        reasons.append(f"slice spacing varies from {gaps.min():.4g} to {gaps.max():.4g} mm (missing slices?)")
    if np.max(np.abs(in_plane)) > TOLERANCE_MM:
        tilt = np.degrees(np.arctan2(np.linalg.norm(in_plane[-1]), depth[-1]))
        reasons.append(f"the slices are tilted by {tilt:.3g} degrees (gantry tilt)")
    text = " and ".join(reasons) or "the slices are not where a regular grid puts them"
    return (f"{text[0].upper()}{text[1:]} in {what}; resampled onto {count} slices {step:.4g} mm apart, "
            "perpendicular to the slices, as Slicer's acquisition geometry regularization does.")
