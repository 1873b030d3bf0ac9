"""What makes the CPU path fast, checked for what it must not change:
- channels-last inference (inference/channels_last.py): as exact as torch's NCDHW path for every network family,
  nearly constant tiles included; the network given back as it was; the engine uses it on the CPU;
- the heap kept between tiles (inference/heap.py): freed memory reused without page faults, given back after,
  and the rest of the process no worse off than with glibc's own thresholds.
"""
from __future__ import annotations

import copy
import json
from contextlib import nullcontext
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import model_factory
from SegmentMBTFELib import load_model
from SegmentMBTFELib.inference import model as model_module
from SegmentMBTFELib.inference import heap
from SegmentMBTFELib.inference.channels_last import channels_last
from SegmentMBTFELib.networks import build_network
from SegmentMBTFELib.networks.families import family_architecture
from SegmentMBTFELib.networks.mbtfe import mbtfe_architecture
from SegmentMBTFELib.volume import Volume

CPU = torch.device("cpu")
PATCH = {3: (16, 24, 16), 2: (48, 32)}


def architecture(name: str) -> dict:
    dim = 2 if name.endswith("2d") else 3
    plain = model_factory.architecture(dim, features=(8, 16, 32))
    if name.startswith("mbtfe"):
        return mbtfe_architecture(plain)
    if name in ("UNetPlusPlus", "SegResNetVAE", "UNet3D"):
        return family_architecture(plain, name, patch_size=PATCH[dim], **({"vae": False} if name == "SegResNetVAE"
                                                                          else {}))
    return plain


def network(name: str) -> nn.Module:
    torch.manual_seed(0)
    net = build_network(architecture(name), 1, HEADS).eval()
    for module in net.modules():  # weights and biases of the norms away from 1 and 0, as after training
        if isinstance(module, (nn.InstanceNorm3d, nn.InstanceNorm2d, nn.GroupNorm, nn.BatchNorm3d)) and \
                module.weight is not None:
            nn.init.normal_(module.weight, 1.0, 0.3)
            nn.init.normal_(module.bias, 0.0, 0.3)
    return net


def tiles(dim: int) -> torch.Tensor:
    """Two tiles: an ordinary one, and a nearly constant one (air around a body: a tiny spread on a big value)."""
    generator = torch.Generator().manual_seed(1)
    batch = torch.randn(2, 1, *PATCH[dim], generator=generator)
    batch[1] = 5 + 1e-3 * batch[1]
    return batch


HEADS = 4  # logits per voxel of the test networks
NAMES = ["plain3d", "mbtfe3d", "UNetPlusPlus", "SegResNetVAE", "UNet3D", "plain2d", "mbtfe2d"]


def layouts_seen(net: nn.Module) -> list:
    """Records, for every norm and output layer the network runs, whether its input was channels-last."""
    seen = []
    for module in net.modules():
        if isinstance(module, (nn.InstanceNorm3d, nn.InstanceNorm2d, nn.GroupNorm, nn.BatchNorm3d, nn.BatchNorm2d)) \
                or (isinstance(module, (nn.Conv3d, nn.Conv2d)) and module.out_channels == HEADS):
            module.register_forward_pre_hook(lambda m, args: seen.append(
                args[0].is_contiguous(memory_format=torch.channels_last_3d if args[0].dim() == 5
                                      else torch.channels_last)))
    return seen


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_is_as_exact_as_torchs_own_path(name):
    net = network(name)
    batch = tiles(2 if name.endswith("2d") else 3)
    with torch.inference_mode():
        exact = copy.deepcopy(net).double()(batch.double())
        ordinary = net(batch)
        seen = layouts_seen(net)
        with channels_last(net, CPU, HEADS) as fast:
            result = fast(batch)
    assert seen and all(seen)  # the channels-last path ran, up to the output layer ...
    assert result.is_contiguous()  # ... which gives the logits in the ordinary order
    for tile in range(2):  # each tile against float64: at most a few times torch's own rounding
        ordinary_error = float((ordinary[tile].double() - exact[tile]).abs().max())
        error = float((result[tile].double() - exact[tile]).abs().max())
        assert error <= 4 * ordinary_error + 1e-6, (tile, error, ordinary_error)


@pytest.mark.parametrize("norm", [nn.InstanceNorm3d(16, affine=True), nn.GroupNorm(8, 16)])
def test_the_norms_statistics_are_exact_on_a_big_nearly_constant_tile(norm):
    """64^3 voxels of a tiny spread on a big value: torch's own channels-last batch norm is off by 1e-3 of a
    standard deviation there; ours must stay as close to float64 as torch's NCDHW path."""
    from SegmentMBTFELib.inference.channels_last import _REPLACEMENTS
    generator = torch.Generator().manual_seed(2)
    x = 300 + torch.randn(2, 16, 64, 64, 64, generator=generator)
    nn.init.normal_(norm.weight, 1.0, 0.3)
    nn.init.normal_(norm.bias, 0.0, 0.3)
    with torch.inference_mode():
        exact = copy.deepcopy(norm).double()(x.double())
        ordinary_error = float((norm(x).double() - exact).abs().max())
        fast = copy.deepcopy(norm)
        fast.__class__ = _REPLACEMENTS[type(norm)]
        result = fast(x.contiguous(memory_format=torch.channels_last_3d))
    assert result.is_contiguous(memory_format=torch.channels_last_3d)
    assert float((result.double() - exact).abs().max()) <= 4 * ordinary_error + 1e-6


def test_the_network_is_given_back_as_it_was_even_after_an_error():
    net = network("plain3d")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    classes = [type(m) for m in net.modules()]
    with pytest.raises(KeyboardInterrupt), torch.inference_mode(), channels_last(net, CPU, HEADS) as fast:
        assert type(fast.encoder.stages[0][0].convs[0].norm).__name__ == "ChannelsLastInstanceNorm3d"
        assert fast.encoder.stages[0][0].convs[0].conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
        raise KeyboardInterrupt  # a cancel or an out-of-memory error in the middle of the sliding window
    assert [type(m) for m in net.modules()] == classes
    assert all(p.is_contiguous() for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # training (a fine-tune of this model) sees the ordinary network, gradients included
    untouched, batch = network("plain3d"), torch.randn(2, 1, *PATCH[3])
    for each in (net, untouched):
        each.train()
        each(batch).square().mean().backward()
    gradients = {name: p.grad for name, p in untouched.named_parameters() if p.grad is not None}
    assert gradients and {name: p.grad for name, p in net.named_parameters() if p.grad is not None}.keys() == \
        gradients.keys()
    assert all(torch.allclose(p.grad, gradients[name]) for name, p in net.named_parameters() if name in gradients)


def test_other_devices_and_converted_networks_are_left_alone():
    net = network("plain3d")
    classes = [type(m) for m in net.modules()]
    with channels_last(net, torch.device("cuda"), HEADS) as same:  # the GPU path is not changed (no GPU needed here)
        assert same is net and [type(m) for m in net.modules()] == classes
    converted = object()  # OpenVINO's network (backends.py): not a torch module
    with channels_last(converted, CPU, HEADS) as same:
        assert same is converted


def test_the_engine_segments_channels_last_on_the_cpu_with_the_same_labels(tmp_path, monkeypatch):
    model = load_model(model_factory.make_model_folder(tmp_path, patch_size=[16, 24, 16]))
    image = np.random.default_rng(0).normal(size=(20, 30, 26)).astype(np.float32)
    image[:, :, :8] = 100.0  # a constant region, like air
    volume = Volume(image, spacing=(1.0, 1.0, 1.0))
    norm = next(m for m in model.network.modules() if isinstance(m, nn.InstanceNorm3d))
    seen = []
    norm.register_forward_pre_hook(lambda module, args: seen.append(
        (type(module).__name__, args[0].is_contiguous(memory_format=torch.channels_last_3d))))
    fast = model.predict([volume], device="cpu", tta=True).labels.array
    assert seen and set(seen) == {("ChannelsLastInstanceNorm3d", True)}
    assert type(norm) is nn.InstanceNorm3d  # given back

    seen.clear()
    monkeypatch.setattr(model_module, "channels_last", lambda network, device, outputs: nullcontext(network))
    ordinary = model.predict([volume], device="cpu", tta=True).labels.array
    assert set(seen) == {("InstanceNorm3d", False)}
    assert np.mean(fast == ordinary) >= 0.9999


HEAP_CHECK = """
import json, resource, torch
from SegmentMBTFELib.inference import heap

def resident_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2 ** 20

def faults_per_tile(tiles=5, megabytes=48, count=3):
    # a "tile" allocates, writes and frees `count` tensors of `megabytes`; 48 MB: as a network's output layer
    # does, bigger than glibc's own adaptive threshold ever keeps (32 MB a block)
    def tile():
        blocks = [torch.empty(megabytes << 18) for _ in range(count)]
        for block in blocks:
            block.fill_(1.0)
    for _ in range(tiles):  # the first ones settle the heap's layout
        tile()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(tiles):
        tile()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / tiles

result = {"default": faults_per_tile(), "default_small": faults_per_tile(megabytes=4, count=8)}
with heap.reusing_memory():
    result["reusing"] = faults_per_tile()
    result["resident_within"] = resident_mb()
result["resident_after"] = resident_mb()
result["after_small"] = faults_per_tile(megabytes=4, count=8)
print(json.dumps(result))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or heap._LIBC is None, reason="glibc's malloc only")
def test_the_heap_reuses_tile_sized_memory_within_the_block_and_gives_it_back_after():
    """In a fresh process (the heap's history decides what glibc keeps): a tile's memory faults in again every
    time with glibc's defaults, is reused within the block, and is given back to the system after it."""
    done = subprocess.run([sys.executable, "-c", HEAP_CHECK], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(done.stdout.splitlines()[-1])
    pages = (3 * 48 << 20) // resource.getpagesize()
    assert result["default"] > pages / 4
    assert result["reusing"] < pages / 20
    assert result["resident_after"] < result["resident_within"] - 100  # the tile's 144 MB given back at the end
    # and after the block the rest of the process (a fine-tune after a prediction) is no worse off than with
    # glibc's own adaptive thresholds: smaller blocks (4 MB) are not faulted in again and again
    assert result["after_small"] <= 2 * result["default_small"] + 64, result
