"""Bad input through the real command line: one clear line on stderr, a non-zero exit, no output left behind.

Every case runs `SegmentMBTFELib.cli.main` in this process (stderr captured) and a representative subset
also runs the installed `segment-mbtfe` in a subprocess, which is where a traceback would show. The model
folders are written by `model_factory` (no nnunetv2 needed); the bad files are real files: a checkpoint cut
in half, random bytes, a pickle that runs a shell command, NaN volumes written by SimpleITK, a 2D NIfTI.

Also here: `models info`, successful predictions (.nii.gz, .nrrd, .seg.nrrd, a DICOM folder, --probabilities)
keeping the input's geometry, and cancelling (Python API and Ctrl+C on the command line).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import model_factory
from terminal import interrupt_when
from SegmentMBTFELib import Cancelled, InputError, load_model
from SegmentMBTFELib import cli
from SegmentMBTFELib.imageio import read_volume

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HIPPO_IMAGE = DATA / "hippocampus" / "train" / "images" / "hippocampus_001.nii.gz"
HIPPO_DICOM = DATA / "hippocampus" / "dicom" / "11_HCropVolume"
needs_data = pytest.mark.skipif(not HIPPO_IMAGE.is_file(), reason=f"real test data not found at {DATA}")


# ------------------------------------------------------------------------------------------------ helpers

def cli_command() -> list:
    script = Path(sys.executable).with_name("segment-mbtfe")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "SegmentMBTFELib.cli"]


def run_many(arg_lists, timeout=120):
    """Several command lines at once (each mostly waits on importing torch): [(exit code, stdout, stderr)]."""
    processes = [subprocess.Popen(cli_command() + [str(a) for a in args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for args in arg_lists]
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        results.append((process.returncode, out, err))
    return results


def run_inprocess(capsys, args):
    """cli.main in this process: (exit code, stdout, stderr). An escaping exception fails the test."""
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_clear_line(code, err, needles):
    assert code != 0, "a bad input must give a non-zero exit"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert "unexpected failure" not in line, f"a bad input reached the bug handler: {line}"
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    return line


def write_image(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: image.GetDimension()])
    image.SetOrigin(origin[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


def smooth_volume(shape=(20, 24, 22), seed=0) -> np.ndarray:
    from scipy.ndimage import gaussian_filter
    noise = np.random.default_rng(seed).normal(size=shape)
    return (gaussian_filter(noise, 2) * 300 + 200).astype(np.float32)


def copy_model(model: Path, where: Path) -> Path:
    target = where / "model" / model.name
    shutil.copytree(model, target)
    return target


def assert_same_geometry(a: sitk.Image, b: sitk.Image):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)


class RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("factory_models")
    return {
        "one": model_factory.make_model_folder(root, dataset_name="Dataset991_One"),
        "two": model_factory.make_model_folder(root, channels=("T1", "T2"), dataset_name="Dataset992_Two"),
    }


@pytest.fixture(scope="session")
def good_image(tmp_path_factory) -> Path:
    return write_image(tmp_path_factory.mktemp("inputs") / "case.nrrd", smooth_volume())


@pytest.fixture()
def out_dir(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


# Each case: (tmp_path, models, good_image) -> (arguments after "predict", words the message must hold).
def _missing_input(tmp, models, image):
    return ["-m", models["one"], "-i", tmp / "nowhere.nii.gz"], ["not found", "nowhere.nii.gz"]


def _missing_model(tmp, models, image):
    return ["-m", tmp / "no_such_model", "-i", image], ["not found", "no_such_model"]


def _no_plans(tmp, models, image):
    model = copy_model(models["one"], tmp)
    (model / "plans.json").unlink()
    return ["-m", model, "-i", image], ["plans.json"]


def _broken_plans(tmp, models, image):
    model = copy_model(models["one"], tmp)
    (model / "plans.json").write_text('{"configurations": {')
    return ["-m", model, "-i", image], ["plans.json", "json"]


def _missing_fold(tmp, models, image):
    return ["-m", models["one"], "-i", image, "-f", "3"], ["fold 3", "available: 0"]


def _missing_checkpoint(tmp, models, image):
    model = copy_model(models["one"], tmp)
    (model / "fold_0" / "checkpoint_final.pth").unlink()
    return ["-m", model, "-i", image], ["checkpoint"]


def _unknown_configuration(tmp, models, image):
    return ["-m", models["one"], "-i", image, "-c", "3d_lowres"], ["3d_lowres", "not in plans.json"]


def _truncated_checkpoint(tmp, models, image):
    model = copy_model(models["one"], tmp)
    checkpoint = model / "fold_0" / "checkpoint_final.pth"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    return ["-m", model, "-i", image], ["truncated or corrupt", "checkpoint_final.pth"]


def _random_checkpoint(tmp, models, image):
    model = copy_model(models["one"], tmp)
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(np.random.default_rng(7).bytes(50_000))
    return ["-m", model, "-i", image], ["truncated or corrupt"]


def _edit_weights(model: Path, edit):
    path = model / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # our own file
    edit(checkpoint["network_weights"])
    torch.save(checkpoint, path)


def _weights_missing_key(tmp, models, image):
    model = copy_model(models["one"], tmp)
    _edit_weights(model, lambda w: w.pop("decoder.seg_layers.1.weight"))
    return ["-m", model, "-i", image], ["do not fit", "missing 1 keys", "decoder.seg_layers.1.weight"]


def _weights_unexpected_key(tmp, models, image):
    model = copy_model(models["one"], tmp)
    _edit_weights(model, lambda w: w.__setitem__("decoder.extra_head.weight", torch.zeros(3)))
    return ["-m", model, "-i", image], ["do not fit", "unexpected 1 keys", "decoder.extra_head.weight"]


def _weights_wrong_shape(tmp, models, image):
    model = copy_model(models["one"], tmp)
    _edit_weights(model, lambda w: w.__setitem__("decoder.seg_layers.1.bias", torch.zeros(5)))
    return ["-m", model, "-i", image], ["do not fit", "decoder.seg_layers.1.bias", "(5,)", "(3,)"]


def _two_images_one_channel(tmp, models, image):
    return ["-m", models["one"], "-i", image, image], ["needs 1 input image", "got 2"]


def _one_image_two_channels(tmp, models, image):
    return ["-m", models["two"], "-i", image], ["needs 2 input image", "T1, T2", "got 1"]


def _channels_on_different_grids(tmp, models, image):
    other = write_image(tmp / "other.nrrd", smooth_volume((20, 24, 23)))
    return ["-m", models["two"], "-i", image, other], ["do not share one voxel grid"]


def _image_2d(tmp, models, image):
    flat = write_image(tmp / "slice.nii.gz", smooth_volume((40, 30)))
    assert sitk.ReadImage(str(flat)).GetDimension() == 2
    return ["-m", models["one"], "-i", flat], ["2D image", "3D volumes"]


# ITK's NIfTI reader turns NaN into 0 on reading (so nnU-Net never sees them either); NRRD and MetaImage
# keep them, so the NaN cases are written as those.
def _all_nan(tmp, models, image):
    path = write_image(tmp / "nan.nrrd", np.full((20, 24, 22), np.nan, np.float32))
    return ["-m", models["one"], "-i", path], ["only NaN"]


def _partly_nan(tmp, models, image):
    array = smooth_volume()
    array[5, 6, 7] = array[9, 9, 9] = np.nan
    path = write_image(tmp / "partly_nan.nrrd", array)
    return ["-m", models["one"], "-i", path], ["2 NaN or infinite voxels"]


def _infinite(tmp, models, image):
    array = smooth_volume()
    array[1, 2, 3] = np.inf
    path = write_image(tmp / "infinite.mha", array)
    return ["-m", models["one"], "-i", path], ["1 NaN or infinite voxels"]


def _all_zero(tmp, models, image):
    path = write_image(tmp / "zeros.nii.gz", np.zeros((20, 24, 22), np.int16))
    return ["-m", models["one"], "-i", path], ["no content", "every voxel is 0"]


def _constant(tmp, models, image):
    path = write_image(tmp / "constant.nii.gz", np.full((20, 24, 22), 7, np.int16))
    return ["-m", models["one"], "-i", path], ["no content", "every voxel is 7"]


def _not_an_image(tmp, models, image):
    path = tmp / "notes.txt"
    path.write_text("not an image")
    return ["-m", models["one"], "-i", path], ["not a supported image"]


def _damaged_image(tmp, models, image):
    path = tmp / "damaged.nii.gz"
    write_image(path, smooth_volume())
    path.write_bytes(path.read_bytes()[:200])
    return ["-m", models["one"], "-i", path], ["damaged.nii.gz"]


def _unsupported_output(tmp, models, image):
    return ["-m", models["one"], "-i", image], ["cannot write", ".png"]


BAD_CASES = {
    "missing_input": _missing_input,
    "missing_model": _missing_model,
    "no_plans": _no_plans,
    "broken_plans": _broken_plans,
    "missing_fold": _missing_fold,
    "missing_checkpoint": _missing_checkpoint,
    "unknown_configuration": _unknown_configuration,
    "truncated_checkpoint": _truncated_checkpoint,
    "random_checkpoint": _random_checkpoint,
    "weights_missing_key": _weights_missing_key,
    "weights_unexpected_key": _weights_unexpected_key,
    "weights_wrong_shape": _weights_wrong_shape,
    "two_images_one_channel": _two_images_one_channel,
    "one_image_two_channels": _one_image_two_channels,
    "channels_on_different_grids": _channels_on_different_grids,
    "image_2d": _image_2d,
    "all_nan": _all_nan,
    "partly_nan": _partly_nan,
    "infinite": _infinite,
    "all_zero": _all_zero,
    "constant": _constant,
    "not_an_image": _not_an_image,
    "damaged_image": _damaged_image,
    "unsupported_output": _unsupported_output,
}
# The ones also run through a real subprocess, where a traceback would show. Each start costs about 2 s of CPU
# importing torch, so: one input error and one model error (the malicious checkpoint and --debug also run as
# subprocesses); the other cases take the same path through cli.main.
SUBPROCESS_CASES = ["missing_input", "random_checkpoint"]


def _case(name, tmp_path, models, good_image, out_dir):
    args, needles = BAD_CASES[name](tmp_path, models, good_image)
    output = out_dir / ("seg.png" if name == "unsupported_output" else "seg.nii.gz")
    return ["predict", "--no-tta", "-o", output] + args, needles


# ------------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("name", list(BAD_CASES))
def test_bad_input_gives_one_line_and_no_output(name, tmp_path, models, good_image, out_dir, capsys):
    args, needles = _case(name, tmp_path, models, good_image, out_dir)
    code, out, err = run_inprocess(capsys, args)
    assert_one_clear_line(code, err, needles)
    assert list(out_dir.iterdir()) == [], "a failed run left files in the output folder"


@pytest.fixture(scope="module")
def subprocess_runs(models, good_image, tmp_path_factory):
    """SUBPROCESS_CASES, `--debug` and a malicious checkpoint, run at once by the installed command."""
    cases, commands = {}, []
    for name in SUBPROCESS_CASES:
        tmp = tmp_path_factory.mktemp(f"subprocess_{name}")
        out_dir = tmp / "out"
        out_dir.mkdir()
        args, needles = _case(name, tmp, models, good_image, out_dir)
        cases[name] = (needles, out_dir)
        commands.append(args)
    tmp = tmp_path_factory.mktemp("subprocess_debug")
    (tmp / "out").mkdir()
    cases["--debug"] = ([], tmp / "out")
    commands.append(["--debug", "predict", "-m", tmp / "no_such_model", "-i", good_image,
                     "-o", tmp / "out" / "seg.nii.gz"])
    tmp = tmp_path_factory.mktemp("subprocess_malicious")
    (tmp / "out").mkdir()
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    cases["malicious"] = (["refusing", "system"], tmp / "out")
    commands.append(["predict", "--no-tta", "-m", _malicious_model(tmp, models, marker), "-i", good_image,
                     "-o", tmp / "out" / "seg.nii.gz"])
    try:
        runs = {name: (result, *case) for (name, case), result in zip(cases.items(), run_many(commands))}
        runs["malicious marker"] = marker
        yield runs
    finally:
        marker.unlink(missing_ok=True)


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_through_installed_command(name, subprocess_runs):
    (code, out, err), needles, out_dir = subprocess_runs[name]
    assert code == cli.EXIT_ERROR
    assert_one_clear_line(code, err, needles)
    assert list(out_dir.iterdir()) == []


def test_models_info_on_a_missing_folder(tmp_path, capsys):
    code, _, err = run_inprocess(capsys, ["models", "info", tmp_path / "nothing"])
    assert_one_clear_line(code, err, ["not found"])


def test_debug_shows_the_traceback(subprocess_runs):
    (code, out, err), _, out_dir = subprocess_runs["--debug"]
    assert code != 0
    assert "Traceback (most recent call last)" in err
    assert "ModelError" in err and "no_such_model" in err
    assert list(out_dir.iterdir()) == []


def _malicious_model(tmp: Path, models, marker: Path) -> Path:
    """A copy of the tiny model whose checkpoint, when unpickled, runs `touch marker` (in `logging`)."""
    model = copy_model(models["one"], tmp)
    path = model / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # our own file
    checkpoint["logging"] = RunsCode(f"touch {marker}")
    torch.save(checkpoint, path)
    return model


def test_malicious_checkpoint_is_refused_without_running_code(subprocess_runs, models, tmp_path):
    (code, out, err), needles, out_dir = subprocess_runs["malicious"]
    marker = subprocess_runs["malicious marker"]
    line = assert_one_clear_line(code, err, needles)
    assert not marker.exists(), "loading the checkpoint ran the code inside it"
    assert "checkpoint_final.pth" in line
    assert list(out_dir.iterdir()) == []

    # The payload is live: unpickled the way nnU-Net does it (weights_only=False) it does run its command.
    proof = Path(f"/tmp/pwned-proof-{uuid.uuid4().hex}")
    try:
        model = _malicious_model(tmp_path, models, proof)
        torch.load(model / "fold_0" / "checkpoint_final.pth", weights_only=False)
        assert proof.exists(), "the crafted pickle should run its command when unpickled unsafely"
    finally:
        proof.unlink(missing_ok=True)


def test_existing_output_is_untouched_by_a_failure(tmp_path, models, good_image, out_dir, capsys):
    sentinel = out_dir / "seg.nii.gz"
    sentinel.write_bytes(b"previous result, must survive")
    probabilities = out_dir / "seg.npz"
    probabilities.write_bytes(b"previous probabilities")
    for args in (["-m", models["two"], "-i", good_image],                       # wrong channel count
                 ["-m", tmp_path / "missing", "-i", good_image],                # missing model
                 ["-m", models["one"], "-i", tmp_path / "missing.nii.gz"]):     # missing image
        code, _, err = run_inprocess(capsys, ["predict", "--no-tta", "--probabilities", "-o", sentinel] + args)
        assert_one_clear_line(code, err, [])
        assert sentinel.read_bytes() == b"previous result, must survive"
        assert probabilities.read_bytes() == b"previous probabilities"
        assert sorted(p.name for p in out_dir.iterdir()) == ["seg.nii.gz", "seg.npz"]


def test_failure_while_writing_leaves_no_output(models, good_image, out_dir, capsys):
    """The label map is written, then the probabilities cannot be (a folder has their name): nothing stays."""
    (out_dir / "seg.npz").mkdir()
    code, _, err = run_inprocess(capsys, ["predict", "--no-tta", "--probabilities", "-m", models["one"],
                                          "-i", good_image, "-o", out_dir / "seg.nii.gz"])
    assert_one_clear_line(code, err, ["seg.npz", "folder"])
    assert [p.name for p in out_dir.iterdir()] == ["seg.npz"]


# ------------------------------------------------------------------------------------------- models info

def test_models_info(tmp_path, capsys):
    model = model_factory.make_model_folder(
        tmp_path, channels=("T1", "FLAIR"), labels={"background": 0, "anterior": 1, "posterior": 2},
        with_2d=True, folds=(0, 1), patch_size=(16, 24, 20), spacing=(1.5, 0.8, 0.75))
    [(code, out, err)] = run_many([["models", "info", model]])
    assert code == 0, err
    fields = info_fields(out)
    assert fields["Channels"] == "0: T1, 1: FLAIR"
    assert fields["Labels"] == "1: anterior, 2: posterior"
    assert set(fields["Configurations"].split(", ")) == {"2d", "3d_fullres"}
    assert fields["Configuration"] == "3d_fullres"
    assert fields["Folds"] == "0, 1"
    assert fields["Patch size"] == "16 x 24 x 20"
    assert fields["Spacing"] == "1.5 x 0.8 x 0.75 mm"
    assert fields["Network"] == "PlainConvUNet"
    assert fields["Normalization"] == "ZScoreNormalization, ZScoreNormalization"

    code, out, err = run_inprocess(capsys, ["models", "info", model, "-c", "2d"])
    assert code == 0, err
    fields = info_fields(out)
    assert fields["Configuration"] == "2d"
    assert fields["Patch size"] == "24 x 20"
    assert fields["Spacing"] == "0.8 x 0.75 mm"


def info_fields(text: str) -> dict:
    """`models info` rows ("Key<padding>  value") as a dict."""
    return {line.split("  ", 1)[0].strip(): line.split("  ", 1)[1].strip() for line in text.splitlines() if line}


# --------------------------------------------------------------------------------------- good predictions

@pytest.fixture(scope="module")
def hippo_predictions(models, tmp_path_factory):
    """One real hippocampus MR case predicted into each output format (the .nii.gz one by the installed
    command, the others in-process)."""
    if not HIPPO_IMAGE.is_file():
        pytest.skip(f"real test data not found at {DATA}")
    folder = tmp_path_factory.mktemp("predictions")
    process = subprocess.Popen(cli_command() + ["predict", "--no-tta", "-q", "-m", str(models["one"]),
                                                "-i", str(HIPPO_IMAGE), "-o", str(folder / "seg.nii.gz")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for name, extra in (("seg.nrrd", []), ("seg.seg.nrrd", ["--probabilities"])):
            assert cli.main(["predict", "--no-tta", "-m", str(models["one"]), "-i", str(HIPPO_IMAGE),
                             "-o", str(folder / name)] + extra) == 0
    finally:
        out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert err.strip() == "" and f"Wrote {folder / 'seg.nii.gz'}" in out
    return folder


@needs_data
@pytest.mark.parametrize("name", ["seg.nii.gz", "seg.nrrd", "seg.seg.nrrd"])
def test_prediction_keeps_the_input_geometry(hippo_predictions, name):
    source = sitk.ReadImage(str(HIPPO_IMAGE))
    result = sitk.ReadImage(str(hippo_predictions / name))
    assert_same_geometry(result, source)
    labels = sitk.GetArrayFromImage(result)
    assert labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2}
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(hippo_predictions / "seg.nii.gz")))
    np.testing.assert_array_equal(labels, reference)
    assert len(np.unique(labels)) > 1, "a random-weight network still predicts more than one class"


@needs_data
def test_seg_nrrd_names_the_segments(hippo_predictions):
    image = sitk.ReadImage(str(hippo_predictions / "seg.seg.nrrd"))
    fields = {k: image.GetMetaData(k) for k in image.GetMetaDataKeys()}
    segments = {(fields[f"Segment{i}_Name"], fields[f"Segment{i}_LabelValue"]) for i in range(2)}
    assert segments == {("anterior", "1"), ("posterior", "2")}


@needs_data
def test_probabilities_npz(hippo_predictions):
    with np.load(hippo_predictions / "seg.npz") as npz:
        probabilities = npz["probabilities"]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(hippo_predictions / "seg.seg.nrrd")))
    assert probabilities.shape == (3, *labels.shape)  # (classes, z, y, x)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)
    assert probabilities.min() >= 0
    np.testing.assert_array_equal(probabilities.argmax(0), labels)


@needs_data
@pytest.mark.skipif(not HIPPO_DICOM.is_dir(), reason="DICOM test series not found")
def test_dicom_series_folder_input(models, out_dir, capsys):
    code, out, err = run_inprocess(capsys, ["predict", "--no-tta", "-m", models["one"], "-i", HIPPO_DICOM,
                                            "-o", out_dir / "seg.nrrd"])
    assert code == 0, err
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(HIPPO_DICOM)))
    source = reader.Execute()
    result = sitk.ReadImage(str(out_dir / "seg.nrrd"))
    assert_same_geometry(result, source)
    assert len(np.unique(sitk.GetArrayFromImage(result))) > 1


# ---------------------------------------------------------------------------------------------- cancelling

def test_cancel_through_the_python_api(models, good_image):
    model = load_model(models["one"])
    volume = read_volume(good_image)
    cancel = threading.Event()
    stages = []

    def progress(fraction, stage):
        stages.append(stage)
        if stage.startswith("tile"):
            cancel.set()

    started = time.perf_counter()
    with pytest.raises(Cancelled):
        model.predict([volume], tta=True, progress=progress, cancel=cancel)
    elapsed = time.perf_counter() - started
    tiles = [s for s in stages if s.startswith("tile")]
    assert tiles[0].startswith("tile 1 of"), stages
    total = int(tiles[0].rsplit(" ", 1)[1])
    assert total > 4, "the case must have more tiles than the cancel needs"
    assert len(tiles) == 1, f"cancel was not honoured promptly: {stages}"
    assert "done" not in stages and "exporting" not in stages
    assert elapsed < 20

    # Cancelled before it starts: nothing runs at all.
    stages.clear()
    with pytest.raises(Cancelled):
        model.predict([volume], progress=progress, cancel=cancel)
    assert stages == []

    # Wrong inputs are still InputErrors, not cancels.
    with pytest.raises(InputError):
        model.predict([volume, volume])


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal and SIGINT")
def test_ctrl_c_on_the_command_line_leaves_no_output(models, good_image, out_dir):
    """Ctrl+C (SIGINT) in the middle of the tiles: exit 130, a short note, no output or temporary file."""
    output = out_dir / "seg.seg.nrrd"
    code, text = interrupt_when(cli_command() + ["predict", "-m", str(models["one"]), "-i", str(good_image),
                                                 "-o", str(output), "--step", "0.1", "--probabilities"], b"tile")
    assert code == cli.EXIT_CANCELLED, text
    assert "Traceback" not in text
    assert "Cancelled" in text and "nothing was written" in text
    assert list(out_dir.iterdir()) == [], "a cancelled run left files behind"
