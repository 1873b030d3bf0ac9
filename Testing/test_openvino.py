"""The optional OpenVINO backend (backends.py): the same labels as the torch path and as nnU-Net's own
nnUNetPredictor on real hippocampus cases, for every network family (PlainConvUNet, ResidualEncoderUNet,
MBTFE-UNet, a 2D model), TTA on and off; converted once per model and kept; a network that does not convert
runs with torch and says so; asked for but not installed, one sentence; OpenVINO's usage telemetry never used.

The floor is the parity tests' (test_parity.py): at least 99.99% of voxels equal. nnU-Net's predictions are
requested exactly as test_parity.py and test_mbtfe.py request them, so a whole-suite run predicts each once.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from SegmentMBTFELib import InputError, load_model
from SegmentMBTFELib import cli, tasks
from SegmentMBTFELib.inference import backends
from SegmentMBTFELib.inference.loading import ModelCache
from SegmentMBTFELib.io.images import read_channels
from SegmentMBTFELib.models.shipped import shipped_models

pytest.importorskip("openvino", reason="the optional openvino package is not installed")

from test_mbtfe import mbtfe_model, registered_trainer  # noqa: E402,F401  (fixtures: nnU-Net-trained MBTFE-UNet)

FLOOR = 0.9999


def failing(message):
    """A stand-in for a converter that fails (fault injection)."""
    def fail(*args, **kwargs):
        raise RuntimeError(message)
    return fail


def predicted(model, case, backend, tta=True):
    model.backend = backend
    prediction = model.predict(read_channels(case, model.channel_names), device="cpu", tta=tta)
    assert prediction.settings["backend"] == backend  # ran where asked: no silent fallback to torch
    return prediction.labels.array


def nnunet_labels(nnunet_prediction, model_dir, case, **options):
    import SimpleITK as sitk
    [labels] = nnunet_prediction(model_dir, [case], **options)[:1]
    return sitk.GetArrayFromImage(sitk.ReadImage(str(labels)))


def check(model_dir, case, reference, agreement, tta=True):
    model = load_model(model_dir)
    ours = predicted(model, case, "openvino", tta)
    assert len(np.unique(ours)) > 1  # agreeing on an empty map would prove nothing
    assert agreement(ours, predicted(model, case, "torch", tta)) >= FLOOR
    assert agreement(ours, reference) >= FLOOR


@pytest.mark.parametrize("tta", [True, False], ids=["tta", "no_tta"])
def test_plain_unet(hippo3d_model, hippo_test_cases, nnunet_prediction, agreement, tta):
    case = hippo_test_cases[0 if tta else 1]
    check(hippo3d_model, case, nnunet_labels(nnunet_prediction, hippo3d_model, case, tta=tta), agreement, tta)


def test_residual_encoder_unet(hippo3d_resenc_model, hippo_test_cases, nnunet_prediction, agreement):
    case = hippo_test_cases[1]
    check(hippo3d_resenc_model, case, nnunet_labels(nnunet_prediction, hippo3d_resenc_model, case), agreement)


def test_2d_model(hippo2d_model, hippo_test_cases, nnunet_prediction, agreement):
    case = hippo_test_cases[0]
    check(hippo2d_model, case, nnunet_labels(nnunet_prediction, hippo2d_model, case), agreement)


def test_mbtfe_unet_trained_by_nnunet(mbtfe_model, hippo_test_cases, nnunet_prediction, agreement):
    case = hippo_test_cases[-1]  # the request test_mbtfe.py makes
    [labels, _] = nnunet_prediction(mbtfe_model, [case], folds=(0,), tta=True, save_probabilities=True)
    check(mbtfe_model, case, labels, agreement)


def test_primus_trained_by_nnunet(nnunet_model, hippo_test_cases, nnunet_prediction, agreement):
    """Primus V3-S (a transformer: attention, LayerNorms, rotary embedding, behind V3's residual embedding) converts,
    and agrees with torch and with nnU-Net (the request test_nnunet_trainers.py makes; its no-TTA output)."""
    import SimpleITK as sitk
    folder, case = nnunet_model("hippo3d_primusv3_s"), hippo_test_cases[-1]
    without_tta = nnunet_prediction(folder, [case], tta=True, also_without_tta=True)[1]
    check(folder, case, sitk.GetArrayFromImage(sitk.ReadImage(str(without_tta))), agreement, tta=False)


def test_shipped_mbtfe_model_same_labels_and_logits_close(hippo_test_cases, agreement):
    """The shipped MBTFE-UNet holds real trained weights (the tiny models' are nearly random, so their classes
    are close everywhere): labels equal and probabilities within what float32 summation order explains."""
    [folder] = [p for p in shipped_models() if p.name == "hippocampus_mbtfe"]
    model = load_model(folder)
    volumes = read_channels(hippo_test_cases[0], model.channel_names)
    runs = {}
    for backend in ("torch", "openvino"):
        model.backend = backend
        runs[backend] = model.predict(volumes, device="cpu", tta=False, probabilities=True)
        assert runs[backend].settings["backend"] == backend
    assert agreement(runs["openvino"].labels.array, runs["torch"].labels.array) >= FLOOR
    assert np.abs(runs["openvino"].probabilities - runs["torch"].probabilities).max() < 2e-3


def test_converted_once_per_model_then_read_from_the_cache(hippo3d_model, hippo_test_cases, monkeypatch):
    """The worker keeps models in a ModelCache (inference/loading.py): its second Segment reuses the converted
    network. A fresh process (a new load) reads the converted network saved under the versions home instead of
    converting."""
    cache = ModelCache()
    case = read_channels(hippo_test_cases[0])
    model, version = tasks.open_model(hippo3d_model, cache=cache)
    first = tasks.predict(model, version, case, "cpu", tta=False, backend="openvino")
    [(_, network, _)] = model._openvino_networks.values()
    # from here on, converting would fail: what follows must come from the caches (fault injected)
    monkeypatch.setattr(backends, "_converted", failing("converted again"))
    again, _ = tasks.open_model(hippo3d_model, cache=cache)
    second = tasks.predict(again, version, case, "cpu", tta=False, backend="openvino")
    assert again is model and [n for _, n, _ in model._openvino_networks.values()] == [network]
    fresh = load_model(hippo3d_model)
    third = tasks.predict(fresh, None, case, "cpu", tta=False, backend="openvino")
    for prediction in (first, second, third):
        assert prediction.settings["backend"] == "openvino" and not prediction.messages
    assert np.array_equal(first.labels.array, third.labels.array)


def test_a_network_that_does_not_convert_runs_with_torch(models, good_image, monkeypatch):
    """Conversion failing (fault injected into OpenVINO's converter) leaves torch to run the network: asked
    for by name, the prediction says so in one line; under auto it falls back quietly. The model holds
    unsaved weights (as a fine-tune's result), so no converted network saved earlier can stand in."""
    import openvino
    monkeypatch.setattr(openvino, "convert_model", failing("no op\nmore"))
    case = read_channels([good_image])
    loaded = load_model(models["one"])
    model = loaded.with_weights(loaded.weights)
    reference = tasks.predict(model, None, case, "cpu", backend="torch").labels.array
    asked = tasks.predict(model, None, case, "cpu", backend="openvino")
    assert asked.settings["backend"] == "torch"
    assert asked.messages == [f"OpenVINO could not run {model.name}'s network (no op); it ran with torch."]
    assert np.array_equal(asked.labels.array, reference)
    assert tasks.predict(model, None, case, "cpu", backend="auto").settings["backend"] == "torch"  # unsaved: torch
    monkeypatch.setattr(backends, "_cache_file", lambda *args: None)  # nothing converted before can stand in
    quiet = tasks.predict(loaded, None, case, "cpu", backend="auto")
    assert quiet.settings["backend"] == "torch" and not quiet.messages
    assert np.array_equal(quiet.labels.array, reference)


def test_gpu_and_torch_keep_the_torch_network(models):
    model = load_model(models["one"])
    for backend, device in (("openvino", "cuda"), ("auto", "cuda:1"), ("auto", "mps"), ("torch", "cpu")):
        model.backend = backend
        assert backends.cpu_network(model, 0, torch.device(device), []) is None
    assert not getattr(model, "_openvino_networks", {})  # nothing was converted


def test_command_line_backend_and_its_refusals(models, good_image, tmp_path, capsys, monkeypatch):
    output = tmp_path / "labels.nii.gz"
    assert cli.main(["predict", "-m", str(models["one"]), "-i", str(good_image), "-o", str(output),
                     "--device", "cpu", "-q", "--backend", "openvino"]) == 0
    assert "on cpu with OpenVINO." in capsys.readouterr().out and output.is_file()
    with pytest.raises(InputError, match="Unknown backend 'onnx'"):
        tasks.predict(load_model(models["one"]), None, read_channels([good_image]), "cpu", backend="onnx")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    refused = tmp_path / "refused.nii.gz"
    code = cli.main(["predict", "-m", str(models["one"]), "-i", str(good_image), "-o", str(refused),
                     "--backend", "openvino"])
    err = capsys.readouterr().err
    assert code == 1 and not refused.exists()
    assert err.strip() == f"error: {backends.NOT_INSTALLED}"
    assert cli.main(["predict", "-m", str(models["one"]), "-i", str(good_image), "-o", str(refused),
                     "--device", "cpu", "-q", "--backend", "auto"]) == 0  # auto: torch, without a word
    assert "OpenVINO" not in capsys.readouterr().out


NO_TELEMETRY = r"""
import importlib.util, json, socket, sys
connects = []
def refuse(self, address, *rest):  # record any attempt to reach the network (there is none here anyway)
    connects.append(str(address))
    raise OSError("no network in this test")
socket.socket.connect = socket.socket.connect_ex = refuse
from SegmentMBTFELib import load_model, read_volume
model = load_model(sys.argv[1])
model.backend = "openvino"
prediction = model.predict([read_volume(sys.argv[2])], device="cpu", tta=False)
import openvino.tools.ovc.telemetry_stub as stub
users = {name: module.tm is stub for name, module in list(sys.modules.items())
         if name.startswith("openvino.") and hasattr(module, "tm")}
print(json.dumps({"backend": prediction.settings["backend"], "installed": importlib.util.find_spec(
    "openvino_telemetry") is not None, "imported": "openvino_telemetry" in sys.modules, "users": users,
    "connects": connects}))
"""


def test_openvino_telemetry_is_never_used(models, good_image, tmp_path):
    """The README's 'nothing is sent to Intel': in a fresh process (converting, with an empty cache), the
    installed openvino_telemetry package is never imported, and every OpenVINO module that would send usage
    events holds OpenVINO's own do-nothing stand-in; no socket is opened."""
    done = subprocess.run([sys.executable, "-c", NO_TELEMETRY, str(models["one"]), str(good_image)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SEGMENTMBTFE_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["backend"] == "openvino" and (tmp_path / "home" / "cache" / "openvino").is_dir()  # converted
    assert result["installed"], "openvino_telemetry is not installed: this test would prove nothing"
    assert not result["imported"]
    assert result["users"] and all(result["users"].values()), result["users"]
    assert result["connects"] == []


def test_float32_with_torchs_threads(models):
    """The README: precision stays float32, set explicitly (OpenVINO would pick bfloat16 on this CPU), and
    OpenVINO uses as many threads as torch."""
    model = load_model(models["one"])
    model.backend = "openvino"
    compiled = backends.cpu_network(model, 0, torch.device("cpu"), []).request.get_compiled_model()
    assert compiled.get_property("INFERENCE_NUM_THREADS") == torch.get_num_threads()
    assert compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"


def test_the_cache_keeps_the_8_most_recently_used_networks(tmp_path):
    import time
    now = time.time()
    for i in range(10):
        (tmp_path / f"network{i}").mkdir()
        os.utime(tmp_path / f"network{i}", (now - 100 + i, now - 100 + i))  # network9 used last
    (tmp_path / ".converting-old").mkdir()
    os.utime(tmp_path / ".converting-old", (now - 7200, now - 7200))  # a conversion killed two hours ago
    (tmp_path / ".converting-now").mkdir()  # one under way
    backends._prune(tmp_path, keep=backends.KEEP_ON_DISK)
    assert backends.KEEP_ON_DISK == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == [".converting-now"] + [f"network{i}" for i in range(2, 10)]
