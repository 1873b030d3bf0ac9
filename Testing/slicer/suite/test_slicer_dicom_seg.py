"""A DICOM SEG from the console API (segmentFiles(..., format="dicom-seg")) of the CT series in
../shared/data/formats loads in the real Slicer core as Slicer's DICOM SEG plugin loads it.

The plugin itself (Modules/Scripted/DICOMPlugins/DICOMSegmentationPlugin.py) needs Slicer's DICOM database
and application, which slicer-core does not have; its `load` is a short list of steps on things slicer-core
does have, so `load_as_slicer_does` runs those same steps: dcmqi's segimage2itkimage with --mergeSegments
(the binary the plugin calls), the terminologies logic reading the descriptor file, each label file read as a
label map volume, imported into a segmentation node by the segmentations logic, and each segment's name,
colour and terminology set from the descriptor.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import vtk

import model_factory

pytest.importorskip("highdicom", reason="highdicom is not installed (the [dicom] extra)")
SEGIMAGE2ITKIMAGE = Path(sys.executable).parent / "segimage2itkimage"
LABELS = {"background": 0, "liver": 1, "spleen": 2, "blob": 3}


def load_as_slicer_does(scene, seg_file: Path, work: Path):
    """DICOMSegmentationPlugin.load, step by step (the plugin's own names in the comments)."""
    import slicer
    subprocess.run([str(SEGIMAGE2ITKIMAGE), "--inputDICOM", str(seg_file), "--outputDirectory", str(work),
                    "--mergeSegments"], check=True, capture_output=True)
    meta = work / "meta.json"
    terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
    context = "SEG" if terminologies.LoadTerminologyFromSegmentDescriptorFile("SEG", str(meta)) else \
        "Segmentation category and type - DICOM master list"
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    for index, attributes in enumerate(json.loads(meta.read_text())["segmentAttributes"]):
        label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")  # slicer.util.loadLabelVolume(singleFile)
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(work / f"{index + 1}.nrrd"))
        storage.SetSingleFile(True)
        assert storage.ReadData(label)
        before = segmentation.GetSegmentation().GetNumberOfSegments()
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label, segmentation)
        for number, segment_attributes in enumerate(a for a in attributes if a.get("labelID", 1) != 0):
            segment = segmentation.GetSegmentation().GetNthSegment(before + number)
            segment.SetName(segment_attributes["SegmentLabel"])
            segment.SetColor([c / 255.0 for c in segment_attributes["recommendedDisplayRGBValue"]])
            segment.SetTag("TerminologyEntry", terminologies.SerializeTerminologyEntry(
                context, *code(segment_attributes, "SegmentedPropertyCategoryCodeSequence"),
                *code(segment_attributes, "SegmentedPropertyTypeCodeSequence"),
                *code(segment_attributes, "SegmentedPropertyTypeModifierCodeSequence"),
                "Anatomic codes - DICOM master list", "", "", "", "", "", ""))
        scene.RemoveNode(label)
    return segmentation


def code(attributes: dict, name: str):
    """(value, scheme, meaning), as the plugin's getValuesFromCodeSequence."""
    found = attributes.get(name)
    return (found["CodeValue"], found["CodingSchemeDesignator"], found["CodeMeaning"]) if found else ("", "", "")


@pytest.mark.skipif(not SEGIMAGE2ITKIMAGE.exists(), reason="dcmqi is not installed (Testing/requirements.txt)")
def test_a_dicom_seg_of_the_ct_series_loads_in_slicer_core(module, scene, ct_dicom_dir, tmp_path):
    import slicer
    from SegmentMBTFELib import load_model
    from SegmentMBTFELib.io.images import read_volume
    model = model_factory.make_model_folder(tmp_path / "model", channels=("CT",), labels=LABELS,
                                            spacing=[2.0, 4.0, 4.0], patch_size=[16, 64, 64],
                                            normalization="CTNormalization", dataset_name="Dataset901_CT")
    written = module.SegmentMBTFELogic().segmentFiles([str(ct_dicom_dir)], str(model), tmp_path / "out", tta=False,
                                                      format="dicom-seg")
    assert [Path(p).name for p in written] == ["example_ct_dicom.dcm"]
    (tmp_path / "dcmqi").mkdir()
    segmentation = load_as_slicer_does(scene, Path(written[0]), tmp_path / "dcmqi")

    names = [segmentation.GetSegmentation().GetNthSegment(i).GetName() for i in range(3)]
    assert names == ["liver", "spleen", "blob"]
    liver = vtk.reference("")
    assert segmentation.GetSegmentation().GetNthSegment(0).GetTag("TerminologyEntry", liver)
    assert "~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~" in str(liver)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    segmentation.GetSegmentation().GetSegmentIDs(ids)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation, ids, labelmap, None, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    expected = load_model(model).predict([read_volume(ct_dicom_dir)], tta=False).labels
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(labelmap), expected.array)
    np.testing.assert_allclose(labelmap.GetOrigin(), np.array(expected.origin) * [-1, -1, 1], atol=1e-3)
    np.testing.assert_allclose(labelmap.GetSpacing(), expected.spacing, atol=1e-5)
