"""The code paths the engine takes under torch 2.2 (macOS Slicer's), checked here under the main torch as well.

test_slicer_pythons.py runs the engine under the real torch 2.2.2; these tests force the same paths in this
process, so a change that breaks them fails fast and shows where: arrays and tensors without torch's numpy
bridge (tensors.py), checkpoints through the restricted unpickler (checkpoint.py), and nothing in the engine
that converts through the bridge directly.
"""
import ast
import gc
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

import model_factory
from hostile_files import copy_model, edit_checkpoint
from safety_catalogue import RunsCode
from SegmentMBTFELib import tensors
from SegmentMBTFELib.errors import ModelError
from SegmentMBTFELib.models import checkpoint

ENGINE = Path(tensors.__file__).parent
DTYPES = (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.bool_)


@pytest.mark.parametrize("dtype", DTYPES, ids=[np.dtype(d).name for d in DTYPES])
def test_arrays_and_tensors_share_memory_without_the_bridge(dtype):
    array = (np.arange(24).reshape(2, 3, 4) % 5).astype(dtype)
    tensor = tensors.to_tensor(array, use_bridge=False)
    assert tensor.dtype == torch.from_numpy(array).dtype and tuple(tensor.shape) == array.shape
    assert np.array_equal(tensors.to_numpy(tensor, use_bridge=False), array)
    tensor[0, 0, 0] = 1  # the same memory, as with from_numpy
    assert array[0, 0, 0] == 1
    back = tensors.to_numpy(tensor, use_bridge=False)
    back[1, 2, 3] = 0
    assert tensor[1, 2, 3] == 0


def test_views_strides_and_empty_tensors_without_the_bridge():
    tensor = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    for view in (tensor[:, 1], tensor.permute(2, 0, 1), tensor[1:, ::2, 1:]):
        assert np.array_equal(tensors.to_numpy(view, use_bridge=False), view.numpy())
    array = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    for view in (array[:, 1], array.transpose(2, 0, 1), array[::-1]):
        assert torch.equal(tensors.to_tensor(view, use_bridge=False), torch.from_numpy(view.copy()))
    assert tensors.to_numpy(torch.empty(0, 3), use_bridge=False).shape == (0, 3)
    assert tensors.to_tensor(np.empty((2, 0), np.float32), use_bridge=False).shape == (2, 0)
    with pytest.raises(TypeError):
        tensors.to_tensor(np.zeros(3, np.uint16), use_bridge=False)


def test_each_side_keeps_the_other_alive_without_the_bridge():
    array = tensors.to_numpy(torch.full((1000,), 7.0), use_bridge=False)
    tensor = tensors.to_tensor(np.full(1000, 3.0, np.float32), use_bridge=False)
    gc.collect()
    torch.full((1000,), -1.0), np.full(1000, -1.0, np.float32)  # reuse freed memory, if any was freed
    assert (array == 7.0).all() and bool((tensor == 3.0).all())


def test_the_engine_converts_only_through_tensors_py():
    """torch.from_numpy, Tensor.numpy() and torch.as_tensor/torch.tensor of an array fail under torch 2.2 with
    numpy 2; the engine must call tensors.to_tensor / to_numpy instead (tensors.py is the one exception)."""
    offenders = []
    for path in sorted(ENGINE.rglob("*.py")):
        if path.name == "tensors.py" or "nnunet_trainer" in path.parts:  # trainers run inside nnU-Net's torch
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = node.func.attr
                if name in ("from_numpy", "as_tensor") or (name == "numpy" and not node.args):
                    offenders.append(f"{path.relative_to(ENGINE)}:{node.lineno} .{name}()")
    assert offenders == []


def test_checkpoints_load_through_the_restricted_unpickler(tmp_path):
    """What torch < 2.4 uses: the same weights, numpy scalars and devices, as torch's weights_only gives."""
    model = model_factory.make_model_folder(tmp_path, dataset_name="Dataset998_Restricted")
    edit_checkpoint(model, lambda c: c.update(logging={"mean_fg_dice": [np.float64(0.5), np.float32(0.25)]},
                                              _best_ema=np.float64(0.5), device=torch.device("cpu")))
    path = model / "fold_0" / "checkpoint_final.pth"
    modern = checkpoint._load_data_only(path, modern=True)
    restricted = checkpoint._load_data_only(path, modern=False)
    assert restricted["logging"] == modern["logging"] and restricted["device"] == torch.device("cpu")
    assert restricted["network_weights"].keys() == modern["network_weights"].keys()
    assert all(torch.equal(restricted["network_weights"][k], v) for k, v in modern["network_weights"].items())


def test_the_restricted_unpickler_refuses_code(tmp_path, monkeypatch):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    model = copy_model(model_factory.make_model_folder(tmp_path / "a", dataset_name="Dataset997_Evil"), tmp_path)
    edit_checkpoint(model, lambda c: c.__setitem__("logging", RunsCode(f"touch {marker}")))
    # load_checkpoint as it runs under torch 2.2: without add_safe_globals
    monkeypatch.setattr(checkpoint, "_load_data_only",
                        lambda path, real=checkpoint._load_data_only: real(path, modern=False))
    with pytest.raises(ModelError, match=r"not plain data \(posix\.system\)|not plain data \(os\.system\)"):
        checkpoint.load_checkpoint(model / "fold_0" / "checkpoint_final.pth")
    assert not marker.exists() and not os.path.exists(marker)
