"""Model versions (versions.py): fine-tuned weights written as new versions, the original never touched.

Real model folders (model_factory, and the shipped hippocampus model), real torch checkpoints written by
`ModelVersions.add` and loaded back by `load_model`; the fine-tuning results hold real perturbed weights so
these tests need no training. $SEGMENTMBTFE_HOME points into tmp_path in every test.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import model_factory
from SegmentMBTFELib import Cancelled, ModelError, load_model
from SegmentMBTFELib.models import shipped
from SegmentMBTFELib.models.folder import ModelFolder
from SegmentMBTFELib.models.versions import VERSION_FILE, ModelVersions, Version, resolve, versions_home
from SegmentMBTFELib.training.finetune import FinetuneResult, FinetuneSettings


# ------------------------------------------------------------------------------------------------ helpers

@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "home"
    monkeypatch.setenv("SEGMENTMBTFE_HOME", str(folder))
    return folder


@pytest.fixture
def original(tmp_path) -> Path:
    """A two-fold model folder with the extra files nnU-Net leaves (fingerprint, cross-validation postprocessing)."""
    folder = model_factory.make_model_folder(tmp_path / "models", folds=(0, 1))
    (folder / "dataset_fingerprint.json").write_text(json.dumps({"spacings": [[1, 1, 1]]}))
    (folder / "crossval_results_folds_0_1").mkdir()
    (folder / "crossval_results_folds_0_1" / "postprocessing.json").write_text(json.dumps(
        {"postprocessing_functions": [], "postprocessing_kwargs": []}))
    return folder


def snapshot(folder: Path) -> dict:
    """Every file's bytes under `folder` (and the file list), to prove a folder was never written."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def perturbed_result(model, shift: float, iterations=5, folds=None) -> FinetuneResult:
    """A FinetuneResult with real weights: the model's own, every float tensor shifted by `shift`."""
    folds = folds or model.folds
    weights = {f: {k: (v + shift if v.is_floating_point() else v.clone()) for k, v in model.weights[model.folds.index(f)].items()}
               for f in folds}
    return FinetuneResult(weights=weights, settings=FinetuneSettings(iterations=iterations), iterations=iterations,
                          seconds=1.5, losses={f: [1.0, 0.6] for f in folds}, cases=[{"name": "a"}, {"name": "b"}],
                          dice_before={"training": {"mean": 0.5}, "validation": {"mean": 0.4}},
                          dice_after={"training": {"mean": 0.7}, "validation": {"mean": 0.45}})


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def add_version(model_path, shift, **kwargs) -> Version:
    """Load the current version of `model_path`, write a perturbed copy of it as the next version."""
    folder, _ = resolve(model_path)
    model = load_model(folder)
    return ModelVersions(folder).add(model, perturbed_result(model, shift), **kwargs)


class _Unpicklable:
    """Stands where a tensor should be: saving it raises Cancelled, as a cancel during the write would."""

    def __reduce_ex__(self, protocol):
        raise Cancelled()


# ------------------------------------------------------------------------------------------------ writing

def test_add_writes_a_loadable_version_and_never_touches_the_original(original, home):
    before = snapshot(original)
    model = load_model(original)
    result = perturbed_result(model, 0.01)
    version = ModelVersions(original).add(model, result)

    assert version.id == "v1" and version.parent == "original" and version.current and not version.problem
    assert version.path.parent.parent == home / "versions"
    assert version.path.parent.name.startswith("Dataset999_Tiny_3d_fullres-")
    trained = version.path / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    for name in ("dataset.json", "plans.json", "dataset_fingerprint.json",
                 "crossval_results_folds_0_1/postprocessing.json"):
        assert (trained / name).read_bytes() == (original / name).read_bytes(), name
    record = json.loads((version.path / VERSION_FILE).read_text())
    assert record["id"] == "v1" and record["parent"]["id"] == "original"
    assert record["parent"]["checksum"] == model.checksum() and record["folds"] == ["0", "1"]
    assert set(record["checkpoints"]) == {f"{trained.name}/fold_{f}/checkpoint_final.pth" for f in (0, 1)}
    assert record["finetune"]["iterations"] == 5 and record["finetune"]["dice_after"]["training"]["mean"] == 0.7
    assert version.provenance == record

    # the version loads like the original, with the fine-tuned weights and the original's checkpoint entries
    assert ModelFolder(version.path).path == trained
    tuned = load_model(version.path)
    assert tuned.folds == ["0", "1"]
    for i, fold in enumerate(tuned.folds):
        assert same_weights(tuned.weights[i], result.weights[fold])
        assert not same_weights(tuned.weights[i], model.weights[i])
        assert tuned.checkpoint_entries[i].keys() == model.checkpoint_entries[i].keys()
        assert tuned.checkpoint_entries[i]["trainer_name"] == "nnUNetTrainer"
        assert tuned.checkpoint_entries[i]["init_args"]["fold"] == int(fold)
    assert tuned.mirror_axes == model.mirror_axes

    assert version.summary().startswith("v1 (from original, ")
    assert "5 iterations on 2 cases" in version.summary() and "validation Dice 0.40 -> 0.45" in version.summary()
    assert snapshot(original) == before


def test_resolve_loads_the_current_version_unless_one_is_named(original):
    assert resolve(original) == (original.resolve(), ModelVersions(original).get("original"))
    v1 = add_version(original, 0.01)
    path, version = resolve(original)
    assert (path, version.id) == (v1.path, "v1")
    assert resolve(original, "original")[0] == original.resolve()
    # a version folder given directly is that version, whichever is current
    v2 = add_version(original, 0.02)
    assert resolve(original)[1].id == "v2"
    assert resolve(v1.path)[1].id == "v1" and resolve(v1.path / "nnUNetTrainer__nnUNetPlans__3d_fullres")[1].id == "v1"
    assert resolve(v1.path, "v2")[0] == v2.path
    with pytest.raises(ModelError, match=r"no version 'v7' \(it has: original, v1, v2\)"):
        resolve(original, "v7")


def test_versions_of_versions_use_rollback_and_delete(original):
    before = snapshot(original)
    v1 = add_version(original, 0.01)
    v2 = add_version(original, 0.02)  # fine-tuned from the current version, v1
    versions = ModelVersions(original)
    assert [(v.id, v.parent, v.current, v.read_only) for v in versions.list()] == [
        ("original", None, False, True), ("v1", "original", False, False), ("v2", "v1", True, False)]
    assert json.loads((v2.path / VERSION_FILE).read_text())["parent"]["path"] == str(
        v1.path / "nnUNetTrainer__nnUNetPlans__3d_fullres")
    # v2 was fine-tuned from v1's weights: (original + 0.01) + 0.02
    expected = {k: (v + 0.01 + 0.02 if v.is_floating_point() else v) for k, v in load_model(original).weights[0].items()}
    assert same_weights(load_model(v2.path).weights[0], expected)

    assert versions.rollback().id == "v1" and versions.current().id == "v1"
    assert versions.rollback().id == "original"
    with pytest.raises(ModelError, match="already at its original"):
        versions.rollback()
    assert versions.use("v2").current and versions.current().id == "v2"

    # deleting v1 keeps v2 (its parent stays recorded); rolling back from v2 skips the deleted v1
    versions.delete("v1")
    assert not v1.path.exists() and v2.path.is_dir()
    assert [v.id for v in versions.list()] == ["original", "v2"] and versions.get("v2").parent == "v1"
    assert versions.rollback().id == "original"
    versions.use("v2")
    versions.delete("v2")  # current: its nearest surviving ancestor becomes current
    assert versions.current().id == "original" and not v2.path.exists()
    assert versions.next_path().name == "v3"  # ids are never reused
    with pytest.raises(ModelError, match="read-only"):
        versions.delete("original")
    with pytest.raises(ModelError, match=r"no version 'v1' \(it has: original\)"):
        versions.use("v1")
    assert snapshot(original) == before
    assert not any(p.name.startswith(".") for p in versions.family_dir.iterdir())  # no parked or partial folders


def test_the_family_is_found_from_any_of_its_folders(original, tmp_path):
    versions = ModelVersions(original)
    v1 = add_version(original, 0.01)
    for path in (v1.path, v1.path / "nnUNetTrainer__nnUNetPlans__3d_fullres", original.parent):
        found = ModelVersions(path)
        assert (found.key, found.original, found.family_dir) == (versions.key, original.resolve(), versions.family_dir)
        assert [v.id for v in found.list()] == ["original", "v1"]
    # identity is the checkpoints' content: a copy of the model has the same versions, another model none
    copy = tmp_path / "copy" / original.name
    shutil.copytree(original, copy)
    assert ModelVersions(copy).key == versions.key
    other = model_factory.make_model_folder(tmp_path / "other", folds=(0, 1), seed=7)
    assert ModelVersions(other).key != versions.key and [v.id for v in ModelVersions(other).list()] == ["original"]


def test_an_explicit_target_is_written_there_and_registered(original, tmp_path):
    target = tmp_path / "my versions" / "hippo-corrected"
    version = add_version(original, 0.01, target=target)
    assert version.path == target and (target / VERSION_FILE).is_file()
    assert json.loads(ModelVersions(original).registry_path.read_text())["versions"][0]["path"] == str(target)
    assert resolve(original)[0] == target and ModelVersions(target).key == ModelVersions(original).key
    assert not ModelVersions(original).family_dir.joinpath("v1").exists()
    ModelVersions(original).delete("v1")
    assert not target.exists() and target.parent.is_dir()


def test_targets_that_would_overwrite_anything_are_refused_before_any_work(original, tmp_path, home):
    before = snapshot(original)
    versions = ModelVersions(original)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="already exists and is not an empty folder"):
        versions.check_target(full)
    with pytest.raises(ModelError, match="never modified"):
        versions.check_target(original / "new")
    shipped_models = shipped.shipped_models()
    if shipped_models:
        with pytest.raises(ModelError, match="shipped models are read-only"):
            versions.check_target(shipped_models[0] / "finetuned")
    model = load_model(original)
    with pytest.raises(ModelError, match="not an empty folder"):
        versions.add(model, perturbed_result(model, 0.01), target=full)
    assert (full / "keep.txt").read_text() == "mine" and [p.name for p in full.iterdir()] == ["keep.txt"]
    assert not versions.registry_path.exists() and snapshot(original) == before
    # an empty folder is fine; a folder inside a version is not (deleting that version would take it along)
    (tmp_path / "empty").mkdir()
    assert versions.add(model, perturbed_result(model, 0.01), target=tmp_path / "empty").path == tmp_path / "empty"
    with pytest.raises(ModelError, match="inside version v1"):
        versions.check_target(tmp_path / "empty" / "nested")


@pytest.mark.parametrize("how", ["cancel event", "Cancelled while saving", "Ctrl+C while saving"])
def test_a_cancelled_write_leaves_no_folder_and_no_entry(original, tmp_path, how):
    v1 = add_version(original, 0.01)
    versions = ModelVersions(original)
    registry = versions.registry_path.read_bytes()
    model = load_model(v1.path)
    result = perturbed_result(model, 0.01)
    cancel = None
    if how == "cancel event":
        cancel = threading.Event()
        cancel.set()
        error = Cancelled
    else:  # the second fold's weights cannot be saved: the first fold's checkpoint is already on disk by then
        last = list(result.weights["1"])[-1]
        result.weights["1"][last] = _Unpicklable() if how.startswith("Cancelled") else _Interrupting()
        error = Cancelled if how.startswith("Cancelled") else KeyboardInterrupt
    for target in (None, tmp_path / "explicit"):
        with pytest.raises(error):
            versions.add(model, result, target=target, cancel=cancel)
        assert sorted(p.name for p in versions.family_dir.iterdir()) == ["v1", "versions.json"]
        assert versions.registry_path.read_bytes() == registry
        assert not (tmp_path / "explicit").exists() and not list(tmp_path.glob(".explicit*"))
    assert [v.id for v in versions.list()] == ["original", "v1"] and versions.current().id == "v1"


class _Interrupting:
    def __reduce_ex__(self, protocol):
        raise KeyboardInterrupt()


def test_damaged_versions_are_listed_and_refused(original):
    v1 = add_version(original, 0.01)
    v2 = add_version(original, 0.02)
    v3 = add_version(original, 0.03)
    checkpoint = v1.path / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_1" / "checkpoint_final.pth"
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    (v2.path / VERSION_FILE).unlink()
    shutil.rmtree(v3.path)

    versions = ModelVersions(original)
    listed = {v.id: v for v in versions.list()}
    assert "fold_1/checkpoint_final.pth was changed or corrupted" in listed["v1"].problem
    assert "version.json is missing" in listed["v2"].problem
    assert "is missing" in listed["v3"].problem and str(v3.path) in listed["v3"].problem
    assert listed["v1"].summary().startswith("v1: damaged (checkpoint ")
    assert not listed["original"].problem and listed["v3"].current

    # the current version is damaged: loading the model refuses it and says how to get out
    with pytest.raises(ModelError, match=r"Version v3 .* cannot be used: .*missing.*models delete v3"):
        resolve(original)
    for id in ("v1", "v2"):
        with pytest.raises(ModelError, match=f"Cannot use {id}"):
            versions.use(id)
        with pytest.raises(ModelError, match=f"Version {id} .* cannot be used"):
            resolve(original, id)
    with pytest.raises(ModelError, match="Cannot roll back to v2"):
        versions.rollback()
    assert resolve(original, "original")[0] == original.resolve()
    # damaged versions can still be deleted; then the nearest surviving ancestor is current
    versions.delete("v3")
    versions.delete("v2")
    assert versions.current().id == "v1"  # current, but refused until fixed
    with pytest.raises(ModelError, match="changed or corrupted"):
        resolve(original)
    versions.delete("v1")
    assert resolve(original)[0] == original.resolve()


def test_a_version_folder_with_a_swapped_version_file_is_damaged(original):
    v1 = add_version(original, 0.01)
    v2 = add_version(original, 0.02)
    shutil.copyfile(v1.path / VERSION_FILE, v2.path / VERSION_FILE)  # v2's folder now claims to be v1
    assert "describes v1" in ModelVersions(original).get("v2").problem


def test_the_shipped_default_model_stays_byte_identical(home):
    try:
        original = shipped.default_model()
    except ModelError:
        pytest.skip("the shipped default model is not in this checkout")
    before = snapshot(original)
    versions = ModelVersions(original)
    model = load_model(original)
    version = versions.add(model, perturbed_result(model, 0.001))
    assert home / "versions" in version.path.parents
    assert shipped.is_shipped(original) and not shipped.is_shipped(version.path)
    # the shipped folder has plans.json at its top: the version is the nnU-Net layout below a version folder
    assert ModelFolder(version.path).path.name == f"{model.trainer_name}__nnUNetPlans__{model.configuration.name}"
    assert same_weights(load_model(resolve(original)[0]).weights[0], perturbed_result(model, 0.001).weights["0"])
    versions.rollback()
    versions.use("v1")
    versions.delete("v1")
    assert snapshot(original) == before


def test_versions_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SEGMENTMBTFE_HOME", str(tmp_path / "x"))
    assert versions_home() == tmp_path / "x"
    monkeypatch.delenv("SEGMENTMBTFE_HOME")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert versions_home() == tmp_path / "data" / "SegmentMBTFE"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert versions_home() == Path.home() / ".local" / "share" / "SegmentMBTFE"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert versions_home() == Path.home() / "Library" / "Application Support" / "SegmentMBTFE"
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert versions_home() == tmp_path / "local" / "SegmentMBTFE"


def test_listing_versions_does_not_import_torch(original, home):
    add_version(original, 0.01)
    code = ("import sys; from SegmentMBTFELib.models.versions import ModelVersions; "
            f"print([v.summary() for v in ModelVersions({str(original)!r}).list()]); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "v1 (from original" in done.stdout


def test_nnunet_predicts_with_a_version_folder_as_with_ours(original, nnunet_prediction, hippo_test_cases, agreement):
    """A version folder is an nnU-Net model folder: nnUNetPredictor loads it and segments as our engine does."""
    model = load_model(original)
    version = ModelVersions(original).add(model, perturbed_result(model, 0.05))
    trained = ModelFolder(version.path).path
    case = hippo_test_cases[0]
    nnunet_labels = nnunet_prediction(trained, [case], folds=(0, 1), tta=False)[0]
    from SegmentMBTFELib.io.images import read_channels
    ours = load_model(version.path).predict(read_channels(case), tta=False).labels.array
    original_labels = load_model(original).predict(read_channels(case), tta=False).labels.array
    assert agreement(ours, nnunet_labels) >= 0.9999  # the parity floor of test_parity.py
    assert agreement(original_labels, nnunet_labels) < agreement(ours, nnunet_labels)  # the fine-tuned weights


# ------------------------------------------------------------------ what programs that died leave behind

def _dead_pid() -> int:
    """The id of a process that has ended (a real one, just finished)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_lock_left_by_a_program_that_died_is_broken_at_once(original):
    import socket
    import time
    add_version(original, 0.01)
    versions = ModelVersions(original)
    lock = versions.family_dir / ".lock"
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    started = time.monotonic()
    versions.use("original")
    assert time.monotonic() - started < 5, "waited for a lock whose holder is gone"
    assert not lock.exists() and versions.current().id == "original"

    # a lock held by a program that runs (this one) is respected: it is not broken
    from SegmentMBTFELib.models.version_store import break_if_stale
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    assert not break_if_stale(lock) and lock.exists()


def test_what_a_killed_fine_tune_half_wrote_is_removed_by_the_next(original):
    import socket
    add_version(original, 0.01)
    family = ModelVersions(original).family_dir
    dead = family / ".v2.partial-0badc0de"
    (dead / "half").mkdir(parents=True)
    (dead / ".holder.json").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    alive = family / ".v2.partial-a11ve000"  # another program writing right now
    alive.mkdir()
    (alive / ".holder.json").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    elsewhere = family / ".v2.partial-0ther0000"  # a program on another machine sharing this home
    elsewhere.mkdir()
    (elsewhere / ".holder.json").write_text(json.dumps({"pid": _dead_pid(), "host": "another-machine"}))
    assert [v.id for v in ModelVersions(original).list()] == ["original", "v1"]  # hidden: never listed
    v2 = add_version(original, 0.02)
    assert v2.id == "v2" and not dead.exists() and alive.exists() and elsewhere.exists()
    assert not (v2.path / ".holder.json").exists()


def test_deleting_a_version_never_removes_a_folder_that_is_not_its_own(original, tmp_path):
    """A version list edited by hand can point a version at any folder: delete takes it off the list only."""
    v1 = add_version(original, 0.01)
    precious = tmp_path / "my data"
    (precious / "keep").mkdir(parents=True)
    (precious / "keep" / "scan.nii.gz").write_bytes(b"the user's own file")
    versions = ModelVersions(original)
    registry = json.loads(versions.registry_path.read_text())
    registry["versions"][0]["path"] = str(precious)
    versions.registry_path.write_text(json.dumps(registry))
    ModelVersions(original).delete("v1")
    assert (precious / "keep" / "scan.nii.gz").read_bytes() == b"the user's own file"
    assert v1.path.is_dir()  # the real folder was not named, so it stays too
    assert [v.id for v in ModelVersions(original).list()] == ["original"]


def test_a_version_json_naming_a_family_outside_the_home_is_refused(original, tmp_path, home):
    """version.json's family names a folder in the versions home; a path there (../..) must not lead out."""
    v1 = add_version(original, 0.01)
    record = json.loads((v1.path / VERSION_FILE).read_text())
    record["family"] = "../../../outside-0123456789ab"
    (v1.path / VERSION_FILE).write_text(json.dumps(record))
    with pytest.raises(ModelError, match="cannot be read"):
        ModelVersions(v1.path)
    assert not (home.parent.parent / "outside-0123456789ab").exists()
