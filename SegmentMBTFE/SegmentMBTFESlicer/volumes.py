"""Volume nodes to the engine's `Volume` and back: the same voxels, the geometry converted from RAS to LPS.

Slicer's `arrayFromVolume` gives the (k, j, i) array, which is the array SimpleITK gives for the same file,
so the voxels pass unchanged. Only the geometry differs: MRML states IJK-to-RAS, ITK (and so the engine)
states origin, spacing and direction in LPS, i.e. with the first two rows negated.
"""
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import vtk

import slicer

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse


@dataclass
class Geometry:
    """A volume node's voxel grid, captured on the main thread so results can be placed even if the node
    is edited or deleted while the model runs."""
    ijk_to_ras: np.ndarray          # 4x4
    shape: Tuple[int, int, int]     # (k, j, i), as the array
    transform_node_id: str = ""     # the volume's parent transform, which the segmentation shares
    name: str = ""

    def matrix(self) -> vtk.vtkMatrix4x4:
        matrix = vtk.vtkMatrix4x4()
        for row in range(4):
            for column in range(4):
                matrix.SetElement(row, column, float(self.ijk_to_ras[row, column]))
        return matrix


def geometry_of(node) -> Geometry:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    dimensions = node.GetImageData().GetDimensions()
    return Geometry(ijk_to_ras, tuple(int(d) for d in reversed(dimensions)),
                    node.GetTransformNodeID() or "", node.GetName() or "")


def volume_from_node(node):
    """The engine's Volume for a scalar volume node: a copy of its voxels (so the model never reads an
    array the user is editing) with LPS geometry."""
    from SegmentMBTFELib.errors import InputError
    from SegmentMBTFELib.volume import Volume

    name = node.GetName() or "The volume"
    if node.GetImageData() is None:
        raise InputError(f"{name} has no image data.")
    if node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise InputError(f"{name} is a colour or vector image; convert it to a scalar volume first.")
    array = np.array(slicer.util.arrayFromVolume(node), copy=True)
    geometry = geometry_of(node)
    origin, spacing, direction = lps_geometry(geometry.ijk_to_ras)
    return Volume(array, spacing, origin, direction, name=name)


def lps_geometry(ijk_to_ras: np.ndarray):
    """(origin, spacing, row-major direction) in ITK's LPS convention from an IJK-to-RAS matrix."""
    ijk_to_lps = LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=float)
    axes = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    direction = axes / spacing
    return tuple(ijk_to_lps[:3, 3]), tuple(spacing), tuple(direction.ravel())


def ras_matrix(volume) -> np.ndarray:
    """IJK-to-RAS of an engine Volume (the inverse of `lps_geometry`)."""
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.array(volume.direction, dtype=float).reshape(3, 3) * np.array(volume.spacing)
    ijk_to_lps[:3, 3] = volume.origin
    return LPS_TO_RAS @ ijk_to_lps


def same_grid(a: Geometry, b: Geometry, tolerance: float = 1e-4) -> bool:
    return a.shape == b.shape and np.allclose(a.ijk_to_ras, b.ijk_to_ras, atol=tolerance)
