"""Choosing where the network runs, and the plans to fall back on when the GPU runs out of memory."""
import contextlib
import gc
from dataclasses import dataclass

import torch

from ..errors import InputError


def choose_device(requested: str = "auto") -> torch.device:
    """`auto` takes CUDA, then Apple MPS, then the CPU; an explicit device must exist."""
    requested = (requested or "auto").lower()
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise InputError(f"Unknown device '{requested}': use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"CUDA was requested but this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("Apple MPS was requested but is not available on this machine.")
    return device


@dataclass(frozen=True)
class DevicePlan:
    """Where the network runs and where the (large) summed logits live."""
    network: torch.device
    results: torch.device
    message: str = ""

    @property
    def mixed_precision(self) -> bool:
        return self.network.type == "cuda"

    def autocast(self):
        if self.mixed_precision:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()


RESULTS_ON_CPU = "GPU memory ran out; retrying with the results kept on the CPU."
ALL_ON_CPU = "GPU memory ran out again; retrying entirely on the CPU (slower)."
FALLBACK_MESSAGES = (RESULTS_ON_CPU, ALL_ON_CPU)  # reported as they happen (the Slicer worker relays them)


def device_plans(device: torch.device):
    """The plans to try in order: all on the GPU; logits summed on the CPU; everything on the CPU."""
    if device.type != "cuda":
        return [DevicePlan(device, torch.device("cpu"))]
    cpu = torch.device("cpu")
    return [DevicePlan(device, device), DevicePlan(device, cpu, RESULTS_ON_CPU), DevicePlan(cpu, cpu, ALL_ON_CPU)]


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)) or "out of memory" in str(error).lower()


def release_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()
