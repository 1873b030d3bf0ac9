"""`Volume`: an image array with its physical geometry, the one currency between readers, engine and writers.

Conventions follow SimpleITK (and so nnU-Net's SimpleITKIO): `array` is indexed (z, y, x) (ITK index order
reversed, the same as Slicer's `arrayFromVolume` KJI array), while `spacing`, `origin` and `direction` are
in ITK's (x, y, z) LPS order, with `direction` the 3x3 matrix flattened row by row.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np

FILE_DIMENSION = "file_dimension"   # metadata: "2" when the volume was read from a 2D image file
DICOM_SOURCE_FILES = "dicom_source_files"   # metadata: the DICOM slice files read, in slice order, one a line


@dataclass
class Volume:
    array: np.ndarray
    spacing: Tuple[float, ...] = (1.0, 1.0, 1.0)
    origin: Tuple[float, ...] = (0.0, 0.0, 0.0)
    direction: Tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    name: str = ""
    metadata: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = tuple(float(d) for d in self.direction)

    @property
    def shape(self):
        return self.array.shape

    def with_array(self, array: np.ndarray, name: str = None) -> "Volume":
        """The same geometry holding another array (a label map, a probability); a volume read from a 2D
        file stays marked as one, so that its label map is written as a 2D file too, and one read from DICOM
        keeps its slice files, so that a DICOM SEG of its label map can reference them."""
        kept = {k: v for k, v in self.metadata.items() if k in (FILE_DIMENSION, DICOM_SOURCE_FILES)}
        return Volume(array, self.spacing, self.origin, self.direction, name if name is not None else self.name,
                      kept)

    def same_geometry(self, other: "Volume", tolerance: float = 1e-4) -> bool:
        return (self.array.shape == other.array.shape
                and np.allclose(self.spacing, other.spacing, rtol=tolerance, atol=tolerance)
                and np.allclose(self.origin, other.origin, rtol=tolerance, atol=tolerance)
                and np.allclose(self.direction, other.direction, atol=tolerance))


def label_dtype(largest: int):
    """The smallest unsigned type holding label values up to `largest`: uint8 up to 255, then wider."""
    return next(t for t in (np.uint8, np.uint16, np.uint32) if largest <= np.iinfo(t).max)


@dataclass
class CorrectedCase:
    """One case a clinician corrected, as fine-tuning takes it: the image(s), one per model channel, and the
    corrected label map in their grid, holding the model's label values (0 is background). Here, beside Volume,
    because the Slicer module builds it (without torch) and the training code reads it."""
    name: str
    images: List[Volume]
    labels: Volume
