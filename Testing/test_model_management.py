"""Model management through the real command line: `models add` (a zip made by nnU-Net's own export, a folder,
--link), `models list`, `models remove`, and `-m NAME`; that adding and listing never import torch (the Slicer
panel does both in Slicer's process), and that listing reads JSON files and v1 pickles (as plain data) only. The hostile zips are cases of the safety catalogue (safety_catalogue.py).
"""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hostile_zips import export_layout_zip
from SegmentMBTFELib import cli
from SegmentMBTFELib.models.table import HEADER

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty SegmentMBTFE folder of this test's own (the models home is its models/)."""
    monkeypatch.setenv("SEGMENTMBTFE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def run(capsys):
    def run(*args):
        capsys.readouterr()
        code = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def rows(listing: str) -> dict:
    """`models list`'s rows by name: {name: [from, network, channels, labels, configurations, size, folder]}."""
    lines = listing.strip().splitlines()
    assert re.split(r"\s{2,}", lines[0]) == list(HEADER)
    return {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line) for line in lines[1:])}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_zip_from_nnunets_export_adds_lists_and_predicts_by_name(home, run, hippo3d_zip, hippo3d_model,
                                                                   hippo_test_cases, tmp_path):
    with zipfile.ZipFile(hippo3d_zip) as archive:  # nnU-Net's own layout, as its export writes it
        assert "Dataset901_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/validation/summary.json" in \
            archive.namelist()
    code, out, err = run("models", "add", hippo3d_zip)
    assert code == 0, err
    assert out.startswith("Added Dataset901_Hippocampus (unpacked into ") and "3d_fullres (0)" in out
    added = home / "models" / "Dataset901_Hippocampus" / hippo3d_model.name
    assert digest(added / "fold_0" / "checkpoint_final.pth") == digest(hippo3d_model / "fold_0" /
                                                                       "checkpoint_final.pth")
    assert sorted(p.name for p in (home / "models").iterdir()) == ["Dataset901_Hippocampus"]  # nothing hidden left

    code, out, err = run("models", "list")
    listed = rows(out)
    assert listed["Dataset901_Hippocampus"][:5] == ["added", "PlainConvUNet", "MRI", "anterior, posterior",
                                                    "3d_fullres (0)"]
    assert listed["Dataset901_Hippocampus"][-1] == str(home / "models" / "Dataset901_Hippocampus")
    assert listed["hippocampus_mbtfe"][:2] == ["shipped", "MBTFE-UNet"]

    image = hippo_test_cases[0][0]
    code, out, err = run("predict", "-q", "--no-tta", "-m", "Dataset901_Hippocampus", "-i", image,
                         "-o", tmp_path / "by_name.nii.gz")
    assert code == 0, err
    code, out, err = run("predict", "-q", "--no-tta", "-m", hippo3d_model, "-i", image, "-o", tmp_path / "by_path.nii.gz")
    assert code == 0, err
    by_name, by_path = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{n}.nii.gz")))
                        for n in ("by_name", "by_path"))
    np.testing.assert_array_equal(by_name, by_path)
    assert by_name.max() > 0


def test_add_copies_a_folder_and_remove_deletes_only_the_copy(home, run, models, tmp_path):
    source = shutil.copytree(models["one"], tmp_path / "mine" / "Dataset999_Tiny" / models["one"].name)
    before = snapshot(source.parent)
    code, out, err = run("models", "add", source, "--name", "tiny")   # a trained folder: kept in nnU-Net's layout
    assert code == 0, err
    copy = home / "models" / "tiny"
    assert (copy / source.name / "plans.json").is_file()
    code, out, err = run("models", "info", "tiny")
    assert code == 0 and "Dataset999_Tiny (3d_fullres)" in out
    code, out, err = run("models", "remove", "tiny")
    assert (code, out.strip()) == (0, f"Removed tiny and deleted its folder {copy}.")
    assert not copy.exists() and sorted(p.name for p in (home / "models").iterdir()) == []
    assert snapshot(source.parent) == before  # the folder it was copied from is untouched


def test_a_registered_folder_is_listed_used_and_only_forgotten(home, run, models, good_image, tmp_path):
    folder = shutil.copytree(models["one"].parent, tmp_path / "results" / "Dataset999_Tiny")
    before = snapshot(folder)
    code, out, err = run("models", "add", "--link", folder)
    assert code == 0 and "registered where it is" in out, err
    code, out, err = run("models", "add", "--link", folder)   # the same folder again: found, not added twice
    assert code == 0 and out.strip() == f"{folder} is already listed, as Dataset999_Tiny (registered)."
    code, out, err = run("models", "list")
    assert rows(out)["Dataset999_Tiny"][0] == "registered" and rows(out)["Dataset999_Tiny"][-1] == str(folder)
    code, out, err = run("predict", "-q", "--no-tta", "-m", "Dataset999_Tiny", "-i", good_image,
                         "-o", tmp_path / "seg.nii.gz")
    assert code == 0, err
    code, out, err = run("models", "remove", "Dataset999_Tiny")
    assert (code, out.strip()) == (0, f"Forgot Dataset999_Tiny; its folder {folder} was left as it is.")
    assert snapshot(folder) == before
    code, out, err = run("models", "list")
    assert "Dataset999_Tiny" not in rows(out)


def test_a_registered_folder_that_went_missing_is_listed_as_unusable(home, run, models, tmp_path):
    folder = shutil.copytree(models["one"], tmp_path / "gone" / "Dataset999_Tiny" / models["one"].name)
    assert run("models", "add", "--link", folder, "--name", "gone")[0] == 0
    shutil.rmtree(tmp_path / "gone")
    code, out, err = run("models", "list")
    assert rows(out)["gone"][:2] == ["registered", "unusable"]
    assert f"its folder {folder} is missing (models remove gone forgets it)" in out
    assert run("models", "remove", "gone")[0] == 0


def test_mistakes_are_one_sentence(home, run, models, good_image, tmp_path):
    assert run("models", "remove", "hippocampus_mbtfe")[2].strip() == \
        "error: hippocampus_mbtfe is shipped with SegmentMBTFE and cannot be removed."
    assert run("models", "remove", "nothing")[2].strip() == \
        "error: No model named 'nothing'; `segment-mbtfe models list` shows the names."
    assert run("models", "add", models["one"], "--name", "../up")[2].strip().startswith(
        "error: '../up' cannot name a model: use letters, digits")
    assert run("predict", "-m", "nothing", "-i", good_image, "-o", tmp_path / "y.nii.gz")[2].strip() == \
        "error: No model folder or model named 'nothing'; `segment-mbtfe models list` shows the models by name."
    zipped = export_layout_zip(models["one"], tmp_path / "tiny.zip")
    assert run("models", "add", "--link", zipped)[2].strip().startswith("error: tiny.zip is a zip: it cannot be "
                                                                        "registered where it is")
    (tmp_path / "empty").mkdir()
    code, out, err = run("models", "add", tmp_path / "empty")
    assert code == 1 and err.strip().startswith("error: No trained nnU-Net model in")
    assert not (home / "models").exists()  # none of these wrote anything


# The start of the scripts below: Slicer's process, where importing torch is an error.
REFUSE_TORCH = r"""
import importlib.abc, sys
class RefuseTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch must not be imported here")
sys.meta_path.insert(0, RefuseTorch())
"""

NO_TORCH = REFUSE_TORCH + r"""
import json
sys.path.insert(0, sys.argv[1])
from SegmentMBTFESlicer import catalog
from SegmentMBTFELib import cli
added = catalog.add(sys.argv[2])
code = cli.main(["models", "list"])
print(json.dumps({"added": added.name, "path": added.path, "listed": [m.name for m in catalog.available_models()],
                  "code": code, "torch": [m for m in sys.modules if m.split(".")[0] == "torch"]}))
"""


def test_adding_a_zip_and_listing_never_import_torch(home, models, tmp_path):
    """As the Slicer panel does it, in Slicer's process, where torch must never be imported."""
    import json
    zipped = export_layout_zip(models["one"], tmp_path / "tiny.zip")
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(ROOT / "SegmentMBTFE"), str(zipped)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torch"] == [] and result["code"] == 0
    assert result["added"] == "Dataset999_Tiny (3d_fullres)" and "Dataset999_Tiny (3d_fullres)" in result["listed"]
    assert result["path"] == str(home / "models" / "Dataset999_Tiny")


LIST_WITHOUT_TORCH = REFUSE_TORCH + r"""
import io, json
opened, real_open = [], io.open
def recording_open(file, *args, **kwargs):
    opened.append(str(file))
    return real_open(file, *args, **kwargs)
io.open = recording_open  # pathlib opens files through io.open
from SegmentMBTFELib import cli
code = cli.main(["models", "list"])
print(json.dumps({"code": code, "opened": opened, "torch": [m for m in sys.modules if m.split(".")[0] == "torch"]}))
"""


def test_listing_reads_json_and_v1_pickles_as_plain_data_only(home, run, tmp_path):
    """What the README says `models list` reads: the models' JSON files, and for an nnU-Net v1 model its
    plans.pkl and fold_N/*.model.pkl through the restricted unpickler (nnunet_v1.read_pickle); never a
    checkpoint, never torch. A v1 plans.pkl that would run a command is listed as unusable; the command never runs."""
    import json
    import pickle
    from types import SimpleNamespace
    from safety_catalogue import V1_TRAINED, RunsCode, v1_folder
    marker = tmp_path / "pwned"
    good = v1_folder(SimpleNamespace(tmp=tmp_path / "good"))
    evil = v1_folder(SimpleNamespace(tmp=tmp_path / "evil"))
    assert run("models", "add", "--link", good, "--name", "v1_good")[0] == 0
    assert run("models", "add", "--link", evil, "--name", "v1_evil")[0] == 0  # plain data when registered
    (evil.parent / V1_TRAINED / "plans.pkl").write_bytes(pickle.dumps({"plans_per_stage": RunsCode(f"touch {marker}")}))
    done = subprocess.run([sys.executable, "-c", LIST_WITHOUT_TORCH], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and result["torch"] == []
    assert not marker.exists(), "listing ran the code in a v1 plans.pkl"
    listed = rows(done.stdout.strip().rsplit("\n", 1)[0])
    assert listed["v1_good"][:2] == ["registered", "Generic_UNet (nnU-Net v1)"]
    assert listed["v1_evil"][:2] == ["registered", "unusable"] and "not plain data" in done.stdout
    model_files = [Path(f) for f in result["opened"] if f.startswith((str(tmp_path), str(ROOT / "models")))]
    assert {f.suffix for f in model_files} == {".json", ".pkl"}, model_files
    assert {f.name for f in model_files if f.suffix == ".pkl"} == {"plans.pkl", "model_final_checkpoint.model.pkl"}


def test_an_add_clears_what_a_killed_add_left_a_day_ago(home, run, models):
    """A killed add leaves a hidden work folder: never listed; the next add removes it once a day old (younger
    ones may belong to an add still running)."""
    import os
    import time
    (home / "models").mkdir(parents=True)
    old, young = home / "models" / ".adding-old", home / "models" / ".adding-young"
    for folder in (old, young):
        (folder / "Dataset999_Tiny").mkdir(parents=True)
    day_ago = time.time() - 24 * 3600 - 60
    os.utime(old, (day_ago, day_ago))
    assert "Dataset999_Tiny" not in rows(run("models", "list")[1])
    assert run("models", "add", models["one"])[0] == 0
    assert not old.exists() and young.is_dir()
