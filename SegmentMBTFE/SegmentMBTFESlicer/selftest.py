"""The module's self-test steps, run inside Slicer by SegmentMBTFETest (Reload and Test, or ctest).

They need no download: Resources/SelfTest holds a tiny, untrained nnU-Net v2 model folder (dataset.json,
plans.json, fold_0/checkpoint_final.pth, written by Testing/model_factory.py) and the image is synthetic.
The model's output means nothing anatomically, but it takes the path a trained model takes: the worker
process, the segments in the scene, fine-tuning and versions. Each step is a function of the running
unittest.TestCase (SegmentMBTFETest, whose logic() gives a fresh console API); its docstring is what the test
shows.
"""
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

import slicer

from . import catalog, segmentation
from .resources import resource_path

MODEL = "SelfTest/Dataset999_SelfTestHippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres"
SHAPE = (24, 30, 26)


def model_folder() -> Path:
    return Path(resource_path(MODEL))


def test_image(shape=SHAPE) -> np.ndarray:
    """A bright ellipsoid with a darker core on a noisy background, (k, j, i) float32."""
    radius = _radius(shape)
    image = np.where(radius < 0.7, 200.0, 40.0) - np.where(radius < 0.3, 80.0, 0.0)
    return (image + np.random.default_rng(0).normal(0, 10, shape)).astype(np.float32)


def test_labels(shape=SHAPE) -> np.ndarray:
    """Corrected labels for test_image: the darker core 'anterior' (1), the rest of the ellipsoid 'posterior' (2)."""
    radius = _radius(shape)
    return np.where(radius < 0.3, 1, np.where(radius < 0.7, 2, 0)).astype(np.uint8)


def _radius(shape):
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return np.sqrt(k ** 2 + (j / 0.8) ** 2 + (i / 0.6) ** 2)


def _volume():
    volume = slicer.util.addVolumeFromArray(test_image(), name="SelfTestVolume")
    volume.SetSpacing(1.0, 1.0, 1.0)
    return volume


def console_segment_matches_batch(test):
    """Console API: segment() puts the same labels into named segments as segmentFiles() writes to a file"""
    logic, volume = test.logic(), _volume()
    node = logic.segment(volume, model=str(model_folder()), tta=False, show3D=False)
    with tempfile.TemporaryDirectory(prefix="SegmentMBTFETest-") as folder:  # a self-test leaves no files
        image = os.path.join(folder, "SelfTestVolume.nrrd")
        _save(volume, image)
        [written] = logic.segmentFiles([image], model=str(model_folder()), outputDir=folder, tta=False)
        expected = _read_segmentation(written)
    segments = node.GetSegmentation()
    test.assertEqual([segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())],
                     ["anterior", "posterior"])
    for index in range(2):
        np.testing.assert_array_equal(segmentation.segment_array(node, segments.GetNthSegmentID(index)),
                                      segmentation.segment_array(expected, expected.GetSegmentation()
                                                                 .GetNthSegmentID(index)))


def panel_keeps_user_segments(test):
    """Panel: Segment into a segmentation that holds a user's segment, twice"""
    volume = _volume()
    output = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Mine")
    output.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    user_id = output.GetSegmentation().AddEmptySegment("", "my tumour")
    user_voxels = np.zeros(SHAPE, np.uint8)
    user_voxels[2:6, 3:9, 4:8] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(user_voxels, output, user_id, volume)
    widget = slicer.modules.segmentmbtfe.widgetRepresentation().self()
    section = widget.segment
    section.confirm = lambda question: True  # the user says "Replace"
    section.addModelFolder(str(model_folder()))
    section.channelSelectors()[0].setCurrentNode(volume)
    widget.ui.outputSegmentationSelector.setCurrentNode(output)
    widget.ui.ttaCheckBox.setChecked(False)
    try:
        for _round in range(2):  # the second run replaces the model's segments (after the confirmation)
            widget.ui.segmentButton.click()
            test.assertIsNotNone(widget.jobs.job, widget.ui.statusLabel.property("text"))
            widget.jobs.job.wait()
    finally:
        catalog.forget(str(model_folder()))  # leave the user's model list as it was
        section.refreshModels()
    names = [output.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(output.GetSegmentation().GetNumberOfSegments())]
    test.assertEqual(names, ["my tumour", "anterior", "posterior"])
    np.testing.assert_array_equal(segmentation.segment_array(output, user_id), user_voxels)


def cancel_leaves_scene_unchanged(test):
    """Cancel: nothing is written"""
    from SegmentMBTFELib.errors import Cancelled
    logic, volume = test.logic(), _volume()
    before = slicer.mrmlScene.GetNumberOfNodes()
    cancel = threading.Event()
    cancel.set()
    with test.assertRaises(Cancelled):
        logic.segment(volume, model=str(model_folder()), tta=False, cancel=cancel)
    test.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)


def finetune_writes_a_new_version(test):
    """Fine-tune: corrected segments make a new current version; the original and the segments stay"""
    logic, volume = test.logic(), _volume()
    folder = model_folder()
    node = logic.segment(volume, model=str(folder), tta=False, show3D=False)
    labels, ids = test_labels(), {}
    for value, name in ((1, "anterior"), (2, "posterior")):  # the user's corrections, as Segment Editor makes
        ids[value] = node.GetSegmentation().GetSegmentIdBySegmentName(name)
        slicer.util.updateSegmentBinaryLabelmapFromArray((labels == value).astype(np.uint8), node, ids[value],
                                                         volume)
    checkpoint = (folder / "fold_0" / "checkpoint_final.pth").read_bytes()
    home = os.environ.get("SEGMENTMBTFE_HOME")
    with tempfile.TemporaryDirectory(prefix="SegmentMBTFETest-versions-") as versions:  # not the user's
        os.environ["SEGMENTMBTFE_HOME"] = versions
        try:
            run = logic.finetune(node, volume, model=str(folder), iterations=2)
        finally:
            os.environ.pop("SEGMENTMBTFE_HOME") if home is None else os.environ.update(SEGMENTMBTFE_HOME=home)
    test.assertEqual((run.version.id, run.version.current, run.parent), ("v1", True, "original"))
    test.assertTrue(run.dice_text().startswith("Dice before "))
    test.assertEqual((folder / "fold_0" / "checkpoint_final.pth").read_bytes(), checkpoint)
    for value, segment_id in ids.items():
        np.testing.assert_array_equal(segmentation.segment_array(node, segment_id), labels == value)


STEPS = (console_segment_matches_batch, panel_keeps_user_segments, cancel_leaves_scene_unchanged,
         finetune_writes_a_new_version)


def _save(node, path):
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(path)
    if not storage.WriteData(node):
        raise RuntimeError(f"could not write {path}")


def _read_segmentation(path):
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "SelfTest file")
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(path)
    if not storage.ReadData(node):
        raise RuntimeError(f"Slicer could not read {path}")
    return node
