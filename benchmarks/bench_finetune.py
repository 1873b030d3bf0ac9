"""Fine-tuning benchmark: the shipped default model, 10 "corrected" hippocampus cases, the rest held out.

    .venv/bin/python benchmarks/bench_finetune.py [--model models/hippocampus_nnunet] [--cases 10]

The check of issue #5 on our own split: the shipped model never saw the 42 validation cases of its fold 0
(models/<name>/results.json). Their reference labels stand in for a clinician's corrections: the first
`--cases` of them are the fine-tuning cases, the others the "other held-out cases". The script
  1. predicts all of them with the shipped model (TTA on, as `segment-mbtfe predict` does by default),
  2. runs `segment-mbtfe finetune` (a fresh process, default settings: a 5-minute time budget on a CPU; its
     wall time measured against issue 10's 300 s limit) writing a new version into a temporary versions home,
  3. predicts one case through `segment-mbtfe predict` with the new version (it must load there), and all
     cases in-process with it,
  4. checks that the shipped model's files are byte-identical, and prints Dice before/after on both groups
     and where the fine-tune's time went (from the version's provenance).
Exit status 1 when a condition of the issue is not met (Dice on the fine-tuning cases not raised, other
cases lowered by more than 0.01, over 300 s, shipped files changed).
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SegmentMBTFE"))
DATA = REPO.parent / "shared" / "data" / "hippocampus" / "train"
LIMIT_S = 300


def main():
    from SegmentMBTFELib.models.shipped import default_model
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=default_model())
    p.add_argument("--cases", type=int, default=10, help="fine-tuning cases (the rest are the other held-out cases)")
    p.add_argument("--others", type=int, help="evaluate only this many other cases (quicker runs)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `segment-mbtfe finetune` options")
    args = p.parse_args()

    cases = json.loads((args.model / "results.json").read_text())["validation_cases"]
    tune, others = cases[:args.cases], cases[args.cases:][:args.others]
    files_before = _hashes(args.model)
    home = Path(tempfile.mkdtemp(prefix="segmentmbtfe_bench_home_"))
    env = {**os.environ, "SEGMENTMBTFE_HOME": str(home)}
    print(f"model {args.model.name}: {len(tune)} fine-tuning cases, {len(others)} other held-out cases; "
          f"{os.cpu_count()} CPU cores", flush=True)

    before = {name: _dice(args.model, group) for name, group in (("tuned", tune), ("others", others))}
    target = home / "bench_version"
    command = [str(REPO / ".venv" / "bin" / "segment-mbtfe"), "finetune", "-m", str(args.model), "-q",
               "-o", str(target), "-i", *[str(DATA / "images" / f"{c}.nii.gz") for c in tune],
               "-l", *[str(DATA / "labels" / f"{c}.nii.gz") for c in tune], *args.extra]
    started = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    finetune_s = time.perf_counter() - started
    print(run.stdout.strip(), run.stderr.strip()[-2000:], sep="\n", flush=True)
    if run.returncode:
        sys.exit(f"segment-mbtfe finetune failed ({run.returncode})")

    with tempfile.TemporaryDirectory() as out:  # the new version must load through `segment-mbtfe predict`
        predicted = subprocess.run([command[0], "predict", "-m", str(target), "-q", "-i",
                                    str(DATA / "images" / f"{others[0]}.nii.gz"), "-o", f"{out}/case.nii.gz"],
                                   env=env, capture_output=True, text=True)
        loads = predicted.returncode == 0 and Path(f"{out}/case.nii.gz").is_file()
    after = {name: _dice(target, group) for name, group in (("tuned", tune), ("others", others))}
    run_record = json.loads(next(target.rglob("version.json")).read_text()).get("finetune", {})
    unchanged = _hashes(args.model) == files_before

    print(f"\n{'cases':<28}{'before':>8}{'after':>8}{'change':>9}")
    for name, label in (("tuned", f"fine-tuning cases ({len(tune)})"), ("others", f"other held-out ({len(others)})")):
        b, a = np.mean(before[name]), np.mean(after[name])
        print(f"{label:<28}{b:8.4f}{a:8.4f}{a - b:+9.4f}")
    print(f"fine-tune command wall time: {finetune_s:.0f} s (limit {LIMIT_S} s, ratio {finetune_s / LIMIT_S:.2f}); "
          f"{run_record.get('iterations')} iterations, budget {run_record.get('budget_s')} s")
    print("where the time went: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in run_record.get("timing", {}).items()))
    print(f"new version loads in `segment-mbtfe predict`: {loads}; shipped files byte-identical: {unchanged}")
    ok = [np.mean(after["tuned"]) > np.mean(before["tuned"]), np.mean(after["others"]) >= np.mean(before["others"]) - 0.01,
          finetune_s <= LIMIT_S, loads, unchanged]
    print("PASS" if all(ok) else f"FAIL {ok}")
    return 0 if all(ok) else 1


def _dice(model_dir: Path, cases):
    """Mean Dice over both labels per case, TTA on."""
    from SegmentMBTFELib import load_model, read_volume
    from SegmentMBTFELib.training.finetune import dice_per_label
    model = load_model(model_dir)
    means = []
    for case in cases:
        labels = read_volume(DATA / "labels" / f"{case}.nii.gz")
        prediction = model.predict([read_volume(DATA / "images" / f"{case}.nii.gz")], tta=True)
        means.append(float(np.mean(list(dice_per_label(prediction.labels.array, labels.array, model.labels).values()))))
    return means


def _hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


if __name__ == "__main__":
    sys.exit(main())
