"""The console and batch API (SegmentMBTFELogic), the node <-> Volume conversion, and the in-Slicer self-test,
all on the real Slicer core with real files."""
import math
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

from slicer_testing import load_volume, scene_state

pytestmark = pytest.mark.timeout(300)


def test_volume_from_node_matches_simpleitk_on_an_oblique_image(scene, slicer_app, tmp_path):
    """Slicer (RAS, via its storage node) and SimpleITK (LPS) must give the engine the same voxels and grid."""
    import SimpleITK as sitk
    from SegmentMBTFELib.io.images import read_volume
    from SegmentMBTFESlicer.volumes import ras_matrix, volume_from_node, geometry_of
    c, s = math.cos(0.3), math.sin(0.3)
    image = sitk.GetImageFromArray(np.random.default_rng(1).normal(size=(7, 9, 11)).astype(np.float32))
    image.SetSpacing((0.8, 1.1, 2.5))
    image.SetOrigin((-10.5, 20.25, 3.0))
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    path = tmp_path / "oblique.nrrd"
    sitk.WriteImage(image, str(path))

    converted = volume_from_node(load_volume(scene, path))
    expected = read_volume(path)
    np.testing.assert_array_equal(converted.array, expected.array)
    for field in ("spacing", "origin", "direction"):
        assert getattr(converted, field) == pytest.approx(getattr(expected, field), abs=1e-6), field
    np.testing.assert_allclose(ras_matrix(converted), geometry_of(load_volume(scene, path)).ijk_to_ras, atol=1e-6)


def test_console_segment_returns_the_segmentation(module, scene, hippo3d_model, hippo_case):
    from SegmentMBTFELib import load_model
    from SegmentMBTFELib.io.images import read_volume
    from SegmentMBTFESlicer import segmentation
    volume = load_volume(scene, hippo_case)
    progress = []
    node = module.SegmentMBTFELogic().segment(volume, model=str(hippo3d_model), tta=False, show3D=False,
                                              progress=lambda f, text: progress.append((f, text)))
    expected = load_model(hippo3d_model).predict([read_volume(hippo_case)], tta=False)
    assert node.GetScene() is scene and node.IsA("vtkMRMLSegmentationNode")
    for index, (value, name) in enumerate(expected.segments):
        segment_id = node.GetSegmentation().GetNthSegmentID(index)
        assert node.GetSegmentation().GetSegment(segment_id).GetName() == name
        np.testing.assert_array_equal(segmentation.segment_array(node, segment_id), expected.labels.array == value)
    assert progress[-1] == (1.0, "done") and any("tile 1 of" in text for _, text in progress)
    assert [f for f, _ in progress] == sorted(f for f, _ in progress)


def test_console_finds_a_model_by_name_and_writes_into_an_existing_node(module, scene, hippo3d_model, hippo_case):
    from SegmentMBTFESlicer import catalog
    catalog.add(str(hippo3d_model))  # as "Add model folder..." does
    volume = load_volume(scene, hippo_case)
    logic = module.SegmentMBTFELogic()
    models = logic.availableModels()  # the shipped models (models/) first, then the ones the user added
    assert [m.shipped for m in models] == [True] * (len(models) - 1) + [False]
    assert models[-1].name == "Dataset901_Hippocampus (3d_fullres)"
    first = logic.segment([volume], model="Dataset901_Hippocampus (3d_fullres)", tta=False, show3D=False)
    again = logic.segment(volume, model="nnUNetTrainer__nnUNetPlans__3d_fullres", outputSegmentation=first,
                          tta=False, show3D=False)
    assert again is first and first.GetSegmentation().GetNumberOfSegments() == 2


def test_console_reports_a_wrong_model_in_one_line(module, scene, hippo_case):
    from SegmentMBTFELib.errors import ModelError
    volume = load_volume(scene, hippo_case)
    before = scene_state(scene)
    with pytest.raises(ModelError, match=r"^No model folder or model named 'nonexistent'"):
        module.SegmentMBTFELogic().segment(volume, model="nonexistent")
    assert scene_state(scene) == before


def test_console_cancel_writes_nothing(module, scene, hippo3d_model, hippo_case):
    from SegmentMBTFELib.errors import Cancelled
    volume = load_volume(scene, hippo_case)
    before = scene_state(scene)
    cancel = threading.Event()

    def cancel_at_first_tile(fraction, text):
        if "tile" in text:
            cancel.set()
    with pytest.raises(Cancelled):
        module.SegmentMBTFELogic().segment(volume, model=str(hippo3d_model), progress=cancel_at_first_tile,
                                           cancel=cancel)
    assert scene_state(scene) == before


def test_segment_files_writes_seg_nrrd_that_slicer_reads(module, scene, hippo3d_model, hippo_test_cases, tmp_path):
    import vtk
    import slicer
    from SegmentMBTFELib import load_model
    from SegmentMBTFELib.io.images import read_volume
    paths = [case[0] for case in hippo_test_cases]
    progress = []
    written = module.SegmentMBTFELogic().segmentFiles([str(p) for p in paths], str(hippo3d_model), tmp_path / "out",
                                                      tta=False, progress=lambda f, text: progress.append(text))
    assert [p.split("/")[-1] for p in written] == [p.name.replace(".nii.gz", ".seg.nrrd") for p in paths]
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0  # files only, the scene is untouched
    assert any(text.startswith(f"{paths[1].name.split('.')[0]} (2/2)") for text in progress)
    model = load_model(hippo3d_model)
    for image, seg_file in zip(paths, written):
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        storage = node.CreateDefaultStorageNode()
        storage.SetFileName(seg_file)
        assert storage.ReadData(node)
        expected = model.predict([read_volume(image)], tta=False)
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        ids = vtk.vtkStringArray()
        node.GetSegmentation().GetSegmentIDs(ids)
        slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            node, ids, labelmap, None, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(labelmap), expected.labels.array)
        names = [node.GetSegmentation().GetNthSegment(i).GetName() for i in range(2)]
        assert names == ["anterior", "posterior"]
        terminology = vtk.reference("")
        assert node.GetSegmentation().GetNthSegment(0).GetTag("TerminologyEntry", terminology)
        assert "^Hippocampus~SCT^255549009^Anterior" in str(terminology)


def test_replacing_keeps_segment_ids_places_and_other_models(slicer_app, scene, hippo_case):
    """The replacement rule on its own: only the named model's segments change."""
    from SegmentMBTFESlicer import segmentation
    from SegmentMBTFESlicer.volumes import geometry_of
    geometry = geometry_of(load_volume(scene, hippo_case))
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    labels = np.zeros(geometry.shape, np.uint8)
    labels[3:8, 4:9, 5:10] = 1
    other = segmentation.write_labels(node, labels, geometry, [(1, "liver")], "Other model")
    mine = segmentation.write_labels(node, labels * 2, geometry, [(1, "a"), (2, "b")], "My model")
    last = segmentation.write_labels(node, labels, geometry, [(1, "spleen")], "Third model")
    again = segmentation.write_labels(node, labels, geometry, [(1, "a"), (2, "b")], "My model")
    ids = [node.GetSegmentation().GetNthSegmentID(i) for i in range(4)]
    assert again == mine and ids == other + mine + last
    assert segmentation.segment_array(node, mine[0]).sum() == labels.sum()  # label 1 now, not 2
    assert segmentation.segment_array(node, mine[1]).sum() == 0
    assert segmentation.segment_array(node, other[0]).sum() == labels.sum()
    assert [i for i, _ in segmentation.model_segments(node, "My model")] == mine


def test_the_in_slicer_self_test_passes_here(module, scene, widget, tiny_model):
    """SegmentMBTFETest is what Slicer runs; it needs no download (it writes a tiny model)."""
    from SegmentMBTFELib.models.home import installed
    leftovers = lambda: set(Path(tempfile.gettempdir()).glob("SegmentMBTFETest-*"))  # noqa: E731
    before = leftovers()
    test = module.SegmentMBTFETest()
    test.runTest()
    assert {m.source for m in installed()} == {"shipped"}  # its temporary model is not left in the list
    assert leftovers() == before  # nor its temporary files
