"""Fine-tune a loaded model on a few corrected cases, the way nnU-Net trains, in minutes on a CPU.

    result = finetune(model, [CorrectedCase("case 1", [image], corrected_labels)], settings=FinetuneSettings())
    ModelVersions(model_folder).add(model, result)      # versions.py: a new version; the original is never touched

What nnU-Net's trainer does, in small: the inference preprocessing (so the network sees what it will see
when segmenting), patches at the plans' patch size with a third of them centred on a foreground voxel,
augmentation suited to a few cases (mirroring on the model's mirroring axes, intensity scale and shift,
small rotations and scaling), Dice + cross-entropy with nnU-Net's deep-supervision weights (Dice + BCE for
region models), SGD with Nesterov momentum and a low, polynomially decaying learning rate. Mixed
precision on CUDA. Every fold the model ensembles is fine-tuned with the same settings.

By default the run fits a time budget (5 minutes on a CPU, 2 on a GPU) rather than a number of iterations,
so a slower machine trains fewer iterations instead of taking longer: the budget covers everything from the
user's command on (evaluation included); what is left after preparing the cases and measuring Dice before
is spent on training, the iterations that fit are estimated from the speed measured as training runs, the
learning rate's decay follows that estimate, and cases are drawn in shuffled rounds so that every case is
seen as often as the others however few iterations fit. `iterations` fixes the count instead.

Written here rather than by driving nnU-Net's trainer: nnunetv2 is not a runtime dependency (Slicer's
Python does not ship it), its trainer wants a preprocessed dataset on disk and background workers, and
fine-tuning must work for MBTFE-UNet and the configurations the engine runs without nnU-Net installed.
"""
import copy
import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..errors import InputError
from ..inference.devices import choose_device, release_memory
from ..inference.heap import reusing_memory
from ..inference.model import Model, _as_3d, _spacing_zyx
from ..inference.preprocessing import preprocess, resample_label_map
from ..models.folder import NAMED_NETWORKS
from ..nnunet_trainers import primus_title
from ..progress import Progress
from ..tensors import to_tensor
from ..volume import CorrectedCase
from .network_parts import encoder_of, optimizer_for, set_deep_supervision
from .patches import PatchSampler, TrainingData

log = logging.getLogger(__name__)


DEFAULT_BUDGET_S = {"cpu": 300.0, "gpu": 120.0}  # the whole fine-tune, when neither budget nor iterations is given
RESERVE_S = 3.0                                   # kept for writing the version (at most 5% of the budget), and 2%


@dataclass
class FinetuneSettings:
    iterations: Optional[int] = None       # per fold; one iteration is one batch. None: as many as the budget allows
    time_budget_s: Optional[float] = None  # seconds for the whole fine-tune, evaluation included (folds share it);
                                           # None: DEFAULT_BUDGET_S when iterations is None, else no limit
    learning_rate: float = 1e-3            # nnU-Net trains from 1e-2; fine-tuning starts ten times lower
    freeze_encoder: bool = False           # train the decoder only
    seed: int = 0
    batch_size: int = 2
    device: str = "auto"
    evaluate: bool = True                  # predict the cases before and after (Dice), without TTA


@dataclass
class FinetuneResult:
    weights: Dict[str, dict]               # fold -> fine-tuned network weights (CPU tensors)
    settings: FinetuneSettings
    iterations: int                        # iterations run per fold (fewer than asked when the budget ran out)
    seconds: float                         # training only
    losses: Dict[str, List[float]]         # fold -> loss per iteration
    cases: List[dict]                      # name, checksums of image(s) and label map, labelled voxels
    validation_cases: List[dict] = field(default_factory=list)
    dice_before: Dict[str, dict] = field(default_factory=dict)  # "training"/"validation" -> label name -> Dice, "mean"
    dice_after: Dict[str, dict] = field(default_factory=dict)
    parent: Dict[str, str] = field(default_factory=dict)        # the model it started from (name, path, checksum...)
    frozen: List[str] = field(default_factory=list)             # parts of the network not trained
    device: str = "cpu"
    stopped: str = ""                      # why training stopped before `iterations` ("" when it did not)
    budget_s: Optional[float] = None       # the time budget the run fitted (None: fixed iterations, no limit)
    timing: Dict[str, float] = field(default_factory=dict)  # where the seconds went (see finetune())
    network: Dict[str, str] = field(default_factory=dict)   # the network family, and what of it was trained

    def provenance(self) -> dict:
        """Plain JSON for the version folder."""
        return {"parent": self.parent, "cases": self.cases, "validation_cases": self.validation_cases,
                "settings": asdict(self.settings), "iterations": self.iterations, "seconds": round(self.seconds, 1),
                "budget_s": self.budget_s, "timing": self.timing,
                "frozen": self.frozen, "device": self.device, "stopped": self.stopped,
                "dice_before": self.dice_before, "dice_after": self.dice_after,
                "final_loss": {f: (round(sum(v[-10:]) / len(v[-10:]), 4) if v else None) for f, v in self.losses.items()},
                "network": self.network, "engine": f"SegmentMBTFE {__version__}"}


def finetune(model: Model, cases: Sequence[CorrectedCase], validation: Sequence[CorrectedCase] = (),
             settings: FinetuneSettings = None, progress=None, cancel=None, started: float = None) -> FinetuneResult:
    """Fine-tune every fold of `model` on `cases`; the model itself (files and loaded weights) is unchanged.
    `started` (time.perf_counter()) is when the user's command began: the time budget counts from there.
    Raises InputError for unusable cases, Cancelled when `cancel` is set (nothing is returned or written).

    result.timing says where the time went: preparing the cases, Dice before, drawing and augmenting
    patches, the network's forward and backward passes with the optimizer step, Dice after."""
    started = time.perf_counter() if started is None else started
    settings = settings or FinetuneSettings()
    _check_settings(model, cases, settings)
    for case in [*cases, *validation]:
        _check_case(model, case)
    reporter = Progress(progress, cancel)
    device = choose_device(settings.device)
    budget = budget_seconds(settings, device)
    timing, clock = {}, time.perf_counter()
    evaluation = 0.1 if settings.evaluate else 0.0
    reporter.report(0.0, "preparing the corrected cases")
    data = [_training_data(model, case) for case in cases]
    if not any(d.foreground for d in data):
        raise InputError("None of the corrected cases has a labelled voxel: there is nothing to learn from.")
    timing["preparing_s"], clock = time.perf_counter() - clock, time.perf_counter()
    before = {}
    if settings.evaluate:
        before = _evaluate(model, cases, validation, device, reporter.span(0.0, evaluation), "before")
        timing["dice_before_s"] = time.perf_counter() - clock

    training_started = time.perf_counter()
    weights, losses, iterations, stopped = {}, {}, 0, ""
    train_span = reporter.span(evaluation, 1.0 - evaluation)
    for i, fold in enumerate(model.folds):
        fold_budget = None
        if budget is not None:  # what is left after Dice after (1.5x what Dice before took), shared by the folds
            reserve = min(RESERVE_S, 0.05 * budget) + 0.02 * budget + 1.5 * timing.get("dice_before_s", 0.0)
            left = budget - (time.perf_counter() - started) - reserve
            fold_budget = max(left / (len(model.folds) - i), 0.0)
        fold_reporter = train_span.span(i / len(model.folds), (i + 1) / len(model.folds))
        prefix = f"fold {fold} ({i + 1}/{len(model.folds)}): " if len(model.folds) > 1 else ""
        try:
            with reusing_memory():  # each step's activations and gradients: the same memory again (heap.py)
                weights[fold], losses[fold], stopped = _train_fold(model, i, data, settings, device, fold_budget,
                                                                   fold_reporter, prefix, timing)
        finally:
            release_memory(device)
        iterations = len(losses[fold])
    seconds = time.perf_counter() - training_started

    after, clock = {}, time.perf_counter()
    if settings.evaluate:
        tuned = model.with_weights([weights[f] for f in model.folds])
        after = _evaluate(tuned, cases, validation, device, reporter.span(1.0 - evaluation, 1.0), "after")
        timing["dice_after_s"] = time.perf_counter() - clock
    reporter.report(1.0, "done")
    return FinetuneResult(
        weights=weights, settings=settings, iterations=iterations, seconds=seconds, losses=losses,
        cases=[_describe(c) for c in cases], validation_cases=[_describe(c) for c in validation],
        dice_before=before, dice_after=after, parent=_parent(model),
        frozen=["encoder"] if settings.freeze_encoder else [], device=str(device), stopped=stopped, budget_s=budget,
        timing={k: round(v, 2) for k, v in timing.items()}, network=_network_record(model))


def budget_seconds(settings: FinetuneSettings, device) -> Optional[float]:
    """The run's time budget: the one given, else the default for the device when no iteration count is given."""
    if settings.time_budget_s is not None:
        return float(settings.time_budget_s)
    if settings.iterations is not None:
        return None
    return DEFAULT_BUDGET_S["cpu" if torch.device(device).type == "cpu" else "gpu"]


# -- checks ------------------------------------------------------------------------------------------------

def _check_settings(model: Model, cases: Sequence[CorrectedCase], settings: FinetuneSettings):
    if model.configuration.previous_stage:
        raise InputError(f"Fine-tuning the second stage of a cascade ({model.configuration.name}) is not supported; "
                         f"fine-tune its {model.configuration.previous_stage} model or a 3d_fullres model.")
    if not cases:
        raise InputError("Give at least one corrected case to fine-tune on.")
    if settings.iterations is not None and settings.iterations < 1:
        raise InputError(f"The number of iterations must be at least 1; got {settings.iterations}.")
    if not settings.learning_rate > 0 or not math.isfinite(settings.learning_rate):
        raise InputError(f"The learning rate must be a positive number; got {settings.learning_rate}.")
    if settings.batch_size < 1:
        raise InputError(f"The batch size must be at least 1; got {settings.batch_size}.")
    if settings.time_budget_s is not None and not settings.time_budget_s > 0:
        raise InputError(f"The time budget must be positive; got {settings.time_budget_s} s.")


def _check_case(model: Model, case: CorrectedCase):
    """The images as prediction wants them, and a label map on their grid holding only the model's labels."""
    try:
        images = model._check_inputs(case.images)
    except InputError as error:
        raise InputError(f"Case {case.name}: {error}") from None
    labels = case.labels
    if labels.array.shape != images[0].array.shape:
        raise InputError(f"Case {case.name}: the label map is {labels.array.shape} voxels but the image is "
                         f"{images[0].array.shape}; they must share one grid.")
    if not labels.same_geometry(images[0]):
        raise InputError(f"Case {case.name}: the label map does not lie on the image's grid (spacing, origin or "
                         f"orientation differ).")
    values = np.unique(labels.array)
    if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values) & (values == np.round(values))):
        raise InputError(f"Case {case.name}: the label map holds non-integer values; expected label values.")
    allowed = set(model.labels.all_labels) | ({int(model.labels.ignore_label)} if model.labels.ignore_label is not None
                                              else set())
    unknown = sorted(int(v) for v in values if int(v) not in allowed)
    if unknown:
        names = ", ".join(f"{v} {n}" for v, n in model.labels.output_segments())
        raise InputError(f"Case {case.name}: the label map holds value(s) {', '.join(map(str, unknown))}, which this "
                         f"model does not know (its labels: {names}).")


# -- training data -------------------------------------------------------------------------------------------

def _training_data(model: Model, case: CorrectedCase) -> TrainingData:
    """The case preprocessed exactly as for prediction; its labels transposed, cropped and resampled alike."""
    images = case.images if isinstance(case.images, (list, tuple)) else [case.images]
    pre = preprocess([_as_3d(v.array) for v in images], _spacing_zyx(images[0]), model.configuration,
                     model.folder.transpose_forward, model.folder.intensity_properties)
    seg = _as_3d(np.asarray(case.labels.array)).astype(np.int16).transpose(model.folder.transpose_forward)
    seg = seg[tuple(slice(lo, hi) for lo, hi in pre.bbox)]
    seg = resample_label_map(seg, pre.data.shape[1:], pre.spacing, pre.model_spacing, model.configuration)
    rng = np.random.default_rng(0)
    foreground = {}
    for label in model.labels.foreground_labels:
        where = np.argwhere(seg == label)
        if len(where):
            foreground[label] = where[rng.choice(len(where), min(len(where), 10000), replace=False)]
    return TrainingData(to_tensor(pre.data), seg, foreground)


# -- one fold ------------------------------------------------------------------------------------------------

def _train_fold(model: Model, index: int, data: List[TrainingData], settings: FinetuneSettings, device,
                budget_s: Optional[float], reporter: Progress, prefix: str, timing: Dict[str, float]):
    """Train one fold: `settings.iterations` batches, or as many as fit in `budget_s` (the learning rate's
    decay fitted to the iterations the speed measured so far lets fit). Adds its seconds to `timing`."""
    torch.manual_seed(settings.seed + index)
    rng = np.random.default_rng(settings.seed + index)
    network = _fold_network(model, index, settings, device)
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer, clip = optimizer_for(network, trainable, settings.learning_rate)  # network_parts.py
    mixed = device.type == "cuda"
    scaler = _grad_scaler() if mixed else None
    loss_fn = _Loss(model)
    sampler = PatchSampler(model, data, device, rng)
    images_on_device = [d.image.to(device) for d in data]

    if budget_s is not None and budget_s <= 0:
        raise InputError("The time budget was used up before training could start (preparing the cases and "
                         "measuring Dice took it all); give a longer budget, or skip the evaluation.")
    limit = settings.iterations or math.inf
    planned = settings.iterations or 1
    losses, stopped, started = [], "", time.perf_counter()
    sampling = stepping = 0.0
    while len(losses) < limit:
        # a cancel point before each iteration too (the one after it reports): a cancel that comes while the
        # progress is being shown stops before the next iteration, so one set during an iteration ends with it
        reporter.check_cancel()
        it, elapsed = len(losses), time.perf_counter() - started
        if budget_s is not None and it > 0 and elapsed >= budget_s:
            if settings.iterations:
                stopped = f"time budget reached after {it} iterations"
            break
        if budget_s is not None:  # fit the decay to the iterations the budget allows at the speed so far
            planned = max(it + 1, min(limit, int(budget_s / (elapsed / it)) if it >= 3 else it + 100))
        for group in optimizer.param_groups:  # nnU-Net's polynomial decay
            group["lr"] = settings.learning_rate * max(1 - it / planned, 0.0) ** 0.9
        clock = time.perf_counter()
        x, y = sampler.batch(images_on_device, settings.batch_size)
        sampling, clock = sampling + time.perf_counter() - clock, time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=mixed):
            loss = loss_fn(network(x), y)
        if not torch.isfinite(loss):
            raise InputError("Fine-tuning diverged (the loss is not a number); try a lower learning rate.")
        _step(loss, optimizer, scaler, trainable, clip)
        losses.append(float(loss.detach()))
        stepping += time.perf_counter() - clock
        done = len(losses)
        left = (time.perf_counter() - started) / done * (planned - done)
        reporter.report(done / planned, f"{prefix}iteration {done}/{planned}, loss {losses[-1]:.3f}, "
                                        f"about {_duration(left)} left")
    timing["sampling_s"] = timing.get("sampling_s", 0.0) + sampling
    timing["forward_backward_s"] = timing.get("forward_backward_s", 0.0) + stepping
    set_deep_supervision(network, False)
    state = {k: v.detach().to("cpu").clone() for k, v in network.state_dict().items()}
    state.update(getattr(model, "training_only_weights", [{}] * (index + 1))[index])  # e.g. a VAE branch, unchanged
    return state, losses, stopped


def _fold_network(model: Model, index: int, settings: FinetuneSettings, device):
    """A copy of the network with fold `index`'s weights, in training mode (the encoder frozen if asked)."""
    network = copy.deepcopy(model.network)
    network.load_state_dict(model.weights[index])
    set_deep_supervision(network, True)  # nnU-Net trains every decoder stage's output
    network.to(device).train()
    if settings.freeze_encoder:
        encoder_of(network).eval()  # batch-norm statistics stay as trained, too
        for p in encoder_of(network).parameters():
            p.requires_grad_(False)
    return network


def _step(loss, optimizer, scaler, trainable, clip: float):
    """One optimizer step, gradients clipped to the norm the network's nnU-Net trainer uses (network_parts.py);
    through the loss scaler when mixed."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, clip)
        optimizer.step()


def _grad_scaler():
    """Mixed precision's loss scaler: torch.amp's from torch 2.3, torch.cuda.amp's before (macOS's torch 2.2)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


# -- loss ----------------------------------------------------------------------------------------------------

class _Loss:
    """nnU-Net's training loss: soft Dice (without background) + cross-entropy for label models, soft Dice +
    BCE for region models, summed over the deep-supervision outputs with weights 1, 1/2, 1/4, ... (the
    lowest resolution 0), normalised; voxels of the ignore label count for neither."""

    def __init__(self, model: Model):
        labels = model.labels
        self.regions = [tuple(int(v) for v in r) for _, r in labels.regions] if labels.has_regions else None
        self.ignore = int(labels.ignore_label) if labels.ignore_label is not None else None
        self.batch_dice = bool(model.configuration.get("batch_dice", True))
        # UNet++'s heads are all full resolution and weighted equally, as its nnU-Net trainer does
        self.equal = getattr(model.network, "deep_supervision_weighting", "") == "equal"

    def __call__(self, outputs, target: torch.Tensor) -> torch.Tensor:
        outputs = [outputs] if torch.is_tensor(outputs) else list(outputs)
        weights = [1.0 if self.equal else 1 / 2 ** i for i in range(len(outputs))]
        if len(weights) > 1 and not self.equal:
            weights[-1] = 0.0
        total = sum(weights)
        loss = 0.0
        for output, weight in zip(outputs, weights):
            if weight:
                loss = loss + weight / total * self._one(output.float(), _resized(target, output.shape[2:]))
        return loss

    def _one(self, logits, target):
        mask = (target != self.ignore) if self.ignore is not None else None
        if self.regions is not None:
            regions = torch.cat([_isin(target, r) for r in self.regions], 1).float()
            dice = _soft_dice(torch.sigmoid(logits), regions, mask, self.batch_dice)
            bce = F.binary_cross_entropy_with_logits(logits, regions, reduction="none")
            bce = (bce * mask).sum() / mask.sum().clamp_min(1) if mask is not None else bce.mean()
            return dice + bce
        classes = torch.where(mask, target, 0) if mask is not None else target
        onehot = torch.zeros_like(logits).scatter_(1, classes.long(), 1)
        dice = _soft_dice(torch.softmax(logits, 1)[:, 1:], onehot[:, 1:], mask, self.batch_dice)
        ce = F.cross_entropy(logits, target[:, 0].long(), ignore_index=self.ignore if self.ignore is not None else -100)
        return dice + ce


def _soft_dice(probabilities, onehot, mask, batch_dice: bool, smooth: float = 1e-5):
    """nnU-Net's MemoryEfficientSoftDiceLoss: minus the mean soft Dice over channels (and cases unless batch)."""
    if mask is not None:
        probabilities, onehot = probabilities * mask, onehot * mask
    axes = tuple(range(2, probabilities.ndim))
    intersect, predicted, truth = (probabilities * onehot).sum(axes), probabilities.sum(axes), onehot.sum(axes)
    if batch_dice:
        intersect, predicted, truth = intersect.sum(0), predicted.sum(0), truth.sum(0)
    return -((2 * intersect + smooth) / (truth + predicted + smooth).clamp_min(1e-8)).mean()


def _resized(target, shape):
    """The label patch at a deep-supervision output's size (nnU-Net: nearest-exact interpolation)."""
    if tuple(target.shape[2:]) == tuple(shape):
        return target
    return F.interpolate(target.float(), size=tuple(shape), mode="nearest-exact").long()


def _isin(target, values):
    return torch.isin(target, torch.tensor(values, device=target.device))


# -- Dice before and after, provenance -----------------------------------------------------------------------

def _evaluate(model: Model, cases, validation, device, reporter: Progress, when: str) -> Dict[str, dict]:
    """Mean Dice per label of the model's prediction (no TTA) on the training and validation cases."""
    groups = [("training", list(cases))] + ([("validation", list(validation))] if validation else [])
    total, done, result = sum(len(g) for _, g in groups), 0, {}
    for group, group_cases in groups:
        per_case = []
        for case in group_cases:
            step = reporter.span(done / total, (done + 1) / total)
            text = f"Dice {when} fine-tuning: case {done + 1} of {total}"
            prediction = model.predict(case.images, device=device, tta=False,
                                       progress=lambda fraction, _: step.report(fraction, text))
            per_case.append(dice_per_label(prediction.labels.array, case.labels.array, model.labels))
            done += 1
        result[group] = _mean_dice(per_case)
    return result


def dice_per_label(predicted: np.ndarray, truth: np.ndarray, labels) -> Dict[str, float]:
    """Dice of each label (or region) of the model; a label absent from both is left out (nnU-Net: NaN)."""
    keep = truth != labels.ignore_label if labels.ignore_label is not None else np.ones(truth.shape, bool)
    if labels.has_regions:
        masks = [(name, tuple(region)) for name, region in labels.regions]
    else:
        masks = [(name, (value,)) for value, name in labels.output_segments()]
    dice = {}
    for name, values in masks:
        p, t = np.isin(predicted, values) & keep, np.isin(truth, values) & keep
        denominator = int(p.sum()) + int(t.sum())
        if denominator:
            dice[name] = 2.0 * int((p & t).sum()) / denominator
    return dice


def _mean_dice(per_case: List[Dict[str, float]]) -> Dict[str, float]:
    names = list(dict.fromkeys(name for case in per_case for name in case))
    mean = {name: round(float(np.mean([c[name] for c in per_case if name in c])), 4) for name in names}
    mean["mean"] = round(float(np.mean(list(mean.values()))), 4) if names else float("nan")
    return mean


def _describe(case: CorrectedCase) -> dict:
    images = case.images if isinstance(case.images, (list, tuple)) else [case.images]
    labels = np.asarray(case.labels.array)
    values, counts = np.unique(labels, return_counts=True)
    return {"name": case.name, "images": [_checksum(v.array) for v in images], "labels": _checksum(labels),
            "shape": list(labels.shape), "labelled_voxels": {str(int(v)): int(c) for v, c in zip(values, counts) if v}}


def _checksum(array: np.ndarray) -> str:
    """Short SHA-256 of an array's values, shape and type: identifies a case without its file."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def _network_record(model: Model) -> Dict[str, str]:
    """The network family, for the version's provenance; for SegResNetVAE, what became of its VAE branch."""
    name = type(model.network).__name__
    record = {"family": primus_title(model.trainer_name) or NAMED_NETWORKS.get(name, name)}
    if name == "SegResNetVAE":
        kept = any(getattr(model, "training_only_weights", None) or [])
        record["vae_branch"] = ("not trained: fine-tuned with Dice + CE only, without the VAE branch; " +
                                ("its weights are the parent's, unchanged" if kept else "the parent has none"))
    return record


def _parent(model: Model) -> Dict[str, str]:
    return {"name": model.name, "path": str(model.folder.path), "checksum": model.checksum(),
            "trainer": model.trainer_name, "configuration": model.configuration.name, "folds": ",".join(model.folds)}
