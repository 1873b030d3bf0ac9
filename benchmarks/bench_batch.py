"""A folder of real cases: `segment-mbtfe predict -i DIR -o DIR` against nnU-Net's own folder prediction.

nnU-Net's `nnUNetv2_predict_from_modelfolder` (nnUNetPredictor.predict_from_files) overlaps reading,
preprocessing and export with the network through its worker processes (-npp, -nps, default 3 each); ours
overlaps them with threads in one process (overlap.py). Both segment the same real hippocampus cases
(never among the six the model was trained on) with the same nnU-Net-made model folder, fold, TTA setting and
device (CPU), each as one fresh process: start-up, model load, every case read, segmented and written.
Printed: the whole-process time of each, ours overlapped (--overlap on) against ours one stage at a time
(--overlap off), the ratios, and the label agreement of our outputs with nnU-Net's.

    .venv/bin/python benchmarks/bench_batch.py                 # 20 cases, TTA on, 1 run each
    .venv/bin/python benchmarks/bench_batch.py --cases 40 --repeats 2 --no-tta

Needs the test environment (scripts/setup-venv.sh --test) for nnunetv2 and ../shared/data.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing"))
import nnunet_reference as ref  # noqa: E402

DATA = ref.DEFAULT_DATA_DIR
BIN = Path(sys.executable).parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20, help="how many real hippocampus cases (the last ones)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each tool (the median is printed)")
    parser.add_argument("--no-tta", action="store_true", help="without mirroring test-time augmentation")
    parser.add_argument("--kind", default="hippo3d", help="nnunet_reference model kind (hippo3d)")
    parser.add_argument("--work", default=str(REPO / "benchmarks" / "results" / "batch"), help="models and outputs")
    parser.add_argument("--skip-nnunet", action="store_true", help="ours only: overlapped against one stage at a time")
    args = parser.parse_args()
    work = Path(args.work)
    model = ref.make_model_folder(work.parent / "models", kind=args.kind)
    inputs = case_folder(work / "inputs", args.cases)
    tta = [] if not args.no_tta else ["--no-tta"]
    runs = {
        "ours, overlapped": lambda out: [str(BIN / "segment-mbtfe"), "predict", "-q", "-m", str(model), "-f", "0",
                                         "--device", "cpu", "-i", str(inputs), "-o", str(out), "--format", ".nii.gz",
                                         "--overlap", "on", *tta],
        "ours, one stage at a time": lambda out: runs["ours, overlapped"](out)[:-1 - len(tta)] + ["off", *tta],
        "nnU-Net predict_from_files": lambda out: [str(BIN / "nnUNetv2_predict_from_modelfolder"), "-i", str(inputs),
                                                   "-o", str(out), "-m", str(model), "-f", "0", "-device",
                                                   "cpu"] + (["--disable_tta"] if args.no_tta else []),
    }
    if args.skip_nnunet:
        del runs["nnU-Net predict_from_files"]
    env = dict(os.environ, nnUNet_raw=str(work / "nnUNet_raw"), nnUNet_preprocessed=str(work / "nnUNet_pre"),
               nnUNet_results=str(work / "nnUNet_results"), nnUNet_compile="false")
    times = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name, command in runs.items():  # alternating, so a load on the machine hits all alike
            out = work / "outputs" / name.split(",")[0].split()[0].lower() / name.replace(" ", "_").replace(",", "")
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            done = subprocess.run(command(out), env=env, capture_output=True, text=True)
            times[name].append(time.perf_counter() - started)
            if done.returncode != 0:
                sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    report(times, args, work, inputs)


def case_folder(folder: Path, count: int) -> Path:
    """The last `count` hippocampus cases, linked as nnU-Net's case_0000.nii.gz (what both tools read)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    ids = ref.hippocampus_case_ids(DATA)[-count:]
    for case in ids:
        (folder / f"{case}_0000.nii.gz").symlink_to(DATA / "hippocampus" / "train" / "images" / f"{case}.nii.gz")
    return folder


def report(times: dict, args, work: Path, inputs: Path):
    median = {name: statistics.median(values) for name, values in times.items()}
    nnunet = median.get("nnU-Net predict_from_files", float("nan"))
    print(f"{args.cases} real hippocampus cases, model {args.kind} fold 0, TTA {'off' if args.no_tta else 'on'}, CPU, "
          f"{os.cpu_count()} cores; whole process, median of {args.repeats}:")
    for name, seconds in median.items():
        print(f"  {name:<30} {seconds:7.1f} s  ({seconds / args.cases:.2f} s a case)   ratio to nnU-Net "
              f"{seconds / nnunet:.2f}")
    print(f"  overlapped / one stage at a time: {median['ours, overlapped'] / median['ours, one stage at a time']:.2f}")
    if args.skip_nnunet:
        return
    ours = work / "outputs" / "ours" / "ours_overlapped"
    theirs = work / "outputs" / "nnu-net" / "nnU-Net_predict_from_files"
    agreements = [ref.agreement(ours / p.name.replace("_0000", ""), theirs / p.name.replace("_0000", ""))
                  for p in sorted(inputs.iterdir())]
    print(f"  label agreement with nnU-Net: min {min(agreements) * 100:.4f}%, mean "
          f"{statistics.mean(agreements) * 100:.4f}% over {len(agreements)} cases")


if __name__ == "__main__":
    main()
