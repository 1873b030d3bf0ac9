"""`segment-mbtfe finetune`, `predict --version` and `models versions|use|rollback|delete`, end to end.

Real fine-tuning (a few iterations) of real model folders on real cases: the hippocampus MR cases in
../shared/data when present, and small synthetic cases written with SimpleITK otherwise (so the command is
tested everywhere). Commands run through `cli.main` in this process and through the installed
`segment-mbtfe` in a subprocess. $SEGMENTMBTFE_HOME points into tmp_path in every test.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import model_factory
from engine_command import cli_command
from terminal import interrupt_when
from SegmentMBTFELib import cli, load_model
from SegmentMBTFELib.errors import ModelError
from SegmentMBTFELib.io.segfile import read_seg_nrrd
from SegmentMBTFELib.models import shipped
from SegmentMBTFELib.models.versions import VERSION_FILE, ModelVersions

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hippocampus" / "train"
needs_data = pytest.mark.skipif(not (DATA / "images" / "hippocampus_001.nii.gz").is_file(),
                                reason=f"real hippocampus data not found at {DATA}")
PATCH = (40, 56, 40)  # one tile per hippocampus case: fine-tuning and its Dice evaluation stay quick


def hippo(case: str):
    return DATA / "images" / f"hippocampus_{case}.nii.gz", DATA / "labels" / f"hippocampus_{case}.nii.gz"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "home"
    monkeypatch.setenv("SEGMENTMBTFE_HOME", str(folder))
    return folder


@pytest.fixture
def model(tmp_path) -> Path:
    return model_factory.make_model_folder(tmp_path / "models", patch_size=PATCH)


@pytest.fixture
def synthetic_case(tmp_path):
    """A 36 x 52 x 36 image with two bright structures and their label map (1 and 2), as NIfTI files."""
    rng = np.random.default_rng(3)
    image = rng.normal(100, 20, (36, 52, 36)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[10:26, 12:24, 10:26] = 1
    labels[10:26, 28:40, 10:26] = 2
    image[labels > 0] += 150
    paths = []
    for name, array in (("case_0000.nii.gz", image), ("case_labels.nii.gz", labels)):
        written = sitk.GetImageFromArray(array)
        written.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(written, str(tmp_path / name))
        paths.append(tmp_path / name)
    return paths


def run(capsys, *args):
    """cli.main in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == cli.EXIT_ERROR and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "unexpected failure" not in err, err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------- fine-tune + predict

@needs_data
def test_finetune_writes_a_version_that_predict_then_uses(capsys, model, tmp_path):
    before = snapshot(model)
    (img1, lab1), (img3, lab3), (img4, lab4) = hippo("001"), hippo("003"), hippo("004")
    code, out, err = run(capsys, "finetune", "-m", model, "-i", img1, img3, "-l", lab1, lab3,
                         "--val-image", img4, "--val-label", lab4, "--iterations", 3, "--seed", 1, "-q")
    assert code == 0, err
    versions = ModelVersions(model)
    v1 = versions.current()
    assert v1.id == "v1" and v1.parent == "original" and not v1.problem
    assert f"Wrote v1 of Dataset999_Tiny (3d_fullres) (from original) to {v1.path}" in out
    assert "Dice on the training cases: " in out and "Dice on the validation cases: " in out and " -> " in out
    run_record = v1.provenance["finetune"]
    assert run_record["iterations"] == 3 and run_record["settings"]["seed"] == 1
    assert [c["name"] for c in run_record["cases"]] == ["hippocampus_001.nii.gz", "hippocampus_003.nii.gz"]
    assert len(run_record["validation_cases"]) == 1 and "validation" in run_record["dice_after"]
    assert snapshot(model) == before
    tuned, original = load_model(v1.path), load_model(model)
    assert any(not torch.equal(tuned.weights[0][k], original.weights[0][k]) for k in original.weights[0])

    # predict loads the current version, says so, and records it
    code, out, err = run(capsys, "predict", "-m", model, "-i", img4, "-o", tmp_path / "v1.seg.nrrd", "--no-tta", "-q")
    assert code == 0, err
    assert "version v1" in err and str(v1.path) in err
    _, _, settings = read_seg_nrrd(tmp_path / "v1.seg.nrrd")
    assert settings["version"] == "v1" and settings["checksum"] == tuned.checksum()
    code, out, err = run(capsys, "predict", "-m", model, "--version", "original", "-i", img4,
                         "-o", tmp_path / "original.seg.nrrd", "--no-tta", "-q")
    assert code == 0 and err == "", err  # the model typed, in its original version: nothing to say
    _, _, settings = read_seg_nrrd(tmp_path / "original.seg.nrrd")
    assert "version" not in settings and settings["checksum"] == original.checksum()

    # fine-tuning again starts from the current version: v2's parent is v1
    code, out, err = run(capsys, "finetune", "-m", model, "-i", img3, "-l", lab3, "--iterations", 2,
                         "--no-evaluation", "-q")
    assert code == 0, err
    assert "(from v1)" in out and "Dice" not in out
    assert [(v.id, v.parent, v.current) for v in versions.list()] == [
        ("original", None, False), ("v1", "original", False), ("v2", "v1", True)]
    assert json.loads((versions.get("v2").path / VERSION_FILE).read_text())["parent"]["checksum"] == tuned.checksum()
    assert snapshot(model) == before


def test_finetune_a_two_channel_model_into_an_explicit_folder(capsys, synthetic_case, tmp_path):
    """Runs without ../shared/data: one case's channels joined by a comma, -o, and the new version loads."""
    model = model_factory.make_model_folder(tmp_path / "models", channels=("T1", "T2"), patch_size=PATCH)
    image, labels = synthetic_case
    second = sitk.ReadImage(str(image)) * 0.5 + 10
    sitk.WriteImage(second, str(tmp_path / "case_0001.nii.gz"))
    target = tmp_path / "corrected model"
    code, out, err = run(capsys, "finetune", "-m", model, "-i", f"{image},{tmp_path / 'case_0001.nii.gz'}",
                         "-l", labels, "-o", target, "--iterations", 2, "--lr", 0.01, "--freeze-encoder",
                         "--no-evaluation", "-q")
    assert code == 0, err
    assert f"to {target};" in out
    version = ModelVersions(model).current()
    assert version.path == target and version.provenance["finetune"]["frozen"] == ["encoder"]
    assert version.provenance["finetune"]["settings"]["learning_rate"] == 0.01
    assert len(version.provenance["finetune"]["cases"][0]["images"]) == 2
    code, _, err = run(capsys, "finetune", "-m", model, "-i", image, "-l", labels, "--iterations", 1, "-q")
    one_error_line(code, err, "needs 2 input image(s)")
    tuned, original = load_model(target), load_model(model)
    encoder = [k for k in original.weights[0] if k.startswith("encoder.")]
    decoder = [k for k in original.weights[0] if k.startswith("decoder.") and original.weights[0][k].is_floating_point()]
    assert encoder and all(torch.equal(tuned.weights[0][k], original.weights[0][k]) for k in encoder)
    assert any(not torch.equal(tuned.weights[0][k], original.weights[0][k]) for k in decoder)


def test_finetune_refuses_bad_input_before_training(capsys, model, synthetic_case, tmp_path, home):
    image, labels = synthetic_case
    base = ["finetune", "-m", model, "--iterations", 1, "--no-evaluation", "-q"]
    code, _, err = run(capsys, *base, "-i", image, image, "-l", labels)
    one_error_line(code, err, "one label map per case", "2 case image(s)", "1 label map(s)")
    code, _, err = run(capsys, *base, "-i", image, "-l", labels, "--val-image", image)
    one_error_line(code, err, "validation")

    wrong = sitk.ReadImage(str(labels))
    array = sitk.GetArrayFromImage(wrong)
    array[0, 0, 0] = 7
    unknown = sitk.GetImageFromArray(array)
    unknown.CopyInformation(wrong)
    sitk.WriteImage(unknown, str(tmp_path / "unknown.nii.gz"))
    code, _, err = run(capsys, *base, "-i", image, "-l", tmp_path / "unknown.nii.gz")
    one_error_line(code, err, "7", "does not know", "anterior")

    shifted = sitk.ReadImage(str(labels))
    shifted.SetOrigin((5.0, 0.0, 0.0))
    sitk.WriteImage(shifted, str(tmp_path / "shifted.nii.gz"))
    code, _, err = run(capsys, *base, "-i", image, "-l", tmp_path / "shifted.nii.gz")
    one_error_line(code, err, "grid")

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.txt").write_text("x")
    code, _, err = run(capsys, *base, "-i", image, "-l", labels, "-o", tmp_path / "taken")
    one_error_line(code, err, "not an empty folder")
    code, _, err = run(capsys, *base, "-i", image, "-l", labels, "-o", model / "finetuned")
    one_error_line(code, err, "never modified")
    code, _, err = run(capsys, *base, "-i", image, "-l", labels, "--version", "v4")
    one_error_line(code, err, "no version 'v4'")
    assert not (home / "versions").exists() or not list((home / "versions").rglob(VERSION_FILE))
    assert not (model / "finetuned").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal and SIGINT")
def test_ctrl_c_during_finetune_writes_nothing(model, synthetic_case, tmp_path, home):
    image, labels = synthetic_case
    code, text = interrupt_when(cli_command() + ["finetune", "-m", str(model), "-i", str(image), "-l", str(labels),
                                                 "--iterations", "100000", "--no-evaluation", "-o",
                                                 str(tmp_path / "never")], b"/100000, loss", timeout=120)
    assert code == cli.EXIT_CANCELLED, text
    assert "Traceback" not in text and "nothing was written" in text
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".never*"))
    assert not (home / "versions").exists() or not list((home / "versions").rglob(VERSION_FILE))
    assert [v.id for v in ModelVersions(model).list()] == ["original"]


@needs_data
def test_the_installed_command_finetunes_predicts_and_lists(model, tmp_path):
    (img1, lab1), (img4, _) = hippo("001"), hippo("004")
    commands = [
        ["finetune", "-m", model, "-i", img1, "-l", lab1, "--iterations", 2, "--no-evaluation"],
        ["predict", "-m", model, "-i", img4, "-o", tmp_path / "out.nii.gz", "--no-tta"],
        ["models", "versions", model],
    ]
    results = []
    for args in commands:  # one after the other: each needs the one before
        done = subprocess.run(cli_command() + [str(a) for a in args], capture_output=True, text=True, timeout=300)
        results.append(done)
        assert done.returncode == 0, f"{args[0]}: {done.stderr}"
        assert "Traceback" not in done.stderr
    assert "Wrote v1 of" in results[0].stdout
    assert "version v1" in results[1].stderr and (tmp_path / "out.nii.gz").is_file()
    lines = results[2].stdout.splitlines()
    assert lines[1] == "  original (read-only)" and lines[2].startswith("* v1 (from original, ")


# ------------------------------------------------------------------------------------------ the default model

@needs_data
def test_without_m_the_default_shipped_model_is_used(capsys, tmp_path, home):
    try:
        default = shipped.default_model()
    except ModelError:
        pytest.skip("the shipped default model is not in this checkout")
    before = snapshot(default)
    image, labels = hippo("001")
    code, out, err = run(capsys, "models", "versions")
    assert code == 0 and f"Versions of {default.name} ({default.resolve()}):" in out and "* original" in out

    code, out, err = run(capsys, "predict", "-i", image, "-o", tmp_path / "a.nii.gz", "--no-tta", "-q")
    assert code == 0, err
    assert f"Using default model {default}, version original" in err

    code, out, err = run(capsys, "finetune", "-i", image, "-l", labels, "--iterations", 1, "--no-evaluation", "-q")
    assert code == 0, err
    v1 = ModelVersions(default).current()
    assert v1.id == "v1" and home / "versions" in v1.path.parents
    code, out, err = run(capsys, "predict", "-i", image, "-o", tmp_path / "b.seg.nrrd", "--no-tta", "-q")
    assert code == 0 and f"Using default model {default}, version v1" in err, err
    assert read_seg_nrrd(tmp_path / "b.seg.nrrd")[2]["version"] == "v1"

    code, out, err = run(capsys, "models", "rollback")
    assert code == 0 and "now using original" in out
    code, out, err = run(capsys, "models", "use", "v1")
    assert code == 0 and "Now using v1" in out
    code, out, err = run(capsys, "models", "delete", "v1")
    assert code == 0 and not v1.path.exists()
    assert snapshot(default) == before


# ------------------------------------------------------------------------------------------ models commands

def test_models_commands_list_choose_and_delete_versions(capsys, model, tmp_path):
    before = snapshot(model)
    v1 = model_factory.perturbed_version(model, 0.01)
    v2 = model_factory.perturbed_version(model, 0.02)
    code, out, err = run(capsys, "models", "versions", model)
    assert code == 0, err
    assert out.splitlines() == [
        f"Versions of Dataset999_Tiny (3d_fullres) ({model.resolve()}):",
        "  original (read-only)",
        f"  {v1.summary()}  {v1.path}",
        f"* {v2.summary()}  {v2.path}",
    ]
    assert v2.summary().startswith("v2 (from v1, ") and v2.summary().endswith(", 1 iteration)")
    code, out, err = run(capsys, "models", "versions", "-m", v1.path)  # any version folder finds the family
    assert code == 0 and out.splitlines()[3].startswith("* v2")

    code, out, err = run(capsys, "models", "rollback", "-m", model)
    assert code == 0 and "now using v1 (from original" in out and ModelVersions(model).current().id == "v1"
    code, out, err = run(capsys, "models", "use", "-m", model, "v2")
    assert code == 0 and out.startswith("Now using v2") and ModelVersions(model).current().id == "v2"
    code, out, err = run(capsys, "models", "use", "-m", model, "v9")
    one_error_line(code, err, "no version 'v9'", "original, v1, v2")
    code, out, err = run(capsys, "models", "delete", "-m", model, "original")
    one_error_line(code, err, "read-only")
    code, out, err = run(capsys, "models", "delete", "-m", model, "v2")
    assert code == 0 and f"Deleted v2 ({v2.path}); now using v1" in out and not v2.path.exists()
    code, out, err = run(capsys, "models", "rollback", "-m", model)
    assert code == 0 and "now using original (read-only)" in out
    code, out, err = run(capsys, "models", "rollback", "-m", model)
    one_error_line(code, err, "already at its original")
    assert snapshot(model) == before


def test_damaged_versions_are_shown_and_refused(capsys, model, synthetic_case, tmp_path):
    image, _ = synthetic_case
    v1 = model_factory.perturbed_version(model, 0.01)
    v2 = model_factory.perturbed_version(model, 0.02)
    checkpoint = next(v2.path.rglob("checkpoint_final.pth"))
    data = bytearray(checkpoint.read_bytes())
    data[-100] ^= 0x01  # one bit in the weights
    checkpoint.write_bytes(bytes(data))
    (v1.path / VERSION_FILE).unlink()

    code, out, err = run(capsys, "models", "versions", model)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[2].startswith("  v1: damaged (version.json is missing from ")
    assert lines[3].startswith("* v2: damaged (checkpoint nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/"
                               "checkpoint_final.pth was changed or corrupted")
    output = tmp_path / "out.nii.gz"
    code, out, err = run(capsys, "predict", "-m", model, "-i", image, "-o", output, "--no-tta", "-q")
    one_error_line(code, err, "version v2", "cannot be used", "changed or corrupted", "models delete v2")
    assert not output.exists()
    code, out, err = run(capsys, "predict", "-m", v2.path, "-i", image, "-o", output, "--no-tta", "-q")
    one_error_line(code, err, "version v2", "cannot be used")
    code, out, err = run(capsys, "models", "use", "-m", model, "v1")
    one_error_line(code, err, "cannot use v1", "version.json is missing")
    code, out, err = run(capsys, "finetune", "-m", model, "-i", image, "-l", image, "--iterations", 1, "-q")
    one_error_line(code, err, "version v2", "cannot be used")

    # the way out: the original still predicts, and the damaged versions can be deleted
    code, out, err = run(capsys, "predict", "-m", model, "--version", "original", "-i", image, "-o", output,
                         "--no-tta", "-q")
    assert code == 0 and output.is_file(), err
    for id in ("v2", "v1"):
        code, out, err = run(capsys, "models", "delete", "-m", model, id)
        assert code == 0, err
    assert [v.id for v in ModelVersions(model).list()] == ["original"]
    assert not v1.path.exists() and not v2.path.exists()
