"""GPU out-of-memory fallbacks, the GPU given back after a run, an install that leaves the user's torch alone, and
the installed wheel's shipped models.

No GPU exists on the machines these tests run on, so the out-of-memory tests use the one stand-in that
cannot be avoided: a network that raises torch's own CUDA out-of-memory error on its first calls, under
device plans that keep everything on the CPU. Everything else (the model folder, preprocessing, sliding
window, export) is the real engine.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

import model_factory
from SegmentMBTFELib import OutOfMemory, load_model
from SegmentMBTFELib.inference import model as model_module
from SegmentMBTFELib.inference.devices import DevicePlan
from SegmentMBTFELib.models.shipped import DEFAULT_MODEL
from SegmentMBTFELib.volume import Volume

REPO = Path(__file__).resolve().parents[1]


class RunsOutOfMemory(torch.nn.Module):
    """Wraps a network; its first `failures` calls raise CUDA's out-of-memory error, as a full GPU does.
    `events` records, in order, its calls ("call") and the devices it is moved to ("to cpu", ...)."""

    def __init__(self, network, failures):
        super().__init__()
        self.network, self.failures, self.events = network, failures, []

    def to(self, *args, **kwargs):
        device = kwargs.get("device", args[0] if args else None)
        if device is not None:
            self.events.append(f"to {torch.device(device).type}")
        return super().to(*args, **kwargs)

    def forward(self, x):
        self.events.append("call")
        if self.failures > 0:
            self.failures -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.network(x)

    def load_state_dict(self, state_dict, strict=True):
        return self.network.load_state_dict(state_dict, strict)


@pytest.fixture
def model_and_case(tmp_path):
    folder = model_factory.make_model_folder(tmp_path)
    rng = np.random.default_rng(0)
    case = Volume(rng.normal(100, 20, (20, 24, 20)).astype(np.float32), spacing=(1, 1, 1))
    return load_model(folder), case


def three_plans(device):
    cpu = torch.device("cpu")
    return [DevicePlan(cpu, cpu), DevicePlan(cpu, cpu, "results on the CPU"), DevicePlan(cpu, cpu, "all on CPU")]


def test_out_of_memory_retries_with_the_next_plan(model_and_case, monkeypatch):
    model, case = model_and_case
    expected = model.predict([case], device="cpu", tta=False).labels.array
    monkeypatch.setattr(model_module, "device_plans", three_plans)
    model.network = RunsOutOfMemory(model.network, failures=1)
    prediction = model.predict([case], device="cpu", tta=False)
    assert prediction.messages == ["results on the CPU"]
    np.testing.assert_array_equal(prediction.labels.array, expected)


def test_out_of_memory_on_every_plan_is_one_clear_error(model_and_case, monkeypatch):
    model, case = model_and_case
    monkeypatch.setattr(model_module, "device_plans", three_plans)
    model.network = RunsOutOfMemory(model.network, failures=100)
    with pytest.raises(OutOfMemory, match="Out of memory"):
        model.predict([case], device="cpu", tta=False)


def test_other_runtime_errors_are_not_mistaken_for_memory(model_and_case, monkeypatch):
    model, case = model_and_case
    monkeypatch.setattr(model_module, "device_plans", three_plans)

    class Broken(RunsOutOfMemory):
        def forward(self, x):
            raise RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")
    model.network = Broken(model.network, failures=0)
    with pytest.raises(RuntimeError, match="CUDNN_STATUS_INTERNAL_ERROR"):
        model.predict([case], device="cpu", tta=False)


@pytest.mark.parametrize("failures", [0, 100], ids=["run", "failed_run"])
def test_network_is_moved_to_the_cpu_after_a_run(model_and_case, monkeypatch, failures):
    """After a run, one that failed too, the network is moved to the CPU: its GPU memory goes back to Slicer and
    other programs. With no GPU here its parameters never leave the CPU, so that cannot tell; the network records
    what is done to it instead, and after its last call must come a move to the CPU."""
    model, case = model_and_case
    monkeypatch.setattr(model_module, "device_plans", three_plans)
    model.network = RunsOutOfMemory(model.network, failures)
    if failures:
        with pytest.raises(OutOfMemory):
            model.predict([case], device="cpu", tta=False)
    else:
        model.predict([case], device="cpu", tta=False)
    events = model.network.events
    last_call = len(events) - 1 - events[::-1].index("call")
    assert "to cpu" in events[last_call + 1:], events


def test_torch_is_a_plain_requirement():
    """A version range on torch would let pip replace the torch a user (or Slicer's PyTorch extension) has."""
    import tomllib
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch" in dependencies


def test_installing_keeps_the_installed_torch(tmp_path):
    """pip's own resolver, asked to install the package here, installs nothing of torch's."""
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report",
                             str(report), str(REPO)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and "No matching distribution" in result.stderr:
        pytest.skip("no package index reachable for the build backend")
    assert result.returncode == 0, result.stderr[-2000:]
    installs = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "segmentmbtfe" in installs
    assert not installs & {"torch", "nvidia-cudnn-cu12", "nvidia-cublas-cu12"}, installs


def copy_the_checkout(destination):
    """The files git would commit, nothing it ignores: the environments beside the sources (.venv, .venv-slicer)
    are gigabytes, and copying them once filled CI's disk."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if name.split("/")[0] in {"Testing", "benchmarks", "demo"} or not (REPO / name).is_file():
            continue
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, destination / name)


def test_the_installed_wheel_predicts_with_its_shipped_default_model(tmp_path, hippo_test_cases, agreement):
    """`pip install` of the built wheel (not editable) into a fresh venv, then `segment-mbtfe predict` without -m
    from a folder outside the repository: the default model comes from inside the installed package. The venv sees
    this environment's torch, numpy, scipy and SimpleITK through a .pth line (nothing downloaded); the engine
    only from the wheel (PYTHONPATH, which points the tests at the checkout, is dropped)."""
    source = tmp_path / "source"  # a copy: setuptools builds in the tree it is given, and an old build/ could leak in
    copy_the_checkout(source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, timeout=600)
    [wheel] = (tmp_path / "dist").glob("*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    scripts = venv / ("Scripts" if sys.platform == "win32" else "bin")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["SEGMENTMBTFE_HOME"] = str(tmp_path / "home")
    site = subprocess.run([str(scripts / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          env=env, capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(pip + ["--python", str(scripts / "python"), "install", "--no-index", str(wheel)], env=env,
                   check=True, timeout=300)
    image = hippo_test_cases[0][0]
    done = subprocess.run([str(scripts / "segment-mbtfe"), "predict", "-i", str(image), "-o", "out.nii.gz", "--no-tta"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    installed = Path(site) / "SegmentMBTFELib" / "shipped_models" / DEFAULT_MODEL
    assert f"Using default model {installed}, version original" in done.stderr, done.stderr
    from SegmentMBTFELib.io.images import read_channels
    expected = load_model(REPO / "models" / DEFAULT_MODEL).predict(read_channels([image]), tta=False)
    assert len(np.unique(expected.labels.array)) == 3
    assert agreement(tmp_path / "out.nii.gz", expected.labels.array) >= 0.9999  # the parity floor: threads may differ


def test_unknown_trainer_builds_the_plans_network(tmp_path):
    """A custom trainer name (nnUNetTrainer_250epochs, a lab's own) falls back to the plans' architecture."""
    folder = model_factory.make_model_folder(tmp_path, trainer="nnUNetTrainerOurLab_500epochs")
    model = load_model(folder)
    assert model.trainer_name == "nnUNetTrainerOurLab_500epochs"
    assert type(model.network).__name__ == "PlainConvUNet"


def test_trainer_with_another_network_names_the_keys(tmp_path):
    """Weights that do not fit the plans' network: the error names the trainer and the mismatching keys."""
    from SegmentMBTFELib import ModelError
    folder = model_factory.make_model_folder(tmp_path, trainer="nnUNetTrainerOurLab")
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    saved = torch.load(checkpoint, weights_only=False)
    saved["network_weights"]["encoder.extra_attention.weight"] = torch.zeros(3)
    torch.save(saved, checkpoint)
    with pytest.raises(ModelError, match=r"trained with nnUNetTrainerOurLab: .*unexpected 1 keys: "
                                         r"encoder\.extra_attention\.weight"):
        load_model(folder)
