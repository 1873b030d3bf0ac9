"""A whole-body-sized CT through a many-label model: time and peak memory of ours and nnU-Net's, side by side.

    .venv/bin/python benchmarks/bench_big_ct.py [--slices 300] [--work benchmarks/results/big_ct] [--backend torch]

The CT is the 512 x 512 x 20 DICOM series of ../shared/data/formats/totalsegmentator/example_ct_dicom stacked
along z to --slices slices (0.977 x 0.977 x 2 mm); the model is nnU-Net-made (nnunet_reference kind "ct25":
25 labels, 1.5 mm isotropic, tiny network), so the work is dominated by what does not depend on the network:
resampling 80 M voxels to 1.5 mm and 26 classes of logits back. Each tool runs as a fresh process on the CPU
without TTA (`segment-mbtfe predict` and nnunetv2's nnUNetPredictor through Testing/nnunet_reference.py),
while a sampler adds up the resident memory of the process and all its children every 0.1 s. Prints wall
times, peak memory, their ratios (issue 10's floors: time <= 0.33x, memory <= 0.25x) and label agreement.
--backend chooses what runs our network on the CPU (segment-mbtfe predict --backend; default torch; auto: OpenVINO when
installed); OpenVINO's one-time conversion of the network (cached per model) is made and timed before. Linux only
(reads /proc). nnU-Net needs about 17 GB here: run it on a machine with 24 GB, nothing else running.
"""
import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing"))
import nnunet_reference as ref  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / "results" / "big_ct")
    p.add_argument("--skip-nnunet", action="store_true", help="ours only (no ratios)")
    p.add_argument("--backend", default="torch", choices=("auto", "torch", "openvino"),
                   help="what runs our network on the CPU")
    args = p.parse_args()
    image = big_ct(args.work / "inputs" / f"ct_{args.slices}.nii.gz", args.slices)
    model = ref.make_model_folder(args.work / "models", kind="ct25")
    out = args.work / "outputs"
    out.mkdir(parents=True, exist_ok=True)
    backend = prepare_backend(model, args.backend)

    ours_file = out / "ours.nii.gz"
    ours = measured([str(REPO / ".venv" / "bin" / "segment-mbtfe"), "predict", "-m", str(model), "-i", str(image),
                     "-o", str(ours_file), "--no-tta", "--device", "cpu", "-q", "--backend", args.backend])
    print(f"ours:    {ours['seconds']:7.1f} s, peak {ours['peak_gb']:5.2f} GB ({backend})", flush=True)
    if args.skip_nnunet:
        return
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'Testing')!r}); import nnunet_reference as ref; "
            f"ref.predict_with_nnunet({str(model)!r}, [[{str(image)!r}]], {str(out / 'nnunet')!r}, folds=(0,), "
            f"tta=False, threads=2, timeout=3600)")
    theirs = measured([sys.executable, "-c", code])
    print(f"nnU-Net: {theirs['seconds']:7.1f} s, peak {theirs['peak_gb']:5.2f} GB", flush=True)
    agreement = ref.agreement(ours_file, out / "nnunet" / image.name)
    print(f"\n{args.slices}-slice CT (512 x 512), {model.parent.name}: ours ({backend}) / nnU-Net")
    print(f"  time   {ours['seconds']:7.1f} s / {theirs['seconds']:7.1f} s = {ours['seconds'] / theirs['seconds']:.2f}"
          f"  (floor 0.33: {'PASS' if ours['seconds'] <= 0.33 * theirs['seconds'] else 'FAIL'})")
    print(f"  memory {ours['peak_gb']:7.2f} GB / {theirs['peak_gb']:7.2f} GB = {ours['peak_gb'] / theirs['peak_gb']:.2f}"
          f"  (floor 0.25: {'PASS' if ours['peak_gb'] <= 0.25 * theirs['peak_gb'] else 'FAIL'})")
    print(f"  labels equal in {100 * agreement:.4f}% of voxels (floor 99.99%: {'PASS' if agreement >= 0.9999 else 'FAIL'})")


def prepare_backend(model: Path, backend: str) -> str:
    """The backend our command will use; OpenVINO's conversion of the network made (and cached) beforehand,
    in a process of its own, and its time printed: it happens once per model on a machine."""
    code = ("import sys, time, torch; from SegmentMBTFELib import load_model; "
            "from SegmentMBTFELib.inference.backends import cpu_network, use_backend; "
            f"m = load_model({str(model)!r}); use_backend(m, {backend!r}); t = time.perf_counter(); "
            "n = cpu_network(m, 0, torch.device('cpu'), []); "
            "print('openvino' if n is not None else 'torch', time.perf_counter() - t)")
    done = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          check=True)
    used, seconds = done.stdout.split()[-2:]
    if used == "openvino":
        print(f"OpenVINO: network converted (or read from its cache) in {float(seconds):.1f} s, before the timing")
    return used


def big_ct(path: Path, slices: int) -> Path:
    """The DICOM series stacked along z to `slices` slices, as int16 NIfTI (made once)."""
    import SimpleITK as sitk
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    series = ref.DEFAULT_DATA_DIR / "formats" / "totalsegmentator" / "example_ct_dicom"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    sitk.WriteImage(stack_along_z(reader.Execute(), slices), str(path))
    return path


def stack_along_z(one, slices: int):
    """`one` (a SimpleITK image) repeated along z to `slices` slices, as int16, in its geometry."""
    import SimpleITK as sitk
    block = sitk.GetArrayFromImage(one)
    stacked = np.concatenate([block] * -(-slices // len(block)))[:slices]
    image = sitk.GetImageFromArray(stacked.astype(np.int16))
    image.SetSpacing(one.GetSpacing())
    image.SetOrigin(one.GetOrigin())
    image.SetDirection(one.GetDirection())
    return image


def measured(command) -> dict:
    """Run `command`; its wall time and the peak of the summed resident memory of it and its children."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(process.pid))
            time.sleep(0.1)
    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    _, errors = process.communicate()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if process.returncode:
        sys.exit(f"{command[0]} failed ({process.returncode}): {errors.decode()[-2000:]}")
    return {"seconds": seconds, "peak_gb": peak[0] / 1e9}


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += int(open(f"/proc/{current}/statm").read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
        todo += children.get(current, [])
    return total


if __name__ == "__main__":
    main()
