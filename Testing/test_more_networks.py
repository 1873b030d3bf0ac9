"""UNet++, SegResNetVAE (Myronenko 2018) and the 2016 3D U-Net as first-class networks, as MBTFE-UNet is: the
networks (2D and 3D, anisotropic strides, deep supervision, pruning, the VAE branch, options kept in the plans and
refused when unknown), their nnU-Net trainers (found by nnU-Net's lookup, their losses), parity with nnU-Net's own
predictor on folders nnU-Net's own training loop wrote with each trainer (nnunet_reference kinds hippo3d_<net> with
two folds and TTA, hippo2d_<net> without TTA, ct_aniso_<net> with TTA and [1,2,2] strides), and each network
segmenting through the command line and the Slicer module's worker process and fine-tuning into a version.

nnunetv2 only ever runs in subprocesses (nnunet_reference.py and the trainer checks below): importing it here
would freeze its nnUNet_* paths for the session.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import model_factory
import nnunet_reference as ref
from SegmentMBTFELib import ModelError, cli, load_model
from SegmentMBTFELib.io.images import read_volume
from SegmentMBTFELib.io.segfile import read_seg_nrrd
from SegmentMBTFELib.models.table import FAMILY_OPTIONS, network_text
from SegmentMBTFELib.models.versions import ModelVersions
from SegmentMBTFELib.networks import architecture_for_trainer, build_network
from SegmentMBTFELib.networks.families import FAMILIES, TRAINER_FAMILIES, family_architecture
from SegmentMBTFELib.networks.segresnet_vae import ResBlock
from SegmentMBTFELib.training.nnunet_trainer import registration

NETS = {"unetpp": "UNetPlusPlus", "segresnetvae": "SegResNetVAE", "unet3d": "UNet3D"}  # reference kind suffix -> class
TRAINERS = {name: f"nnUNetTrainer{name}" for name in NETS.values()}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def plan(dim, strides, kernels, features=(8, 16, 32, 64)):
    """A PlainConvUNet plans architecture (model_factory's) with the given strides and kernels per stage."""
    architecture = model_factory.architecture(dim, features)
    architecture["arch_kwargs"].update(strides=[list(s) for s in strides], kernel_sizes=[list(k) for k in kernels])
    return architecture


# The three kinds of plans nnU-Net writes, with patches as small as their strides allow.
PLANS = {
    "isotropic_3d": (plan(3, [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4), (16, 16, 16)),
    "anisotropic_3d": (plan(3, [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2]],
                            [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]]), (4, 16, 16)),
    "2d": (plan(2, [[1, 1]] + [[2, 2]] * 3, [[3, 3]] * 4), (32, 16)),
}


def network(family, plans="isotropic_3d", deep_supervision=False, **options):
    torch.manual_seed(0)
    architecture, patch = PLANS[plans]
    return build_network(family_architecture(architecture, family, patch_size=patch, **options), 1, 3,
                         deep_supervision)


def downsampled(patch, strides, stage):
    return tuple(int(p // np.prod([s[d] for s in strides[:stage + 1]])) for d, p in enumerate(patch))


# ------------------------------------------------------------------------------------------------ networks

@pytest.mark.parametrize("plans", sorted(PLANS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trains_with_deep_supervision_and_infers_without(family, plans):
    architecture, patch = PLANS[plans]
    strides = architecture["arch_kwargs"]["strides"]
    net = network(family, plans, deep_supervision=True).train()
    outputs = net(torch.randn(2, 1, *patch))
    if family == "UNetPlusPlus":  # heads on X(0,3), X(0,2), X(0,1): all full resolution
        expected = [(2, 3) + patch] * 3
    else:  # nnU-Net's deep supervision: one head per decoder level, highest resolution first
        expected = [(2, 3) + downsampled(patch, strides, s) for s in range(3)]
    assert [tuple(o.shape) for o in outputs] == expected
    loss = sum(o.square().mean() for o in outputs) + (net.vae_loss() if family == "SegResNetVAE" else 0)
    loss.backward()
    assert [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
    net.decoder.deep_supervision = False
    with torch.no_grad():
        assert tuple(net.eval()(torch.randn(1, 1, *patch)).shape) == (1, 3) + patch


def test_unetpp_nested_nodes_and_pruning():
    net = network("UNetPlusPlus", deep_supervision=True)
    assert sorted(net.decoder.nodes) == sorted(f"{i}_{j}" for j in range(1, 4) for i in range(4 - j))
    # X(i,j) convolves X(i,0..j-1) and the up-sampled X(i+1,j-1): (j + 1) x the level's width
    assert net.decoder.nodes["0_3"].convs[0].conv.in_channels == 4 * 8
    assert net.decoder.nodes["1_2"].convs[0].conv.in_channels == 3 * 16
    x = torch.randn(1, 1, *PLANS["isotropic_3d"][1])
    with torch.no_grad():
        full = net.eval()(x)  # deep supervision on: X(0,3), X(0,2), X(0,1)
        pruned = network("UNetPlusPlus", prune_depth=2).eval()
        pruned.load_state_dict(net.state_dict())  # the same weights: pruning only skips nodes
        ran = []
        hooks = [m.register_forward_hook(lambda *a, name=n: ran.append(name)) for n, m in pruned.decoder.nodes.items()]
        assert torch.allclose(pruned(x), full[1], atol=1e-5)
        [h.remove() for h in hooks]
    assert sorted(ran) == ["0_1", "0_2", "1_1"]  # only X(i,j) with i + j <= 2
    architecture = family_architecture(PLANS["2d"][0], "UNetPlusPlus", prune_depth=2)
    assert architecture["arch_kwargs"]["prune_depth"] == 2  # kept in the plans, so in the checkpoint
    with pytest.raises(ModelError, match="prune_depth"):
        family_architecture(PLANS["2d"][0], "UNetPlusPlus", prune_depth=4)


def test_segresnetvae_groupnorm_preactivation_and_vae_losses():
    net = network("SegResNetVAE", deep_supervision=True)
    architecture = family_architecture(*PLANS["isotropic_3d"][:1], "SegResNetVAE", patch_size=(16, 16, 16))
    kwargs = architecture["arch_kwargs"]
    assert kwargs["norm_op"] == "torch.nn.GroupNorm" and kwargs["norm_op_kwargs"]["num_groups"] == 8
    assert kwargs["blocks_down"] == [1, 2, 2, 4] and kwargs["vae_input_size"] == [16, 16, 16]
    assert (kwargs["vae_kl_weight"], kwargs["vae_l2_weight"]) == (0.1, 0.1)
    assert net.encoder.stem.out_channels == 8  # initial filters: the plans' first width
    block = net.encoder.stages[3][1]
    assert isinstance(block, ResBlock) and [type(m).__name__ for m in block.children()][:3] == \
        ["GroupNorm", "ReLU", "Conv3d"]  # pre-activation
    assert sum(isinstance(m, ResBlock) for m in net.encoder.stages[3]) == 4
    x = torch.randn(2, 1, 16, 16, 16)
    net.train()(x)
    terms = net.vae_terms
    assert terms["kl"] > 0 and terms["l2"] > 0
    assert torch.allclose(net.vae_loss(), 0.1 * terms["kl"] + 0.1 * terms["l2"])
    with torch.no_grad():
        net.eval()(x)
    assert net.vae_terms is None and net.vae_loss() == 0.0  # the branch is training only
    inference = build_network(architecture_for_trainer("nnUNetTrainerSegResNetVAE", architecture), 1, 3)
    assert not any(k.startswith("vae.") for k in inference.state_dict())
    assert set(inference.state_dict()) == {k for k in net.state_dict() if not k.startswith("vae.")}


def test_unet3d_is_the_2016_layout():
    net = network("UNet3D", "anisotropic_3d")
    layers = [type(m).__name__ for m in net.modules()]
    assert "BatchNorm3d" in layers and "ReLU" in layers and "InstanceNorm3d" not in layers
    pools = [m for m in net.encoder.modules() if isinstance(m, torch.nn.MaxPool3d)]
    assert [list(p.stride) for p in pools] == [[1, 2, 2], [1, 2, 2], [2, 2, 2]]  # the plans' strides
    convs = [m.conv for m in net.encoder.stages[1] if hasattr(m, "conv")]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(8, 8), (8, 16)]  # doubling before pooling
    assert (net.decoder.transpconvs[0].in_channels, net.decoder.transpconvs[0].out_channels) == (64, 64)
    assert net.decoder.stages[0][0].conv.in_channels == 64 + 32  # concatenated skip


def test_unknown_options_and_values_are_refused(tmp_path):
    architecture = family_architecture(PLANS["isotropic_3d"][0], "UNetPlusPlus")
    architecture["arch_kwargs"]["nested_attention"] = True
    folder = model_factory.make_model_folder(tmp_path, dataset_name="Dataset997_Pp")
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"] = architecture
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelError, match="Unknown UNet\\+\\+ option 'nested_attention'"):
        load_model(folder)
    with pytest.raises(ModelError, match="channel_doubling"):
        family_architecture(PLANS["2d"][0], "UNet3D", channel_doubling="yes")
    with pytest.raises(ModelError, match="Unknown SegResNetVAE option 'vae_beta'"):
        family_architecture(PLANS["2d"][0], "SegResNetVAE", patch_size=(32, 16), vae_beta=1)


def test_models_info_names_every_family_option():
    assert {k: set(v) for k, v in FAMILY_OPTIONS.items() if k in FAMILIES} == \
        {k: set(f.defaults) for k, f in FAMILIES.items()}
    text = network_text(family_architecture(PLANS["2d"][0], "SegResNetVAE", patch_size=(32, 16)))
    assert text.startswith("SegResNetVAE (SegResNetVAE; GroupNorm 8 groups; blocks_down: [1, 2, 2, 4]")
    assert network_text(PLANS["2d"][0], "nnUNetTrainerUNet3D").startswith("3D U-Net (UNet3D, by the trainer's name")


# ------------------------------------------------------------------------------------------------ nnU-Net trainers

@pytest.fixture(scope="module")
def registered(nnunet_installed):
    """The trainers registered with the installed nnunetv2 (nnUNetPredictor finds trainers only there on this torch);
    removed afterwards unless they were there before."""
    was_there = registration.registered_path().exists()
    registration.register()
    yield
    if not was_there:
        registration.unregister()


def nnunet_environment(root: Path) -> dict:
    return {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
            "nnUNet_results": str(root / "results"), "nnUNet_def_n_proc": "1", "nnUNet_compile": "false",
            "MPLBACKEND": "Agg"}


TRAINER_CHECKS = r"""
import json, sys, torch
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from SegmentMBTFELib.training.nnunet_trainer import family_trainers as ours
plans, dataset = json.loads(sys.argv[1]), json.loads(sys.argv[2])
plans["continue_training"] = False  # as nnUNetv2_train's get_trainer_from_args sets it
facts = {}
for name in ours.TRAINERS:
    cls = recursive_find_trainer_class_by_name(name)
    trainer = cls(plans, "3d_fullres", 0, dataset, device=torch.device("cpu"))
    arch = trainer.plans_manager.get_configuration("3d_fullres").network_arch_class_name
    cm = trainer.configuration_manager
    new = cls.build_network_architecture(trainer.plans_manager, cm, 1, 3, True)
    old = cls.build_network_architecture(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                         cm.network_arch_init_kwargs_req_import, 1, 3, enable_deep_supervision=False)
    trainer.network = new.train()
    loss = trainer._build_loss()
    torch.manual_seed(0)
    outputs = new(torch.randn(2, 1, *cm.patch_size))
    targets = [torch.randint(0, 3, (2, 1, *o.shape[2:])).float() for o in outputs]
    total = float(loss(outputs, targets))
    deep_supervision = loss.loss if isinstance(loss, ours.VAERegularisedLoss) else loss
    without = float(deep_supervision(outputs, targets))
    facts[name] = {"found": cls is ours.TRAINERS[name], "class": arch.rsplit(".", 1)[-1],
                   "deep_supervision": [new.decoder.deep_supervision, old.decoder.deep_supervision],
                   "weights": list(deep_supervision.weight_factors),
                   "scales": trainer._get_deep_supervision_scales(), "vae_part": total - without,
                   "vae_loss": float(new.vae_loss()) if hasattr(new, "vae_loss") else 0.0}
print(json.dumps(facts))
"""


def test_nnunet_finds_the_trainers_and_their_losses(registered, tmp_path):
    plans = model_factory.plans_dict("Dataset996_Families")
    plans["configurations"]["3d_fullres"]["architecture"] = model_factory.architecture(3, (8, 16, 32))  # GroupNorm: 8
    dataset = model_factory.dataset_dict(("MRI",), model_factory.DEFAULT_LABELS)
    done = subprocess.run([sys.executable, "-c", TRAINER_CHECKS, json.dumps(plans), json.dumps(dataset)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, **nnunet_environment(tmp_path)))
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert {n: f["found"] for n, f in facts.items()} == {n: True for n in TRAINER_FAMILIES}
    assert {n: f["class"] for n, f in facts.items()} == TRAINER_FAMILIES  # the trainer rewrote the plans
    assert all(f["deep_supervision"] == [True, False] for f in facts.values())
    pp = facts["nnUNetTrainerUNetPlusPlus"]  # equal weights, full-resolution targets
    assert pp["weights"] == [0.5, 0.5] and pp["scales"] == [[1.0, 1.0, 1.0]] * 2
    assert facts["nnUNetTrainerUNet3D"]["weights"] == [1.0, 0.0]  # nnU-Net's own: 1, 1/2, ..., the lowest 0
    assert facts["nnUNetTrainerUNet3D"]["vae_part"] == 0.0
    vae = facts["nnUNetTrainerSegResNetVAE"]
    assert vae["vae_loss"] > 0 and vae["vae_part"] == pytest.approx(vae["vae_loss"], rel=1e-4)


def test_shim_exports_every_trainer():
    import ast
    shim = registration.SHIMS[1]
    tree = ast.parse(shim.read_text())
    names = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and node.targets[0].id == "TRAINERS")
    assert sorted(names) == sorted(TRAINER_FAMILIES) and registration.MARKER in shim.read_text()


# ------------------------------------------------------------------------------------------------ parity with nnU-Net

@pytest.fixture(scope="module")
def small_cases(shared_data, hippo_test_cases, tmp_path_factory) -> dict:
    """Held-out inputs small enough for one tile of the 3D models (each prediction then costs a few network passes,
    mirrored copies included): a 32 x 40 x 32 crop of the last hippocampus test case (1 mm) and a 16 x 16 x 10
    crop of example_ct_sm (3 mm), which nnU-Net resamples with separate z to 6 x 40 x 40 at 4.8 x 1.2 x 1.2 mm."""
    import SimpleITK as sitk
    folder = tmp_path_factory.mktemp("small_cases")
    hippo = sitk.ReadImage(str(hippo_test_cases[-1][0]))
    sitk.WriteImage(sitk.RegionOfInterest(hippo, (32, 40, 32), (2, 6, 0)), str(folder / "hippo_0000.nii.gz"))
    ct = sitk.ReadImage(str(shared_data / "formats" / "totalsegmentator" / "example_ct_sm.nii.gz"))
    sitk.WriteImage(sitk.RegionOfInterest(ct, (16, 16, 10), (50, 40, 10)), str(folder / "ct_0000.nii.gz"))
    return {"hippo": [folder / "hippo_0000.nii.gz"], "ct": [folder / "ct_0000.nii.gz"]}


# (reference kind, TTA, case): 3D with two folds and TTA, 2D without TTA, anisotropic CT with TTA
PARITY = [(f"{kind}_{net}", tta) for net in NETS for kind, tta in (("hippo3d", True), ("hippo2d", False),
                                                                   ("ct_aniso", True))]


@pytest.mark.parametrize("kind,tta", PARITY)
def test_engine_matches_nnunet_predictor(registered, nnunet_model, nnunet_prediction, small_cases, kind, tta):
    folder = nnunet_model(kind)
    case = small_cases["ct" if kind.startswith("ct") else "hippo"]
    model = load_model(folder)
    family = NETS[kind.rsplit("_", 1)[1]]
    assert type(model.network).__name__ == family and model.trainer_name == TRAINERS[family]
    assert model.folds == (["0", "1"] if kind.startswith("hippo3d") else ["0"])
    ours = model.predict([read_volume(str(case[0]))], device="cpu", tta=tta, probabilities=True)
    labels, probabilities = nnunet_prediction(folder, [case], tta=tta, save_probabilities=True)
    assert ref.agreement(ours.labels.array, labels) >= 0.9999
    theirs = np.load(probabilities)["probabilities"]
    assert ours.probabilities.shape == theirs.shape
    assert np.abs(ours.probabilities - theirs).max() < 2e-3  # fp16 logits (as nnU-Net), float32 softmax


def test_rebuilt_from_plain_plans_and_without_vae_weights(nnunet_model, tmp_path, hippo_test_cases):
    """The SegResNetVAE folder with plans.json as nnU-Net's planner wrote it and its checkpoints stripped of the VAE
    branch: the engine rebuilds the network from the trainer's name and the checkpoint and predicts the same."""
    folder = nnunet_model("hippo3d_segresnetvae")
    copy_dir = tmp_path / folder.parent.name / folder.name
    shutil.copytree(folder, copy_dir, ignore=shutil.ignore_patterns("validation", "*.pdf", "*.png"))
    plans = json.loads((copy_dir / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"] = model_factory.architecture(3, (8, 16, 32, 64))
    (copy_dir / "plans.json").write_text(json.dumps(plans))
    for checkpoint_file in copy_dir.glob("fold_*/checkpoint_final.pth"):
        checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
        assert any(k.startswith("vae.") for k in checkpoint["network_weights"])
        checkpoint["network_weights"] = {k: v for k, v in checkpoint["network_weights"].items()
                                         if not k.startswith("vae.")}
        torch.save(checkpoint, checkpoint_file)
    volume = read_volume(str(hippo_test_cases[-1][0]))
    original = load_model(folder, folds=[0]).predict([volume], device="cpu", tta=False, probabilities=True)
    rebuilt = load_model(copy_dir, folds=[0]).predict([volume], device="cpu", tta=False, probabilities=True)
    assert np.array_equal(original.labels.array, rebuilt.labels.array)
    assert np.array_equal(original.probabilities, rebuilt.probabilities)


def test_pruning_recorded_in_the_plans_is_what_the_engine_runs(nnunet_model, tmp_path, small_cases):
    """UNet++ pruned after training: `prune_depth` written into plans.json (the checkpoints are untouched) makes the
    engine run only the nodes of that depth, the head on X(0,1) here."""
    folder = nnunet_model("hippo2d_unetpp")
    copy_dir = tmp_path / folder.parent.name / folder.name
    shutil.copytree(folder, copy_dir, ignore=shutil.ignore_patterns("validation", "*.pdf", "*.png"))
    plans = json.loads((copy_dir / "plans.json").read_text())
    plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["prune_depth"] = 1
    (copy_dir / "plans.json").write_text(json.dumps(plans))
    volume = read_volume(str(small_cases["hippo"][0]))
    full, pruned = load_model(folder), load_model(copy_dir)
    assert full.network.decoder.prune_depth is None and pruned.network.decoder.prune_depth == 1
    ran = []
    for name, node in pruned.network.decoder.nodes.items():
        node.register_forward_hook(lambda *a, name=name: ran.append(name))
    a = full.predict([volume], device="cpu", tta=False, probabilities=True).probabilities
    b = pruned.predict([volume], device="cpu", tta=False, probabilities=True).probabilities
    assert set(ran) == {"0_1"} and not np.allclose(a, b)
    plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["prune_depth"] = 7
    (copy_dir / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelError, match="prune_depth"):
        load_model(copy_dir)


# ------------------------------------------------------------------------------------------------ CLI, worker, fine-tune

def _worker_segment(model_dir: Path, image: Path, output_dir: Path, suffix: str = ".nii.gz") -> Path:
    """The Slicer module's `segment_files` job, sent to a real worker process (`python -m SegmentMBTFELib worker`,
    the command the module starts with Slicer's Python), one JSON request on its stdin, replies on its stdout."""
    request = {"id": 1, "command": "segment_files", "home": os.environ["SEGMENTMBTFE_HOME"], "model": str(model_dir),
               "cases": [[str(image)]], "output_dir": str(output_dir), "format": suffix,
               "options": {"tta": False, "device": "cpu"}}
    with subprocess.Popen([sys.executable, "-m", "SegmentMBTFELib", "worker"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as worker:
        worker.stdin.write(json.dumps(request) + "\n")
        worker.stdin.flush()
        reply = {"type": "no reply: the worker exited"}
        for line in worker.stdout:  # progress until the job's result (or error); closing stdin first would cancel it
            reply = json.loads(line)
            if reply.get("id") == 1 and reply["type"] not in ("progress", "fallback"):
                break
        worker.stdin.write(json.dumps({"command": "shutdown"}) + "\n")
        worker.stdin.close()
        assert worker.wait(timeout=120) == 0
    assert reply["type"] == "result" and not reply["failed"], reply
    return Path(reply["written"][0])


@pytest.mark.parametrize("net", sorted(NETS))
def test_segments_and_finetunes_through_cli_and_worker(net, nnunet_model, tmp_path, monkeypatch, capsys,
                                                       shared_data, hippo_test_cases):
    monkeypatch.setenv("SEGMENTMBTFE_HOME", str(tmp_path / "home"))
    folder = nnunet_model(f"hippo2d_{net}")
    image = hippo_test_cases[-1][0]
    code = cli.main(["models", "info", str(folder)])
    network_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Network"))
    assert code == 0 and network_line.split(None, 1)[1].startswith(f"{FAMILIES[NETS[net]].title} ({NETS[net]}")
    from SegmentMBTFESlicer import catalog  # the panel's model list (torch-free): the family is in the name
    assert catalog.describe(folder).name == f"Dataset901_Hippocampus (2d, {FAMILIES[NETS[net]].title})"
    assert cli.main(["predict", "-m", str(folder), "-i", str(image), "-o", str(tmp_path / "cli.nii.gz"),
                     "--no-tta", "--device", "cpu", "-q"]) == 0
    from_worker = _worker_segment(folder, image, tmp_path / "worker")
    assert ref.agreement(tmp_path / "cli.nii.gz", from_worker) == 1.0

    case_id = ref.hippocampus_case_ids(shared_data)[-2]
    labels = shared_data / "hippocampus" / "train" / "labels" / f"{case_id}.nii.gz"
    images = shared_data / "hippocampus" / "train" / "images" / f"{case_id}.nii.gz"
    code = cli.main(["finetune", "-m", str(folder), "-i", str(images), "-l", str(labels), "--iterations", "2",
                     "--no-evaluation", "--device", "cpu", "-q"])
    assert code == 0, capsys.readouterr().err
    version = ModelVersions(folder).current()
    record = version.provenance["finetune"]
    assert record["iterations"] == 2 and record["network"]["family"] == FAMILIES[NETS[net]].title
    tuned = load_model(version.path)
    assert type(tuned.network).__name__ == NETS[net]
    original = load_model(folder)
    assert any(not torch.equal(tuned.weights[0][k], original.weights[0][k]) for k in original.weights[0])
    if net == "segresnetvae":  # trained without the VAE branch, whose weights are the parent's, unchanged
        assert record["network"]["vae_branch"].startswith("not trained") and "unchanged" in record["network"]["vae_branch"]
        saved = torch.load(next(version.path.glob("*/fold_0/checkpoint_final.pth")), map_location="cpu",
                           weights_only=False)["network_weights"]
        parent = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                            weights_only=False)["network_weights"]
        assert all(torch.equal(saved[k], v) for k, v in parent.items() if k.startswith("vae."))
    # the current version now: the .seg.nrrd files record which version and which weights segmented them
    assert cli.main(["predict", "-m", str(folder), "-i", str(image), "-o", str(tmp_path / "v1.seg.nrrd"),
                     "--no-tta", "--device", "cpu", "-q"]) == 0
    from_worker = _worker_segment(folder, image, tmp_path / "worker_v1", ".seg.nrrd")
    for written in (tmp_path / "v1.seg.nrrd", from_worker):
        recorded = read_seg_nrrd(written)[2]
        assert recorded["version"] == version.id and recorded["checksum"] == tuned.checksum() != original.checksum()
