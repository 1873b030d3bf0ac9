"""The uncertainty maps in the scene: volumes over the image with a colour legend, and a table per segment.

    maps, table = show(result, geometry, scene, segmentation_node)

Each map (entropy; disagreement when there were several passes) becomes a scalar volume on the input's grid
named "<segmentation> entropy", shown in every slice view as the foreground layer, semi-transparent, with a
colour scale from clear (certain) to yellow and red (no idea) and a colour legend; the table lists each
segment's volume in mL, its mean probability, its mean entropy and the fraction of its voxels above 0.5.
A later Segment into the same segmentation updates these nodes (found through node references of the
segmentation), never nodes of the user's.
"""
import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from .volumes import Geometry

REFERENCE = "SegmentMBTFE.{name}"           # segmentation -> its map volume / table
COLOR_NODE = "SegmentMBTFE uncertainty"
COLUMNS = (("Segment", "segment"), ("Volume (mL)", "volume_ml"), ("Mean probability", "mean_probability"),
           ("Mean uncertainty", "mean_uncertainty"), ("Uncertain fraction", "uncertain_fraction"))


def show(result, geometry: Geometry, scene, segmentation_node):
    """Create or update the map volumes and the table of `segmentation_node`; returns ({name: node}, table)."""
    maps = {name: _map_volume(scene, segmentation_node, name, np.asarray(array, np.float32), geometry)
            for name, array in result.uncertainty.items()}
    table = _table(scene, segmentation_node, result.statistics)
    if "entropy" in maps:
        _overlay(scene, maps["entropy"])
    return maps, table


def _map_volume(scene, segmentation_node, name: str, array: np.ndarray, geometry: Geometry):
    role = REFERENCE.format(name=name)
    node = segmentation_node.GetNodeReference(role)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                       scene.GenerateUniqueName(f"{segmentation_node.GetName()} {name}"))
        segmentation_node.SetNodeReferenceID(role, node.GetID())
    node.SetIJKToRASMatrix(geometry.matrix())
    image = vtk.vtkImageData()
    image.SetDimensions(*reversed(array.shape))
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True,
                                                               array_type=vtk.VTK_FLOAT))
    node.SetAndObserveImageData(image)
    if geometry.transform_node_id:
        node.SetAndObserveTransformNodeID(geometry.transform_node_id)
    _display(scene, node)
    return node


def _display(scene, node) -> None:
    """0 (certain) .. 1 on a fixed scale with our colour table; a colour legend where Slicer can make one."""
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(_color_node(scene).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    colors = getattr(slicer.modules, "colors", None)
    if colors is not None and colors.logic() is not None:
        colors.logic().AddDefaultColorLegendDisplayNode(node)


def _color_node(scene):
    """Clear at 0 (certain) through yellow to red at 1, made once per scene."""
    node = scene.GetFirstNodeByName(COLOR_NODE)
    if node is not None:
        return node
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", COLOR_NODE)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    for i in range(256):
        t = i / 255.0
        node.SetColor(i, 1.0, max(0.0, 1.0 - max(0.0, t - 0.5) * 2), 0.0, min(1.0, 2 * t))  # opacity rises to 1
    if not hasattr(node, "SetColorDefined"):
        # Slicer before 5.10 would otherwise replace the colours' names with generated ones when first asked
        # for one; 5.10 marks each colour set as defined, keeps names as they are, and logs an error for this.
        node.SetNamesInitialised(True)
    return node


def _overlay(scene, node, opacity: float = 0.5) -> None:
    """The map as the foreground layer of every slice view (what slicer.util.setSliceViewerLayers does)."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        composite.SetForegroundVolumeID(node.GetID())
        composite.SetForegroundOpacity(opacity)


def _table(scene, segmentation_node, rows):
    role = REFERENCE.format(name="table")
    node = segmentation_node.GetNodeReference(role)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode",
                                       scene.GenerateUniqueName(f"{segmentation_node.GetName()} uncertainty"))
        segmentation_node.SetNodeReferenceID(role, node.GetID())
    table = vtk.vtkTable()
    for title, key in COLUMNS:
        column = vtk.vtkStringArray() if key == "segment" else vtk.vtkDoubleArray()
        column.SetName(title)
        for row in rows:
            value = row.get(key)
            column.InsertNextValue(str(value)) if key == "segment" else \
                column.InsertNextValue(float("nan") if value is None else float(value))
        table.AddColumn(column)
    node.SetAndObserveTable(table)
    return node
