"""A loaded model and its prediction: the one entry point the CLI, the Slicer module and fine-tuning share.

    model = load_model("Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres", folds=None)  # loading.py
    prediction = model.predict([volume], device="auto", tta=True, progress=print_progress)
    prediction.labels  # a Volume in the input's geometry

Prediction runs per fold: preprocess once, slide the window (on the GPU when there is one, falling back
to CPU-held results and then the CPU on out-of-memory), average the folds' fp16 logits, export.
"""
import copy
import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .. import __version__
from ..errors import InputError, ModelError, OutOfMemory
from ..free_memory import refuse_unless_it_fits
from ..io.images import geometry_difference
from ..models.checkpoint import load_checkpoint, load_weights, weights_mismatch
from ..models.trained_folder import TrainedFolder
from ..networks import build_network, architecture_for_trainer, inference_weights, knows_trainer
from ..nnunet_trainers import unknown_trainer_message
from ..progress import Progress
from ..tensors import to_tensor
from ..volume import Volume
from .backends import cpu_network
from .channels_last import channels_last
from .devices import choose_device, device_plans, is_out_of_memory, release_memory
from .export import export, export_map
from .heap import reusing_memory
from .memory import network_bytes, prediction_bytes
from .postprocessing import apply_postprocessing
from .preprocessing import preprocess, resampling_kwargs
from .resampling import compute_new_shape
from .sliding_window import mirror_combinations, network_batch_size, predict_logits
from .uncertainty import OUTSIDE, maps_at_model_spacing, normalized_entropy

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    labels: Volume                                # label map in the input's geometry
    segments: List[tuple]                         # (label value, name) of each foreground label
    probabilities: Optional[np.ndarray] = None    # (classes or regions, z, y, x) float32, when asked for
    settings: Dict[str, object] = field(default_factory=dict)   # what produced it (provenance)
    messages: List[str] = field(default_factory=list)           # fallbacks taken, for the user
    uncertainty: Optional[Dict[str, Volume]] = None  # "entropy", "confidence"[, "disagreement"]: see uncertainty.py


@dataclass
class CaseInProgress:
    """One case between the stages of Model.predict: what prepare made and run_network adds."""
    volume: Volume                                # the first channel: the output's geometry
    pre: object                                   # preprocessing.Preprocessed (its data goes after the network)
    device: torch.device
    step_size: float
    tta: bool
    probabilities: bool
    postprocess: bool
    uncertainty: bool
    reporter: Progress
    messages: List[str]
    needed_bytes: float                           # memory.py's estimate for this case
    logits: Optional[torch.Tensor] = None
    expected: Optional[torch.Tensor] = None       # the passes' mean entropy, with uncertainty


class Model:
    """An nnU-Net v2 (or MBTFE-UNet) model folder with its selected folds' weights loaded."""
    # The steps nnU-Net v1 computes differently; v1_model.V1Model replaces them (and _read_checkpoint).
    _preprocess = staticmethod(preprocess)
    _sliding_window = staticmethod(predict_logits)
    _export = staticmethod(export)
    _maps_at_model_spacing = staticmethod(maps_at_model_spacing)

    def __init__(self, folder: TrainedFolder, folds: Sequence = None, checkpoint: str = "final"):
        self.folder = folder
        self.checkpoint_name = checkpoint
        available = folder.available_folds(checkpoint)
        self.folds = [str(f) for f in folds] if folds else available
        if not self.folds:
            raise ModelError(_broken_link(folder, checkpoint) or f"No fold of {folder.path} has a {checkpoint} checkpoint.")
        missing = [f for f in self.folds if f not in available]
        if missing:
            raise ModelError(f"Fold {', '.join(missing)} has no {checkpoint} checkpoint in {folder.path} "
                             f"(available: {', '.join(available) or 'none'}).")
        checkpoints = [self._read_checkpoint(folder.checkpoint_path(f, checkpoint)) for f in self.folds]
        self.weights = [c["network_weights"] for c in checkpoints]
        # everything else each checkpoint holds (trainer name, init args, mirroring axes...), without the
        # optimizer state: a fine-tuned version is written from these so it loads wherever the original does
        self.checkpoint_entries = [{k: v for k, v in c.items() if k not in ("network_weights", "optimizer_state")}
                                   for c in checkpoints]
        self.trainer_name = str(checkpoints[0].get("trainer_name") or folder.trainer_name or "nnUNetTrainer")
        self.mirror_axes = _mirror_axes(checkpoints[0].get("inference_allowed_mirroring_axes"),
                                        len(self.configuration.patch_size))
        self.network = self._build_network(checkpoints[0])
        self.backend = "torch"  # or "openvino", "auto": what runs the network on the CPU (backends.py)
        self.backend_used = "torch"
        self.postprocessing = folder.postprocessing()
        self._checksum = None
        # a fold folder without the checkpoint (training stopped early, a copy cut short) is left out: say so
        self.notes = [f"{folder.checkpoint_path(fold, checkpoint).parent.relative_to(folder.path.parent)} has no "
                      f"{folder.checkpoint_filename(checkpoint)} and was left out."
                      for fold in folder.fold_folders() if fold not in available] if not folds else []

    def _read_checkpoint(self, path) -> dict:
        return load_checkpoint(path)

    # -- what the model is -------------------------------------------------------------------------------
    @property
    def labels(self):
        return self.folder.labels

    @property
    def configuration(self):
        return self.folder.configuration

    @property
    def channel_names(self) -> List[str]:
        return self.folder.channel_names

    @property
    def name(self) -> str:
        return self.folder.name

    def checksum(self) -> str:
        """Short SHA-256 of the selected checkpoints' bytes: identifies the exact weights in provenance.
        Computed once per loaded model: every prediction records it, and checkpoints can be large."""
        if self._checksum is None:
            self._checksum = self._hash_checkpoints()
        return self._checksum

    def _hash_checkpoints(self) -> str:
        digest = hashlib.sha256()
        for fold in self.folds:
            with open(self.folder.checkpoint_path(fold, self.checkpoint_name), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()[:16]

    def _build_network(self, checkpoint: dict) -> torch.nn.Module:
        n_in = len(self.channel_names)
        if self.configuration.previous_stage:
            n_in += len(self.labels.foreground_labels)
        # the checkpoint can name its own network options (MBTFE-UNet's norm, gate, EAB on/off)
        architecture = architecture_for_trainer(self.trainer_name, self.configuration.architecture, checkpoint,
                                                self.configuration.patch_size)
        source = self.folder.checkpoint_path(self.folds[0], self.checkpoint_name)
        self._check_outputs(source)
        refuse_unless_it_fits(network_bytes(architecture, n_in, self.labels.num_heads),
                              f"The network described in {self.folder.path.name}/plans.json",
                              "the plans are probably damaged")
        network = build_network(architecture, n_in, self.labels.num_heads)
        # weights only training uses (SegResNetVAE's VAE branch) are left out: a folder segments with or without them;
        # fine-tuning carries them unchanged into the version, so it loads wherever the original does
        full, self.weights = self.weights, [inference_weights(network, w) for w in self.weights]
        self.training_only_weights = [{k: v for k, v in f.items() if k not in w} for f, w in zip(full, self.weights)]
        self._refuse_unknown_network(network)
        try:
            load_weights(network, self.weights[0], source)
        except ModelError as error:
            raise ModelError(f"{str(error).rstrip('.')} (trainer {self.trainer_name}).") from None
        for fold, weights in zip(self.folds[1:], self.weights[1:]):
            load_weights(network, weights, self.folder.checkpoint_path(fold, self.checkpoint_name))
        return network.eval()

    def _refuse_unknown_network(self, network: torch.nn.Module) -> None:
        """A trainer the engine does not know, whose weights do not fit the plans' network, built a network of its
        own: say so by its name before loading anything (a known trainer's misfit is a damaged or wrong file)."""
        if knows_trainer(self.trainer_name):
            return  # load_weights compares the weights with the network itself
        problem = weights_mismatch(network, self.weights[0])
        if problem:
            raise ModelError(unknown_trainer_message(self.trainer_name, self.folder.path.name, problem))

    def _check_outputs(self, source):
        """The weights' output layer must have one channel per label (or region) dataset.json lists: a
        dataset.json copied from another model would otherwise name the segments wrongly."""
        heads = [k for k in self.weights[0] if ".seg_layers." in k and k.endswith(".weight")]
        primus = [k for k in self.weights[0] if k.startswith("up_projection.decode.") and k.endswith(".weight")
                  and self.weights[0][k].dim() == 5]  # Primus: its last transposed convolution (in, out, ...)
        if not heads and not primus:
            return
        last = max(heads or primus, key=lambda k: [int(p) if p.isdigit() else -1 for p in k.split(".")])
        outputs = int(self.weights[0][last].shape[0 if heads else 1])
        if outputs != self.labels.num_heads:
            what = "regions" if self.labels.has_regions else "labels (background included)"
            raise ModelError(f"dataset.json lists {self.labels.num_heads} {what}, but the weights in {source} "
                             f"predict {outputs}: the dataset.json does not belong to these weights.")

    def with_weights(self, weights: Sequence[dict]) -> "Model":
        """The same model holding other weights for its folds (a fine-tune's result before it is saved);
        this model and its files are untouched."""
        other = copy.copy(self)
        other.weights = [inference_weights(self.network, w) for w in weights]
        other.network = copy.deepcopy(self.network)
        other.network.load_state_dict(other.weights[0])
        other._checksum = "unsaved"
        return other

    # -- prediction --------------------------------------------------------------------------------------
    def predict(self, volumes: Sequence[Volume], device="auto", step_size=0.5, tta=True, probabilities=False,
                postprocess=True, previous_stage: Optional[Volume] = None, progress=None, cancel=None,
                uncertainty=False) -> Prediction:
        """Segment one case given as one Volume per model channel. Raises SegmentError subclasses only
        for user-facing problems (InputError, OutOfMemory, Cancelled). uncertainty: also the maps of
        uncertainty.py (entropy; disagreement when TTA or several folds give several passes).

        The three stages (prepare, run_network, finish) are also callable one by one, so a batch can
        preprocess the next case and export the last one while the network works on this one."""
        case = self.prepare(volumes, device, step_size, tta, probabilities, postprocess, previous_stage,
                            Progress(progress, cancel), uncertainty)
        self.run_network(case)
        return self.finish(case)

    def prepare(self, volumes: Sequence[Volume], device="auto", step_size=0.5, tta=True, probabilities=False,
                postprocess=True, previous_stage: Optional[Volume] = None, reporter: Progress = None,
                uncertainty=False) -> "CaseInProgress":
        """The inputs checked and preprocessed (progress 0 to 0.05 of `reporter`)."""
        reporter = reporter or Progress()
        volumes = self._check_inputs(volumes)
        if not 0 < step_size <= 1:
            raise InputError(f"The tile step must be in (0, 1]; got {step_size}.")
        if self.configuration.previous_stage and previous_stage is None:
            raise InputError(f"The {self.configuration.name} configuration refines the "
                             f"{self.configuration.previous_stage} prediction: give that prediction as previous stage.")
        if previous_stage is not None and not previous_stage.same_geometry(volumes[0]):
            raise InputError(f"The previous stage's prediction is not on the image's voxel grid "
                             f"({geometry_difference(volumes[0], previous_stage)}); give the "
                             f"{self.configuration.previous_stage} prediction made for this image.")
        device = choose_device(device) if not isinstance(device, torch.device) else device
        needed = self._refuse_unless_it_fits(volumes[0], probabilities)
        reporter.report(0.0, "preprocessing")
        pre = self._preprocess([_as_3d(v.array) for v in volumes], _spacing_zyx(volumes[0]), self.configuration,
                               self.folder.transpose_forward, self.folder.intensity_properties,
                               previous_stage.array if previous_stage is not None else None,
                               self.labels.foreground_labels)
        messages: List[str] = [v.metadata[k] for v in volumes for k in ("warning", "note") if v.metadata.get(k)]
        messages += self.notes
        return CaseInProgress(volumes[0], pre, device, step_size, tta, probabilities, postprocess, uncertainty,
                              reporter, messages, needed)

    def run_network(self, case: "CaseInProgress") -> None:
        """The sliding window over the prepared case, every fold (progress 0.05 to 0.95)."""
        passes = len(self.weights) * (1 + len(mirror_combinations(self.mirror_axes if case.tta else None)))
        pass_entropy = _pass_entropy(self.labels.has_regions) if case.uncertainty and passes > 1 else None
        try:
            case.logits, case.expected = self._ensemble_logits(
                to_tensor(case.pre.data), case.device, case.step_size, case.tta,
                case.reporter.span(0.05, 0.95), case.messages, pass_entropy)
        finally:  # give the GPU memory back: Slicer and other programs share it
            self.network.to("cpu")
            release_memory(case.device)
        case.pre.data = None  # the network's input is not needed any more: its memory goes before the export's

    def finish(self, case: "CaseInProgress") -> Prediction:
        """The logits exported to the input's grid, postprocessed (progress 0.95 to 1)."""
        pre, reporter, volume = case.pre, case.reporter, case.volume
        maps = self._maps_at_model_spacing(case.logits, case.expected, self.labels.has_regions) \
            if case.uncertainty else {}
        reporter.report(0.95, "exporting")
        labelmap, probs = self._export(case.logits, pre, self.labels, self.folder.transpose_backward,
                                       resampling_kwargs(self.configuration, "probabilities"), case.probabilities,
                                       check_cancel=reporter.check_cancel)
        case.logits = case.expected = None
        recipe = self.postprocessing if case.postprocess else None
        if recipe:
            labelmap = apply_postprocessing(labelmap, recipe)
        resampling = resampling_kwargs(self.configuration, "probabilities")
        maps = {name: export_map(values, pre, self.folder.transpose_backward, resampling, OUTSIDE[name])
                for name, values in maps.items()}
        if volume.array.ndim == 2:  # a plain 2D array in, a 2D label map out
            labelmap = labelmap[0]
            probs = probs[:, 0] if probs is not None else None
            maps = {name: values[0] for name, values in maps.items()}
        reporter.report(1.0, "done")
        return Prediction(volume.with_array(labelmap, name="segmentation"), self.labels.output_segments(), probs,
                          self._settings(case.device, case.step_size, case.tta, bool(recipe)), case.messages,
                          {name: volume.with_array(values, name=name) for name, values in maps.items()} or None)

    @torch.inference_mode()
    def _ensemble_logits(self, data, device, step_size, tta, reporter, messages, pass_entropy=None):
        """Average of the folds' logits (fp16 sum, as nnU-Net), each fold with the out-of-memory fallbacks;
        with `pass_entropy`, also the average of every pass's entropy (else None): (logits, expected)."""
        total = expected = None
        for i, weights in enumerate(self.weights):
            fold_reporter = reporter.span(i / len(self.weights), (i + 1) / len(self.weights))
            self.network.load_state_dict(weights)
            converted = cpu_network(self, i, device, messages)  # OpenVINO's, or None for torch (backends.py)
            self.backend_used = "openvino" if converted is not None else "torch"
            prefix = f"fold {self.folds[i]} ({i + 1}/{len(self.weights)}): " if len(self.weights) > 1 else ""
            logits = self._logits_with_fallback(data, device, step_size, tta, fold_reporter, prefix, messages,
                                                pass_entropy, converted)
            if pass_entropy:
                logits, entropy = logits
                expected = entropy if expected is None else expected.add_(entropy)
            total = logits if total is None else total.add_(logits)
        if len(self.weights) > 1:
            total /= len(self.weights)
            if expected is not None:
                expected /= len(self.weights)
        return total, expected

    def _logits_with_fallback(self, data, device, step_size, tta, reporter, prefix, messages, pass_entropy=None,
                              converted=None):
        plans = device_plans(device)
        for attempt, plan in enumerate(plans):
            if plan.message:
                messages.append(plan.message)
                log.warning(plan.message)
                reporter.report(0.0, plan.message)
            try:
                on_cpu = converted is not None and plan.network.type == "cpu"
                network = converted if on_cpu else self.network.to(plan.network)
                features = self.configuration.architecture["arch_kwargs"].get("features_per_stage", [32])
                batch = network_batch_size(self.configuration.patch_size, _first(features), plan.network)
                heads = self.labels.num_heads
                with plan.autocast(), reusing_memory(), channels_last(network, plan.network, heads) as network:
                    result = self._sliding_window(
                        network, data, self.configuration.patch_size, heads, step_size=step_size,
                        mirror_axes=self.mirror_axes if tta else None, device=plan.network,
                        results_device=plan.results, batch_size=batch, progress=_Prefixed(reporter, prefix),
                        pass_entropy=pass_entropy)
                    return tuple(t.cpu() for t in result) if pass_entropy else result.cpu()
            except (RuntimeError, MemoryError) as error:
                if not is_out_of_memory(error):
                    raise
                if attempt == len(plans) - 1:
                    raise OutOfMemory("Out of memory even on the CPU: use fewer folds, turn TTA off, "
                                      "or crop the image.") from None
            finally:
                release_memory(plan.network)
        raise AssertionError("unreachable")

    def _refuse_unless_it_fits(self, volume: Volume, probabilities: bool) -> float:
        """Refuse a case whose arrays would not fit in memory, before allocating them (see memory.py);
        else the estimate, in bytes."""
        array_shape = _as_3d(volume.array).shape
        shape = [array_shape[t] for t in self.folder.transpose_forward]
        spacing = [_spacing_zyx(volume)[t] for t in self.folder.transpose_forward]
        target = self.configuration.spacing
        target = [spacing[0]] + target if len(target) < 3 else target
        features = self.configuration.architecture["arch_kwargs"].get("features_per_stage", [32])
        needed = prediction_bytes(volume.array.shape, compute_new_shape(shape, spacing, target),
                                  len(self.channel_names), self.labels.num_heads, self.configuration.patch_size,
                                  _first(features), 8, probabilities)
        refuse_unless_it_fits(needed, f"Segmenting {volume.name or 'this image'} with {self.name} (patch "
                              f"{' x '.join(str(p) for p in self.configuration.patch_size)})",
                              "use a smaller image or check the model's plans.json")
        return needed

    def _check_inputs(self, volumes: Sequence[Volume]) -> List[Volume]:
        if isinstance(volumes, Volume):
            volumes = [volumes]
        names = self.channel_names
        if len(volumes) != len(names):
            raise InputError(f"This model needs {len(names)} input image(s) ({', '.join(names)}); "
                             f"got {len(volumes)}.")
        for v in volumes:
            _check_content(v, self.configuration.is_2d)
        for v in volumes[1:]:
            if v.array.shape != volumes[0].array.shape:
                raise InputError(f"The input channels differ in size: {volumes[0].array.shape} and {v.array.shape}.")
        return list(volumes)

    def _settings(self, device, step_size, tta, postprocessed) -> dict:
        return {"model": self.name, "model_path": str(self.folder.path), "configuration": self.configuration.name,
                "trainer": self.trainer_name, "folds": ",".join(self.folds), "checkpoint": self.checkpoint_name,
                "checksum": self.checksum(), "tta": bool(tta and self.mirror_axes), "step_size": step_size,
                "device": str(device), "postprocessing": postprocessed, "engine": f"SegmentMBTFE {__version__}",
                "backend": self.backend_used}


class _Prefixed:
    """Progress reporter that prefixes stage texts (e.g. with the fold)."""

    def __init__(self, reporter: Progress, prefix: str):
        self.reporter, self.prefix = reporter, prefix

    def report(self, fraction, stage):
        self.reporter.report(fraction, self.prefix + stage)

    def check_cancel(self):
        self.reporter.check_cancel()


def _check_content(volume: Volume, model_is_2d: bool):
    a = volume.array
    name = volume.name or "The image"
    if a.size == 0:
        raise InputError(f"{name} is empty (size {a.shape}).")
    is_2d = a.ndim == 2 or volume.metadata.get("dimension") == "2"
    if is_2d and not model_is_2d:
        raise InputError(f"{name} is a 2D image but this model segments 3D volumes.")
    if a.ndim not in (2, 3):
        raise InputError(f"{name} has {a.ndim} dimensions; expected a 3D volume.")
    if np.issubdtype(a.dtype, np.floating):
        bad = np.count_nonzero(~np.isfinite(a))
        if bad:
            what = "only NaN or infinite values" if bad == a.size else f"{bad} NaN or infinite voxels"
            raise InputError(f"{name} contains {what}; fix or mask them before segmenting.")
    if a.min() == a.max():
        raise InputError(f"{name} has no content: every voxel is {a.flat[0]}.")


def _broken_link(folder: TrainedFolder, checkpoint: str) -> str:
    """Why a fold's checkpoint that is a link to a missing file cannot load, or ''."""
    for fold in folder.fold_folders():
        path = folder.checkpoint_path(fold, checkpoint)
        if path.is_symlink() and not path.exists():
            return f"{path} is a link to {os.readlink(path)}, which does not exist; copy the checkpoint itself."
    return ""


def _mirror_axes(axes, dimensions: int):
    """The checkpoint's mirroring axes for TTA, each a valid axis of the patch; None when it names none."""
    if axes is None:
        return None
    try:
        axes = tuple(int(a) for a in axes)
    except (TypeError, ValueError):
        raise ModelError(f"The checkpoint's inference_allowed_mirroring_axes is not a list of axes: {axes!r}"[:200]) \
            from None
    if any(not 0 <= a < dimensions for a in axes):
        raise ModelError(f"The checkpoint allows mirroring along axes {axes}, but the patch has {dimensions}.")
    return axes


def _pass_entropy(regions: bool):
    """Each pass's entropy for a batch of tile logits (n, C, *patch) -> (n, *patch), float32."""
    return lambda logits: torch.stack([normalized_entropy(tile.float(), regions) for tile in logits])


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def _as_3d(array: np.ndarray) -> np.ndarray:
    return array[None] if array.ndim == 2 else array


def _spacing_zyx(volume: Volume):
    """nnU-Net's (z, y, x) spacing; a 2D image gets a huge slice spacing as nnU-Net's reader gives it."""
    if volume.array.ndim == 2 or volume.metadata.get("dimension") == "2":
        return (999.0 * max(volume.spacing[:2]), volume.spacing[1], volume.spacing[0])
    return tuple(volume.spacing[::-1])
