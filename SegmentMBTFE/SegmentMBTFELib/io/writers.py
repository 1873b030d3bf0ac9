"""Write a Prediction to disk in the format its file name asks for (label map, Slicer segments, DICOM SEG,
probabilities)."""
from pathlib import Path
from typing import List, Sequence

import numpy as np

from ..errors import InputError
from ..volume import Volume
from .images import WRITE_EXTENSIONS, atomic_output, check_writable, is_orthonormal, write_volume
from .segfile import Segment, write_seg_nrrd
from .terminology import terminology_for

SEG_NRRD = ".seg.nrrd"
DICOM_SEG = ".dcm"
# Format names the console API takes (segmentFiles(format=...)), besides the file extensions themselves.
FORMAT_NAMES = {"seg.nrrd": SEG_NRRD, "dicom-seg": DICOM_SEG, "nifti": ".nii.gz"}


def output_format(path) -> str:
    """'segmentation' for .seg.nrrd, 'dicom-seg' for .dcm, 'labelmap' for the image formats; InputError
    otherwise."""
    name = Path(path).name.lower()
    if name.endswith(SEG_NRRD):
        return "segmentation"
    if name.endswith(DICOM_SEG):
        return "dicom-seg"
    if name.endswith(WRITE_EXTENSIONS):
        return "labelmap"
    raise InputError(f"Cannot write {Path(path).name}: give a .nii.gz, .nii, .nrrd, .mha, .seg.nrrd or .dcm "
                     "(DICOM SEG) file name.")


def output_extension(format_name: str) -> str:
    """The file extension for a format: 'seg.nrrd', 'dicom-seg', 'nifti', or an extension ('.nii.gz')."""
    extension = FORMAT_NAMES.get(str(format_name).lower(), str(format_name).lower())
    if extension.startswith(".") and output_format(f"x{extension}"):
        return extension
    raise InputError(f"Unknown output format {format_name!r}: give one of {', '.join(FORMAT_NAMES)}, or an "
                     "extension (.nii.gz, .nrrd, .mha).")


def check_output(path, inputs: Sequence = (), volume: Volume = None) -> str:
    """What output_format says, after refusing now, before any work, an output that would fail or harm:
    an unknown extension, one of the inputs itself, a folder that cannot be written, a NIfTI file for an
    image whose orientation NIfTI cannot store."""
    path = Path(path)
    kind = output_format(path)
    for source in map(Path, inputs):
        if _same_file(path, source) or _same_file(probabilities_path(path), source):
            raise InputError(f"The output {path} would overwrite the input image {source}; give another file name.")
        if source.is_dir() and source.resolve() in path.resolve().parents:
            raise InputError(f"The output {path} is inside the input DICOM folder {source}; write it elsewhere.")
    if path.is_dir():
        raise InputError(f"Cannot write {path}: it is a folder.")
    check_writable(path.parent)
    if volume is not None and kind == "labelmap" and path.name.lower().endswith((".nii", ".nii.gz")) \
            and not is_orthonormal(volume.direction):
        raise InputError(f"Cannot write {path.name}: NIfTI cannot store the input's sheared orientation; write "
                         ".nrrd, .mha or .seg.nrrd instead.")
    if volume is not None and kind == "dicom-seg":
        from .dicom_seg import check_can_write
        check_can_write(volume, path)
    return kind


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def write_prediction(prediction, path, terminology=terminology_for) -> List[Path]:
    """Write the label map (and probabilities, when predicted) and return the files written.

    terminology: `(segment name, model name) -> Slicer terminology string or None` for .seg.nrrd; by default
    our standard terminology, so a file from the command line carries the same codes as one from Slicer.
    None writes none.
    """
    path = Path(path)
    kind = output_format(path)
    if kind == "segmentation":
        model_name = str(prediction.settings.get("model", ""))
        segments = [Segment(name=name, label_value=value,
                            terminology=terminology(name, model_name) if terminology else None)
                    for value, name in prediction.segments]
        settings = {k: str(v) for k, v in prediction.settings.items()}
        written = [write_seg_nrrd(prediction.labels, path, segments, settings)]
    elif kind == "dicom-seg":
        from .dicom_seg import write_dicom_seg
        done, notes = write_dicom_seg(prediction.labels, prediction.segments,
                                      {k: str(v) for k, v in prediction.settings.items()}, path, terminology)
        prediction.messages.extend(notes)
        written = [done]
    else:
        written = [write_volume(prediction.labels, path)]
    if prediction.probabilities is not None:
        try:
            written.append(write_probabilities(prediction.probabilities, probabilities_path(path)))
        except BaseException:
            # A failed run leaves no output: take back the label map written a moment ago.
            for done in written:
                done.unlink(missing_ok=True)
            raise
    return written


def probabilities_path(path: Path) -> Path:
    name = path.name
    for ending in (SEG_NRRD, DICOM_SEG) + tuple(WRITE_EXTENSIONS):
        if name.lower().endswith(ending):
            name = name[: -len(ending)]
            break
    return path.with_name(name + ".npz")


def write_probabilities(probabilities: np.ndarray, path: Path) -> Path:
    """nnU-Net's format: an .npz whose `probabilities` is (classes, z, y, x) in the image's array order."""
    with atomic_output(path) as temporary:
        with open(temporary, "wb") as f:
            np.savez_compressed(f, probabilities=probabilities)
    return path
