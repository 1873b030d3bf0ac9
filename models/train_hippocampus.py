"""Retrain a shipped hippocampus model from ../shared/data/hippocampus with nnU-Net v2's own pipeline.

    .venv/bin/python models/train_hippocampus.py --network plain --epochs 30 --iterations 100 \
        --features-base 16 --batch-size 2 --seed 0 --threads 2 --name hippocampus_nnunet

What nnU-Net does, nnU-Net's code does: dataset.json (generate_dataset_json), fingerprint
(DatasetFingerprintExtractor), plans (ExperimentPlanner, 3d_fullres), preprocessing (its preprocessor) and
training (`nnUNetTrainer.run_training`: Dice + CE with deep supervision, SGD Nesterov momentum 0.99,
lr 0.01 with poly decay, weight decay 3e-5, nnU-Net's data augmentation and oversampling).
Our changes, all of them a user could make:
  * the schedule: `num_epochs` and `num_iterations_per_epoch` set on nnU-Net's own trainer object (so the
    checkpoint names `nnUNetTrainer` / `nnUNetTrainerMBTFE` and loads anywhere), and
    `num_val_iterations_per_epoch` (nnU-Net's per-epoch pseudo-Dice, only logged);
  * the plans: 3d_fullres features_per_stage = base * 2**i (capped at 320) and batch size; patch size,
    spacing, depth, kernels and strides stay as nnU-Net's planner chose them;
  * the split: nnU-Net's own 5-fold split (generate_crossval_split: sklearn KFold, shuffle, random_state
    12345, over the 208 sorted case ids), written as splits_final.json; fold 0 is trained, its 42 (or so)
    validation cases are held out and evaluated.
  * `--network mbtfe` trains with `nnUNetTrainerMBTFE` (SegmentMBTFELib.training.nnunet_trainer) on the same plans;
    `unetpp`, `segresnetvae` and `unet3d` with `nnUNetTrainerUNetPlusPlus`, `nnUNetTrainerSegResNetVAE` (its loss
    adds the VAE terms) and `nnUNetTrainerUNet3D` (SegmentMBTFELib.training.nnunet_trainer.family_trainers), likewise.

After training, the validation cases are predicted with OUR engine (SegmentMBTFELib.load_model(...).predict,
TTA on, step 0.5, CPU) from the original image files and Dice per label (anterior, posterior) is computed
against the original label files (per case, then averaged). The model folder is written to
models/<name>/ (dataset.json, plans.json, fold_0/checkpoint_final.pth without optimizer_state, training
log) with a MODEL_CARD.md and a results.json.

nnunetv2 reads nnUNet_raw / nnUNet_preprocessed / nnUNet_results at import time: this script sets them
(under --work-dir) before importing it. Raw data, fingerprint, plans and preprocessed data are cached in
the work dir keyed by the plan settings, so repeated runs skip them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hippocampus" / "train"
DATASET_ID = 904
DATASET_NAME = f"Dataset{DATASET_ID:03d}_Hippocampus"
LABELS = {"background": 0, "anterior": 1, "posterior": 2}
CONFIGURATION = "3d_fullres"
PLANS = "nnUNetPlans"
FOLD = 0
# --network -> (default model folder name, trainer: its module, or None for nnU-Net's own, and class, description)
NETWORKS = {
    "plain": ("hippocampus_nnunet", None, "nnUNetTrainer", "PlainConvUNet (nnU-Net's default 3d_fullres network)"),
    "mbtfe": ("hippocampus_mbtfe", "trainer", "nnUNetTrainerMBTFE",
              "MBTFE-UNet (PlainConvUNet + MBTFE blocks + EAB, SegmentMBTFELib.networks.mbtfe)"),
    "unetpp": ("hippocampus_unetpp", "family_trainers", "nnUNetTrainerUNetPlusPlus",
               "UNet++ (nested dense skips, deep supervision on the top row; SegmentMBTFELib.networks.unetpp)"),
    "segresnetvae": ("hippocampus_segresnetvae", "family_trainers", "nnUNetTrainerSegResNetVAE",
                     "SegResNetVAE (Myronenko 2018: GroupNorm residual encoder, VAE regularisation in training; "
                     "SegmentMBTFELib.networks.segresnet_vae)"),
    "unet3d": ("hippocampus_unet3d", "family_trainers", "nnUNetTrainerUNet3D",
               "3D U-Net (Cicek 2016: conv-BN-ReLU, max pooling, transposed convolutions; "
               "SegmentMBTFELib.networks.unet3d)"),
}
ATTRIBUTION = ('Antonelli M. et al., "The Medical Segmentation Decathlon", Nature Communications 13, 4128 '
               '(2022); Simpson A. L. et al., arXiv:1902.09063 (2019)')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--network", choices=tuple(NETWORKS), required=True)
    p.add_argument("--name", help="model folder name under models/ (default hippocampus_nnunet / hippocampus_mbtfe)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--iterations", type=int, default=100, help="training iterations per epoch")
    p.add_argument("--val-iterations", type=int, default=10,
                   help="nnU-Net's per-epoch validation iterations (logged pseudo-Dice only)")
    p.add_argument("--features-base", type=int, default=16, help="features of stage i: base * 2**i, max 320")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="hippocampus/train (images/, labels/)")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/segmentmbtfe_hippocampus_work"))
    p.add_argument("--output-root", type=Path, default=HERE, help="model folder goes to OUTPUT_ROOT/<name>")
    p.add_argument("--half-weights", action="store_true",
                   help="store the weights as float16 (half the file; they load into float32 networks as usual)")
    p.add_argument("--card-only", action="store_true",
                   help="only rewrite models/<name>/MODEL_CARD.md from its results.json (no training)")
    p.add_argument("--no-eval", action="store_true", help="skip the validation (smoke tests)")
    p.add_argument("--max-eval-cases", type=int, help="evaluate only the first N validation cases (smoke tests)")
    args = p.parse_args(argv)
    args.name = args.name or NETWORKS[args.network][0]
    return args


def set_environment(work: Path, threads: int):
    for sub in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / sub).mkdir(parents=True, exist_ok=True)
        os.environ[sub] = str(work / sub)
    os.environ["nnUNet_compile"] = "false"
    os.environ["MPLBACKEND"] = "Agg"
    # the planner passes this to torch.set_num_threads (which rejects 0); train() sets 0 afterwards
    os.environ["nnUNet_n_proc_DA"] = str(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    sys.path.insert(0, str(REPO / "SegmentMBTFE"))


def case_ids(data_dir: Path):
    return sorted(p.name[:-len(".nii.gz")] for p in (data_dir / "images").glob("*.nii.gz"))


def ensure_raw_and_fingerprint(data_dir: Path):
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    raw = Path(nnUNet_raw) / DATASET_NAME
    marker = Path(nnUNet_preprocessed) / DATASET_NAME / "fingerprint.done"
    ids = case_ids(data_dir)
    if marker.is_file() and json.loads(marker.read_text()) == {"data_dir": str(data_dir), "cases": ids}:
        return ids
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(Path(nnUNet_preprocessed) / DATASET_NAME, ignore_errors=True)
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for cid in ids:  # symlinks: the images are never copied anywhere near the repository
        os.symlink(data_dir / "images" / f"{cid}.nii.gz", raw / "imagesTr" / f"{cid}_0000.nii.gz")
        os.symlink(data_dir / "labels" / f"{cid}.nii.gz", raw / "labelsTr" / f"{cid}.nii.gz")
    generate_dataset_json(str(raw), {0: "MRI"}, LABELS, len(ids), ".nii.gz", dataset_name=DATASET_NAME,
                          description="MSD Task04 Hippocampus (208 labelled training cases)",
                          reference="http://medicaldecathlon.com", license="CC-BY-SA 4.0; " + ATTRIBUTION,
                          converted_by="SegmentMBTFE models/train_hippocampus.py")
    t = time.perf_counter()
    extractor = DatasetFingerprintExtractor(DATASET_ID, num_processes=2)
    # nnU-Net samples 1e8 foreground intensities in total (with replacement) however small the dataset;
    # 1e6 are plenty for mean, std and percentiles on 208 small volumes.
    extractor.num_foreground_voxels_for_intensitystats = 1e6
    extractor.run(overwrite_existing=True)
    print(f"[train_hippocampus] fingerprint: {time.perf_counter() - t:.1f} s", flush=True)
    marker.write_text(json.dumps({"data_dir": str(data_dir), "cases": ids}))
    return ids


def ensure_plans_and_preprocessed(features_base: int, batch_size: int):
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pre = Path(nnUNet_preprocessed) / DATASET_NAME
    identity = {"features_base": features_base, "batch_size": batch_size}
    marker = pre / "plans.done"
    if not (marker.is_file() and json.loads(marker.read_text()) == identity):
        plans, _ = plan_experiment_dataset(DATASET_ID, ExperimentPlanner)
        configuration = plans["configurations"][CONFIGURATION]
        arch = configuration["architecture"]["arch_kwargs"]
        print(f"[train_hippocampus] planner: patch {configuration['patch_size']}, batch "
              f"{configuration['batch_size']}, features {arch['features_per_stage']}, strides {arch['strides']}",
              flush=True)
        arch["features_per_stage"] = [min(features_base * 2 ** i, 320) for i in range(arch["n_stages"])]
        configuration["batch_size"] = batch_size
        recursive_fix_for_json_export(plans)
        save_json(plans, str(pre / f"{PLANS}.json"), sort_keys=False)
        marker.write_text(json.dumps(identity))
    manager = PlansManager(str(pre / f"{PLANS}.json")).get_configuration(CONFIGURATION)
    done = pre / f"{manager.data_identifier}.preprocessed.done"
    if not done.is_file():
        t = time.perf_counter()
        preprocessor = manager.preprocessor_class(verbose=False)
        preprocessor.run(DATASET_ID, CONFIGURATION, PLANS, num_processes=2)
        print(f"[train_hippocampus] preprocessing: {time.perf_counter() - t:.1f} s", flush=True)
        done.touch()
    return pre


def write_split(pre: Path, ids):
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    splits = generate_crossval_split(ids, seed=12345, n_splits=5)  # nnU-Net's default split
    save_json(splits, str(pre / "splits_final.json"))
    return splits[FOLD]


def train(args, pre: Path):
    import random
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    import importlib
    _, module, class_name, _ = NETWORKS[args.network]
    if module is None:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as Trainer
    else:  # instantiated directly: nnU-Net's trainer lookup by name is not needed (nor registration)
        Trainer = getattr(importlib.import_module(f"SegmentMBTFELib.training.nnunet_trainer.{module}"), class_name)
    # 0 augmentation workers: nnU-Net's SingleThreadedAugmenter, no background processes on 2 cores.
    os.environ["nnUNet_n_proc_DA"] = "0"
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    plans = load_json(str(pre / f"{PLANS}.json"))
    plans["continue_training"] = False  # nnunetv2 2.8.1's trainer pops this key; run_training.py sets it
    dataset_json = load_json(str(pre / "dataset.json"))
    trainer = Trainer(plans, CONFIGURATION, FOLD, dataset_json, device=torch.device("cpu"))
    trainer.num_epochs = args.epochs
    trainer.num_iterations_per_epoch = args.iterations
    trainer.num_val_iterations_per_epoch = args.val_iterations
    shutil.rmtree(trainer.output_folder, ignore_errors=True)  # a retrain starts from scratch
    os.makedirs(trainer.output_folder, exist_ok=True)
    started = time.perf_counter()
    trainer.run_training()
    seconds = time.perf_counter() - started
    n_params = sum(p.numel() for p in trainer.network.parameters())
    return Path(trainer.output_folder).parent, seconds, n_params, type(trainer).__name__


def dice_per_label(pred, ref):
    out = {}
    for name, value in LABELS.items():
        if value == 0:
            continue
        p, r = pred == value, ref == value
        denominator = p.sum() + r.sum()
        out[name] = float("nan") if denominator == 0 else float(2 * (p & r).sum() / denominator)
    return out


def evaluate(model_dir: Path, data_dir: Path, val_ids, threads: int):
    import numpy as np
    import SimpleITK as sitk
    import torch
    from SegmentMBTFELib import load_model, read_volume
    torch.set_num_threads(threads)
    model = load_model(model_dir)
    per_case, t = {}, time.perf_counter()
    for cid in val_ids:
        prediction = model.predict([read_volume(data_dir / "images" / f"{cid}.nii.gz")], device="cpu", tta=True)
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "labels" / f"{cid}.nii.gz")))
        pred = np.asarray(prediction.labels.array)
        assert pred.shape == ref.shape, (cid, pred.shape, ref.shape)
        per_case[cid] = dice_per_label(pred, ref)
    seconds = time.perf_counter() - t
    mean = {k: float(np.nanmean([c[k] for c in per_case.values()])) for k in LABELS if k != "background"}
    mean["mean"] = float(np.mean(list(mean.values())))
    return mean, per_case, seconds / max(len(val_ids), 1)


def export_model_folder(trained: Path, target: Path, half_weights: bool = False):
    """dataset.json, plans.json, fold_0/checkpoint_final.pth (optimizer state dropped) + training log.

    half_weights stores the floating-point weights as float16: `load_state_dict` copies them into the float32
    network (nnU-Net's predictor and ours alike), so only the file shrinks; the evaluation below runs on
    the stored weights."""
    import torch
    shutil.rmtree(target, ignore_errors=True)
    (target / f"fold_{FOLD}").mkdir(parents=True)
    for name in ("dataset.json", "plans.json", "dataset_fingerprint.json"):
        shutil.copyfile(trained / name, target / name)
    source = trained / f"fold_{FOLD}"
    checkpoint = torch.load(source / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    checkpoint.pop("optimizer_state", None)  # nnU-Net needs it only to continue training
    if half_weights:  # one copy per tensor: the decoder's `encoder.` entries share the encoder's tensors
        halves = {}
        checkpoint["network_weights"] = {
            k: halves.setdefault(v.data_ptr(), v.half()) if v.is_floating_point() else v
            for k, v in checkpoint["network_weights"].items()}
    torch.save(checkpoint, target / f"fold_{FOLD}" / "checkpoint_final.pth")
    for log in sorted(source.glob("training_log_*.txt"))[-1:]:
        shutil.copyfile(log, target / f"fold_{FOLD}" / "training_log.txt")
    if (source / "progress.png").is_file():
        shutil.copyfile(source / "progress.png", target / f"fold_{FOLD}" / "progress.png")
    return checkpoint


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_card(args, target: Path, info: dict):
    plans = json.loads((target / "plans.json").read_text())
    configuration = plans["configurations"][CONFIGURATION]
    arch = configuration["architecture"]
    kw = arch["arch_kwargs"]
    d = info["dice"]
    network = NETWORKS[args.network][3]
    lines = [
        f"# {args.name}: hippocampus segmentation, {network.split(' (')[0]}",
        "",
        f"nnU-Net v2 model folder (`dataset.json`, `plans.json`, `fold_{FOLD}/checkpoint_final.pth`, optimizer "
        f"state stripped), trained by nnU-Net v2 {info['nnunetv2']} with trainer `{info['trainer']}` "
        f"(configuration {CONFIGURATION}). Labels: 1 anterior, 2 posterior hippocampus.",
        "",
        "**Intended use: research and demonstration only. Not a medical device; not for clinical use or "
        "diagnosis.** Trained on a short CPU schedule (below); it is not nnU-Net's full 1000-epoch result.",
        "",
        "## Data and licence",
        "MSD Task04 Hippocampus (Medical Segmentation Decathlon): 208 labelled mono-modal MR cases, 1 mm "
        "isotropic, cropped around the hippocampus. Licence **CC-BY-SA 4.0**; this model is a derivative "
        "shared under the same licence. Attribution: " + ATTRIBUTION + ".",
        "",
        "## Training",
        "```",
        info["command"],
        "```",
        f"- Network: {network}; features per stage {kw['features_per_stage']}, strides {kw['strides']}, "
        f"patch {configuration['patch_size']} (nnU-Net's planner; only the width was set), "
        f"{info['parameters']:,} parameters" + (
            f"; weights stored as float16 ({'to stay under 20 MB' if info['parameters'] * 4 > 20e6 else 'half the file'}"
            "; they load into the float32 network; the Dice below is of the stored weights)."
            if info["command"].endswith("--half-weights") else "."),
        f"- Schedule: {args.epochs} epochs x {args.iterations} iterations, batch {args.batch_size} "
        f"({args.epochs * args.iterations * args.batch_size} patches seen; nnU-Net's default is 1000 x 250 x "
        f"batch 9). Everything else nnU-Net's default trainer: Dice + CE with deep supervision, SGD Nesterov "
        f"0.99, lr 0.01 poly decay over these epochs, weight decay 3e-5, nnU-Net's augmentation; "
        f"{args.val_iterations} pseudo-Dice validation iterations per epoch (logged only). Seed {args.seed}.",
        "- Budget: every hippocampus model of this script (plain nnU-Net, MBTFE-UNet, UNet++, SegResNetVAE, 3D "
        "U-Net) uses this same schedule, data, split, plans, batch and seed: the same number of training "
        "iterations and patches seen, not the same wall time (the networks' steps differ in cost on a CPU).",
        f"- Split: nnU-Net's default 5-fold split (sklearn KFold, shuffle, random_state 12345, over the sorted "
        f"case ids); fold {FOLD} trained on {info['n_train']} cases, {info['n_val']} held out.",
        f"- Hardware and wall time: {info['hardware']}; training {info['train_s'] / 60:.1f} min "
        f"(whole script {info['total_s'] / 60:.1f} min incl. evaluation; fingerprint and preprocessing, about "
        f"25 s, were {'cached in --work-dir' if info['cached'] else 'included'})." +
        (f" {info['note']}" if info.get("note") else ""),
        "",
        "## Validation (fold 0, held-out cases)",
        f"Predicted with the SegmentMBTFE engine (`load_model(...).predict`, mirroring TTA, step 0.5, CPU) from "
        f"the original images; Dice per case against the original labels, averaged over the {info['n_val']} "
        f"cases.",
        "",
        "| label | Dice |",
        "|---|---|",
        f"| anterior | {d['anterior']:.4f} |",
        f"| posterior | {d['posterior']:.4f} |",
        f"| mean | {d['mean']:.4f} |",
        "",
        f"This is one fold of a 5-fold cross-validation, not all five. Inference: {info['predict_s']:.2f} s per "
        f"case on this CPU (TTA on). nnU-Net's published result on this task is about 0.90 / 0.89.",
        "",
        "Per-case Dice: `results.json`. Training curve: `fold_0/progress.png`, log `fold_0/training_log.txt`.",
        "",
    ]
    (target / "MODEL_CARD.md").write_text("\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    if args.card_only:
        target = args.output_root.resolve() / args.name
        write_card(args, target, json.loads((target / "results.json").read_text()))
        return
    started = time.perf_counter()
    work = args.work_dir.resolve()
    set_environment(work, args.threads)
    data_dir = args.data_dir.resolve()
    if not (data_dir / "images").is_dir():
        sys.exit(f"No hippocampus data at {data_dir} (expected images/ and labels/).")
    cached = (args.work_dir.resolve() / "nnUNet_preprocessed" / DATASET_NAME / "plans.done").is_file()
    ids = ensure_raw_and_fingerprint(data_dir)
    pre = ensure_plans_and_preprocessed(args.features_base, args.batch_size)
    split = write_split(pre, ids)
    print(f"[train_hippocampus] fold {FOLD}: {len(split['train'])} train, {len(split['val'])} validation cases",
          flush=True)
    trained, train_s, n_params, trainer_name = train(args, pre)
    print(f"[train_hippocampus] training: {train_s:.1f} s, {n_params} parameters", flush=True)
    target = args.output_root.resolve() / args.name
    export_model_folder(trained, target, args.half_weights)
    import nnunetv2  # noqa: F401
    from importlib.metadata import version
    info = {"command": "python models/train_hippocampus.py " + " ".join(
        f"{k} {v}" for k, v in (("--network", args.network), ("--name", args.name), ("--epochs", args.epochs),
                                ("--iterations", args.iterations), ("--val-iterations", args.val_iterations),
                                ("--features-base", args.features_base), ("--batch-size", args.batch_size),
                                ("--seed", args.seed), ("--threads", args.threads))) +
            (" --half-weights" if args.half_weights else ""),
            "trainer": trainer_name, "nnunetv2": version("nnunetv2"), "torch": version("torch"),
            "parameters": n_params, "train_s": train_s, "cached": cached, "n_train": len(split["train"]), "n_val": len(split["val"]),
            "hardware": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU, "
                        f"{args.threads} torch thread{'s' if args.threads != 1 else ''}",
            "validation_cases": split["val"]}
    if args.no_eval:
        info["total_s"] = time.perf_counter() - started
        (target / "results.json").write_text(json.dumps(info, indent=1))
        print(f"[train_hippocampus] done (no evaluation): {target}", flush=True)
        return
    dice, per_case, predict_s = evaluate(target, data_dir, split["val"][:args.max_eval_cases], args.threads)
    info.update(dice=dice, dice_per_case=per_case, predict_s=predict_s, total_s=time.perf_counter() - started)
    (target / "results.json").write_text(json.dumps(info, indent=1))
    write_card(args, target, info)
    print(f"[train_hippocampus] validation Dice: {json.dumps(dice)}", flush=True)
    print(f"[train_hippocampus] {target}: {folder_size(target) / 1e6:.2f} MB, total "
          f"{info['total_s'] / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
