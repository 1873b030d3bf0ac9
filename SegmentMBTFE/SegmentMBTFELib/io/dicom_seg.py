"""A label map as a DICOM Segmentation (SEG) object that references the DICOM series it was made from.

Hospitals keep segmentations as DICOM SEG next to their images: PACS store them, OHIF and Slicer's DICOM
module show them over the series they reference. highdicom writes them (the optional extra `[dicom]`;
without it a `.dcm` output is refused before any work, with how to install it).

- One segment per label, named as in dataset.json, with the terminology codes the .seg.nrrd carries
  (terminology.py: category, type, modifier). A SEG requires codes for every segment, so a label we have
  no codes for gets the ones Slicer gives a new segment (Tissue).
- The frames are the label map's slices in the input's geometry (a highdicom Volume). On a regular series
  they coincide with the source slices and reference them one by one; on a series that had to be put on a
  regular grid (dicom_geometry.py) the SEG references the series, and its frames carry their own positions.
- Only from a DICOM input: a SEG belongs to a patient, a study and a frame of reference, which only the
  source series gives. From a NIfTI we refuse rather than invent a patient and a study that a PACS would
  file as new ones.
- Anonymised series whose UIDs are empty: each slice's SOP Instance and Class UIDs come from its file's
  meta header (where the exporter kept them); missing Study, Series and Frame of Reference UIDs are made
  from the slices' UIDs, so one series always gets the same ones. A note says so.
- Written atomically (images.atomic_output): a failure leaves no partial file.
"""
import hashlib
import warnings
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..errors import InputError, SegmentError
from ..volume import DICOM_SOURCE_FILES, Volume
from .colors import segment_colors
from .images import atomic_output

INSTALL = ("Writing a DICOM SEG (.dcm) needs the highdicom package, which is not installed: "
           "pip install 'SegmentMBTFE[dicom]' (in Slicer's Python console: slicer.util.pip_install('highdicom')).")
# Slicer's terminology for a new segment: what a segment without known codes is called.
TISSUE = ("SCT", "85756007", "Tissue")
NO_CODE = "^^"
# Patient and study attributes a SEG copies from its images and must hold even when empty (DICOM type 2).
_COPIED_EMPTY_OR_NOT = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "ReferringPhysicianName", "StudyID", "AccessionNumber")


def check_can_write(source: Volume, path) -> None:
    """Refuse now, before any work, a SEG that cannot be written: no DICOM input, or no highdicom."""
    if not source_files(source):
        raise InputError(f"Cannot write {Path(path).name}: a DICOM SEG references the DICOM series it was made "
                         "from, and this input is not a DICOM series; give the series folder as input, or write "
                         ".seg.nrrd or .nii.gz.")
    _highdicom()


def source_files(volume: Volume) -> List[str]:
    return [f for f in volume.metadata.get(DICOM_SOURCE_FILES, "").splitlines() if f]


def write_dicom_seg(labels: Volume, segments: Sequence[Tuple[int, str]], settings: Dict[str, str], path,
                    terminology=None) -> Tuple[Path, List[str]]:
    """Write `labels` (read from DICOM: it names its slice files) as a DICOM SEG; returns (path, notes).

    segments: (label value, name) per label; terminology: (name, model name) -> Slicer TerminologyEntry or
    None (default: terminology.terminology_for, the codes a .seg.nrrd gets)."""
    from .terminology import terminology_for
    check_can_write(labels, path)
    hd = _highdicom()
    sources, notes = _source_headers(source_files(labels))
    entry = terminology or terminology_for
    model = str(settings.get("model", ""))
    descriptions = [_description(hd, number, name, entry(name, model), value, settings)
                    for number, (value, name) in enumerate(segments, start=1)]
    with warnings.catch_warnings():  # about the source's own attributes (a one-part patient name...): not ours to fix
        warnings.simplefilter("ignore")
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=_frames(hd, labels, segments, sources[0]),
            segmentation_type="BINARY", segment_descriptions=descriptions, series_instance_uid=hd.UID(),
            series_number=_series_number(sources[0]), sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="SegmentMBTFE", manufacturer_model_name=model[:64] or "SegmentMBTFE",
            software_versions=str(settings.get("engine", "")), device_serial_number="", content_label="SEGMENTATION",
            content_description=f"{model} segmentation"[:64])
    seg.SeriesDescription = f"Segmentation ({model})"[:64]
    with atomic_output(path) as temporary:
        seg.save_as(temporary)
    return Path(path), notes


def _highdicom():
    try:
        import highdicom
    except ImportError:
        raise SegmentError(INSTALL) from None
    return highdicom


def _frames(hd, labels: Volume, segments, source):
    """The label map as a highdicom Volume (frames = its z slices, in LPS), labels renumbered 1..n."""
    lookup = np.zeros(max([v for v, _ in segments] + [int(labels.array.max())]) + 1, np.uint16)
    for number, (value, _) in enumerate(segments, start=1):
        lookup[value] = number
    array = lookup[np.asarray(labels.array)]
    array = array.astype(np.uint8) if len(segments) < 256 else array
    matrix = np.array(labels.direction).reshape(3, 3) * np.array(labels.spacing)
    affine = np.eye(4)
    affine[:3, :3] = matrix[:, ::-1]          # array index (z, y, x) -> LPS
    affine[:3, 3] = labels.origin
    return hd.Volume(array, affine, "PATIENT", frame_of_reference_uid=source.FrameOfReferenceUID)


def _description(hd, number: int, name: str, entry, value: int, settings: Dict[str, str]):
    category, kind, modifier = _codes(entry)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=str(settings.get("model", "SegmentMBTFE"))[:64], version=str(settings.get("checksum", ""))[:64] or "-",
        family=hd.sr.CodedConcept("123110", "DCM", "Artificial Intelligence"), source="SegmentMBTFE")
    rgb = segment_colors(value)[value - 1]
    description = hd.seg.SegmentDescription(
        segment_number=number, segment_label=name[:64], segmented_property_category=_concept(hd, category),
        segmented_property_type=_concept(hd, kind), algorithm_type="AUTOMATIC", algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*(round(255 * c) for c in rgb)))
    if modifier:
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = \
            [_concept(hd, modifier)]
    return description


def _codes(entry) -> Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[str, ...]]:
    """(category, type, modifier) as (scheme, value, meaning) from a Slicer TerminologyEntry string
    ("context~SCT^123037004^Anatomical Structure~SCT^5366008^Hippocampus~SCT^255549009^Anterior~..."),
    Tissue for None; the modifier is () when there is none."""
    if not entry:
        return TISSUE, TISSUE, ()
    fields = entry.split("~")
    category, kind, modifier = (tuple(f.split("^")) if f != NO_CODE else () for f in fields[1:4])
    return category, kind, modifier


def _concept(hd, code: Tuple[str, ...]):
    scheme, value, meaning = code
    return hd.sr.CodedConcept(value, scheme, meaning)


def _series_number(source) -> int:
    try:
        return int(source.SeriesNumber) + 1000
    except (AttributeError, TypeError, ValueError):
        return 1000


# --------------------------------------------------------------------------------------- source headers

def _source_headers(files: List[str]) -> Tuple[list, List[str]]:
    """The slices' headers as highdicom reads them, with empty UIDs filled in (see the module's docstring)
    and what was filled said in a note."""
    import pydicom
    try:
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    except (OSError, pydicom.errors.InvalidDicomError) as error:
        raise SegmentError(f"The DICOM series the input was read from cannot be read again for the DICOM SEG's "
                           f"references ({error}); keep the series in place until the SEG is written.") from None
    filled = sorted({name for h in headers for name in _fill_instance(h)})
    filled += _fill_shared(headers)
    for header in headers:
        if "SpecificCharacterSet" in header and not header.SpecificCharacterSet:
            del header.SpecificCharacterSet  # an empty one is not a character set highdicom can copy
        for name in _COPIED_EMPTY_OR_NOT:
            if name not in header:
                setattr(header, name, "")  # the SEG must hold them, empty when the images have none
    notes = [f"The source DICOM series has empty UIDs ({', '.join(filled)}); the DICOM SEG uses ones taken "
             "from the files' meta headers or made from the slices, so it references the series by these."] \
        if filled else []
    return headers, notes


def _fill_instance(header) -> List[str]:
    """Empty SOP Instance / Class UIDs from the file's meta header (an instance UID, else made from the
    header itself)."""
    filled = []
    if not header.get("SOPInstanceUID"):
        header.SOPInstanceUID = header.file_meta.get("MediaStorageSOPInstanceUID") or \
            _made_uid("SOPInstanceUID", [str(header)])
        filled.append("SOPInstanceUID")
    if not header.get("SOPClassUID"):
        if not header.file_meta.get("MediaStorageSOPClassUID"):
            raise SegmentError(f"Cannot write a DICOM SEG: the slice {Path(header.filename).name} names no SOP "
                               "Class UID (what kind of image it is), not even in its meta header.")
        header.SOPClassUID = header.file_meta.MediaStorageSOPClassUID
        filled.append("SOPClassUID")
    return filled


def _fill_shared(headers) -> List[str]:
    """Empty Study, Series and Frame of Reference UIDs, made from the slices' SOP Instance UIDs."""
    filled = []
    instances = sorted(str(h.SOPInstanceUID) for h in headers)
    for name in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if not all(h.get(name) for h in headers):
            uid = next((h.get(name) for h in headers if h.get(name)), None) or _made_uid(name, instances)
            for header in headers:
                setattr(header, name, uid)
            filled.append(name)
    return filled


def _made_uid(what: str, sources: List[str]) -> str:
    from pydicom.uid import generate_uid
    digest = hashlib.sha256("\n".join([what] + sources).encode()).hexdigest()
    return generate_uid(entropy_srcs=[digest])
