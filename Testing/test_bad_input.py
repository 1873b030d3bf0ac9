"""The command line's behaviour around bad input, beyond the catalogue of cases (test_safety.py runs those).

Here: `--debug` showing the traceback, the malicious checkpoint's payload proven live, an existing output
surviving a failed run, a failure while writing leaving nothing, `models info`, successful predictions
(.nii.gz, .nrrd, .seg.nrrd, a DICOM folder, --probabilities) keeping the input's geometry, and cancelling
(Python API and Ctrl+C on the command line). Model folders are written by `model_factory` (no nnunetv2).
"""
from __future__ import annotations

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
from engine_command import cli_command
from safety_catalogue import malicious_model
from terminal import interrupt_when
from SegmentMBTFELib import Cancelled, InputError, load_model
from SegmentMBTFELib import cli
from SegmentMBTFELib.io.images import read_volume

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HIPPO_IMAGE = DATA / "hippocampus" / "train" / "images" / "hippocampus_001.nii.gz"
HIPPO_DICOM = DATA / "hippocampus" / "dicom" / "11_HCropVolume"
needs_data = pytest.mark.skipif(not HIPPO_IMAGE.is_file(), reason=f"real test data not found at {DATA}")


# ------------------------------------------------------------------------------------------------ helpers

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


def assert_same_geometry(a: sitk.Image, b: sitk.Image):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)


# ----------------------------------------------------------------------------------------------- fixtures
# (models and good_image: conftest.py)

@pytest.fixture()
def out_dir(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def debug_run(good_image, tmp_path_factory):
    """`--debug` with a missing model, run by the installed command (where a traceback shows)."""
    tmp = tmp_path_factory.mktemp("subprocess_debug")
    (tmp / "out").mkdir()
    [result] = run_many([["--debug", "predict", "-m", tmp / "no_such_model", "-i", good_image,
                          "-o", tmp / "out" / "seg.nii.gz"]])
    return result, tmp / "out"


def test_models_info_on_a_missing_folder(tmp_path, capsys):
    code, _, err = run_inprocess(capsys, ["models", "info", tmp_path / "nothing"])
    assert_one_clear_line(code, err, ["not found"])


def test_debug_shows_the_traceback(debug_run):
    (code, out, err), out_dir = debug_run
    assert code != 0
    assert "Traceback (most recent call last)" in err
    assert "ModelError" in err and "no_such_model" in err
    assert list(out_dir.iterdir()) == []


def test_the_malicious_checkpoint_payload_is_live(models, tmp_path):
    """The catalogue's malicious checkpoint is refused without running code (test_safety.py); here the proof
    that its payload is real: unpickled the way nnU-Net does it (weights_only=False) it runs its command."""
    proof = Path(f"/tmp/pwned-proof-{uuid.uuid4().hex}")
    try:
        model = malicious_model(tmp_path, models["one"], proof)
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
