"""The main-thread steps of a segmentation or a fine-tune: what the Segment button and the console API share.

    inputs = prepare_inputs(volume_nodes)                       # copy the voxels, capture the geometry
    ... the worker process predicts (logic.py, jobs.py) ...
    node = apply_prediction(result, inputs.geometry, scene)     # the segments into the scene

Fine-tuning has the same shape: `prepare_finetune` copies the corrected cases out of the scene, the worker
trains and writes a new version, and `FinetuneRun` describes it. Everything here touches MRML and runs on
the main thread; nothing here imports torch.
"""
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

import slicer

from SegmentMBTFELib.exchange import FinetuneSummary
from SegmentMBTFELib.io.terminology import terminology_for
from SegmentMBTFELib.volume import CorrectedCase

from . import catalog, corrections, segmentation
from .volumes import Geometry, geometry_of, same_grid, volume_from_node

log = logging.getLogger(__name__)


@dataclass
class Options:
    device: str = "auto"
    tta: bool = True
    step_size: float = 0.5
    folds: Optional[List[str]] = None   # None: every trained fold
    checkpoint: str = "final"
    show3d: bool = True
    uncertainty: bool = False           # also the uncertainty maps and the per-segment table
    backend: str = "torch"              # what runs the network on the CPU: torch, openvino, auto

    def request(self) -> dict:
        """The worker's options for these settings."""
        return {"device": self.device, "tta": bool(self.tta), "step_size": float(self.step_size),
                "folds": self.folds, "checkpoint": self.checkpoint, "uncertainty": bool(self.uncertainty),
                "backend": self.backend}


def fold_list(folds) -> Optional[List[str]]:
    """The folds a caller named (0, "0,1", [0, 1]...) as strings; None (every trained fold) for None or ""."""
    if folds is None or folds == "":
        return None
    if isinstance(folds, (int, str)):
        folds = [f for f in str(folds).replace(",", " ").split() if f]
    return [str(f) for f in folds]


@dataclass
class Inputs:
    volumes: list          # engine Volumes, one per channel (copies of the voxels)
    geometry: Geometry     # the first channel's grid: where the segments go
    names: List[str]
    node_ids: List[str] = None  # the volume nodes, to name the first as a new segmentation's reference volume


@dataclass
class SegmentsResult:
    """What the worker predicted for one case: the label map on the input's grid, (value, name) per segment,
    and the provenance (model, checksum, folds, TTA, device...)."""
    labels: np.ndarray
    segments: list
    settings: dict = field(default_factory=dict)
    messages: List[str] = field(default_factory=list)
    uncertainty: dict = field(default_factory=dict)   # map name -> float32 array on the same grid
    statistics: list = field(default_factory=list)    # one dict per segment (uncertainty.segment_statistics)


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


def resolve_model(model, settings=None) -> str:
    """A model folder path from a path, the name of a model the panel lists (or `models list` shows), or a loaded
    engine Model (its folder). `settings`: Slicer's, for catalog.available_models."""
    from SegmentMBTFELib.errors import ModelError
    if hasattr(model, "predict"):  # a loaded Model: the worker loads the same folder
        return str(model.folder.path)
    text = str(model or "").strip()
    if text and (Path(text).expanduser().is_dir() or "/" in text or os.sep in text):
        return str(Path(text).expanduser())  # a path (existing or not: the engine says what is wrong with it)
    models = catalog.available_models(settings)
    found = catalog.find(models, text) if text else None
    if found is None:
        names = ", ".join(m.name for m in models) or "none"
        raise ModelError(f"No model folder or model named '{text}' (available: {names}).")
    return found.path


def apply_prediction(prediction: SegmentsResult, geometry: Geometry, scene, output=None, name: str = None,
                     show3d: bool = True, reference_volume_id: str = ""):
    """Write the prediction's segments into `output` (or a new segmentation node) on the main thread.
    A new node names `reference_volume_id` (the input volume) as its reference volume, as Segment Editor
    does, so fine-tuning finds the volume the segments belong to. An output node deleted while the model
    ran is refused: nothing is written anywhere."""
    from SegmentMBTFELib.errors import InputError
    from SegmentMBTFELib.io.colors import segment_colors
    if output is not None and output.GetScene() is None:
        raise InputError(f"The output segmentation {output.GetName()} was deleted while segmenting; "
                         "nothing was written.")
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
        segmentation.write_labels(node, prediction.labels, geometry, prediction.segments, model_name,
                                  str(settings.get("checksum", "")), segment_colors(max(values, default=0)),
                                  lambda label: terminology_for(label, model_name))
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


# ----------------------------------------------------------------------------------------------- fine-tuning

@dataclass
class FinetunePlan:
    """Corrected cases ready for the worker, made on the main thread (copies: the scene may change meanwhile)."""
    model_path: str
    model_name: str
    cases: List[CorrectedCase]  # one per segmentation
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
    """A finished fine-tune: the version written, its result (Dice before and after) and the version it
    started from."""
    version: object             # versions.Version
    result: FinetuneSummary
    parent: str
    report: str = ""            # unmatched segments and notes of the corrected cases

    def dice_text(self) -> str:
        return dice_text(self.result)


def finetune_settings(iterations: int = None, minutes: float = None, learning_rate: float = 1e-3,
                      freeze_encoder: bool = False, device: str = "auto") -> dict:
    """The worker's fine-tuning settings (fields of the engine's FinetuneSettings). iterations None or 0: as
    many as the time budget allows; minutes None or 0 with iterations None: the engine's default budget."""
    return {"iterations": int(iterations) if iterations else None,
            "time_budget_s": float(minutes) * 60 if minutes else None,
            "learning_rate": float(learning_rate), "freeze_encoder": bool(freeze_encoder),
            "device": device or "auto"}


def prepare_finetune(segmentation_nodes, volume_nodes, model_path) -> FinetunePlan:
    """Main thread: the corrected label map of every segmentation, with copies of its volume(s).

    segmentation_nodes: one node or a list. volume_nodes: None (each segmentation's reference volume), or
    per segmentation a volume node or a list of channel volumes (for one segmentation, that node or list
    itself). Raises InputError saying what to fix when a case cannot be used."""
    from SegmentMBTFELib.errors import InputError
    from SegmentMBTFELib.models.folder import ModelFolder
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
        cases.append(CorrectedCase(name, inputs.volumes, inputs.volumes[0].with_array(corrected.labels, name=name)))
        found.append(corrected)
    return FinetunePlan(str(model_path), folder.name, cases, found)



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
