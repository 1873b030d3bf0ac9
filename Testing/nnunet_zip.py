"""Model zips made by nnU-Net v2 itself: export_pretrained_model (`nnUNetv2_export_model_to_zip`) run on a model
folder that nnunet_reference.py built with nnU-Net's own planner and trainer.

The export takes each fold's `validation/summary.json`, which nnU-Net writes when training ends with its
validation; the reference models skip that step so that they build in seconds. So, in a work folder of its own,
this first runs nnU-Net's own validation on a copy of the model folder (run_training(only_run_validation=True),
what `nnUNetv2_train DATASET CONFIGURATION FOLD --val` does), with the reference root's preprocessed data and the
ground truth nnU-Net's preprocessing keeps beside it (gt_segmentations: the raw labelsTr, which
nnUNetv2_preprocess copies there), then exports. As in nnunet_reference.py, nnunetv2 runs in a subprocess of this
file, with the nnUNet_* variables pointing at the work folder.

    export_zip(root, model_dir) -> root/zips/<dataset>__<trained folder>.zip
        (made again when the model folder, this file or nnunetv2 changes)
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nnunet_reference as ref
from build_lock import build_once


def export_zip(root, model_dir, timeout: float = 600) -> Path:
    """A zip of `model_dir` (a trained folder under root's nnUNet_results or variants) made by nnU-Net's export."""
    root, model_dir = Path(root).resolve(), Path(model_dir).resolve()
    folds = sorted(p.name[len("fold_"):] for p in model_dir.glob("fold_*") if p.is_dir())
    target = root / "zips" / f"{model_dir.parent.name}__{model_dir.name}.zip"
    build_once(root, target.with_suffix(".json"), _key(model_dir),
               lambda: _export(root, model_dir, target, folds, timeout), target.is_file)
    return target


def _export(root: Path, model_dir: Path, target: Path, folds: list, timeout: float) -> None:
    dataset, (trainer, plans, configuration) = model_dir.parent.name, model_dir.name.split("__")
    work = root / "zips" / f"work_{dataset}__{model_dir.name}"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(model_dir, work / "nnUNet_results" / dataset / model_dir.name)
    preprocessed = work / "nnUNet_preprocessed" / dataset
    shutil.copytree(root / "nnUNet_preprocessed" / dataset, preprocessed)
    # nnU-Net's own preprocessing may have put it there already (reference kinds that run nnU-Net's validation)
    shutil.copytree(root / "nnUNet_raw" / dataset / "labelsTr", preprocessed / "gt_segmentations", dirs_exist_ok=True)
    request = {"dataset": dataset, "trainer": trainer, "plans": plans, "configuration": configuration,
               "folds": [f if f == "all" else int(f) for f in folds], "zip": str(target)}
    request_file = work / "request.json"
    request_file.write_text(json.dumps(request))
    env = dict(os.environ, **_environment(root, work))
    target.unlink(missing_ok=True)
    with open(work / "export.log", "w") as log:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(request_file)], env=env,
                              stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=work)
    if done.returncode != 0 or not target.is_file():
        tail = (work / "export.log").read_text(errors="replace")[-4000:]
        raise ref.NnunetReferenceError(f"nnU-Net's export failed (exit {done.returncode}):\n{tail}")
    shutil.rmtree(work, ignore_errors=True)


def _key(model_dir: Path) -> dict:
    checkpoints = {str(p.relative_to(model_dir)): [p.stat().st_size, p.stat().st_mtime_ns]
                   for p in sorted(model_dir.glob("fold_*/checkpoint_*.pth"))}
    return {"source": hashlib.sha1(Path(__file__).read_bytes()).hexdigest(), "model": str(model_dir),
            "checkpoints": checkpoints, "nnunetv2": importlib.metadata.version("nnunetv2")}


def _environment(root: Path, work: Path) -> dict:
    env = ref._nnunet_environment(root, work, building=True)  # one thread, one process, as the builds
    env.update({"nnUNet_preprocessed": str(work / "nnUNet_preprocessed"), "nnUNet_n_proc_DA": "0"})
    return env


def _worker(request: dict) -> None:
    """In the subprocess: nnU-Net's validation of each fold, then its export."""
    import torch
    from nnunetv2.model_sharing.model_export import export_pretrained_model
    from nnunetv2.run.run_training import run_training
    for fold in request["folds"]:
        run_training(request["dataset"], request["configuration"], fold, request["trainer"], request["plans"],
                     only_run_validation=True, device=torch.device("cpu"))
    export_pretrained_model(request["dataset"], request["zip"], configurations=(request["configuration"],),
                            trainer=request["trainer"], plans_identifier=request["plans"],
                            folds=tuple(request["folds"]))


if __name__ == "__main__":  # the guard nnU-Net's validation needs: it starts its export workers with spawn
    _worker(json.loads(Path(sys.argv[1]).read_text()))
