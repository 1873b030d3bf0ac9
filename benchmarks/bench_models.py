"""Compare the shipped models side by side: parameters, file size, inference time and peak memory.

    .venv/bin/python benchmarks/bench_models.py [--cases 5] [--device cpu|cuda] [--repeats 3]
        [--models hippocampus_nnunet hippocampus_mbtfe hippocampus_unetpp ...]   (names under models/, or folders)

Each model predicts the first `--cases` of its held-out validation cases (results.json) in a fresh
process per (model, TTA) run, alternating between models so machine load hits all alike; a run reports
the median seconds per case (after one warm-up case) and the process's peak resident memory (CPU) or
torch's peak allocated GPU memory (CUDA). Ratios are to the first model (plain nnU-Net by default), and
"Dice - first" is the mean per-case difference of held-out Dice (results.json, the same cases) with its paired
standard error: the number models/README.md's shipping rule reads.
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
MODELS = ("hippocampus_nnunet", "hippocampus_mbtfe")  # the shipped ones; --models adds UNet++, SegResNetVAE, ...


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="fresh-process runs per model and TTA setting")
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", default=list(MODELS),
                   help="model folders (names under models/ or paths) to compare; the first is the baseline")
    p.add_argument("--one", nargs=3, metavar=("MODEL", "TTA", "CASES"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return _one(args.one[0], args.one[1] == "1", int(args.one[2]), args.device)

    models = args.models
    rows = {}
    for name in models:
        rows[name] = _static(_folder(name))
    for tta in (False, True):
        runs = {name: [] for name in models}
        for _ in range(args.repeats):
            for name in models:
                out = subprocess.run([sys.executable, __file__, "--device", args.device, "--one", name,
                                      "1" if tta else "0", str(args.cases)], capture_output=True, text=True)
                if out.returncode:
                    sys.exit(out.stderr)
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for name in models:
            key = "tta" if tta else "no_tta"
            rows[name][f"s_per_case_{key}"] = statistics.median(r["s_per_case"] for r in runs[name])
            rows[name][f"peak_mb_{key}"] = statistics.median(r["peak_mb"] for r in runs[name])
    for name in models:
        rows[name]["dice_difference"] = _paired_difference(rows[name], rows[models[0]])
    print(f"device {args.device}; {args.cases} cases per run, medians of {args.repeats} fresh processes\n")
    _print_table(rows, models)


def _folder(name: str) -> Path:
    return Path(name) if Path(name).is_dir() else REPO / "models" / name


def _print_table(rows: dict, models) -> None:
    """One column per model (its network family and folder on top); the ratio to the first model in brackets."""
    lines = [("", [rows[m]["network"] for m in models]), ("", [Path(m).name for m in models])]
    for key, label, fmt in (("parameters", "parameters", "{:,.0f}"), ("file_mb", "checkpoint MB", "{:.1f}"),
                            ("dice_anterior", "held-out Dice anterior", "{:.4f}"),
                            ("dice_posterior", "held-out Dice posterior", "{:.4f}"),
                            ("dice_mean", "held-out Dice mean", "{:.4f}"),
                            ("s_per_case_no_tta", "s/case, no TTA", "{:.2f}"), ("s_per_case_tta", "s/case, TTA", "{:.2f}"),
                            ("peak_mb_no_tta", "peak memory MB, no TTA", "{:.0f}"),
                            ("peak_mb_tta", "peak memory MB, TTA", "{:.0f}")):
        base = rows[models[0]][key]
        lines.append((label, [fmt.format(rows[m][key]) + (f" ({rows[m][key] / base:.2f})" if m != models[0] and base
                                                          else "") for m in models]))
    lines.append(("Dice - first (paired SE)", ["" if m == models[0] else "{:+.4f} +- {:.4f}".format(
        *rows[m]["dice_difference"]) for m in models]))
    width = 2 + max(len(cell) for _, cells in lines for cell in cells)
    for label, cells in lines:
        print(f"{label:<26}" + "".join(f"{cell:>{width}}" for cell in cells))


def _paired_difference(row: dict, base: dict):
    """Mean per-case difference of mean Dice to the baseline, and its standard error, over the cases both have."""
    cases = sorted(set(row["dice_per_case"]) & set(base["dice_per_case"]))
    if len(cases) < 2:
        return float("nan"), float("nan")

    def mean_dice(per_case, case):
        return statistics.fmean(per_case[case].values())
    differences = [mean_dice(row["dice_per_case"], c) - mean_dice(base["dice_per_case"], c) for c in cases]
    return statistics.fmean(differences), statistics.stdev(differences) / len(differences) ** 0.5


def _static(folder: Path) -> dict:
    from SegmentMBTFELib import load_model
    from SegmentMBTFELib.models.table import network_text
    model = load_model(folder)
    results = json.loads((folder / "results.json").read_text())
    return {"parameters": sum(p.numel() for p in model.network.parameters()),
            "file_mb": (folder / "fold_0" / "checkpoint_final.pth").stat().st_size / 1e6,
            "network": network_text(model.configuration.architecture, model.trainer_name).split(" (")[0],
            "dice_anterior": results["dice"]["anterior"], "dice_posterior": results["dice"]["posterior"],
            "dice_mean": results["dice"]["mean"], "dice_per_case": results.get("dice_per_case", {})}


def _one(name: str, tta: bool, n_cases: int, device: str):
    """One fresh process: load, warm up on one case, time the others; print one JSON line."""
    import torch
    from SegmentMBTFELib import load_model, read_volume
    folder = _folder(name)
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
