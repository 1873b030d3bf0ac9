"""Write small, valid nnU-Net v2 model folders without nnunetv2 (for tests that must run where it is absent).

    folder = make_model_folder(tmp_path)                     # 1 channel, background/anterior/posterior, 3d_fullres
    folder = make_model_folder(tmp_path, channels=("T1", "T2"), configuration="2d", with_2d=True, folds=(0, 1))

The folder looks like what nnU-Net's trainer leaves on disk:
`DatasetNNN_Name/<Trainer>__nnUNetPlans__<configuration>/{dataset.json, plans.json, fold_N/checkpoint_final.pth}`.
plans.json is in the current (>= v2.3) format with an `architecture` block for a tiny PlainConvUNet (3 stages,
4/8/16 features); the checkpoint is a `torch.save`d dict shaped like `nnUNetTrainer.save_checkpoint`'s:
`network_weights` (the state dict of the engine's own `networks.build_network`, seeded), `optimizer_state`,
`grad_scaler_state`, `logging` and `_best_ema` holding numpy scalars (which is what makes plain
`torch.load(weights_only=True)` refuse nnU-Net checkpoints), `current_epoch`, `init_args` (plans, configuration,
fold, dataset_json, device), `trainer_name` and `inference_allowed_mirroring_axes`.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

DEFAULT_LABELS = {"background": 0, "anterior": 1, "posterior": 2}
DEFAULT_CHANNELS = ("MRI",)
PLANS_NAME = "nnUNetPlans"

# nnU-Net's default resampling (ExperimentPlanner.determine_resampling / determine_segmentation_softmax_export_fn).
_RESAMPLING = {
    "resampling_fn_data": "resample_data_or_seg_to_shape",
    "resampling_fn_seg": "resample_data_or_seg_to_shape",
    "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
    "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
    "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
    "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
}


def architecture(dim: int = 3, features=(4, 8, 16), kernel: int = 3) -> dict:
    """The `architecture` block of a tiny PlainConvUNet (stride 1, then 2 per further stage)."""
    n = len(features)
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": list(features),
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": [[kernel] * dim for _ in range(n)],
            "strides": [[1] * dim] + [[2] * dim for _ in range(n - 1)],
            "n_conv_per_stage": [2] * n,
            "n_conv_per_stage_decoder": [2] * (n - 1),
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def configuration_dict(dim: int = 3, n_channels: int = 1, patch_size=None, spacing=None,
                       normalization: str = "ZScoreNormalization", features=(4, 8, 16)) -> dict:
    patch_size = list(patch_size or ([16] * dim))
    spacing = list(spacing or ([1.0] * dim))
    return {
        "data_identifier": f"{PLANS_NAME}_{'3d_fullres' if dim == 3 else '2d'}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": patch_size,
        "median_image_size_in_voxels": [max(p, 32) for p in patch_size],
        "spacing": spacing,
        "normalization_schemes": [normalization] * n_channels,
        "use_mask_for_norm": [False] * n_channels,
        **copy.deepcopy(_RESAMPLING),
        "architecture": architecture(dim, features),
        "batch_dice": False,
    }


def plans_dict(dataset_name: str, n_channels: int = 1, with_3d: bool = True, with_2d: bool = False,
               patch_size=None, spacing=None, normalization: str = "ZScoreNormalization") -> dict:
    configurations = {}
    if with_2d:
        configurations["2d"] = configuration_dict(2, n_channels, patch_size and list(patch_size)[-2:],
                                                  spacing and list(spacing)[-2:], normalization)
    if with_3d:
        configurations["3d_fullres"] = configuration_dict(3, n_channels, patch_size, spacing, normalization)
    stats = {"max": 1000.0, "mean": 100.0, "median": 90.0, "min": 0.0, "percentile_00_5": 1.0,
             "percentile_99_5": 400.0, "std": 50.0}
    return {
        "dataset_name": dataset_name,
        "plans_name": PLANS_NAME,
        "original_median_spacing_after_transp": list(spacing or [1.0, 1.0, 1.0]),
        "original_median_shape_after_transp": [36, 50, 35],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": configurations,
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {str(c): dict(stats) for c in range(n_channels)},
    }


def dataset_dict(channels: Sequence[str], labels: Dict[str, Union[int, list]],
                 regions_class_order: Optional[Sequence[int]] = None) -> dict:
    dataset = {"channel_names": {str(i): name for i, name in enumerate(channels)},
               "labels": dict(labels), "numTraining": 6, "file_ending": ".nii.gz"}
    if regions_class_order is not None:
        dataset["regions_class_order"] = list(regions_class_order)
    return dataset


def num_heads(labels: dict) -> int:
    """Output channels as nnU-Net counts them: all labels, or the foreground regions."""
    named = {k: v for k, v in labels.items() if k != "ignore"}
    if any(isinstance(v, (list, tuple)) and len(v) > 1 for v in named.values()):
        return sum(1 for v in named.values() if set(v if isinstance(v, (list, tuple)) else [v]) != {0})
    return len({int(x) for v in named.values() for x in (v if isinstance(v, (list, tuple)) else [v])})


def network_weights(configuration: dict, n_channels: int, n_heads: int, seed: int = 0) -> dict:
    """The state dict of the engine's own network for `configuration`, with seeded random weights."""
    from SegmentMBTFELib.networks import build_network
    torch.manual_seed(seed)
    network = build_network(configuration["architecture"], n_channels, n_heads)
    with torch.no_grad():  # make the (otherwise 1/0) instance-norm affine parameters non-trivial too
        for name, parameter in network.named_parameters():
            if ".norm." in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return network.state_dict()


def checkpoint_dict(weights: dict, plans: dict, dataset: dict, configuration: str, fold: Union[int, str] = 0,
                    trainer: str = "nnUNetTrainer", mirror_axes="default") -> dict:
    """A dict shaped like nnUNetTrainer.save_checkpoint's, numpy scalars included."""
    if mirror_axes == "default":
        mirror_axes = tuple(range(len(plans["configurations"][configuration]["patch_size"])))
    epochs = 2
    logging = {
        "mean_fg_dice": [np.float64(0.1 * (e + 1)) for e in range(epochs)],
        "ema_fg_dice": [np.float64(0.05 * (e + 1)) for e in range(epochs)],
        "dice_per_class_or_region": [[np.float64(0.1), np.float64(0.2)] for _ in range(epochs)],
        "train_losses": [np.float32(-0.1 * e) for e in range(epochs)],
        "val_losses": [np.float32(-0.05 * e) for e in range(epochs)],
        "lrs": [0.01, 0.009],
        "epoch_start_timestamps": [1.7e9 + e for e in range(epochs)],
        "epoch_end_timestamps": [1.7e9 + e + 0.5 for e in range(epochs)],
    }
    return {
        "network_weights": weights,
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.009, "momentum": 0.99, "nesterov": True,
                                                           "weight_decay": 3e-05, "params": [0]}]},
        "grad_scaler_state": None,
        "logging": logging,
        "_best_ema": np.float64(0.1),
        "current_epoch": epochs,
        "init_args": {"plans": copy.deepcopy(plans), "configuration": configuration, "fold": fold,
                      "dataset_json": copy.deepcopy(dataset), "device": torch.device("cpu")},
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": mirror_axes,
    }


def make_model_folder(root, channels: Sequence[str] = DEFAULT_CHANNELS, labels: Optional[dict] = None,
                      configuration: str = "3d_fullres", with_2d: bool = False, folds: Sequence = (0,),
                      seed: int = 0, patch_size=None, spacing=None, regions_class_order=None,
                      trainer: str = "nnUNetTrainer", normalization: str = "ZScoreNormalization",
                      dataset_name: str = "Dataset999_Tiny", mirror_axes="default") -> Path:
    """Write `root/<dataset_name>/<trainer>__nnUNetPlans__<configuration>/` and return that folder.

    `configuration` ("3d_fullres" or "2d") is the trained one, whose weights the folds hold; `with_2d` adds a
    2d configuration to plans.json beside 3d_fullres. Each fold's weights use `seed + fold index`.
    """
    labels = dict(labels or DEFAULT_LABELS)
    plans = plans_dict(dataset_name, len(channels), with_3d=True,
                       with_2d=with_2d or configuration == "2d", patch_size=patch_size, spacing=spacing,
                       normalization=normalization)
    if configuration not in plans["configurations"]:
        raise ValueError(f"unknown configuration {configuration}")
    dataset = dataset_dict(channels, labels, regions_class_order)
    folder = Path(root) / dataset_name / f"{trainer}__{PLANS_NAME}__{configuration}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    for i, fold in enumerate(folds):
        weights = network_weights(plans["configurations"][configuration], len(channels), num_heads(labels), seed + i)
        fold_dir = folder / f"fold_{fold}"
        fold_dir.mkdir(exist_ok=True)
        torch.save(checkpoint_dict(weights, plans, dataset, configuration, fold, trainer, mirror_axes),
                   fold_dir / "checkpoint_final.pth")
    return folder


def add_configuration(dataset_folder, trained, configuration_name, settings, n_in, labels=None):
    """Write a `<trainer>__nnUNetPlans__<configuration>` folder holding the given configuration's weights
    (its plans also go into `trained`): how nnU-Net's planner adds 3d_lowres and 3d_cascade_fullres."""
    labels = labels or DEFAULT_LABELS
    plans = json.loads((trained / "plans.json").read_text())
    plans["configurations"][configuration_name] = settings
    dataset = json.loads((trained / "dataset.json").read_text())
    for folder in (trained, dataset_folder / f"nnUNetTrainer__nnUNetPlans__{configuration_name}"):
        folder.mkdir(exist_ok=True)
        (folder / "plans.json").write_text(json.dumps(plans))
        (folder / "dataset.json").write_text(json.dumps(dataset))
    resolved = dict(plans["configurations"]["3d_fullres"], **{k: v for k, v in settings.items()
                                                            if k != "inherits_from"})
    weights = network_weights(resolved, n_in, num_heads(labels), seed=3)
    fold = dataset_folder / f"nnUNetTrainer__nnUNetPlans__{configuration_name}" / "fold_0"
    fold.mkdir()
    torch.save(checkpoint_dict(weights, plans, dataset, configuration_name, mirror_axes=(0, 1, 2)),
               fold / "checkpoint_final.pth")
    return fold.parent


def make_cascade(root) -> Path:
    """A dataset folder with 3d_fullres, 3d_lowres (at 2 mm) and 3d_cascade_fullres (refining 3d_lowres)."""
    fullres = make_model_folder(root)
    dataset_folder = fullres.parent
    lowres_settings = dict(json.loads((fullres / "plans.json").read_text())["configurations"]["3d_fullres"],
                           spacing=[2.0, 2.0, 2.0], next_stage="3d_cascade_fullres")
    lowres = add_configuration(dataset_folder, fullres, "3d_lowres", lowres_settings, n_in=1)
    add_configuration(dataset_folder, lowres, "3d_cascade_fullres",
                      {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}, n_in=1 + 2)
    return dataset_folder


def perturbed_version(model_path: Path, shift: float):
    """A version written by ModelVersions.add from real perturbed weights (no training: fast)."""
    from SegmentMBTFELib import load_model
    from SegmentMBTFELib.models.versions import ModelVersions, resolve
    from SegmentMBTFELib.training.finetune import FinetuneResult, FinetuneSettings
    folder, _ = resolve(model_path)
    loaded = load_model(folder)
    weights = {f: {k: v + shift if v.is_floating_point() else v for k, v in w.items()}
               for f, w in zip(loaded.folds, loaded.weights)}
    result = FinetuneResult(weights, FinetuneSettings(iterations=1), 1, 0.1, {f: [0.5] for f in loaded.folds}, [])
    return ModelVersions(folder).add(loaded, result)
