"""A corrected segmentation as the label map fine-tuning trains on: segments -> the model's label values.

A segment stands for a model label when
  1. its `SegmentMBTFE.Model` tag names this model: then its `SegmentMBTFE.Label` tag is the label value
     (what the Segment button wrote; it survives renaming, saving and reloading), or else
  2. its name is one of the model's label names (case and surrounding spaces ignored).
Nothing else is guessed: a segment that matches no label is reported and left out, and what would make the
label map ambiguous or wrong is a problem that stops fine-tuning with a sentence saying what to fix:
two segments for one label, segments that overlap, or a model label without any segment (the model would
learn that the structure is absent; an empty segment of that name says so on purpose).

The user's segments are only read: each is exported on its own into the reference volume's grid through
a temporary, hidden labelmap node, and every node the export adds to the scene is removed again.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import vtk

import slicer

from .segmentation import LABEL_TAG, MODEL_TAG


@dataclass
class SegmentMatch:
    segment_id: str
    segment_name: str
    value: int            # the label value in the model's output label map
    label_name: str
    by: str               # "tag" or "name"


@dataclass
class Matching:
    """Which segments stand for which model labels, from names and tags only (no voxels read)."""
    matched: List[SegmentMatch] = field(default_factory=list)
    unmatched: List[str] = field(default_factory=list)           # segment names
    reasons: Dict[str, str] = field(default_factory=dict)        # segment name -> why it matches nothing
    problems: List[str] = field(default_factory=list)

    def summary(self) -> str:
        """One paragraph for the panel: what trains as which label, what is not used and why, the problems."""
        parts = []
        if self.matched:
            parts.append("Trains " + ", ".join(f"'{m.segment_name}' as {m.label_name} ({m.value})"
                                              for m in self.matched) + ".")
        if self.unmatched:
            parts.append("Not used: " + "; ".join(f"'{name}' \u2014 {self.reasons.get(name, 'no label')}"
                                                 for name in self.unmatched) + ".")
        return " ".join(parts + self.problems)


@dataclass
class Corrections:
    """The corrected label map of one case and how it was made."""
    labels: Optional[np.ndarray]                                  # (k, j, i) on the reference volume's grid
    matched: List[Tuple[str, int, str]] = field(default_factory=list)  # (segment name, label value, label name)
    unmatched: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)             # any problem: do not train on this case
    notes: List[str] = field(default_factory=list)                # worth saying, not a reason to stop
    reasons: Dict[str, str] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return not self.problems and self.labels is not None

    def report(self) -> str:
        """Every problem, unmatched segment and note, one sentence each."""
        lines = list(self.problems)
        lines += [f"Segment '{name}' is not used: {self.reasons.get(name, 'it matches no label')}."
                  for name in self.unmatched]
        return " ".join(lines + self.notes)


def match_segments(segmentation_node, model_name: str, output_segments: Sequence[Tuple[int, str]]) -> Matching:
    """Map the node's segments to the model's labels (see the module docstring); nothing is read but names
    and tags, so the panel can show this as the user picks a segmentation."""
    labels = {int(value): name for value, name in output_segments}
    by_name = {_normal(name): value for value, name in labels.items()}
    matching = Matching()
    segmentation = segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        name = segment.GetName()
        value, by = None, ""
        if _tag(segment, MODEL_TAG) == model_name:
            tagged = _tag(segment, LABEL_TAG)
            if tagged is not None and tagged.strip().isdigit() and int(tagged) in labels:
                value, by = int(tagged), "tag"
            else:
                matching.reasons[name] = (f"{model_name} made it as label {tagged}, which it does not have"
                                          if tagged is not None else f"it has no {LABEL_TAG} tag")
        elif _normal(name) in by_name:
            value, by = by_name[_normal(name)], "name"
        else:
            matching.reasons[name] = ("its name is none of the model's labels ("
                                      + ", ".join(labels.values()) + ")")
        if value is None:
            matching.unmatched.append(name)
        else:
            matching.matched.append(SegmentMatch(segment_id, name, value, labels[value], by))
    for value, label_name in labels.items():
        claims = [m.segment_name for m in matching.matched if m.value == value]
        if len(claims) > 1:
            matching.problems.append(
                f"Segments {_names(claims)} all stand for label '{label_name}' ({value}); "
                "keep one of them (rename or delete the others).")
        elif not claims:
            matching.problems.append(
                f"No segment stands for label '{label_name}'; if this case has none, add an empty segment "
                f"named '{label_name}'.")
    return matching


def corrected_labels(segmentation_node, reference_volume_node, model_name: str,
                     output_segments: Sequence[Tuple[int, str]]) -> Corrections:
    """The label map of `segmentation_node`'s segments on `reference_volume_node`'s voxel grid (k, j, i):
    each matched segment's voxels carry its model label value, everything else is 0 (background)."""
    matching = match_segments(segmentation_node, model_name, output_segments)
    result = Corrections(None, [(m.segment_name, m.value, m.label_name) for m in matching.matched],
                         list(matching.unmatched), list(matching.problems), reasons=dict(matching.reasons))
    if not matching.matched:
        result.problems.insert(0, f"No segment of {segmentation_node.GetName()} stands for a label of "
                                  f"{model_name}.")
        return result
    if reference_volume_node is None or reference_volume_node.GetImageData() is None:
        result.problems.append(f"Choose the volume {segmentation_node.GetName()} was drawn on.")
        return result
    shape = tuple(reversed(reference_volume_node.GetImageData().GetDimensions()))
    masks = {m.segment_id: export_segment(segmentation_node, m.segment_id, reference_volume_node)
             for m in matching.matched}
    count = np.zeros(shape, np.uint8)
    labels = np.zeros(shape, np.uint8 if max(m.value for m in matching.matched) < 256 else np.uint16)
    for m in matching.matched:
        mask = masks[m.segment_id]
        count += mask
        labels[mask] = m.value
        if not mask.any():
            result.notes.append(f"Segment '{m.segment_name}' is empty: the model learns that this case has "
                                f"no {m.label_name}.")
    if (count > 1).any():
        for position, first in enumerate(matching.matched):
            for second in matching.matched[position + 1:]:
                shared = int(np.count_nonzero(masks[first.segment_id] & masks[second.segment_id]))
                if shared and first.value != second.value:
                    result.problems.append(
                        f"Segments '{first.segment_name}' and '{second.segment_name}' overlap in {shared} voxels; "
                        "each voxel can have one label only (erase the overlap in one of them).")
    result.labels = labels
    return result


def export_segment(segmentation_node, segment_id: str, reference_volume_node) -> np.ndarray:
    """One segment's voxels as a boolean (k, j, i) array on the reference volume's grid (transforms and a
    different segmentation resolution are handled by Slicer's export). The scene is left as it was."""
    scene = segmentation_node.GetScene()
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    labelmap.SetHideFromEditors(True)
    labelmap.SetName(scene.GenerateUniqueName("SegmentMBTFE export"))
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    scene.AddNode(labelmap)
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, reference_volume_node,
                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
            from SegmentMBTFELib.errors import InputError
            raise InputError(f"Slicer could not export segment '{_segment_name(segmentation_node, segment_id)}' "
                             f"onto {reference_volume_node.GetName()}.")
        return np.array(slicer.util.arrayFromVolume(labelmap) > 0)
    finally:
        # the export also adds a display node and a colour table: remove every node it added
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in reversed([n for n in added if n.GetID() not in before]):
            scene.RemoveNode(node)


def reference_volume(segmentation_node, scene=None):
    """The volume a segmentation was drawn on: its reference geometry volume when it names one, else the one
    scalar volume in the scene with exactly its reference grid (None when there is no such single volume)."""
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    node = segmentation_node.GetNodeReference(role)
    if node is not None and node.IsA("vtkMRMLScalarVolumeNode"):
        return node
    scene = scene or segmentation_node.GetScene()
    text = segmentation_node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    if scene is None or not text:
        return None
    grid = slicer.vtkOrientedImageData()
    if not slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, grid, False):
        return None
    matrix = vtk.vtkMatrix4x4()
    grid.GetImageToWorldMatrix(matrix)
    wanted = (_matrix(matrix), tuple(grid.GetDimensions()))
    found = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        volume = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if volume.GetClassName() != "vtkMRMLScalarVolumeNode" or volume.GetImageData() is None:
            continue  # label maps and volumes without voxels are not what anyone drew on
        volume.GetIJKToRASMatrix(matrix)
        if tuple(volume.GetImageData().GetDimensions()) == wanted[1] and np.allclose(_matrix(matrix), wanted[0],
                                                                                      atol=1e-4):
            found.append(volume)
    return found[0] if len(found) == 1 else None


# ----------------------------------------------------------------------------------------------- parts

def _normal(name: str) -> str:
    return " ".join(str(name).split()).casefold()


def _names(names: Sequence[str]) -> str:
    quoted = [f"'{n}'" for n in names]
    return ", ".join(quoted[:-1]) + " and " + quoted[-1] if len(quoted) > 1 else quoted[0]


def _tag(segment, name: str) -> Optional[str]:
    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else None


def _segment_name(segmentation_node, segment_id: str) -> str:
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    return segment.GetName() if segment is not None else segment_id


def _matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
