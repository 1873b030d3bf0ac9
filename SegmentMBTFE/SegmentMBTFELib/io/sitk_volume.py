"""A SimpleITK image as a Volume: what the image file reader (images.py) and the DICOM series reader
(dicom_series.py) share, so that neither imports the other's module for it: the image file extensions, the
checks of a read image (one value per voxel, 2D to 4D made 3D), the conversion, ITK's warnings kept quiet.
"""
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import SimpleITK as sitk

from ..errors import InputError
from ..volume import Volume

# Longest first, so that ".nii.gz" wins over ".nii" and ".gz".
SUPPORTED_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def image_extension(path) -> Optional[str]:
    """The supported extension `path` ends with (lower case), or None."""
    name = Path(path).name.lower()
    return next((ext for ext in SUPPORTED_EXTENSIONS if name.endswith(ext)), None)


def check_pixels_are_scalar(components: int, what: str):
    if components != 1:
        raise InputError(f"{what} has {components} values per voxel (a colour or vector image); "
                         "give each channel as its own single-valued image.")


def image_as_3d(image: sitk.Image, what: str) -> sitk.Image:
    """A 3D image; 2D becomes one slice, 4D with a single time point its 3D volume, anything else refused."""
    dimension = image.GetDimension()
    if dimension == 4 and image.GetSize()[3] == 1:
        return image[:, :, :, 0]
    if dimension == 4:
        raise InputError(f"{what} is a 4D image with {image.GetSize()[3]} volumes; give each channel as "
                         "its own 3D image.")
    if dimension == 2:
        return sitk.JoinSeries(image)  # spacing 1.0, origin 0 and identity along the new z axis (see volume_to_image)
    if dimension != 3:
        raise InputError(f"{what} is a {dimension}D image; only 2D and 3D images can be segmented.")
    return image


def image_to_volume(image: sitk.Image, name: str = "", metadata: dict = None) -> Volume:
    """A Volume holding a copy of a 3D SimpleITK image's voxels and its geometry."""
    array = sitk.GetArrayFromImage(image)
    metadata = dict(metadata or {})
    metadata["dimension"] = "2" if array.shape[0] == 1 else "3"
    metadata["pixel_type"] = str(array.dtype)
    return Volume(array, image.GetSpacing(), image.GetOrigin(), image.GetDirection(), name, metadata)


@contextmanager
def quiet_itk():
    """ITK's warnings off: they go straight to stderr, in ITK's words, around the one line the user gets."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
