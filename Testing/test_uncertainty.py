"""Uncertainty (SegmentMBTFELib/inference/uncertainty.py) on real data: the entropy and disagreement maps say where the
model's passes agree and where they split, the per-segment table adds up, and asking for them changes no label.

The passes are rebuilt by hand here: the shipped plain model run without TTA on each of the 8 mirrored copies
of a real held-out case, each label map flipped back. Where all 8 agree the maps must be (near) zero; where
they split, high; the largest entropy must sit on a split voxel or next to one.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from SegmentMBTFELib import cli, load_model, read_volume
from SegmentMBTFELib.inference.sliding_window import mirror_combinations
from SegmentMBTFELib.inference.uncertainty import segment_statistics

MODEL = Path(__file__).resolve().parents[1] / "models" / "hippocampus_nnunet"


@pytest.fixture(scope="module")
def case(shared_data):
    held_out = json.loads((MODEL / "results.json").read_text())["validation_cases"][0]
    return read_volume(shared_data / "hippocampus" / "train" / "images" / f"{held_out}.nii.gz")


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def passes(model, case):
    """The label map of every mirrored pass on its own (identity first), as the TTA ensemble sees them."""
    labels = []
    for combination in [()] + mirror_combinations(model.mirror_axes):
        axes = tuple(a - 2 for a in combination)  # sliding-window axes (batch, channel first) -> array axes
        flipped = case.with_array(np.flip(case.array, axes).copy()) if axes else case
        label = model.predict([flipped], tta=False).labels.array
        labels.append(np.flip(label, axes) if axes else label)
    return np.stack(labels)


def test_the_maps_are_zero_where_the_passes_agree_and_high_where_they_split(model, case, passes):
    prediction = model.predict([case], tta=True, uncertainty=True)
    entropy, disagreement = (prediction.uncertainty[k].array for k in ("entropy", "disagreement"))
    agree = (passes == passes[0]).all(0)
    split = ~agree
    assert split.sum() > 100 and agree.sum() > 20 * split.sum()  # a few hundred voxels at the borders
    far = ~ndimage.binary_dilation(split | (prediction.labels.array > 0), iterations=3)
    assert entropy[far].max() < 0.05 and disagreement[far].max() < 0.01  # sure background: no uncertainty
    assert entropy[agree].mean() < 0.05 < 0.3 < entropy[split].mean()
    assert disagreement[agree].mean() < 0.01 and disagreement[split].mean() > 5 * max(disagreement[agree].mean(), 1e-3)
    assert ndimage.binary_dilation(split)[np.unravel_index(entropy.argmax(), entropy.shape)]
    assert entropy.min() >= 0 and entropy.max() <= 1 and entropy.shape == case.array.shape


def test_asking_for_uncertainty_changes_no_label(model, case):
    with_maps = model.predict([case], tta=True, uncertainty=True)
    np.testing.assert_array_equal(with_maps.labels.array, model.predict([case], tta=True).labels.array)
    single = model.predict([case], tta=False, uncertainty=True)  # one pass: nothing to disagree about
    assert set(single.uncertainty) == {"entropy", "confidence"}


def test_the_table_adds_up(model, case):
    stretched = case.with_array(case.array)
    stretched.spacing = (0.8, 1.1, 1.3)
    prediction = model.predict([stretched], tta=False, uncertainty=True)
    rows = segment_statistics(prediction, threshold=0.5)
    assert [r["segment"] for r in rows] == ["anterior", "posterior"]
    for row, value in zip(rows, (1, 2)):
        mask = prediction.labels.array == value
        assert row["voxels"] == mask.sum() > 0
        assert row["volume_ml"] == pytest.approx(mask.sum() * 0.8 * 1.1 * 1.3 / 1000)
        entropy = prediction.uncertainty["entropy"].array[mask]
        assert row["mean_uncertainty"] == pytest.approx(entropy.mean())
        assert row["uncertain_fraction"] == pytest.approx((entropy > 0.5).mean())
        assert 0.5 < row["mean_probability"] <= 1


def test_the_command_line_writes_the_maps_and_the_table(tmp_path, case, shared_data, capsys):
    image = tmp_path / "case.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(shared_data / "hippocampus" / "train" / "images" /
                                       f"{json.loads((MODEL / 'results.json').read_text())['validation_cases'][0]}"
                                       ".nii.gz")), str(image))
    out = tmp_path / "out"
    assert cli.main(["predict", "-q", "-m", str(MODEL), "-i", str(image), "-o", str(out / "case.seg.nrrd"),
                     "--uncertainty"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["case.seg.nrrd", "case_disagreement.nrrd", "case_entropy.nrrd",
                                                     "case_segments.csv"]
    entropy = read_volume(out / "case_entropy.nrrd")
    assert entropy.array.shape == case.array.shape and entropy.same_geometry(case)
    table = (out / "case_segments.csv").read_text().splitlines()
    assert table[0] == "segment,label,voxels,volume_ml,mean_probability,mean_uncertainty,uncertain_fraction"
    assert [line.split(",")[0] for line in table[1:]] == ["anterior", "posterior"]
