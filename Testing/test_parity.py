"""Our label maps against nnU-Net's own `nnUNetPredictor`, on model folders nnU-Net itself made.

The floor is the issue's: at least 99.99% of voxels equal, for every configuration kind. In practice the
label maps are identical or differ in a handful of voxels where two classes tie within fp16 rounding.
The reference kinds are trained for two iterations, so their predictions are near-random; the shipped models
(trained by nnU-Net's own loop for 6000 iterations) show the same agreement where nnU-Net's prediction is right.
"""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from SegmentMBTFELib import load_model, read_volume
from SegmentMBTFELib.io.images import read_channels
from SegmentMBTFELib.models.shipped import shipped_models
from SegmentMBTFELib.training.finetune import dice_per_label

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FLOOR = 0.9999
SHIPPED = ("hippocampus_nnunet", "hippocampus_mbtfe", "hippocampus_unetpp")
SHIPPED_CASES = 2
# nnU-Net's own prediction with a shipped model must be a real segmentation, not just agree with ours: mean Dice
# against the case's ground truth well above chance (the cards report 0.87 on these held-out cases).
TRAINED_DICE = 0.7
# The reference kinds trained for 400 iterations (ct_aniso_trained, hippo3d_resenc_trained; 30 s and 90 s here): far
# from converged, but no longer random. Measured: CT confident (top softmax > 0.9) on 0.15 and 0.22 of the voxels
# (none at 100 iterations); ResEnc on 0.90, Dice 0.30 / 0.59-0.64 (at 2 iterations: 0.02, Dice 0.01 / 0.05).
CT_CONFIDENT = 0.1
RESENC_CONFIDENT = 0.8
RESENC_DICE = 0.3


def ours(model_dir, case, **options):
    folds = options.pop("folds", None)
    model = load_model(model_dir, folds=[str(f) for f in folds] if folds else None)
    return model.predict(read_channels(case), device="cpu", **options)


def theirs(nnunet_prediction, model_dir, case, **options):
    [labels] = nnunet_prediction(model_dir, [case], **options)[:1]
    return sitk.GetArrayFromImage(sitk.ReadImage(str(labels)))


def check(prediction, reference, agreement):
    assert prediction.labels.array.shape == reference.shape
    score = agreement(prediction.labels.array, reference)
    assert score >= FLOOR, f"only {score:.6f} of voxels agree with nnU-Net"
    # A map that is all background would agree trivially on small foregrounds; make sure there is content.
    assert len(np.unique(reference)) > 1
    return score


@pytest.mark.parametrize("tta", [True, False], ids=["tta", "no_tta"])
def test_3d_fullres_isotropic(hippo3d_model, hippo_test_cases, nnunet_prediction, agreement, tta):
    for case in hippo_test_cases:
        check(ours(hippo3d_model, case, tta=tta),
              theirs(nnunet_prediction, hippo3d_model, case, tta=tta), agreement)


def test_2d(hippo2d_model, hippo_test_cases, nnunet_prediction, agreement):
    case = hippo_test_cases[0]
    check(ours(hippo2d_model, case), theirs(nnunet_prediction, hippo2d_model, case), agreement)


def test_two_folds_ensemble(hippo3d_2folds_model, hippo_test_cases, nnunet_prediction, agreement):
    case = hippo_test_cases[0]
    prediction = ours(hippo3d_2folds_model, case)
    assert prediction.settings["folds"] == "0,1"
    check(prediction, theirs(nnunet_prediction, hippo3d_2folds_model, case, folds=(0, 1)), agreement)


def test_residual_encoder_unet(hippo3d_resenc_model, hippo_test_cases, nnunet_prediction, agreement):
    case = hippo_test_cases[1]
    check(ours(hippo3d_resenc_model, case), theirs(nnunet_prediction, hippo3d_resenc_model, case), agreement)


@pytest.mark.parametrize("tta", [False, True], ids=["no_tta", "tta"])
def test_anisotropic_ct_separate_z(ct_aniso_model, ct_test_cases, nnunet_prediction, agreement, tta):
    for case in ct_test_cases:
        check(ours(ct_aniso_model, case, tta=tta),
              theirs(nnunet_prediction, ct_aniso_model, case, tta=tta), agreement)


def test_regions(hippo3d_regions_model, hippo_test_cases, nnunet_prediction, agreement):
    case = hippo_test_cases[0]
    prediction = ours(hippo3d_regions_model, case)
    check(prediction, theirs(nnunet_prediction, hippo3d_regions_model, case), agreement)
    assert [name for _, name in prediction.segments] == ["hippocampus", "posterior"]


def test_old_style_plans(hippo3d_oldplans_model, hippo_test_cases, nnunet_prediction, agreement):
    case = hippo_test_cases[0]
    check(ours(hippo3d_oldplans_model, case), theirs(nnunet_prediction, hippo3d_oldplans_model, case),
          agreement)


def test_probabilities_match(hippo3d_model, hippo_test_cases, nnunet_prediction):
    case = hippo_test_cases[0]
    prediction = ours(hippo3d_model, case, probabilities=True)
    files = nnunet_prediction(hippo3d_model, [case], save_probabilities=True)
    reference = np.load(files[1])["probabilities"]
    assert prediction.probabilities.shape == reference.shape
    # Both softmax fp16 logits: a difference of one fp16 step in a logit of magnitude ~10 moves a
    # probability by up to ~4e-3; anything systematic would show in the mean.
    difference = np.abs(prediction.probabilities - reference)
    assert difference.max() < 1e-2 and difference.mean() < 1e-4, (difference.max(), difference.mean())
    np.testing.assert_allclose(prediction.probabilities.sum(0), 1, atol=1e-5)


def test_postprocessing_from_the_model_folder(hippo3d_postprocessing_model, hippo_test_cases,
                                              nnunet_prediction, agreement):
    from nnunet_reference import KINDS  # noqa: F401  (the folder's postprocessing.pkl is nnU-Net's own)
    case = hippo_test_cases[0]
    folder = hippo3d_postprocessing_model
    [pkl] = folder.glob("crossval_results_folds_*/postprocessing.pkl")
    reference = theirs(nnunet_prediction, folder, case, postprocessing=pkl)
    prediction = ours(folder, case)
    assert prediction.settings["postprocessing"] is True
    check(prediction, reference, agreement)
    without = ours(folder, case, postprocess=False)
    assert without.settings["postprocessing"] is False
    check(without, theirs(nnunet_prediction, folder, case), agreement)  # nnU-Net's prediction before its postprocessing
    # the recipe changes this case (else the two comparisons above would be one)
    assert not np.array_equal(prediction.labels.array, without.labels.array)


def test_best_checkpoint(hippo3d_model, hippo_test_cases, nnunet_prediction, agreement):
    case = hippo_test_cases[1]
    model = load_model(hippo3d_model, checkpoint="best")
    prediction = model.predict(read_channels(case), device="cpu")
    assert prediction.settings["checkpoint"] == "best"
    check(prediction, theirs(nnunet_prediction, hippo3d_model, case, checkpoint="checkpoint_best.pth"), agreement)


@pytest.fixture(scope="module")
def shipped_held_out(shared_data):
    """The shipped models' first held-out cases (fold 0 of nnU-Net's split, the same for all three; conftest's
    hippo_test_cases are in their training set): [(image files, ground-truth label file)]."""
    folders = {p.name: p for p in shipped_models()}
    held_out = [json.loads((folders[name] / "results.json").read_text())["validation_cases"] for name in SHIPPED]
    assert all(cases == held_out[0] for cases in held_out)
    root = shared_data / "hippocampus" / "train"
    return folders, [([root / "images" / f"{c}.nii.gz"], root / "labels" / f"{c}.nii.gz")
                     for c in held_out[0][:SHIPPED_CASES]]


@pytest.mark.parametrize("tta", [True, False], ids=["tta", "no_tta"])
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_trained_models(name, tta, shipped_held_out, nnunet_prediction, agreement):
    folders, cases = shipped_held_out
    folder = folders[name]
    model = load_model(folder)
    files = nnunet_prediction(folder, [images for images, _ in cases], tta=tta, shim_trainers=True)
    for (images, truth_file), reference_file in zip(cases, files):
        prediction = model.predict(read_channels(images), device="cpu", tta=tta)
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(reference_file)))
        score = check(prediction, reference, agreement)
        truth = read_volume(truth_file).array
        dice = dice_per_label(reference, truth, model.labels)
        share, true_share = np.mean(reference > 0), np.mean(truth > 0)
        print(f"{name} tta={tta} {images[0].name}: agreement {score:.6f}, nnU-Net Dice {dice}, "
              f"foreground {share:.4f} (truth {true_share:.4f})")
        assert set(np.unique(reference)) == {0, 1, 2}
        assert 0.67 < share / true_share < 1.5, (share, true_share)
        assert np.mean(list(dice.values())) > TRAINED_DICE, dice


@pytest.mark.parametrize("tta", [False, True], ids=["no_tta", "tta"])
def test_3d_lowres_then_cascade(nnunet_model, hippo_test_cases, nnunet_prediction, agreement, tmp_path_factory, tta):
    """The chain as nnUNetv2_predict runs it: 3d_lowres (nnU-Net's planner chose 1.70 mm), then 3d_cascade_fullres
    given the lowres label map (--prev_stage_predictions); each side's cascade reads its own lowres output."""
    lowres, cascade = nnunet_model("hippo3d_lowres"), nnunet_model("hippo3d_cascade")
    # nnU-Net finds the previous stage's file by the case id, which it takes from an input named <case>_0000
    image = hippo_test_cases[0][0]
    case = [tmp_path_factory.mktemp("cascade") / image.name.replace(".nii.gz", "_0000.nii.gz")]
    shutil.copyfile(image, case[0])
    first = ours(lowres, case, tta=tta)
    assert first.settings["folds"] == "all"
    [first_theirs] = nnunet_prediction(lowres, [case], tta=tta, folds=("all",))
    check(first, theirs(nnunet_prediction, lowres, case, tta=tta, folds=("all",)), agreement)
    second = load_model(cascade).predict(read_channels(case), device="cpu", tta=tta, previous_stage=first.labels)
    check(second, theirs(nnunet_prediction, cascade, case, tta=tta, previous_stage=first_theirs.parent), agreement)


@pytest.mark.parametrize("tta", [False, True], ids=["no_tta", "tta"])
def test_two_channels(nnunet_model, hippo_test_cases, nnunet_prediction, agreement, tmp_path_factory, tta):
    """A model nnU-Net trained on two channels: the image (z-score) and a smoothed copy (rescaled to 0..1)."""
    import nnunet_reference as ref
    model_dir = nnunet_model("hippo3d_2channels")
    image = hippo_test_cases[0][0]
    case = [image, ref.write_second_channel(image, tmp_path_factory.mktemp("two_channels") / "smoothed.nii.gz")]
    check(ours(model_dir, case, tta=tta), theirs(nnunet_prediction, model_dir, case, tta=tta), agreement)


def confident_share(probabilities_file) -> float:
    """Share of voxels whose most likely class has a softmax above 0.9 in nnU-Net's exported probabilities."""
    return float(np.mean(np.load(probabilities_file)["probabilities"].max(0) > 0.9))


def test_trained_multiclass_ct(nnunet_model, ct_test_cases, nnunet_prediction, agreement):
    """Four foreground classes, anisotropic CT, separate z, TTA: on a model trained for 400 iterations."""
    model_dir = nnunet_model("ct_aniso_trained")
    files = nnunet_prediction(model_dir, ct_test_cases, tta=True, save_probabilities=True)
    for case, labels_file, probabilities in zip(ct_test_cases, files, files[len(ct_test_cases):]):
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_file)))
        score = check(ours(model_dir, case, tta=True), reference, agreement)
        share = confident_share(probabilities)
        print(f"ct_aniso_trained {case[0].name}: agreement {score:.6f}, nnU-Net confident (>0.9) on {share:.3f}, "
              f"classes {np.bincount(reference.ravel(), minlength=5) / reference.size}")
        # background and at least three of the four classes (it reaches 0, 1, 2 and 4 on both; vessels stay absent)
        assert len(np.unique(reference)) >= 4 and share > CT_CONFIDENT


def test_trained_residual_encoder_unet(nnunet_model, hippo_test_cases, nnunet_prediction, agreement, shared_data):
    model_dir = nnunet_model("hippo3d_resenc_trained")
    files = nnunet_prediction(model_dir, hippo_test_cases, tta=True, save_probabilities=True)
    model = load_model(model_dir)
    for case, labels_file, probabilities in zip(hippo_test_cases, files, files[len(hippo_test_cases):]):
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_file)))
        score = check(model.predict(read_channels(case), device="cpu", tta=True), reference, agreement)
        truth = read_volume(shared_data / "hippocampus" / "train" / "labels" / case[0].name).array
        dice, share = dice_per_label(reference, truth, model.labels), confident_share(probabilities)
        print(f"hippo3d_resenc_trained {case[0].name}: agreement {score:.6f}, nnU-Net confident (>0.9) on "
              f"{share:.3f}, nnU-Net Dice {dice}")
        assert share > RESENC_CONFIDENT and np.mean(list(dice.values())) > RESENC_DICE, (share, dice)
