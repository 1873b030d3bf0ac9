"""Reading the images a user wants segmented, and writing images back, as `Volume`s.

SimpleITK does the reading and writing: it is what nnU-Net's SimpleITKIO uses, so a model sees here
exactly the array and geometry it saw in training (same z-y-x order, same LPS geometry, same pixel type,
no reorientation). This module adds what SimpleITK leaves to the caller:

- user-worded errors: every problem with the user's input is one `InputError` sentence, never a traceback;
- a completeness check for NIfTI, because ITK's NIfTI reader silently zero-fills a truncated file
  (NRRD and MetaImage readers do fail on one);
- DICOM folders, through dicom_series.py: the series to read (a UID, else the model's modality, else the
  largest) and its slices on a regular grid (dicom_geometry.py);
- 2D images become one-slice volumes flagged `metadata["dimension"] == "2"` so the engine can refuse
  them for 3D models; colour/vector and 4D images are refused;
- atomic writes: the image goes to a temporary file beside the target and is renamed over it, so a
  failure or a cancel never leaves a half-written output.
"""
import os
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, SegmentError
from ..free_memory import refuse_unless_it_fits
from ..volume import FILE_DIMENSION, Volume
from . import nifti
from .sitk_volume import check_pixels_are_scalar, image_as_3d, image_extension, image_to_volume, quiet_itk

# Header-plus-data pairs (.nhdr, .mhd) cannot be replaced atomically, so only single files are written.
WRITE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")

_FORMAT_NAMES = {".nii.gz": "NIfTI", ".nii": "NIfTI", ".nrrd": "NRRD", ".nhdr": "NRRD",
                 ".mha": "MetaImage", ".mhd": "MetaImage"}
_SUPPORTED_TEXT = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"


# ----------------------------------------------------------------------------------------------- reading

def is_dicom_folder(path) -> bool:
    """True when `path` is a folder holding at least one DICOM series (files directly inside it)."""
    from .dicom_series import series_ids
    path = Path(path)
    return path.is_dir() and bool(series_ids(path))


def read_volume(path, series: Optional[str] = None, modality: str = "") -> Volume:
    """Read an image file or a DICOM series folder; raises InputError with one sentence when it cannot.

    For a DICOM folder holding several series: `series` (a Series Instance UID) picks one, else the largest
    of `modality` ('CT', 'MR': what the model's channel expects), else the largest; see dicom_series.py."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Image not found: {path}.")
    if not os.access(path, os.R_OK):
        raise InputError(f"Image {path} cannot be read: permission denied.")
    if series is not None and not path.is_dir():
        raise InputError(f"A DICOM series UID was given for {path.name}, which is a file, not a DICOM folder.")
    with quiet_itk():
        if path.is_dir():
            from .dicom_series import read_dicom_folder
            return read_dicom_folder(path, series, modality)
        return _read_image_file(path)


def read_channels(paths: Sequence, channel_names: Sequence[str] = (),
                  series: Sequence[Optional[str]] = ()) -> List[Volume]:
    """Read one Volume per input channel; all channels must share one voxel grid. `channel_names` (the
    model's) and `series` (a UID or None per path) choose among the series of a DICOM folder."""
    from ..models.modality import channel_modality
    if not paths:
        raise InputError("No input image was given.")
    names = list(channel_names) + [""] * (len(paths) - len(channel_names))
    uids = list(series) + [None] * (len(paths) - len(series))
    volumes = [read_volume(p, uid, channel_modality(name)) for p, uid, name in zip(paths, uids, names)]
    for path, volume in zip(paths[1:], volumes[1:]):
        difference = geometry_difference(volumes[0], volume)
        if difference:
            raise InputError(f"Channel images {Path(paths[0]).name} and {Path(path).name} do not share "
                             f"one voxel grid ({difference}); resample them onto the same grid first.")
    return volumes


def geometry_difference(a: Volume, b: Volume, tolerance: float = 1e-4) -> str:
    """'' when a and b share one grid (as Volume.same_geometry judges), else what differs, in words."""
    if a.same_geometry(b, tolerance):
        return ""
    if a.shape != b.shape:
        return f"size {_size_text(a)} vs {_size_text(b)}"
    for what in ("spacing", "origin"):
        if not np.allclose(getattr(a, what), getattr(b, what), rtol=tolerance, atol=tolerance):
            return f"{what} {_vector_text(getattr(a, what))} vs {_vector_text(getattr(b, what))}"
    return "different orientation"


def _read_image_file(path: Path) -> Volume:
    extension = image_extension(path)
    if extension is None:
        raise InputError(_unsupported_message(path))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(_unreadable_message(path, extension)) from error
    check_pixels_are_scalar(reader.GetNumberOfComponents(), path.name)
    _check_geometry(reader.GetSpacing(), reader.GetDirection(), path.name)
    check_fits_in_memory(reader, path.name)
    header = _checked_nifti_header(path, reader) if extension in (".nii", ".nii.gz") else None
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(_unreadable_message(path, extension)) from error
    metadata = {"source": str(path), "format": _FORMAT_NAMES[extension], FILE_DIMENSION: str(image.GetDimension())}
    image = image_as_3d(image, path.name)
    note = nifti.orientation_disagreement(header, _corners_ras(image)) if header else ""
    if note:
        metadata["note"] = f"{path.name}: {note}."
    return image_to_volume(image, name=_name_without_extension(path), metadata=metadata)


def _unsupported_message(path: Path) -> str:
    if path.name.lower().endswith((".dcm", ".ima")) or _looks_like_dicom(path):
        return (f"{path.name} is a single DICOM file; give the folder that holds its series instead.")
    return f"{path.name} is not a supported image; give a {_SUPPORTED_TEXT}."


def _unreadable_message(path: Path, extension: str) -> str:
    if _FORMAT_NAMES[extension] == "NIfTI" and nifti.is_nifti2(path):
        return (f"{path.name} is a NIfTI-2 file, which cannot be read here (ITK reads NIfTI-1); save it as "
                "NIfTI-1, NRRD or MetaImage.")
    return (f"{path.name} could not be read as a {_FORMAT_NAMES[extension]} image: "
            "it is damaged, truncated or not an image.")


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _check_geometry(spacing, direction, what: str):
    """A positive spacing and a usable orientation (ITK refuses a zero spacing only once it reads the
    voxels, with a message about its own internals)."""
    for axis, value in zip("xyz", spacing):
        if not np.isfinite(value) or value <= 0:
            raise InputError(_spacing_message(what, f"a voxel spacing of {value:g} mm along {axis}"))
    matrix = np.array(direction, dtype=float).reshape(len(spacing), len(spacing))
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-6:
        raise InputError(f"{what} has no usable orientation in its header (its axes are missing or "
                         "parallel); the file's header needs fixing.")


def _spacing_message(what: str, problem: str) -> str:
    return (f"{what} has {problem} in its header; a voxel spacing must be positive, so the file's header "
            "needs fixing.")


def check_fits_in_memory(reader: sitk.ImageFileReader, what: str):
    """Refuse, before ITK allocates it, an image whose header asks for more memory than there is."""
    pixel = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
    voxels = float(np.prod(reader.GetSize()))
    refuse_unless_it_fits(2 * voxels * pixel.GetSizeOfPixelComponent() * reader.GetNumberOfComponents(),
                          f"Reading {what} ({' x '.join(str(n) for n in reader.GetSize())} voxels)",
                          "crop or downsample the image first")


def _checked_nifti_header(path: Path, reader: sitk.ImageFileReader) -> Optional["nifti.NiftiHeader"]:
    """The raw NIfTI header, after refusing what ITK would silently repair (see nifti.py)."""
    if not _nifti_is_complete(path, reader):
        raise InputError(f"{path.name} is truncated or damaged: it holds less voxel data than its header "
                         "describes.")
    header = nifti.read_header(path)
    if header is None:
        return None
    problem = nifti.spacing_problem(header)
    if problem:
        raise InputError(_spacing_message(path.name, problem))
    bad = nifti.non_finite_voxels(path, header)
    if bad:
        raise InputError(f"{path.name} contains {bad} NaN or infinite voxels; fix or mask them before segmenting.")
    return header


def _corners_ras(image: sitk.Image) -> np.ndarray:
    """The image's eight corner voxels in RAS millimetres (NIfTI's space), as ITK placed them."""
    size = image.GetSize()
    corners = [(i, j, k) for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)]
    points = np.array([image.TransformIndexToPhysicalPoint(c) for c in corners])
    return points * np.array([-1.0, -1.0, 1.0])


def _nifti_is_complete(path: Path, reader: sitk.ImageFileReader) -> bool:
    """Whether a NIfTI file holds all the voxel data its header describes.

    ITK's NIfTI reader fills the missing part of a truncated file with zeros and reports success, and
    its writer reports success after a short write (disk full): both need this check.
    """
    expected = _nifti_expected_bytes(reader)
    if expected is None:
        return True
    if path.name.lower().endswith(".gz"):
        return _gzip_holds_at_least(path, expected)
    return path.stat().st_size >= expected


def _nifti_expected_bytes(reader: sitk.ImageFileReader) -> Optional[int]:
    try:
        dimensions = int(reader.GetMetaData("dim[0]"))
        voxels = int(np.prod([int(reader.GetMetaData(f"dim[{i}]")) for i in range(1, dimensions + 1)]))
        return int(float(reader.GetMetaData("vox_offset"))) + voxels * int(reader.GetMetaData("bitpix")) // 8
    except (RuntimeError, ValueError):
        return None  # a header ITK reads without these keys: nothing to check against


def _gzip_holds_at_least(path: Path, expected: int) -> bool:
    """True when the gzip file decompresses to at least `expected` bytes without error.

    Fast path: a complete single-member gzip file ends with its uncompressed size modulo 2**32, which a
    truncated file matches only by a 1-in-4-billion chance. Anything else is decompressed in full.
    """
    with open(path, "rb") as file:
        file.seek(max(path.stat().st_size - 4, 0))
        if int.from_bytes(file.read(4), "little") == expected % 2 ** 32:
            return True
    import gzip
    import zlib
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 24):
                total += len(chunk)
    except (OSError, EOFError, zlib.error):
        return False
    return total >= expected


def _name_without_extension(path: Path) -> str:
    extension = image_extension(path) or path.suffix
    return path.name[: len(path.name) - len(extension)]


def _size_text(volume: Volume) -> str:
    return "x".join(str(n) for n in reversed(volume.shape))


def _vector_text(values) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


# ----------------------------------------------------------------------------------------------- writing

def volume_to_image(volume: Volume, keep_2d: bool = False) -> sitk.Image:
    """A SimpleITK image of a Volume's (z, y, x) array with its exact geometry; with keep_2d, a volume read
    from a 2D file becomes a 2D image again (its one slice, the in-plane geometry)."""
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise ValueError(f"expected a (z, y, x) array, got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    flat = keep_2d and volume.metadata.get(FILE_DIMENSION) == "2" and array.shape[0] == 1
    image = sitk.GetImageFromArray(array[0] if flat else array, isVector=False)
    dimension = 2 if flat else 3
    image.SetSpacing(volume.spacing[:dimension])
    image.SetOrigin(volume.origin[:dimension])
    image.SetDirection(np.array(volume.direction).reshape(3, 3)[:dimension, :dimension].ravel().tolist())
    return image


def write_volume(volume: Volume, path, compress: bool = True) -> Path:
    """Write a Volume as NIfTI, NRRD or MetaImage (.mha) by the path's extension, atomically."""
    path = Path(path)
    if not path.name.lower().endswith(WRITE_EXTENSIONS):
        raise InputError(f"Cannot write {path.name}: give a .nii.gz, .nii, .nrrd or .mha file name.")
    nifti = path.name.lower().endswith((".nii", ".nii.gz"))
    if nifti and not is_orthonormal(volume.direction):
        raise SegmentError(f"Cannot write {path.name}: NIfTI cannot store this sheared orientation; "
                           "write .nrrd or .mha instead.")
    image = volume_to_image(volume, keep_2d=True)
    with atomic_output(path) as temporary:
        write_image(image, temporary, compress)
        if nifti:
            _check_nifti_written(temporary, path)
    return path


def write_image(image: sitk.Image, path: Path, compress: bool = True):
    """sitk.WriteImage, with what the C libraries under it print themselves (nifti1_io's "** ERROR: NWAD:
    wrote only ... bytes" on a full disk) kept off the user's terminal: the failure is reported as one
    sentence by the caller instead."""
    with _c_stderr_silenced(), quiet_itk():
        sitk.WriteImage(image, str(path), useCompression=compress)


@contextmanager
def _c_stderr_silenced():
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr (a GUI): nothing to protect
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def is_orthonormal(direction, tolerance: float = 1e-4) -> bool:
    matrix = np.array(direction).reshape(3, 3)
    return np.allclose(matrix @ matrix.T, np.eye(3), atol=tolerance)


def _check_nifti_written(temporary: Path, path: Path):
    """ITK's NIfTI writer only prints a message when the disk is full; check the file is whole."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(temporary))
    reader.ReadImageInformation()
    if not _nifti_is_complete(temporary, reader):
        raise SegmentError(f"Could not write {path}: the disk is full or the file could not be completed.")


def check_writable(folder) -> None:
    """SegmentError now, before any work, when files cannot be written into `folder` (or, when it does not
    exist yet, into the nearest folder above it that does, where it would be created). Nothing is left."""
    folder = Path(folder).absolute()
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise SegmentError(f"Cannot write into {folder}: {existing} is a file, not a folder.")
    probe = existing / f".segmentmbtfe-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise SegmentError(f"Cannot write into {folder}: {error.strerror or error}.") from None


@contextmanager
def atomic_output(path) -> Iterator[Path]:
    """Yield a temporary path beside `path` with the same extension; on success rename it over `path`.

    On any failure, or a cancel (KeyboardInterrupt, Cancelled), the temporary file is removed and
    `path` is left as it was. The parent folder is created when missing.
    """
    path = Path(path)
    if path.is_dir():
        raise SegmentError(f"Cannot write {path}: it is a folder.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SegmentError(f"Cannot create the output folder {path.parent}: {error.strerror}.") from error
    extension = image_extension(path) or path.suffix
    stem = path.name[: len(path.name) - len(extension)]
    temporary = path.with_name(f".{stem}.{uuid.uuid4().hex[:8]}.partial{extension}")
    try:
        yield temporary
        os.replace(temporary, path)
    except RuntimeError as error:  # SimpleITK's writers: disk full, permission denied, ...
        raise SegmentError(f"Could not write {path}: the folder is not writable or the disk is full.") from error
    except OSError as error:
        raise SegmentError(f"Could not write {path}: {error.strerror}.") from error
    finally:
        if temporary.exists():
            temporary.unlink()
