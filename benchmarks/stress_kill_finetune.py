"""Kill a fine-tune at random moments, many times, and check that no model version is ever damaged.

The test suite kills a fine-tune at three chosen moments (Testing/test_safety.py); this script does what an
independent check does: it times one uninterrupted `segment-mbtfe finetune`, then starts it again N times and
sends SIGKILL after a delay drawn uniformly over that whole duration (torch's import, training, writing the
version), and after every kill checks that

- every listed version has no problem and the current one loads and predicts,
- no visible version folder lacks its version.json (nothing half-written is visible),

and at the end that one more fine-tune runs to the end and clears what the killed ones half-wrote.

    .venv/bin/python benchmarks/stress_kill_finetune.py --kills 20 --seed 0
"""
import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing"))

import numpy as np  # noqa: E402

import model_factory  # noqa: E402
from hostile_files import smooth_volume, write_image  # noqa: E402
from SegmentMBTFELib import load_model  # noqa: E402
from SegmentMBTFELib.models.versions import ModelVersions, resolve  # noqa: E402


def case_files(folder: Path):
    image = smooth_volume((20, 24, 22), seed=5)
    labels = np.zeros(image.shape, np.uint8)
    labels[5:15, 6:12, 5:15], labels[5:15, 14:20, 5:15] = 1, 2
    return (write_image(folder / "case_0000.nii.gz", image + labels * 200),
            write_image(folder / "case_labels.nii.gz", labels))


def finetune_command(model: Path, image: Path, labels: Path, iterations: int) -> list:
    script = Path(sys.executable).with_name("segment-mbtfe")
    return [str(script), "finetune", "-q", "-m", str(model), "-i", str(image), "-l", str(labels),
            "--no-evaluation", "--device", "cpu", "--iterations", str(iterations)]


def damage(model: Path, image: Path) -> list:
    """What is wrong with the model's versions now (empty when nothing)."""
    problems = [v.summary() for v in ModelVersions(model).list() if v.problem]
    folder, current = resolve(model)
    from SegmentMBTFELib.io.images import read_volume
    load_model(folder).predict([read_volume(image)], device="cpu", tta=False)
    family = ModelVersions(model).family_dir
    if family.is_dir():
        problems += [f"{child.name} is half-written" for child in family.iterdir()
                     if child.is_dir() and not child.name.startswith(".") and not (child / "version.json").is_file()]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["SEGMENTMBTFE_HOME"] = str(tmp / "home")
        model = model_factory.make_model_folder(tmp / "models", dataset_name="Dataset999_Tiny")
        image, labels = case_files(tmp)
        command = finetune_command(model, image, labels, args.iterations)
        start = time.monotonic()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        whole = time.monotonic() - start
        print(f"one uninterrupted fine-tune: {whole:.1f} s; killing {args.kills} at uniform moments in it")
        failures = 0
        for kill in range(1, args.kills + 1):
            delay = rng.uniform(0, whole)
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)
            code = process.wait()
            problems = damage(model, image)
            failures += bool(problems)
            versions = [v.id for v in ModelVersions(model).list()]
            print(f"kill {kill:2d} at {delay:5.2f} s: exit {code:4d}, versions {len(versions):2d}, "
                  f"{'; '.join(problems) or 'no damage'}")
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        leftovers = [p.name for p in ModelVersions(model).family_dir.iterdir() if ".partial-" in p.name]
        problems = damage(model, image)
        print(f"final fine-tune: {'; '.join(problems) or 'no damage'}, leftovers {leftovers or 'none'}")
        ok = failures == 0 and not problems and not leftovers
        print("PASS" if ok else f"FAIL: {failures} kills left damage")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
