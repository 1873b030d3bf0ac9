"""The GPU path on a real GPU: what benchmarks/gpu_check.sh runs on the device machine (see the README's "GPU check").

    python3 benchmarks/gpu_check.py --carry .gpu_carry [--budget-s 400]
    .venv/bin/python benchmarks/gpu_check.py --carry .gpu_carry --cpu-dry-run   # here: the same steps, on the CPU

Prints, each as one block that says PASS or FAIL (or LEFT OUT, and why):
  1. CUDA against CPU label agreement (>= 99.99%) of both shipped models on real hippocampus volumes, TTA on;
  2. fine-tuning a few iterations on the GPU (autocast fp16 + GradScaler): losses finite, Dice before/after;
  3. ours against nnUNetPredictor on the GPU, the shipped nnU-Net-made model on the same volume, file to file
     with each model loaded (median after a warm-up): ratio and label agreement;
  4. ours on the 512 x 512 x 300 CT through the 25-label model (bench_big_ct.py's), uncapped;
  5. the out-of-memory fallback: a child process whose GPU memory is capped with
     torch.cuda.set_per_process_memory_fraction at half of what step 4 took; it must take a fallback and end
     with step 4's labels;
  6. nnUNetPredictor on that CT: the ratio (goal <= 0.2), when the budget still allows it.
--cpu-dry-run runs every step on the CPU with small sizes (the cap, which needs CUDA, is left out), to check
the script here; its figures mean nothing.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SegmentMBTFE"))
SHIPPED = {"hippocampus_nnunet": REPO / "models" / "hippocampus_nnunet",
           "hippocampus_mbtfe": REPO / "models" / "hippocampus_mbtfe"}
FLOOR = 0.9999


class Check:
    """Shared state: where the carried files are, the device, the deadline, and what one step hands the next."""

    def __init__(self, args):
        self.carry, self.dry = Path(args.carry).resolve(), args.cpu_dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.deadline = time.monotonic() + args.budget_s
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.results = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def hippocampus(self, count=None):
        images = sorted((self.carry / "data" / "hippocampus" / "images").glob("*.nii.gz"))
        return images[:count] if count else images

    def big_ct(self) -> Path:
        """The CT series (512 x 512 x 20) stacked along z to 300 slices (40 in a dry run), as bench_big_ct.py makes it."""
        import SimpleITK as sitk
        slices = 40 if self.dry else 300
        path = self.work / f"ct_{slices}.nii.gz"
        if not path.exists():
            import lzma
            plain = self.work / "ct_20.nii"
            plain.write_bytes(lzma.decompress((self.carry / "data" / "ct_20.nii.xz").read_bytes()))
            from bench_big_ct import stack_along_z
            sitk.WriteImage(stack_along_z(sitk.ReadImage(str(plain)), slices), str(path), True)
        return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--carry", default=str(REPO / ".gpu_carry"), help="what gpu_check.sh prepare made")
    parser.add_argument("--budget-s", type=float, default=400, help="seconds for all the steps")
    parser.add_argument("--cpu-dry-run", action="store_true", help="every step on the CPU, small: checks the script")
    parser.add_argument("--prepare", action="store_true", help="make --carry here (gpu_check.sh prepare)")
    parser.add_argument("--steps", help="only these steps, e.g. big_ct_ours,out_of_memory (default: all)")
    parser.add_argument("--oom-child", help=argparse.SUPPRESS)  # JSON: the capped run of step 5
    args = parser.parse_args()
    if args.oom_child:
        return oom_child(json.loads(args.oom_child))
    if args.prepare:
        return prepare(Path(args.carry))
    check = Check(args)
    environment(check)
    failed = 0
    steps = (agreement, finetuning, against_nnunet, big_ct_ours, out_of_memory, big_ct_nnunet)
    wanted = set(args.steps.split(",")) if args.steps else {step.__name__ for step in steps}
    for step in (s for s in steps if s.__name__ in wanted):
        print(f"\n== {step.__doc__.splitlines()[0]}", flush=True)
        started = time.monotonic()
        try:
            ok = step(check)
        except Exception:  # noqa: BLE001 - one step's failure must not hide the others' results
            traceback.print_exc(file=sys.stdout)
            ok = False
        failed += ok is False
        verdict = {True: "PASS", False: "FAIL", None: "LEFT OUT"}[ok]
        print(f"-- {verdict} ({time.monotonic() - started:.0f} s; {max(0, check.left()):.0f} s of the budget left)",
              flush=True)
    return 1 if failed else 0


def environment(check: Check):
    import torch
    line = f"torch {torch.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        line += (f"; GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute {props.major}.{props.minor}, "
                 f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} visible")
    else:
        line += "; no CUDA GPU visible" + (" (dry run on the CPU)" if check.dry else "")
    print(line, flush=True)
    if not check.dry and not torch.cuda.is_available():
        raise SystemExit("No CUDA GPU: run with --cpu-dry-run to check the script on a CPU.")


# -------------------------------------------------------------------------------------------- the steps

def agreement(check: Check):
    """CUDA against CPU: label agreement of the shipped models on real hippocampus volumes (TTA on)"""
    from SegmentMBTFELib import load_model
    from SegmentMBTFELib.io.images import read_volume
    images = check.hippocampus(2 if check.dry else None)
    ok = True
    for name, folder in SHIPPED.items():
        model, equal, total, worst = load_model(folder), 0, 0, 1.0
        for image in images:
            volume = read_volume(image)
            on_gpu = model.predict([volume], device=check.device).labels.array
            on_cpu = model.predict([volume], device="cpu").labels.array
            same = int(np.count_nonzero(on_gpu == on_cpu))
            equal, total, worst = equal + same, total + on_gpu.size, min(worst, same / on_gpu.size)
        overall = equal / total
        ok &= worst >= FLOOR
        print(f"{name}: {len(images)} volumes, {check.device} vs cpu: {overall * 100:.4f}% of {total} voxels equal, "
              f"worst volume {worst * 100:.4f}% (floor {FLOOR * 100:.2f}%)")
    return ok


def against_nnunet(check: Check):
    """Ours against nnUNetPredictor on the GPU: the shipped nnU-Net model on a hippocampus volume, warm processes"""
    if not _nnunet_importable():
        return False
    ours, theirs, same = compare(check, SHIPPED["hippocampus_nnunet"], check.hippocampus(1)[0], tta=True,
                                 runs=2 if check.dry else 4)
    print(f"ours {ours:.3f} s, nnUNetPredictor {theirs:.3f} s, ratio {ours / theirs:.2f} (file to file, median of the "
          f"runs after a warm-up); labels {same * 100:.4f}% equal")
    return same >= FLOOR


def big_ct_ours(check: Check):
    """Ours on the 512 x 512 x 300 CT, 25 labels, 1.5 mm, no TTA, on the GPU (the uncapped run)"""
    if check.left() < (30 if check.dry else 150):
        print(f"left out: {check.left():.0f} s of the budget left")
        return None
    import torch
    from SegmentMBTFELib import load_model
    from SegmentMBTFELib.io.images import read_channels
    from SegmentMBTFELib.io.writers import write_prediction
    image, model = check.big_ct(), load_model(check.carry / "models" / "ct25")
    if check.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    prediction = model.predict(read_channels([image], model.channel_names), device=check.device, tta=False)
    write_prediction(prediction, check.work / "big_ct_ours.nii.gz")
    check.results["big_ct_ours_s"] = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if check.device == "cuda" else 0
    np.save(check.work / "big_ct_labels.npy", prediction.labels.array)
    check.results["big_ct"] = (check.carry / "models" / "ct25", image, peak)
    print(f"{' x '.join(map(str, prediction.labels.array.shape[::-1]))} voxels: {check.results['big_ct_ours_s']:.1f} s "
          f"(file to file, cold model), GPU peak {peak / 2**30:.2f} GiB; notes: {prediction.messages or 'none'}")
    return True


def big_ct_nnunet(check: Check):
    """nnUNetPredictor on the same CT and model, on the GPU: the ratio"""
    if "big_ct" not in check.results:
        print("left out: ours did not run on the CT")
        return None
    if check.left() < (30 if check.dry else 100) or not _nnunet_importable():
        print(f"left out: {check.left():.0f} s of the budget left")
        return None
    from SegmentMBTFELib.io.images import read_volume
    model_folder, image, _ = check.results["big_ct"]
    predictor = _nnunet_predictor(check, model_folder, tta=False)
    started = time.perf_counter()
    predictor.predict_from_files_sequential([[str(image)]], [str(check.work / "big_ct_nnunet")],
                                            save_probabilities=False, overwrite=True)
    theirs = time.perf_counter() - started
    same = float(np.mean(read_volume(check.work / "big_ct_nnunet.nii.gz").array ==
                         np.load(check.work / "big_ct_labels.npy")))
    ours = check.results["big_ct_ours_s"]
    print(f"ours {ours:.1f} s, nnUNetPredictor {theirs:.1f} s (file to file, model loaded), ratio {ours / theirs:.2f} "
          f"(goal <= 0.2); labels {same * 100:.4f}% equal")
    return same >= FLOOR


def compare(check: Check, model_folder: Path, image: Path, tta: bool, runs: int):
    """(ours s, nnU-Net s, label agreement): each file to file with its model loaded, the first run a warm-up."""
    from SegmentMBTFELib import load_model
    from SegmentMBTFELib.io.images import read_channels, read_volume
    from SegmentMBTFELib.io.writers import write_prediction
    out = check.work / "compare"
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(model_folder)
    predictor = _nnunet_predictor(check, model_folder, tta)

    def ours():
        prediction = model.predict(read_channels([image], model.channel_names), device=check.device, tta=tta)
        write_prediction(prediction, out / "ours.nii.gz")

    def theirs():
        predictor.predict_from_files_sequential([[str(image)]], [str(out / "nnunet")], save_probabilities=False,
                                                overwrite=True)
    times = {ours: [], theirs: []}
    for _ in range(runs):
        for job in (ours, theirs):
            _synchronize(check)
            started = time.perf_counter()
            job()
            _synchronize(check)
            times[job].append(time.perf_counter() - started)
    same = float(np.mean(read_volume(out / "ours.nii.gz").array == read_volume(out / "nnunet.nii.gz").array))
    return float(np.median(times[ours][1:])), float(np.median(times[theirs][1:])), same


def _nnunet_importable() -> bool:
    try:
        import nnunetv2  # noqa: F401
    except ImportError as error:
        print(f"nnunetv2 cannot be imported here ({error}); gpu_check.sh prepare carries it")
        return False
    return True


def _nnunet_predictor(check: Check, model_folder: Path, tta: bool):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta,
                                perform_everything_on_device=check.device == "cuda", device=torch.device(check.device),
                                verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=(0,),
                                                   checkpoint_name="checkpoint_final.pth")
    return predictor


def _synchronize(check: Check):
    import torch
    if check.device == "cuda":
        torch.cuda.synchronize()


def out_of_memory(check: Check):
    """The out-of-memory fallback on a real GPU: memory capped with set_per_process_memory_fraction"""
    if check.dry:
        print("left out in a dry run: the cap is CUDA's")
        return None
    if "big_ct" not in check.results:
        print("left out: ours did not run on the CT (no uncapped result to compare with)")
        return None
    import torch
    model_folder, image, peak = check.results["big_ct"]
    cap = peak / 2
    fraction = cap / torch.cuda.get_device_properties(0).total_memory
    request = {"model": str(model_folder), "image": str(image), "fraction": fraction,
               "expected": str(check.work / "big_ct_labels.npy")}
    print(f"capped at {cap / 2**30:.2f} GiB (half the uncapped run's peak, fraction {fraction:.4f}) in a child process")
    done = subprocess.run([sys.executable, __file__, "--oom-child", json.dumps(request)], capture_output=True,
                          text=True, timeout=max(60, check.left()))
    print(done.stdout.strip() or done.stderr[-3000:])
    return done.returncode == 0


def oom_child(request: dict) -> int:
    import torch
    from SegmentMBTFELib import load_model
    from SegmentMBTFELib.inference.devices import FALLBACK_MESSAGES
    from SegmentMBTFELib.io.images import read_volume
    torch.cuda.set_per_process_memory_fraction(request["fraction"], 0)
    model = load_model(request["model"])
    started = time.perf_counter()
    prediction = model.predict([read_volume(request["image"])], device="cuda", tta=False)
    taken = [m for m in prediction.messages if m in FALLBACK_MESSAGES]
    same = float(np.mean(prediction.labels.array == np.load(request["expected"])))
    print(f"fallbacks taken: {taken or 'none'}; {time.perf_counter() - started:.1f} s; labels {same * 100:.4f}% "
          f"equal to the uncapped run's")
    return 0 if taken and same >= FLOOR else 1


def finetuning(check: Check):
    """Fine-tuning a few iterations on the GPU (autocast fp16 + GradScaler)"""
    import torch
    from SegmentMBTFELib import load_model
    from SegmentMBTFELib.io.images import read_volume
    from SegmentMBTFELib.training.finetune import FinetuneSettings, finetune
    from SegmentMBTFELib.volume import CorrectedCase
    labels = check.carry / "data" / "hippocampus" / "labels"
    cases = [CorrectedCase(image.name.split(".")[0], [read_volume(image)], read_volume(labels / image.name))
             for image in check.hippocampus(3)]
    model = load_model(SHIPPED["hippocampus_nnunet"])
    iterations = 3 if check.dry else 40
    scalers = []
    original = torch.amp.GradScaler

    class Recorded(original):  # the very GradScaler finetune makes, recorded to print its scale
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            scalers.append(self)
    torch.amp.GradScaler = Recorded
    try:
        result = finetune(model, cases, settings=FinetuneSettings(iterations=iterations, device=check.device))
    finally:
        torch.amp.GradScaler = original
    losses = next(iter(result.losses.values()))
    finite = bool(np.all(np.isfinite(losses)))
    scale = f", GradScaler scale {scalers[0].get_scale():.0f}" if scalers else ", no GradScaler (not CUDA)"
    print(f"{result.iterations} iterations on {result.device} in {result.seconds:.1f} s{scale}; loss "
          f"{losses[0]:.4f} -> {np.mean(losses[-5:]):.4f} (mean of the last 5); Dice on the cases "
          f"{result.dice_before.get('training', {}).get('mean', float('nan')):.4f} -> "
          f"{result.dice_after.get('training', {}).get('mean', float('nan')):.4f}")
    return finite and (check.dry or bool(scalers))


# ------------------------------------------------------------------------------ what travels (made here)

# Not on the device machine's image (KINDS.md lists what is): SimpleITK for both tools, and what nnunetv2's
# predictor imports. Versions as in the test environment.
PACKAGES = ["SimpleITK==2.5.3", "nnunetv2==2.8.1", "acvl_utils==0.2.6", "batchgenerators==0.25.5",
            "batchgeneratorsv2==0.3.6", "blosc2==4.14.1", "connected-components-3d==4.1.1",
            "dynamic_network_architectures==0.4.4", "ndindex==1.10.1", "nibabel==5.4.2", "numexpr==2.14.2"]
DEVICE_PYTHON = "3.12"
HIPPOCAMPUS_CASES = 4
CARRY_LIMIT = 64 << 20   # what travels to the device machine, the working tree included


def prepare(carry: Path) -> int:
    """The folder gpu_check.sh carries: site.tar.xz (the packages above, unpacked for the device's Python),
    real data (hippocampus images and labels, the CT series as one NIfTI, xz-compressed), and the 25-label CT
    model."""
    sys.path.insert(0, str(REPO / "Testing"))
    import nnunet_reference as ref
    carry.mkdir(parents=True, exist_ok=True)
    _prepare_data(carry, ref)
    _prepare_ct_model(carry, ref)
    if not (carry / "site.tar.xz").exists():
        _prepare_site(carry)
    tree = int(subprocess.run(["bash", "-c", "git ls-files -z | xargs -0 du -cb | tail -1"], cwd=REPO,
                              capture_output=True, text=True).stdout.split()[0])
    carried = sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
    print(f"{carry}: {carried / 2**20:.1f} MiB, with the tracked files {(carried + tree) / 2**20:.1f} MiB of the "
          f"{CARRY_LIMIT >> 20} MiB that may travel")
    return 0 if carried + tree < CARRY_LIMIT else 1


def _prepare_data(carry: Path, ref):
    import shutil
    data = ref.DEFAULT_DATA_DIR
    for kind in ("images", "labels"):
        folder = carry / "data" / "hippocampus" / kind
        folder.mkdir(parents=True, exist_ok=True)
        for case in ref.hippocampus_case_ids(data)[-HIPPOCAMPUS_CASES:]:
            shutil.copyfile(data / "hippocampus" / "train" / kind / f"{case}.nii.gz", folder / f"{case}.nii.gz")
    ct = carry / "data" / "ct_20.nii.xz"  # xz: 3 MB, where .nii.gz takes 4.6 (the carry's limit is near)
    if not ct.exists():
        import lzma
        with tempfile.TemporaryDirectory() as temporary:
            plain = ref.dicom_series_to_file(data / "formats" / "totalsegmentator" / "example_ct_dicom",
                                             Path(temporary) / "ct_20.nii")
            ct.write_bytes(lzma.compress(Path(plain).read_bytes(), preset=9))


def _prepare_ct_model(carry: Path, ref):
    """bench_big_ct.py's model, its checkpoint without the optimizer's state (the predictors never read it)."""
    import shutil
    import torch
    from SegmentMBTFELib.models.checkpoint import load_checkpoint
    source = ref.make_model_folder(REPO / "benchmarks" / "results" / "big_ct" / "models", kind="ct25")
    target = carry / "models" / "ct25"
    (target / "fold_0").mkdir(parents=True, exist_ok=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copyfile(source / name, target / name)
    checkpoint = load_checkpoint(source / "fold_0" / "checkpoint_final.pth")
    torch.save({k: v for k, v in checkpoint.items() if k not in ("optimizer_state", "grad_scaler_state")},
               target / "fold_0" / "checkpoint_final.pth")


def _prepare_site(carry: Path):
    """The packages' wheels (sdists built into wheels), unpacked into one folder and packed with xz: the
    SimpleITK wheel alone is 50 MB zipped, 27 MB this way."""
    import shutil
    import zipfile
    with tempfile.TemporaryDirectory() as temporary:
        wheels, site = Path(temporary) / "wheels", Path(temporary) / "site"
        platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (28, 27, 24, 17)] + ["--platform=manylinux2014_x86_64"]
        for package in PACKAGES:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                   f"--python-version={DEVICE_PYTHON}", "--implementation=cp", *platforms,
                                   "-d", str(wheels), package], capture_output=True, text=True)
            if done.returncode != 0:  # a pure-Python sdist (acvl_utils): built into a wheel here
                subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), package],
                               check=True, capture_output=True)
        for wheel in wheels.glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
        for unused in [*site.rglob("__pycache__"), *site.rglob("tests"), *site.glob("*/include"),
                       *site.rglob("*.a")]:  # caches, test suites, headers and static libraries: not imported
            shutil.rmtree(unused, ignore_errors=True) if unused.is_dir() else unused.unlink()
        subprocess.run(f"tar -C {site} -cf - . | xz -6 -T0 > {carry / 'site.tar.xz.part'}", shell=True, check=True)
        (carry / "site.tar.xz.part").rename(carry / "site.tar.xz")


if __name__ == "__main__":
    sys.exit(main())
