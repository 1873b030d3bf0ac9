"""Speed of `segment-mbtfe predict` against nnU-Net's own nnUNetPredictor, side by side in one run.

Both tools segment the same image with the same nnU-Net-made model folder, folds, TTA setting and device
(CPU), as fresh processes (what a user waits for: start-up, reading, prediction, export, writing),
alternating ours and nnU-Net's, `--repeats` times each. Prints median times, the ratio ours / nnU-Net,
nnU-Net's in-process prediction time, the label agreement of the two outputs, and how close each case's network
runs to this CPU's peak (benchmarks/flops.py: FLOPs per tile, seconds per tile, fraction of a large float32
matrix product's GFLOP/s).

    .venv/bin/python benchmarks/bench_predict.py                # all cases, 3 repeats
    .venv/bin/python benchmarks/bench_predict.py --cases hippo_tta --repeats 5
    .venv/bin/python benchmarks/bench_predict.py --backend openvino   # ours with OpenVINO (default: torch)
    .venv/bin/python benchmarks/bench_predict.py --cases primus_s_tta,primus_v3s_tta   # Primus (README, Speed)

With OpenVINO (--backend auto when it is installed, or openvino) the first run of each model converts the
network and caches it (backends.py); that run is made before the timed ones and its time printed apart.

Needs the test environment (scripts/setup-venv.sh --test) for nnunetv2 and ../shared/data.
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing"))
sys.path.insert(0, str(REPO / "benchmarks"))
import nnunet_reference as ref  # noqa: E402

DATA = ref.DEFAULT_DATA_DIR
# name: (model kind, image source, TTA, what it shows)
CASES = {
    "hippo_tta": ("hippo3d", "hippocampus", True, "small 3-class model, 1 fold, mirroring TTA"),
    "hippo_2folds": ("hippo3d_2folds", "hippocampus", True, "2-fold ensemble with TTA"),
    "ct_export": ("ct_aniso", "ct", False, "5-class anisotropic CT, separate-z resampling, export-heavy"),
    "ct_tta": ("ct_aniso", "ct", True, "5-class anisotropic CT with TTA"),
    "primus_s_tta": ("hippo3d_primus_s", "hippocampus", True, "Primus-S (nnUNet_Primus_S_Trainer), TTA"),
    "primus_v3s_tta": ("hippo3d_primusv3_s", "hippocampus", True, "Primus V3-S (nnUNet_PrimusV3S_Trainer), TTA"),
}
# flops.py counts convolutions: the Primus cases' transformer would be left out of their FLOPs
CONVOLUTIONAL = [name for name in CASES if not name.startswith("primus")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=str(REPO / "benchmarks" / "results"), help="models and outputs")
    parser.add_argument("--backend", default="torch", choices=("auto", "torch", "openvino"),
                        help="what runs our network on the CPU (segment-mbtfe predict --backend)")
    args = parser.parse_args()
    work = Path(args.work)
    rows = [run_case(name, work, args.repeats, args.backend) for name in args.cases.split(",")]
    print_table(rows)
    import flops
    peak = flops.peak_gflops()
    print(f"\nthe networks against this CPU's peak ({peak:.0f} GFLOP/s, float32 matrix product):")
    for kind in dict.fromkeys(CASES[name][0] for name in args.cases.split(",") if name in CONVOLUTIONAL):
        for backend in dict.fromkeys(["torch", *{r["backend"] for r in rows if r["backend"] != "torch"}]):
            print(flops.line(flops.report(ref.make_model_folder(work / "models", kind=kind), peak, backend)))


def image_for(source: str, work: Path) -> Path:
    if source == "hippocampus":  # the last case: not among the six the model was trained on
        case = ref.hippocampus_case_ids(DATA)[-1]
        return DATA / "hippocampus" / "train" / "images" / f"{case}.nii.gz"
    target = work / "inputs" / "ct_dicom.nii.gz"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        ref.dicom_series_to_file(DATA / "formats" / "totalsegmentator" / "example_ct_dicom", target)
    return target


def run_case(name: str, work: Path, repeats: int, backend: str = "auto") -> dict:
    kind, source, tta, what = CASES[name]
    model = ref.make_model_folder(work / "models", kind=kind)
    folds = list(ref.ALL_KINDS[kind].folds)
    image = image_for(source, work)
    out = work / "outputs" / name
    # `segment-mbtfe` of this Python (python -m runs the same entry point; the engine this Python imports)
    ours_cmd = [sys.executable, "-m", "SegmentMBTFELib", "predict", "-m", str(model), "-i", str(image),
                "-o", str(out / "ours.nii.gz"), "--device", "cpu", "-q", "--folds", *map(str, folds),
                "--backend", backend]
    if not tta:
        ours_cmd.append("--no-tta")
    started = time.perf_counter()
    used = backend_used(subprocess.run(ours_cmd, check=True, capture_output=True, text=True).stdout)
    if used != "torch":
        print(f"{name}: first run (converts the network once per model, then cached): "
              f"{time.perf_counter() - started:.1f} s", flush=True)
    ours, theirs, theirs_inside = [], [], []
    for i in range(repeats):
        started = time.perf_counter()
        used = backend_used(subprocess.run(ours_cmd, check=True, capture_output=True, text=True).stdout)
        ours.append(time.perf_counter() - started)
        started = time.perf_counter()
        [reference] = ref.predict_with_nnunet(model, [[image]], out / "nnunet", folds=folds, tta=tta)
        theirs.append(time.perf_counter() - started)
        theirs_inside.append(ref.read_timing(out / "nnunet")["predict_s"])
        print(f"{name} run {i + 1}/{repeats}: ours ({used}) {ours[-1]:.1f} s, nnU-Net {theirs[-1]:.1f} s", flush=True)
    return {"case": name, "what": what, "backend": used, "ours": statistics.median(ours),
            "nnunet": statistics.median(theirs),
            "nnunet_inside": statistics.median(theirs_inside),
            "agreement": ref.agreement(out / "ours.nii.gz", reference)}


def backend_used(stdout: str) -> str:
    """What ran our network, from the command's last line ('... on cpu with OpenVINO.')."""
    return "openvino" if "with OpenVINO" in stdout else "torch"


def print_table(rows):
    print(f"\n{'case':<14}{'backend':>9}{'ours s':>9}{'nnU-Net s':>11}{'ratio':>8}{'nnU-Net in-process s':>22}"
          f"{'agreement':>11}  what")
    for r in rows:
        print(f"{r['case']:<14}{r['backend']:>9}{r['ours']:>9.2f}{r['nnunet']:>11.2f}{r['ours'] / r['nnunet']:>8.3f}"
              f"{r['nnunet_inside']:>22.2f}{r['agreement']:>11.6f}  {r['what']}")
    print("ratio = median wall time of `segment-mbtfe predict` / median wall time of nnUNetPredictor, both as "
          "fresh processes on the CPU.")


if __name__ == "__main__":
    main()
