"""Two of the README's 'never unpickles' promises that the safety catalogue (checkpoints, v1 pickles) does not
cover: nnU-Net's postprocessing.pkl beside its postprocessing.json is never read, and an array crossing between
the Slicer module and its worker (exchange.py) can never carry an object to unpickle.
"""
import json
import pickle

import numpy as np
import pytest

from hostile_files import copy_model
from safety_catalogue import RunsCode
from SegmentMBTFELib import cli, exchange, load_model, read_volume

RECIPE = {"postprocessing_fns": ["remove_all_but_largest_component_from_segmentation"],
          "postprocessing_kwargs": [{"labels_or_regions": [1, 2]}]}


def test_postprocessing_pkl_is_never_read(models, good_image, tmp_path):
    """Where nnU-Net's cross-validation writes both, the JSON recipe is applied and the pickle left alone."""
    model = copy_model(models["one"], tmp_path)
    marker, crossval = tmp_path / "pwned", model / "crossval_results_folds_0"
    crossval.mkdir()
    (crossval / "postprocessing.pkl").write_bytes(pickle.dumps(RunsCode(f"touch {marker}")))
    (crossval / "postprocessing.json").write_text(json.dumps(RECIPE))
    prediction = load_model(model).predict([read_volume(good_image)], tta=False)
    assert prediction.settings["postprocessing"], "the JSON recipe was not applied"
    assert cli.main(["predict", "-q", "--no-tta", "-m", str(model), "-i", str(good_image),
                     "-o", str(tmp_path / "seg.nii.gz")]) == 0
    assert not marker.exists(), "postprocessing.pkl was unpickled"


def test_an_exchanged_array_cannot_carry_a_pickle(tmp_path):
    marker = tmp_path / "pwned"
    np.save(tmp_path / "volume.npy", np.array([RunsCode(f"touch {marker}")], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        exchange.read_array(tmp_path, "volume.npy")
    assert not marker.exists()
