"""Uncertainty in Slicer: Segment with "Uncertainty" ticked leaves the entropy and disagreement maps as volumes
over the image (our colour table, a colour legend, the foreground of the slice views) and a table per segment;
the maps are the engine's own, the table's volumes are the segments' voxel counts times the voxel volume, and
a second Segment updates the same nodes."""
import json
from pathlib import Path

import numpy as np
import pytest

from slicer_testing import load_volume, wait_for_panel

pytestmark = pytest.mark.timeout(300)
SHIPPED_MODEL = Path(__file__).resolve().parents[3] / "models" / "hippocampus_nnunet"


def table_rows(node):
    table = node.GetTable()
    names = [table.GetColumn(c).GetName() for c in range(table.GetNumberOfColumns())]
    return [{name: table.GetValue(r, c).ToString() for c, name in enumerate(names)} for r in range(table.GetNumberOfRows())]


def test_segment_with_uncertainty_shows_the_maps_and_the_table(widget, scene, shared_data):
    import slicer
    from SegmentMBTFELib import load_model, read_volume
    from SegmentMBTFESlicer import segmentation
    case = json.loads((SHIPPED_MODEL / "results.json").read_text())["validation_cases"][0]
    image = shared_data / "hippocampus" / "train" / "images" / f"{case}.nii.gz"
    volume = load_volume(scene, image)
    view = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")  # a slice view's layers, as Slicer has
    view.SetBackgroundVolumeID(volume.GetID())
    widget.segment.addModelFolder(str(SHIPPED_MODEL))
    widget.ui.uncertaintyCheckBox.setChecked(True)
    assert widget.logic.getParameterNode().uncertainty

    for _run in range(2):  # the second run updates the same nodes
        widget.segment.confirm = lambda question: True
        widget.ui.segmentButton.click()
        wait_for_panel(widget)
        assert widget.ui.statusLabel.text().startswith("Done"), widget.ui.statusLabel.text()
    node = widget.ui.outputSegmentationSelector.currentNode()
    expected = load_model(SHIPPED_MODEL).predict([read_volume(image)], tta=True, uncertainty=True)
    maps = {name: node.GetNodeReference(f"SegmentMBTFE.{name}") for name in ("entropy", "disagreement")}
    for name, map_node in maps.items():
        np.testing.assert_allclose(slicer.util.arrayFromVolume(map_node), expected.uncertainty[name].array, atol=1e-6)
        assert map_node.GetDisplayNode().GetColorNode().GetName() == "SegmentMBTFE uncertainty"
        assert slicer.modules.colors.logic().GetColorLegendDisplayNode(map_node) is not None
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 3  # the image and the two maps, once
    assert view.GetForegroundVolumeID() == maps["entropy"].GetID() and view.GetForegroundOpacity() == 0.5

    rows = table_rows(node.GetNodeReference("SegmentMBTFE.table"))
    assert [r["Segment"] for r in rows] == ["anterior", "posterior"]
    spacing = np.prod(volume.GetSpacing())
    for row, index in zip(rows, range(2)):
        voxels = segmentation.segment_array(node, node.GetSegmentation().GetNthSegmentID(index)).sum()
        assert float(row["Volume (mL)"]) == pytest.approx(voxels * spacing / 1000)
        assert 0.5 < float(row["Mean probability"]) <= 1 and 0 <= float(row["Mean uncertainty"]) < 0.5
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1


def test_the_colour_table_is_made_without_deprecated_calls(slicer_app, scene):
    """Slicer 5.10 logs an error for SetNamesInitialised (vtkMRMLColorNode.h: deprecated, no effect); before 5.10
    it is what keeps the colours from being renamed. slicer-core here is 5.10's kind."""
    import vtk
    from SegmentMBTFESlicer import uncertainty_display
    messages = vtk.vtkStringOutputWindow()
    previous = vtk.vtkOutputWindow.GetInstance()
    vtk.vtkOutputWindow.SetInstance(messages)
    try:
        node = uncertainty_display._color_node(scene)
    finally:
        vtk.vtkOutputWindow.SetInstance(previous)
    assert messages.GetOutput() == ""
    assert node.GetNumberOfColors() == 256 and all(node.GetColorDefined(i) for i in range(256))

