"""DICOM series folders: which series to read, and reading it as a Volume.

A folder often holds several series: a scout beside the axial series, a CT beside an MR, T1 beside T2.
Like Slicer's DICOM browser we list them all, split a series that mixes slice orientations into one per
orientation (as DICOMScalarVolumePlugin's sub-series do), and skip objects without an image (DICOM SEG,
RT structure sets, reports). We read one: the series a UID names (`--series`), else the largest series of
the modality the model's channel expects (modality.py), else the largest; a note names it (description,
Series Instance UID, number of slices) whenever there was a choice. Series are told apart by their details
as well as their UID (GDCM's series details), so anonymised exports whose UIDs are empty still read.

Slices are sorted along their normal and put on a regular grid by dicom_geometry.py. The chosen series'
slice files stay in the volume's metadata (DICOM_SOURCE_FILES), so that a DICOM SEG written from a label map on
its grid can reference them (dicom_seg.py).
"""
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..volume import DICOM_SOURCE_FILES, Volume
from .dicom_geometry import regularize, slice_order
from .sitk_volume import check_pixels_are_scalar, image_as_3d, image_extension, image_to_volume, quiet_itk

# DICOM objects that hold no image to segment (segmentations, structure sets, reports, ...).
NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG", "DOC"}
ORIENTATION_TOLERANCE = 1e-4   # direction cosines closer than this are one orientation
_TAGS = ("0008|0060", "0020|000e", "0008|103e", "0020|0037", "0020|0032")  # modality, UID, description, IOP, IPP
_LISTED = 5


@dataclass
class Slice:
    file: str
    modality: str
    uid: str
    description: str
    orientation: Optional[Tuple[float, ...]]   # Image Orientation (Patient): row, then column direction
    position: Optional[Tuple[float, ...]]      # Image Position (Patient) of the first pixel, LPS mm


@dataclass
class Series:
    slices: List[Slice]
    part: str = ""   # "axial slices, 1 of 2 orientations" when the series mixes orientations

    @property
    def uid(self) -> str:
        return self.slices[0].uid

    @property
    def description(self) -> str:
        return self.slices[0].description

    @property
    def modality(self) -> str:
        return self.slices[0].modality.upper()

    def label(self) -> str:
        """"'CT Body 3.0' (UID 1.2.3, 20 slices)": what the user needs to recognise it, or to ask for it."""
        part = f"; its {self.part}" if self.part else ""
        return (f"'{self.description or 'no description'}' (UID {self.uid or 'empty'}, "
                f"{len(self.slices)} slices{part})")


def series_ids(folder: Path) -> Sequence[str]:
    # Series details (series number, slice thickness, rows, columns, ...) split apart series whose
    # Series Instance UIDs are empty or shared, which anonymised or messy exports produce.
    # ITK prints a warning for a folder without DICOM; the caller words that case for the user.
    with quiet_itk():
        return sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder), True)


def read_dicom_folder(folder: Path, series_uid: Optional[str] = None, modality: str = "") -> Volume:
    """The chosen series of a DICOM folder (see the module's docstring); InputError with one sentence when
    there is none, the UID names none, or its slices cannot form one volume."""
    found, any_dicom = find_series(folder)
    if not found:
        raise InputError(_no_series_message(folder, any_dicom))
    series, note = choose_series(found, folder, series_uid, modality)
    what = f"the DICOM series in {folder.name}"
    slices = _sorted(series.slices, what)
    image = _read_slices([s.file for s in slices], folder)
    warning = ""
    if _has_geometry(slices):
        positions = np.array([s.position for s in slices])
        image, warning = regularize(image, positions, slices[0].orientation, what)
    metadata = {"source": str(folder), "format": "DICOM", "dicom_series_uid": series.uid,
                "dicom_series_description": series.description, "dicom_modality": series.modality,
                "dicom_files": str(len(slices)), "dicom_series_count": str(len(found)),
                DICOM_SOURCE_FILES: "\n".join(s.file for s in slices)}
    metadata.update({key: text for key, text in (("note", note), ("warning", warning)) if text})
    return image_to_volume(image_as_3d(image, f"The DICOM series in {folder.name}"), folder.name, metadata)


def find_series(folder: Path) -> Tuple[List[Series], bool]:
    """(the image series in the folder, split by orientation; whether it holds any DICOM series at all)."""
    groups = [[_slice(f) for f in _series_files(folder, series_id)] for series_id in series_ids(folder)]
    images = [g for g in groups if g[0].modality.upper() not in NON_IMAGE_MODALITIES]
    return [series for g in images for series in _split_by_orientation(g)], bool(groups)


def choose_series(found: List[Series], folder: Path, wanted_uid: Optional[str] = None,
                  modality: str = "") -> Tuple[Series, str]:
    """(series, note): the one `wanted_uid` names, else the largest of `modality`, else the largest. The
    note names the series read whenever there was a choice ('' when the folder holds one series)."""
    if wanted_uid is not None:
        return _wanted(found, folder, wanted_uid)
    matching = [s for s in found if modality and s.modality == modality]
    chosen = _largest(matching or found)
    if len(found) == 1:
        return chosen, ""
    head = f"The folder {folder.name} holds {len(found)} image series"
    if matching:
        which = "only" if len(matching) == 1 else "largest"
        return chosen, f"{head}; read the {which} {modality} series (the model expects {modality}): {chosen.label()}."
    if modality:
        head += f", none of them {modality} as the model expects"
    return chosen, f"{head}; read the largest: {chosen.label()}."


def _wanted(found: List[Series], folder: Path, uid: str) -> Tuple[Series, str]:
    candidates = [s for s in found if s.uid == uid]
    if not candidates:
        listed = "; ".join(s.label() for s in sorted(found, key=lambda s: -len(s.slices))[:_LISTED])
        more = f" and {len(found) - _LISTED} more" if len(found) > _LISTED else ""
        raise InputError(f"The folder {folder.name} holds no image series with UID {uid}; it holds {listed}{more}.")
    chosen = _largest(candidates)
    return chosen, f"Read the series asked for, {chosen.label()}, of {len(found)} image series in {folder.name}."


def _largest(series: List[Series]) -> Series:
    return max(series, key=lambda s: len(s.slices))  # the first of equals: GDCM's order


def _series_files(folder: Path, series_id: str) -> List[str]:
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id, True))


def _slice(file: str) -> Slice:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
        values = [reader.GetMetaData(t).strip() if reader.HasMetaDataKey(t) else "" for t in _TAGS]
    except RuntimeError:  # GDCM listed it; reading the series will say what is wrong with it
        values = [""] * len(_TAGS)
    modality, uid, description, orientation, position = values
    return Slice(file, modality, uid, description, _numbers(orientation, 6), _numbers(position, 3))


def _numbers(text: str, count: int) -> Optional[Tuple[float, ...]]:
    try:
        numbers = tuple(float(v) for v in text.split("\\"))
    except ValueError:
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None


def _split_by_orientation(slices: List[Slice]) -> List[Series]:
    groups: List[List[Slice]] = []
    for one in slices:
        group = next((g for g in groups if _same_orientation(g[0].orientation, one.orientation)), None)
        if group is None:
            groups.append([one])
        else:
            group.append(one)
    if len(groups) == 1:
        return [Series(slices)]
    return [Series(g, f"{_plane(g[0].orientation)} slices, {i} of {len(groups)} orientations")
            for i, g in enumerate(groups, start=1)]


def _same_orientation(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return bool(np.allclose(a, b, rtol=0.0, atol=ORIENTATION_TOLERANCE))


def _plane(orientation) -> str:
    if orientation is None:
        return "unknown orientation"
    normal = np.cross(orientation[:3], orientation[3:])
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


def _has_geometry(slices: List[Slice]) -> bool:
    return all(s.position is not None and s.orientation is not None for s in slices)


def _sorted(slices: List[Slice], what: str) -> List[Slice]:
    """Sorted along the slices' normal, as Slicer sorts them; GDCM's order when positions are missing."""
    if not _has_geometry(slices):
        return slices
    order = slice_order(np.array([s.position for s in slices]), slices[0].orientation, what[0].upper() + what[1:])
    return [slices[i] for i in order]


def _read_slices(files: List[str], folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"The DICOM series in {folder.name} could not be read: a file is damaged or "
                         "uses an unsupported encoding.") from error
    check_pixels_are_scalar(image.GetNumberOfComponentsPerPixel(), f"The DICOM series in {folder.name}")
    return image


def _no_series_message(folder: Path, only_non_images: bool) -> str:
    if only_non_images:
        return (f"Folder {folder} holds only DICOM objects without an image (segmentations, structure "
                "sets or reports); give the folder of the image series.")
    if any(image_extension(p) for p in folder.iterdir() if p.is_file()):
        return f"Folder {folder} holds no DICOM series; give the image file itself, not its folder."
    return f"Folder {folder} holds no DICOM series (sub-folders are not searched)."
