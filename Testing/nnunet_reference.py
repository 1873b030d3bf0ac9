"""The nnU-Net v2 reference used by parity tests and benchmarks.

Everything that defines "what nnU-Net does" is produced by nnunetv2's own code, never by ours: model
folders come from its dataset.json writer, fingerprint extractor, experiment planner, preprocessor and
trainer (`nnUNetTrainer.run_training` writes the checkpoints; postprocessing.pkl comes from
`determine_postprocessing`), and reference predictions come from `nnUNetPredictor`. Our interventions are
the ones a user could make: choosing the training cases, passing `overwrite_target_spacing` or a GPU-memory
target to the planner, editing the written plans to make the network tiny (patch, width, depth via nnU-Net's
own topology rule), and training for one short epoch (a few hundred iterations for the *_trained kinds), so that
a model folder builds in seconds on 2 CPU cores.

nnunetv2 reads the nnUNet_raw / nnUNet_preprocessed / nnUNet_results environment variables once, at import
time, so all nnunetv2 work runs in a subprocess of this same file (`python nnunet_reference.py
make|postprocessing|predict|resampling request.json`) with those variables pointing under the caller's
root. This side imports only the standard library: importing it never imports nnunetv2 or torch.

    make_model_folder(root, kind="hippo3d") -> root/nnUNet_results/Dataset901_Hippocampus/
                                               nnUNetTrainer__nnUNetPlans__3d_fullres
    predict_with_nnunet(model_dir, [[image.nii.gz]], out_dir, folds=(0,)) -> [out_dir/image.nii.gz]

Kinds (all tiny: 4 stages, 8/16/32/64 features; see KINDS, DATASETS and PLANNERS below):
    hippo3d                 3d_fullres, PlainConvUNet, patch 32x40x32, 1 mm, ZScore, labels 0-2
    hippo2d                 2d of the same dataset and plans, patch 64x32 (pads y, 2 tiles per slice)
    hippo3d_resenc          ResidualEncoderUNet from nnUNetPlannerResEncM (1/2/2/2 blocks), same dataset
    hippo3d_regions         regions {"hippocampus": [1, 2], "posterior": 2}, regions_class_order [1, 2]
    ct_aniso                CT, CTNormalization, target spacing 4.8 x 1.2 x 1.2 mm, patch 6x48x48,
                            kernels (1,3,3) in the first stages: separate-z resampling in and out
    hippo3d_2folds          hippo3d's fold 0 plus a differently seeded fold 1
    hippo3d_oldplans        hippo3d's checkpoint with plans.json in the nnU-Net <= 2.2 format
    hippo3d_postprocessing  hippo3d plus crossval_results_folds_0/postprocessing.{pkl,json} asking for the
                            largest foreground component, then the largest component of labels 1 and 2
    hippo3d_lowres          3d_lowres at the 1.70 mm nnU-Net's planner chose for a 10 MB GPU-memory target (which
                            makes it plan a cascade for these small images), patch 16x24x16, fold "all"
    hippo3d_cascade         3d_cascade_fullres of the same plans, trained on hippo3d_lowres's predictions
    hippo3d_2channels       two channels: the MR image (ZScore) and a smoothed copy (RescaleTo01, by channel name)
    ct_aniso_trained, hippo3d_resenc_trained   ct_aniso and hippo3d_resenc trained for one epoch of hundreds of
                            iterations instead of two (see PIPELINE_KINDS)
    ct25                    CT, 25 labels (TotalSegmentator's structures grouped), 1.5 mm iso, patch 64^3:
                            the many-label model of benchmarks/bench_big_ct.py (not used by the tests)
    hippo3d_<net>, hippo2d_<net>, ct_aniso_<net>   for <net> in unetpp, segresnetvae, unet3d: the same datasets,
                            plans and configurations trained by nnU-Net's own loop with SegmentMBTFE's trainer
                            (nnUNetTrainerUNetPlusPlus, nnUNetTrainerSegResNetVAE, nnUNetTrainerUNet3D), found by
                            nnU-Net's lookup through nnUNet_extTrainer; hippo3d_<net> has folds 0 and 1. Rebuilt
                            when the engine's network or trainer code changes.
    hippo3d_primus_s, hippo3d_primusv3_s, hippo3d_bn, hippo3d_nodeepsupervision, hippo3d_nomirroring,
    hippo3d_4000epochs_nomirroring   hippo3d's dataset and plans trained by nnU-Net's own trainers of those names
                            (NNUNET_TRAINER_KINDS; Primus 6 and 4 iterations, the others 2), found by nnU-Net's own
                            lookup; Primus needs torchvision importable (_torchvision_without_compiled_ops)
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from build_lock import build_once

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TRAINER = "nnUNetTrainer"
TIMING_FILE = "nnunet_timing.json"  # written by predict_with_nnunet into its output folder
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

# Hippocampus cases (MSD Task04, 1 mm iso). The first six in sorted order train every hippocampus model;
# test cases are picked from the other end of the list so that no test input was seen in training.
HIPPO_TRAIN_COUNT = 6

# TotalSegmentator v2 ids of example_seg.nii.gz merged into four coarse classes: enough foreground of each in
# every crop, and few enough output heads to stay fast. Anything not listed is background.
CT_LABELS = {"background": 0, "liver": 1, "abdominal_organs": 2, "vessels": 3, "bone": 4}
CT_MERGE = {
    1: (5,),
    2: (1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 18, 19, 20, 21, 22, 23, 24),
    3: tuple(range(51, 69)),
    4: tuple(range(25, 51)) + tuple(range(69, 79)) + tuple(range(91, 118)),
}
# CT training cases: crops of example_ct_sm (122x101x30 @ 3 mm, SimpleITK x,y,z) resampled to anisotropic
# spacings around the planned target (z 4.8 mm, in-plane 1.2 mm): (index xyz, size xyz, spacing xyz).
CT_CASES = (
    ((20, 15, 4), (50, 50, 20), (1.2, 1.2, 4.8)),
    ((40, 30, 0), (60, 50, 24), (1.1, 1.1, 4.5)),
    ((10, 10, 8), (48, 56, 18), (1.3, 1.3, 5.0)),
    ((50, 20, 2), (56, 48, 22), (1.2, 1.2, 4.2)),
    ((30, 40, 6), (52, 52, 20), (1.25, 1.25, 5.2)),
)
CT_TARGET_SPACING = (4.8, 1.2, 1.2)  # numpy/ITK-array order (z, y, x), as nnU-Net's planner expects it
# The many-label CT: the TotalSegmentator structures present in example_seg in 25 groups, crops at 1.5 mm.
CT25_GROUPS = 25
CT25_CASES = (((10, 10, 2), (60, 50, 22)), ((40, 30, 0), (60, 56, 24)), ((20, 40, 6), (64, 50, 20)),
              ((50, 20, 4), (56, 60, 22)), ((30, 25, 8), (62, 54, 20)))
CT25_SPACING = (1.5, 1.5, 1.5)


@dataclass(frozen=True)
class Dataset:
    """One nnU-Net raw dataset, planned once; every configuration in its plans is made tiny."""
    dataset_id: int
    short_name: str
    source: str  # "hippocampus" or "ct"
    patch_sizes: tuple  # ((configuration, patch size in nnU-Net's transposed axis order), ...)
    regions: bool = False
    target_spacing: Optional[tuple] = None  # passed to nnU-Net's planner as overwrite_target_spacing
    gpu_memory_target: Optional[float] = None  # GB, passed to nnU-Net's planner (small: it plans a 3d_lowres)

    @property
    def name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.short_name}"


DATASETS = {
    "hippocampus": Dataset(901, "Hippocampus", "hippocampus", (("3d_fullres", (32, 40, 32)), ("2d", (64, 32)))),
    "hippocampus_regions": Dataset(902, "HippocampusRegions", "hippocampus", (("3d_fullres", (32, 40, 32)),
                                                                              ("2d", (64, 32))), regions=True),
    "ct": Dataset(903, "CTAniso", "ct", (("3d_fullres", (6, 48, 48)), ("2d", (64, 64))),
                  target_spacing=CT_TARGET_SPACING),
    "ct25": Dataset(904, "CT25Labels", "ct25", (("3d_fullres", (64, 64, 64)),), target_spacing=CT25_SPACING),
    # 10 MB of (estimated) GPU memory makes nnU-Net's planner shrink the 3d_fullres patch below a quarter of the
    # median image, so that it adds 3d_lowres (1.70 mm) and 3d_cascade_fullres, as it does for large images.
    "hippocampus_cascade": Dataset(905, "HippocampusCascade", "hippocampus", (("3d_fullres", (32, 40, 32)),
                                                                              ("3d_lowres", (16, 24, 16))),
                                   gpu_memory_target=0.01),
    # Two channels: the MR image (z-score) and a smoothed copy that nnU-Net rescales to 0..1 (channel name)
    "hippocampus_2ch": Dataset(906, "HippocampusTwoChannels", "hippocampus_2ch", (("3d_fullres", (32, 40, 32)),)),
}

# Planner -> (plans identifier it writes, tiny width). Features are per stage (deeper stages keep the last);
# "blocks" are convs per encoder stage for PlainConvUNet and residual blocks per stage for ResEnc.
PLANNERS = {
    "ExperimentPlanner": ("nnUNetPlans", dict(features=(8, 16, 32, 64), blocks=(2, 2, 2, 2, 2), decoder=2)),
    "nnUNetPlannerResEncM": ("nnUNetResEncUNetMPlans", dict(features=(8, 16, 32, 64), blocks=(1, 2, 2, 2, 2),
                                                            decoder=1)),
}


@dataclass(frozen=True)
class Kind:
    """A reference model folder. Base kinds are trained in their dataset's results folder; derived kinds
    are a copy of a base kind's folder (under root/variants/<kind>/) with extra folds and/or a change."""
    name: str
    dataset: str
    configuration: str = "3d_fullres"
    planner: str = "ExperimentPlanner"
    folds: tuple = (0,)
    derived_from: Optional[str] = None
    change: Optional[str] = None  # "old_plans" or "postprocessing", applied to the copy
    trainer: str = TRAINER  # another is looked up by nnU-Net in SegmentMBTFE's trainer shims (nnUNet_extTrainer)
    previous_stage: Optional[str] = None  # kind trained first, whose predictions a cascade stage trains on
    train_iterations: Optional[int] = None  # instead of make_model_folder's; trained under root/variants/<kind>/

    @property
    def plans_identifier(self) -> str:
        return PLANNERS[self.planner][0]

    def results_root(self, root: Path) -> Path:
        # a kind whose folder name another kind of its dataset also has (same trainer, plans, configuration)
        return Path(root) / "variants" / self.name if self.derived_from or self.train_iterations else Path(root)

    def model_dir(self, root: Path) -> Path:
        return (self.results_root(root) / "nnUNet_results" / DATASETS[self.dataset].name /
                f"{self.trainer}__{self.plans_identifier}__{self.configuration}")


KINDS = {k.name: k for k in (
    Kind("hippo3d", "hippocampus"),
    Kind("hippo2d", "hippocampus", configuration="2d"),
    Kind("hippo3d_resenc", "hippocampus", planner="nnUNetPlannerResEncM"),
    Kind("hippo3d_regions", "hippocampus_regions"),
    Kind("ct_aniso", "ct"),
    # fold 0 is hippo3d's own checkpoint, so a 2-fold ensemble can be compared with its first member
    Kind("hippo3d_2folds", "hippocampus", folds=(0, 1), derived_from="hippo3d"),
    # the very same weights as hippo3d: only plans.json differs, so predictions must be identical
    Kind("hippo3d_oldplans", "hippocampus", derived_from="hippo3d", change="old_plans"),
    Kind("hippo3d_postprocessing", "hippocampus", derived_from="hippo3d", change="postprocessing"),
)}


# nnU-Net's pipelines beyond one single-channel stage; not in KINDS, whose self-tests predict one single-channel
# image with each kind (Testing/test_parity.py gives these their inputs). The lowres stage trains on fold "all" because
# nnU-Net's cascade trains on the previous stage's predictions of its training cases, which nnU-Net writes for the
# validation cases of each fold it trains (with fold "all": every case).
PIPELINE_KINDS = {k.name: k for k in (
    Kind("hippo3d_lowres", "hippocampus_cascade", configuration="3d_lowres", folds=("all",)),
    Kind("hippo3d_cascade", "hippocampus_cascade", configuration="3d_cascade_fullres", previous_stage="hippo3d_lowres"),
    Kind("hippo3d_2channels", "hippocampus_2ch"),
    # Trained long enough for nnU-Net's own prediction to mean something (Testing/test_parity.py prints and asserts
    # how confident it is), within about a minute each on 2 idle cores: multi-class CT and the residual encoder.
    Kind("ct_aniso_trained", "ct", train_iterations=400),
    Kind("hippo3d_resenc_trained", "hippocampus", planner="nnUNetPlannerResEncM", train_iterations=400),
)}

# Kinds trained with SegmentMBTFE's trainers for the other network families (Testing/test_more_networks.py, which
# registers the trainers that nnUNetPredictor must find); not in KINDS, whose self-tests use nnU-Net's own trainer.
NETWORK_TRAINERS = {"unetpp": "nnUNetTrainerUNetPlusPlus", "segresnetvae": "nnUNetTrainerSegResNetVAE",
                    "unet3d": "nnUNetTrainerUNet3D"}
NETWORK_KINDS = {k.name: k for net, trainer in NETWORK_TRAINERS.items() for k in (
    Kind(f"hippo3d_{net}", "hippocampus", folds=(0, 1), trainer=trainer),
    Kind(f"hippo2d_{net}", "hippocampus", configuration="2d", trainer=trainer),
    Kind(f"ct_aniso_{net}", "ct", trainer=trainer),
)}
# nnU-Net 2.8's own trainers that build another network or change inference (Testing/test_nnunet_trainers.py): trained
# by nnU-Net's loop as they ship, found by nnU-Net's own trainer lookup. Primus trains a few iterations (its warm-up
# starts AdamW at 1/50 of its rate, so they barely move it; V3's full-resolution residual stem costs ~4 s each here):
# its predictions still hold every label, in proportions the test prints.
NNUNET_TRAINER_KINDS = {k.name: k for k in (
    Kind("hippo3d_primus_s", "hippocampus", trainer="nnUNet_Primus_S_Trainer", train_iterations=6),
    Kind("hippo3d_primusv3_s", "hippocampus", trainer="nnUNet_PrimusV3S_Trainer", train_iterations=4),
    Kind("hippo3d_bn", "hippocampus", trainer="nnUNetTrainerBN"),
    Kind("hippo3d_nodeepsupervision", "hippocampus", trainer="nnUNetTrainerNoDeepSupervision"),
    Kind("hippo3d_nomirroring", "hippocampus", trainer="nnUNetTrainerNoMirroring"),
    Kind("hippo3d_4000epochs_nomirroring", "hippocampus", trainer="nnUNetTrainer_4000epochs_NoMirroring"),
)}
# SegmentMBTFE's trainer shims, the folder nnU-Net searches through nnUNet_extTrainer, and the code they train
ENGINE_DIR = Path(__file__).resolve().parents[1] / "SegmentMBTFE" / "SegmentMBTFELib"
SHIM_DIR = ENGINE_DIR / "training" / "nnunet_trainer" / "shim"


# Kinds for benchmarks only (the tests do not build them): the many-label CT of benchmarks/bench_big_ct.py.
BENCHMARK_KINDS = {k.name: k for k in (Kind("ct25", "ct25"),)}
ALL_KINDS = {**KINDS, **PIPELINE_KINDS, **NETWORK_KINDS, **NNUNET_TRAINER_KINDS, **BENCHMARK_KINDS}


class NnunetReferenceError(RuntimeError):
    """nnunetv2 itself failed; the message carries the tail of its log."""


# ----------------------------------------------------------------------------------------------------------
# Parent side: plain functions that run nnunetv2 in a subprocess.
# ----------------------------------------------------------------------------------------------------------

def make_model_folder(root: Union[str, Path], *, kind: str, folds: Optional[Sequence[int]] = None, seed: int = 0,
                      train_iterations: int = 2, data_dir: Union[str, Path, None] = None,
                      timeout: float = 1200) -> Path:
    """Builds (once per root and request) a genuine nnU-Net v2 trained-model folder of the given kind.

    The datasets' raw data, fingerprints, plans and preprocessed data are shared by the kinds under one
    root. folds: None for the kind's own folds (see KINDS). train_iterations: nnU-Net trains one epoch of
    this many iterations (batch 2), so checkpoints are written by its own training loop and carry real
    logging (numpy scalars, as real checkpoints do); the weights stay essentially random. 0 skips the
    epoch and saves the freshly initialised network; a kind's own train_iterations replaces it. Fold f is
    seeded with seed * 1000 + f (fold "all": seed * 1000), so folds differ. A repeated call with the same
    arguments (and the same version of this file and of nnunetv2) returns the existing folder; anything else
    rebuilds it.
    """
    spec = ALL_KINDS[kind]
    root = Path(root).resolve()
    folds = tuple(spec.folds if folds is None else folds)
    data_dir = str(Path(data_dir or DEFAULT_DATA_DIR).resolve())
    train_iterations = spec.train_iterations or train_iterations
    request = {"kind": kind, "folds": list(folds), "seed": seed, "train_iterations": train_iterations,
               "data_dir": data_dir, "version": _reference_version()}
    if spec.trainer != TRAINER and spec.name not in NNUNET_TRAINER_KINDS:
        request["trainer_source"] = _trainer_source_hash()
    if spec.derived_from:
        base_dir = make_model_folder(root, kind=spec.derived_from, seed=seed, train_iterations=train_iterations,
                                     data_dir=data_dir, timeout=timeout)
        request["base_build"] = _read_record(root, spec.derived_from)["build_id"]  # rebuilt base: recopy
    if spec.previous_stage:
        make_model_folder(root, kind=spec.previous_stage, seed=seed, data_dir=data_dir, timeout=timeout)
        request["previous_build"] = _read_record(root, spec.previous_stage)["build_id"]  # retrain on its output
    model_dir = spec.model_dir(root)

    def build() -> dict:
        shutil.rmtree(model_dir, ignore_errors=True)
        if spec.derived_from:
            _make_derived(root, spec, base_dir, request, timeout)
        else:
            _train(root, spec, folds, request, timeout)
        return {"build_id": uuid.uuid4().hex}
    build_once(root, _record_file(root, kind), request, build, model_dir.is_dir)
    return model_dir


def build_seconds(root: Union[str, Path], kind: str) -> float:
    """How long the last make_model_folder build of this kind under root took (without its base kind)."""
    return _read_record(Path(root).resolve(), kind)["seconds"]


def _record_file(root: Path, kind: str) -> Path:
    return root / "records" / f"{kind}.json"


def _read_record(root: Path, kind: str) -> dict:
    return json.loads(_record_file(root, kind).read_text())


def _reference_version() -> str:
    # Builds are cached across runs (SEGMENTMBTFE_REFERENCE_CACHE): any edit of this file or another
    # nnunetv2 must invalidate them.
    digest = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:12]
    return f"{digest}-nnunetv2-{importlib.metadata.version('nnunetv2')}"


def _trainer_source_hash() -> str:
    """Identifies the engine's network and trainer code, which SegmentMBTFE's trainers train."""
    files = sorted((ENGINE_DIR / "networks").glob("*.py"))
    files += sorted((ENGINE_DIR / "training" / "nnunet_trainer").glob("*.py"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]


def _train(root: Path, spec: Kind, folds, request: dict, timeout: float) -> None:
    worker_request = dict(request, dataset=spec.dataset, planner=spec.planner, configuration=spec.configuration,
                          folds=list(folds), trainer=spec.trainer)
    _run_worker("make", worker_request, root, log_dir=root / "logs" / spec.name, timeout=timeout,
                results_root=spec.results_root(root))


def _make_derived(root: Path, spec: Kind, base_dir: Path, request: dict, timeout: float) -> None:
    model_dir = spec.model_dir(root)
    shutil.copytree(base_dir, model_dir)
    missing = [f for f in request["folds"] if f not in KINDS[spec.derived_from].folds]
    if missing:
        _train(root, spec, missing, request, timeout)
    if spec.change == "old_plans":
        _rewrite_plans_old_style(model_dir / "plans.json")
    elif spec.change == "postprocessing":
        labels = root / "nnUNet_raw" / DATASETS[spec.dataset].name / "labelsTr"
        work = spec.results_root(root) / "postprocessing_reference_labels"
        _run_worker("postprocessing", {"model_dir": str(model_dir), "labels_dir": str(labels),
                                       "reference_dir": str(work), "folds": request["folds"]},
                    root, log_dir=root / "logs" / spec.name, timeout=timeout)


def predict_with_nnunet(model_dir: Union[str, Path], cases: Sequence[Sequence[Union[str, Path]]],
                        output_dir: Union[str, Path], *, folds: Union[Sequence[int], str, None],
                        checkpoint: str = "checkpoint_final.pth", tta: bool = True, step_size: float = 0.5,
                        save_probabilities: bool = False, configuration: Optional[str] = None,
                        postprocessing: Union[str, Path, None] = None, threads: Optional[int] = None,
                        shim_trainers: bool = False, previous_stage: Union[str, Path, None] = None,
                        also_without_tta: bool = False, timeout: float = 1200) -> list[Path]:
    """Runs nnUNetPredictor (CPU) on real image files and returns the written label files, in case order.

    cases: one list of per-channel image files per case (NIfTI, NRRD, MHA; DICOM must be converted first,
    e.g. with dicom_series_to_file). folds: fold numbers, "all", or None to let nnU-Net auto-detect them.
    model_dir: a trained-model folder, or a dataset results folder together with `configuration`.
    With save_probabilities the .npz next to each label file holds nnU-Net's exported `probabilities`.
    postprocessing: a postprocessing.pkl to apply to the label files with nnU-Net's own function, afterwards.
    shim_trainers: find a trainer other than nnUNetTrainer in SegmentMBTFE's shim folder (SHIM_DIR), as training
    does, instead of requiring it registered in the installed nnunetv2.
    previous_stage: for 3d_cascade_fullres, the folder holding the 3d_lowres label files, named as the outputs
    (nnUNetv2_predict's --prev_stage_predictions).
    threads: torch threads; None does what `nnUNetv2_predict -device cpu` does (all cores; nnU-Net then
    caps the sliding window at $nnUNet_def_n_proc, default 8).
    also_without_tta: the same predictor then predicts again without mirroring (one process, one model load), into
    output_dir/no_tta/; those label files follow the others in the returned list.
    The model-load and prediction times are written to output_dir/nnunet_timing.json (see read_timing).
    """
    model_dir = _resolve_model_dir(Path(model_dir), configuration)
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    if also_without_tta:
        (output_dir / "no_tta").mkdir(exist_ok=True)
    names = _unique_case_names(cases)
    ending = json.loads((model_dir / "dataset.json").read_text())["file_ending"]
    request = {"model_dir": str(model_dir), "cases": [[str(Path(f).resolve()) for f in c] for c in cases],
               "outputs": [str(output_dir / n) for n in names], "folds": _folds_arg(folds),
               "checkpoint": checkpoint, "tta": tta, "step_size": step_size,
               "save_probabilities": save_probabilities, "threads": threads or os.cpu_count(),
               "postprocessing": str(Path(postprocessing).resolve()) if postprocessing else None,
               "shim_trainers": shim_trainers,
               "previous_stage": str(Path(previous_stage).resolve()) if previous_stage else None,
               "outputs_without_tta": [str(output_dir / "no_tta" / n) for n in names] if also_without_tta else None}
    # The results root only matters for nnunetv2's import-time paths; predicting needs no dataset there.
    _run_worker("predict", request, output_dir / ".nnunet_env", log_dir=output_dir, timeout=timeout)
    labels = [output_dir / f"{n}{ending}" for n in names]
    if also_without_tta:
        labels += [output_dir / "no_tta" / f"{n}{ending}" for n in names]
    if save_probabilities:
        return labels + [output_dir / f"{n}.npz" for n in names]
    return labels


def read_timing(output_dir: Union[str, Path]) -> dict:
    """Seconds measured inside the nnunetv2 process by predict_with_nnunet: 'load_s' (model folder),
    'per_case_s' (read + preprocess + sliding window + export + write, per case) and their sum 'predict_s'."""
    return json.loads((Path(output_dir) / TIMING_FILE).read_text())


def nnunet_resampling_decision(model_dir: Union[str, Path], image_files: Sequence[Union[str, Path]]) -> dict:
    """Asks nnunetv2 how it would resample this case for this model: reads it with the model's reader,
    applies the plans' transpose and calls nnU-Net's determine_do_sep_z_and_axis with the arguments its
    preprocessor (original -> target spacing) and its export (target -> original spacing) use.
    Returns {"original_spacing", "target_spacing", "preprocessing": {"separate_z", "axis"}, "export": {...}}
    with spacings in nnU-Net's transposed axis order."""
    model_dir = Path(model_dir).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "decision.json"
        request = {"model_dir": str(model_dir), "image_files": [str(Path(f).resolve()) for f in image_files],
                   "result_file": str(result)}
        _run_worker("resampling", request, Path(tmp), log_dir=Path(tmp), timeout=300)
        return json.loads(result.read_text())


def agreement(a, b) -> float:
    """Fraction of voxels on which two label maps (arrays or image files) agree."""
    import numpy as np
    a, b = (_as_array(x) for x in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    return float(np.mean(a == b))


def _as_array(x):
    import numpy as np
    if isinstance(x, (str, Path)):
        import SimpleITK as sitk
        return sitk.GetArrayFromImage(sitk.ReadImage(str(x)))
    return np.asarray(x)


def dicom_series_to_file(dicom_dir: Union[str, Path], output_file: Union[str, Path],
                         index: Optional[Sequence[int]] = None, size: Optional[Sequence[int]] = None) -> Path:
    """Reads a DICOM series with SimpleITK (as a user's converter would) and writes it, optionally cropped
    (index/size in ITK x,y,z voxels), to a file nnU-Net can read."""
    import SimpleITK as sitk
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom_dir)))
    image = reader.Execute()
    if index is not None:
        image = sitk.RegionOfInterest(image, [int(s) for s in size], [int(i) for i in index])
    sitk.WriteImage(image, str(output_file))
    return Path(output_file)


def write_second_channel(image_file: Union[str, Path], output_file: Union[str, Path]) -> Path:
    """The hippocampus_2ch dataset's second channel: the image smoothed (Gaussian, sigma 1.5 mm), as float32."""
    import SimpleITK as sitk
    image = sitk.Cast(sitk.ReadImage(str(image_file)), sitk.sitkFloat32)
    sitk.WriteImage(sitk.SmoothingRecursiveGaussian(image, 1.5), str(output_file))
    return Path(output_file)


def hippocampus_case_ids(data_dir: Union[str, Path, None] = None) -> list[str]:
    """All hippocampus case ids ('hippocampus_001', ...) in sorted order."""
    images = Path(data_dir or DEFAULT_DATA_DIR) / "hippocampus" / "train" / "images"
    return sorted(p.name[:-len(".nii.gz")] for p in images.glob("hippocampus_*.nii.gz"))


def _resolve_model_dir(model_dir: Path, configuration: Optional[str]) -> Path:
    """A trained-model folder as given, or the one a dataset results folder holds for `configuration`;
    among several, nnUNetv2_predict's defaults (-tr nnUNetTrainer -p nnUNetPlans) win."""
    if (model_dir / "plans.json").is_file():
        if configuration not in (None, model_dir.name.rsplit("__", 1)[-1]):
            raise ValueError(f"{model_dir} is a {model_dir.name} model, not {configuration}")
        return model_dir.resolve()
    candidates = sorted(model_dir.glob(f"*__*__{configuration}"))
    default = model_dir / f"{TRAINER}__nnUNetPlans__{configuration}"
    if default in candidates:
        return default.resolve()
    if configuration is None or len(candidates) != 1:
        raise ValueError(f"{model_dir}: configuration {configuration!r} does not pick one trained model "
                         f"({[c.name for c in candidates]})")
    return candidates[0].resolve()


def _unique_case_names(cases) -> list[str]:
    # nnU-Net names outputs after the first channel file without "_0000"; keep that, but never collide.
    names = []
    for i, files in enumerate(cases):
        name = Path(files[0]).name
        name = next((name[:-len(e)] for e in IMAGE_ENDINGS if name.endswith(e)), name)
        name = name[:-5] if name.endswith("_0000") else name
        names.append(name if name not in names else f"{name}_{i:03d}")
    return names


def _folds_arg(folds):
    if folds is None or folds == "all":
        return folds
    return [f if f == "all" else int(f) for f in folds]


def _run_worker(command: str, request: dict, root: Path, *, log_dir: Path, timeout: float,
                results_root: Optional[Path] = None) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    request_file = log_dir / f"{command}_request.json"
    request_file.write_text(json.dumps(request, indent=1))
    env = dict(os.environ, **_nnunet_environment(root, results_root or root, building=command != "predict"))
    run_reference_script(Path(__file__), command, request_file, env, log_dir, timeout, NnunetReferenceError,
                         "nnunetv2")


def run_reference_script(script: Path, command: str, request_file: Path, env: dict, log_dir: Path,
                         timeout: float, error: type, package: str) -> None:
    """`python script command request_file` with `env`, its output in log_dir/<command>.log; `error` (with the
    log's tail) when it fails. Shared with nnunet_v1_reference.py, whose nnU-Net also reads its folders from
    the environment at import time."""
    log_file = log_dir / f"{command}.log"
    with open(log_file, "w") as log:
        proc = subprocess.run([sys.executable, str(script.resolve()), command, str(request_file)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        tail = log_file.read_text(errors="replace")[-6000:]
        raise error(f"{package} `{command}` failed (exit {proc.returncode}); log {log_file}:\n{tail}")


def _nnunet_environment(root: Path, results_root: Path, building: bool) -> dict:
    env = {
        "nnUNet_raw": str(root / "nnUNet_raw"),
        "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
        "nnUNet_results": str(results_root / "nnUNet_results"),
        "nnUNet_compile": "false",
        "MPLBACKEND": "Agg",
    }
    if building:
        # One thread: with 2 OpenMP threads, a busy machine turned a 0.3 s epoch into 25 s (spinning
        # barriers); speed does not matter for building. Predictions keep nnU-Net's own thread choice.
        env.update({"OMP_NUM_THREADS": "1", "nnUNet_def_n_proc": "1"})
    return env


# ----------------------------------------------------------------------------------------------------------
# Worker side: runs inside the subprocess, where importing nnunetv2 is safe.
# ----------------------------------------------------------------------------------------------------------

def _worker_make(request: dict) -> None:
    dataset = DATASETS[request["dataset"]]
    _ensure_dataset(dataset, Path(request["data_dir"]), request["version"])
    _ensure_plans(dataset, request["planner"])
    for configuration in _configurations_to_preprocess(dataset, request["planner"], request["configuration"]):
        _ensure_preprocessed(dataset, request["planner"], configuration)
    for fold in request["folds"]:
        with _timed(f"train fold {fold}"):
            _train_fold(dataset, request["planner"], request["configuration"], fold,
                        request["seed"] * 1000 + (0 if fold == "all" else fold), request["train_iterations"],
                        request.get("trainer", TRAINER))


def _configurations_to_preprocess(dataset: Dataset, planner: str, configuration: str) -> list:
    """The configuration, and the one its validation writes predictions for (3d_lowres: 3d_cascade_fullres)."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = PlansManager(str(Path(nnUNet_preprocessed) / dataset.name / f"{PLANNERS[planner][0]}.json"))
    return [configuration, *(plans.get_configuration(configuration).next_stage_names or [])]


def _worker_postprocessing(request: dict) -> None:
    with _timed("postprocessing"):
        _determine_postprocessing(Path(request["model_dir"]), Path(request["labels_dir"]),
                                  Path(request["reference_dir"]), request["folds"])


def _ensure_dataset(dataset: Dataset, data_dir: Path, version: str) -> None:
    """Raw dataset + fingerprint, once per root and version; plans and preprocessed data live inside the
    preprocessed folder, so starting the dataset afresh also drops them."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    raw, preprocessed = Path(nnUNet_raw) / dataset.name, Path(nnUNet_preprocessed) / dataset.name
    marker = preprocessed / "reference_dataset.json"
    identity = {"data_dir": str(data_dir), "version": version}
    if marker.is_file() and json.loads(marker.read_text()) == identity:
        return
    for folder in (raw, preprocessed):
        shutil.rmtree(folder, ignore_errors=True)
    with _timed("raw dataset"):
        _write_raw_dataset(dataset, raw, data_dir)
    _extract_fingerprint(dataset)
    # as nnUNetv2_preprocess does; nnU-Net's validation (run for a cascade's first stage) scores against these
    shutil.copytree(raw / "labelsTr", preprocessed / "gt_segmentations")
    marker.write_text(json.dumps(identity))


def _ensure_plans(dataset: Dataset, planner: str) -> None:
    from nnunetv2.paths import nnUNet_preprocessed
    marker = Path(nnUNet_preprocessed) / dataset.name / f"{PLANNERS[planner][0]}.reference_tiny"
    if marker.is_file():
        return
    plans = _plan(dataset, planner)
    patch_sizes = dict(dataset.patch_sizes)
    for name, configuration in plans["configurations"].items():
        # Cascade entries only inherit; a 3d_lowres is made tiny like the others (at the spacing nnU-Net planned).
        if name in patch_sizes:
            _make_configuration_tiny(configuration, patch_sizes[name], **PLANNERS[planner][1])
    _save_plans(dataset, planner, plans)
    marker.touch()


def _ensure_preprocessed(dataset: Dataset, planner: str, configuration: str) -> None:
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans_identifier = PLANNERS[planner][0]
    preprocessed = Path(nnUNet_preprocessed) / dataset.name
    plans = PlansManager(str(preprocessed / f"{plans_identifier}.json"))
    manager = plans.get_configuration(configuration)
    marker = preprocessed / f"{manager.data_identifier}.reference_done"
    if marker.is_file():
        return
    with _timed(f"preprocess {configuration}"):
        preprocessor = manager.preprocessor_class(verbose=False)
        preprocessor.show_progress_bar = False
        preprocessor.run(dataset.dataset_id, configuration, plans_identifier, num_processes=1)
    marker.touch()


@contextmanager
def _timed(step: str):
    # The make log is the only place to see where build time goes; keep a greppable line per step.
    started = time.perf_counter()
    yield
    print(f"[nnunet_reference] {step}: {time.perf_counter() - started:.1f} s", flush=True)


def _write_raw_dataset(dataset: Dataset, raw: Path, data_dir: Path) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    channels = None
    if dataset.source in ("hippocampus", "hippocampus_2ch"):
        n = _write_hippocampus_cases(raw, data_dir, two_channels=dataset.source == "hippocampus_2ch")
        channel, labels = "MRI", {"background": 0, "anterior": 1, "posterior": 2}
        if dataset.source == "hippocampus_2ch":
            channels = {0: "MRI", 1: "rescale_to_0_1"}  # nnU-Net picks the normalisation from the channel name
        if dataset.regions:
            labels = {"background": 0, "hippocampus": [1, 2], "posterior": 2}
    elif dataset.source == "ct25":
        n = _write_ct25_cases(raw, data_dir)
        channel, labels = "CT", {"background": 0, **{f"group_{g:02d}": g for g in range(1, CT25_GROUPS + 1)}}
    else:
        n = _write_ct_cases(raw, data_dir)
        channel, labels = "CT", CT_LABELS
    generate_dataset_json(str(raw), channels or {0: channel}, labels, n, ".nii.gz",
                          regions_class_order=(1, 2) if dataset.regions else None, dataset_name=dataset.name,
                          description="SegmentMBTFE test reference (nnunet_reference.py)",
                          license="see ../shared/data/README.md", converted_by="Testing/nnunet_reference.py")


def _write_hippocampus_cases(raw: Path, data_dir: Path, two_channels: bool = False) -> int:
    source = data_dir / "hippocampus" / "train"
    case_ids = hippocampus_case_ids(data_dir)[:HIPPO_TRAIN_COUNT]
    for case_id in case_ids:
        shutil.copyfile(source / "images" / f"{case_id}.nii.gz", raw / "imagesTr" / f"{case_id}_0000.nii.gz")
        if two_channels:
            write_second_channel(source / "images" / f"{case_id}.nii.gz", raw / "imagesTr" / f"{case_id}_0001.nii.gz")
        shutil.copyfile(source / "labels" / f"{case_id}.nii.gz", raw / "labelsTr" / f"{case_id}.nii.gz")
    return len(case_ids)


def _write_ct_cases(raw: Path, data_dir: Path) -> int:
    import numpy as np
    import SimpleITK as sitk
    ts = data_dir / "formats" / "totalsegmentator"
    ct = sitk.ReadImage(str(ts / "example_ct_sm.nii.gz"))
    seg = sitk.ReadImage(str(ts / "example_seg.nii.gz"))
    lut = np.zeros(256, np.uint8)
    for new, old in CT_MERGE.items():
        lut[list(old)] = new
    merged = sitk.GetImageFromArray(lut[sitk.GetArrayFromImage(seg)])
    merged.CopyInformation(seg)
    for i, (index, size, spacing) in enumerate(CT_CASES):
        image = _resample(sitk.RegionOfInterest(ct, size, index), spacing, sitk.sitkLinear, -1024)
        label = _resample(sitk.RegionOfInterest(merged, size, index), spacing, sitk.sitkNearestNeighbor, 0)
        sitk.WriteImage(sitk.Cast(image, sitk.sitkInt16), str(raw / "imagesTr" / f"ct_{i:03d}_0000.nii.gz"))
        sitk.WriteImage(label, str(raw / "labelsTr" / f"ct_{i:03d}.nii.gz"))
    return len(CT_CASES)


def _write_ct25_cases(raw: Path, data_dir: Path) -> int:
    import numpy as np
    import SimpleITK as sitk
    ts = data_dir / "formats" / "totalsegmentator"
    ct = sitk.ReadImage(str(ts / "example_ct_sm.nii.gz"))
    seg = sitk.ReadImage(str(ts / "example_seg.nii.gz"))
    ids = sitk.GetArrayFromImage(seg)
    present = [int(v) for v in np.unique(ids) if v]  # every group gets some of the structures in this scan
    lut = np.zeros(int(ids.max()) + 1, np.uint8)
    lut[present] = [1 + rank * CT25_GROUPS // len(present) for rank in range(len(present))]
    grouped = sitk.GetImageFromArray(lut[ids])
    grouped.CopyInformation(seg)
    for i, (index, size) in enumerate(CT25_CASES):
        image = _resample(sitk.RegionOfInterest(ct, size, index), CT25_SPACING, sitk.sitkLinear, -1024)
        label = _resample(sitk.RegionOfInterest(grouped, size, index), CT25_SPACING, sitk.sitkNearestNeighbor, 0)
        sitk.WriteImage(sitk.Cast(image, sitk.sitkInt16), str(raw / "imagesTr" / f"ct25_{i:03d}_0000.nii.gz"))
        sitk.WriteImage(label, str(raw / "labelsTr" / f"ct25_{i:03d}.nii.gz"))
    return len(CT25_CASES)


def _resample(image, spacing, interpolator, default):
    import SimpleITK as sitk
    size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), spacing,
                         image.GetDirection(), default, image.GetPixelID())


def _extract_fingerprint(dataset: Dataset) -> None:
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    with _timed("fingerprint"):
        extractor = DatasetFingerprintExtractor(dataset.dataset_id, num_processes=1)
        # nnU-Net samples 1e8 foreground intensities in total however small the dataset (with replacement),
        # which costs ~10 s and ~1 GB here; 1e6 samples are plenty for the mean, std and percentiles.
        extractor.num_foreground_voxels_for_intensitystats = 1e6
        extractor.show_progress_bar = False
        extractor.run(overwrite_existing=True)


def _plan(dataset: Dataset, planner: str) -> dict:
    import nnunetv2
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    planner_class = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"),
                                                planner, current_module="nnunetv2.experiment_planning")
    with _timed(f"plan {planner}"):
        plans, _ = plan_experiment_dataset(dataset.dataset_id, planner_class,
                                           gpu_memory_target_in_gb=dataset.gpu_memory_target,
                                           overwrite_target_spacing=dataset.target_spacing)
    return plans


def _make_configuration_tiny(configuration: dict, patch_size, *, features, blocks, decoder) -> None:
    """Shrinks the planned network the way nnU-Net itself would pick a topology for a small patch:
    nnU-Net's get_pool_and_conv_props gives strides and kernels for our patch; only the width is ours."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
    _, strides, kernels, patch, _ = get_pool_and_conv_props(configuration["spacing"], patch_size, 4, 999999)
    n_stages = len(strides)
    arch = configuration["architecture"]["arch_kwargs"]
    blocks_key = "n_blocks_per_stage" if "n_blocks_per_stage" in arch else "n_conv_per_stage"
    arch.update({
        "n_stages": n_stages,
        "features_per_stage": [features[min(i, len(features) - 1)] for i in range(n_stages)],
        "kernel_sizes": [list(k) for k in kernels],
        "strides": [list(s) for s in strides],
        blocks_key: list(blocks[:n_stages]),
        "n_conv_per_stage_decoder": [decoder] * (n_stages - 1),
    })
    configuration["patch_size"] = [int(p) for p in patch]
    configuration["batch_size"] = 2


def _save_plans(dataset: Dataset, planner: str, plans: dict) -> None:
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export
    recursive_fix_for_json_export(plans)  # as the planner's own save_plans does
    save_json(plans, os.path.join(nnUNet_preprocessed, dataset.name, PLANNERS[planner][0] + ".json"),
              sort_keys=False)


def _train_fold(dataset: Dataset, planner: str, configuration: str, fold: int, seed: int,
                train_iterations: int, trainer_name: str = TRAINER) -> None:
    """nnU-Net's own training loop (run_training) for at most one short epoch; it writes plans.json,
    dataset.json, dataset_fingerprint.json, checkpoint_final.pth and (after an epoch) checkpoint_best.pth."""
    import random
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    # 0 augmentation workers makes nnU-Net use its SingleThreadedAugmenter: no background processes to hang
    # on 2 cores. Set only here: the planner passes the same number to torch.set_num_threads, which rejects 0.
    os.environ["nnUNet_n_proc_DA"] = "0"
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Like nnUNetv2_train (run_training.get_trainer_from_args): plans and dataset.json come from the saved
    # JSON, so the checkpoint's init_args hold plain Python types, not the planner's numpy scalars.
    preprocessed = os.path.join(nnUNet_preprocessed, dataset.name)
    plans = load_json(os.path.join(preprocessed, PLANNERS[planner][0] + ".json"))
    plans["continue_training"] = False  # nnunetv2 2.8.1's trainer pops this key; run_training.py sets it
    dataset_json = load_json(os.path.join(preprocessed, "dataset.json"))
    trainer_class = nnUNetTrainer if trainer_name == TRAINER else _nnunet_trainer_class(trainer_name) \
        if trainer_name in {k.trainer for k in NNUNET_TRAINER_KINDS.values()} else _shim_trainer_class(trainer_name)
    trainer = trainer_class(plans, configuration, fold, dataset_json, device=torch.device("cpu"))
    trainer.num_epochs = 1 if train_iterations > 0 else 0
    trainer.num_iterations_per_epoch = train_iterations
    trainer.num_val_iterations_per_epoch = 1
    trainer.run_training()
    if trainer.configuration_manager.next_stage_names:
        # As nnUNetv2_train does after training: nnU-Net's validation writes the predictions of the validation cases
        # that its next stage (3d_cascade_fullres) trains on, under predicted_next_stage/.
        trainer.perform_actual_validation(False)
    if train_iterations == 0:  # no epoch ran, so nnU-Net never wrote a "best" checkpoint
        trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_best.pth"))


def _nnunet_trainer_class(trainer_name: str):
    """One of nnU-Net's own trainers, found by nnU-Net's own lookup (nnUNetv2_train's)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    return recursive_find_trainer_class_by_name(trainer_name)


def _torchvision_without_compiled_ops() -> None:
    """Lets torchvision's Python code import when its compiled ops cannot load: nnU-Net's Primus imports timm, which
    imports torchvision (for FrozenBatchNorm2d and feature extraction), and PyPI's torchvision is built against the
    CUDA torch, so against the CPU torch its _C library fails to load (libc10_cuda.so) and its import then stops at
    registering fake kernels of the missing `torchvision::nms`/`qnms` ops. Declaring those two schemas (no
    kernels) is all it needs: torchvision reports its ops missing (`_has_ops()` False), and nothing nnU-Net's
    networks run calls them (a call would fail loudly, never give numbers). Nothing is declared when the real
    library loads (a torchvision matching this torch)."""
    import importlib.util
    import torch
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    library = next(Path(spec.submodule_search_locations[0]).glob("_C*.so"), None)
    try:
        if library is not None:
            torch.ops.load_library(str(library))
            return
    except (OSError, RuntimeError):
        pass
    declared = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        declared.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _DECLARED.append(declared)  # the declarations live as long as the library object


_DECLARED = []


def _shim_trainer_class(trainer_name: str):
    """nnU-Net's own search of an nnUNet_extTrainer folder (find_objects.recursive_find_trainer_class_by_name does
    exactly this for each listed folder), here SegmentMBTFE's shim folder. Not the whole lookup: it first imports
    every module of nnunetv2's trainer package (primus/ there imports only with _torchvision_without_compiled_ops)."""
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    return recursive_find_python_class(str(SHIM_DIR), trainer_name, None, base_folder=str(SHIM_DIR),
                                       cleanup_imports_from_base_folder=True)


def _rewrite_plans_old_style(plans_file: Path) -> None:
    """Rewrites plans.json as nnU-Net <= 2.2 wrote it: per-configuration UNet_* keys instead of an
    `architecture` block, and the intensity statistics under their old name."""
    plans = json.loads(plans_file.read_text())
    for name, configuration in plans["configurations"].items():
        if "architecture" not in configuration:
            continue  # e.g. 3d_cascade_fullres, which only inherits
        arch = configuration.pop("architecture")
        kwargs = arch["arch_kwargs"]
        strides = kwargs["strides"]
        configuration.update({
            "UNet_class_name": arch["network_class_name"].rsplit(".", 1)[-1],
            "UNet_base_num_features": kwargs["features_per_stage"][0],
            "n_conv_per_stage_encoder": kwargs["n_conv_per_stage"],
            "n_conv_per_stage_decoder": kwargs["n_conv_per_stage_decoder"],
            "num_pool_per_axis": [sum(s[d] > 1 for s in strides) for d in range(len(strides[0]))],
            "pool_op_kernel_sizes": strides,
            "conv_kernel_sizes": kwargs["kernel_sizes"],
            "unet_max_num_features": 320 if len(strides[0]) == 3 else 512,
        })
        # the old keys only reproduce our features if base * 2**i hits them (it does for 8/16/32/64)
        expected = [min(kwargs["features_per_stage"][0] * 2 ** i, configuration["unet_max_num_features"])
                    for i in range(len(strides))]
        assert expected == kwargs["features_per_stage"], (name, expected, kwargs["features_per_stage"])
    plans["foreground_intensity_properties_by_modality"] = plans.pop("foreground_intensity_properties_per_channel")
    plans_file.write_text(json.dumps(plans, indent=4))


def _determine_postprocessing(model_dir: Path, labels_dir: Path, reference: Path, folds) -> None:
    """Lets nnU-Net's determine_postprocessing decide on cross-validation "predictions" that are the
    reference labels reduced to one component per label plus a few spurious islands, so that nnU-Net
    itself decides to keep only the largest foreground component and then the largest per label.
    It writes crossval_results_folds_<folds>/postprocessing.{pkl,json} exactly as find_best_configuration does."""
    import numpy as np
    import SimpleITK as sitk
    from nnunetv2.postprocessing.remove_connected_components import determine_postprocessing
    from nnunetv2.utilities.file_path_utilities import folds_tuple_to_string
    crossval = model_dir / f"crossval_results_folds_{folds_tuple_to_string(folds)}"
    for folder in (crossval, reference):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    for label_file in sorted(labels_dir.glob("*.nii.gz")):
        image = sitk.ReadImage(str(label_file))
        clean = _one_component_per_label(sitk.GetArrayFromImage(image))
        for folder, array in ((reference, clean), (crossval, _with_spurious_islands(clean))):
            out = sitk.GetImageFromArray(array.astype(np.uint8))
            out.CopyInformation(image)
            sitk.WriteImage(out, str(folder / label_file.name))
    shutil.copyfile(model_dir / "plans.json", crossval / "plans.json")
    shutil.copyfile(model_dir / "dataset.json", crossval / "dataset.json")
    pp_fns, pp_kwargs = determine_postprocessing(str(crossval), str(reference), str(crossval / "plans.json"),
                                                 str(crossval / "dataset.json"), num_processes=1,
                                                 keep_postprocessed_files=False)
    chosen = [kw["labels_or_regions"] for kw in pp_kwargs]
    labels = json.loads((model_dir / "dataset.json").read_text())["labels"].values()
    foreground = sorted(v for v in labels if isinstance(v, int) and v > 0)  # label-based datasets only
    if chosen != [foreground, *foreground]:
        raise NnunetReferenceError(f"nnU-Net chose postprocessing {chosen}, not largest-fg then per label")


def _one_component_per_label(seg):
    """Keeps the largest 6-connected component of each label, then of the whole foreground."""
    import numpy as np
    out = np.zeros_like(seg)
    for label in np.unique(seg[seg > 0]):
        out[_largest_component(seg == label)] = label
    out[~_largest_component(out > 0)] = 0
    return out


def _largest_component(mask):
    import numpy as np
    from scipy import ndimage
    components, n = ndimage.label(mask)
    if n == 0:
        return mask
    return components == (1 + np.argmax(ndimage.sum_labels(mask, components, range(1, n + 1))))


def _with_spurious_islands(seg):
    """Adds errors that only connected-component removal can fix: a far-away island of label 1 (removed
    by "largest foreground component"), and one voxel of each label embedded in the other label's
    region away from its own (still connected to the foreground, so only per-label removal fixes it)."""
    import numpy as np
    from scipy import ndimage
    out = seg.copy()
    out[:2, :2, :2] = 1  # a corner island, far from the hippocampus in the middle of the crop
    for label, host in ((1, 2), (2, 1)):
        far = (seg == host) & (ndimage.distance_transform_edt(seg != label) > 3)
        out[tuple(np.argwhere(far)[0])] = label
    return out


def _worker_predict(request: dict) -> None:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    torch.set_num_threads(request["threads"])  # as predict_entry_point does for -device cpu
    if request.get("shim_trainers"):
        # SegmentMBTFE's trainers (the shipped MBTFE-UNet and UNet++ models) without writing them into the installed
        # nnunetv2: the predictor's lookup would fail on primus/ first (see _shim_trainer_class); nnU-Net's own trainer
        # classes are still found by its own lookup.
        import nnunetv2.inference.predict_from_raw_data as predict_module
        nnunet_lookup = predict_module.recursive_find_trainer_class_by_name
        predict_module.recursive_find_trainer_class_by_name = \
            lambda name: nnunet_lookup(name) if name == TRAINER else _shim_trainer_class(name)
    started = time.perf_counter()
    predictor = nnUNetPredictor(tile_step_size=request["step_size"], use_gaussian=True,
                                use_mirroring=request["tta"], perform_everything_on_device=False,
                                device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    folds = request["folds"]
    predictor.initialize_from_trained_model_folder(request["model_dir"], use_folds=tuple(folds) if isinstance(
        folds, list) else folds, checkpoint_name=request["checkpoint"])
    load_s = time.perf_counter() - started
    per_case_s = []
    for case, output in zip(request["cases"], request["outputs"]):
        # One case per call, so benchmarks get per-case times; the sequential variant runs everything in
        # this process (preprocess, sliding window, export): no worker pools to starve on 2 cores.
        started = time.perf_counter()
        predictor.predict_from_files_sequential([case], [output], save_probabilities=request["save_probabilities"],
                                                overwrite=True,
                                                folder_with_segs_from_prev_stage=request.get("previous_stage"))
        per_case_s.append(time.perf_counter() - started)
    if request.get("outputs_without_tta"):
        predictor.use_mirroring = False  # read by nnU-Net's sliding window at every tile
        for case, output in zip(request["cases"], request["outputs_without_tta"]):
            predictor.predict_from_files_sequential([case], [output], save_probabilities=request["save_probabilities"],
                                                    overwrite=True)
    if request["postprocessing"]:
        _apply_postprocessing(request, predictor)
    timing = {"load_s": load_s, "per_case_s": per_case_s, "predict_s": sum(per_case_s),
              "cases": len(per_case_s), "torch_threads": torch.get_num_threads()}
    Path(request["outputs"][0]).parent.joinpath(TIMING_FILE).write_text(json.dumps(timing, indent=1))


def _worker_resampling(request: dict) -> None:
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans_manager = PlansManager(load_json(os.path.join(request["model_dir"], "plans.json")))
    checkpoint_configuration = _trained_configuration(request["model_dir"])
    configuration = plans_manager.get_configuration(checkpoint_configuration)
    _, properties = plans_manager.image_reader_writer_class().read_images(request["image_files"])
    original = [float(properties["spacing"][i]) for i in plans_manager.transpose_forward]
    target = list(configuration.spacing)
    if len(target) < len(original):  # 2d: nnU-Net keeps the slice spacing
        target = [original[0]] + target

    def decide(kwargs_key, current, new):
        separate_z, axis = determine_do_sep_z_and_axis(configuration.configuration[kwargs_key].get(
            "force_separate_z"), current, new)
        return {"separate_z": bool(separate_z), "axis": None if axis is None else int(axis)}

    decision = {"configuration": checkpoint_configuration, "original_spacing": original,
                "target_spacing": [float(t) for t in target],
                "preprocessing": decide("resampling_fn_data_kwargs", original, target),
                "export": decide("resampling_fn_probabilities_kwargs", target, original)}
    Path(request["result_file"]).write_text(json.dumps(decision, indent=1))


def _trained_configuration(model_dir: str) -> str:
    # Like nnUNetPredictor: the configuration comes from the checkpoint, not from the folder name.
    import torch
    fold = sorted(Path(model_dir).glob("fold_*/checkpoint_final.pth"))[0]
    return torch.load(fold, map_location="cpu", weights_only=False)["init_args"]["configuration"]


def _apply_postprocessing(request: dict, predictor) -> None:
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    from nnunetv2.postprocessing.remove_connected_components import load_postprocess_save
    pp_fns, pp_kwargs = load_pickle(request["postprocessing"])
    rw = predictor.plans_manager.image_reader_writer_class()
    for output in request["outputs"]:
        label_file = output + predictor.dataset_json["file_ending"]
        load_postprocess_save(label_file, label_file, rw, pp_fns, pp_kwargs)


if __name__ == "__main__":
    command, request_path = sys.argv[1], sys.argv[2]
    _torchvision_without_compiled_ops()  # before nnunetv2 imports timm (Primus)
    {"make": _worker_make, "postprocessing": _worker_postprocessing, "predict": _worker_predict,
     "resampling": _worker_resampling}[command](json.loads(Path(request_path).read_text()))
