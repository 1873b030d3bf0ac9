"""The nnU-Net v1 reference (PyPI `nnunet` 1.7.1) for the v1 parity tests: model folders and predictions made by
nnU-Net v1's own code, never by ours.

Model folders: v1's cropping (`crop`), `DatasetAnalyzer`, `ExperimentPlanner3D_v21` / `ExperimentPlanner2D_v21`,
their preprocessing, and v1's own `nnUNetTrainerV2` (`nnUNetTrainerV2CascadeFullRes` for the cascade) training
for one epoch of a few iterations on the CPU (v1's trainer guards every `.cuda()` with
`torch.cuda.is_available()`, so it trains on the CPU as it is). Its `run_training` writes
`model_final_checkpoint.model` + `.model.pkl` (and `model_best.*`) through v1's `save_checkpoint`, and the
trainer copies the plans to `plans.pkl`. Our interventions are the ones a user could make: choosing six real
hippocampus cases from ../shared/data, and editing the written plans before preprocessing to make the network
tiny (patch, `base_num_features` 8, the topology from v1's own `get_pool_and_conv_props`), with a second,
coarser stage (2 mm) added to the 3D plans so that `3d_lowres` and `3d_cascade_fullres` exist (v1 plans a
lowres stage only for large images).

Predictions: v1's `predict_cases` on the CPU. v1 has no supported CPU path, but its prediction code only moves
tensors to CUDA `if torch.cuda.is_available()` and its `autocast` is CUDA's (off without CUDA), so it runs
unchanged; the one shim is `torch.load(..., weights_only=False)` for v1's own checkpoints (torch >= 2.6 made
weights-only loading the default, which v1 predates). Nothing changes v1's arithmetic.

v1 reads nnUNet_raw_data_base / nnUNet_preprocessed / RESULTS_FOLDER at import time, so all v1 work runs in a
subprocess of this file (`python nnunet_v1_reference.py make|predict request.json`), as nnunet_reference.py does
for v2. This side imports only the standard library.

    make_v1_model_folder(root, kind="hippo3d") -> root/RESULTS_FOLDER/nnUNet/3d_fullres/Task901_Hippocampus/
                                                  nnUNetTrainerV2__nnUNetPlansv2.1
    predict_with_nnunet_v1(model_dir, [[image.nii.gz]], out_dir, tta=True) -> [out_dir/image.nii.gz]

Kinds: hippo3d (3d_fullres: stage 1, 1 mm, patch 32x40x32), hippo2d (2d, patch 64x32), hippo3d_lowres
(3d_lowres: stage 0, 2 mm, patch 16x24x16), hippo3d_cascade (3d_cascade_fullres on hippo3d_lowres's predictions
of the training cases, written by v1's predict_next_stage).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

from build_lock import build_once

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TASK = "Task901_Hippocampus"
PLANS_IDENTIFIER = "nnUNetPlansv2.1"
HIPPO_TRAIN_COUNT = 6
# kind -> (configuration, trainer, fold). The lowres model trains fold "all" (v1's `all/` folder): its
# predict_next_stage then predicts every training case, which the cascade's fold 0 needs.
KINDS = {
    "hippo3d": ("3d_fullres", "nnUNetTrainerV2", 0),
    "hippo2d": ("2d", "nnUNetTrainerV2", 0),
    "hippo3d_lowres": ("3d_lowres", "nnUNetTrainerV2", "all"),
    "hippo3d_cascade": ("3d_cascade_fullres", "nnUNetTrainerV2CascadeFullRes", 0),
}
# Tiny stages: (spacing factor over the planned 1 mm, patch size in v1's transposed axis order)
STAGES_3D = ((2.0, (16, 24, 16)), (1.0, (32, 40, 32)))
PATCH_2D = (64, 32)
BASE_FEATURES = 8


class NnunetV1ReferenceError(RuntimeError):
    """nnU-Net v1 itself failed; the message carries the tail of its log."""


def v1_installed() -> bool:
    try:
        importlib.metadata.version("nnunet")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _version() -> str:
    digest = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:12]
    return f"{digest}-nnunet-{importlib.metadata.version('nnunet')}"


def model_dir(root: Union[str, Path], kind: str) -> Path:
    configuration, trainer, _ = KINDS[kind]
    return Path(root) / "RESULTS_FOLDER" / "nnUNet" / configuration / TASK / f"{trainer}__{PLANS_IDENTIFIER}"


def make_v1_model_folder(root: Union[str, Path], *, kind: str, train_iterations: int = 2, seed: int = 0,
                         data_dir: Union[str, Path, None] = None, timeout: float = 1200) -> Path:
    """Builds (once per root, kind and version of this file and of nnunet) a trained v1 model folder, fold 0."""
    root = Path(root).resolve()
    if kind == "hippo3d_cascade":
        make_v1_model_folder(root, kind="hippo3d_lowres", train_iterations=train_iterations, seed=seed,
                             data_dir=data_dir, timeout=timeout)
    data_dir = str(Path(data_dir or DEFAULT_DATA_DIR).resolve())
    request = {"kind": kind, "train_iterations": train_iterations, "seed": seed, "data_dir": data_dir,
               "version": _version()}
    folder = model_dir(root, kind)

    def build() -> None:
        shutil.rmtree(folder, ignore_errors=True)
        _run_worker("make", request, root, root / "logs_v1" / kind, timeout)
    build_once(root, root / "records_v1" / f"{kind}.json", request, build, folder.is_dir)
    return folder


def build_seconds(root: Union[str, Path], kind: str) -> float:
    return json.loads((Path(root).resolve() / "records_v1" / f"{kind}.json").read_text())["seconds"]


def predict_with_nnunet_v1(model: Union[str, Path], cases: Sequence[Sequence[Union[str, Path]]],
                           output_dir: Union[str, Path], *, tta: bool = True, folds=None, step_size: float = 0.5,
                           previous_stage: Optional[Sequence[Union[str, Path]]] = None,
                           timeout: float = 1200) -> list[Path]:
    """v1's predict_cases (CPU, one process for preprocessing and export) on image files; returns the label files.
    folds: None for every fold_N folder of the model (v1's own default), or ["all"] when it has only `all/`.
    previous_stage: the 3d_lowres label files, one per case, for a 3d_cascade_fullres model."""
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    if folds is None:  # v1's default, spelled out: the fold_N folders with a checkpoint, else `all`
        numbered = sorted(int(f.parent.name[5:]) for f in Path(model).glob("fold_*/model_final_checkpoint.model"))
        folds = numbered or ["all"]
    names = [Path(c[0]).name.replace("_0000.nii.gz", ".nii.gz") for c in cases]
    outputs = [output_dir / n for n in names]
    request = {"model": str(Path(model).resolve()), "cases": [[str(Path(f).resolve()) for f in c] for c in cases],
               "outputs": [str(o) for o in outputs], "tta": tta, "folds": list(folds) if folds else None,
               "step_size": step_size, "version": _version(), "weights": _identity(Path(model)),
               "previous_stage": [str(Path(p).resolve()) for p in previous_stage] if previous_stage else None}
    record = output_dir / "v1_prediction.json"
    if record.is_file() and json.loads(record.read_text()) == request and all(o.is_file() for o in outputs):
        return outputs  # the same request of the same model, predicted before (a cached output folder)
    record.unlink(missing_ok=True)
    _run_worker("predict", request, output_dir / ".nnunet_v1_env", output_dir, timeout)
    record.write_text(json.dumps(request, indent=1))
    return outputs


def _identity(model: Path) -> list:
    """What identifies the weights and recipes a prediction used: each file's name, size and modification time."""
    return sorted([str(f.relative_to(model)), f.stat().st_size, f.stat().st_mtime_ns]
                  for f in model.rglob("*") if f.is_file() and f.suffix in (".model", ".pkl", ".json"))


def generic_unet_outputs(path: Union[str, Path], *, patch_size, pool_op_kernel_sizes, conv_kernel_sizes,
                         base_num_features: int = 8, num_classes: int = 3, seed: int = 0) -> Path:
    """v1's own network as nnUNetTrainerV2.initialize_network builds it (Generic_UNet, InitWeights_He), its
    state_dict, an input and v1's eval-mode output for it (deep supervision off), saved with torch.save."""
    path = Path(path).resolve()
    request = {"path": str(path), "patch_size": list(patch_size), "pool_op_kernel_sizes": pool_op_kernel_sizes,
               "conv_kernel_sizes": conv_kernel_sizes, "base_num_features": base_num_features,
               "num_classes": num_classes, "seed": seed, "version": _version()}
    record = path.with_suffix(".json")
    if path.is_file() and record.is_file() and json.loads(record.read_text()) == request:
        return path  # made before by the same request (a cached folder)
    _run_worker("generic_unet", request, path.parent / ".nnunet_v1_env", path.parent, 300)
    record.write_text(json.dumps(request))
    return path


def _run_worker(command: str, request: dict, root: Path, log_dir: Path, timeout: float) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    request_file = log_dir / f"{command}_request.json"
    request_file.write_text(json.dumps(request, indent=1))
    env = dict(os.environ, nnUNet_raw_data_base=str(root / "nnUNet_raw_data_base"),
               nnUNet_preprocessed=str(root / "nnUNet_preprocessed"), RESULTS_FOLDER=str(root / "RESULTS_FOLDER"),
               MPLBACKEND="Agg", OMP_NUM_THREADS="1", nnUNet_def_n_proc="1", nnUNet_n_proc_DA="1")
    from nnunet_reference import run_reference_script  # standard library only, like this file
    run_reference_script(Path(__file__), command, request_file, env, log_dir, timeout, NnunetV1ReferenceError,
                         "nnunet v1")


# ----------------------------------------------------------------------------------------------------------
# Worker side: runs inside the subprocess, where importing nnunet (v1) is safe.
# ----------------------------------------------------------------------------------------------------------

def _allow_v1_checkpoints():
    """v1 predates torch's weights-only default; its own checkpoints (made here) are loaded as v1 loads them."""
    import torch
    original = torch.load

    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return original(*args, **kwargs)
    torch.load = load


def _worker_make(request: dict) -> None:
    import random
    import numpy as np
    import torch
    _ensure_dataset(Path(request["data_dir"]), request["version"])
    configuration, trainer_name, fold = KINDS[request["kind"]]
    seed = request["seed"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    _train(configuration, trainer_name, fold, request["train_iterations"])


def _ensure_dataset(data_dir: Path, version: str) -> None:
    from nnunet.paths import nnUNet_raw_data, preprocessing_output_dir
    preprocessed = Path(preprocessing_output_dir) / TASK
    marker = preprocessed / "reference_v1.json"
    identity = {"data_dir": str(data_dir), "version": version}
    if marker.is_file() and json.loads(marker.read_text()) == identity:
        return
    raw = Path(nnUNet_raw_data) / TASK
    for folder in (raw, preprocessed, Path(preprocessing_output_dir).parent / "nnUNet_cropped_data" / TASK):
        shutil.rmtree(folder, ignore_errors=True)
    _write_raw(raw, data_dir)
    _plan_and_preprocess()
    marker.write_text(json.dumps(identity))


def _write_raw(raw: Path, data_dir: Path) -> None:
    source = data_dir / "hippocampus" / "train"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    ids = sorted(p.name[:-len(".nii.gz")] for p in (source / "images").glob("hippocampus_*.nii.gz"))[:HIPPO_TRAIN_COUNT]
    for case in ids:
        shutil.copyfile(source / "images" / f"{case}.nii.gz", raw / "imagesTr" / f"{case}_0000.nii.gz")
        shutil.copyfile(source / "labels" / f"{case}.nii.gz", raw / "labelsTr" / f"{case}.nii.gz")
    dataset = {"name": "Hippocampus", "description": "SegmentMBTFE v1 test reference", "tensorImageSize": "3D",
               "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
               "numTraining": len(ids), "numTest": 0, "test": [],
               "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ids]}
    (raw / "dataset.json").write_text(json.dumps(dataset, indent=1))


def _plan_and_preprocess() -> None:
    """nnUNet_plan_and_preprocess's steps, with the written plans made tiny before preprocessing."""
    from batchgenerators.utilities.file_and_folder_operations import load_pickle, save_pickle
    from nnunet.experiment_planning.DatasetAnalyzer import DatasetAnalyzer
    from nnunet.experiment_planning.experiment_planner_baseline_2DUNet_v21 import ExperimentPlanner2D_v21
    from nnunet.experiment_planning.experiment_planner_baseline_3DUNet_v21 import ExperimentPlanner3D_v21
    from nnunet.experiment_planning.utils import crop
    from nnunet.paths import nnUNet_cropped_data, nnUNet_raw_data, preprocessing_output_dir
    crop(TASK, False, 1)
    cropped = os.path.join(nnUNet_cropped_data, TASK)
    preprocessed = os.path.join(preprocessing_output_dir, TASK)
    DatasetAnalyzer(cropped, overwrite=False, num_processes=1).analyze_dataset(False)
    os.makedirs(preprocessed, exist_ok=True)
    shutil.copy(os.path.join(cropped, "dataset_properties.pkl"), preprocessed)
    shutil.copy(os.path.join(nnUNet_raw_data, TASK, "dataset.json"), preprocessed)
    for planner_class, tiny in ((ExperimentPlanner3D_v21, _tiny_3d), (ExperimentPlanner2D_v21, _tiny_2d)):
        planner = planner_class(cropped, preprocessed)
        planner.plan_experiment()
        plans = load_pickle(planner.plans_fname)
        tiny(plans)
        save_pickle(plans, planner.plans_fname)
        planner.load_my_plans()  # run_preprocessing reads self.plans
        planner.run_preprocessing((1, 1))


def _topology(stage: dict, spacing, patch) -> None:
    """v1's own topology rule for our patch (2D plans keep the 3D spacing; the network sees its last two axes)."""
    from nnunet.experiment_planning.common_utils import get_pool_and_conv_props
    spacing = [float(s) for s in spacing]
    num_pool, pool_kernels, conv_kernels, patch, _ = get_pool_and_conv_props(spacing[-len(patch):], list(patch), 4,
                                                                             999999)
    stage.update({"patch_size": [int(p) for p in patch], "num_pool_per_axis": num_pool,
                  "pool_op_kernel_sizes": pool_kernels, "conv_kernel_sizes": conv_kernels, "batch_size": 2,
                  "current_spacing": spacing})


def _tiny_3d(plans: dict) -> None:
    import copy
    import numpy as np
    fullres = plans["plans_per_stage"][max(plans["plans_per_stage"])]
    stages = {}
    for i, (factor, patch) in enumerate(STAGES_3D):
        stage = copy.deepcopy(fullres)
        spacing = np.array(fullres["current_spacing"], dtype=float) * factor
        stage["median_patient_size_in_voxels"] = np.round(
            np.array(fullres["median_patient_size_in_voxels"]) / factor).astype(int)
        _topology(stage, spacing, patch)
        stages[i] = stage
    plans["plans_per_stage"] = stages
    plans["base_num_features"] = BASE_FEATURES


def _tiny_2d(plans: dict) -> None:
    stage = plans["plans_per_stage"][0]
    _topology(stage, stage["current_spacing"], PATCH_2D)
    plans["base_num_features"] = BASE_FEATURES


def _train(configuration: str, trainer_name: str, fold, iterations: int) -> None:
    import nnunet
    from nnunet.run.default_configuration import get_default_configuration
    plans_file, output_folder, dataset_directory, batch_dice, stage, trainer_class = get_default_configuration(
        configuration, TASK, trainer_name, PLANS_IDENTIFIER)
    trainer = trainer_class(plans_file, fold, output_folder=output_folder, dataset_directory=dataset_directory,
                            batch_dice=batch_dice, stage=stage, unpack_data=True, deterministic=False, fp16=False)
    trainer.max_num_epochs = 1
    trainer.num_batches_per_epoch = iterations
    trainer.num_val_batches_per_epoch = 1
    trainer.initialize(True)
    trainer.run_training()
    if configuration == "3d_lowres":  # the cascade trains on these, as nnUNet_train does after a lowres training
        from nnunet.training.cascade_stuff.predict_next_stage import predict_next_stage
        _allow_v1_checkpoints()
        trainer.network.eval()
        predict_next_stage(trainer, os.path.join(dataset_directory, trainer.plans["data_identifier"] + "_stage1"))
    print("nnunet", nnunet.__file__, "trained", output_folder, flush=True)


def _worker_predict(request: dict) -> None:
    import torch
    from nnunet.inference.predict import predict_cases
    _allow_v1_checkpoints()
    torch.set_num_threads(1)
    predict_cases(request["model"], request["cases"], request["outputs"], request["folds"], save_npz=False,
                  num_threads_preprocessing=1, num_threads_nifti_save=1,
                  segs_from_prev_stage=request["previous_stage"], do_tta=request["tta"], mixed_precision=True,
                  overwrite_existing=True, all_in_gpu=False, step_size=request["step_size"],
                  checkpoint_name="model_final_checkpoint")


def _worker_generic_unet(request: dict) -> None:
    """nnUNetTrainerV2.initialize_network's Generic_UNet (its arguments copied from there), in eval mode."""
    import torch
    from torch import nn
    from nnunet.network_architecture.generic_UNet import Generic_UNet
    from nnunet.network_architecture.initialization import InitWeights_He
    from nnunet.utilities.nd_softmax import softmax_helper
    torch.manual_seed(request["seed"])
    dim = len(request["patch_size"])
    conv, norm, dropout = (nn.Conv3d, nn.InstanceNorm3d, nn.Dropout3d) if dim == 3 else \
        (nn.Conv2d, nn.InstanceNorm2d, nn.Dropout2d)
    network = Generic_UNet(1, request["base_num_features"], request["num_classes"],
                           len(request["pool_op_kernel_sizes"]), 2, 2, conv, norm, {"eps": 1e-5, "affine": True},
                           dropout, {"p": 0, "inplace": True}, nn.LeakyReLU, {"negative_slope": 1e-2, "inplace": True},
                           True, False, lambda x: x, InitWeights_He(1e-2), request["pool_op_kernel_sizes"],
                           request["conv_kernel_sizes"], False, True, True)
    network.inference_apply_nonlin = softmax_helper
    network.do_ds = False
    network.eval()
    # the instance norms' affine parameters start at 1 and 0: give them values, so the mapping of each is tested
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "instnorm" in name:
                parameter.copy_(torch.rand_like(parameter) + 0.5 if name.endswith("weight") else
                                torch.randn_like(parameter))
    x = torch.randn(2, 1, *request["patch_size"])
    with torch.no_grad():
        y = network(x)
    torch.save({"state_dict": network.state_dict(), "input": x, "output": y}, request["path"])


if __name__ == "__main__":
    command, request_path = sys.argv[1], sys.argv[2]
    {"make": _worker_make, "predict": _worker_predict, "generic_unet": _worker_generic_unet}[command](
        json.loads(Path(request_path).read_text()))
