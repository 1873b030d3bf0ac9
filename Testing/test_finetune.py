"""Fine-tuning (SegmentMBTFELib.training.finetune): it learns, leaves the original alone, repeats with a seed,
freezes what it is told to, refuses bad cases, cancels, and trains with nnU-Net's own loss.

Small model folders from model_factory (tiny PlainConvUNet, random weights) keep these fast; the cases
are real hippocampus MR images and labels from ../shared/data. The full check (the shipped model, 10
corrected cases, Dice on the other held-out cases) is benchmarks/bench_finetune.py.
"""
import hashlib
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model_factory import make_model_folder
from SegmentMBTFELib import Cancelled, InputError, load_model, read_volume
from SegmentMBTFELib.models.shipped import default_model
from SegmentMBTFELib.training.finetune import FinetuneSettings, _Loss, budget_seconds, dice_per_label, finetune
from SegmentMBTFELib.volume import CorrectedCase, Volume

FAST = dict(evaluate=False, batch_size=2)


def _case(shared_data: Path, case_id: str) -> CorrectedCase:
    root = shared_data / "hippocampus" / "train"
    return CorrectedCase(case_id, [read_volume(root / "images" / f"{case_id}.nii.gz")],
                read_volume(root / "labels" / f"{case_id}.nii.gz"))


@pytest.fixture(scope="module")
def cases(shared_data):
    return [_case(shared_data, c) for c in ("hippocampus_001", "hippocampus_003")]


@pytest.fixture
def tiny(tmp_path):
    return make_model_folder(tmp_path, patch_size=(24, 32, 24))


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_finetuning_lowers_the_loss(tiny, cases):
    """A random tiny network, fine-tuned on one real case, fits it better as it goes."""
    model = load_model(tiny)
    result = finetune(model, cases[:1], settings=FinetuneSettings(iterations=60, learning_rate=1e-2, **FAST))
    assert result.iterations == 60 and len(result.losses["0"]) == 60
    assert np.mean(result.losses["0"][-10:]) < np.mean(result.losses["0"][:10]) - 0.2


def test_finetuning_the_shipped_model_on_held_out_cases(shared_data):
    """The issue's check in small: the default shipped model, fine-tuned on 2 of its held-out cases
    (reference labels as the corrections), segments them better and the next 2 held-out cases no worse
    than 0.01; its files stay byte-identical. benchmarks/bench_finetune.py runs it with 10 + 32 cases."""
    folder = default_model()
    files = _files(folder)
    held_out = json.loads((folder / "results.json").read_text())["validation_cases"]
    tune, others = [_case(shared_data, c) for c in held_out[:2]], [_case(shared_data, c) for c in held_out[2:4]]
    result = finetune(load_model(folder), tune, validation=others, settings=FinetuneSettings(iterations=40))
    before, after = result.dice_before, result.dice_after
    assert after["training"]["mean"] > before["training"]["mean"], (before, after)
    assert after["validation"]["mean"] >= before["validation"]["mean"] - 0.01, (before, after)
    assert _files(folder) == files


def test_the_original_model_is_untouched(tiny, cases):
    files = _files(tiny)
    model = load_model(tiny)
    loaded = {k: v.clone() for k, v in model.weights[0].items()}
    result = finetune(model, cases[:1], settings=FinetuneSettings(iterations=3, **FAST))
    assert _files(tiny) == files
    assert all(torch.equal(loaded[k], v) for k, v in model.weights[0].items())
    assert all(torch.equal(loaded[k], v) for k, v in model.network.state_dict().items())
    assert any(not torch.equal(loaded[k], v) for k, v in result.weights["0"].items())
    assert set(result.weights["0"]) == set(loaded)  # loads into the inference network as it is


def test_a_seed_repeats_a_run(tiny, cases):
    model = load_model(tiny)
    runs = [finetune(model, cases, settings=FinetuneSettings(iterations=4, seed=s, **FAST)) for s in (7, 7, 8)]
    same = [torch.equal(runs[0].weights["0"][k], runs[1].weights["0"][k]) for k in runs[0].weights["0"]]
    assert all(same) and runs[0].losses == runs[1].losses
    assert runs[2].losses != runs[0].losses


def test_freeze_encoder_trains_the_decoder_only(tiny, cases):
    model = load_model(tiny)
    result = finetune(model, cases[:1], settings=FinetuneSettings(iterations=3, freeze_encoder=True, **FAST))
    original, tuned = model.weights[0], result.weights["0"]
    encoder = [k for k in original if k.startswith("encoder.")]
    decoder = [k for k in original if k.startswith("decoder.") and not k.startswith("decoder.encoder.")]
    assert encoder and decoder
    assert all(torch.equal(original[k], tuned[k]) for k in encoder)
    assert any(not torch.equal(original[k], tuned[k]) for k in decoder)
    assert result.frozen == ["encoder"]


def test_every_fold_is_finetuned_and_the_result_predicts(tmp_path, cases):
    model = load_model(make_model_folder(tmp_path, folds=(0, 1), patch_size=(24, 32, 24)))
    result = finetune(model, cases[:1], validation=cases[1:],
                      settings=FinetuneSettings(iterations=2, batch_size=2))
    assert set(result.weights) == {"0", "1"}
    assert set(result.dice_before) == {"training", "validation"} == set(result.dice_after)
    tuned = model.with_weights([result.weights["0"], result.weights["1"]])
    assert tuned.predict(cases[0].images, tta=False).labels.array.shape == cases[0].labels.array.shape
    provenance = result.provenance()
    assert provenance["parent"]["checksum"] == model.checksum()
    assert [c["name"] for c in provenance["cases"]] == ["hippocampus_001"]
    assert provenance["validation_cases"][0]["name"] == "hippocampus_003"
    assert len(provenance["cases"][0]["labels"]) == 16


def test_2d_and_region_models_finetune(tmp_path, cases):
    model_2d = load_model(make_model_folder(tmp_path / "a", configuration="2d", patch_size=(32, 32, 32)))
    regions = {"background": 0, "whole": [1, 2], "posterior": 2}
    model_regions = load_model(make_model_folder(tmp_path / "b", labels=regions, regions_class_order=[1, 2],
                                                 patch_size=(24, 32, 24)))
    for model in (model_2d, model_regions):
        result = finetune(model, cases[:1], settings=FinetuneSettings(iterations=2))
        assert np.isfinite(result.losses["0"]).all()
        assert "mean" in result.dice_after["training"]
    assert set(result.dice_after["training"]) == {"whole", "posterior", "mean"}


def test_time_budget_stops_early(tiny, cases):
    model = load_model(tiny)
    result = finetune(model, cases[:1], settings=FinetuneSettings(iterations=100000, time_budget_s=3, **FAST))
    assert 1 <= result.iterations < 100000 and "time budget" in result.stopped


def test_by_default_the_run_fits_a_time_budget(tiny, cases):
    """No iteration count: the whole run (Dice before and after included) fits the budget, the iterations and
    the learning rate's decay derived from the speed measured while training."""
    assert budget_seconds(FinetuneSettings(), torch.device("cpu")) == 300
    assert budget_seconds(FinetuneSettings(), torch.device("cuda")) == 120
    assert budget_seconds(FinetuneSettings(iterations=50), torch.device("cpu")) is None
    model, texts = load_model(tiny), []
    started = time.perf_counter()
    result = finetune(model, cases[:2], settings=FinetuneSettings(time_budget_s=6, **FAST),
                      progress=lambda fraction, text: texts.append((time.perf_counter(), text)), started=started)
    seconds = time.perf_counter() - started
    steps = [started] + [t for t, text in texts if "iteration" in text]
    slowest = max(b - a for a, b in zip(steps, steps[1:]))  # the budget is checked between iterations
    assert 5.4 <= seconds <= 6 + slowest + 0.5 and result.budget_s == 6 and result.stopped == ""
    assert result.iterations >= 1 and set(result.timing) == {"preparing_s", "sampling_s", "forward_backward_s"}
    done, planned = map(int, re.search(r"iteration (\d+)/(\d+)", [t for _, t in texts if "iteration" in t][-1])
                        .groups())
    assert done == result.iterations and abs(planned - done) <= max(3, 0.25 * done)  # the decay ran its course


def test_cases_are_drawn_in_rounds(tiny, cases):
    from SegmentMBTFELib.training.finetune import _training_data
    from SegmentMBTFELib.training.patches import PatchSampler
    model = load_model(tiny)
    data = [_training_data(model, c) for c in cases]
    sampler = PatchSampler(model, data, torch.device("cpu"), np.random.default_rng(0))
    drawn = [sampler._next_case(False) for _ in range(3 * len(data))]
    assert sorted(drawn) == sorted(list(range(len(data))) * 3)  # however few draws, no case is left out


@pytest.mark.parametrize("when", ["while iteration 2 is reported", "during iteration 3's forward pass"])
def test_cancel_stops_within_one_iteration_with_nothing_returned(tiny, cases, when):
    """The README's bound: the iteration running when Cancel comes is finished, no other starts. Iterations
    are counted by the network's forward passes (the fine-tune trains a copy of the network, hook included)."""
    model = load_model(tiny)
    cancel, seen, forwards = threading.Event(), [], []

    def progress(fraction, text):
        seen.append(text)
        if when.startswith("while") and "iteration 2/" in text:
            cancel.set()

    def hook(module, inputs, output):
        forwards.append(1)
        if when.startswith("during") and len(forwards) == 3:
            cancel.set()
    model.network.register_forward_hook(hook)
    with pytest.raises(Cancelled):
        finetune(model, cases[:1], settings=FinetuneSettings(iterations=50, **FAST), progress=progress, cancel=cancel)
    assert len(forwards) == (2 if when.startswith("while") else 3), f"{len(forwards)} iterations ran"
    assert not any("iteration 3/" in t for t in seen)


def test_bad_cases_get_one_clear_message(tiny, cases):
    model = load_model(tiny)
    image, labels = cases[0].images[0], cases[0].labels
    wrong_value = labels.with_array(np.where(labels.array == 2, 5, labels.array).astype(np.uint8))
    shifted = Volume(labels.array, labels.spacing, tuple(o + 5 for o in labels.origin), labels.direction)
    cropped = labels.with_array(labels.array[1:])
    empty = labels.with_array(np.zeros_like(labels.array))
    expectations = [
        (CorrectedCase("a", [image], wrong_value), "value(s) 5"),
        (CorrectedCase("b", [image], shifted), "grid"),
        (CorrectedCase("c", [image], cropped), "voxels but the image"),
        (CorrectedCase("d", [image, image], labels), "needs 1 input image"),
        (CorrectedCase("e", [image], empty), "nothing to learn"),
    ]
    for case, words in expectations:
        with pytest.raises(InputError, match=re.escape(words)):
            finetune(model, [case], settings=FinetuneSettings(iterations=1, **FAST))
    with pytest.raises(InputError, match="at least one"):
        finetune(model, [], settings=FinetuneSettings(iterations=1))
    with pytest.raises(InputError, match="learning rate"):
        finetune(model, cases[:1], settings=FinetuneSettings(learning_rate=0))


def test_dice_per_label_follows_nnunet():
    from SegmentMBTFELib.models.folder import Labels
    labels = Labels({"labels": {"background": 0, "a": 1, "b": 2, "ignore": 3}})
    truth = np.array([0, 1, 1, 2, 3, 3])
    predicted = np.array([0, 1, 2, 2, 1, 0])
    dice = dice_per_label(predicted, truth, labels)
    assert dice == pytest.approx({"a": 2 / 3, "b": 2 / 3})  # voxels of the ignore label do not count
    assert "b" not in dice_per_label(np.zeros(3, int), np.zeros(3, int), labels)  # absent from both: left out


@pytest.mark.parametrize("batch_dice", [True, False])
def test_loss_is_nnunets_loss(nnunet_installed, tiny, batch_dice):
    """Our Dice + CE with deep supervision equals nnU-Net's DeepSupervisionWrapper(DC_and_CE_loss) exactly."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    model = load_model(tiny)
    ours = _Loss(model)
    ours.batch_dice = batch_dice
    theirs = DeepSupervisionWrapper(
        DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                       weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss),
        [0.5 / 0.875, 0.25 / 0.875, 0.125 / 0.875, 0.0][:3])
    generator = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 8, 8, 8), (2, 3, 4, 4, 4), (2, 3, 2, 2, 2)]
    logits = [torch.randn(s, generator=generator) for s in shapes]
    target = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=generator)
    targets = [target] + [torch.nn.functional.interpolate(target.float(), size=s[2:], mode="nearest-exact")
                          for s in shapes[1:]]
    weights = [1, 0.5, 0.0]
    theirs.weight_factors = tuple(w / sum(weights) for w in weights)
    assert float(ours(logits, target)) == pytest.approx(float(theirs(logits, targets)), rel=1e-5)
