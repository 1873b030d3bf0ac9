"""How close the network runs to this CPU's peak: FLOPs per tile, measured speed, and the machine's peak.

    .venv/bin/python benchmarks/flops.py [--backend openvino] MODEL_FOLDER [MODEL_FOLDER ...]

For each model: the network's multiply-adds per tile (every convolution and transposed convolution, counted
from the shapes a real forward pass produces: 2 FLOPs per multiply-add; normalisation and activations left
out, so the figure is a lower bound), the time per tile when tiles go through in pairs as the engine sends
them on the CPU, and the achieved GFLOP/s against this machine's peak, measured as the speed of a large
float32 matrix product with the same threads (the better of MKL's and oneDNN's: see peak_gflops).
bench_predict.py prints the same for its cases. The torch network runs as the engine runs it on the CPU:
channels-last, with the heap kept between tiles (inference/channels_last.py, inference/heap.py).
"""
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SegmentMBTFE"))


def peak_gflops(size: int = 3072, seconds: float = 3.0) -> float:
    """GFLOP/s of a large float32 matrix product (2 n^3 FLOPs), the best of repeated runs, computed both ways
    torch can: MKL's sgemm (torch.mm) and oneDNN's (a 1x1x1 convolution is a matrix product; it is what runs
    the networks). The faster counts: on AMD CPUs MKL takes a slower code path (here 220 against 445 GFLOP/s)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    channels, side = 2048, 16  # (16^3 voxels x 2048) @ (2048 x 2048)
    conv = torch.nn.Conv3d(channels, channels, 1, bias=False).eval().to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, channels, side, side, side).contiguous(memory_format=torch.channels_last_3d)
    products = [(lambda: torch.mm(a, b), 2 * size ** 3), (lambda: conv(x), 2 * side ** 3 * channels ** 2)]
    best = 0.0
    with torch.inference_mode():
        for product, flops in products:
            product()
            end = time.perf_counter() + seconds / 2
            while time.perf_counter() < end:
                started = time.perf_counter()
                product()
                best = max(best, flops / (time.perf_counter() - started) / 1e9)
    return best


def flops_per_tile(network, patch, channels: int) -> float:
    """FLOPs of one forward pass of one tile, from the convolutions' real input and output shapes."""
    total = [0.0]

    def count(module, inputs, output):
        kernel = module.weight.shape[2:].numel()
        if isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
            macs = inputs[0].numel() * module.out_channels // module.groups * kernel
        else:
            macs = output.numel() * module.in_channels // module.groups * kernel
        total[0] += 2.0 * macs
    hooks = [m.register_forward_hook(count) for m in network.modules()
             if isinstance(m, (torch.nn.modules.conv._ConvNd,))]
    try:
        with torch.inference_mode():
            network(torch.zeros(1, channels, *patch))
    finally:
        for hook in hooks:
            hook.remove()
    return total[0]


def seconds_per_tile(network, patch, channels: int, seconds: float = 4.0) -> float:
    """Time per tile with tiles in pairs (the engine's CPU batch), median-free: total time / tiles."""
    batch = torch.randn(2, channels, *patch)
    with torch.inference_mode():
        network(batch)
        started, tiles = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            network(batch)
            tiles += 2
    return (time.perf_counter() - started) / tiles


def report(model_folder, peak: float, backend: str = "torch") -> dict:
    """backend "openvino": the same network converted as the engine converts it (backends.py), timed alike."""
    from SegmentMBTFELib import load_model
    from SegmentMBTFELib.inference.backends import cpu_network
    from SegmentMBTFELib.inference.channels_last import channels_last
    from SegmentMBTFELib.inference.heap import reusing_memory
    model = load_model(model_folder)
    network, patch = model.network.eval(), [int(p) for p in model.configuration.patch_size]
    channels = len(model.channel_names) + (len(model.labels.foreground_labels)
                                          if model.configuration.previous_stage else 0)
    flops = flops_per_tile(network, patch, channels)
    if backend != "torch":
        model.backend = backend
        network = cpu_network(model, 0, torch.device("cpu"), []) or network
        backend = "openvino" if network is not model.network else "torch"
    # as the engine runs it (model.py): torch's network channels-last, the heap kept between tiles
    with reusing_memory(), channels_last(network, torch.device("cpu"), model.labels.num_heads) as network:
        per_tile = seconds_per_tile(network, patch, channels)
    achieved = flops / per_tile / 1e9
    return {"model": model.name, "patch": patch, "gflops_per_tile": flops / 1e9, "s_per_tile": per_tile,
            "achieved_gflops": achieved, "peak_gflops": peak, "fraction": achieved / peak, "backend": backend}


def line(row: dict) -> str:
    return (f"{row['model']:<40} {row.get('backend', 'torch'):<9} patch {'x'.join(map(str, row['patch'])):<10} {row['gflops_per_tile']:7.2f} GFLOP/tile "
            f"{row['s_per_tile']:7.4f} s/tile  {row['achieved_gflops']:6.1f} GFLOP/s = {100 * row['fraction']:4.1f}% "
            f"of peak {row['peak_gflops']:.0f}")


if __name__ == "__main__":
    peak = peak_gflops()
    print(f"{torch.get_num_threads()} threads; peak (float32 matrix product): {peak:.1f} GFLOP/s")
    backend = "torch"
    if sys.argv[1:2] == ["--backend"]:
        backend, sys.argv[1:3] = sys.argv[2], []
    for folder in sys.argv[1:]:
        print(line(report(folder, peak, backend)), flush=True)
