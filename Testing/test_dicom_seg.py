"""DICOM SEG output (dicom_seg.py): written by highdicom, read back by two other readers.

The readers: dcmqi's segimage2itkimage (PyPI `dcmqi`, the converter Slicer's DICOM SEG plugin runs) and plain
pydicom frame by frame; highdicom's own reader as a third. pydicom-seg, named in the issue, cannot be
installed beside numpy 2 (it pins numpy < 2). Each must give back the label map's voxels on its grid and the
codes the .seg.nrrd carries. That Slicer's core loads such a file: slicer/suite/test_slicer_dicom_seg.py.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import model_factory
from SegmentMBTFELib import load_model
from SegmentMBTFELib.io.dicom_seg import INSTALL
from SegmentMBTFELib.io.images import read_volume
from SegmentMBTFELib.io.segfile import read_seg_nrrd
from SegmentMBTFELib.io.terminology import terminology_for
from SegmentMBTFELib.io.writers import write_prediction
from SegmentMBTFELib.tasks import segment_files

hd = pytest.importorskip("highdicom", reason="highdicom is not installed (the [dicom] extra)")
pydicom = pytest.importorskip("pydicom")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SEGIMAGE2ITKIMAGE = Path(sys.executable).parent / "segimage2itkimage"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
CT_LABELS = {"background": 0, "liver": 1, "spleen": 2, "blob": 3}


def ct_model_folder(root: Path) -> Path:
    """A tiny CT model (untrained weights: any label map will do) whose labels have codes, and one without."""
    return model_factory.make_model_folder(root, channels=("CT",), labels=CT_LABELS, spacing=[2.0, 4.0, 4.0],
                                           patch_size=[16, 64, 64], normalization="CTNormalization",
                                           dataset_name="Dataset901_CT")


@pytest.fixture(scope="module")
def ct_model(tmp_path_factory) -> Path:
    return ct_model_folder(tmp_path_factory.mktemp("ct_model"))


@pytest.fixture(scope="module")
def messy_ct_outputs(ct_model, ct_dicom_dir, tmp_path_factory):
    """One prediction on the messy CT series (empty UIDs), written as a DICOM SEG and as a .seg.nrrd."""
    folder = tmp_path_factory.mktemp("seg_out")
    prediction = load_model(ct_model).predict([read_volume(ct_dicom_dir)], tta=False)
    seg_nrrd = write_prediction(prediction, folder / "result.seg.nrrd")[0]
    dcm = write_prediction(prediction, folder / "result.dcm")[0]
    return prediction, dcm, seg_nrrd


def codes_of(entry: str):
    """(category, type, modifier) of a Slicer TerminologyEntry as (scheme, value, meaning) tuples."""
    return tuple(tuple(part.split("^")) if part != "^^" else None for part in entry.split("~")[1:4])


@pytest.mark.skipif(not SEGIMAGE2ITKIMAGE.exists(), reason="dcmqi is not installed (Testing/requirements.txt)")
def test_dcmqi_reads_back_the_label_map_and_its_codes(messy_ct_outputs, tmp_path):
    prediction, dcm, seg_nrrd = messy_ct_outputs
    subprocess.run([str(SEGIMAGE2ITKIMAGE), "--inputDICOM", str(dcm), "--outputDirectory", str(tmp_path),
                    "--mergeSegments", "-t", "nrrd"], check=True, capture_output=True)
    image, labels = sitk.ReadImage(str(tmp_path / "1.nrrd")), prediction.labels
    assert image.GetSize() == labels.shape[::-1]
    np.testing.assert_allclose(image.GetSpacing(), labels.spacing, atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), labels.origin, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), labels.direction, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels.array)
    assert len(np.unique(labels.array)) > 2  # the check compares several segments, not an empty map
    meta = json.loads((tmp_path / "meta.json").read_text())["segmentAttributes"][0]
    _, segments, _ = read_seg_nrrd(seg_nrrd)
    for attributes, segment in zip(meta, segments):
        assert (attributes["labelID"], attributes["SegmentLabel"]) == (segment.label_value, segment.name)
        category = attributes["SegmentedPropertyCategoryCodeSequence"]
        kind = attributes["SegmentedPropertyTypeCodeSequence"]
        found = tuple((c["CodingSchemeDesignator"], c["CodeValue"], c["CodeMeaning"]) for c in (category, kind))
        expected = codes_of(segment.terminology)[:2] if segment.terminology else (("SCT", "85756007", "Tissue"),) * 2
        assert found == expected, segment.name
    assert [s.terminology is not None for s in segments] == [True, True, False]  # liver, spleen; "blob" unknown


def test_highdicom_reads_back_the_voxels_on_the_label_maps_grid(messy_ct_outputs):
    prediction, dcm, _ = messy_ct_outputs
    seg = hd.seg.segread(dcm)
    assert_same_volume(seg, prediction.labels)
    assert [seg.get_segment_description(n).segment_label for n in (1, 2, 3)] == ["liver", "spleen", "blob"]


def test_pydicom_frames_reference_the_source_slices(messy_ct_outputs, ct_dicom_dir):
    prediction, dcm, _ = messy_ct_outputs
    seg = pydicom.dcmread(dcm)
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    sources = {tuple(np.round(np.array(s.ImagePositionPatient, float), 3)): s.file_meta.MediaStorageSOPInstanceUID
               for s in (pydicom.dcmread(f, stop_before_pixels=True) for f in ct_dicom_dir.iterdir())}
    frames = np.unpackbits(np.frombuffer(seg.PixelData, np.uint8), bitorder="little")
    rows, columns = seg.Rows, seg.Columns
    labels = prediction.labels
    z_of = {round(labels.origin[2] + k * labels.spacing[2], 3): k for k in range(labels.shape[0])}
    for index, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        position = tuple(np.round(np.array(group.PlanePositionSequence[0].ImagePositionPatient, float), 3))
        number = group.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        frame = frames[index * rows * columns:(index + 1) * rows * columns].reshape(rows, columns)
        np.testing.assert_array_equal(frame, labels.array[z_of[position[2]]] == number)
        source = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert source == sources[position]  # the slice at that position, by the UID its file's meta header holds
    referenced = seg.ReferencedSeriesSequence[0]
    assert sorted(i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence) == sorted(sources.values())


def test_uids_made_for_an_anonymised_series_are_the_same_each_time_and_said(messy_ct_outputs, tmp_path):
    prediction, dcm, _ = messy_ct_outputs
    again = write_prediction(prediction, tmp_path / "again.dcm")[0]
    first, second = pydicom.dcmread(dcm), pydicom.dcmread(again)
    for name in ("StudyInstanceUID", "FrameOfReferenceUID"):
        assert first.get(name) and first.get(name) == second.get(name)
    assert first.ReferencedSeriesSequence[0].SeriesInstanceUID == second.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert first.SeriesInstanceUID != second.SeriesInstanceUID  # each SEG is a new series of its own
    assert any("The source DICOM series has empty UIDs (SOPClassUID, SOPInstanceUID, StudyInstanceUID, "
               "SeriesInstanceUID)" in m for m in prediction.messages)


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not available")
def test_a_series_with_its_uids_keeps_them_and_its_segments_carry_the_seg_nrrd_modifiers(tmp_path):
    """Real MR slices, hippocampus labels: the codes with their Anterior/Posterior modifiers, the study's UIDs."""
    from SegmentMBTFELib.io.dicom_seg import write_dicom_seg
    series = DATA / "hippocampus" / "dicom" / "11_HCropVolume"
    image = read_volume(series)
    labels = image.with_array((image.array > np.percentile(image.array, 60)).astype(np.uint8)
                              + (image.array > np.percentile(image.array, 90)).astype(np.uint8))
    settings = {"model": "Dataset004_Hippocampus (3d_fullres)", "checksum": "0123", "engine": "SegmentMBTFE"}
    path, notes = write_dicom_seg(labels, [(1, "anterior"), (2, "posterior")], settings, tmp_path / "hippo.dcm")
    seg, source = pydicom.dcmread(path), pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True)
    assert notes == [] and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert seg.PatientID == source.PatientID and seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    for segment, name in zip(seg.SegmentSequence, ("anterior", "posterior")):
        kind = segment.SegmentedPropertyTypeCodeSequence[0]
        modifier = kind.SegmentedPropertyTypeModifierCodeSequence[0]
        found = tuple((c.CodingSchemeDesignator, c.CodeValue, c.CodeMeaning)
                      for c in (segment.SegmentedPropertyCategoryCodeSequence[0], kind, modifier))
        assert found == codes_of(terminology_for(name, settings["model"]))
    assert_same_volume(hd.seg.segread(path), labels)


def assert_same_volume(seg, labels):
    """highdicom's reading of `seg` holds `labels` on the label map's grid."""
    affine = np.eye(4)
    affine[:3, :3] = (np.array(labels.direction).reshape(3, 3) * labels.spacing)[:, ::-1]  # (z, y, x) -> LPS
    affine[:3, 3] = labels.origin
    ours = hd.Volume(labels.array, affine, "PATIENT")
    volume = seg.get_volume(combine_segments=True).match_geometry(ours)  # it stacks slices from the top down
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(volume.array, labels.array)


def test_segment_files_writes_a_dicom_seg_per_dicom_case_and_says_which_series(ct_model, ct_dicom_dir, tmp_path):
    model, messages = load_model(ct_model), []
    written = segment_files(model, None, [ct_dicom_dir], tmp_path, tta=False, file_format="dicom-seg",
                            messages=messages)
    assert [p.name for p in written] == ["example_ct_dicom.dcm"]
    assert pydicom.dcmread(written[0]).Modality == "SEG"
    assert messages and all(m.startswith("example_ct_dicom: ") for m in messages)


def test_segment_files_refuses_a_dicom_seg_of_a_nifti_before_predicting(ct_model, tmp_path):
    image = DATA / "formats" / "totalsegmentator" / "example_ct_sm.nii.gz"
    if not image.is_file():
        pytest.skip("../shared/data is not available")
    with pytest.raises(Exception) as refused:
        segment_files(load_model(ct_model), None, [image], tmp_path, file_format="dicom-seg",
                      progress=lambda fraction, stage: pytest.fail(f"predicted: {stage}") if fraction > 0 else None)
    assert str(refused.value).startswith("Cannot write example_ct_sm.dcm: a DICOM SEG references the DICOM series")
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_format_is_refused_in_one_sentence(ct_model, tmp_path):
    with pytest.raises(Exception, match=r"^Unknown output format 'png': give one of seg.nrrd, dicom-seg, nifti"):
        segment_files(load_model(ct_model), None, [], tmp_path, file_format="png")


def test_without_highdicom_the_command_says_how_to_install_it(ct_model, ct_dicom_dir, tmp_path):
    """highdicom made unimportable in a fresh process, as on a machine without the [dicom] extra."""
    args = ["predict", "-q", "--no-tta", "-m", str(ct_model), "-i", str(ct_dicom_dir), "-o", str(tmp_path / "r.dcm")]
    code = ("import sys; sys.modules['highdicom'] = None; from SegmentMBTFELib.cli import main; "
            f"sys.exit(main({args!r}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.strip() == f"error: {INSTALL}"
    assert list(tmp_path.iterdir()) == []
