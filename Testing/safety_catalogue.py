"""The catalogue of hostile, broken and unusual inputs: each case declared once, here, as data.

A case names what the user gives (`given`), what they must see (`outcome`: `Refused` with the one line on
stderr, `...` standing for what varies such as paths, or `Works` with the result in words and any note) and
how its input is made (`make`, with real files from hostile_files.py). test_safety.py runs every case through
the real command line and checks the outcome; the README's Safety table is generated from this list
(`markdown_table`, checked by a test), so the table cannot say what the tests do not check.

Most cases return an `Attempt` (a command line) that the generic runner checks: a refusal is exactly one
line on stderr, exit code 1, no traceback, and every watched folder left exactly as it was; a result is
exit code 0, the output written in full, no temporary file left. Cases that need more than one command
(signals, several processes, a batch) run themselves (`custom=True`) and assert their own outcome.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

import model_factory
from hostile_files import (copy_model, edit_checkpoint, edit_json, edit_nifti_header, edit_nrrd_header,
                           full_disk_prefix, nifti_with_two_orientations, read_only_prefix, smooth_volume,
                           write_dicom_series, write_image)
from hostile_zips import (FIFO, SYMLINK, damage_member, documents_zip, export_layout_zip, many_members_zip,
                         nnunet_v1_zip, plain_member, special_member, zip_bomb)

ELLIPSIS = "…"


# --------------------------------------------------------------------------------------------- the data

@dataclass(frozen=True)
class Refused:
    """The run ends with exactly this line on stderr (… for what varies), exit code 1, nothing written."""
    line: str

    def matches(self, text: str) -> bool:
        pattern = ".+?".join(re.escape(part) for part in self.line.split(ELLIPSIS))
        return re.fullmatch(pattern, text, flags=re.DOTALL) is not None


@dataclass(frozen=True)
class Works:
    """The run succeeds; `result` says what the user gets, `note` a line they also see on stderr."""
    result: str
    note: str = ""

    def matches(self, text: str) -> bool:
        return Refused(self.note).matches(text)


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    given: str                                   # what the user gives, in their words
    outcome: Union[Refused, Works]
    make: Callable                               # (Context) -> Attempt, or runs the case itself (custom)
    process: bool = False                        # run the command as a subprocess (prefixes, tracebacks)
    custom: bool = False


@dataclass
class Attempt:
    args: list                                   # after `segment-mbtfe`
    output: Optional[Path] = None                # the file a working run writes
    check: Optional[Callable[[], None]] = None   # more checks of a working run's result
    prefix: Optional[list] = None                # a command prefix (read-only folder, full disk): a subprocess
    kept: Sequence[Path] = ()                    # files and folders a refused run must leave as they were


@dataclass
class Context:
    tmp: Path
    models: dict                                 # one (1 channel), two (T1, T2), flat (2d)
    image: Path                                  # a good 3D image
    out: Path                                    # an empty output folder
    home: Path                                   # this case's versions home (SEGMENTMBTFE_HOME)
    run: Callable = None                         # run(args) -> (code, stdout, stderr), in this process
    run_process: Callable = None                 # run_process(args, prefix=None) -> (code, stdout, stderr)
    extra: dict = field(default_factory=dict)


CASES: List[Case] = []


def case(group: str, given: str, outcome, process: bool = False, custom: bool = False, name: str = None):
    """Register the decorated maker as a catalogue case (its name is the function's, without the _)."""
    def register(make):
        CASES.append(Case(name or make.__name__.lstrip("_"), group, given, outcome, make, process, custom))
        return make
    return register


def predict(ctx: Context, *args, model="one", output: str = "seg.nii.gz", tta: bool = False) -> list:
    model_path = ctx.models.get(model, model)
    return ["predict", "-q", *([] if tta else ["--no-tta"]), "-m", model_path, "-o", ctx.out / output, *args]


def geometry_of(path: Path):
    image = sitk.ReadImage(str(path))
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def same_grid(source: Path, output: Path, labels=(0, 1, 2), dtype=np.uint8):
    """A check: the output is a label map of `dtype` on the input's exact grid, holding only `labels`."""
    def check():
        a, b = geometry_of(source), geometry_of(output)
        assert a[0] == b[0], (a, b)
        for x, y in zip(a[1:], b[1:]):
            np.testing.assert_allclose(x, y, atol=1e-4)
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
        assert array.dtype == dtype, array.dtype
        assert set(np.unique(array).tolist()) <= set(labels)
    return check


def works_on(ctx: Context, image: Path, output: str = "seg.nii.gz", model="one", **kwargs) -> Attempt:
    return Attempt(predict(ctx, "-i", image, model=model, output=output), ctx.out / output,
                   same_grid(image, ctx.out / output, **kwargs))


GRID = "a label map on the image's exact grid"

# ================================================================================================ images

IMAGES = "Images"


@case(IMAGES, "an input file that does not exist", Refused("error: Image not found: …nowhere.nii.gz."))
def _missing_input(ctx):
    return Attempt(predict(ctx, "-i", ctx.tmp / "nowhere.nii.gz"))


@case(IMAGES, "a text file given as the image",
      Refused("error: notes.txt is not a supported image; give a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), "
              "MetaImage (.mha, .mhd) or a DICOM series folder."))
def _not_an_image(ctx):
    path = ctx.tmp / "notes.txt"
    path.write_text("not an image")
    return Attempt(predict(ctx, "-i", path))


@case(IMAGES, "a NIfTI file cut short (a copy interrupted)",
      Refused("error: damaged.nii.gz is truncated or damaged: it holds less voxel data than its header describes."))
def _damaged_image(ctx):
    path = write_image(ctx.tmp / "damaged.nii.gz", smooth_volume())
    path.write_bytes(path.read_bytes()[:200])
    return Attempt(predict(ctx, "-i", path))


@case(IMAGES, "a NIfTI-2 file (SimpleITK reads only NIfTI-1)",
      Refused("error: scan.nii.gz is a NIfTI-2 file, which cannot be read here (ITK reads NIfTI-1); save it as "
              "NIfTI-1, NRRD or MetaImage."))
def _nifti2(ctx):
    import nibabel
    path = ctx.tmp / "scan.nii.gz"
    nibabel.save(nibabel.Nifti2Image(smooth_volume().transpose(2, 1, 0), np.eye(4)), str(path))
    return Attempt(predict(ctx, "-i", path))


@case(IMAGES, "a 2D image for a 3D model",
      Refused("error: slice is a 2D image but this model segments 3D volumes."))
def _image_2d(ctx):
    return Attempt(predict(ctx, "-i", write_image(ctx.tmp / "slice.nii.gz", smooth_volume((40, 30)))))


@case(IMAGES, "a 2D image for a 2D model", Works("a 2D label map on the image's grid"))
def _image_2d_for_2d_model(ctx):
    image = write_image(ctx.tmp / "photo.nrrd", smooth_volume((40, 30)), spacing=(0.7, 0.9))
    attempt = works_on(ctx, image, output="seg.nrrd", model="flat")
    return attempt


@case(IMAGES, "a 4D time series (3 volumes in one file)",
      Refused("error: series.nii.gz is a 4D image with 3 volumes; give each channel as its own 3D image."))
def _time_series_4d(ctx):
    frames = [sitk.GetImageFromArray(smooth_volume(seed=s)) for s in range(3)]
    path = ctx.tmp / "series.nii.gz"
    sitk.WriteImage(sitk.JoinSeries(frames), str(path))
    return Attempt(predict(ctx, "-i", path))


@case(IMAGES, "an RGB (vector) image",
      Refused("error: colour.mha has 3 values per voxel (a colour or vector image); give each channel as its own "
              "single-valued image."))
def _vector_pixels(ctx):
    rgb = np.stack([smooth_volume(seed=s) for s in range(3)], axis=-1).astype(np.uint8)
    return Attempt(predict(ctx, "-i", write_image(ctx.tmp / "colour.mha", rgb, vector=True)))


SHEAR = (1.0, 0.3, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@case(IMAGES, "a sheared (non-orthogonal) orientation, written as NRRD", Works(GRID + ", orientation kept"))
def _sheared_direction(ctx):
    return works_on(ctx, write_image(ctx.tmp / "sheared.nrrd", smooth_volume(), direction=SHEAR), output="seg.nrrd")


@case(IMAGES, "a sheared orientation with a NIfTI output (NIfTI cannot store it)",
      Refused("error: Cannot write seg.nii.gz: NIfTI cannot store the input's sheared orientation; write .nrrd, "
              ".mha or .seg.nrrd instead."))
def _sheared_to_nifti(ctx):
    return Attempt(predict(ctx, "-i", write_image(ctx.tmp / "sheared.nrrd", smooth_volume(), direction=SHEAR)))


SPACING_FIX = "; a voxel spacing must be positive, so the file's header needs fixing."


@case(IMAGES, "a NIfTI header with a voxel spacing of 0 (ITK would read 1 mm)",
      Refused("error: zero.nii.gz has a voxel spacing of 0 mm along y in its header" + SPACING_FIX))
def _zero_spacing_nifti(ctx):
    path = write_image(ctx.tmp / "zero.nii.gz", smooth_volume())
    return Attempt(predict(ctx, "-i", edit_nifti_header(path, pixdim2=0.0)))


@case(IMAGES, "a NIfTI header with a negative voxel spacing (ITK would flip the axis)",
      Refused("error: negative.nii.gz has a voxel spacing of -2 mm along y in its header" + SPACING_FIX))
def _negative_spacing_nifti(ctx):
    path = write_image(ctx.tmp / "negative.nii.gz", smooth_volume())
    return Attempt(predict(ctx, "-i", edit_nifti_header(path, pixdim2=-2.0, sform_code=0)))


@case(IMAGES, "a NRRD header with a zero-length axis direction (spacing 0)",
      Refused("error: zero.nrrd has a voxel spacing of 0 mm along y in its header" + SPACING_FIX))
def _zero_spacing_nrrd(ctx):
    path = ctx.tmp / "zero.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(smooth_volume()), str(path), False)
    return Attempt(predict(ctx, "-i", edit_nrrd_header(path, "(0,1,0)", "(0,0,0)")))


@case(IMAGES, "extreme anisotropy: 0.4 x 0.4 x 10 mm voxels", Works(GRID))
def _extreme_anisotropy(ctx):
    return works_on(ctx, write_image(ctx.tmp / "thick.nii.gz", smooth_volume((4, 60, 60)), spacing=(0.4, 0.4, 10)))


@case(IMAGES, "an image smaller than one patch (5 x 6 x 7 voxels, patch 16)", Works(GRID))
def _smaller_than_patch(ctx):
    return works_on(ctx, write_image(ctx.tmp / "tiny.nii.gz", smooth_volume((7, 6, 5))))


def _pixel_type_case(dtype):
    name = np.dtype(dtype).name

    def make(ctx):
        array = smooth_volume()
        array = (array - array.min()) / (array.max() - array.min()) * 100 + (0 if name.startswith("u") else -50)
        return works_on(ctx, write_image(ctx.tmp / f"{name}.nii.gz", array.astype(dtype)))
    make.__name__ = f"_pixel_type_{name}"
    case(IMAGES, f"pixel type {name}", Works(GRID))(make)


for _dtype in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.int64, np.float64):
    _pixel_type_case(_dtype)


@case(IMAGES, "a CT with padding voxels of -32768 outside the scan", Works(GRID))
def _ct_padding(ctx):
    array = (smooth_volume() * 3 - 1000).astype(np.int16)
    array[:, :4], array[:, -4:] = -32768, -32768
    return works_on(ctx, write_image(ctx.tmp / "ct_padded.nii.gz", array))


@case(IMAGES, "an image holding only NaN (NRRD)",
      Refused("error: nan contains only NaN or infinite values; fix or mask them before segmenting."))
def _all_nan(ctx):
    return Attempt(predict(ctx, "-i", write_image(ctx.tmp / "nan.nrrd", np.full((20, 24, 22), np.nan, np.float32))))


@case(IMAGES, "an image with two NaN voxels (NRRD)",
      Refused("error: partly_nan contains 2 NaN or infinite voxels; fix or mask them before segmenting."))
def _partly_nan(ctx):
    array = smooth_volume()
    array[5, 6, 7] = array[9, 9, 9] = np.nan
    return Attempt(predict(ctx, "-i", write_image(ctx.tmp / "partly_nan.nrrd", array)))


@case(IMAGES, "an image with an infinite voxel (MetaImage)",
      Refused("error: infinite contains 1 NaN or infinite voxels; fix or mask them before segmenting."))
def _infinite(ctx):
    array = smooth_volume()
    array[1, 2, 3] = np.inf
    return Attempt(predict(ctx, "-i", write_image(ctx.tmp / "infinite.mha", array)))


@case(IMAGES, "a NIfTI with a NaN and an infinite voxel (ITK reads them as 0; the raw data is checked)",
      Refused("error: nan_inf.nii.gz contains 2 NaN or infinite voxels; fix or mask them before segmenting."))
def _nan_in_nifti(ctx):
    array = smooth_volume()
    array[3, 4, 5], array[1, 1, 1] = np.nan, -np.inf
    path = write_image(ctx.tmp / "nan_inf.nii.gz", array)
    assert not np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).any(), "ITK hides the NaN"
    return Attempt(predict(ctx, "-i", path))


@case(IMAGES, "an all-zero image", Refused("error: zeros has no content: every voxel is 0."))
def _all_zero(ctx):
    return Attempt(predict(ctx, "-i", write_image(ctx.tmp / "zeros.nii.gz", np.zeros((20, 24, 22), np.int16))))


@case(IMAGES, "a constant image", Refused("error: constant has no content: every voxel is 7."))
def _constant(ctx):
    return Attempt(predict(ctx, "-i", write_image(ctx.tmp / "constant.nii.gz", np.full((20, 24, 22), 7, np.int16))))


@case(IMAGES, "a NIfTI whose qform and sform disagree (by 12 mm)",
      Works(GRID + " as ITK (and nnU-Net, and Slicer) places it",
            "note: two_orientations.nii.gz: its header's two orientations (qform and sform) disagree by up to 12.0 mm; "
            "the qform was used, as ITK (and so nnU-Net and 3D Slicer) reads it."))
def _qform_sform_disagree(ctx):
    path = nifti_with_two_orientations(ctx.tmp / "two_orientations.nii.gz", smooth_volume(), 12.0)
    return works_on(ctx, path)


@case(IMAGES, "unicode and spaces in the input and output paths", Works(GRID))
def _unicode_paths(ctx):
    image = write_image(ctx.tmp / "patiënt 李 Ørsted" / "scan — T1 ü.nii.gz", smooth_volume())
    return works_on(ctx, image, output="résultats ü/seg ✓ 1.nii.gz")


@case(IMAGES, "a header claiming 20000 x 20000 x 20000 voxels (the file is small)",
      Refused("error: Reading huge.nrrd (20000 x 20000 x 20000 voxels) would need about … TB, but only … of memory "
              "is available; crop or downsample the image first."))
def _huge_header(ctx):
    path = ctx.tmp / "huge.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(smooth_volume()), str(path), False)
    return Attempt(predict(ctx, "-i", edit_nrrd_header(path, "sizes: 22 24 20", "sizes: 20000 20000 20000")))


CHANNELS = "Channels"


@case(CHANNELS, "two images for a one-channel model",
      Refused("error: This model needs 1 input image(s) (MRI); got 2."))
def _two_images_one_channel(ctx):
    return Attempt(predict(ctx, "-i", ctx.image, ctx.image))


@case(CHANNELS, "one image for a two-channel model",
      Refused("error: This model needs 2 input image(s) (T1, T2); got 1."))
def _one_image_two_channels(ctx):
    return Attempt(predict(ctx, "-i", ctx.image, model="two"))


@case(CHANNELS, "channels on different voxel grids",
      Refused("error: Channel images case.nrrd and other.nrrd do not share one voxel grid (size 22x24x20 vs "
              "23x24x20); resample them onto the same grid first."))
def _channels_on_different_grids(ctx):
    other = write_image(ctx.tmp / "other.nrrd", smooth_volume((20, 24, 23)))
    return Attempt(predict(ctx, "-i", ctx.image, other, model="two"))


# ================================================================================================= DICOM

DICOM = "DICOM"


def ct_slices(count=12, seed=0) -> np.ndarray:
    return (smooth_volume((count, 24, 22), seed) * 2 - 400).astype(np.int16)


@case(DICOM, "a folder holding two series (neither of the model's modality)",
      Works(GRID + " of the larger series, named on stderr",
            "note: The folder two_series holds 2 image series, none of them MR as the model expects; read the largest: "
            "'axial' (UID …, 12 slices)."))
def _dicom_several_series(ctx):
    return Attempt(predict(ctx, "-i", two_series(ctx)), ctx.out / "seg.nii.gz")


def two_series(ctx) -> Path:
    folder = ctx.tmp / "two_series"
    write_dicom_series(folder, ct_slices(12), series_number=1, description="axial")
    write_dicom_series(folder, ct_slices(5, seed=1), series_number=2, description="scout")
    return folder


@case(DICOM, "a folder holding a larger CT series and an MR series, for an MR model",
      Works(GRID + " of the MR series, named on stderr",
            "note: The folder ct_and_mr holds 2 image series; read the only MR series (the model expects MR): "
            "'t1' (UID …, 6 slices)."))
def _dicom_series_of_the_model_modality(ctx):
    folder = ctx.tmp / "ct_and_mr"
    write_dicom_series(folder, ct_slices(12), series_number=1, description="ct")
    write_dicom_series(folder, ct_slices(6, seed=1), series_number=2, description="t1", modality="MR")
    return Attempt(predict(ctx, "-i", folder), ctx.out / "seg.nii.gz",
                   lambda: _assert_slices(ctx.out / "seg.nii.gz", 6))


def _assert_slices(output: Path, count: int):
    assert sitk.ReadImage(str(output)).GetSize()[2] == count


@case(DICOM, "--series naming the smaller of two series",
      Works(GRID + " of that series",
            "note: Read the series asked for, 'scout' (UID …, 5 slices), of 2 image series in two_series."))
def _dicom_series_chosen(ctx):
    folder = two_series(ctx)
    uid = str(read_header(folder / "s2_000.dcm").SeriesInstanceUID)
    return Attempt(predict(ctx, "-i", folder, "--series", uid), ctx.out / "seg.nii.gz",
                   lambda: _assert_slices(ctx.out / "seg.nii.gz", 5))


@case(DICOM, "--series naming a series the folder does not hold",
      Refused("error: The folder two_series holds no image series with UID 1.2.3.4; it holds 'axial' (UID …, 12 "
              "slices); 'scout' (UID …, 5 slices)."))
def _dicom_series_missing(ctx):
    return Attempt(predict(ctx, "-i", two_series(ctx), "--series", "1.2.3.4"))


def read_header(path: Path):
    import pydicom
    return pydicom.dcmread(path, stop_before_pixels=True)


@case(DICOM, "a single DICOM file instead of its folder",
      Refused("error: s1_000.dcm is a single DICOM file; give the folder that holds its series instead."))
def _dicom_single_file(ctx):
    folder = write_dicom_series(ctx.tmp / "series", ct_slices(12))
    return Attempt(predict(ctx, "-i", folder / "s1_000.dcm"))


@case(DICOM, "a series with a missing slice",
      Works("a label map on the regular grid the slices were acquired on (13 slices, the missing one filled in "
            "between its neighbours, as Slicer's geometry regularization does)",
            "note: Slice spacing varies from 2 to 4 mm (missing slices?) in the DICOM series in gap; resampled onto 13 "
            "slices 2 mm apart, perpendicular to the slices, as Slicer's acquisition geometry regularization does."))
def _dicom_missing_slice(ctx):
    positions = [2.0 * k for k in range(13) if k != 6]
    return Attempt(predict(ctx, "-i", write_dicom_series(ctx.tmp / "gap", ct_slices(12), positions)),
                   ctx.out / "seg.nii.gz")


@case(DICOM, "a series with uneven slice spacing",
      Works("a label map on a regular grid through the acquired slices (the most common spacing)",
            "note: Slice spacing varies from 1 to 3 mm (missing slices?) in the DICOM series in uneven; resampled onto "
            "11 slices 1.9 mm apart, perpendicular to the slices, as Slicer's acquisition geometry regularization "
            "does."))
def _dicom_uneven_spacing(ctx):
    positions = np.cumsum([0, 1, 1, 3, 1, 2, 2, 1, 3, 2, 1, 2])
    return Attempt(predict(ctx, "-i", write_dicom_series(ctx.tmp / "uneven", ct_slices(12), positions)),
                   ctx.out / "seg.nii.gz")


@case(DICOM, "a CT acquired with a tilted gantry (slices shifted along their plane)",
      Works("a label map on a grid perpendicular to the slices, each slice where it was acquired",
            "note: The slices are tilted by 20 degrees (gantry tilt) in the DICOM series in tilt; resampled onto 12 "
            "slices 1.879 mm apart, perpendicular to the slices, as Slicer's acquisition geometry regularization "
            "does."))
def _dicom_gantry_tilt(ctx):
    angle = np.radians(20)
    folder = write_dicom_series(ctx.tmp / "tilt", ct_slices(12), [(0, 0, 2.0 * k) for k in range(12)],
                                orientation=(1, 0, 0, 0, np.cos(angle), -np.sin(angle)))
    return Attempt(predict(ctx, "-i", folder), ctx.out / "seg.nii.gz")


@case(DICOM, "one series mixing axial and sagittal slices",
      Works(GRID + " of the axial slices (the larger part), named on stderr",
            "note: The folder mixed_orientations holds 2 image series, none of them MR as the model expects; read the "
            "largest: 'axial' (UID …, 12 slices; its axial slices, 1 of 2 orientations)."))
def _dicom_mixed_orientations(ctx):
    axial, sagittal = (1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1)
    positions = [(0, 0, 2.0 * k) for k in range(12)] + [(2.0 * k, 0, 0) for k in range(4)]
    folder = write_dicom_series(ctx.tmp / "mixed_orientations", ct_slices(16), positions,
                                orientation=[axial] * 12 + [sagittal] * 4)
    return Attempt(predict(ctx, "-i", folder), ctx.out / "seg.nii.gz",
                   lambda: _assert_slices(ctx.out / "seg.nii.gz", 12))


@case(DICOM, "an empty folder",
      Refused("error: Folder …empty holds no DICOM series (sub-folders are not searched)."))
def _dicom_empty_folder(ctx):
    (ctx.tmp / "empty").mkdir()
    return Attempt(predict(ctx, "-i", ctx.tmp / "empty"))


@case(DICOM, "a folder mixing two copies of one series (slices at the same positions)",
      Refused("error: The DICOM series in mixed has several slices at the same position; the folder probably mixes "
              "series, put each series in its own folder."))
def _dicom_two_copies(ctx):
    folder = ctx.tmp / "mixed"
    uid = "1.2.826.0.1.3680043.8.498.1"
    write_dicom_series(folder, ct_slices(6), series_number=1, series_uid=uid)
    write_dicom_series(folder / "copy", ct_slices(6), series_number=1, series_uid=uid, first_instance=7)
    for file in (folder / "copy").iterdir():
        file.rename(folder / f"copy_{file.name}")
    (folder / "copy").rmdir()
    return Attempt(predict(ctx, "-i", folder))


# ========================================================================================= model folders

MODELS = "Model folders"


def model_copy(ctx, which="one") -> Path:
    return copy_model(ctx.models[which], ctx.tmp)


@case(MODELS, "a model folder that does not exist", Refused("error: Model folder not found: …no_such_model."))
def _missing_model(ctx):
    return Attempt(predict(ctx, "-i", ctx.image, model=ctx.tmp / "no_such_model"))


@case(MODELS, "a model folder without plans.json",
      Refused("error: No trained nnU-Net model in …: expected plans.json, dataset.json and fold_N folders."))
def _no_plans(ctx):
    model = model_copy(ctx)
    (model / "plans.json").unlink()
    return Attempt(predict(ctx, "-i", ctx.image, model=model))


@case(MODELS, "plans.json cut short", Refused("error: …plans.json is not valid JSON (…)."))
def _broken_plans(ctx):
    model = model_copy(ctx)
    (model / "plans.json").write_text('{"configurations": {')
    return Attempt(predict(ctx, "-i", ctx.image, model=model))


@case(MODELS, "a fold that is not there (-f 3)",
      Refused("error: Fold 3 has no final checkpoint in … (available: 0)."))
def _missing_fold(ctx):
    return Attempt(predict(ctx, "-i", ctx.image, "-f", "3"))


@case(MODELS, "the only fold's checkpoint deleted",
      Refused("error: No fold of … has a final checkpoint."))
def _missing_checkpoint(ctx):
    model = model_copy(ctx)
    (model / "fold_0" / "checkpoint_final.pth").unlink()
    return Attempt(predict(ctx, "-i", ctx.image, model=model))


@case(MODELS, "a configuration the plans do not have (-c 3d_lowres)",
      Refused("error: Configuration '3d_lowres' is not in plans.json (has: 3d_fullres)."))
def _unknown_configuration(ctx):
    return Attempt(predict(ctx, "-i", ctx.image, "-c", "3d_lowres"))


@case(MODELS, "a checkpoint cut in half",
      Refused("error: Cannot read checkpoint …checkpoint_final.pth: the file is truncated or corrupt (…)."))
def _truncated_checkpoint(ctx):
    model = model_copy(ctx)
    path = model / "fold_0" / "checkpoint_final.pth"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return Attempt(predict(ctx, "-i", ctx.image, model=model))


@case(MODELS, "a checkpoint of random bytes",
      Refused("error: Cannot read checkpoint …checkpoint_final.pth: the file is truncated or corrupt (…)."),
      process=True)
def _random_checkpoint(ctx):
    model = model_copy(ctx)
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(np.random.default_rng(7).bytes(50_000))
    return Attempt(predict(ctx, "-i", ctx.image, model=model))


class RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def malicious_model(where: Path, model: Path, marker: Path) -> Path:
    """A copy of `model` whose checkpoint, when unpickled, runs `touch marker` (hidden in `logging`)."""
    copy = copy_model(model, where)
    edit_checkpoint(copy, lambda c: c.__setitem__("logging", RunsCode(f"touch {marker}")))
    return copy


@case(MODELS, "a checkpoint that runs a shell command when unpickled",
      Refused("error: Refusing to load …checkpoint_final.pth: it contains objects that are not plain data "
              "(…system); only weights and numbers are allowed."), process=True)
def _malicious_checkpoint(ctx):
    marker = ctx.tmp / f"pwned-{uuid.uuid4().hex}"
    model = malicious_model(ctx.tmp, ctx.models["one"], marker)

    def nothing_ran():
        assert not marker.exists(), "loading the checkpoint ran the code inside it"
    return Attempt(predict(ctx, "-i", ctx.image, model=model), check=nothing_ran)


V1_TRAINED = "nnUNet/3d_fullres/Task999_Tiny/nnUNetTrainerV2__nnUNetPlansv2.1"


def v1_folder(ctx, plans=None, model_pkl=None, with_plans: bool = True) -> Path:
    """An nnU-Net v1 results folder (nnUNet/<configuration>/TaskXXX/<trainer>__<plans>/ with plans.pkl and
    fold_0/model_final_checkpoint.model + .model.pkl), its pickles written as v1 writes them (pickle.dump of
    plain dicts); the hostile cases below put something else in one of them."""
    import pickle
    trained = ctx.tmp / "v1" / V1_TRAINED
    (trained / "fold_0").mkdir(parents=True)
    stage = {"patch_size": [16, 16, 16], "current_spacing": [1.0, 1.0, 1.0], "pool_op_kernel_sizes": [[2, 2, 2]],
             "conv_kernel_sizes": [[3, 3, 3], [3, 3, 3]], "batch_size": 2}
    plain = {"plans_per_stage": {0: stage}, "num_modalities": 1, "modalities": {0: "MRI"}, "num_classes": 2,
             "all_classes": [1, 2], "normalization_schemes": {0: "nonCT"}, "use_mask_for_norm": {0: False},
             "base_num_features": 4, "conv_per_stage": 2, "transpose_forward": [0, 1, 2],
             "transpose_backward": [0, 1, 2]}
    if with_plans:
        (trained / "plans.pkl").write_bytes(pickle.dumps(plans if plans is not None else plain))
    info = model_pkl if model_pkl is not None else {"init": ("plans.pkl", 0, "", "", True, 0, True, True, False),
                                                   "name": "nnUNetTrainerV2"}
    (trained / "fold_0" / "model_final_checkpoint.model.pkl").write_bytes(pickle.dumps(info))
    torch.save({"epoch": 1, "state_dict": {}}, trained / "fold_0" / "model_final_checkpoint.model")
    return ctx.tmp / "v1" / "nnUNet"


def v1_runs_code(ctx, which: str):
    marker = ctx.tmp / f"pwned-{uuid.uuid4().hex}"
    evil = {"plans_per_stage": RunsCode(f"touch {marker}")}
    model = v1_folder(ctx, plans=evil) if which == "plans" else v1_folder(ctx, model_pkl={"name": RunsCode(
        f"touch {marker}")})

    def nothing_ran():
        assert not marker.exists(), "reading the v1 pickle ran the code inside it"
    return Attempt(predict(ctx, "-i", ctx.image, model=model), check=nothing_ran)


V1_REFUSED_CODE = ("error: Refusing to load …{}: it contains …system, which is not plain data; only dicts, lists, "
                   "numbers, text and numpy arrays are read from nnU-Net v1 files.")


@case(MODELS, "an nnU-Net v1 plans.pkl that runs a shell command when unpickled",
      Refused(V1_REFUSED_CODE.format("plans.pkl")), process=True)
def _v1_plans_runs_code(ctx):
    return v1_runs_code(ctx, "plans")


@case(MODELS, "an nnU-Net v1 .model.pkl that runs a shell command when unpickled",
      Refused(V1_REFUSED_CODE.format("model_final_checkpoint.model.pkl")), process=True)
def _v1_model_pkl_runs_code(ctx):
    return v1_runs_code(ctx, "model_pkl")


@case(MODELS, "an nnU-Net v1 plans.pkl cut short",
      Refused("error: Cannot read …plans.pkl: the file is truncated or corrupt (…)."))
def _v1_truncated_plans(ctx):
    model = v1_folder(ctx)
    plans = model / "3d_fullres" / "Task999_Tiny" / "nnUNetTrainerV2__nnUNetPlansv2.1" / "plans.pkl"
    plans.write_bytes(plans.read_bytes()[: plans.stat().st_size // 2])
    return Attempt(predict(ctx, "-i", ctx.image, model=model))


@case(MODELS, "an nnU-Net v1 model folder without plans.pkl",
      Refused("error: …nnUNetTrainerV2__nnUNetPlansv2.1 has no plans.pkl (nor plans inside its .model.pkl): it is "
              "not a usable nnU-Net v1 model folder."))
def _v1_without_plans(ctx):
    return Attempt(predict(ctx, "-i", ctx.image, model=v1_folder(ctx, with_plans=False)))


def _weights_case(name, given, edit, line):
    def make(ctx):
        model = model_copy(ctx)
        edit_checkpoint(model, lambda c: edit(c["network_weights"]))
        return Attempt(predict(ctx, "-i", ctx.image, model=model))
    make.__name__ = name
    case(MODELS, given, Refused(line))(make)


_weights_case("_weights_missing_key", "weights missing a layer", lambda w: w.pop("decoder.seg_layers.1.weight"),
              "error: The weights in …checkpoint_final.pth do not fit the network its plans describe: missing 1 keys: "
              "decoder.seg_layers.1.weight (trainer nnUNetTrainer).")
_weights_case("_weights_unexpected_key", "weights with an extra layer",
              lambda w: w.__setitem__("decoder.extra_head.weight", torch.zeros(3)),
              "error: The weights in …checkpoint_final.pth do not fit the network its plans describe: unexpected 1 "
              "keys: decoder.extra_head.weight (trainer nnUNetTrainer).")
_weights_case("_weights_wrong_shape", "a weight of the wrong shape",
              lambda w: w.__setitem__("decoder.seg_layers.1.bias", torch.zeros(5)),
              "error: The weights in …checkpoint_final.pth do not fit the network its plans describe: "
              "decoder.seg_layers.1.bias has shape (5,), expected (3,) (trainer nnUNetTrainer).")
_weights_case("_weights_nan", "weights that are NaN (a training that diverged)",
              lambda w: w["decoder.seg_layers.1.weight"].fill_(float("nan")),
              "error: Refusing the weights in …checkpoint_final.pth: they hold NaN or infinite values "
              "(decoder.seg_layers.1.weight), the sign of a training that diverged or of a damaged file "
              "(trainer nnUNetTrainer).")
_weights_case("_weights_infinite", "weights with an infinite value",
              lambda w: w["encoder.stages.0.0.convs.0.conv.weight"].view(-1)[0].fill_(float("inf")),
              "error: Refusing the weights in …checkpoint_final.pth: they hold NaN or infinite values "
              "(encoder.stages.0.0.convs.0.conv.weight and … more), the sign of a training that diverged or of a "
              "damaged file (trainer nnUNetTrainer).")


def plans_case(name, given, edit, outcome):
    def make(ctx):
        model = model_copy(ctx)
        edit_json(model / "plans.json", lambda plans: edit(plans["configurations"]["3d_fullres"]))
        return Attempt(predict(ctx, "-i", ctx.image, model=model))
    make.__name__ = name
    case(MODELS, given, outcome)(make)


plans_case("_absurd_patch_size", "plans with a patch of 20000 voxels a side",
           lambda c: c.__setitem__("patch_size", [20000, 20000, 20000]),
           Refused("error: Segmenting case with Dataset999_Tiny (3d_fullres) (patch 20000 x 20000 x 20000) would need "
                   "about … TB, but only … of memory is available; use a smaller image or check the model's "
                   "plans.json."))
plans_case("_network_too_large", "plans describing a network of a million features per layer",
           lambda c: c["architecture"]["arch_kwargs"].__setitem__("features_per_stage", [4, 8, 1_000_000]),
           Refused("error: The network described in nnUNetTrainer__nnUNetPlans__3d_fullres/plans.json would need "
                   "about … TB, but only … of memory is available; the plans are probably damaged."))
plans_case("_zero_spacing_in_plans", "plans with a target spacing of 0",
           lambda c: c.__setitem__("spacing", [1.0, 0, 1.0]),
           Refused("error: plans.json, configuration 3d_fullres: the spacing must be 3 positive numbers of millimetres "
                   "(one per patch axis), not [1.0, 0, 1.0]."))
plans_case("_negative_spacing_in_plans", "plans with a negative target spacing",
           lambda c: c.__setitem__("spacing", [1.0, -1.5, 1.0]),
           Refused("error: plans.json, configuration 3d_fullres: the spacing must be 3 positive numbers of millimetres "
                   "(one per patch axis), not [1.0, -1.5, 1.0]."))
plans_case("_negative_patch_size", "plans with a negative patch size",
           lambda c: c.__setitem__("patch_size", [16, -16, 16]),
           Refused("error: plans.json, configuration 3d_fullres: the patch size must be 2 or 3 positive whole numbers, "
                   "not [16, -16, 16]."))


def labelled_model(ctx, labels: dict, name="Dataset995_Labels") -> Path:
    return model_factory.make_model_folder(ctx.tmp / "labelled", labels=labels, dataset_name=name)


MANY_LABELS = {"background": 0, **{f"structure {i:03d}": i for i in range(1, 300)}}


@case(MODELS, "a model with 300 labels (more than uint8 holds)",
      Works("a uint16 label map; a .seg.nrrd with 299 segments"))
def _many_labels(ctx):
    model = labelled_model(ctx, MANY_LABELS)
    nifti = ctx.out / "many.nii.gz"

    def check():
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(nifti))).dtype == np.uint16
        from SegmentMBTFELib.io.segfile import read_seg_nrrd
        labels, segments, _ = read_seg_nrrd(ctx.out / "seg.seg.nrrd")
        assert len(segments) == 299 and segments[-1].name == "structure 299" and labels.array.dtype == np.uint16
    assert ctx.run(predict(ctx, "-i", ctx.image, model=model, output="many.nii.gz"))[0] == 0
    return Attempt(predict(ctx, "-i", ctx.image, model=model, output="seg.seg.nrrd"), ctx.out / "seg.seg.nrrd", check)


def seg_nrrd_names(path: Path) -> list:
    """Segment names as Slicer reads them: its own storage node (the slicer-core package) where installed,
    else teem's header reading through SimpleITK (what Slicer's NRRD reading is built on)."""
    try:
        import slicer
    except ImportError:
        image = sitk.ReadImage(str(path))
        count = sum(1 for key in image.GetMetaDataKeys() if re.fullmatch(r"Segment\d+_Name", key))
        return [image.GetMetaData(f"Segment{i}_Name") for i in range(count)]
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    segmentation = node.GetSegmentation()
    return [segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName()
            for i in range(segmentation.GetNumberOfSegments())]


@case(MODELS, "label names with line breaks and control characters",
      Works("a .seg.nrrd whose header stays intact (each name on one line, control characters as spaces)"))
def _label_names_control_chars(ctx):
    model = labelled_model(ctx, {"background": 0, "left\nhippo\r\x1b[31m": 1, "a\x00b\tc\u202e": 2})
    output = ctx.out / "seg.seg.nrrd"

    def check():
        assert seg_nrrd_names(output) == ["left hippo [31m", "a b c"]
        header = output.read_bytes().split(b"\n\n", 1)[0]
        assert all(line == b"" or line.startswith((b"#", b"NRRD")) or b":" in line for line in header.split(b"\n"))
        assert not re.search(rb"[\x00-\x08\x0b-\x1f]", header)
    return Attempt(predict(ctx, "-i", ctx.image, model=model, output="seg.seg.nrrd"), output, check)


@case(MODELS, "non-ASCII label names", Works("a .seg.nrrd with the names exactly as in dataset.json"))
def _non_ascii_label_names(ctx):
    names = ["海马 前部", "Hippocampe postérieur – ü"]
    model = labelled_model(ctx, {"background": 0, names[0]: 1, names[1]: 2})
    output = ctx.out / "seg.seg.nrrd"

    def check():
        assert seg_nrrd_names(output) == names
    return Attempt(predict(ctx, "-i", ctx.image, model=model, output="seg.seg.nrrd"), output, check)


@case(MODELS, "labels numbered with a gap (0, 1, 5)",
      Refused("error: dataset.json's labels must be numbered 0, 1, 2, ... without gaps, as nnU-Net requires; it has "
              "0, 1, 5."))
def _labels_not_consecutive(ctx):
    model = model_copy(ctx)
    edit_json(model / "dataset.json", lambda d: d.__setitem__("labels", {"background": 0, "a": 1, "b": 5}))
    return Attempt(predict(ctx, "-i", ctx.image, model=model))


@case(MODELS, "dataset.json with more labels than the weights predict",
      Refused("error: dataset.json lists 4 labels (background included), but the weights in …checkpoint_final.pth "
              "predict 3: the dataset.json does not belong to these weights."))
def _label_count_mismatch(ctx):
    model = model_copy(ctx)
    edit_json(model / "dataset.json", lambda d: d["labels"].__setitem__("extra", 3))
    return Attempt(predict(ctx, "-i", ctx.image, model=model))


@case(MODELS, "a fold folder without its checkpoint (training stopped early)",
      Works(GRID + " from the folds that have one",
            "note: nnUNetTrainer__nnUNetPlans__3d_fullres/fold_1 has no checkpoint_final.pth and was left out."))
def _fold_without_checkpoint(ctx):
    model = model_copy(ctx)
    (model / "fold_1").mkdir()
    return works_on(ctx, ctx.image, model=model)


@case(MODELS, "checkpoints that are symbolic links", Works(GRID))
def _symlinked_checkpoint(ctx):
    model = model_copy(ctx)
    stored = ctx.tmp / "weights store" / "fold0.pth"
    stored.parent.mkdir()
    shutil.move(model / "fold_0" / "checkpoint_final.pth", stored)
    (model / "fold_0" / "checkpoint_final.pth").symlink_to(stored)
    return works_on(ctx, ctx.image, model=model)


@case(MODELS, "a checkpoint that is a link to a file that is gone",
      Refused("error: …checkpoint_final.pth is a link to …gone.pth, which does not exist; copy the checkpoint itself."))
def _broken_symlink_checkpoint(ctx):
    model = model_copy(ctx)
    (model / "fold_0" / "checkpoint_final.pth").unlink()
    (model / "fold_0" / "checkpoint_final.pth").symlink_to(ctx.tmp / "gone.pth")
    return Attempt(predict(ctx, "-i", ctx.image, model=model))


def _precision_case(dtype):
    name = str(dtype).rsplit(".", 1)[-1]

    def make(ctx):
        model = model_copy(ctx)
        edit_checkpoint(model, lambda c: c.__setitem__(
            "network_weights", {k: v.to(dtype) if v.is_floating_point() else v for k, v in c["network_weights"].items()}))
        return works_on(ctx, ctx.image, model=model)
    make.__name__ = f"_{name}_weights"
    case(MODELS, f"weights saved in {name}", Works(GRID))(make)


for _precision in (torch.float16, torch.bfloat16):
    _precision_case(_precision)


@case(MODELS, "a checkpoint with extra entries (notes, EMA weights)", Works(GRID))
def _extra_checkpoint_keys(ctx):
    model = model_copy(ctx)

    def add(checkpoint):
        checkpoint["notes"] = "trained on site B"
        checkpoint["ema_weights"] = {k: v.clone() for k, v in checkpoint["network_weights"].items()}
    edit_checkpoint(model, add)
    return works_on(ctx, ctx.image, model=model)


@case(MODELS, "a .pth that is some other zip archive",
      Refused("error: …checkpoint_final.pth is a zip archive but not a PyTorch checkpoint (it holds README.txt, "
              "weights/model.bin); the wrong file was put in its place."))
def _pth_is_other_zip(ctx):
    import zipfile
    model = model_copy(ctx)
    with zipfile.ZipFile(model / "fold_0" / "checkpoint_final.pth", "w") as archive:
        archive.writestr("README.txt", "hello")
        archive.writestr("weights/model.bin", b"\0" * 100)
    return Attempt(predict(ctx, "-i", ctx.image, model=model))


@case(MODELS, "a postprocessing.json that is not nnU-Net's",
      Refused("error: postprocessing.json: a step's 'labels_or_regions' and 'background_label' must be label numbers."))
def _broken_postprocessing(ctx):
    model = model_copy(ctx)
    (model / "crossval_results_folds_0").mkdir()
    (model / "crossval_results_folds_0" / "postprocessing.json").write_text(json.dumps({
        "postprocessing_fns": ["remove_all_but_largest_component_from_segmentation"],
        "postprocessing_kwargs": [{"labels_or_regions": "all"}]}))
    return Attempt(predict(ctx, "-i", ctx.image, model=model))


@case(MODELS, "a cascade whose previous stage is on another grid",
      Refused("error: The previous stage's prediction is not on the image's voxel grid (size 22x24x20 vs 20x20x20); "
              "give the 3d_lowres prediction made for this image."))
def _cascade_previous_stage_other_grid(ctx):
    dataset = model_factory.make_cascade(ctx.tmp / "cascade")
    previous = write_image(ctx.tmp / "lowres.nii.gz", np.ones((20, 20, 20), np.uint8))
    return Attempt(predict(ctx, "-i", ctx.image, "-c", "3d_cascade_fullres", "--previous-stage", previous,
                           model=dataset))


# =============================================================================================== outputs

ZIPS = "Model zips"
TRAINED = "Dataset999_Tiny/nnUNetTrainer__nnUNetPlans__3d_fullres"


def zips(ctx) -> Path:
    """The folder of the case's zips (kept apart from the versions home and the outputs)."""
    folder = ctx.tmp / "zips"
    folder.mkdir(exist_ok=True)
    return folder


def model_zip(ctx, name: str = "model.zip", **kwargs) -> Path:
    """The tiny model zipped as nnUNetv2_export_model_to_zip lays it out (hostile_zips.py)."""
    return export_layout_zip(ctx.models["one"], zips(ctx) / name, **kwargs)


def add_zip(ctx, path: Path, check=None) -> Attempt:
    """`models add ZIP`; a refused one leaves the versions home (where the models home is) and the zip's folder
    as they were."""
    return Attempt(["models", "add", path], check=check, kept=[ctx.home, path.parent])


def nothing_named(ctx, name: str) -> Callable[[], None]:
    def check():
        assert not list(ctx.tmp.parent.rglob(name)), f"{name} was written"
    return check


@case(ZIPS, "a model zip laid out as nnUNetv2_export_model_to_zip lays it out",
      Works("the model unpacked into the models folder, listed by `models list` and used by its name with -m"))
def _zip_in_export_layout(ctx):
    def check():
        code, out, err = ctx.run(["models", "list"])
        assert code == 0 and re.search(r"^Dataset999_Tiny +added +PlainConvUNet +MRI +anterior, posterior", out,
                                       re.MULTILINE), out
        code, out, err = ctx.run(predict(ctx, "-i", ctx.image, model="Dataset999_Tiny", output="by_name.nii.gz"))
        assert code == 0, err
    return Attempt(["models", "add", model_zip(ctx)], ctx.home / "models" / TRAINED / "plans.json", check)


@case(ZIPS, "a zip member with an absolute path (/tmp/...)",
      Refused("error: Refusing model.zip: the member '/tmp/segmentmbtfe-evil.txt' has an absolute path, which would "
              "be written outside the models folder."))
def _zip_absolute_member(ctx):
    evil = Path("/tmp/segmentmbtfe-evil.txt")
    evil.unlink(missing_ok=True)

    def check():
        assert not evil.exists(), f"{evil} was written"
    return add_zip(ctx, model_zip(ctx, extra=plain_member(str(evil))), check)


@case(ZIPS, "a zip member climbing out of its folder (../)",
      Refused("error: Refusing model.zip: the member 'Dataset999_Tiny/../../../../evil.txt' climbs out of its folder "
              "(..), which would be written outside the models folder."))
def _zip_dotdot_member(ctx):
    return add_zip(ctx, model_zip(ctx, extra=plain_member("Dataset999_Tiny/../../../../evil.txt")),
                   nothing_named(ctx, "evil.txt"))


@case(ZIPS, "a zip member that is a symbolic link (to /etc/passwd)",
      Refused(f"error: Refusing model.zip: the member '{TRAINED}/fold_0/notes.txt' is a symbolic link; a model zip "
              "holds only files and folders."))
def _zip_symlink_member(ctx):
    return add_zip(ctx, model_zip(ctx, extra=special_member(f"{TRAINED}/fold_0/notes.txt", SYMLINK, "/etc/passwd")))


@case(ZIPS, "a zip member that is a named pipe",
      Refused(f"error: Refusing model.zip: the member '{TRAINED}/fold_0/pipe' is a named pipe; a model zip holds "
              "only files and folders."))
def _zip_fifo_member(ctx):
    return add_zip(ctx, model_zip(ctx, extra=special_member(f"{TRAINED}/fold_0/pipe", FIFO)))


@case(ZIPS, "a zip bomb: 33 MB that unpack to 33 GB of zeros",
      Refused("error: Refusing bomb.zip: it would unpack to 33.3 GB, more than the 32 GB a model zip may hold."))
def _zip_bomb(ctx):
    return add_zip(ctx, zip_bomb(zips(ctx) / "bomb.zip", 31))


@case(ZIPS, "a zip of 20,001 members",
      Refused("error: Refusing many.zip: it holds 20,001 members, more than the 20,000 a model zip may hold."))
def _zip_too_many_members(ctx):
    return add_zip(ctx, many_members_zip(zips(ctx) / "many.zip", 20_001))


@case(ZIPS, "a zip that holds no model (photos and notes)",
      Refused("error: photos.zip holds no nnU-Net model: no folder in it has plans.json, dataset.json and "
              "fold_N/checkpoint_final.pth."))
def _zip_not_a_model(ctx):
    return add_zip(ctx, documents_zip(zips(ctx) / "photos.zip"))


@case(ZIPS, "a model zip cut short (a download interrupted)",
      Refused("error: model.zip cannot be read as a zip archive (File is not a zip file); it may be incomplete or "
              "damaged (a download cut short?)."))
def _zip_truncated(ctx):
    path = model_zip(ctx)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    return add_zip(ctx, path)


@case(ZIPS, "a model zip whose checkpoint's bytes were damaged (its CRC no longer fits)",
      Refused(f"error: model.zip is damaged: its member '{TRAINED}/fold_0/checkpoint_final.pth' could not be "
              "unpacked (Bad CRC-32 for file …)."))
def _zip_damaged_member(ctx):
    path = damage_member(model_zip(ctx, stored=True), f"{TRAINED}/fold_0/checkpoint_final.pth")
    return add_zip(ctx, path)


@case(ZIPS, "an nnU-Net v1 model zip whose plans name no labels (v1 zips are read; test_nnunet_v1.py adds a "
      "real one)", Refused("error: v1_model.zip: The v1 plans name no classes ('all_classes' / 'num_classes')."))
def _zip_nnunet_v1(ctx):
    return add_zip(ctx, nnunet_v1_zip(zips(ctx) / "v1_model.zip"))


@case(ZIPS, "the same model zip added twice",
      Refused("error: A model named Dataset999_Tiny is already listed; give another name (--name), or remove it "
              "first (segment-mbtfe models remove Dataset999_Tiny)."))
def _zip_added_twice(ctx):
    path = model_zip(ctx)
    code, out, err = ctx.run(["models", "add", path])
    assert code == 0, err
    return add_zip(ctx, path)


OUTPUTS = "Outputs"


@case(OUTPUTS, "an output type that cannot be written (.png)",
      Refused("error: Cannot write seg.png: give a .nii.gz, .nii, .nrrd, .mha, .seg.nrrd or .dcm (DICOM SEG) file name."))
def _unsupported_output(ctx):
    return Attempt(predict(ctx, "-i", ctx.image, output="seg.png"))


@case(OUTPUTS, "a DICOM SEG (.dcm) of a NIfTI image",
      Refused("error: Cannot write seg.dcm: a DICOM SEG references the DICOM series it was made from, and this input "
              "is not a DICOM series; give the series folder as input, or write .seg.nrrd or .nii.gz."))
def _dicom_seg_of_nifti(ctx):
    return Attempt(predict(ctx, "-i", ctx.image, output="seg.dcm"))


@case(OUTPUTS, "a DICOM SEG (.dcm) of a DICOM series",
      Works("a DICOM Segmentation referencing the series' slices, one segment per label"))
def _dicom_seg_of_dicom(ctx):
    folder = write_dicom_series(ctx.tmp / "series", ct_slices(12))
    return Attempt(predict(ctx, "-i", folder, output="seg.dcm"), ctx.out / "seg.dcm",
                   lambda: _assert_references(ctx.out / "seg.dcm", folder))


def _assert_references(seg_file: Path, series: Path):
    seg, source = read_header(seg_file), read_header(series / "s1_000.dcm")
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["anterior", "posterior"]


@case(OUTPUTS, "an output folder that does not exist yet", Works("the folder is created and the label map written"))
def _missing_output_folder(ctx):
    return works_on(ctx, ctx.image, output="new/deeper/seg.nii.gz")


@case(OUTPUTS, "a read-only output folder",
      Refused("error: Cannot write into …out: …."), process=True)
def _read_only_output_folder(ctx):
    prefix = read_only_prefix(ctx.out)
    if prefix is None:
        import pytest
        pytest.skip("needs unprivileged mount namespaces (unshare) or a user that is not root")
    return Attempt(predict(ctx, "-i", ctx.image), prefix=prefix)


@case(OUTPUTS, "the input image's own path as the output",
      Refused("error: The output …case.nii.gz would overwrite the input image …case.nii.gz; give another file name."))
def _output_is_input(ctx):
    image = write_image(ctx.out / "case.nii.gz", smooth_volume())
    return Attempt(predict(ctx, "-i", image, output="case.nii.gz"), kept=[image])


@case(OUTPUTS, "a full disk while writing (a 16 kB tmpfs: ENOSPC; or a file size limit: EFBIG)",
      Refused("error: Could not write …seg.nii: the disk is full or the file could not be completed."),
      process=True, custom=True)
def _disk_full(ctx):
    # fine voxels: one tile at the model's 1 mm, then an 84 kB label map on the image's grid
    image = write_image(ctx.tmp / "big.nii.gz", smooth_volume((44, 48, 40)), spacing=(0.25, 0.25, 0.25))
    code, out, err = ctx.run_process(predict(ctx, "-i", image, output="seg.nii"), prefix=full_disk_prefix(ctx.out))
    ctx.extra["result"] = (code, err)
    left = re.search(r"LEFT:\[(.*)\]", out)
    assert left is not None, out + err
    assert left.group(1).strip() == "", f"a full disk left {left.group(1)!r} behind"


# ============================================================================================== versions

VERSIONS = "Versions"


def versioned_model(ctx) -> tuple:
    model = model_copy(ctx)
    return model, model_factory.perturbed_version(model, 0.01)


@case(VERSIONS, "a current version whose version.json was corrupted",
      Refused("error: Version v1 of Dataset999_Tiny (3d_fullres) cannot be used: …version.json cannot be read (…); "
              "use another version (models use), roll back (models rollback) or delete it (models delete v1)."))
def _corrupted_version_json(ctx):
    model, v1 = versioned_model(ctx)
    (v1.path / "version.json").write_text('{"id": "v1", "fami')
    return Attempt(predict(ctx, "-i", ctx.image, model=model), kept=[ctx.home])


@case(VERSIONS, "a current version whose folder was deleted by hand",
      Refused("error: Version v1 of Dataset999_Tiny (3d_fullres) cannot be used: its folder … is missing; use another "
              "version (models use), roll back (models rollback) or delete it (models delete v1)."))
def _version_folder_deleted(ctx):
    model, v1 = versioned_model(ctx)
    shutil.rmtree(v1.path)
    return Attempt(predict(ctx, "-i", ctx.image, model=model), kept=[ctx.home])


@case(VERSIONS, "a corrupted version list (versions.json)",
      Refused("error: The version list …versions.json cannot be read (…); restore or delete it (the version folders "
              "are kept)."))
def _corrupted_version_list(ctx):
    model, v1 = versioned_model(ctx)
    (v1.path.parent / "versions.json").write_bytes(b"\x00\xff garbage")
    return Attempt(predict(ctx, "-i", ctx.image, model=model), kept=[ctx.home])


def finetune_case_files(ctx) -> tuple:
    image = smooth_volume((20, 24, 22), seed=5)
    labels = np.zeros(image.shape, np.uint8)
    labels[5:15, 6:12, 5:15], labels[5:15, 14:20, 5:15] = 1, 2
    return (write_image(ctx.tmp / "case_0000.nii.gz", image + labels * 200),
            write_image(ctx.tmp / "case_labels.nii.gz", labels))


def finetune_args(model, image, labels, *extra) -> list:
    return ["finetune", "-q", "-m", model, "-i", image, "-l", labels, "--no-evaluation", "--device", "cpu", *extra]


@case(VERSIONS, "fine-tuning with a read-only versions home",
      Refused("error: Cannot write versions of Dataset999_Tiny (3d_fullres) to … (…); set SEGMENTMBTFE_HOME to a "
              "writable folder, or give the new version's folder."), process=True)
def _read_only_versions_home(ctx):
    prefix = read_only_prefix(ctx.home)
    if prefix is None:
        import pytest
        pytest.skip("needs unprivileged mount namespaces (unshare) or a user that is not root")
    image, labels = finetune_case_files(ctx)
    return Attempt(finetune_args(model_copy(ctx), image, labels, "--iterations", "1"), prefix=prefix,
                   kept=[ctx.home])


@case(VERSIONS, "predicting with a read-only versions home", Works(GRID + " (predicting only reads versions)"),
      process=True)
def _read_only_versions_home_predict(ctx):
    prefix = read_only_prefix(ctx.home)
    if prefix is None:
        import pytest
        pytest.skip("needs unprivileged mount namespaces (unshare) or a user that is not root")
    attempt = works_on(ctx, ctx.image)
    attempt.prefix = prefix
    return attempt


# The cases below run several commands or processes themselves; test_safety.py holds their bodies (signals,
# concurrency, batch) and registers them here with their outcome, so the table lists them with the rest.
def external(group, given, outcome, name):
    def make(ctx):
        return ctx.extra["external"][name](ctx)
    make.__name__ = "_" + name
    case(group, given, outcome, process=True, custom=True)(make)


external(OUTPUTS, "Ctrl+C (SIGINT) while the outputs are written (4 runs: 0, 0.05, 0.15, 0.35 s into the writing)",
         Works("exit 130 and nothing written, or, when it came after the last byte, the complete output; never a "
               "partial or temporary file"), "sigint_while_writing")
external(OUTPUTS, "SIGTERM (a scheduler or `kill`) while the outputs are written (the same 4 moments)",
         Works("exit 143 and nothing written, or the complete output; never a partial or temporary file"),
         "sigterm_while_writing")
external(VERSIONS, "two processes fine-tuning the same model at once",
         Works("both succeed: two versions (v1, v2), both complete and listed; the version list stays valid"),
         "concurrent_finetunes")
external(VERSIONS, "processes switching, rolling back and adding versions of one model at once",
         Works("every version kept and loadable, the version list valid, no lock left behind"),
         "concurrent_version_switching")
external(VERSIONS, "a fine-tune killed (SIGKILL) while training and at 0 and 0.02 s into writing the version (random "
         "moments: benchmarks/stress_kill_finetune.py)",
         Works("no damaged or half-written version, the current version loads; the next fine-tune works and "
               "clears what the killed one left"), "killed_finetune")
external("Batch", "a folder of cases where some are broken (cut short, constant, not an image, an empty folder)",
         Works("the good cases written; each broken one listed with its reason in the summary and the manifest; "
               "exit 1; a second run skips what is done"), "batch_with_broken_cases")


# ================================================================================================= table

def markdown_table(cases: Sequence[Case] = None) -> str:
    """The README's Safety table: every case, what the user gives and what they see."""
    rows = ["| | input | what the user sees |", "|---|---|---|"]
    cases = list(cases or CASES)
    for group in dict.fromkeys(c.group for c in cases):
        for index, c in enumerate([x for x in cases if x.group == group]):
            rows.append(f"| {group if index == 0 else ''} | {_cell(c.given)} | {_cell(_seen(c.outcome))} |")
    return "\n".join(rows) + "\n"


def _seen(outcome) -> str:
    if isinstance(outcome, Refused):
        return f"`{outcome.line}` (exit 1, nothing written)"
    return outcome.result + (f"; and `{outcome.note}`" if outcome.note else "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


TABLE_START = "<!-- safety table: generated by scripts/safety_table.py from Testing/safety_catalogue.py -->"
TABLE_END = "<!-- end of the safety table -->"


def readme_with_table(readme: str) -> str:
    """README text with the table between the markers replaced by the catalogue's."""
    start, end = readme.index(TABLE_START) + len(TABLE_START), readme.index(TABLE_END)
    return readme[:start] + "\n" + markdown_table() + readme[end:]
