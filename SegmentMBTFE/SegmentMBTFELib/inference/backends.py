"""Which engine runs the network on the CPU: torch, or OpenVINO (optional, `pip install SegmentMBTFE[openvino]`).

Why a second engine: OpenVINO's CPU plugin runs these 3D U-Nets faster than torch's oneDNN path at the same
float32 precision (1.3-2x per tile here; README, *The OpenVINO backend*), TTA flips and tile batches included.
Why it is not the default: its results are less exact where a tile is nearly constant (air around a body):
instance normalisation divides the tiny spread of such a tile by itself, and OpenVINO's float32 convolutions
and normalisation, exact enough elsewhere (labels equal to torch's and nnU-Net's on real hippocampus cases),
then differ from float64 by up to 0.17 in the logits where torch stays within 3e-5. On the 512 x 512 x 300 CT
through the nearly untrained 25-label benchmark model that changed 1% of the labels.

The network is the one torch built and loaded: `openvino.convert_model` traces it with an example batch of
tiles, once per fold's weights. The converted network is kept with the loaded model (loading.ModelCache keeps
models, so the Slicer worker converts once) and saved under the versions home's cache/openvino/, so a fresh
command reads it in a fraction of a second instead of converting again. The GPU always runs torch.

Precision is float32, asked for explicitly: on CPUs with AVX512_BF16 or AMX OpenVINO picks bfloat16 by
itself, which changed 0.03% of the argmax of the shipped model's logits here, above the 0.01% parity floor.
Threads: as many as torch uses (torch.get_num_threads(), the engine's choice), so both engines share a CPU
the same way. Importing this module imports neither torch nor openvino (the command line's options use it).
"""
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

from ..errors import InputError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openvino")
NOT_INSTALLED = ("The OpenVINO backend needs the openvino package, which is not installed: "
                 "pip install 'SegmentMBTFE[openvino]' (or openvino), or use --backend torch.")
KEEP_ON_DISK = 8  # converted networks kept in the cache folder, the most recently used


def check_backend(name: Optional[str]) -> str:
    """The backend asked for, checked: one of BACKENDS, and openvino only when it is installed."""
    name = (name or "torch").lower()
    if name not in BACKENDS:
        raise InputError(f"Unknown backend '{name}': use {', '.join(BACKENDS)}.")
    if name == "openvino" and not openvino_installed():
        raise InputError(NOT_INSTALLED)
    return name


def use_backend(model, name: Optional[str]) -> None:
    """Let `model` run its network on the CPU with the backend asked for (checked: see check_backend)."""
    model.backend = check_backend(name)


def openvino_installed() -> bool:
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        return False


class OpenVINONetwork:
    """A converted network called like the torch one: a batch of tiles (n, C, *patch) in, logits out."""

    def __init__(self, compiled):
        self.request = compiled.create_infer_request()

    def __call__(self, batch):
        from ..tensors import to_numpy, to_tensor
        # infer copies its outputs (share_outputs=False), so the next call cannot overwrite this one's
        outputs = self.request.infer([to_numpy(batch.contiguous())])
        return to_tensor(outputs[0])


def cpu_network(model, fold: int, device, messages: list) -> Optional[OpenVINONetwork]:
    """The OpenVINO network for `model`'s fold `fold` (its weights loaded into model.network) when
    model.backend asks for one and the network runs on the CPU; None for torch. A network that does not
    convert falls back to torch, with a message when OpenVINO was asked for by name."""
    backend = getattr(model, "backend", "torch")
    if device.type != "cpu" or backend == "torch" or (backend == "auto" and not _worth_it(model)):
        return None
    weights = model.weights[fold]
    converted = model.__dict__.setdefault("_openvino_networks", {})
    if id(weights) not in converted:  # by the weights' identity: a fine-tuned copy (with_weights) converts its own
        converted[id(weights)] = (weights, *_convert_or_why(model, fold))
        while len(converted) > max(len(model.weights), 1) + 2:
            converted.pop(next(iter(converted)))
    _, network, why = converted[id(weights)]
    if why:
        message = f"OpenVINO could not run {model.name}'s network ({why}); it ran with torch."
        log.warning(message)
        if backend == "openvino" and message not in messages:
            messages.append(message)
    return network


def _worth_it(model) -> bool:
    """auto's choice: OpenVINO when installed, except for weights not saved in a file (a fine-tune's result,
    whose Dice is measured once or twice): their conversion could not be kept for later runs."""
    return openvino_installed() and model.checksum() != "unsaved"


def _convert_or_why(model, fold: int):
    try:
        return _compiled(model, fold), ""
    except Exception as error:  # any failure of the optional engine leaves torch to do the work
        return None, (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _compiled(model, fold: int) -> OpenVINONetwork:
    ov = _import_openvino()
    import torch
    core = ov.Core()
    channels = _input_channels(model)
    patch = [int(p) for p in model.configuration.patch_size]
    cached = _cache_file(model, fold, channels, ov.__version__)
    if cached is not None and cached.is_file():
        network = core.read_model(str(cached))
        _touch(cached.parent)
    else:
        network = _converted(ov, model.network, channels, patch)
        if cached is not None:
            _save(ov, network, cached)
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    return OpenVINONetwork(core.compile_model(network, "CPU", config))


def _converted(ov, network, channels: int, patch):
    """The torch network traced with an example batch of two tiles; any batch size is accepted after."""
    import torch
    network = network.to("cpu").eval()
    # predictions run under inference mode, which tracing cannot; the tracer's warnings are not the user's
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        example = torch.zeros(2, channels, *patch)
        # traced here without torch's check (two more forward passes, most of convert_model's time)
        converted = ov.convert_model(torch.jit.trace(network, example, check_trace=False), example_input=example)
    converted.reshape([-1, channels, *patch])
    return converted


def _import_openvino():
    """openvino, imported so that it reports nothing: importing and converting would otherwise send usage
    events to Intel (openvino_telemetry, on unless the user opted out), and a tool for medical images sends
    nothing anywhere. With openvino_telemetry unimportable while openvino loads, OpenVINO takes its own
    do-nothing stand-in (as when that package is not installed)."""
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    blocked = "openvino_telemetry" not in sys.modules
    if blocked:
        sys.modules["openvino_telemetry"] = None  # `import openvino_telemetry` raises ImportError
    try:
        import openvino
    finally:
        if blocked and sys.modules.get("openvino_telemetry", 0) is None:
            del sys.modules["openvino_telemetry"]
    return openvino


def _input_channels(model) -> int:
    """The network's input channels: the images', plus one per foreground label for a cascade's second stage."""
    extra = len(model.labels.foreground_labels) if model.configuration.previous_stage else 0
    return len(model.channel_names) + extra


def _cache_file(model, fold: int, channels: int, openvino_version: str) -> Optional[Path]:
    """Where the converted network of these exact weights, network and conversion code, torch and OpenVINO
    versions is kept; None for weights not saved in a file (a fine-tune's result)."""
    checksum = model.checksum()
    if checksum == "unsaved":
        return None
    import torch
    from .. import __version__
    from ..models.versions import versions_home
    code = [Path(__file__), *sorted((Path(__file__).parents[1] / "networks").glob("*.py"))]
    source = b"".join(p.read_bytes() for p in code)
    configuration = model.configuration
    what = repr((checksum, model.folds[fold], type(model.network).__name__, model.trainer_name, configuration.name,
                 getattr(configuration, "architecture", None), configuration.patch_size, channels,
                 model.labels.num_heads, openvino_version, __version__, torch.__version__))
    key = hashlib.sha256(what.encode() + source).hexdigest()[:24]
    return versions_home() / "cache" / "openvino" / key / "network.xml"


def _save(ov, network, path: Path) -> None:
    """Written beside its place and renamed, so a killed run leaves no half network; failures only cost speed."""
    try:
        path.parent.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".converting-", dir=path.parent.parent))
        try:
            ov.save_model(network, str(work / path.name), compress_to_fp16=False)
            os.replace(work, path.parent)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _prune(path.parent.parent, keep=KEEP_ON_DISK)
    except OSError as error:
        log.info("The converted network was not cached (%s).", error)


def _prune(folder: Path, keep: int) -> None:
    """The `keep` most recently used networks stay; so do conversions under way (an hour at most)."""
    now = time.time()
    entries = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in entries if not p.name.startswith(".")][keep:] + \
            [p for p in entries if p.name.startswith(".") and now - p.stat().st_mtime > 3600]:
        shutil.rmtree(old, ignore_errors=True)


def _touch(folder: Path) -> None:
    try:
        os.utime(folder)
    except OSError:
        pass
