"""The shipped models (models/): each loads and segments real held-out hippocampus cases as its card says,
fits the size limit, carries no optimizer state, and the default model is the best one.

Dice floor: each model's card reports Dice on its 42 held-out cases (fold 0 of nnU-Net's 5-fold split,
never seen in training). Here the first four of them are predicted again, TTA on as in the card, and
each case must (a) reproduce the Dice recorded in results.json within 0.005 (same engine, same weights:
only thread-count rounding may differ) and (b) reach a mean Dice of 0.80 over the four. 0.80 sits below
the per-case 5th percentile of the plain model's held-out Dice (0.825) and well above what a broken
model, wrong preprocessing or swapped labels give (< 0.3), so the floor fails on real breakage only.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from SegmentMBTFELib import load_model, read_volume
from SegmentMBTFELib.models.checkpoint import load_checkpoint
from SegmentMBTFELib.models.shipped import DEFAULT_MODEL, default_model, shipped_models
from SegmentMBTFELib.training.finetune import dice_per_label

MODELS = {p.name: p for p in shipped_models()}
EXPECTED = ("hippocampus_nnunet", "hippocampus_mbtfe", "hippocampus_unetpp")
CASES = 4
FLOOR = 0.80


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def test_the_models_are_shipped():
    assert set(EXPECTED) <= set(MODELS), sorted(MODELS)


@pytest.mark.parametrize("name", EXPECTED)
def test_shipped_model_segments_held_out_cases_as_its_card_says(name, shared_data):
    folder = MODELS[name]
    results = _results(folder)
    model = load_model(folder)
    assert [v for v, _ in model.labels.output_segments()] == [1, 2]
    root = shared_data / "hippocampus" / "train"
    means = []
    for case in results["validation_cases"][:CASES]:
        labels = read_volume(root / "labels" / f"{case}.nii.gz")
        prediction = model.predict([read_volume(root / "images" / f"{case}.nii.gz")], tta=True)
        dice = dice_per_label(prediction.labels.array, labels.array, model.labels)
        assert dice == pytest.approx(results["dice_per_case"][case], abs=0.005), case
        means.append(np.mean(list(dice.values())))
    assert np.mean(means) >= FLOOR, means


@pytest.mark.parametrize("name", EXPECTED)
def test_shipped_model_folder_is_small_stripped_and_documented(name):
    folder = MODELS[name]
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 20e6, f"{name}: {size / 1e6:.1f} MB"
    checkpoint = load_checkpoint(folder / "fold_0" / "checkpoint_final.pth")
    assert "optimizer_state" not in checkpoint
    card = (folder / "MODEL_CARD.md").read_text()
    for words in ("CC-BY-SA 4.0", "Antonelli", "Simpson", "not for clinical use", "train_hippocampus.py",
                  "anterior", "posterior"):
        assert words in card, words
    results = _results(folder)
    assert len(results["validation_cases"]) == results["n_val"] and results["n_train"] + results["n_val"] == 208


def test_default_model_is_the_better_one_on_cross_validation():
    means = {name: _results(MODELS[name])["dice"]["mean"] for name in EXPECTED}
    assert DEFAULT_MODEL == max(means, key=means.get), means
    assert default_model() == MODELS[DEFAULT_MODEL]


def test_the_self_test_model_is_model_factorys_tiny_model(tmp_path):
    """Resources/SelfTest holds the in-Slicer self-test's model. It is shipped as files because writing a
    checkpoint needs torch, which Slicer's process never imports. It is what model_factory writes, so it can be
    made again (from Testing/: model_factory.make_model_folder("../Resources/SelfTest",
    dataset_name="Dataset999_SelfTestHippocampus")) and cannot drift from the tests' tiny models."""
    import model_factory
    shipped = Path(__file__).resolve().parents[1] / "Resources" / "SelfTest" / \
        "Dataset999_SelfTestHippocampus" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    made = model_factory.make_model_folder(tmp_path, dataset_name="Dataset999_SelfTestHippocampus")
    for name in ("dataset.json", "plans.json"):
        assert json.loads((shipped / name).read_text()) == json.loads((made / name).read_text()), name
    ours, theirs = (load_checkpoint(f / "fold_0" / "checkpoint_final.pth")["network_weights"] for f in (shipped, made))
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k].numpy(), theirs[k].numpy()) for k in ours)
