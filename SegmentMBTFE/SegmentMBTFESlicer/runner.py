"""One segmentation from volume nodes to segments: what the Segment button and the console API share.

    inputs = prepare_inputs(volume_nodes)                        # main thread: copy voxels, capture geometry
    prediction = predict(models, path, inputs.volumes, options)  # any thread: the engine, no MRML
    node = apply_prediction(prediction, inputs.geometry, scene)  # main thread: segments into the scene

Fine-tuning shares the steps' shape (`prepare_finetune` on the main thread, `finetune_model` in any thread)
and the application-wide flag: only one segmentation or fine-tune runs at a time (`claim`/`release`),
whether it was started from the panel or the console: two models competing for one GPU help nobody.

Models are loaded through `versions.resolve`: a model's current version (the original until a fine-tune
makes a new one current) is what Segment runs.
"""
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import slicer

from . import catalog, corrections, segmentation, terminology
from .volumes import Geometry, geometry_of, same_grid, volume_from_node

log = logging.getLogger(__name__)
_RUNNING = threading.Lock()
_HOLDER = ["segmentation"]  # what holds the flag, for the busy message
BUSY_MESSAGE = "A segmentation is already running; wait for it to finish or cancel it first."


@dataclass
class Options:
    device: str = "auto"
    tta: bool = True
    step_size: float = 0.5
    folds: Optional[List[str]] = None   # None: every trained fold
    checkpoint: str = "final"
    show3d: bool = True


@dataclass
class Inputs:
    volumes: list          # engine Volumes, one per channel (copies of the voxels)
    geometry: Geometry     # the first channel's grid: where the segments go
    names: List[str]
    node_ids: List[str] = None  # the volume nodes, to name the first as a new segmentation's reference volume


def claim(task: str = "segmentation") -> None:
    """Take the application-wide 'a model runs' flag (task: "segmentation" or "fine-tune"); raise the
    user-facing refusal if taken."""
    from SegmentMBTFELib.errors import SegmentError
    if not _RUNNING.acquire(blocking=False):
        raise SegmentError(busy_message())
    _HOLDER[0] = task


def busy_message() -> str:
    """'A segmentation is already running; ...' or 'A fine-tune is already running; ...'."""
    return BUSY_MESSAGE.replace("A segmentation", f"A {_HOLDER[0]}", 1)


def release() -> None:
    if _RUNNING.locked():
        _RUNNING.release()


def is_running() -> bool:
    return _RUNNING.locked()


def prepare_inputs(volume_nodes: Sequence) -> Inputs:
    """Copy the inputs' voxels and geometry on the main thread; channels must share one voxel grid."""
    from SegmentMBTFELib.errors import InputError
    nodes = [volume_nodes] if hasattr(volume_nodes, "GetImageData") else list(volume_nodes)
    if not nodes or any(n is None for n in nodes):
        raise InputError("Choose an input volume for every channel of the model.")
    geometries = [geometry_of(n) for n in nodes]
    for node, geometry in zip(nodes[1:], geometries[1:]):
        if not same_grid(geometries[0], geometry):
            raise InputError(f"{node.GetName()} and {nodes[0].GetName()} do not share one voxel grid; "
                             "resample them onto the same grid first (Resample Scalar/Vector/DWI Volume).")
    return Inputs([volume_from_node(n) for n in nodes], geometries[0], [n.GetName() for n in nodes],
                  [n.GetID() for n in nodes])


class ModelCache:
    """Loaded models by (folder, folds, checkpoint): loading reads every checkpoint, so do it once."""

    def __init__(self):
        self._models = {}
        self._lock = threading.Lock()

    def get(self, path, folds=None, checkpoint: str = "final"):
        from SegmentMBTFELib import load_model
        key = (str(Path(path).resolve()), tuple(folds or ()), checkpoint)
        with self._lock:
            if key not in self._models:
                self._models[key] = load_model(path, folds=list(folds) if folds else None, checkpoint=checkpoint)
            return self._models[key]

    def clear(self):
        with self._lock:
            self._models.clear()


def resolve_model(model, user_folders: Sequence[str] = ()):
    """A model folder path from a path or a shipped or added model's name; a loaded Model is kept as it is."""
    from SegmentMBTFELib.errors import ModelError
    if hasattr(model, "predict"):
        return model
    text = str(model or "").strip()
    if text and Path(text).expanduser().is_dir():
        return str(Path(text).expanduser())
    models = catalog.available_models(user_folders)
    found = catalog.find(models, text) if text else None
    if found is None:
        names = ", ".join(m.name for m in models) or "none"
        raise ModelError(f"No model folder or model named '{text}' (available: {names}).")
    return found.path


def current_version(model_path):
    """(folder to load, Version) of the model's current version: the original until a fine-tune made
    another one current."""
    from SegmentMBTFELib.versions import resolve
    return resolve(model_path)


def predict(models: ModelCache, model, volumes, options: Options,
            progress: Callable[[float, str], None] = None, cancel=None):
    """The engine's prediction for one case (no MRML here: safe in a worker thread). `model` is a folder
    path (its current version is loaded through the cache) or a loaded Model."""
    if not hasattr(model, "predict"):
        if progress:
            progress(0.0, "loading the model")
        folder, _version = current_version(model)
        model = models.get(folder, options.folds, options.checkpoint)
    return model.predict(volumes, device=options.device, step_size=options.step_size, tta=options.tta,
                         progress=progress, cancel=cancel)


def apply_prediction(prediction, geometry: Geometry, scene, output=None, name: str = None,
                     show3d: bool = True, reference_volume_id: str = ""):
    """Write the prediction's segments into `output` (or a new segmentation node) on the main thread.
    A new node names `reference_volume_id` (the input volume) as its reference volume, as Segment Editor
    does, so fine-tuning finds the volume the segments belong to."""
    from SegmentMBTFELib.colors import segment_colors
    created = output is None
    node = output if output is not None else _new_segmentation(scene, name or f"{geometry.name} segmentation",
                                                               geometry)
    reference = scene.GetNodeByID(reference_volume_id) if (created and reference_volume_id) else None
    if reference is not None and reference.IsA("vtkMRMLScalarVolumeNode"):
        node.SetNodeReferenceID(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole(),
                                reference.GetID())
    try:
        settings = prediction.settings
        model_name = str(settings.get("model", "model"))
        values = [value for value, _ in prediction.segments]
        segmentation.write_labels(node, prediction.labels.array, geometry, prediction.segments, model_name,
                                  str(settings.get("checksum", "")), segment_colors(max(values, default=0)),
                                  lambda label: terminology.terminology_for(label, model_name))
        segmentation.record_provenance(node, settings)
        segmentation.show(node, closed_surface=show3d)
    except Exception:
        if created:
            scene.RemoveNode(node)  # a failed run leaves no half-made node behind
        raise
    return node


def replace_question(output, model_name: str) -> str:
    """The question to ask before overwriting this model's earlier segments in `output` ('' = nothing to ask)."""
    previous = segmentation.model_segments(output, model_name)
    if not previous:
        return ""
    names = ", ".join(f"'{name}'" for _, name in previous)
    return (f"{output.GetName()} already holds {len(previous)} segment(s) that {model_name} made: {names}.\n\n"
            "Replace them with the new result? Edits made to those segments are lost; "
            "all other segments stay as they are.")


def _new_segmentation(scene, name: str, geometry: Geometry):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
    node.CreateDefaultDisplayNodes()
    if geometry.transform_node_id:
        node.SetAndObserveTransformNodeID(geometry.transform_node_id)  # stays aligned with its volume
    return node


def segment_files(models: ModelCache, paths: Sequence, model, output_dir, options: Options,
                  progress: Callable[[float, str], None] = None, cancel=None) -> List[Path]:
    """Segment image files (one path, or a list of channel paths, per case) into `output_dir`/<case>.seg.nrrd."""
    from SegmentMBTFELib.imageio import read_channels
    from SegmentMBTFELib.writers import write_prediction
    from SegmentMBTFELib.progress import Progress
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cases = [[p] if isinstance(p, (str, Path)) else list(p) for p in paths]
    reporter = Progress(progress, cancel)
    written = []
    for index, channels in enumerate(cases):
        case_reporter = reporter.span(index / len(cases), (index + 1) / len(cases))
        name = _case_name(channels[0])
        prediction = predict(models, model, read_channels(channels), options,
                             lambda f, text: case_reporter.report(f, f"{name} ({index + 1}/{len(cases)}): {text}"),
                             cancel)
        written += write_prediction(prediction, output_dir / f"{name}.seg.nrrd", terminology.terminology_for)
    return written


def _case_name(path) -> str:
    """hippocampus_001_0000.nii.gz -> hippocampus_001 (nnU-Net's channel suffix dropped)."""
    name = Path(path).name
    for ending in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(ending):
            name = name[: -len(ending)]
            break
    stem, _, suffix = name.rpartition("_")
    return stem if stem and len(suffix) == 4 and suffix.isdigit() else name


# ----------------------------------------------------------------------------------------------- fine-tuning

@dataclass
class FinetunePlan:
    """Corrected cases ready for the engine, made on the main thread (copies: the scene may change meanwhile)."""
    model_path: str
    model_name: str
    cases: list                 # engine finetune.Case, one per segmentation
    corrections: list           # corrections.Corrections, one per case (what was matched, unmatched, noted)

    def report(self) -> str:
        """The unmatched segments and notes of every case, for the panel and the log ('' when none)."""
        texts = []
        for case, found in zip(self.cases, self.corrections):
            text = found.report()
            if text:
                texts.append(f"{case.name}: {text}" if len(self.cases) > 1 else text)
        return " ".join(texts)


@dataclass
class FinetuneRun:
    """A finished fine-tune: the version written, the engine's result (Dice before and after) and the
    version it started from."""
    version: object             # versions.Version
    result: object              # finetune.FinetuneResult
    parent: str
    report: str = ""            # unmatched segments and notes of the corrected cases

    def dice_text(self) -> str:
        return dice_text(self.result)


def finetune_settings(iterations: int = 200, minutes: float = None, learning_rate: float = 1e-3,
                      freeze_encoder: bool = False, device: str = "auto"):
    from SegmentMBTFELib.finetune import FinetuneSettings
    return FinetuneSettings(iterations=int(iterations), time_budget_s=float(minutes) * 60 if minutes else None,
                            learning_rate=float(learning_rate), freeze_encoder=bool(freeze_encoder),
                            device=device or "auto")


def prepare_finetune(segmentation_nodes, volume_nodes, model_path) -> FinetunePlan:
    """Main thread: the corrected label map of every segmentation, with copies of its volume(s).

    segmentation_nodes: one node or a list. volume_nodes: None (each segmentation's reference volume), or
    per segmentation a volume node or a list of channel volumes (for one segmentation, that node or list
    itself). Raises InputError saying what to fix when a case cannot be used."""
    from SegmentMBTFELib.errors import InputError
    from SegmentMBTFELib.finetune import Case
    from SegmentMBTFELib.modelfolder import ModelFolder
    folder = ModelFolder(model_path)
    segmentations = [segmentation_nodes] if hasattr(segmentation_nodes, "GetSegmentation") \
        else list(segmentation_nodes or [])
    if not segmentations or any(s is None for s in segmentations):
        raise InputError("Choose the corrected segmentation to fine-tune on.")
    if volume_nodes is None or hasattr(volume_nodes, "GetImageData"):
        volume_nodes = [volume_nodes] * len(segmentations) if volume_nodes is None else [volume_nodes]
    elif len(segmentations) == 1 and all(hasattr(v, "GetImageData") for v in volume_nodes) \
            and len(volume_nodes) == len(folder.channel_names) > 1:
        volume_nodes = [list(volume_nodes)]  # the channels of the one case
    volume_nodes = list(volume_nodes)
    if len(volume_nodes) != len(segmentations):
        raise InputError(f"Give one volume (or one list of channel volumes) per segmentation: got "
                         f"{len(volume_nodes)} for {len(segmentations)}.")
    cases, found = [], []
    for node, volumes in zip(segmentations, volume_nodes):
        name = node.GetName()
        channels = [volumes] if volumes is None or hasattr(volumes, "GetImageData") else list(volumes)
        if channels == [None]:
            channels = [corrections.reference_volume(node)]
            if channels[0] is None:
                raise InputError(f"Choose the volume {name} was drawn on.")
        if len(channels) != len(folder.channel_names):
            raise InputError(f"{folder.name} reads {len(folder.channel_names)} channels "
                             f"({', '.join(folder.channel_names)}); give that many volumes for {name}.")
        inputs = prepare_inputs(channels)
        corrected = corrections.corrected_labels(node, channels[0], folder.name, folder.labels.output_segments())
        if not corrected.usable:
            raise InputError(f"{name}: {' '.join(corrected.problems)}")
        cases.append(Case(name, inputs.volumes, inputs.volumes[0].with_array(corrected.labels, name=name)))
        found.append(corrected)
    return FinetunePlan(str(model_path), folder.name, cases, found)


def finetune_model(models: ModelCache, plan: FinetunePlan, settings, progress=None, cancel=None,
                   make_current: bool = True, written: list = None) -> FinetuneRun:
    """Any thread: fine-tune the model's current version on the plan's cases and write the result as a new
    version (the original and every other version are left as they are). `written` (a list) receives the
    new Version as soon as it exists, so a caller can undo it when the run is cancelled at the last moment."""
    from SegmentMBTFELib.finetune import finetune
    from SegmentMBTFELib.versions import ModelVersions
    if progress:
        progress(0.0, "loading the model")
    folder, parent = current_version(plan.model_path)
    model = models.get(folder)  # every fold: a version holds all of them
    result = finetune(model, plan.cases, settings=settings, progress=progress, cancel=cancel)
    if progress:
        progress(1.0, "writing the new version")
    version = ModelVersions(plan.model_path).add(model, result, make_current=make_current, cancel=cancel)
    if written is not None:
        written.append(version)
    log.info("SegmentMBTFE: %s of %s written to %s (%s)", version.id, plan.model_name, version.path,
             dice_text(result))
    return FinetuneRun(version, result, parent.id, plan.report())


def dice_text(result) -> str:
    """'Dice before 0.81 -> after 0.86 (training cases)', validation cases too when there were any."""
    texts = []
    for group, words in (("training", "training cases"), ("validation", "validation cases")):
        before = (result.dice_before or {}).get(group) or {}
        after = (result.dice_after or {}).get(group) or {}
        if "mean" in before and "mean" in after:
            texts.append(f"Dice before {before['mean']:.2f} -> after {after['mean']:.2f} ({words})")
    return "; ".join(texts)


def dice_details(result) -> str:
    """Per label: 'anterior 0.80 -> 0.85, posterior 0.82 -> 0.86' (training cases)."""
    before = (result.dice_before or {}).get("training") or {}
    after = (result.dice_after or {}).get("training") or {}
    return ", ".join(f"{name} {before[name]:.2f} -> {after[name]:.2f}" for name in after
                     if name != "mean" and name in before)
