"""3d_lowres and 3d_cascade_fullres: the low-resolution stage, then the full-resolution refinement that reads it.

nnU-Net makes these only for large images, which no reference dataset here has, so the plans are those of
model_factory with the two configurations added as nnU-Net's planner writes them (lowres at a coarser
spacing; the cascade inheriting 3d_fullres and naming 3d_lowres as its previous stage). Checked: the
previous stage becomes one one-hot input channel per foreground label, its absence is one clear error,
and the whole chain runs from the command line.
"""
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

import model_factory
from SegmentMBTFELib import InputError, load_model
from SegmentMBTFELib.io.images import read_volume
from SegmentMBTFELib.volume import Volume

@pytest.fixture
def cascade(tmp_path):
    dataset_folder = model_factory.make_cascade(tmp_path)
    return (dataset_folder, dataset_folder / "nnUNetTrainer__nnUNetPlans__3d_lowres",
            dataset_folder / "nnUNetTrainer__nnUNetPlans__3d_cascade_fullres")


def case():
    rng = np.random.default_rng(1)
    return Volume(rng.normal(100, 30, (24, 28, 20)).astype(np.float32), spacing=(1.0, 1.0, 1.0))


def test_lowres_predicts_at_its_coarser_spacing_and_returns_the_input_grid(cascade):
    dataset_folder, _, _ = cascade
    model = load_model(dataset_folder, configuration="3d_lowres")
    assert model.configuration.spacing == [2.0, 2.0, 2.0]
    labels = model.predict([case()], device="cpu", tta=False).labels
    assert labels.array.shape == (24, 28, 20)


def test_cascade_reads_the_previous_stage_as_one_hot_channels(cascade):
    dataset_folder, _, _ = cascade
    model = load_model(dataset_folder, configuration="3d_cascade_fullres")
    assert model.configuration.previous_stage == "3d_lowres"
    first_conv = model.network.encoder.stages[0][0].convs[0].conv
    assert first_conv.in_channels == 3  # the image + anterior + posterior
    image = case()
    lowres = load_model(dataset_folder, configuration="3d_lowres").predict([image], device="cpu", tta=False).labels
    refined = model.predict([image], device="cpu", tta=False, previous_stage=lowres).labels.array
    other = model.predict([image], device="cpu", tta=False,
                          previous_stage=lowres.with_array(np.zeros_like(lowres.array))).labels.array
    assert refined.shape == image.array.shape
    assert not np.array_equal(refined, other), "the previous stage must change the refinement"


def test_cascade_without_previous_stage_is_one_clear_error(cascade):
    dataset_folder, _, _ = cascade
    model = load_model(dataset_folder, configuration="3d_cascade_fullres")
    with pytest.raises(InputError, match="refines the 3d_lowres prediction"):
        model.predict([case()], device="cpu", tta=False)


def test_cascade_from_the_command_line(cascade, tmp_path):
    dataset_folder, _, _ = cascade
    image = tmp_path / "case.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(case().array), str(image))
    cli = [sys.executable, "-m", "SegmentMBTFELib.cli"]
    low, full = tmp_path / "low.nii.gz", tmp_path / "full.nii.gz"
    for arguments in (["-c", "3d_lowres", "-o", str(low)],
                      ["-c", "3d_cascade_fullres", "--previous-stage", str(low), "-o", str(full)]):
        result = subprocess.run(cli + ["predict", "-m", str(dataset_folder), "-i", str(image), "--no-tta",
                                       "--device", "cpu"] + arguments, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    assert read_volume(full).array.shape == (24, 28, 20)
    missing = subprocess.run(cli + ["predict", "-m", str(dataset_folder), "-c", "3d_cascade_fullres", "-i",
                                    str(image), "-o", str(tmp_path / "x.nii.gz")], capture_output=True, text=True)
    assert missing.returncode == 1 and "previous" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "x.nii.gz").exists()
