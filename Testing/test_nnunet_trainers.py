"""Every trainer nnU-Net 2.8 ships: Primus (V1 and V3, size S) as an engine network, the trainers that build the plans'
network another way (BN, no deep supervision), the names published models use (NoMirroring, _Xepochs_NoMirroring),
and a made-up trainer that builds its own network, refused by name before any weight is loaded.

The reference is nnU-Net's own code: folders trained a few iterations by nnU-Net's training loop with each trainer
(nnunet_reference.NNUNET_TRAINER_KINDS), predicted by nnUNetPredictor. nnU-Net's Primus imports timm, which imports
torchvision; PyPI's torchvision is built against the CUDA torch and its compiled ops do not load against the CPU torch,
so the reference subprocesses declare the two op schemas torchvision's import registers fakes for (no kernels;
nnunet_reference._torchvision_without_compiled_ops) and run nnU-Net's, timm's and dynamic-network-architectures'
code unchanged. nnunetv2 and timm only ever run in subprocesses here.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nnunet_reference as ref
from SegmentMBTFELib import ModelError, cli, load_model
from SegmentMBTFELib.io.images import read_volume
from SegmentMBTFELib.networks.primus import Primus
from SegmentMBTFELib.nnunet_trainers import PRIMUS_TRAINERS, builds_plans_network

pytestmark = pytest.mark.usefixtures("one_torch_thread")
README = Path(__file__).resolve().parents[1] / "README.md"

# reference kind -> (trainer, network class the engine builds, TTA axes the checkpoint allows)
KINDS = {
    "hippo3d_primus_s": ("nnUNet_Primus_S_Trainer", "Primus", (0, 1, 2)),
    "hippo3d_primusv3_s": ("nnUNet_PrimusV3S_Trainer", "Primus", (0, 1, 2)),
    "hippo3d_bn": ("nnUNetTrainerBN", "PlainConvUNet", (0, 1, 2)),
    "hippo3d_nodeepsupervision": ("nnUNetTrainerNoDeepSupervision", "PlainConvUNet", (0, 1, 2)),
    "hippo3d_nomirroring": ("nnUNetTrainerNoMirroring", "PlainConvUNet", None),
    "hippo3d_4000epochs_nomirroring": ("nnUNetTrainer_4000epochs_NoMirroring", "PlainConvUNet", None),
}


def _reference_python(code: str, *args: str, timeout: float = 600) -> dict:
    """Runs `code` in a subprocess with nnU-Net's, timm's and dynamic-network-architectures' code importable (the
    reference's torchvision declaration first); its last stdout line is JSON."""
    prelude = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
               "import nnunet_reference; nnunet_reference._torchvision_without_compiled_ops()\n")
    done = subprocess.run([sys.executable, "-c", prelude + code, *args], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ nnU-Net's side

NNUNET_FACTS = r"""
import inspect, json, pkgutil, importlib, sys, torch
import nnunetv2.training.nnUNetTrainer as package
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.primus import primus_trainers as pt
facts = {"trainers": {}, "primus": {}}
for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):  # every trainer class nnunetv2 ships
    module = importlib.import_module(info.name)
    for name, cls in vars(module).items():
        if inspect.isclass(cls) and issubclass(cls, nnUNetTrainer) and cls.__module__ == module.__name__ \
                and not name.startswith("Abstract"):
            facts["trainers"][name] = cls.build_network_architecture is not nnUNetTrainer.build_network_architecture
plans = type("C", (), {"patch_size": (32, 40, 32)})()
for name in json.loads(sys.argv[2]):  # every Primus trainer's network: keys and shapes (no memory: meta tensors)
    with torch.device("meta"):
        net = getattr(pt, name).build_network_architecture(None, plans, 1, 3, False)
    facts["primus"][name] = {k: list(v.shape) for k, v in net.state_dict().items()}
torch.manual_seed(0); torch.set_num_threads(1)
forward = {}
for name in json.loads(sys.argv[3]):  # forward passes of V1, V2, V3 on random weights
    net = getattr(pt, name).build_network_architecture(None, plans, 1, 3, False).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # LayerScale and the V3 skip scales away from their init
        x = torch.randn(2, 1, 32, 40, 32)
        forward[name] = {"weights": net.state_dict(), "input": x, "output": net(x)}
torch.save(forward, sys.argv[1])
print(json.dumps(facts))
"""
FORWARD_TRAINERS = ("nnUNet_Primus_S_Trainer", "nnUNet_PrimusV2S_Trainer", "nnUNet_PrimusV3S_Trainer")


@pytest.fixture(scope="module")
def nnunet_facts(tmp_path_factory, nnunet_installed) -> dict:
    """What nnunetv2 2.8's own code says, in one subprocess: its trainer classes (and which build their own network),
    every Primus trainer's state-dict shapes, and Primus forward passes (saved under "forward_file")."""
    forward_file = tmp_path_factory.mktemp("primus") / "forward.pt"
    facts = _reference_python(NNUNET_FACTS, str(forward_file), json.dumps(sorted(PRIMUS_TRAINERS)),
                              json.dumps(FORWARD_TRAINERS))
    return dict(facts, forward_file=forward_file)


# ------------------------------------------------------------------------------------------------ the Primus network

def test_every_primus_trainer_builds_the_same_weights_as_nnunet(nnunet_facts):
    """All 20 Primus trainers of nnU-Net 2.8 (V1/V2/V3, S/B/M/L, the batch-size and patch variants): the engine's
    Primus has the very state-dict keys and shapes nnU-Net's trainer builds (so its checkpoints load strictly)."""
    assert sorted(nnunet_facts["primus"]) == sorted(PRIMUS_TRAINERS)
    for name, (version, size) in PRIMUS_TRAINERS.items():
        with torch.device("meta"):
            ours = Primus(1, 3, version=version, size=size, input_shape=(32, 40, 32))
        assert {k: list(v.shape) for k, v in ours.state_dict().items()} == nnunet_facts["primus"][name], name


def test_primus_forward_is_bit_identical(nnunet_facts):
    """nnU-Net's Primus (dynamic-network-architectures + timm) and the engine's, same weights, same input: the
    same float32 logits, bit for bit (the reshapes, rotary table and attention done in the same order)."""
    saved = torch.load(nnunet_facts["forward_file"], weights_only=True)
    for name in FORWARD_TRAINERS:
        version, size = PRIMUS_TRAINERS[name]
        net = Primus(1, 3, version=version, size=size, input_shape=(32, 40, 32)).eval()
        net.load_state_dict(saved[name]["weights"])
        with torch.no_grad():
            assert torch.equal(net(saved[name]["input"]), saved[name]["output"]), name


def test_primus_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="multiples of 8"):
        Primus(1, 3, version="v1", size="S", input_shape=(32, 36, 32))
    with pytest.raises(ValueError, match="3D patch"):
        Primus(1, 3, version="v1", size="S", input_shape=(64, 64))


# ------------------------------------------------------------------------------------------------ the trainer table

def test_every_trainer_nnunet_ships_is_accounted_for(nnunet_facts):
    """Each trainer class in nnunetv2 2.8's nnUNetTrainer/ tree either builds the plans' network (and then does not
    override build_network_architecture, BN excepted: the plans' network with BatchNorm) or is a Primus the engine
    builds; and the README's trainer table names every one of them."""
    shipped = nnunet_facts["trainers"]
    assert len(shipped) > 60 and "nnUNet_PrimusV3S_Trainer" in shipped
    unknown = [n for n in shipped if not builds_plans_network(n) and n not in PRIMUS_TRAINERS]
    assert unknown == []
    own = {n for n, builds_own in shipped.items() if builds_own}
    assert own - set(PRIMUS_TRAINERS) == {"nnUNetTrainerBN"}  # NoDeepSupervision only switches the heads off
    table = README.read_text().split("### Trainers nnU-Net 2.8 ships", 1)[1].split("\n## ", 1)[0]
    missing = [n for n in shipped if f"`{n}`" not in table]
    assert missing == []


# ------------------------------------------------------------------------------------------------ parity with nnU-Net

@pytest.fixture(scope="module")
def held_out(hippo_test_cases) -> list:
    """The last hippocampus test case: never seen in training."""
    return [hippo_test_cases[-1][0]]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_engine_matches_nnunet_predictor(kind, nnunet_model, nnunet_prediction, held_out):
    trainer, network, axes = KINDS[kind]
    folder = nnunet_model(kind)
    model = load_model(folder)
    assert model.trainer_name == trainer == folder.name.split("__")[0]
    assert type(model.network).__name__ == network and model.mirror_axes == axes
    volume = read_volume(str(held_out[0]))
    predicted = nnunet_prediction(folder, [held_out], tta=True, also_without_tta=True)  # one nnU-Net process
    for tta, labels_file in zip((True, False), predicted):
        ours = model.predict([volume], device="cpu", tta=tta)
        theirs = ref._as_array(labels_file)
        labels, counts = np.unique(theirs, return_counts=True)
        foreground = 1 - counts[0] / theirs.size if labels[0] == 0 else 1.0
        print(f"{kind} tta={tta}: labels {labels.tolist()}, foreground {foreground:.1%}, "
              f"agreement {ref.agreement(ours.labels.array, theirs):.6f}")
        assert len(labels) >= 2 and counts.min() > 0.005 * theirs.size  # not degenerate: two labels, 0.5% each
        assert ref.agreement(ours.labels.array, theirs) >= 0.9999
        assert ours.settings["tta"] == (tta and axes is not None)


def test_no_mirroring_checkpoints_turn_tta_off(nnunet_model, held_out):
    """NoMirroring trainers save inference_allowed_mirroring_axes None: the engine's TTA is then a no-op (one pass)."""
    folder = nnunet_model("hippo3d_nomirroring")
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["inference_allowed_mirroring_axes"] is None
    model = load_model(folder)
    volume = read_volume(str(held_out[0]))
    on, off = (model.predict([volume], device="cpu", tta=t, probabilities=True) for t in (True, False))
    assert np.array_equal(on.probabilities, off.probabilities)


# ------------------------------------------------------------------------------------------------ unknown trainers

def _renamed(folder: Path, trainer: str, tmp_path: Path) -> Path:
    """`folder` as if trained by `trainer`: the folder's name and every checkpoint's trainer_name."""
    copy_dir = tmp_path / folder.parent.name / folder.name.replace(folder.name.split("__")[0], trainer)
    shutil.copytree(folder, copy_dir, ignore=shutil.ignore_patterns("validation", "*.pdf", "*.png"))
    for checkpoint_file in copy_dir.glob("fold_*/checkpoint_*.pth"):
        checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
        checkpoint["trainer_name"] = trainer
        torch.save(checkpoint, checkpoint_file)
    return copy_dir


def test_made_up_trainer_with_its_own_network_is_refused_by_name(nnunet_model, tmp_path, monkeypatch):
    """A trainer nobody knows whose weights are not the plans' network (here Primus weights under a made-up name) is
    refused naming the trainer, before any weight is loaded; one whose weights are the plans' network segments."""
    import SegmentMBTFELib.inference.model as model_module
    loaded = []
    monkeypatch.setattr(model_module, "load_weights", lambda *a: loaded.append(a))
    folder = _renamed(nnunet_model("hippo3d_primus_s"), "nnUNetTrainerMyTransformer", tmp_path)
    with pytest.raises(ModelError) as error:
        load_model(folder)
    message = str(error.value)
    assert "nnUNetTrainerMyTransformer" in message and "builds a network other than" in message
    assert "do not fit" not in message and loaded == []
    monkeypatch.undo()
    plain = _renamed(nnunet_model("hippo3d_bn"), "nnUNetTrainerMyLoss", tmp_path / "plain")
    with pytest.raises(ModelError, match="nnUNetTrainerMyLoss"):  # BN weights: not the plans' instance norm
        load_model(plain)
    same = _renamed(nnunet_model("hippo3d_nomirroring"), "nnUNetTrainerMyLoss", tmp_path / "same")
    assert type(load_model(same).network).__name__ == "PlainConvUNet"


def test_primus_found_by_the_checkpoints_trainer_name(nnunet_model, tmp_path):
    """A Primus folder renamed by its user (no `Trainer__Plans__configuration` name) is still built as Primus: the
    checkpoint's trainer_name says which network it holds."""
    folder = nnunet_model("hippo3d_primus_s")
    renamed = tmp_path / "my_primus_model"
    shutil.copytree(folder, renamed, ignore=shutil.ignore_patterns("validation", "*.pdf", "*.png"))
    model = load_model(renamed)
    assert type(model.network).__name__ == "Primus" and model.trainer_name == "nnUNet_Primus_S_Trainer"


def test_primus_with_another_models_dataset_json_is_refused(nnunet_model, tmp_path):
    """The output count of Primus' last transposed convolution is checked against dataset.json's labels, as the
    U-Nets' heads are: a dataset.json from another model would name the segments wrongly."""
    folder = nnunet_model("hippo3d_primus_s")
    copy_dir = tmp_path / folder.parent.name / folder.name
    shutil.copytree(folder, copy_dir, ignore=shutil.ignore_patterns("validation", "*.pdf", "*.png"))
    dataset = json.loads((copy_dir / "dataset.json").read_text())
    dataset["labels"]["tail"] = 3
    (copy_dir / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(ModelError, match="lists 4 labels .* predict 3"):
        load_model(copy_dir)


# ------------------------------------------------------------------------------------------------ info, fine-tuning

def test_models_info_names_the_family_and_trainer(nnunet_model, capsys):
    folder = nnunet_model("hippo3d_primusv3_s")
    assert cli.main(["models", "info", str(folder)]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if line.strip())
    assert rows["Trainer"].strip() == "nnUNet_PrimusV3S_Trainer"
    assert rows["Network"].startswith("Primus V3-S (")
    assert load_model(folder).name == "Dataset901_Hippocampus (3d_fullres, Primus V3-S)"
    from SegmentMBTFESlicer import catalog  # the panel's list: torch-free, family and trainer in its summary
    entry = catalog.describe(folder)
    assert entry.name == "Dataset901_Hippocampus (3d_fullres, Primus V3-S)"
    assert "Network: Primus V3-S" in entry.summary() and "nnUNet_PrimusV3S_Trainer" in entry.summary()


def test_primus_finetunes_into_a_version(nnunet_model, tmp_path, monkeypatch, capsys, shared_data):
    """Fine-tuning a Primus folder as its nnU-Net trainer trains (AdamW, clipped at 1): a version that loads as the
    same Primus, with other weights, and says its family."""
    from SegmentMBTFELib.models.versions import ModelVersions
    monkeypatch.setenv("SEGMENTMBTFE_HOME", str(tmp_path / "home"))
    folder = nnunet_model("hippo3d_primus_s")
    case_id = ref.hippocampus_case_ids(shared_data)[-2]
    train = shared_data / "hippocampus" / "train"
    code = cli.main(["finetune", "-m", str(folder), "-i", str(train / "images" / f"{case_id}.nii.gz"),
                     "-l", str(train / "labels" / f"{case_id}.nii.gz"), "--iterations", "2", "--no-evaluation",
                     "--device", "cpu", "-q"])
    assert code == 0, capsys.readouterr().err
    version = ModelVersions(folder).current()
    assert version.provenance["finetune"]["network"]["family"] == "Primus-S"
    tuned, original = load_model(version.path), load_model(folder)
    assert type(tuned.network).__name__ == "Primus" and tuned.trainer_name == "nnUNet_Primus_S_Trainer"
    assert any(not torch.equal(tuned.weights[0][k], original.weights[0][k]) for k in original.weights[0])
