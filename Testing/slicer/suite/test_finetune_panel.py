"""Fine-tuning from the panel: corrected segments -> the model's label map (corrections.py), and the Fine-tune
section driving a real fine-tune of the shipped model on a real case in a real scene, in real Qt.

The user's segments are only read: every test that fine-tunes checks them voxel by voxel afterwards, and the
shipped model's files byte by byte."""
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from slicer_testing import load_volume, scene_state, wait_for, wait_for_panel

pytestmark = pytest.mark.timeout(600)

SHIPPED_MODEL = Path(__file__).resolve().parents[3] / "models" / "hippocampus_nnunet"
MODEL_NAME = "Dataset999_Test (3d_fullres)"
LABELS = [(1, "anterior"), (2, "posterior")]
SHAPE = (12, 14, 16)


# ------------------------------------------------------------------------------------ corrections.py

def small_volume(scene, name="case"):
    import slicer
    volume = slicer.util.addVolumeFromArray(np.zeros(SHAPE, np.float32), name=name)
    volume.SetSpacing(1.0, 1.2, 1.5)
    volume.SetOrigin(-3.0, 4.0, 10.0)
    return volume


def model_labels():
    """A label map as a model would write it: anterior (1) and posterior (2) side by side."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[3:8, 4:9, 2:7] = 1
    labels[3:8, 4:9, 7:12] = 2
    return labels


def segmented(scene, volume, model_name=MODEL_NAME):
    """A segmentation node as the Segment button leaves it: tagged segments in one shared labelmap layer."""
    from SegmentMBTFESlicer import segmentation
    from SegmentMBTFESlicer.volumes import geometry_of
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "case segmentation")
    node.CreateDefaultDisplayNodes()
    segmentation.write_labels(node, model_labels(), geometry_of(volume), LABELS, model_name)
    return node


def add_segment(node, volume, name, voxels):
    import slicer
    segment_id = node.GetSegmentation().AddEmptySegment("", name)
    if voxels is not None:
        slicer.util.updateSegmentBinaryLabelmapFromArray(voxels.astype(np.uint8), node, segment_id, volume)
    return segment_id


def segment_id(node, name):
    return node.GetSegmentation().GetSegmentIdBySegmentName(name)


def test_segments_the_model_made_map_by_their_tags_even_when_renamed(scene, slicer_app):
    from SegmentMBTFESlicer.corrections import corrected_labels
    volume = small_volume(scene)
    node = segmented(scene, volume)
    node.GetSegmentation().GetSegment(segment_id(node, "anterior")).SetName("front part")
    before = scene_state(scene)

    found = corrected_labels(node, volume, MODEL_NAME, LABELS)

    assert found.usable, found.report()
    assert found.matched == [("front part", 1, "anterior"), ("posterior", 2, "posterior")]
    assert found.unmatched == [] and found.problems == []
    np.testing.assert_array_equal(found.labels, model_labels())
    assert scene_state(scene) == before  # read only: no temporary node, no changed segment left behind


def test_segments_map_by_name_when_no_tag_names_this_model(scene, slicer_app):
    from SegmentMBTFESlicer.corrections import corrected_labels
    volume = small_volume(scene)
    node = segmented(scene, volume, model_name="Dataset123_Other (3d_fullres)")  # another model's tags
    node.GetSegmentation().GetSegment(segment_id(node, "anterior")).SetName("  Anterior ")
    node.GetSegmentation().RemoveSegment(segment_id(node, "posterior"))
    user = np.zeros(SHAPE, bool)
    user[9:11, 2:4, 2:4] = True
    add_segment(node, volume, "POSTERIOR", (model_labels() == 2) | user)  # the user's own, named as a label

    found = corrected_labels(node, volume, MODEL_NAME, LABELS)

    assert found.usable, found.report()
    assert found.matched == [("  Anterior ", 1, "anterior"), ("POSTERIOR", 2, "posterior")]
    expected = model_labels()
    expected[user] = 2
    np.testing.assert_array_equal(found.labels, expected)


def test_a_segment_that_matches_no_label_is_reported_and_left_out(scene, slicer_app):
    from SegmentMBTFESlicer.corrections import corrected_labels, match_segments
    volume = small_volume(scene)
    node = segmented(scene, volume)
    lesion = np.zeros(SHAPE, bool)
    lesion[0:2, 0:3, 0:3] = True
    add_segment(node, volume, "my lesion", lesion)

    found = corrected_labels(node, volume, MODEL_NAME, LABELS)

    assert found.usable and found.unmatched == ["my lesion"]
    assert "Segment 'my lesion' is not used: its name is none of the model's labels (anterior, posterior)." \
        in found.report()
    np.testing.assert_array_equal(found.labels, model_labels())  # its voxels stay background: never guessed
    assert "Not used: 'my lesion'" in match_segments(node, MODEL_NAME, LABELS).summary()


def test_two_segments_for_one_label_is_a_problem(scene, slicer_app):
    from SegmentMBTFESlicer.corrections import corrected_labels
    volume = small_volume(scene)
    node = segmented(scene, volume)
    extra = np.zeros(SHAPE, bool)
    extra[9:11, 9:11, 9:11] = True
    add_segment(node, volume, "Anterior", extra)

    found = corrected_labels(node, volume, MODEL_NAME, LABELS)

    assert not found.usable
    assert found.problems == ["Segments 'anterior' and 'Anterior' all stand for label 'anterior' (1); keep one of "
                              "them (rename or delete the others)."]


def test_overlapping_segments_are_a_problem(scene, slicer_app):
    import slicer
    from SegmentMBTFESlicer.corrections import corrected_labels
    volume = small_volume(scene)
    node = segmented(scene, volume)
    posterior = model_labels() == 2
    posterior[3:5, 4:6, 5:7] = True  # 2 x 2 x 2 voxels painted over anterior
    # Painting with "overwrite other segments" off: the segment moves to its own layer and overlaps.
    node.GetSegmentation().SeparateSegmentLabelmap(segment_id(node, "posterior"))
    slicer.util.updateSegmentBinaryLabelmapFromArray(posterior.astype(np.uint8), node, segment_id(node, "posterior"),
                                                     volume)

    found = corrected_labels(node, volume, MODEL_NAME, LABELS)

    assert not found.usable
    assert found.problems == ["Segments 'anterior' and 'posterior' overlap in 8 voxels; each voxel can have one "
                              "label only (erase the overlap in one of them)."]


def test_a_missing_label_is_a_problem_and_an_empty_segment_says_absent(scene, slicer_app):
    from SegmentMBTFESlicer.corrections import corrected_labels
    volume = small_volume(scene)
    node = segmented(scene, volume)
    node.GetSegmentation().RemoveSegment(segment_id(node, "posterior"))

    missing = corrected_labels(node, volume, MODEL_NAME, LABELS)
    assert not missing.usable
    assert missing.problems == ["No segment stands for label 'posterior'; if this case has none, add an empty "
                                "segment named 'posterior'."]

    add_segment(node, volume, "posterior", None)
    empty = corrected_labels(node, volume, MODEL_NAME, LABELS)
    assert empty.usable, empty.report()
    assert empty.notes == ["Segment 'posterior' is empty: the model learns that this case has no posterior."]
    np.testing.assert_array_equal(empty.labels, np.where(model_labels() == 1, 1, 0))


def test_a_segment_tagged_with_a_label_the_model_lacks_is_not_guessed(scene, slicer_app):
    from SegmentMBTFESlicer.corrections import corrected_labels
    from SegmentMBTFESlicer.segmentation import LABEL_TAG
    volume = small_volume(scene)
    node = segmented(scene, volume)
    node.GetSegmentation().GetSegment(segment_id(node, "posterior")).SetTag(LABEL_TAG, "7")

    found = corrected_labels(node, volume, MODEL_NAME, LABELS)

    assert found.unmatched == ["posterior"]  # even though its name matches: the tag says otherwise
    assert f"{MODEL_NAME} made it as label 7, which it does not have" in found.report()
    assert not found.usable  # and label 2 now has no segment


def test_nothing_matching_at_all(scene, slicer_app):
    from SegmentMBTFESlicer.corrections import corrected_labels
    volume = small_volume(scene)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Mine")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    add_segment(node, volume, "Segment_1", model_labels() > 0)
    found = corrected_labels(node, volume, MODEL_NAME, LABELS)
    assert not found.usable and found.labels is None
    assert found.problems[0] == f"No segment of Mine stands for a label of {MODEL_NAME}."


def test_labels_follow_the_chosen_volume_grid(scene, slicer_app):
    """Segments drawn on one grid, exported onto a finer volume covering the same space."""
    import slicer
    from SegmentMBTFESlicer.corrections import corrected_labels
    volume = small_volume(scene)
    node = segmented(scene, volume)
    finer = slicer.util.addVolumeFromArray(np.zeros(tuple(2 * n for n in SHAPE), np.float32), name="finer")
    finer.SetSpacing(0.5, 0.6, 0.75)
    finer.SetOrigin(-3.25, 3.7, 9.625)  # voxel centres halfway: the same box as the coarse grid
    found = corrected_labels(node, finer, MODEL_NAME, LABELS)
    assert found.labels.shape == finer.GetImageData().GetDimensions()[::-1]
    expected = model_labels().repeat(2, 0).repeat(2, 1).repeat(2, 2)
    assert np.mean(found.labels == expected) > 0.99


def test_reference_volume_of_a_segmentation(scene, slicer_app):
    from SegmentMBTFESlicer.corrections import reference_volume
    volume = small_volume(scene)
    other = small_volume(scene, "other grid")
    other.SetSpacing(2.0, 2.0, 2.0)
    node = segmented(scene, volume)  # no reference node: found by its grid
    assert reference_volume(node) is volume
    drawn = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    drawn.SetReferenceImageGeometryParameterFromVolumeNode(other)  # Segment Editor's source volume
    assert reference_volume(drawn) is other
    twin = small_volume(scene, "same grid")
    assert reference_volume(node) is None  # two volumes on that grid: not guessed
    assert twin is not None


# ------------------------------------------------------------------------------------ the Fine-tune section

@pytest.fixture
def versions_home(tmp_path, monkeypatch):
    """Versions are written here, not into the user's data folder."""
    home = tmp_path / "home"
    monkeypatch.setenv("SEGMENTMBTFE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def real_case(shared_data):
    """A real hippocampus MR case the shipped model never trained on, with its expert label map."""
    import json
    case = json.loads((SHIPPED_MODEL / "results.json").read_text())["validation_cases"][0]
    folder = shared_data / "hippocampus" / "train"
    image, labels = folder / "images" / f"{case}.nii.gz", folder / "labels" / f"{case}.nii.gz"
    if not (image.is_file() and labels.is_file()):
        pytest.skip(f"the hippocampus case {case} is not in {folder}")
    return image, labels


def file_hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def segment_arrays(node) -> dict:
    from SegmentMBTFESlicer.segmentation import segment_array
    segmentation = node.GetSegmentation()
    return {segmentation.GetNthSegmentID(i): (segmentation.GetNthSegment(i).GetName(),
                                              segment_array(node, segmentation.GetNthSegmentID(i)))
            for i in range(segmentation.GetNumberOfSegments())}


def same_segments(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k][0] == b[k][0] and np.array_equal(a[k][1], b[k][1]) for k in a)


def wait_for_finetune(widget, timeout=400.0, until=None):
    wait_for(lambda: not widget.finetune.running or bool(until and until()), timeout,
             "the fine-tune (" + widget.ui.finetuneStatusLabel.text() + ")")


def select_shipped_model(widget):
    index = next(i for i in range(widget.ui.modelSelector.count())
                 if Path(str(widget.ui.modelSelector.itemData(i))).resolve() == SHIPPED_MODEL.resolve())
    widget.ui.modelSelector.setCurrentIndex(index)
    return widget.segment.currentModel()


def corrected_case(scene, real_case, name="corrected"):
    """The case loaded, and a segmentation as Segment leaves it (tagged segments) holding the expert labels
    with a slab of posterior erased: a correction the user made in Segment Editor."""
    import SimpleITK as sitk
    import slicer
    from SegmentMBTFESlicer import segmentation
    from SegmentMBTFESlicer.volumes import geometry_of
    volume = load_volume(scene, real_case[0])
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(real_case[1]))).astype(np.uint8)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    segmentation.write_labels(node, truth, geometry_of(volume), [(1, "anterior"), (2, "posterior")],
                              "Dataset904_Hippocampus (3d_fullres)")
    node.SetNodeReferenceID(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole(), volume.GetID())
    return volume, node


def test_the_panel_fine_tunes_the_shipped_model_on_a_corrected_case(widget, scene, real_case, versions_home):
    import slicer
    from SegmentMBTFELib.models.versions import ModelVersions
    from SegmentMBTFESlicer import segmentation
    shipped_before = file_hashes(SHIPPED_MODEL)
    volume = load_volume(scene, real_case[0])
    model = select_shipped_model(widget)
    widget.ui.ttaCheckBox.setChecked(False)
    assert not widget.ui.finetuneButton.isEnabled()
    assert widget.ui.finetuneButton.toolTip() == "Choose the corrected segmentation."
    assert [widget.ui.versionsList.item(i).text() for i in range(widget.ui.versionsList.count())] == \
        ["original (read-only)  \u2190 current"]

    # Segment the case through the panel: the Fine-tune section takes the result as the case to correct.
    widget.ui.segmentButton.click()
    wait_for_panel(widget)
    node = widget.ui.outputSegmentationSelector.currentNode()
    assert node is not None, widget.ui.statusLabel.text()
    assert widget.ui.finetuneSegmentationSelector.currentNode() is node
    assert widget.ui.finetuneVolumeSelector.currentNode() is volume  # its reference volume

    # The user's corrections in Segment Editor: erase a slab of posterior, add a segment of their own.
    posterior_id = node.GetSegmentation().GetSegmentIdBySegmentName("posterior")
    posterior = segmentation.segment_array(node, posterior_id)
    erased = posterior.copy()
    erased[: posterior.shape[0] // 2 + 2] = 0
    assert 0 < erased.sum() < posterior.sum()
    slicer.util.updateSegmentBinaryLabelmapFromArray(erased, node, posterior_id, volume)
    lesion_id = node.GetSegmentation().AddEmptySegment("", "my lesion")
    lesion = np.zeros_like(posterior)
    lesion[1:3, 1:4, 1:4] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(lesion, node, lesion_id, volume)
    assert "Not used: 'my lesion' \u2014 its name is none of the model's labels (anterior, posterior)." in \
        widget.ui.finetuneMatchLabel.text()
    assert "'anterior' as anterior (1), 'posterior' as posterior (2)" in widget.ui.finetuneMatchLabel.text()
    segments_before, scene_before = segment_arrays(node), scene_state(scene)
    assert np.array_equal(segments_before[posterior_id][1], erased)

    widget.ui.finetuneIterationsSpinBox.setValue(3)
    assert widget.ui.finetuneButton.isEnabled(), widget.ui.finetuneButton.toolTip()
    widget.ui.finetuneButton.click()
    assert widget.finetune.running, widget.ui.finetuneStatusLabel.text()
    assert not widget.ui.segmentButton.isEnabled() and not widget.ui.finetuneButton.isEnabled()
    assert widget.ui.finetuneCancelButton.isEnabled()
    widget.ui.segmentButton.click()  # refused while the fine-tune runs
    assert widget.jobs.kind == "fine-tune"
    wait_for_finetune(widget)

    status, result = widget.ui.finetuneStatusLabel.text(), widget.ui.finetuneResultLabel.text()
    assert status.startswith("Done in ") and "v1 is the current version now" in status, status
    assert re.search(r"^Dice before \d\.\d\d -> after \d\.\d\d \(training cases\)", result), result
    assert "Per label: anterior " in result and "Segment 'my lesion' is not used" in result
    versions = ModelVersions(SHIPPED_MODEL).list()
    assert [(v.id, v.current) for v in versions] == [("original", False), ("v1", True)]
    v1 = versions[1]
    assert versions_home in v1.path.parents and list(v1.path.glob("*/fold_0/checkpoint_final.pth"))
    assert v1.provenance["finetune"]["iterations"] == 3
    assert [widget.ui.versionsList.item(i).text().endswith("current") for i in range(2)] == [False, True]
    assert file_hashes(SHIPPED_MODEL) == shipped_before  # the shipped model: byte for byte as it was
    assert scene_state(scene) == scene_before  # (before segment_arrays, which leaves export nodes behind)
    assert same_segments(segment_arrays(node), segments_before)  # the user's segments: only read

    # Segment now runs the new version.
    widget.ui.outputSegmentationSelector.setCurrentNode(None)
    widget.ui.segmentButton.click()
    wait_for_panel(widget)
    again = widget.ui.outputSegmentationSelector.currentNode()
    assert again is not node and again is not None
    assert Path(segmentation.provenance(again)["ModelPath"]).resolve().is_relative_to(v1.path.resolve())
    assert segmentation.provenance(again)["Checksum"] != segmentation.provenance(node)["Checksum"]

    # Roll back from the version list: the original is current again, and v1 can be deleted.
    assert widget.ui.rollbackButton.isEnabled()
    widget.ui.rollbackButton.click()
    assert ModelVersions(SHIPPED_MODEL).current().id == "original"
    assert widget.ui.versionsList.item(0).text() == "original (read-only)  \u2190 current"
    assert "original is the current version now" in widget.ui.finetuneStatusLabel.text()
    widget.ui.versionsList.setCurrentRow(1)  # Use: v1 again, then the original again
    widget.ui.useVersionButton.click()
    assert ModelVersions(SHIPPED_MODEL).current().id == "v1"
    assert widget.ui.versionsList.item(1).text().endswith("current")
    widget.ui.versionsList.setCurrentRow(0)
    widget.ui.useVersionButton.click()
    assert ModelVersions(SHIPPED_MODEL).current().id == "original"
    widget.ui.versionsList.setCurrentRow(1)
    widget.finetune.confirmDelete = lambda question: True
    widget.ui.deleteVersionButton.click()
    assert [v.id for v in ModelVersions(SHIPPED_MODEL).list()] == ["original"]
    assert widget.ui.versionsList.count() == 1 and not v1.path.exists()
    assert file_hashes(SHIPPED_MODEL) == shipped_before
    assert model.path == widget.segment.currentModel().path


def test_cancelling_a_fine_tune_writes_no_version(widget, scene, real_case, versions_home):
    from SegmentMBTFELib.models.versions import ModelVersions
    volume, node = corrected_case(scene, real_case)
    select_shipped_model(widget)
    widget.ui.finetuneSegmentationSelector.setCurrentNode(node)
    assert widget.ui.finetuneVolumeSelector.currentNode() is volume
    widget.ui.finetuneIterationsSpinBox.setValue(5000)
    before = scene_state(scene)

    widget.ui.finetuneButton.click()
    wait_for_finetune(widget, until=lambda: "iteration" in widget.ui.finetuneStatusLabel.text())
    assert widget.finetune.running, "the fine-tune ended before it could be cancelled"
    widget.ui.finetuneCancelButton.click()
    assert not widget.ui.finetuneCancelButton.isEnabled()
    wait_for_finetune(widget, timeout=60)

    assert widget.ui.finetuneStatusLabel.text() == "Cancelled: no version was written."
    assert [v.id for v in ModelVersions(SHIPPED_MODEL).list()] == ["original"]
    # no version folder (vN), not even a partial one (.vN.partial-...)
    assert not [p for p in versions_home.rglob("*") if p.is_dir() and re.match(r"\.?v\d+", p.name)]
    assert scene_state(scene) == before
    assert widget.ui.finetuneButton.isEnabled() and widget.ui.segmentButton.isEnabled()


def test_a_segmentation_that_cannot_be_used_says_why(widget, scene, real_case, versions_home):
    volume, node = corrected_case(scene, real_case)
    select_shipped_model(widget)
    widget.ui.finetuneSegmentationSelector.setCurrentNode(node)
    assert widget.ui.finetuneButton.isEnabled(), widget.ui.finetuneButton.toolTip()
    node.GetSegmentation().GetSegment(node.GetSegmentation().GetSegmentIdBySegmentName("anterior")) \
        .RemoveTag("SegmentMBTFE.Model")
    node.GetSegmentation().GetSegment(node.GetSegmentation().GetSegmentIdBySegmentName("anterior")).SetName("front")
    # the panel follows the rename at once: 'front' matches nothing and anterior has no segment
    assert "Not used: 'front'" in widget.ui.finetuneMatchLabel.text()
    assert not widget.ui.finetuneButton.isEnabled()
    assert widget.ui.finetuneButton.toolTip().startswith("No segment stands for label 'anterior'")


def test_console_fine_tune_and_versions(module, scene, real_case, versions_home):
    """logic.finetune from the Python console: the model is the one that made the segments (by its tags'
    model name), the new version is current, and the user's segments are only read."""
    from SegmentMBTFELib.models.versions import ModelVersions
    volume, node = corrected_case(scene, real_case)
    node.SetAttribute("SegmentMBTFE.Model", "Dataset904_Hippocampus (3d_fullres)")
    before = segment_arrays(node)
    logic = module.SegmentMBTFELogic()
    run = logic.finetune(node, iterations=2, freezeEncoder=True)
    assert run.version.id == "v1" and run.version.current and run.parent == "original"
    assert run.result.frozen == ["encoder"] and run.result.iterations == 2
    assert run.dice_text().startswith("Dice before ")
    assert ModelVersions(SHIPPED_MODEL).current().id == "v1"
    assert same_segments(segment_arrays(node), before)


def test_fine_tuning_on_several_cases_from_the_case_list(widget, scene, real_case, versions_home):
    from SegmentMBTFELib.models.versions import ModelVersions
    select_shipped_model(widget)
    first_volume, first = corrected_case(scene, real_case)
    second_volume, second = corrected_case(scene, real_case, "corrected again")
    widget.ui.finetuneSegmentationSelector.setCurrentNode(first)
    widget.ui.addFinetuneCaseButton.click()
    widget.ui.finetuneSegmentationSelector.setCurrentNode(second)
    assert widget.ui.finetuneVolumeSelector.currentNode() is second_volume
    assert [widget.ui.finetuneCasesList.item(i).text() for i in range(widget.ui.finetuneCasesList.count())] == \
        [f"corrected on {first_volume.GetName()}"]
    widget.ui.finetuneIterationsSpinBox.setValue(1)
    widget.ui.finetuneButton.click()
    wait_for_finetune(widget)
    assert "v1 is the current version now" in widget.ui.finetuneStatusLabel.text(), \
        widget.ui.finetuneStatusLabel.text()
    cases = ModelVersions(SHIPPED_MODEL).current().provenance["finetune"]["cases"]
    assert [c["name"] for c in cases] == ["corrected again", "corrected"]  # the chosen one first, then the list's

    widget.ui.finetuneCasesList.setCurrentRow(0)
    widget.ui.removeFinetuneCaseButton.click()
    assert widget.ui.finetuneCasesList.count() == 0
