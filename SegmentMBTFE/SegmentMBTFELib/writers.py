"""Write a Prediction to disk in the format its file name asks for (label map, Slicer segments, probabilities)."""
from pathlib import Path
from typing import List

import numpy as np

from .errors import InputError
from .imageio import WRITE_EXTENSIONS, atomic_output, write_volume
from .segfile import Segment, write_seg_nrrd
from .terminology import terminology_for

SEG_NRRD = ".seg.nrrd"


def output_format(path) -> str:
    """'segmentation' for .seg.nrrd, 'labelmap' for the image formats; InputError otherwise."""
    name = Path(path).name.lower()
    if name.endswith(SEG_NRRD):
        return "segmentation"
    if name.endswith(WRITE_EXTENSIONS):
        return "labelmap"
    raise InputError(f"Cannot write {Path(path).name}: give a .nii.gz, .nii, .nrrd, .mha or .seg.nrrd file name.")


def write_prediction(prediction, path, terminology=terminology_for) -> List[Path]:
    """Write the label map (and probabilities, when predicted) and return the files written.

    terminology: `(segment name, model name) -> Slicer terminology string or None` for .seg.nrrd; by default
    our standard terminology, so a file from the command line carries the same codes as one from Slicer.
    None writes none.
    """
    path = Path(path)
    if output_format(path) == "segmentation":
        model_name = str(prediction.settings.get("model", ""))
        segments = [Segment(name=name, label_value=value,
                            terminology=terminology(name, model_name) if terminology else None)
                    for value, name in prediction.segments]
        settings = {k: str(v) for k, v in prediction.settings.items()}
        written = [write_seg_nrrd(prediction.labels, path, segments, settings)]
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
    for ending in (SEG_NRRD,) + tuple(WRITE_EXTENSIONS):
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
