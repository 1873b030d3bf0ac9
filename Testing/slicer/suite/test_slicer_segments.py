"""Segments as a real Slicer holds them: terminology Slicer can look up, names and colours Slicer leaves
alone, segments placed right when the segmentation sits under another transform than the volume, and
reading a segment back without leaving nodes in the scene. All on the real Slicer core (slicer-core).
"""
import numpy as np
import pytest
import vtk

from slicer_testing import scene_state

LABELS = [(1, "anterior"), (2, "posterior")]
MODEL = "Dataset004_Hippocampus"


# ------------------------------------------------------------------------------------------------ helpers

def model_labels(shape=(6, 7, 8)) -> np.ndarray:
    """Two small, lopsided blobs (a misplaced copy never matches)."""
    labels = np.zeros(shape, np.uint8)
    labels[1:4, 2:5, 1:4] = 1
    labels[2, 2, 2] = 0
    labels[3:5, 1:3, 4:7] = 2
    return labels


def add_volume(shape=(6, 7, 8), name="hippocampus"):
    """A real scalar volume node with an anisotropic grid away from the origin."""
    import slicer
    ijk_to_ras = np.diag([0.8, 0.9, 1.5, 1.0])
    ijk_to_ras[:3, 3] = (-12.0, 7.5, 30.25)
    return slicer.util.addVolumeFromArray(np.zeros(shape, np.int16), ijk_to_ras, name)


def linear_transform(scene, angle_degrees, translation, name):
    """A linear transform node: a rotation about an oblique axis, then a translation (mm)."""
    import slicer
    transform = vtk.vtkTransform()
    transform.PostMultiply()
    transform.RotateWXYZ(angle_degrees, 0.3, 0.5, 1.0)
    transform.Translate(*translation)
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(transform.GetMatrix())
    assert isinstance(node, slicer.vtkMRMLLinearTransformNode)
    return node


def warping_transform(scene):
    """A transform node holding a thin-plate spline: not linear, so no matrix describes it."""
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for corner in [(x, y, z) for x in (-50, 50) for y in (-50, 50) for z in (-50, 50)] + [(0, 0, 0)]:
        source.InsertNextPoint(*corner)
        target.InsertNextPoint(*(c + (3.0 if corner == (0, 0, 0) else 0.0) for c in corner))
    spline = vtk.vtkThinPlateSplineTransform()
    spline.SetSourceLandmarks(source)
    spline.SetTargetLandmarks(target)
    spline.SetBasisToR()
    node = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    node.SetAndObserveTransformToParent(spline)
    assert not node.IsLinear()
    return node


def exported_in_volume_grid(segmentation_node, segment_id, volume):
    """The segment resampled by Slicer into the volume's grid, transforms of both nodes accounted for."""
    import slicer
    labelmap = segmentation_node.GetScene().AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap,
                                                                                  volume)
    return slicer.util.arrayFromVolume(labelmap) > 0


def terminologies_logic_with_our_file():
    import slicer
    from SegmentMBTFELib.io.terminology import TERMINOLOGY_FILE, context_name
    logic = slicer.vtkSlicerTerminologiesModuleLogic()  # no scene: Slicer's own lists stay unloaded
    assert logic.LoadTerminologyFromFile(str(TERMINOLOGY_FILE)) == context_name()
    return logic


def same_code(a, b) -> bool:
    """Slicer matches codes by coding scheme and value; we check the meaning too."""
    return (a.GetCodingSchemeDesignator(), a.GetCodeValue(), a.GetCodeMeaning()) == \
        (b.GetCodingSchemeDesignator(), b.GetCodeValue(), b.GetCodeMeaning())


def find_in_context(logic, entry):
    """(category, type, modifier or None) in the loaded context that match `entry`; None where one is missing.
    Looked up by index, as SlicerTotalSegmentator does from Python: the logic's lookups by code
    (GetCategoryInTerminology, ...) take a C++ CodeIdentifier that Python cannot pass."""
    import slicer
    context = entry.GetTerminologyContextName()
    category, type_, modifier = (slicer.vtkSlicerTerminologyCategory(), slicer.vtkSlicerTerminologyType(),
                                 slicer.vtkSlicerTerminologyType())
    if not any(logic.GetNthCategoryInTerminology(context, i, category)
               and same_code(category, entry.GetCategoryObject())
               for i in range(logic.GetNumberOfCategoriesInTerminology(context))):
        return None
    if not any(logic.GetNthTypeInTerminologyCategory(context, category, i, type_)
               and same_code(type_, entry.GetTypeObject())
               for i in range(logic.GetNumberOfTypesInTerminologyCategory(context, category))):
        return None
    if not entry.GetTypeModifierObject().GetCodeValue():
        return category, type_, None
    if not any(logic.GetNthTypeModifierInTerminologyType(context, category, type_, i, modifier)
               and same_code(modifier, entry.GetTypeModifierObject())
               for i in range(logic.GetNumberOfTypeModifiersInTerminologyType(context, category, type_))):
        return None
    return category, type_, modifier


# ------------------------------------------------------------------------------------------------ terminology

@pytest.mark.parametrize("name, model_context, slicer_label", [
    ("anterior", MODEL, "anterior hippocampus"),
    ("posterior", MODEL, "posterior hippocampus"),
    ("left_kidney", "", "left kidney"),
    ("kidney right", "", "right kidney"),
    ("liver", "", "liver"),
    ("tumour", "Dataset003_Liver", "neoplasm"),
    ("urinary bladder", "", "urinary bladder"),
    ("small bowel", "", "small bowel"),
    ("inferior vena cava", "", "inferior vena cava"),
    ("lung_left", "", "left lung"),
])
def test_slicer_finds_every_entry_in_our_loaded_context(slicer_app, name, model_context, slicer_label):
    """Slicer's own terminology logic parses each entry and finds its category, type and modifier in the
    context it names, once our file is loaded (Segment Editor shows nothing for an entry it cannot find)."""
    import slicer
    from SegmentMBTFELib.io.terminology import terminology_for
    logic = terminologies_logic_with_our_file()
    entry = slicer.vtkSlicerTerminologyEntry()
    assert logic.DeserializeTerminologyEntry(terminology_for(name, model_context), entry)
    assert logic.IsTerminologyContextLoaded(entry.GetTerminologyContextName())
    found = find_in_context(logic, entry)
    assert found is not None, f"{name}: {terminology_for(name, model_context)} is not in the loaded context"
    # The entry names what Slicer's label lookup finds for the structure's 3dSlicerLabel.
    by_label = slicer.vtkSlicerTerminologyEntry()
    assert logic.FindTypeInTerminologyBy3dSlicerLabel(entry.GetTerminologyContextName(), slicer_label, by_label)
    assert same_code(by_label.GetCategoryObject(), entry.GetCategoryObject())
    assert same_code(by_label.GetTypeObject(), entry.GetTypeObject())
    assert (by_label.GetTypeModifierObject().GetCodeValue() or None) == \
        (entry.GetTypeModifierObject().GetCodeValue() or None)
    # Slicer takes the recommended colour from the loaded context (the modifier's where there is one).
    _, type_, modifier = found
    assert (modifier or type_).GetRecommendedDisplayRGBValue() != (127, 127, 127)  # Slicer's "no colour" grey


def test_load_into_slicer_loads_our_context_into_the_terminologies_module(scene, monkeypatch):
    import slicer
    from SegmentMBTFESlicer import terminology
    logic = slicer.modules.terminologies.logic()
    assert not logic.IsTerminologyContextLoaded(terminology.context_name())
    assert terminology.load_into_slicer()
    assert logic.IsTerminologyContextLoaded(terminology.context_name())
    assert logic.GetNumberOfCategoriesInTerminology(terminology.context_name()) == 2
    assert terminology.load_into_slicer()  # again (module reload): replaces, still loaded
    monkeypatch.delattr(slicer.modules, "terminologies")
    assert not terminology.load_into_slicer()  # Slicer without the Terminologies module: nothing to do


# ------------------------------------------------------------------------------------------------ names, colours

def test_segments_keep_the_names_and_colours_we_give_them(scene, tmp_path):
    """Segments are written with name and colour marked as not auto-generated, so Slicer never replaces
    them from the terminology entry; the flags survive Slicer's own .seg.nrrd writer and reader."""
    from SegmentMBTFESlicer import segmentation
    from SegmentMBTFELib.io.terminology import terminology_for
    from SegmentMBTFESlicer.volumes import geometry_of
    volume = add_volume()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "output")
    colors = [(0.1, 0.2, 0.3), (0.9, 0.8, 0.7)]
    ids = segmentation.write_labels(node, model_labels(), geometry_of(volume), LABELS, MODEL, colors=colors,
                                    terminology=lambda label: terminology_for(label, MODEL))
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(tmp_path / "output.seg.nrrd"))
    assert storage.WriteData(node)
    reloaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    assert storage.ReadData(reloaded)
    for written in (node, reloaded):
        for segment_id, (value, name), color in zip(ids, LABELS, colors):
            segment = written.GetSegmentation().GetSegment(segment_id)
            assert (segment.GetNameAutoGenerated(), segment.GetColorAutoGenerated()) == (False, False)
            assert segment.GetName() == name and segment.GetColor() == pytest.approx(color)
            assert segment.GetTerminology() == terminology_for(name, MODEL)


def test_label_names_with_line_breaks_cannot_corrupt_the_file_slicer_saves(scene, tmp_path):
    """A dataset.json label name holding a line break or an escape character becomes one line in Slicer, so
    the .seg.nrrd Slicer writes keeps its header (one name per segment, nothing forged)."""
    from SegmentMBTFESlicer import segmentation
    from SegmentMBTFESlicer.volumes import geometry_of
    volume = add_volume()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "output")
    hostile = [(1, "left\nSegment9_Name:=forged"), (2, "right\x1b[31m part")]
    ids = segmentation.write_labels(node, model_labels(), geometry_of(volume), hostile, MODEL)
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(tmp_path / "output.seg.nrrd"))
    assert storage.WriteData(node)
    reloaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    assert storage.ReadData(reloaded)
    names = [reloaded.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(reloaded.GetSegmentation().GetNumberOfSegments())]
    assert names == ["left Segment9_Name:=forged", "right [31m part"]
    assert [node.GetSegmentation().GetSegment(i).GetName() for i in ids] == names


# ------------------------------------------------------------------------------------------------ transforms

@pytest.mark.parametrize("volume_moved", [False, True], ids=["volume in world", "volume under its own transform"])
def test_segments_land_on_the_volume_when_the_segmentation_is_under_another_transform(scene, volume_moved):
    """An existing segmentation under a linear transform (rotation and translation), the volume in world
    coordinates or under another linear transform: Slicer, resampling each segment into the volume's grid,
    gets back exactly the label map the model wrote for that grid."""
    from SegmentMBTFESlicer import segmentation
    from SegmentMBTFESlicer.volumes import geometry_of
    volume = add_volume()
    if volume_moved:
        volume.SetAndObserveTransformNodeID(linear_transform(scene, 20.0, (1.6, -0.9, 3.0), "volume moved").GetID())
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "existing")
    node.SetAndObserveTransformNodeID(linear_transform(scene, 35.0, (4.0, 2.5, -6.0), "registration").GetID())
    labels = model_labels()
    first = segmentation.write_labels(node, labels, geometry_of(volume), LABELS, MODEL)
    moved = np.roll(labels, 1, axis=2)
    ids = segmentation.write_labels(node, moved, geometry_of(volume), LABELS, MODEL)  # a second run: in place
    assert ids == first
    for segment_id, (value, _) in zip(ids, LABELS):
        # the segmentation's own grid (taken from the volume) is the volume's grid in its coordinates
        np.testing.assert_array_equal(segmentation.segment_array(node, segment_id), moved == value)
    if volume_moved:
        # Slicer's export between two transformed nodes takes its approximate, non-linear path (its
        # vtkOrientedImageDataResample::IsTransformLinear does not see through the inverse transform in the
        # concatenation), so move both into world coordinates first: hardening a linear transform is exact.
        node.HardenTransform()
        volume.HardenTransform()
    for segment_id, (value, _) in zip(ids, LABELS):
        np.testing.assert_array_equal(exported_in_volume_grid(node, segment_id, volume), moved == value)


def test_a_non_linear_transform_between_volume_and_segmentation_is_refused(scene):
    """A warp cannot be folded into an image grid: one clear sentence, and the segmentation unchanged."""
    from SegmentMBTFELib.errors import InputError
    from SegmentMBTFESlicer import segmentation
    from SegmentMBTFESlicer.volumes import geometry_of
    volume = add_volume()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "existing")
    segmentation.write_labels(node, model_labels(), geometry_of(volume), LABELS, MODEL)  # an earlier run
    node.SetAndObserveTransformNodeID(warping_transform(scene).GetID())
    before = scene_state(scene)
    with pytest.raises(InputError, match="non-linear transform: harden the transform, or choose a segmentation "
                                         "under the same transform as the volume") as raised:
        segmentation.write_labels(node, np.roll(model_labels(), 1, axis=0), geometry_of(volume), LABELS, MODEL)
    assert str(raised.value).count(".") == 1  # one sentence
    assert scene_state(scene) == before


# ------------------------------------------------------------------------------------------------ reading back

def test_segment_array_leaves_the_scene_as_it_was(scene):
    """Reading a segment back exports it through a labelmap node; nothing of that stays in the scene."""
    from SegmentMBTFESlicer import segmentation
    from SegmentMBTFESlicer.volumes import geometry_of
    volume = add_volume()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "output")
    labels = model_labels()
    ids = segmentation.write_labels(node, labels, geometry_of(volume), LABELS, MODEL)
    count, before = scene.GetNumberOfNodes(), scene_state(scene)
    for _ in range(2):
        for segment_id, (value, _) in zip(ids, LABELS):
            np.testing.assert_array_equal(segmentation.segment_array(node, segment_id), labels == value)
    assert scene.GetNumberOfNodes() == count
    assert scene_state(scene) == before
    # with a display node already there (as in Slicer), that one stays
    segmentation.show(node, closed_surface=False)
    count, before = scene.GetNumberOfNodes(), scene_state(scene)
    segmentation.segment_array(node, ids[0])
    assert scene.GetNumberOfNodes() == count and scene_state(scene) == before
    assert node.GetDisplayNode() is not None
