"""A tiny, untrained nnU-Net v2 model folder and a test image, for the module's self-test inside Slicer.

The self-test must run on any Slicer without downloads, so it writes a real model folder in nnU-Net v2's
format (dataset.json, plans.json, fold_0/checkpoint_final.pth) whose network has random, seeded weights.
Its output means nothing anatomically, but it exercises the very path a trained model takes, and the
test compares the segments in the scene with the engine's own prediction voxel by voxel.
"""
import json
from pathlib import Path

import numpy as np

LABELS = {"background": 0, "anterior": 1, "posterior": 2}
PATCH = [16, 16, 16]


def plans() -> dict:
    conv = "torch.nn.modules.conv.Conv3d"
    return {
        "dataset_name": "Dataset999_SelfTestHippocampus", "plans_name": "nnUNetPlans",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "foreground_intensity_properties_per_channel": {"0": {"mean": 100.0, "std": 50.0, "percentile_00_5": 0.0,
                                                              "percentile_99_5": 255.0}},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": PATCH, "spacing": [1.0, 1.0, 1.0],
            "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {"n_stages": 2, "features_per_stage": [4, 8], "conv_op": conv,
                                "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]],
                                "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1], "conv_bias": True,
                                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                                "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                                "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": False}},
    }


def write_tiny_model(root, seed: int = 0) -> Path:
    """Write the model folder under `root` and return the trained-configuration folder."""
    import torch
    from SegmentMBTFELib.networks import build_network

    folder = Path(root) / "Dataset999_SelfTestHippocampus" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    dataset = {"channel_names": {"0": "MRI"}, "labels": LABELS, "numTraining": 0, "file_ending": ".nii.gz",
               "name": "Dataset999_SelfTestHippocampus"}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1))
    (folder / "plans.json").write_text(json.dumps(plans(), indent=1))
    torch.manual_seed(seed)
    architecture = plans()["configurations"]["3d_fullres"]["architecture"]
    network = build_network(architecture, 1, len(LABELS))
    checkpoint = {"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                  "inference_allowed_mirroring_axes": (0, 1, 2)}
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder


def test_image(shape=(24, 30, 26)) -> np.ndarray:
    """A bright ellipsoid with a darker core on a noisy background, (k, j, i) float32."""
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(k ** 2 + (j / 0.8) ** 2 + (i / 0.6) ** 2)
    image = np.where(radius < 0.7, 200.0, 40.0) - np.where(radius < 0.3, 80.0, 0.0)
    return (image + np.random.default_rng(0).normal(0, 10, shape)).astype(np.float32)


def test_labels(shape=(24, 30, 26)) -> np.ndarray:
    """Corrected labels for test_image: the darker core 'anterior' (1), the rest of the ellipsoid 'posterior' (2)."""
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(k ** 2 + (j / 0.8) ** 2 + (i / 0.6) ** 2)
    return np.where(radius < 0.3, 1, np.where(radius < 0.7, 2, 0)).astype(np.uint8)
