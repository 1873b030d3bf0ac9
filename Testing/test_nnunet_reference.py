"""Self-test of the nnU-Net reference: every kind of model folder is genuine (nnunetv2 builds it and
nnunetv2 predicts with it), and each kind has the property it exists for."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

import nnunet_reference as ref

KIND_FIXTURES = [f"{kind}_model" for kind in ref.KINDS]


def read_labels(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def max_label(model_dir) -> int:
    labels = json.loads((model_dir / "dataset.json").read_text())["labels"]
    return max(v if isinstance(v, int) else max(v) for v in labels.values())


@pytest.mark.parametrize("model_fixture", KIND_FIXTURES)
def test_model_folder_has_nnunet_layout(model_fixture, request):
    model_dir = request.getfixturevalue(model_fixture)
    kind = ref.KINDS[model_fixture[:-len("_model")]]
    assert model_dir.name == f"nnUNetTrainer__{kind.plans_identifier}__{kind.configuration}"
    assert model_dir.parent.name == ref.DATASETS[kind.dataset].name
    for name in ("dataset.json", "plans.json", "dataset_fingerprint.json"):
        assert (model_dir / name).is_file(), name
    for fold in kind.folds:
        for checkpoint in ("checkpoint_final.pth", "checkpoint_best.pth"):
            assert (model_dir / f"fold_{fold}" / checkpoint).is_file()


def test_tiny_plans_give_several_tiles(hippo3d_model, hippo_test_cases):
    configuration = json.loads((hippo3d_model / "plans.json").read_text())["configurations"]["3d_fullres"]
    assert configuration["architecture"]["arch_kwargs"]["features_per_stage"] == [8, 16, 32, 64]
    for case in hippo_test_cases:  # 1 mm iso and no transpose: the image shape is the network's input shape
        shape = read_labels(case[0]).shape
        assert sum(s > p for p, s in zip(configuration["patch_size"], shape)) >= 2  # >= 2 x 2 tiles


@pytest.mark.parametrize("model_fixture", KIND_FIXTURES)
def test_nnunet_predicts_each_kind(model_fixture, request, nnunet_prediction, hippo_test_cases, ct_test_cases):
    model_dir = request.getfixturevalue(model_fixture)
    # one hippocampus case (the same request as other tests make, so the prediction is shared), both CT cases
    cases = ct_test_cases if model_fixture.startswith("ct") else hippo_test_cases[:1]
    outputs = nnunet_prediction(model_dir, cases, tta=False)
    assert len(outputs) == len(cases)
    for output, case in zip(outputs, cases):
        labels = read_labels(output)
        assert labels.shape == read_labels(case[0]).shape
        assert 0 <= labels.min() and labels.max() <= max_label(model_dir)


def test_two_folds_have_different_weights(hippo3d_2folds_model, hippo3d_model):
    import torch

    def weights(model_dir, fold):
        return torch.load(model_dir / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu",
                          weights_only=False)["network_weights"]
    fold0, fold1 = weights(hippo3d_2folds_model, 0), weights(hippo3d_2folds_model, 1)
    first_conv = next(k for k in fold0 if k.endswith("weight"))
    assert not torch.equal(fold0[first_conv], fold1[first_conv])
    assert torch.equal(fold0[first_conv], weights(hippo3d_model, 0)[first_conv])  # fold 0 is hippo3d's


def test_checkpoints_are_real_nnunet_training_checkpoints(hippo3d_model):
    import torch
    checkpoint = torch.load(hippo3d_model / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                            weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    assert checkpoint["init_args"]["configuration"] == "3d_fullres"
    assert tuple(checkpoint["inference_allowed_mirroring_axes"]) == (0, 1, 2)
    assert len(checkpoint["logging"]["train_losses"]) == 1  # one short epoch of nnU-Net's own loop


def test_ct_aniso_resamples_with_separate_z(ct_aniso_model, ct_test_cases):
    for case in ct_test_cases:
        decision = ref.nnunet_resampling_decision(ct_aniso_model, case)
        assert decision["target_spacing"] == list(ref.CT_TARGET_SPACING)
        assert decision["preprocessing"] == {"separate_z": True, "axis": 0}
        assert decision["export"] == {"separate_z": True, "axis": 0}


def test_ct_aniso_plans_are_anisotropic_ct(ct_aniso_model):
    configuration = json.loads((ct_aniso_model / "plans.json").read_text())["configurations"]["3d_fullres"]
    assert configuration["normalization_schemes"] == ["CTNormalization"]
    assert configuration["spacing"] == list(ref.CT_TARGET_SPACING)
    assert [1, 3, 3] in configuration["architecture"]["arch_kwargs"]["kernel_sizes"]


def test_regions_kind_declares_regions(hippo3d_regions_model):
    dataset = json.loads((hippo3d_regions_model / "dataset.json").read_text())
    assert dataset["labels"]["hippocampus"] == [1, 2] and dataset["regions_class_order"] == [1, 2]


def test_oldplans_kind_has_no_architecture_block(hippo3d_oldplans_model):
    plans = json.loads((hippo3d_oldplans_model / "plans.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    assert "architecture" not in configuration and configuration["UNet_class_name"] == "PlainConvUNet"
    assert "foreground_intensity_properties_by_modality" in plans


def test_oldplans_predict_like_the_new_plans(hippo3d_oldplans_model, hippo3d_model, nnunet_prediction,
                                             hippo_test_cases, agreement):
    # Same checkpoint, plans in the old format: nnU-Net's conversion must rebuild the same network.
    old = nnunet_prediction(hippo3d_oldplans_model, hippo_test_cases[:1], tta=False)
    new = nnunet_prediction(hippo3d_model, hippo_test_cases[:1], tta=False)
    assert agreement(old[0], new[0]) == 1.0


def test_dataset_folder_with_configuration_picks_the_trained_model(hippo3d_model, hippo2d_model,
                                                                   hippo3d_resenc_model, nnunet_prediction,
                                                                   hippo_test_cases, agreement):
    # hippo3d, hippo2d and hippo3d_resenc are trained from one dataset, as nnUNetv2_train would: one
    # results folder, one fingerprint; "3d_fullres" picks nnU-Net's default plans (nnUNetPlans).
    assert hippo3d_model.parent == hippo2d_model.parent == hippo3d_resenc_model.parent
    by_folder = nnunet_prediction(hippo2d_model, hippo_test_cases[:1], tta=False)
    by_configuration = nnunet_prediction(hippo2d_model.parent, hippo_test_cases[:1], tta=False,
                                         configuration="2d")
    assert agreement(by_folder[0], by_configuration[0]) == 1.0


def test_postprocessing_asks_for_largest_components(hippo3d_postprocessing_model):
    crossval = hippo3d_postprocessing_model / "crossval_results_folds_0"
    assert (crossval / "postprocessing.pkl").is_file()
    postprocessing = json.loads((crossval / "postprocessing.json").read_text())
    assert postprocessing["postprocessing_fns"] == ["remove_all_but_largest_component_from_segmentation"] * 3
    assert [k["labels_or_regions"] for k in postprocessing["postprocessing_kwargs"]] == [[1, 2], 1, 2]


def test_tta_and_probabilities_are_written(hippo3d_model, nnunet_prediction, hippo_test_cases):
    outputs = nnunet_prediction(hippo3d_model, hippo_test_cases[:1], save_probabilities=True)  # TTA is default
    labels, probabilities = read_labels(outputs[0]), np.load(outputs[1])["probabilities"]
    assert probabilities.shape == (3, *labels.shape)
    assert np.array_equal(np.argmax(probabilities, 0), labels)


def test_postprocessing_is_applied_with_nnunets_function(hippo3d_postprocessing_model, nnunet_prediction,
                                                         hippo_test_cases):
    from scipy import ndimage
    pkl = hippo3d_postprocessing_model / "crossval_results_folds_0" / "postprocessing.pkl"
    raw = read_labels(nnunet_prediction(hippo3d_postprocessing_model, hippo_test_cases[:1], tta=False)[0])
    post = read_labels(nnunet_prediction(hippo3d_postprocessing_model, hippo_test_cases[:1], tta=False,
                                         postprocessing=pkl)[0])
    assert np.all((post == raw) | (post == 0)) and not np.array_equal(post, raw)
    for label in (1, 2):  # nnU-Net keeps the largest 26-connected component (and any tied with it)
        components, n = ndimage.label(post == label, structure=np.ones((3, 3, 3)))
        assert len(set(np.bincount(components.ravel())[1:])) <= 1


def test_nrrd_input_predicts_like_nifti(hippo3d_model, nnunet_prediction, hippo_test_cases, agreement, tmp_path):
    nifti = hippo_test_cases[0][0]
    nrrd = tmp_path / "same_case_0000.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(nrrd))
    outputs = nnunet_prediction(hippo3d_model, [[nifti], [nrrd]], tta=False)
    assert agreement(outputs[0], outputs[1]) == 1.0
