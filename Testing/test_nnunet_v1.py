"""nnU-Net v1 model folders (models/nnunet_v1.py, nnunet_v1_weights.py; inference/v1_model.py predicts): parity
with nnU-Net v1's own predictions, the weight mapping of Generic_UNet, the restricted unpickler, and v1 folders
and zips in the models home.

The model folders and reference predictions come from PyPI `nnunet` 1.7.1 itself (nnunet_v1_reference.py: v1's
planner, preprocessing, nnUNetTrainerV2 training a few iterations, predict_cases), on real hippocampus MR cases
from ../shared/data that no model trained on. Built once per $SEGMENTMBTFE_REFERENCE_CACHE (else per session).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import uuid
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import nnunet_v1_reference as v1ref
from SegmentMBTFELib import load_model, read_volume
from SegmentMBTFELib.errors import ModelError
from SegmentMBTFELib.models import home as models_home
from SegmentMBTFELib.models.nnunet_v1 import V1ModelFolder, generic_unet_architecture, read_pickle
from SegmentMBTFELib.models.nnunet_v1_weights import v2_weights
from SegmentMBTFELib.networks import build_network

pytestmark = pytest.mark.timeout(900)
PARITY = 0.9999


@pytest.fixture(scope="module")
def v1_root(shared_data, nnunet_models_root) -> Path:
    if not v1ref.v1_installed():
        pytest.skip("nnunet (v1) is not installed")
    return nnunet_models_root / "nnunet_v1"


@pytest.fixture(scope="module")
def v1_model(v1_root, shared_data):
    def build(kind: str) -> Path:
        return v1ref.make_v1_model_folder(v1_root, kind=kind, data_dir=shared_data)
    return build


@pytest.fixture(scope="module")
def test_cases(shared_data) -> list:
    """Two real cases no model trained on (the last two in sorted order)."""
    images = shared_data / "hippocampus" / "train" / "images"
    return sorted(images.glob("hippocampus_*.nii.gz"))[-2:]


def v1_predict(v1_root, model_dir, cases, name, **options) -> list:
    """nnU-Net v1's predictions, kept beside the cached models (rerun only when the request or model changes)."""
    return v1ref.predict_with_nnunet_v1(model_dir, [[c] for c in cases], v1_root / "predictions" / name, **options)


def ours(model, case, tta, previous=None) -> np.ndarray:
    prediction = model.predict([read_volume(case)], device="cpu", tta=tta,
                               previous_stage=read_volume(previous) if previous else None)
    return prediction.labels.array


def labels_of(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.parametrize("kind,tta", [("hippo3d", True), ("hippo3d", False), ("hippo2d", True), ("hippo2d", False),
                                      ("hippo3d_lowres", True)])
def test_parity_with_nnunet_v1(v1_root, v1_model, test_cases, kind, tta):
    model_dir = v1_model(kind)
    cases = test_cases[:1] if tta else test_cases   # TTA costs 4-8 passes: one case is enough for its weighting
    expected = v1_predict(v1_root, model_dir, cases, f"{kind}_tta{int(tta)}", tta=tta)
    model = load_model(model_dir)
    assert model.mirror_axes == ((0, 1) if kind == "hippo2d" else (0, 1, 2))
    for case, reference in zip(cases, expected):
        reference = labels_of(reference)
        assert len(np.unique(reference)) == 3, "the reference should hold background and both labels"
        agreement = float(np.mean(ours(model, case, tta) == reference))
        assert agreement >= PARITY, f"{kind} tta={tta} {case.name}: {agreement:.6f}"


def test_cascade_parity_on_v1_lowres_prediction(v1_root, v1_model, test_cases):
    """3d_cascade_fullres refines v1's own 3d_lowres prediction (an `all/` fold), as nnU-Net v1 predicts it."""
    lowres = v1_predict(v1_root, v1_model("hippo3d_lowres"), test_cases, "hippo3d_lowres_tta1", tta=True)
    cascade_dir = v1_model("hippo3d_cascade")
    expected = v1_predict(v1_root, cascade_dir, test_cases, "hippo3d_cascade_tta0", tta=False, previous_stage=lowres)
    model = load_model(cascade_dir)
    assert model.configuration.previous_stage == "3d_lowres" and model.folds == ["0"]
    for case, previous, reference in zip(test_cases, lowres, expected):
        agreement = float(np.mean(ours(model, case, False, previous) == labels_of(reference)))
        assert agreement >= PARITY, f"cascade {case.name}: {agreement:.6f}"


def test_postprocessing_json_as_v1_applies_it(v1_root, v1_model, test_cases):
    """v1's postprocessing.json (largest component of the joint foreground, then per label, with a minimum
    object size for label 2) is applied after export, as v1's predict_cases applies it to the written file."""
    source = v1_model("hippo3d")
    model_dir = v1_root / "variants" / "postprocessing" / source.relative_to(v1_root)
    if not model_dir.is_dir():
        shutil.copytree(source, model_dir)
    recipe = {"for_which_classes": [[1, 2], 1, 2], "min_valid_object_sizes": "{(1, 2): 1000000.0, 1: 20.0, 2: 30.0}"}
    (model_dir / "postprocessing.json").write_text(json.dumps(recipe))
    expected = v1_predict(v1_root, model_dir, test_cases[:1], "postprocessing_tta0", tta=False)
    without = v1_predict(v1_root, source, test_cases, "hippo3d_tta0", tta=False)   # the same model without it
    prediction = load_model(model_dir).predict([read_volume(test_cases[0])], device="cpu", tta=False)
    assert prediction.settings["postprocessing"] is True
    reference = labels_of(expected[0])
    assert np.count_nonzero(labels_of(without[0]) != reference) > 100, "postprocessing should change this prediction"
    assert float(np.mean(prediction.labels.array == reference)) >= PARITY


@pytest.mark.parametrize("patch,pools,kernels", [
    ([8, 32, 32], [[1, 2, 2], [2, 2, 2], [1, 2, 2]], [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]]),
    ([32, 24], [[2, 2], [2, 2]], [[3, 3], [3, 3], [3, 3]]),
])
def test_generic_unet_maps_onto_plain_conv_unet(v1_root, patch, pools, kernels):
    """v1's own Generic_UNet, with anisotropic kernels where v1's decoder kernels differ from the skip stage's,
    gives the same output as our PlainConvUNet holding its mapped weights."""
    where = v1_root / "generic_unet" / f"{len(patch)}d.pt"
    where.parent.mkdir(parents=True, exist_ok=True)
    saved = torch.load(v1ref.generic_unet_outputs(where, patch_size=patch,
                                                  pool_op_kernel_sizes=pools, conv_kernel_sizes=kernels),
                       weights_only=True)
    architecture = generic_unet_architecture({"base_num_features": 8, "conv_per_stage": 2}, patch, pools, kernels)
    network = build_network(architecture, 1, 3)
    weights = v2_weights(saved["state_dict"], network)
    assert set(weights) == set(network.state_dict())
    network.load_state_dict(weights)
    with torch.no_grad():
        output = network.eval()(saved["input"])
    torch.testing.assert_close(output, saved["output"], rtol=1e-4, atol=1e-4)


# -- the restricted unpickler ------------------------------------------------------------------------------------

class RunsCode:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_pickle_that_runs_code_is_refused_naming_it(tmp_path):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    path = tmp_path / "plans.pkl"
    path.write_bytes(pickle.dumps({"plans_per_stage": {0: RunsCode(f"touch {marker}")}}))
    with pytest.raises(ModelError) as error:
        read_pickle(path)
    assert str(error.value) == (f"Refusing to load {path}: it contains posix.system, which is not plain data; only "
                                "dicts, lists, numbers, text and numpy arrays are read from nnU-Net v1 files.")
    assert not marker.exists()


@pytest.mark.parametrize("payload", [lambda: __import__("builtins").eval, lambda: OrderedDict.fromkeys,
                                     lambda: torch.zeros(2)])
def test_only_plain_types_are_built(tmp_path, payload):
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps({"x": payload()}))
    with pytest.raises(ModelError, match=r"^Refusing to load .*: it contains \S+, which is not plain data"):
        read_pickle(path)


def test_truncated_pickle_is_refused(tmp_path):
    path = tmp_path / "plans.pkl"
    data = pickle.dumps({"a": np.arange(100.0), "b": [1, 2, 3]})
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"^Cannot read .*plans.pkl: the file is truncated or corrupt \("):
        read_pickle(path)


def test_numpy_1_and_numpy_2_names_read_alike(tmp_path):
    """Pickles made under numpy 1 name numpy.core.multiarray, under numpy 2 numpy._core.multiarray; protocol 0
    (text) also spells bytes through _codecs.encode. All are read to the same values."""
    value = {"spacing": np.array([1.0, 2.5, 3.0]), "n": np.int64(7), "sd": np.float64(0.5),
             "schemes": OrderedDict([(0, "nonCT")]), "flag": np.False_, "shape": (3, 4)}
    text = pickle.dumps(value, protocol=0)
    for module in (b"numpy._core.multiarray", b"numpy.core.multiarray"):
        other = text.replace(b"numpy._core.multiarray", module).replace(b"numpy.core.multiarray", module)
        (tmp_path / "p.pkl").write_bytes(other)
        read = read_pickle(tmp_path / "p.pkl")
        assert read.keys() == value.keys() and isinstance(read["schemes"], OrderedDict)
        np.testing.assert_array_equal(read["spacing"], value["spacing"])
        assert read["n"] == 7 and read["sd"] == 0.5 and read["shape"] == (3, 4)


def test_real_v1_files_hold_only_plain_data(v1_model):
    folder = V1ModelFolder(v1_model("hippo3d"))
    assert folder.plans["normalization_schemes"] == OrderedDict([(0, "nonCT")])
    assert read_pickle(folder.path / "fold_0" / "model_final_checkpoint.model.pkl")["name"] == "nnUNetTrainerV2"


def test_a_v1_folder_names_its_own_files_in_every_message(v1_model, tmp_path):
    """v1 and v2 folders share one base (models/trained_folder.py); v1's file names, its `all` fold folder and its
    plans reach what the base says: the note on a fold left out, the checkpoint refused, the axes order checked."""
    trained = tmp_path / "Task901_Hippocampus" / "nnUNetTrainerV2__nnUNetPlansv2.1"
    shutil.copytree(v1_model("hippo3d"), trained)
    (trained / "fold_3").mkdir()      # training stopped before its first checkpoint
    (trained / "all").mkdir()
    folder = V1ModelFolder(trained)
    assert folder.fold_folders() == ["0", "3", "all"] and folder.available_folds() == ["0"]
    assert folder.checkpoint_path("all", "best") == trained / "all" / "model_best.model"
    assert load_model(trained).notes == [
        f"{trained.name}/fold_3 has no model_final_checkpoint.model and was left out.",
        f"{trained.name}/all has no model_final_checkpoint.model and was left out."]
    for name in ("../fold_0/model_final_checkpoint.model", "checkpoint_final.pth"):
        with pytest.raises(ModelError, match=r"Unknown checkpoint .* for an nnU-Net v1 model: use final, best or a "
                                             r"file name ending in \.model\."):
            folder.checkpoint_filename(name)
    folder.plans["transpose_forward"] = [np.int64(0), np.int64(0), np.int64(2)]
    with pytest.raises(ModelError, match=r"The v1 plans: 'transpose_forward' must be an order of the axes 0, 1, 2"):
        folder.transpose_forward


# -- models home ---------------------------------------------------------------------------------------------------

def v1_zip(root: Path, path: Path) -> Path:
    """RESULTS_FOLDER/nnUNet packed as v1's exported model zips are: nnUNet/<configuration>/TaskXXX/<trainer>/..."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for f in sorted(root.rglob("*")):
            if f.is_file() and "pred_next_stage" not in f.parts:
                archive.write(f, f"nnUNet/{f.relative_to(root).as_posix()}")
    return path


def test_models_add_and_list_a_v1_zip_and_folder(v1_root, v1_model, tmp_path, monkeypatch):
    monkeypatch.setenv("SEGMENTMBTFE_HOME", str(tmp_path / "home"))
    for kind in ("hippo3d", "hippo2d", "hippo3d_cascade"):
        v1_model(kind)
    added = models_home.add(v1_zip(v1_root / "RESULTS_FOLDER" / "nnUNet", tmp_path / "v1.zip"))
    assert added.problem == "" and added.name == "Task901_Hippocampus"
    assert added.channels == ["MRI"] and added.labels == ["label 1", "label 2"]
    assert {c.name: c.folds for c in added.configurations} == {
        "2d": ["0"], "3d_cascade_fullres": ["0"], "3d_fullres": ["0"], "3d_lowres": ["all"]}
    folder = models_home.add(v1_model("hippo2d"), name="v1_2d")
    assert [(c.name, c.network) for c in folder.configurations] == [("2d", "Generic_UNet (nnU-Net v1)")]
    listed = {m.name: m for m in models_home.installed()}
    assert {"Task901_Hippocampus", "v1_2d"} <= set(listed)
    unpacked = load_model(listed["Task901_Hippocampus"].path, configuration="3d_fullres")
    original = load_model(v1_model("hippo3d"))
    assert unpacked.checksum() == original.checksum()


def test_plans_beside_and_best_checkpoint(v1_model, tmp_path):
    """A trained folder whose plans are the planner's `*_plans_3D.pkl` (no plans.pkl), and model_best.model
    (`--checkpoint best`), load the same network and weights."""
    copy = tmp_path / "3d_fullres" / "Task901_Hippocampus" / "nnUNetTrainerV2__nnUNetPlansv2.1"
    shutil.copytree(v1_model("hippo3d"), copy)
    (copy / "plans.pkl").rename(copy / "nnUNetPlansv2.1_plans_3D.pkl")
    for ending in ("model", "model.pkl"):
        shutil.copyfile(copy / "fold_0" / f"model_final_checkpoint.{ending}", copy / "fold_0" / f"model_best.{ending}")
    original = load_model(v1_model("hippo3d"))
    for checkpoint in ("final", "best"):
        model = load_model(tmp_path, checkpoint=checkpoint)
        assert model.configuration.settings == original.configuration.settings and model.folds == ["0"]
        for key, value in original.weights[0].items():
            assert torch.equal(model.weights[0][key], value), key


def test_uncertainty_of_v1_probabilities(v1_model, test_cases):
    """The entropy map is that of v1's averaged probabilities (no resampling at 1 mm: the same grid), and TTA's
    passes disagree somewhere but never by more than the entropy itself."""
    model = load_model(v1_model("hippo3d"))
    prediction = model.predict([read_volume(test_cases[0])], device="cpu", tta=True, probabilities=True,
                               uncertainty=True)
    p = prediction.probabilities.astype(np.float64)
    expected = -(p * np.log(np.clip(p, 1e-30, None))).sum(0) / np.log(3)
    entropy, disagreement = (prediction.uncertainty[k].array for k in ("entropy", "disagreement"))
    np.testing.assert_allclose(entropy, expected, atol=1e-4)
    assert np.all(disagreement >= 0) and np.all(disagreement <= entropy + 1e-6) and disagreement.max() > 0.01
    assert np.array_equal(prediction.labels.array, p.argmax(0))


def test_fine_tuning_a_v1_model_is_refused_in_one_sentence(v1_model, test_cases, tmp_path, monkeypatch, capsys):
    """v1 folders have no versions: fine-tuning says so (not 'no trained model'), writes nothing, and the
    folder still segments."""
    from SegmentMBTFELib import cli
    monkeypatch.setenv("SEGMENTMBTFE_HOME", str(tmp_path / "home"))
    model = v1_model("hippo3d")
    image, labels = tmp_path / "case_0000.nii.gz", tmp_path / "case_labels.nii.gz"
    volume = sitk.ReadImage(str(test_cases[0]))
    sitk.WriteImage(volume, str(image))
    sitk.WriteImage(sitk.Cast(volume > 100, sitk.sitkUInt8), str(labels))
    code = cli.main(["finetune", "-q", "-m", str(model), "-i", str(image), "-l", str(labels), "--iterations", "1"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_ERROR and err.count("\n") == 1, err
    assert "is an nnU-Net v1 model, which can segment but not be fine-tuned or versioned here" in err
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("version.json"))
