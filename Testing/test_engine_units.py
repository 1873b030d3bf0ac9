"""Unit checks of the engine's building blocks against the nnU-Net v2 code they re-implement.

Where a reference exists (nnunetv2 and its dependencies acvl_utils, batchgenerators, dynamic_network_architectures)
the engine's function is run side by side with it on the same inputs; those tests skip with "nnunetv2 is not
installed" where it is absent. The model folders come from `model_factory` (no nnunetv2 needed).
"""
from __future__ import annotations

import copy
import importlib.util
import itertools
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_fill_holes, gaussian_filter, map_coordinates

import model_factory
from SegmentMBTFELib import Cancelled, InputError, ModelError, load_model
from SegmentMBTFELib.inference.devices import choose_device
from SegmentMBTFELib.inference.postprocessing import keep_largest_component
from SegmentMBTFELib.inference.preprocessing import bounding_box, normalize
from SegmentMBTFELib.inference.resampling import compute_new_shape, nearest_indices, resample, separate_z_axis
from SegmentMBTFELib.inference.sliding_window import gaussian_weights, pad_to_patch, tile_starts
from SegmentMBTFELib.models.checkpoint import load_checkpoint
from SegmentMBTFELib.models.folder import Configuration, Labels, ModelFolder, resolve_configuration
from SegmentMBTFELib.networks import build_network
from SegmentMBTFELib.progress import Progress
from SegmentMBTFELib.volume import Volume

NNUNET_MISSING = "nnunetv2 is not installed"
needs_nnunet = pytest.mark.skipif(importlib.util.find_spec("nnunetv2") is None, reason=NNUNET_MISSING)


def smooth(shape, seed=0, scale=5.0):
    return (gaussian_filter(np.random.default_rng(seed).normal(size=shape), 1.5) * scale * 10).astype(np.float32)


# --------------------------------------------------------------------------------------------- sliding window

def test_tile_starts_known_example():
    assert tile_starts([110], [64], 0.5) == [[0, 23, 46]]  # nnU-Net's own example
    assert tile_starts([64, 65, 200], [64, 64, 64], 0.5) == [[0], [0, 1], [0, 27, 54, 82, 109, 136]]


@needs_nnunet
def test_tile_starts_match_nnunet():
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
    checked = 0
    for patch in (16, 20, 33, 64, 128):
        for size in range(patch, patch + 260, 3):
            for step in (0.1, 0.25, 1 / 3, 0.5, 0.7, 0.75, 1.0):
                assert tile_starts([size], [patch], step) == \
                    compute_steps_for_sliding_window((size,), (patch,), step), (size, patch, step)
                checked += 1
    # Several axes at once, as the predictor calls it.
    for image, patch in (((110, 200, 64), (64, 96, 64)), ((35, 51, 35), (16, 16, 16)), ((300, 300), (256, 224))):
        assert tile_starts(image, patch, 0.5) == compute_steps_for_sliding_window(image, patch, 0.5)
    assert checked > 2000


@needs_nnunet
@pytest.mark.parametrize("patch", [(16, 16, 16), (15, 17, 19), (32, 40, 32), (64, 64, 64), (64, 32), (33, 65)])
def test_gaussian_weights_bitwise_equal_to_nnunet(patch):
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian
    expected = compute_gaussian(tuple(patch), sigma_scale=1. / 8, value_scaling_factor=10, dtype=torch.float16,
                                device=torch.device("cpu"))
    ours = gaussian_weights(patch, torch.device("cpu"))
    assert ours.dtype == torch.float16 and ours.shape == expected.shape
    assert torch.equal(ours, expected)
    assert float(ours.max()) == 10.0 and float(ours.min()) > 0


@needs_nnunet
@pytest.mark.parametrize("shape,patch", [
    ((1, 10, 20, 30), (16, 16, 16)),     # every axis too small in part
    ((2, 16, 16, 16), (16, 16, 16)),     # exactly the patch: no padding
    ((1, 40, 9, 17), (32, 16, 16)),      # odd amounts: more padding above
    ((3, 5, 7, 64), (16, 16, 16)),
    ((2, 7, 30, 10), (32, 16)),          # a 2D patch over a 3D volume pads the last two axes only
    ((1, 3, 8), (16, 16)),
])
def test_pad_to_patch_matches_pad_nd_image(shape, patch):
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    data = torch.from_numpy(np.random.default_rng(1).normal(size=shape).astype(np.float32))
    expected, slicer = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
    padded, undo = pad_to_patch(data, patch)
    assert padded.shape == expected.shape
    assert torch.equal(padded, expected)
    assert torch.equal(padded[undo], data) and torch.equal(expected[slicer], data)
    norm = [s.indices(n) for s, n in zip(undo, padded.shape)]
    assert norm == [s.indices(n) for s, n in zip(slicer, expected.shape)]


# --------------------------------------------------------------------------------------------- resampling

# (current spacing, target spacing): isotropic, separate z from the current spacing on axis 0 and on axis 2,
# separate z from the target spacing, upsampling a thick axis, and ties (no separate z).
SPACINGS = [((1, 1, 1), (0.8, 1.3, 1.1)), ((3.0, 0.8, 0.8), (1.5, 1.0, 1.0)), ((0.7, 0.7, 3.5), (1, 1, 2.5)),
            ((1, 1, 1), (4.0, 1, 1)), ((2.5, 1, 1), (1, 1, 1)), ((3.5, 3.5, 1.0), (1.0, 1.0, 1.0))]


def _reference_resample(data, new_shape, current, target, order, force_separate_z=None, dtype_out=None):
    from nnunetv2.preprocessing.resampling.default_resampling import (determine_do_sep_z_and_axis,
                                                                       resample_data_or_seg)
    do_separate_z, axis = determine_do_sep_z_and_axis(force_separate_z, current, target)
    return resample_data_or_seg(data, new_shape, False, axis, order, do_separate_z, order_z=0, dtype_out=dtype_out)


@needs_nnunet
@pytest.mark.parametrize("current,target", SPACINGS)
def test_resample_order3_bitwise_equal_to_nnunet(current, target):
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
    data = smooth((2, 10, 26, 22), seed=2)
    new_shape = compute_new_shape(data.shape[1:], current, target)
    assert new_shape != list(data.shape[1:])
    expected = resample_data_or_seg_to_shape(data, new_shape, current, target, is_seg=False, order=3, order_z=0,
                                             force_separate_z=None)
    ours = resample(data, new_shape, current, target, order=3, order_z=0, force_separate_z=None)
    assert ours.dtype == expected.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)


@needs_nnunet
@pytest.mark.parametrize("force", [True, False])
def test_resample_forced_separate_z_bitwise(force):
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
    data = smooth((1, 8, 20, 18), seed=3)
    current, target = (2.0, 1.0, 1.0), (1.0, 0.9, 0.8)
    new_shape = compute_new_shape(data.shape[1:], current, target)
    expected = resample_data_or_seg_to_shape(data, new_shape, current, target, is_seg=False, order=3, order_z=0,
                                             force_separate_z=force)
    np.testing.assert_array_equal(resample(data, new_shape, current, target, order=3, force_separate_z=force),
                                  expected)


@needs_nnunet
@pytest.mark.parametrize("current,target", SPACINGS)
def test_resample_order1_matches_nnunet(current, target):
    """The export path (logits, order 1): linear resampling in float32 within 1e-5 of nnU-Net's float64."""
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
    logits = smooth((3, 10, 26, 22), seed=4)
    new_shape = compute_new_shape(logits.shape[1:], current, target)
    expected = resample_data_or_seg_to_shape(logits, new_shape, current, target, is_seg=False, order=1, order_z=0,
                                             force_separate_z=None)
    ours = resample(logits, new_shape, current, target, order=1, order_z=0)
    assert ours.shape == expected.shape and ours.dtype == np.float32
    scale = np.abs(expected).max()
    assert np.abs(ours.astype(np.float64) - expected).max() <= 1e-5 * scale

    # fp16 logits, as the export gets them. Computed values agree within 1e-5 before the cast back to fp16 ...
    half = logits.astype(np.float16)
    expected = _reference_resample(half, new_shape, current, target, 1, dtype_out=np.float64)
    ours = resample(half, new_shape, current, target, order=1, out_dtype=np.float32)
    assert np.abs(ours.astype(np.float64) - expected).max() <= 1e-5 * np.abs(expected).max()
    # ... and stored as fp16 (as nnU-Net stores them) they differ, rarely, by that 1e-5 plus one fp16 step.
    expected = resample_data_or_seg_to_shape(half, new_shape, current, target, is_seg=False, order=1, order_z=0,
                                             force_separate_z=None)
    ours = resample(half, new_shape, current, target, order=1)
    assert ours.dtype == expected.dtype == np.float16
    differ = ours != expected
    assert differ.mean() < 0.03
    step = np.maximum(np.spacing(np.abs(expected)), np.spacing(np.abs(ours))).astype(np.float32)  # fp16 steps
    difference = np.abs(ours.astype(np.float32) - expected.astype(np.float32))
    assert np.all(difference <= step * 1.0001 + 1e-5 * scale)
    # The labels (argmax over the heads) are those of nnU-Net but for exact fp16 near-ties.
    assert (ours.argmax(0) == expected.argmax(0)).mean() > 0.995


@pytest.mark.parametrize("classes", [3, 26, 300])
def test_streamed_argmax_is_numpys_argmax_ties_included(classes):
    """The export's class-by-class argmax (torch, fp16) gives numpy's argmax of all classes at once: ties to
    the lowest class, label maps wider than uint8 beyond 255 classes."""
    from SegmentMBTFELib.inference.export import _streamed_argmax
    rng = np.random.default_rng(classes)
    logits = rng.normal(size=(classes, 6, 7, 8)).astype(np.float16)
    logits[1:, :2] = logits[0, :2]  # exact ties everywhere in two slices
    labelmap = _streamed_argmax(iter(list(logits)))
    assert labelmap.dtype == (np.uint8 if classes <= 256 else np.uint16)
    assert np.array_equal(labelmap, logits.argmax(0))
    assert np.all(labelmap[:2] == 0)


@pytest.mark.parametrize("threads", [2, 3])
def test_spline_zoom_in_threads_is_scipys_bit_for_bit(threads):
    """The image's cubic resampling, split across threads (spline_zoom.py, scipy's private zoom_shift), gives
    scipy.ndimage.zoom's very numbers: up, down, unchanged axes, 2D and 3D, spline orders 2 to 5."""
    from scipy.ndimage import zoom
    from SegmentMBTFELib.inference import spline_zoom
    rng = np.random.default_rng(threads)
    cases = [((30, 41, 27), (45, 20, 27)), ((7, 64, 64), (7, 100, 33)), ((64, 64), (97, 31)),
             ((3, 50, 50), (2, 25, 80)), ((40, 36), (40, 36))]  # the last: a slice of separate z, in-plane unchanged
    for shape, new_shape in cases:
        x = rng.normal(size=shape).astype(np.float32)
        for order in (2, 3, 5):
            expected = zoom(x, [n / o for n, o in zip(new_shape, shape)], order=order, mode="nearest", grid_mode=True,
                            output=np.float64)
            if shape != new_shape:
                assert np.array_equal(spline_zoom._zoom_in_parts(x, new_shape, order, threads), expected)
            assert np.array_equal(spline_zoom.zoom(x, new_shape, order, threads), expected)


def test_resample_leaves_same_shape_alone():
    data = smooth((1, 6, 7, 8))
    assert resample(data, [6, 7, 8], (1, 1, 1), (2, 2, 2)) is data


def test_nearest_indices_match_map_coordinates_order0():
    for old in range(1, 48):
        for new in range(1, 97):
            coordinates = (old / new) * (np.arange(new) + 0.5) - 0.5
            expected = map_coordinates(np.arange(old, dtype=float), [coordinates], order=0, mode="nearest")
            np.testing.assert_array_equal(nearest_indices(old, new), expected.astype(np.int64), err_msg=f"{old}->{new}")


@needs_nnunet
def test_separate_z_axis_matches_nnunet():
    from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis
    values = (0.5, 0.8, 1.0, 1.5, 2.4, 3.0, 3.0001, 5.0)
    spacings = [tuple(s) for s in itertools.product(values, repeat=3)]
    rng = np.random.default_rng(5)
    pairs = [(spacings[i], spacings[j]) for i, j in rng.integers(0, len(spacings), size=(3000, 2))]
    # Ties for the largest spacing (two or three axes), exactly 3x (not above the threshold), and just above.
    pairs += [((3, 3, 1), (1, 1, 1)), ((1, 1, 1), (4, 4, 1)), ((2, 2, 2), (1, 1, 1)), ((3, 1, 1), (1, 1, 1)),
              ((3.0001, 1, 1), (1, 1, 1)), ((1, 1, 1), (1, 3.01, 1)), ((0.24, 1.25, 1.25), (1, 1, 1))]
    kinds = set()
    for current, target in pairs:
        for force in (None, True, False):
            do_separate, axis = determine_do_sep_z_and_axis(force, current, target)
            expected = int(axis) if do_separate else None
            assert separate_z_axis(current, target, force) == expected, (current, target, force)
            kinds.add(expected)
    assert kinds == {None, 0, 1, 2}


# ------------------------------------------------------------------------------------------ preprocessing

def _nnunet_normalizer(scheme, use_mask, properties):
    from nnunetv2.preprocessing.normalization import default_normalization_schemes as schemes
    return getattr(schemes, scheme)(use_mask_for_norm=use_mask, intensityproperties=properties)


@needs_nnunet
@pytest.mark.parametrize("scheme,use_mask", [
    ("ZScoreNormalization", False), ("ZScoreNormalization", True), ("CTNormalization", False),
    ("CTNormalization", True), ("RescaleTo01Normalization", False), ("RGBTo01Normalization", False),
    ("NoNormalization", False)])
def test_normalize_matches_nnunet(scheme, use_mask):
    rng = np.random.default_rng(6)
    if scheme == "RGBTo01Normalization":
        image = rng.integers(0, 256, size=(2, 12, 14, 10)).astype(np.float32)
    else:
        image = (rng.normal(size=(2, 12, 14, 10)) * 300 + 40).astype(np.float32)
    image[:, :3] = 0  # a zero border, so the non-zero mask matters
    nonzero = binary_fill_holes(np.any(image != 0, axis=0))
    seg = np.where(nonzero, 0, -1).astype(np.int8)  # nnU-Net's crop_to_nonzero seg
    properties = {"0": {"mean": 35.5, "std": 250.25, "percentile_00_5": -500.0, "percentile_99_5": 600.0},
                  "1": {"mean": -20.0, "std": 0.0, "percentile_00_5": -100.0, "percentile_99_5": 100.0}}
    configuration = Configuration("3d_fullres", {"normalization_schemes": [scheme, scheme],
                                                 "use_mask_for_norm": [use_mask, use_mask]})
    ours = image.copy()
    normalize(ours, nonzero, configuration, properties)
    for c in range(image.shape[0]):
        expected = _nnunet_normalizer(scheme, use_mask, properties[str(c)]).run(image[c].copy(), seg)
        assert expected.dtype == np.float32
        np.testing.assert_array_equal(ours[c], expected)


def test_normalize_refuses_unknown_scheme():
    with pytest.raises(ModelError, match="MyNormalization"):
        normalize(np.ones((1, 2, 2, 2), np.float32), np.ones((2, 2, 2), bool),
                  Configuration("x", {"normalization_schemes": ["MyNormalization"]}), {})


@needs_nnunet
def test_bounding_box_matches_acvl_utils():
    from acvl_utils.cropping_and_padding.bounding_boxes import get_bbox_from_mask
    rng = np.random.default_rng(7)
    masks = [np.zeros((5, 6, 7), bool), np.ones((5, 6, 7), bool)]
    single = np.zeros((9, 8, 7), bool)
    single[4, 0, 6] = True
    masks.append(single)
    for _ in range(40):
        shape = tuple(rng.integers(1, 20, size=3))
        mask = np.zeros(shape, bool)
        lo = [rng.integers(0, s) for s in shape]
        hi = [rng.integers(l, s) + 1 for l, s in zip(lo, shape)]
        mask[tuple(slice(l, h) for l, h in zip(lo, hi))] = True
        mask &= rng.random(shape) < 0.7
        masks.append(mask)
    for mask in masks:
        assert bounding_box(mask) == [[int(a), int(b)] for a, b in get_bbox_from_mask(mask)]


# ------------------------------------------------------------------------------------------ postprocessing

@needs_nnunet
def test_keep_largest_component_matches_nnunet():
    from nnunetv2.postprocessing.remove_connected_components import \
        remove_all_but_largest_component_from_segmentation as reference
    rng = np.random.default_rng(8)
    cases = [(gaussian_filter(rng.normal(size=(20, 22, 18)), 1.2) * 8).round().clip(0, 3).astype(np.uint8)
             for _ in range(6)]
    tie = np.zeros((10, 10, 10), np.uint8)  # two components of equal size: both are kept
    tie[1:3, 1:3, 1:3] = 1
    tie[6:8, 6:8, 6:8] = 1
    tie[5, 0, 0] = 1
    diagonal = np.zeros((6, 6, 6), np.uint8)  # touching only at a corner: one component (full connectivity)
    diagonal[1, 1, 1] = diagonal[2, 2, 2] = 2
    diagonal[4, 4, 4] = 2
    flat = (gaussian_filter(rng.normal(size=(40, 40)), 1.5) * 6).round().clip(0, 2).astype(np.uint8)
    cases += [tie, diagonal, flat]
    checked = 0
    for labels in cases:
        for selection in (1, 2, [1, 2], (1, 2), [(1, 2)], [(1, 2), 3], [3]):
            expected = reference(labels, selection, background_label=0)
            ours = keep_largest_component(labels, selection, 0)
            np.testing.assert_array_equal(ours, expected, err_msg=str(selection))
            checked += int(not np.array_equal(expected, labels))
    assert checked > 10  # the cases really do remove components
    assert np.array_equal(keep_largest_component(tie, 1), np.where(np.arange(1000).reshape(10, 10, 10) == 500, 0, tie))


# ------------------------------------------------------------------------------------------- model folder

def _old_style_configuration(network: str, dim: int) -> dict:
    configuration = model_factory.configuration_dict(dim, 1, patch_size=[32, 48, 40][-dim:])
    del configuration["architecture"]
    n = 4
    configuration.update({
        "UNet_class_name": network, "UNet_base_num_features": 32, "unet_max_num_features": 64 if dim == 3 else 96,
        "n_conv_per_stage_encoder": [1, 2, 2, 2] if network == "ResidualEncoderUNet" else [2] * n,
        "n_conv_per_stage_decoder": [1] * (n - 1) if network == "ResidualEncoderUNet" else [2] * (n - 1),
        "num_pool_per_axis": [3] * dim,
        "pool_op_kernel_sizes": [[1] * dim] + [[1] + [2] * (dim - 1)] + [[2] * dim] * (n - 2),
        "conv_kernel_sizes": [[1] + [3] * (dim - 1)] + [[3] * dim] * (n - 1),
    })
    return configuration


@needs_nnunet
@pytest.mark.parametrize("network", ["PlainConvUNet", "ResidualEncoderUNet"])
@pytest.mark.parametrize("dim", [2, 3])
def test_old_plans_converted_as_configuration_manager(network, dim):
    import warnings
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
    old = _old_style_configuration(network, dim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ConfigurationManager(copy.deepcopy(old)).configuration["architecture"]
    name = "2d" if dim == 2 else "3d_fullres"
    ours = resolve_configuration({"configurations": {name: old}}, name).architecture
    assert ours["network_class_name"].rsplit(".", 1)[-1] == expected["network_class_name"].rsplit(".", 1)[-1]
    assert ours["arch_kwargs"] == expected["arch_kwargs"]
    assert list(ours["_kw_requires_import"]) == list(expected["_kw_requires_import"])


def test_configuration_inheritance():
    plans = {"configurations": {
        "3d_fullres": model_factory.configuration_dict(3),
        "3d_lowres": {**model_factory.configuration_dict(3, spacing=[2.0, 2.0, 2.0]), "next_stage": "3d_cascade"},
        "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres", "batch_size": 7}}}
    cascade = resolve_configuration(plans, "3d_cascade_fullres")
    assert cascade.previous_stage == "3d_lowres" and cascade["batch_size"] == 7
    assert cascade.spacing == [1.0, 1.0, 1.0] and cascade.patch_size == [16, 16, 16]
    with pytest.raises(ModelError, match="not in plans.json"):
        resolve_configuration(plans, "2d")


# ----------------------------------------------------------------------------------------------- networks

def _architectures():
    plain3d = model_factory.architecture(3, features=(8, 16, 32, 32))
    plain3d["arch_kwargs"].update(kernel_sizes=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]],
                                  strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]])
    plain2d = model_factory.architecture(2, features=(8, 16, 32))
    plain2d["arch_kwargs"].update(strides=[[1, 1], [2, 1], [2, 2]])
    resenc3d = model_factory.architecture(3, features=(8, 16, 24, 32))
    kwargs = resenc3d["arch_kwargs"]
    kwargs["n_blocks_per_stage"] = [1, 2, 2, 2]
    del kwargs["n_conv_per_stage"]
    kwargs.update(n_conv_per_stage_decoder=[1, 1, 1], strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
                  kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]])
    resenc3d["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    resenc2d = copy.deepcopy(resenc3d)
    kwargs = resenc2d["arch_kwargs"]
    kwargs.update(conv_op="torch.nn.modules.conv.Conv2d", norm_op="torch.nn.modules.instancenorm.InstanceNorm2d",
                  kernel_sizes=[[3, 3]] * 4, strides=[[1, 1], [2, 2], [2, 1], [2, 2]])
    return {"plain3d_aniso": (plain3d, (2, 2, 8, 16, 16)), "plain2d": (plain2d, (2, 1, 16, 12)),
            "resenc3d_aniso": (resenc3d, (2, 1, 8, 16, 16)), "resenc2d": (resenc2d, (2, 3, 16, 16))}


@needs_nnunet
@pytest.mark.parametrize("name", list(_architectures()))
def test_build_network_matches_dynamic_network_architectures(name):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    architecture, input_shape = _architectures()[name]
    n_in, n_out = input_shape[1], 3
    for deep_supervision in (False, True):
        torch.manual_seed(0)
        reference = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                           architecture["_kw_requires_import"], n_in, n_out, allow_init=True,
                                           deep_supervision=deep_supervision).eval()
        ours = build_network(architecture, n_in, n_out, deep_supervision=deep_supervision).eval()
        expected_state = reference.state_dict()
        assert list(ours.state_dict()) == list(expected_state)
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
            {k: tuple(v.shape) for k, v in expected_state.items()}
        ours.load_state_dict(expected_state, strict=True)
        x = torch.from_numpy(np.random.default_rng(9).normal(size=input_shape).astype(np.float32))
        with torch.no_grad():
            expected, got = reference(x), ours(x)
        if deep_supervision:
            assert len(got) == len(expected)
            for a, b in zip(got, expected):
                assert torch.equal(a, b)
        else:
            assert got.shape == (input_shape[0], n_out, *input_shape[2:])
            assert torch.equal(got, expected)


def test_build_network_refuses_unknown_classes():
    architecture = model_factory.architecture(3)
    architecture["network_class_name"] = "my_package.MyUNet"
    with pytest.raises(ModelError, match="Unsupported network"):
        build_network(architecture, 1, 2)
    architecture = model_factory.architecture(3)
    architecture["arch_kwargs"]["nonlin"] = "os.system"
    with pytest.raises(ModelError, match="os.system"):
        build_network(architecture, 1, 2)


# --------------------------------------------------------------------------------------------- checkpoints

def _checkpoint(tmp_path: Path, **changes) -> Path:
    configuration = model_factory.configuration_dict(3)
    weights = model_factory.network_weights(configuration, 1, 3, seed=1)
    plans = model_factory.plans_dict("Dataset999_Tiny")
    dataset = model_factory.dataset_dict(["MRI"], model_factory.DEFAULT_LABELS)
    checkpoint = model_factory.checkpoint_dict(weights, plans, dataset, "3d_fullres")
    checkpoint.update(changes)
    path = tmp_path / "checkpoint_final.pth"
    torch.save(checkpoint, path)
    return path


def test_load_checkpoint_with_numpy_scalars(tmp_path):
    path = _checkpoint(tmp_path)
    with pytest.raises(Exception, match="numpy"):  # plain weights_only loading refuses nnU-Net checkpoints
        torch.load(path, weights_only=True)
    loaded = load_checkpoint(path)
    original = torch.load(path, weights_only=False)
    assert list(loaded["network_weights"]) == list(original["network_weights"])
    for key, value in original["network_weights"].items():
        assert torch.equal(loaded["network_weights"][key], value)
    assert type(loaded["_best_ema"]) is np.float64 and loaded["_best_ema"] == original["_best_ema"]
    assert type(loaded["logging"]["train_losses"][0]) is np.float32
    assert loaded["logging"] == original["logging"]
    assert loaded["inference_allowed_mirroring_axes"] == (0, 1, 2)
    assert loaded["init_args"]["configuration"] == "3d_fullres"
    assert loaded["init_args"]["device"] == torch.device("cpu")


def test_load_checkpoint_written_under_numpy1(tmp_path):
    """numpy 1.x pickles scalars as numpy.core.multiarray.scalar; rewrite our file's pickle that way."""
    import zipfile
    path = _checkpoint(tmp_path)
    old = tmp_path / "numpy1.pth"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            target.writestr(info, data)
    loaded = load_checkpoint(old)
    assert loaded["_best_ema"] == np.float64(0.1)


def test_load_checkpoint_strips_wrapper_prefixes(tmp_path):
    configuration = model_factory.configuration_dict(3)
    weights = model_factory.network_weights(configuration, 1, 3)
    wrapped = {f"module._orig_mod.{k}": v for k, v in weights.items()}
    loaded = load_checkpoint(_checkpoint(tmp_path, network_weights=wrapped))
    assert list(loaded["network_weights"]) == list(weights)


def test_load_checkpoint_damaged_files(tmp_path):
    path = _checkpoint(tmp_path)
    data = path.read_bytes()
    rng = np.random.default_rng(10)
    blobs = [data[: len(data) // 2], data[:100], b"", rng.bytes(10)] + [rng.bytes(5000) for _ in range(25)]
    for blob in blobs:
        path.write_bytes(blob)
        with pytest.raises(ModelError, match="truncated or corrupt"):
            load_checkpoint(path)
    with pytest.raises(ModelError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ModelError, match="network_weights"):
        load_checkpoint(path)


class _Payload:
    def __reduce__(self):
        return print, ("this must never run",)


def test_load_checkpoint_refuses_code(tmp_path, capsys):
    path = _checkpoint(tmp_path, logging=_Payload())
    with pytest.raises(ModelError, match=r"Refusing.*\(print\)"):
        load_checkpoint(path)
    assert "this must never run" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- labels

LABEL_CASES = [
    ({"background": 0, "anterior": 1, "posterior": 2}, None),
    ({"background": 0, "a": 1, "b": 2, "c": 3, "ignore": 4}, None),
    ({"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3}, [1, 2, 3]),
    ({"background": 0, "enhancing": [3], "core": [2, 3], "whole": [1, 2, 3]}, [3, 2, 1]),
    ({"background": 0, "edema": [1, 2], "ignore": 3}, [1]),
]


@needs_nnunet
@pytest.mark.parametrize("label_dict,order", LABEL_CASES)
def test_labels_match_label_manager(label_dict, order):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    expected = LabelManager(label_dict, order)
    ours = Labels({"labels": label_dict, **({"regions_class_order": order} if order else {})})
    assert ours.has_regions == expected.has_regions
    assert ours.all_labels == [int(v) for v in expected.all_labels]
    assert ours.foreground_labels == [int(v) for v in expected.foreground_labels]
    assert ours.num_heads == expected.num_segmentation_heads
    assert ours.ignore_label == expected.ignore_label
    if expected.has_regions:
        regions = [tuple(int(x) for x in r) if isinstance(r, tuple) else (int(r),) for r in expected.foreground_regions]
        assert [r for _, r in ours.regions] == regions
        assert [v for v, _ in ours.output_segments()] == list(order)


def test_labels_without_regions_class_order_are_refused():
    with pytest.raises(ModelError, match="regions_class_order"):
        Labels({"labels": {"background": 0, "whole": [1, 2], "core": 2}})


# ------------------------------------------------------------------------------------ progress and devices

def test_progress_spans():
    calls = []
    root = Progress(lambda fraction, stage: calls.append((round(fraction, 9), stage)))
    root.report(0.5, "half")
    child = root.span(0.2, 0.6)
    child.report(0.0, "child start")
    child.report(0.5, "child middle")
    child.report(1.0, "child end")
    grandchild = child.span(0.5, 1.0)
    grandchild.report(0.5, "grandchild")
    root.report(1.5, "clamped")
    assert calls == [(0.5, "half"), (0.2, "child start"), (0.4, "child middle"), (0.6, "child end"),
                     (0.5, "grandchild"), (1.0, "clamped")]
    Progress().report(0.3, "no callback is fine")


def test_progress_cancel():
    cancel = threading.Event()
    calls = []
    root = Progress(lambda f, s: calls.append(s), cancel)
    child = root.span(0.5, 1.0)
    child.report(0.1, "before")
    cancel.set()
    with pytest.raises(Cancelled):
        child.report(0.2, "after")
    with pytest.raises(Cancelled):
        root.check_cancel()
    assert calls == ["before"]
    assert "nothing was written" in str(Cancelled())


def test_choose_device():
    assert choose_device("cpu") == torch.device("cpu")
    assert choose_device("CPU") == torch.device("cpu")
    with pytest.raises(InputError, match="Unknown device"):
        choose_device("gpu-please")
    if torch.cuda.is_available() or (torch.backends.mps.is_available()):
        pytest.skip("this machine has a GPU; the CPU-only expectations do not apply")
    assert choose_device("auto") == torch.device("cpu")
    assert choose_device(None) == torch.device("cpu")
    with pytest.raises(InputError, match="CUDA"):
        choose_device("cuda")
    with pytest.raises(InputError, match="CUDA"):
        choose_device("cuda:1")


# ------------------------------------------------------------------------------------ model folders

def test_a_checkpoint_is_named_never_given_as_a_path(tmp_path):
    """--checkpoint names a file inside each fold folder (models/trained_folder.py, shared with v1's folders)."""
    folder = ModelFolder(model_factory.make_model_folder(tmp_path, folds=(0, 1)))
    (folder.path / "fold_all").mkdir()
    assert folder.fold_folders() == ["0", "1", "all"] and folder.available_folds() == ["0", "1"]
    assert folder.checkpoint_path(1, "best") == folder.path / "fold_1" / "checkpoint_best.pth"
    assert folder.checkpoint_filename("checkpoint_latest.pth") == "checkpoint_latest.pth"
    for name in ("../../elsewhere.pth", str(tmp_path / "x.pth"), "fold_0\\x.pth", "model_final_checkpoint.model"):
        with pytest.raises(ModelError, match=r"Unknown checkpoint .*: use final, best or a file name ending in "
                                             r"\.pth\.$"):
            folder.checkpoint_filename(name)


# ------------------------------------------------------------------------------------ the model factory itself

def test_factory_folders_load_and_predict(tmp_path):
    volume = Volume(smooth((12, 20, 18), seed=11) + 100, spacing=(0.9, 1.1, 1.3))
    for kwargs, heads in (({}, 3), ({"configuration": "2d"}, 3),
                          ({"labels": {"background": 0, "whole": [1, 2], "core": 2}, "regions_class_order": [1, 2],
                            "dataset_name": "Dataset997_Regions"}, 2)):
        folder = model_factory.make_model_folder(tmp_path / str(len(kwargs)), **kwargs)
        model = load_model(folder)
        assert model.labels.num_heads == heads
        assert model.mirror_axes == tuple(range(len(model.configuration.patch_size)))
        prediction = model.predict([volume], tta=False, probabilities=True)
        assert prediction.labels.array.shape == volume.array.shape
        assert prediction.probabilities.shape == (heads, *volume.array.shape)
        assert prediction.labels.spacing == volume.spacing


@needs_nnunet
def test_nnunet_accepts_factory_folder_and_agrees(tmp_path):
    """nnU-Net's own predictor loads the factory's folder and predicts the labels the engine predicts."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    folder = model_factory.make_model_folder(tmp_path, spacing=(1.0, 1.0, 1.0))
    image = smooth((20, 24, 22), seed=12) + 100
    image[:, :2] = 0  # something to crop
    spacing_xyz = (1.0, 1.2, 0.9)  # resampled to the model's 1 mm
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    expected = predictor.predict_single_npy_array(image[None], {"spacing": list(spacing_xyz[::-1])}, None, None, False)
    ours = load_model(folder).predict([Volume(image, spacing=spacing_xyz)], tta=False)
    np.testing.assert_array_equal(ours.labels.array, expected)
    assert len(np.unique(expected)) > 1


def test_numpy_2_checkpoints_load_under_numpy_1_26(monkeypatch):
    """numpy 1.26 (the numpy of Slicer 5.6 to 5.8) has a `numpy._core` module without `multiarray`, while the
    shipped models were saved under numpy 2 (their pickles name numpy._core.multiarray.scalar): loading must
    find the scalar type under numpy 1's name then. Checked for real in a numpy 1.26 environment; here the
    module layout is reproduced."""
    import types
    from SegmentMBTFELib.models.shipped import default_model
    monkeypatch.setattr(np, "_core", types.ModuleType("numpy._core"), raising=False)
    checkpoint = load_checkpoint(default_model() / "fold_0" / "checkpoint_final.pth")
    assert checkpoint["network_weights"]
