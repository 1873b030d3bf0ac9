"""Writing a model's label map into a segmentation node, leaving every segment the model did not make alone.

Each segment we write carries tags: `SegmentMBTFE.Model` (the model's name), `SegmentMBTFE.Label` (its
value in the model's label map) and `SegmentMBTFE.Checksum` (the exact weights). Tags travel with the
segment into .seg.nrrd files and scenes, so a later run finds "the segments this model made" even after
a save and reload, and replaces exactly those: a user's own segments and edits in other segments stay.

All segments of one run share one labelmap layer (one image, a label value per segment), as Slicer does
when it reads a .seg.nrrd: no copy per segment, and the Segment Editor edits them as usual.

The label map is on the input volume's grid, stated in the volume's own (parent-transform) coordinates; a
segmentation node stores its segments in its own. When the two sit under different transforms, the
volume-to-segmentation transform is folded into the label image's geometry, so the segments land where the
volume shows the structures. Slicer can only fold a linear transform into an image's geometry.
"""
import datetime
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from SegmentMBTFELib.errors import InputError
from SegmentMBTFELib.io.segfile import one_line

from .volumes import Geometry

MODEL_TAG = "SegmentMBTFE.Model"
LABEL_TAG = "SegmentMBTFE.Label"
CHECKSUM_TAG = "SegmentMBTFE.Checksum"
ATTRIBUTE_PREFIX = "SegmentMBTFE."
# Provenance written as node attributes (saved with the scene): engine settings key -> attribute name.
PROVENANCE = {"model": "Model", "model_path": "ModelPath", "checksum": "Checksum", "configuration": "Configuration",
              "trainer": "Trainer", "folds": "Folds", "checkpoint": "Checkpoint", "tta": "TTA",
              "step_size": "StepSize", "device": "Device", "postprocessing": "Postprocessing", "engine": "Engine"}


def model_segments(segmentation_node, model_name: str) -> List[Tuple[str, str]]:
    """(segment ID, name) of the segments this model wrote into the node, in the node's order."""
    if segmentation_node is None:
        return []
    segmentation = segmentation_node.GetSegmentation()
    found = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        if _tag(segment, MODEL_TAG) == model_name:
            found.append((segment_id, segment.GetName()))
    return found


def write_labels(segmentation_node, labels: np.ndarray, geometry: Geometry, segments: Sequence[Tuple[int, str]],
                 model_name: str, checksum: str = "", colors: Sequence = None,
                 terminology: Callable[[str], Optional[str]] = None) -> List[str]:
    """Replace this model's segments in `segmentation_node` by one segment per (label value, name).

    `labels` is the (k, j, i) label map on `geometry`'s grid. Segments of other models and the user's own
    are not touched; a replaced segment keeps its ID and place in the list, so views and the Segment
    Editor that refer to it keep working. Returns the IDs written, in label order. InputError, with the node
    left as it was, when the node and the volume are related by a transform that is not linear.
    """
    if tuple(labels.shape) != tuple(geometry.shape):
        raise ValueError(f"label map {labels.shape} does not match the volume grid {geometry.shape}")
    # First, as it may refuse: nothing in the node has changed yet.
    ijk_to_segmentation = _ijk_to_segmentation(segmentation_node, geometry)
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        _set_reference_geometry(segmentation_node, geometry.shape, ijk_to_segmentation)
    previous = {_tag(segmentation.GetSegment(i), LABEL_TAG): i for i, _ in model_segments(segmentation_node, model_name)}
    insert_before = _position_after_removal(segmentation, list(previous.values()))
    image = _oriented_image(labels, ijk_to_segmentation)
    written = []
    with _modifying(segmentation_node):
        for segment_id in previous.values():
            segmentation.RemoveSegment(segment_id)
        for value, name in segments:
            segment = _segment(image, value, name, model_name, checksum, colors, terminology)
            segment_id = previous.get(str(value)) or segmentation.GenerateUniqueSegmentID(_id_base(name))
            segmentation.AddSegment(segment, segment_id, insert_before)
            written.append(segment_id)
    return written


def record_provenance(segmentation_node, settings: Dict[str, object]) -> None:
    """Model, weights checksum, folds, TTA, device and date as node attributes (saved with the scene)."""
    for key, attribute in PROVENANCE.items():
        if key in settings:
            segmentation_node.SetAttribute(ATTRIBUTE_PREFIX + attribute, str(settings[key]))
    segmentation_node.SetAttribute(ATTRIBUTE_PREFIX + "Date", datetime.datetime.now().isoformat(timespec="seconds"))


def provenance(segmentation_node) -> Dict[str, str]:
    names = list(PROVENANCE.values()) + ["Date"]
    return {name: segmentation_node.GetAttribute(ATTRIBUTE_PREFIX + name) for name in names
            if segmentation_node.GetAttribute(ATTRIBUTE_PREFIX + name) is not None}


def show(segmentation_node, closed_surface: bool = True) -> None:
    """Display in slice views and, when the surface converter is registered (always in Slicer), in 3D."""
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    if closed_surface:
        segmentation_node.CreateClosedSurfaceRepresentation()


def segment_array(segmentation_node, segment_id: str) -> np.ndarray:
    """A segment's voxels as a 0/1 (k, j, i) array on the node's reference grid (for tests and checks).

    Reading must leave the scene as it was, so this uses the segmentations logic's merged-labelmap call,
    which makes no nodes. ExportSegmentsToLabelmapNode adds a labelmap display node, a colour table and,
    where they are missing, the segmentation's display node (whose creation recolours segments that have
    no colour) and the subject hierarchy node: removing them afterwards would not undo the recolouring.
    Needs the binary labelmap representation (what our segments and .seg.nrrd files hold)."""
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    image = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(
        segmentation_node, None, ids, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, image)
    shape = tuple(reversed(image.GetDimensions()))
    scalars = image.GetPointData().GetScalars()
    if scalars is None:
        return np.zeros(shape, np.uint8)
    return np.array(numpy_support.vtk_to_numpy(scalars).reshape(shape) > 0, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------- parts

def _segment(image, value: int, name: str, model_name: str, checksum: str, colors, terminology):
    segment = slicer.vtkSegment()
    segment.SetName(one_line(name))  # a label name with a line break would corrupt the .seg.nrrd Slicer saves
    # The name and colour are ours (the model's label name, our colours): without these flags Slicer renames
    # and recolours a segment from its terminology entry (e.g. when the terminology is set or loaded).
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)
    segment.SetLabelValue(int(value))
    if colors is not None:
        segment.SetColor(*[float(c) for c in colors[int(value) - 1]])
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), image)
    segment.SetTag(MODEL_TAG, model_name)
    segment.SetTag(LABEL_TAG, str(int(value)))
    if checksum:
        segment.SetTag(CHECKSUM_TAG, checksum)
    entry = terminology(name) if terminology else None
    if entry:
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)
    return segment


def _ijk_to_segmentation(segmentation_node, geometry: Geometry) -> vtk.vtkMatrix4x4:
    """The volume grid's IJK-to-RAS in the segmentation's coordinates (its parent transform's, not world's).

    InputError when the volume and the segmentation are related by a transform that is not linear: an
    image grid cannot follow a warp, and resampling the label map through it would change the result."""
    ijk_to_ras = geometry.matrix()
    segmentation_transform_id = segmentation_node.GetTransformNodeID() or ""
    if segmentation_transform_id == geometry.transform_node_id:
        return ijk_to_ras  # the usual case: a segmentation made for this volume shares its transform
    scene = segmentation_node.GetScene()
    volume_transform = scene.GetNodeByID(geometry.transform_node_id) if geometry.transform_node_id else None
    if geometry.transform_node_id and volume_transform is None:
        raise InputError(f"The transform that {geometry.name or 'the volume'} was under has been deleted, so the "
                         "segments cannot be placed; segment the volume again.")
    volume_to_segmentation = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
            volume_transform, segmentation_node.GetParentTransformNode(), volume_to_segmentation):
        raise InputError(f"{segmentation_node.GetName()} and {geometry.name or 'the volume'} are related by a "
                         "non-linear transform: harden the transform, or choose a segmentation under the same "
                         "transform as the volume.")
    vtk.vtkMatrix4x4.Multiply4x4(volume_to_segmentation, ijk_to_ras, ijk_to_ras)
    return ijk_to_ras


def _oriented_image(labels: np.ndarray, ijk_to_segmentation: vtk.vtkMatrix4x4):
    """One vtkOrientedImageData holding the whole label map on the input volume's grid."""
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*reversed(labels.shape))
    image.SetGeometryFromImageToWorldMatrix(ijk_to_segmentation)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR if labels.max(initial=0) < 256 else vtk.VTK_UNSIGNED_SHORT, 1)
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    scalars[:] = labels.ravel()
    return image


def _set_reference_geometry(segmentation_node, shape, ijk_to_segmentation: vtk.vtkMatrix4x4) -> None:
    """An empty segmentation takes the input's grid, so the Segment Editor edits at the input's resolution."""
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*reversed(shape))
    image.SetGeometryFromImageToWorldMatrix(ijk_to_segmentation)
    text = slicer.vtkSegmentationConverter.SerializeImageGeometry(image)
    segmentation_node.GetSegmentation().SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(), text)


def _position_after_removal(segmentation, removed_ids: List[str]) -> str:
    """The ID of the first segment after the removed ones ("" = append): new segments go where the old were."""
    if not removed_ids:
        return ""
    indices = [segmentation.GetSegmentIndex(i) for i in removed_ids]
    for index in range(min(indices) + 1, segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        if segment_id not in removed_ids:
            return segment_id
    return ""


def _id_base(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name) or "Segment"


def _tag(segment, name: str) -> Optional[str]:
    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else None


class _modifying:
    """Batch the node's modified events, so views update once instead of once per segment."""

    def __init__(self, node):
        self.node = node

    def __enter__(self):
        self.was_modifying = self.node.StartModify()

    def __exit__(self, *exc):
        self.node.EndModify(self.was_modifying)
