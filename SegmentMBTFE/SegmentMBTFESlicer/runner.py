"""One segmentation from volume nodes to segments: what the Segment button and the console API share.

    inputs = prepare_inputs(volume_nodes)                        # main thread: copy voxels, capture geometry
    prediction = predict(models, path, inputs.volumes, options)  # any thread: the engine, no MRML
    node = apply_prediction(prediction, inputs.geometry, scene)  # main thread: segments into the scene

Only one segmentation runs at a time in the whole application (`claim`/`release`), whether it was
started from the panel or the console: two models competing for one GPU help nobody.
"""
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from . import catalog, segmentation, terminology
from .volumes import Geometry, geometry_of, same_grid, volume_from_node

log = logging.getLogger(__name__)
_RUNNING = threading.Lock()
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


def claim() -> None:
    """Take the application-wide 'a segmentation runs' flag; raise the user-facing refusal if taken."""
    from SegmentMBTFELib.errors import SegmentError
    if not _RUNNING.acquire(blocking=False):
        raise SegmentError(BUSY_MESSAGE)


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
    return Inputs([volume_from_node(n) for n in nodes], geometries[0], [n.GetName() for n in nodes])


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


def predict(models: ModelCache, model, volumes, options: Options,
            progress: Callable[[float, str], None] = None, cancel=None):
    """The engine's prediction for one case (no MRML here: safe in a worker thread). `model` is a folder
    path (loaded through the cache) or a loaded Model."""
    if not hasattr(model, "predict"):
        if progress:
            progress(0.0, "loading the model")
        model = models.get(model, options.folds, options.checkpoint)
    return model.predict(volumes, device=options.device, step_size=options.step_size, tta=options.tta,
                         progress=progress, cancel=cancel)


def apply_prediction(prediction, geometry: Geometry, scene, output=None, name: str = None,
                     show3d: bool = True):
    """Write the prediction's segments into `output` (or a new segmentation node) on the main thread."""
    from SegmentMBTFELib.colors import segment_colors
    created = output is None
    node = output if output is not None else _new_segmentation(scene, name or f"{geometry.name} segmentation",
                                                               geometry)
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
