"""The engine under macOS Slicer's Python, as far as Linux can be (scripts/setup-slicer-pythons.sh makes both):

  5.10-macos   Python 3.12, numpy 2.0.2,  torch 2.2.2: torch's numpy bridge is off (built against numpy 1)
  5.8-macos    Python 3.9,  numpy 1.26.4, torch 2.2.2 (Slicer 5.6 and 5.8 bring the same Python and numpy)

Slicer's macOS builds are x86_64 (Rosetta), where 2.2.2 is the newest torch. The engine runs in those
environments as Slicer runs it: the command line, and the worker behind the launcher for the Slicer suite.
nnU-Net's reference labels come from the main environment (nnunetv2 needs Python 3.10 or newer, and its own
code uses the numpy bridge that is off in 5.10-macos).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import safety_catalogue as catalogue
from engine_command import cli_command
from test_parity import FLOOR

REPO = Path(__file__).resolve().parents[1]
ENVIRONMENTS = {  # name -> (Python, numpy, torch's numpy bridge works)
    "5.10-macos": ((3, 12), "2.0.2", False),
    "5.8-macos": ((3, 9), "1.26.4", True),
}
REFUSED = ("a checkpoint that runs a shell command when unpickled",
           "an nnU-Net v1 plans.pkl that runs a shell command when unpickled",
           "an nnU-Net v1 .model.pkl that runs a shell command when unpickled",
           "weights that are NaN (a training that diverged)")


@pytest.fixture(scope="module", params=sorted(ENVIRONMENTS), ids=sorted(ENVIRONMENTS))
def slicer_python(request) -> tuple:
    """(name, python) of one environment; a missing one fails (CI must not pass by leaving it out)."""
    python = REPO / ".venv-slicer" / request.param / "bin" / "python"
    if not python.is_file():
        pytest.fail(f"{python} is missing: scripts/setup-slicer-pythons.sh makes it (scripts/test.sh runs it)")
    return request.param, str(python)


def run(python: str, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
    """The engine's command line in that environment (the engine from this checkout)."""
    environment = {**os.environ, "PYTHONPATH": str(REPO / "SegmentMBTFE"), **(env or {})}
    return subprocess.run(cli_command(python) + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, env=environment)


def labels(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_the_environment_is_macos_slicers(slicer_python):
    name, python = slicer_python
    report = subprocess.run(
        [python, "-c", "import json, sys, numpy, torch; from SegmentMBTFELib import tensors; print(json.dumps("
                       "[sys.version_info[:2], numpy.__version__, torch.__version__, tensors.BRIDGE]))"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "SegmentMBTFE")})
    version, numpy_version, torch_version, bridge = json.loads(report.stdout)
    assert (tuple(version), numpy_version, bridge) == ENVIRONMENTS[name]
    assert torch_version.split("+")[0] == "2.2.2"


@pytest.mark.parametrize("tta", [False, True], ids=["no_tta", "tta"])
def test_labels_match_nnunet(slicer_python, hippo3d_model, hippo_test_cases, nnunet_prediction, agreement,
                             tmp_path, tta):
    _, python = slicer_python
    [case] = hippo_test_cases[-1:]
    output = tmp_path / "ours.nii.gz"
    result = run(python, "predict", "-q", "-m", hippo3d_model, "-i", *case, "-o", output, "--device", "cpu",
                 *([] if tta else ["--no-tta"]))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", "a quiet run printed something (numpy's warning about torch?)"
    [reference] = nnunet_prediction(hippo3d_model, [case], tta=tta)
    ours, theirs = labels(output), labels(reference)
    assert len(np.unique(theirs)) > 1 and agreement(ours, theirs) >= FLOOR


def test_separate_z_ct_matches_nnunet(slicer_python, ct_aniso_model, ct_test_cases, nnunet_prediction, agreement,
                                      tmp_path):
    """The resampling path of anisotropic CT (cubic in-plane, nearest along z; scipy's spline on all cores)."""
    _, python = slicer_python
    case = ct_test_cases[0]
    output = tmp_path / "ours.nii.gz"
    result = run(python, "predict", "-q", "-m", ct_aniso_model, "-i", *case, "-o", output, "--no-tta")
    assert result.returncode == 0, result.stderr
    [reference] = nnunet_prediction(ct_aniso_model, [case], tta=False)
    assert agreement(labels(output), labels(reference)) >= FLOOR


def test_a_finetune_finishes_and_its_version_segments(slicer_python, hippo3d_model, shared_data, tmp_path):
    _, python = slicer_python
    case = shared_data / "hippocampus" / "train"
    image, truth = case / "images" / "hippocampus_394.nii.gz", case / "labels" / "hippocampus_394.nii.gz"
    home = {"SEGMENTMBTFE_HOME": str(tmp_path / "home")}
    tuned = run(python, "finetune", "-q", "-m", hippo3d_model, "-i", image, "-l", truth, "--iterations", "3",
                env=home)
    assert tuned.returncode == 0, tuned.stderr
    output = tmp_path / "v1.nii.gz"
    segmented = run(python, "predict", "-m", hippo3d_model, "--version", "v1", "-i", image, "-o", output,
                    "--no-tta", env=home)
    assert segmented.returncode == 0, segmented.stderr
    assert "version v1" in segmented.stderr and len(np.unique(labels(output))) > 1


@pytest.mark.parametrize("given", REFUSED)
def test_hostile_checkpoints_are_refused(slicer_python, given, models, good_image, tmp_path):
    """The safety catalogue's cases of pickled code (and NaN weights), run by that environment's command line:
    one line, exit 1, nothing written, and the code never ran (each case's own check)."""
    _, python = slicer_python
    [case] = [c for c in catalogue.CASES if c.given == given]
    (tmp_path / "out").mkdir()
    (tmp_path / "home").mkdir()

    def run_process(args, prefix=None, timeout=240):
        result = run(python, *args, env={"SEGMENTMBTFE_HOME": str(tmp_path / "home")}, timeout=timeout)
        return result.returncode, result.stdout, result.stderr
    ctx = catalogue.Context(tmp_path, models, good_image, tmp_path / "out", tmp_path / "home",
                            run_process=run_process)
    attempt = case.make(ctx)
    code, _, err = run_process(attempt.args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and case.outcome.matches(lines[0]), err
    assert list((tmp_path / "out").iterdir()) == []
    if attempt.check:
        attempt.check()


def test_module_and_engine_need_nothing_newer_than_python_39():
    """Slicer 5.6 and 5.8 bring Python 3.9: vermin reads every file of the module and the engine (annotations
    evaluated, as Python 3.9 does at import) and fails on anything newer; the 5.8-macos runs above import it."""
    result = subprocess.run([str(Path(sys.executable).with_name("vermin")), "-q", "-t=3.9-", "--violations",
                             "--no-tips", "--eval-annotations", str(REPO / "SegmentMBTFE")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


WORKER_SUITES = ("test_slicer_worker.py", "test_slicer_segment_files.py", "test_finetune_panel.py")


def test_the_slicer_suites_pass_with_the_worker_here(slicer_python, shared_data):
    """Segment, Cancel, a killed and an idle worker, segmentFiles and Fine-tune through the module, with Slicer's
    side in the main environment and the worker, behind the PythonSlicer launcher, in this one (as in Slicer,
    where the launcher starts python-real with Slicer's torch and numpy)."""
    _, python = slicer_python
    suite = REPO / "Testing" / "slicer" / "suite"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *[str(suite / s) for s in WORKER_SUITES]],
        capture_output=True, text=True, cwd=REPO, timeout=900,
        env={**os.environ, "SEGMENTMBTFE_TEST_PYTHON_REAL": python})
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0 and " passed" in summary and "skipped" not in summary, result.stdout[-3000:]
