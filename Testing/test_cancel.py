"""How soon a cancel stops a prediction: the bound the README states, counted in network passes.

A cancel (the `threading.Event` the Slicer worker, the console API and a batch pass) is honoured at cancel
points: before every network pass (a pass holds two tiles, or, with TTA, one tile's mirrored copies or part of
them) and before each class of the export. So once it is set, the pass that is running finishes and no other
starts, and nothing is written. Counted here with a forward hook on the real network of a model_factory model;
the network's batch is made 2 so that TTA's 8 mirrored copies of a tile take 4 passes, as a big model's do on
a CPU. Fine-tuning's bound (one iteration) is in test_finetune.py; Ctrl+C on the command line in
test_bad_input.py.
"""
import threading

import pytest

from SegmentMBTFELib import Cancelled, load_model, read_volume
from SegmentMBTFELib.inference import export as export_module
from SegmentMBTFELib.inference import model as model_module
from SegmentMBTFELib.tasks import segment_files


@pytest.fixture()
def small_batches(monkeypatch):
    monkeypatch.setattr(model_module, "network_batch_size", lambda *args: 2)


def _count_passes(model, cancel, cancel_at_pass=None):
    """A list that grows by one per network pass; the cancel is set from inside pass `cancel_at_pass`, as
    another thread sets it while the network runs."""
    passes = []

    def hook(module, inputs, output):
        passes.append(inputs[0].shape[0])
        if len(passes) == cancel_at_pass:
            cancel.set()
    model.network.register_forward_hook(hook)
    return passes


@pytest.mark.parametrize("tta", [True, False], ids=["tta", "no-tta"])
def test_a_cancel_during_a_pass_lets_no_other_pass_start(models, good_image, small_batches, tta):
    model = load_model(models["one"])
    cancel = threading.Event()
    passes = _count_passes(model, cancel, cancel_at_pass=3)  # with TTA: inside the first tile's 4 passes
    stages = []
    with pytest.raises(Cancelled):
        model.predict([read_volume(good_image)], tta=tta, progress=lambda f, s: stages.append(s), cancel=cancel)
    assert len(passes) == 3, f"{len(passes)} passes ran; after the cancel, no pass may start"
    assert passes == [2, 2, 2]  # each pass two patches: two tiles, or two of one tile's mirrored copies
    tiles = [s for s in stages if s.startswith("tile")]
    assert len(tiles) == (1 if tta else 5), stages  # within tile 1 with TTA; else in the pass of tiles 5 and 6
    assert "exporting" not in stages


@pytest.mark.parametrize("tta", [True, False], ids=["tta", "no-tta"])
def test_a_cancel_at_tile_k_writes_nothing(models, good_image, small_batches, tmp_path, tta):
    """Through the worker's segmentFiles path (the batch, which writes the file): a cancel set when tile 2 is
    reported runs no pass after it, and the output folder stays empty."""
    model = load_model(models["one"])
    cancel = threading.Event()
    passes = _count_passes(model, cancel)
    passes_at_cancel = []

    def progress(fraction, stage):
        if "tile 2 of" in stage and not cancel.is_set():
            passes_at_cancel.append(len(passes))
            cancel.set()
    with pytest.raises(Cancelled):
        segment_files(model, None, [good_image], tmp_path / "out", tta=tta, progress=progress, cancel=cancel)
    assert passes_at_cancel == [4 if tta else 1], "the cancel came at another moment than planned"
    assert len(passes) == passes_at_cancel[0], "a network pass ran after the cancel"
    assert list((tmp_path / "out").iterdir()) == []


def test_a_cancel_in_the_export_stops_before_the_next_class(models, good_image, monkeypatch):
    """The export resamples one class at a time (seconds each on a big CT); a cancel stops before the next."""
    model = load_model(models["one"])
    cancel = threading.Event()
    resampled = []
    one_class = export_module._resampled

    def resample_then_cancel(*args):
        resampled.append(args[1])
        cancel.set()  # as if the user cancelled while this class was being resampled
        return one_class(*args)
    monkeypatch.setattr(export_module, "_resampled", resample_then_cancel)
    with pytest.raises(Cancelled):
        model.predict([read_volume(good_image)], tta=False, cancel=cancel)
    assert model.labels.num_heads == 3 and resampled == [0], "the export went on after the cancel"
