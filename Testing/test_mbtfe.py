"""MBTFE-UNet: the network (shapes, gradients, key names, BatchNorm checkpoints, options) and its nnU-Net
trainer, end to end: nnunetv2 trains a tiny MBTFE-UNet on real hippocampus cases with nnUNetTrainerMBTFE, the
engine loads the folder by trainer name and predicts a held-out case with TTA, and nnUNetPredictor on the same
folder gives the same labels and probabilities.

nnunetv2 only ever runs in subprocesses (as in nnunet_reference.py): importing it here would freeze its
nnUNet_* paths for the session. This file is also the training worker: `python test_mbtfe.py train REQUEST`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from build_lock import build_once
import model_factory
import nnunet_reference as ref
from SegmentMBTFELib import ModelError, load_model
from SegmentMBTFELib.models.checkpoint import load_weights
from SegmentMBTFELib.networks import architecture_for_trainer, build_network
from SegmentMBTFELib.networks import mbtfe as mbtfe_module
from SegmentMBTFELib.networks.mbtfe import TRAINER_OPTIONS, MBTFEUNet, mbtfe_architecture
from SegmentMBTFELib.training.nnunet_trainer import registration

TRAINER = "nnUNetTrainerMBTFE"
MBTFE_UNITS = ["1", "3", "5_1", "5_2", "7_1", "7_2", "7_3"]


# ------------------------------------------------------------------------------------------------ plans

def plan(dim, strides, kernels, features=(8, 16, 32, 64)):
    """A PlainConvUNet plans architecture (model_factory's) with the given strides and kernels per stage."""
    architecture = model_factory.architecture(dim, features)
    architecture["arch_kwargs"].update(strides=[list(s) for s in strides], kernel_sizes=[list(k) for k in kernels])
    return architecture


# name -> (plans architecture, patch size): the three kinds of plans nnU-Net writes. Patches are as small as
# the strides allow: convolution backward passes are slow on CPU.
PLANS = {
    "isotropic_3d": (plan(3, [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4), (16, 24, 16)),
    # thick slices: no pooling along z until the in-plane size has caught up, 1x3x3 kernels there
    "anisotropic_3d": (plan(3, [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2]],
                            [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]]), (8, 32, 24)),
    "2d": (plan(2, [[1, 1]] + [[2, 2]] * 3, [[3, 3]] * 4), (64, 32)),
}


def network_for(name, deep_supervision=False, classes=3, **options):
    torch.manual_seed(0)
    return build_network(mbtfe_architecture(PLANS[name][0], **options), 1, classes, deep_supervision)


def downsampled(patch, strides, stage):
    return tuple(int(p // np.prod([s[d] for s in strides[:stage + 1]])) for d, p in enumerate(patch))


# ------------------------------------------------------------------------------------------------ network

@pytest.mark.parametrize("name", sorted(PLANS))
def test_trains_with_deep_supervision_and_infers_without(name):
    architecture, patch = PLANS[name]
    strides = architecture["arch_kwargs"]["strides"]
    network = network_for(name, deep_supervision=True)
    outputs = network(torch.randn(2, 1, *patch))
    # nnU-Net's deep supervision: one head per decoder stage, highest resolution first
    assert [tuple(o.shape) for o in outputs] == [(2, 3) + downsampled(patch, strides, s) for s in range(3)]
    sum(o.square().mean() for o in outputs).backward()
    no_gradient = [n for n, p in network.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_gradient == []  # every MBTFE branch, fc, attention, fusion conv and gate learns
    network.decoder.deep_supervision = False  # what nnU-Net's trainer switches off for validation
    with torch.no_grad():
        assert tuple(network.eval()(torch.randn(2, 1, *patch)).shape) == (2, 3) + patch


def test_anisotropic_plan_sets_kernels_and_strides():
    encoder = network_for("anisotropic_3d").encoder
    assert tuple(encoder.mbtfe_modules[0].conv7_3.weight.shape[2:]) == (1, 3, 3)  # the stage's 1x3x3 kernel
    assert tuple(encoder.mbtfe_modules[0].conv1.weight.shape[2:]) == (1, 1, 1)
    assert tuple(encoder.mbtfe_modules[2].conv3.weight.shape[2:]) == (3, 3, 3)
    assert list(encoder.mdcat1.stride) == [1, 2, 2] and list(encoder.mdcat2.stride) == [1, 2, 2]
    assert list(encoder.mupcat1.stride) == [1, 4, 4] and list(encoder.mupcat2.stride) == [1, 2, 2]
    assert list(encoder.mupcat3.kernel_size) == [1, 1, 1]
    assert tuple(encoder.mattn.conv.weight.shape) == (1, 2, 7, 7, 7)  # stage 3 convolves along z


def test_state_dict_names_are_mbtfe_md_and_nnunet_names():
    architecture, _ = PLANS["isotropic_3d"]
    network = network_for("isotropic_3d")
    keys = network.state_dict()
    for stage, width in enumerate((8, 16, 32, 64)):
        prefix = f"encoder.mbtfe_modules.{stage}."
        for unit in MBTFE_UNITS:
            assert keys[f"{prefix}conv{unit}.weight"].shape[:2] == (width, width)
            assert keys[f"{prefix}bn{unit}.weight"].shape == (width,)
            assert keys[f"{prefix}prelu{unit}.weight"].shape == (width,)  # per-channel PReLU
        assert keys[f"{prefix}fc1.weight"].shape == (width // 2, width)
        assert keys[f"{prefix}fc2.weight"].shape == (4, width // 2)
    eab = {k.split(".")[1] for k in keys if k.startswith("encoder.") and ".mbtfe_modules." not in k
           and not k.startswith("encoder.stages.")}
    assert eab == {"mattn", "mdcat1", "mdcat2", "mupcat1", "mupcat2", "mupcat3", "gate1", "gate2", "gate3"}
    assert keys["encoder.mupcat1.weight"].shape[:2] == (8 + 16 + 32, 8)  # fused width back to stage 1's
    # the shared parts keep PlainConvUNet's names and shapes, and the decoder repeats the encoder as nnU-Net's
    plain = build_network(architecture, 1, 3).state_dict()
    assert all(keys[k].shape == v.shape for k, v in plain.items())
    assert {k for k in keys if k.startswith("decoder.encoder.")} == {"decoder." + k for k in keys
                                                                     if k.startswith("encoder.")}


def test_batchnorm_variant_loads_running_statistics():
    """Weights of the original code's BatchNorm variant (BatchNorm3d in the MBTFE modules, running statistics),
    made by this project's own network built with mbtfe_norm="batch" (no checkpoint of the original code is at
    hand): they load strictly, their statistics are used in eval mode, and the engine recognises the variant by
    its weights whatever the trainer is called."""
    trained = network_for("isotropic_3d", mbtfe_norm="batch")
    trained.train()
    with torch.no_grad():
        for _ in range(2):  # BatchNorm learns running statistics from the data it sees
            trained(torch.randn(2, 1, *PLANS["isotropic_3d"][1]) * 3 + 1)
    weights = trained.state_dict()
    stats = [k for k in weights if k.startswith("encoder.") and k.endswith("bn5_2.running_var")]
    assert len(stats) == 4 and not torch.allclose(weights[stats[0]], torch.ones_like(weights[stats[0]]))
    architecture = architecture_for_trainer("nnUNetTrainerMBTFEAdan", PLANS["isotropic_3d"][0],
                                            {"network_weights": weights, "trainer_name": "nnUNetTrainerMBTFEAdan"})
    assert architecture["arch_kwargs"]["mbtfe_norm"] == "batch" and architecture["arch_kwargs"]["eab"] is True
    loaded = build_network(architecture, 1, 3)
    load_weights(loaded, weights, "the BatchNorm variant's weights")
    x = torch.randn(1, 1, *PLANS["isotropic_3d"][1])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), trained.eval()(x))
        fresh = network_for("isotropic_3d", mbtfe_norm="batch").eval()
        fresh.load_state_dict({k: v for k, v in weights.items() if "running" not in k}, strict=False)
        assert not torch.allclose(fresh(x), loaded(x))  # the running statistics matter


def test_eab_needs_three_stages():
    two_stages = plan(3, [[1, 1, 1], [2, 2, 2]], [[3, 3, 3]] * 2, features=(8, 16))
    with pytest.raises(ModelError, match="three encoder stages"):
        mbtfe_architecture(two_stages)
    with pytest.raises(ValueError, match="eab=False"):
        MBTFEUNet(1, 2, (8, 16), torch.nn.Conv3d, [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]], 2, 3, 1)
    network = build_network(mbtfe_architecture(two_stages, eab=False), 1, 3)
    assert tuple(network(torch.randn(2, 1, 16, 16, 16)).shape) == (2, 3, 16, 16, 16)
    assert not hasattr(network.encoder, "mattn")


def test_bad_options_and_networks_are_refused():
    with pytest.raises(ModelError, match="mbtfe_norm"):
        mbtfe_architecture(PLANS["2d"][0], mbtfe_norm="group")
    with pytest.raises(ModelError, match="eab_gate"):
        mbtfe_architecture(PLANS["2d"][0], eab_gate="sum")
    resenc = dict(PLANS["2d"][0], network_class_name="dynamic_network_architectures.architectures.unet."
                                                     "ResidualEncoderUNet")
    with pytest.raises(ModelError, match="PlainConvUNet"):
        mbtfe_architecture(resenc)


def test_gate_forms_differ_and_are_recorded():
    attention, blend = (network_for("2d", eab_gate=g) for g in ("attention", "blend"))
    assert attention.state_dict().keys() == blend.state_dict().keys()  # only the plans tell them apart
    x = torch.randn(2, 1, *PLANS["2d"][1])
    with torch.no_grad():
        assert not torch.allclose(attention.eval()(x), blend.eval()(x))
    assert mbtfe_architecture(PLANS["2d"][0], eab_gate="blend")["arch_kwargs"]["eab_gate"] == "blend"


def test_parameter_count_is_larger_than_plain_unet():
    """MBTFE adds (1 + 6 * 27) C^2 weights per 3D stage of width C: budget for it."""
    architecture, _ = PLANS["isotropic_3d"]
    plain = sum(p.numel() for p in build_network(architecture, 1, 3).parameters())
    mbtfe = sum(p.numel() for p in network_for("isotropic_3d").parameters())
    per_stage = sum(163 * c * c for c in (8, 16, 32, 64))
    assert per_stage < mbtfe - plain < 1.3 * per_stage


# ------------------------------------------------------------------------------------------------ engine: options

def write_mbtfe_folder(root, trainer, plans_architecture, weights_options, trained_plans_options=None) -> Path:
    """A model folder (model_factory's layout) whose checkpoint holds MBTFE-UNet weights built with
    `weights_options`; plans.json holds `plans_architecture`; the checkpoint's init_args plans hold an
    MBTFEUNet architecture with `trained_plans_options` (or the same plain architecture when None)."""
    plans = model_factory.plans_dict("Dataset998_MBTFE")
    plans["configurations"]["3d_fullres"]["architecture"] = plans_architecture
    trained = copy.deepcopy(plans)
    if trained_plans_options is not None:
        trained["configurations"]["3d_fullres"]["architecture"] = mbtfe_architecture(plans_architecture,
                                                                                     **trained_plans_options)
    torch.manual_seed(1)
    weights = build_network(mbtfe_architecture(plans_architecture, **weights_options), 1, 3).state_dict()
    dataset = model_factory.dataset_dict(("MRI",), model_factory.DEFAULT_LABELS)
    folder = Path(root) / "Dataset998_MBTFE" / f"{trainer}__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps(dataset))
    (folder / "plans.json").write_text(json.dumps(plans))
    checkpoint = model_factory.checkpoint_dict(weights, trained, dataset, "3d_fullres", 0, trainer)
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder


TINY = model_factory.architecture(3, (4, 8, 16))


@pytest.mark.parametrize("trainer", sorted(TRAINER_OPTIONS))
def test_engine_rebuilds_each_trainer_by_name_from_plain_plans(tmp_path, trainer):
    folder = write_mbtfe_folder(tmp_path, trainer, TINY, TRAINER_OPTIONS[trainer])
    network = load_model(folder).network
    expected = {**mbtfe_module.DEFAULT_OPTIONS, **TRAINER_OPTIONS[trainer]}
    assert isinstance(network, MBTFEUNet)
    assert network.encoder.eab is expected["eab"]
    norm = type(network.encoder.mbtfe_modules[0].bn3).__name__
    assert norm == {"instance": "InstanceNorm3d", "batch": "BatchNorm3d"}[expected["mbtfe_norm"]]
    if expected["eab"]:
        assert network.encoder.gate1.form == expected["eab_gate"]


def test_checkpoint_options_win_for_an_unknown_trainer_subclass(tmp_path):
    """A user's nnUNetTrainerMBTFE subclass: its name is unknown, but the plans inside its checkpoint (nnU-Net
    saves them in init_args) say blend gates, which the weights cannot show."""
    folder = write_mbtfe_folder(tmp_path, "nnUNetTrainerMBTFE_250epochs", TINY, {"eab_gate": "blend"},
                                trained_plans_options={"eab_gate": "blend"})
    assert load_model(folder).network.encoder.gate2.form == "blend"


def test_plans_naming_mbtfe_build_it_for_any_trainer(tmp_path):
    folder = write_mbtfe_folder(tmp_path, "nnUNetTrainer", mbtfe_architecture(TINY, eab=False), {"eab": False})
    network = load_model(folder).network
    assert isinstance(network, MBTFEUNet) and network.encoder.eab is False


# ------------------------------------------------------------------------------------------------ nnU-Net trainer

@pytest.fixture(scope="module")
def registered_trainer(nnunet_installed):
    """The trainers registered with the installed nnunetv2; removed afterwards unless they were there before."""
    was_there = registration.registered_path().exists()
    path = registration.register()
    yield path
    if not was_there:
        registration.unregister()


def test_register_puts_the_shim_into_nnunet(registered_trainer):
    assert registration.is_registered()
    assert registered_trainer == registration.trainer_folder() / "nnUNetTrainerMBTFE.py"
    assert (registered_trainer.parent / "nnUNetTrainer.py").is_file()  # beside nnU-Net's own trainer


def test_registration_never_touches_files_it_did_not_write(tmp_path, monkeypatch):
    monkeypatch.setattr(registration, "trainer_folder", lambda: tmp_path)  # a folder we may spoil
    foreign = tmp_path / "nnUNetTrainerMBTFE.py"
    foreign.write_text("class nnUNetTrainerMBTFE: pass\n")
    with pytest.raises(registration.RegistrationError, match="not written by SegmentMBTFE"):
        registration.register()
    with pytest.raises(registration.RegistrationError, match="leaving it alone"):
        registration.unregister()
    foreign.unlink()
    assert registration.register() == foreign and registration.MARKER in foreign.read_text()
    assert registration.unregister() and not foreign.exists() and registration.unregister() is False


def test_shim_exports_every_trainer():
    import ast
    tree = ast.parse(registration.SHIM.read_text())
    names = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and node.targets[0].id == "TRAINERS")
    assert sorted(names) == sorted(TRAINER_OPTIONS)


def test_command_line(capsys):
    from SegmentMBTFELib.training.nnunet_trainer.commands import main
    assert main(["path"]) == 0
    assert capsys.readouterr().out.strip() == str(registration.external_trainer_folder())
    assert main([]) == 2  # no command: the help


# nnU-Net's lookup of a trainer by name (find_objects.recursive_find_trainer_class_by_name), with its own trainer
# folder swapped for an empty one, so only the nnUNet_extTrainer folders can provide the trainer, whether or not a
# concurrent test registered the shim in nnU-Net's package.
EXT_TRAINER_LOOKUP = r"""
import json, sys
import nnunetv2
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # imported before the swap
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from SegmentMBTFELib.training.nnunet_trainer import trainer as ours
nnunetv2.__path__ = [sys.argv[1]]
found = recursive_find_trainer_class_by_name("nnUNetTrainerMBTFE")
print(json.dumps({"ours": found is ours.nnUNetTrainerMBTFE}))
"""


def test_register_ext_trainer_prints_the_line_nnunet_reads(nnunet_installed, tmp_path, capsys):
    import shlex
    from SegmentMBTFELib import cli
    trainer_files = sorted(p.name for p in registration.trainer_folder().iterdir())
    assert cli.main(["nnunet-trainer", "register", "--ext-trainer"]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"export nnUNet_extTrainer={shlex.quote(str(registration.external_trainer_folder()))}"
    assert sorted(p.name for p in registration.trainer_folder().iterdir()) == trainer_files  # nothing written
    name, value = shlex.split(line)[1].split("=", 1)
    (tmp_path / "training" / "nnUNetTrainer").mkdir(parents=True)
    done = subprocess.run([sys.executable, "-c", EXT_TRAINER_LOOKUP, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=dict(os.environ, **nnunet_environment(tmp_path), **{name: value}))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Using trainer 'nnUNetTrainerMBTFE' from: {value}" in done.stdout
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"ours": True}


TRAINER_CHECKS = r"""
import json, sys, torch
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from SegmentMBTFELib.training.nnunet_trainer import trainer as ours, external_trainer_folder
plans = json.loads(sys.argv[1])
found = {name: recursive_find_trainer_class_by_name(name) is getattr(ours, name) for name in sys.argv[2:]}
options = {name: getattr(ours, name).mbtfe_options for name in sys.argv[2:]}
folder = str(external_trainer_folder())  # as nnU-Net searches nnUNet_extTrainer folders
external = recursive_find_python_class(folder, "nnUNetTrainerMBTFE", None, base_folder=folder,
                                       cleanup_imports_from_base_folder=True) is ours.nnUNetTrainerMBTFE
cm = PlansManager(plans).get_configuration("3d_fullres")
new = ours.nnUNetTrainerMBTFE.build_network_architecture(PlansManager(plans), cm, 1, 3, True)
new_predictor = ours.nnUNetTrainerMBTFE.build_network_architecture(PlansManager(plans), cm, 1, 3,
                                                                   enable_deep_supervision=False)
old = ours.nnUNetTrainerMBTFE.build_network_architecture(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                                         cm.network_arch_init_kwargs_req_import, 1, 3, True)
old_predictor = ours.nnUNetTrainerMBTFE_BN.build_network_architecture(
    cm.network_arch_class_name, cm.network_arch_init_kwargs, cm.network_arch_init_kwargs_req_import, 1, 3,
    enable_deep_supervision=False)
shapes = lambda n: {k: list(v.shape) for k, v in n.state_dict().items()}
for module in [m for m in sys.modules if m.startswith("SegmentMBTFELib")]:
    sys.modules[module] = None  # as if SegmentMBTFELib were not installed: the shim must not break nnU-Net
namespace = {}
exec(open(ours.__file__.replace("trainer.py", "shim/nnUNetTrainerMBTFE.py")).read(), namespace)
try:
    namespace["nnUNetTrainerMBTFE"]({}, "3d_fullres", 0, {})
    stand_in = "constructed"
except ImportError as error:
    stand_in = str(error)
print(json.dumps({"found": found, "options": options, "external": external, "same_keys": shapes(new) == shapes(old),
                  "deep_supervision": [new.decoder.deep_supervision, new_predictor.decoder.deep_supervision,
                                       old.decoder.deep_supervision, old_predictor.decoder.deep_supervision],
                  "old_predictor_norm": type(old_predictor.encoder.mbtfe_modules[0].bn1).__name__,
                  "stand_in": stand_in}))
"""


def test_nnunet_finds_the_trainers_and_builds_with_both_signatures(registered_trainer, tmp_path):
    plans = model_factory.plans_dict("Dataset998_MBTFE")
    done = subprocess.run([sys.executable, "-c", TRAINER_CHECKS, json.dumps(plans), *TRAINER_OPTIONS],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, **nnunet_environment(tmp_path)))
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["found"] == {name: True for name in TRAINER_OPTIONS}
    assert facts["options"] == TRAINER_OPTIONS  # the engine rebuilds each trainer's network from this table
    assert facts["external"] is True
    assert facts["same_keys"] is True
    assert facts["deep_supervision"] == [True, False, True, False]
    assert facts["old_predictor_norm"] == "BatchNorm3d"
    assert "need SegmentMBTFELib" in facts["stand_in"]


def _source_hash() -> str:
    """Identifies the network and trainer code, so a cached trained folder is rebuilt when either changes."""
    import SegmentMBTFELib.networks as networks
    files = sorted(Path(networks.__file__).parent.glob("*.py")) + [Path(registration.__file__).with_name("trainer.py")]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]


def nnunet_environment(root: Path) -> dict:
    """nnU-Net's folders under `root`, laid out as nnunet_reference lays them out."""
    return {"nnUNet_raw": str(root / "nnUNet_raw"), "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
            "nnUNet_results": str(root / "nnUNet_results"), "nnUNet_def_n_proc": "1", "nnUNet_compile": "false",
            "MPLBACKEND": "Agg"}


@pytest.fixture(scope="module")
def mbtfe_model(registered_trainer, hippo3d_model) -> Path:
    """A model folder written by nnU-Net's own training loop with nnUNetTrainerMBTFE: one epoch of two
    iterations, then nnU-Net's validation, on the preprocessed hippocampus data and tiny plans (features
    8/16/32/64, patch 32x40x32) that nnunet_reference made for its hippo3d model, in the same root.
    Rebuilt only when those plans or the network and trainer code change."""
    root = hippo3d_model.parents[2]
    plans_file = root / "nnUNet_preprocessed" / hippo3d_model.parent.name / "nnUNetPlans.json"
    model_dir = hippo3d_model.parent / f"{TRAINER}__nnUNetPlans__3d_fullres"
    request = {"trainer": TRAINER, "dataset": hippo3d_model.parent.name, "seed": 0, "train_iterations": 2,
               "source": _source_hash(), "plans": hashlib.sha256(plans_file.read_bytes()).hexdigest()[:16]}
    # one build at a time with the other reference builds, which share this root's hippocampus data
    build_once(root, root / "records" / f"{TRAINER}.json", request, lambda: _train_mbtfe(root, model_dir, request),
               (model_dir / "fold_0").is_dir)
    return model_dir


def _train_mbtfe(root: Path, model_dir: Path, request: dict) -> None:
    shutil.rmtree(model_dir, ignore_errors=True)
    log_dir = root / "logs" / TRAINER
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "train_request.json").write_text(json.dumps(request))
    with open(log_dir / "train.log", "w") as log:
        done = subprocess.run([sys.executable, __file__, "train", str(log_dir / "train_request.json")],
                              env=dict(os.environ, **nnunet_environment(root)), stdout=log,
                              stderr=subprocess.STDOUT, timeout=1200)
    assert done.returncode == 0, (log_dir / "train.log").read_text()[-6000:]


def test_trainer_writes_the_network_into_plans_and_checkpoint(mbtfe_model):
    architecture = json.loads((mbtfe_model / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    assert architecture["network_class_name"] == "SegmentMBTFELib.networks.mbtfe.MBTFEUNet"
    assert {k: architecture["arch_kwargs"][k] for k in mbtfe_module.DEFAULT_OPTIONS} == mbtfe_module.DEFAULT_OPTIONS
    checkpoint = torch.load(mbtfe_model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER
    assert len(checkpoint["logging"]["train_losses"]) == 1  # nnU-Net's own loop ran an epoch
    trained = checkpoint["init_args"]["plans"]["configurations"]["3d_fullres"]["architecture"]
    assert trained == architecture
    assert "encoder.mbtfe_modules.3.conv7_3.weight" in checkpoint["network_weights"]


def test_engine_matches_nnunet_predictor_with_tta(mbtfe_model, hippo_test_cases, nnunet_prediction):
    from SegmentMBTFELib.io.images import read_volume
    case = hippo_test_cases[-1]
    model = load_model(mbtfe_model)
    assert model.trainer_name == TRAINER and isinstance(model.network, MBTFEUNet)
    ours = model.predict([read_volume(str(case[0]))], device="cpu", tta=True, probabilities=True)
    labels_file, probabilities_file = nnunet_prediction(mbtfe_model, [case], folds=(0,), tta=True,
                                                        save_probabilities=True)
    assert ref.agreement(ours.labels.array, labels_file) >= 0.9999
    theirs = np.load(probabilities_file)["probabilities"]
    assert ours.probabilities.shape == theirs.shape
    assert np.abs(ours.probabilities - theirs).max() < 2e-3  # fp16 logits (as nnU-Net), float32 softmax


def test_engine_rebuilds_the_trained_network_from_plain_plans(mbtfe_model, tmp_path, hippo_test_cases):
    """The same folder with plans.json as nnU-Net's planner wrote it (PlainConvUNet): the engine rebuilds
    MBTFE-UNet from the trainer name and the checkpoint, and predicts exactly the same."""
    from SegmentMBTFELib.io.images import read_volume
    copy_dir = tmp_path / mbtfe_model.parent.name / mbtfe_model.name
    shutil.copytree(mbtfe_model, copy_dir, ignore=shutil.ignore_patterns("validation", "*.pdf", "*.png"))
    plans = json.loads((copy_dir / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    for key in mbtfe_module.DEFAULT_OPTIONS:
        del arch["arch_kwargs"][key]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    (copy_dir / "plans.json").write_text(json.dumps(plans))
    volume = read_volume(str(hippo_test_cases[-1][0]))
    original = load_model(mbtfe_model).predict([volume], device="cpu", tta=False, probabilities=True)
    rebuilt = load_model(copy_dir).predict([volume], device="cpu", tta=False, probabilities=True)
    assert np.array_equal(original.labels.array, rebuilt.labels.array)
    assert np.array_equal(original.probabilities, rebuilt.probabilities)


# ------------------------------------------------------------------------------------------------ worker

def _worker_train(request: dict) -> None:
    """Inside the subprocess: nnU-Net's training loop, as nnUNetv2_train runs it, with the trainer class that
    nnU-Net's own lookup finds by name."""
    import random
    import time
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    os.environ["nnUNet_n_proc_DA"] = "0"  # nnU-Net's single-threaded augmenter: no worker processes
    random.seed(request["seed"])
    np.random.seed(request["seed"])
    torch.manual_seed(request["seed"])
    preprocessed = Path(nnUNet_preprocessed) / request["dataset"]
    plans = load_json(str(preprocessed / "nnUNetPlans.json"))
    plans["continue_training"] = False  # as nnUNetv2_train's get_trainer_from_args sets it
    trainer_class = recursive_find_trainer_class_by_name(request["trainer"])
    trainer = trainer_class(plans, "3d_fullres", 0, load_json(str(preprocessed / "dataset.json")),
                            device=torch.device("cpu"))
    trainer.num_epochs = 1
    trainer.num_iterations_per_epoch = request["train_iterations"]
    trainer.num_val_iterations_per_epoch = 1
    started = time.perf_counter()
    trainer.run_training()
    print(f"[test_mbtfe] train {request['trainer']}: {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    command, request_path = sys.argv[1], sys.argv[2]
    {"train": _worker_train}[command](json.loads(Path(request_path).read_text()))
