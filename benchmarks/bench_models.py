"""Compare the shipped models side by side: parameters, file size, inference time and peak memory.

    .venv/bin/python benchmarks/bench_models.py [--cases 5] [--device cpu|cuda] [--repeats 3]

Each model predicts the first `--cases` of its held-out validation cases (results.json) in a fresh
process per (model, TTA) run, alternating between models so machine load hits both alike; a run reports
the median seconds per case (after one warm-up case) and the process's peak resident memory (CPU) or
torch's peak allocated GPU memory (CUDA). Ratios are MBTFE-UNet / plain nnU-Net.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SegmentMBTFE"))
DATA = REPO.parent / "shared" / "data" / "hippocampus" / "train"
MODELS = ("hippocampus_nnunet", "hippocampus_mbtfe")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="fresh-process runs per model and TTA setting")
    p.add_argument("--device", default="cpu")
    p.add_argument("--one", nargs=3, metavar=("MODEL", "TTA", "CASES"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return _one(args.one[0], args.one[1] == "1", int(args.one[2]), args.device)

    rows = {}
    for name in MODELS:
        rows[name] = _static(REPO / "models" / name)
    for tta in (False, True):
        runs = {name: [] for name in MODELS}
        for _ in range(args.repeats):
            for name in MODELS:
                out = subprocess.run([sys.executable, __file__, "--device", args.device, "--one", name,
                                      "1" if tta else "0", str(args.cases)], capture_output=True, text=True)
                if out.returncode:
                    sys.exit(out.stderr)
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for name in MODELS:
            key = "tta" if tta else "no_tta"
            rows[name][f"s_per_case_{key}"] = statistics.median(r["s_per_case"] for r in runs[name])
            rows[name][f"peak_mb_{key}"] = statistics.median(r["peak_mb"] for r in runs[name])

    plain, mbtfe = (rows[n] for n in MODELS)
    print(f"device {args.device}; {args.cases} cases per run, medians of {args.repeats} fresh processes\n")
    print(f"{'':<26}{'plain nnU-Net':>15}{'MBTFE-UNet':>13}{'ratio':>8}")
    for key, label, fmt in (("parameters", "parameters", "{:,.0f}"), ("file_mb", "checkpoint MB", "{:.1f}"),
                            ("dice_mean", "held-out Dice (card)", "{:.4f}"),
                            ("s_per_case_no_tta", "s/case, no TTA", "{:.2f}"), ("s_per_case_tta", "s/case, TTA", "{:.2f}"),
                            ("peak_mb_no_tta", "peak memory MB, no TTA", "{:.0f}"), ("peak_mb_tta", "peak memory MB, TTA", "{:.0f}")):
        print(f"{label:<26}{fmt.format(plain[key]):>15}{fmt.format(mbtfe[key]):>13}{mbtfe[key] / plain[key]:>8.2f}")


def _static(folder: Path) -> dict:
    from SegmentMBTFELib import load_model
    model = load_model(folder)
    results = json.loads((folder / "results.json").read_text())
    return {"parameters": sum(p.numel() for p in model.network.parameters()),
            "file_mb": (folder / "fold_0" / "checkpoint_final.pth").stat().st_size / 1e6,
            "dice_mean": results["dice"]["mean"]}


def _one(name: str, tta: bool, n_cases: int, device: str):
    """One fresh process: load, warm up on one case, time the others; print one JSON line."""
    import torch
    from SegmentMBTFELib import load_model, read_volume
    folder = REPO / "models" / name
    cases = json.loads((folder / "results.json").read_text())["validation_cases"][:n_cases + 1]
    volumes = [[read_volume(DATA / "images" / f"{c}.nii.gz")] for c in cases]
    model = load_model(folder)
    model.predict(volumes[0], device=device, tta=tta)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for v in volumes[1:]:
        started = time.perf_counter()
        model.predict(v, device=device, tta=tta)
        times.append(time.perf_counter() - started)
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"s_per_case": statistics.median(times), "peak_mb": peak}))


if __name__ == "__main__":
    sys.exit(main())
