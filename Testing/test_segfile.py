"""segfile and colors: .seg.nrrd files that Slicer's readers (slicerio, SimpleITK, and Slicer's own storage
node when the `slicer-core` package is installed) read back with the right segments, colours, geometry
and voxels; Slicer-written files read by read_seg_nrrd; distinct segment colours.
"""
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegmentMBTFELib.errors import InputError
from SegmentMBTFELib.io.colors import color_distance, segment_colors
from SegmentMBTFELib.io.images import read_volume
from SegmentMBTFELib.io.segfile import Segment, read_seg_nrrd, write_seg_nrrd
from SegmentMBTFELib.volume import Volume

slicerio = pytest.importorskip("slicerio", reason="slicerio is a test requirement (Testing/requirements.txt)")

DATA = Path(__file__).parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real test data not found at {DATA}")
HIPPOCAMPUS_LABEL = DATA / "hippocampus" / "train" / "labels" / "hippocampus_001.nii.gz"
SLICERIO_DATA = Path(slicerio.__file__).parent / "data"
HIPPOCAMPUS_TERMS = ("Segmentation category and type - SegmentMBTFE~SCT^123037004^Anatomical "
                     "Structure~SCT^5366008^Hippocampus~^^~Anatomic codes - DICOM master list~^^~^^")


def hippocampus_segments():
    return [Segment("anterior hippocampus", 1, terminology=HIPPOCAMPUS_TERMS),
            Segment("posterior hippocampus", 2, color=(0.2, 0.4, 0.9))]


def oblique_labels(labels=3) -> Volume:
    c, s = math.cos(0.4), math.sin(0.4)
    array = np.zeros((6, 7, 8), np.int16)
    for value in range(1, labels + 1):
        array.reshape(-1)[value * 3] = value
    array[2:4, 3:6, 1:7] = 1
    return Volume(array, spacing=(0.8, 0.9, 2.5), origin=(-12.25, 30.5, -7.125),
                  direction=(c, 0.0, s, 0.0, 1.0, 0.0, -s, 0.0, c))


def ijk_to_lps(volume: Volume) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(volume.direction).reshape(3, 3) * volume.spacing
    matrix[:3, 3] = volume.origin
    return matrix


def slicerio_voxels(segmentation) -> np.ndarray:
    return np.transpose(segmentation["voxels"], (2, 1, 0))  # pynrrd gives (i, j, k); Volume holds (k, j, i)


# ------------------------------------------------------------------------------------- slicerio

@needs_data
def test_slicerio_reads_segments_geometry_and_voxels(tmp_path):
    labels = read_volume(HIPPOCAMPUS_LABEL)
    path = write_seg_nrrd(labels, tmp_path / "hippocampus.seg.nrrd", hippocampus_segments(),
                          {"model": "Hippocampus (nnU-Net 3d_fullres)", "folds": "0 1 2 3 4"})
    segmentation = slicerio.read_segmentation(str(path))
    segments = segmentation["segments"]
    assert [s["name"] for s in segments] == ["anterior hippocampus", "posterior hippocampus"]
    assert [s["labelValue"] for s in segments] == [1, 2]
    assert [s["layer"] for s in segments] == [0, 0]
    assert segments[0]["color"] == pytest.approx(segment_colors(1)[0], abs=1e-6)
    assert segments[1]["color"] == pytest.approx([0.2, 0.4, 0.9])
    assert segments[0]["terminology"]["type"] == ["SCT", "5366008", "Hippocampus"]
    np.testing.assert_allclose(segmentation["ijkToLPS"], ijk_to_lps(labels), atol=1e-12)
    np.testing.assert_array_equal(slicerio_voxels(segmentation), labels.array)
    assert segmentation["masterRepresentation"] == "Binary labelmap"
    assert segmentation["containedRepresentationNames"] == ["Binary labelmap"]
    assert segmentation["referenceImageExtentOffset"] == [0, 0, 0]
    assert segmentation["SegmentMBTFE_model"] == "Hippocampus (nnU-Net 3d_fullres)"


def test_oblique_geometry_and_reference_geometry(tmp_path):
    labels = oblique_labels()
    path = write_seg_nrrd(labels, tmp_path / "oblique.seg.nrrd",
                          [Segment(f"part {v}", v) for v in (1, 2, 3)])
    segmentation = slicerio.read_segmentation(str(path))
    np.testing.assert_allclose(segmentation["ijkToLPS"], ijk_to_lps(labels), atol=1e-12)
    np.testing.assert_array_equal(slicerio_voxels(segmentation), labels.array)
    # "Reference image geometry" is Slicer's IJK-to-RAS matrix row by row, then the full extent.
    parameter, = [p for p in segmentation["conversionParameters"] if p["name"] == "Reference image geometry"]
    numbers = [float(v) for v in parameter["value"].rstrip(";").split(";")]
    np.testing.assert_allclose(np.array(numbers[:16]).reshape(4, 4),
                               np.diag([-1, -1, 1, 1]) @ ijk_to_lps(labels), atol=1e-12)
    assert numbers[16:] == [0, 7, 0, 6, 0, 5]


def test_header_fields_match_what_slicer_writes(tmp_path):
    labels = oblique_labels()
    path = write_seg_nrrd(labels, tmp_path / "fields.seg.nrrd", [Segment("a", 1), Segment("b", 2),
                                                                 Segment("c", 3), Segment("empty", 4)])
    header = path.read_bytes().split(b"\n\n", 1)[0].decode()
    assert "space: left-posterior-superior" in header and "kinds: domain domain domain" in header
    assert "encoding: gzip" in header and "type: unsigned char" in header
    for field in ("ID:=Segment_1", "Name:=a", "ColorAutoGenerated:=1", "LabelValue:=1", "Layer:=0",
                  "NameAutoGenerated:=0", "Tags:="):
        assert f"Segment0_{field}" in header
    # Like Slicer, every segment of a layer carries the layer's extent of non-zero voxels, empty ones too.
    nonzero = np.argwhere(labels.array)
    extent = " ".join(f"{lo} {hi}" for lo, hi in zip(nonzero.min(0)[::-1], nonzero.max(0)[::-1]))
    assert f"Segment0_Extent:={extent}" in header and f"Segment3_Extent:={extent}" in header
    for field in ("Segmentation_MasterRepresentation:=Binary labelmap",
                  "Segmentation_ContainedRepresentationNames:=Binary labelmap|",
                  "Segmentation_ConversionParameters:=Reference image geometry|",
                  "Segmentation_ReferenceImageExtentOffset:=0 0 0"):
        assert field in header


# ------------------------------------------------------------------------------------- SimpleITK and own reader

@needs_data
def test_simpleitk_reads_it_as_the_label_map(tmp_path):
    labels = read_volume(HIPPOCAMPUS_LABEL)
    path = write_seg_nrrd(labels, tmp_path / "labels.seg.nrrd", hippocampus_segments(), {"model": "x"})
    image = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels.array)
    assert image.GetSpacing() == pytest.approx(labels.spacing, abs=1e-12)
    assert image.GetOrigin() == labels.origin and image.GetDirection() == pytest.approx(labels.direction)
    assert image.GetMetaData("Segment1_Name") == "posterior hippocampus"
    assert image.GetMetaData("SegmentMBTFE_model") == "x"


def test_round_trip_through_read_seg_nrrd(tmp_path):
    labels = oblique_labels()
    segments = [Segment("liver", 1, (0.87, 0.51, 0.4), HIPPOCAMPUS_TERMS, id="liver"), Segment("spleen", 2),
                Segment("kidney | left", 3)]
    metadata = {"model": "Demo", "SegmentMBTFE_device": "cpu", "note": "two\nlines"}
    path = write_seg_nrrd(labels, tmp_path / "round.seg.nrrd", segments, metadata)
    volume, read_segments, read_metadata = read_seg_nrrd(path)
    np.testing.assert_array_equal(volume.array, labels.array)
    assert volume.array.dtype == np.uint8
    np.testing.assert_allclose(ijk_to_lps(volume), ijk_to_lps(labels), atol=1e-12)
    assert [s.name for s in read_segments] == ["liver", "spleen", "kidney | left"]
    assert [s.label_value for s in read_segments] == [1, 2, 3]
    assert [s.id for s in read_segments] == ["liver", "Segment_2", "Segment_3"]
    assert read_segments[0].color == (0.87, 0.51, 0.4) and read_segments[0].terminology == HIPPOCAMPUS_TERMS
    assert read_segments[1].color == pytest.approx(segment_colors(2)[1], abs=1e-6)
    assert read_metadata == {"model": "Demo", "device": "cpu", "note": "two\nlines"}


def test_reads_a_segmentation_slicer_wrote():
    volume, segments, metadata = read_seg_nrrd(SLICERIO_DATA / "Segmentation.seg.nrrd")
    assert len(segments) == 7 and segments[0].name == "ribs" and segments[4].name == "right lung"
    assert [s.label_value for s in segments] == list(range(1, 8))
    assert segments[0].color == pytest.approx((0.992157, 0.909804, 0.619608))
    assert "Rib" in segments[0].terminology
    assert volume.shape == (34, 128, 128) and metadata == {}
    assert set(np.unique(volume.array)) <= set(range(8))


def test_two_layer_segmentation_is_refused():
    with pytest.raises(InputError, match="layers"):
        read_seg_nrrd(SLICERIO_DATA / "SegmentationOverlapping.seg.nrrd")


def test_missing_segmentation_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_seg_nrrd(tmp_path / "none.seg.nrrd")


# ------------------------------------------------------------------------------------- label values

def test_many_labels_fit_the_smallest_type(tmp_path):
    array = (np.arange(6 * 7 * 8).reshape(6, 7, 8) % 131).astype(np.int64)
    segments = [Segment(f"structure {v}", v) for v in range(1, 131)]
    volume, read_segments, _ = read_seg_nrrd(write_seg_nrrd(Volume(array), tmp_path / "a.seg.nrrd", segments))
    assert volume.array.dtype == np.uint8 and len(read_segments) == 130
    np.testing.assert_array_equal(volume.array, array)
    colors = [s.color for s in read_segments]
    assert len(set(colors)) == 130

    array[0, 0, 0] = 300
    segments.append(Segment("structure 300", 300))
    volume, _, _ = read_seg_nrrd(write_seg_nrrd(Volume(array), tmp_path / "b.seg.nrrd", segments))
    assert volume.array.dtype == np.uint16 and volume.array[0, 0, 0] == 300


def test_label_without_a_segment_is_a_bug(tmp_path):
    with pytest.raises(ValueError, match="no segment"):
        write_seg_nrrd(oblique_labels(3), tmp_path / "x.seg.nrrd", [Segment("a", 1), Segment("b", 2)])
    with pytest.raises(ValueError, match="distinct"):
        write_seg_nrrd(oblique_labels(1), tmp_path / "x.seg.nrrd", [Segment("a", 1), Segment("b", 1)])
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "out.seg.nrrd"
    write_seg_nrrd(oblique_labels(1), path, [Segment("first", 1)])
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_seg_nrrd(oblique_labels(1), path, [Segment("second", 1)], {"bad key": "x"})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["out.seg.nrrd"]


# ------------------------------------------------------------------------------------- Slicer itself

def test_slicer_storage_node_reads_it(tmp_path):
    """Slicer's own reader (the `slicer-core` package), where it is installed."""
    slicer = pytest.importorskip("slicer", reason="the slicer-core package is not installed")
    import vtk
    from vtk.util import numpy_support
    labels = oblique_labels()
    path = write_seg_nrrd(labels, tmp_path / "slicer.seg.nrrd",
                          [Segment("a", 1, (0.1, 0.2, 0.3)), Segment("b", 2, terminology=HIPPOCAMPUS_TERMS),
                           Segment("c", 3)])
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    segments = [segmentation.GetSegment(segmentation.GetNthSegmentID(i)) for i in range(3)]
    assert [s.GetName() for s in segments] == ["a", "b", "c"]
    assert [s.GetLabelValue() for s in segments] == [1, 2, 3]
    assert segments[0].GetColor() == pytest.approx((0.1, 0.2, 0.3))
    terminology = vtk.reference("")
    assert segments[1].GetTag("TerminologyEntry", terminology) and str(terminology) == HIPPOCAMPUS_TERMS

    exported = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    segmentation.GetSegmentIDs(ids)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        node, ids, exported, None, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    image = exported.GetImageData()
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(image.GetDimensions()[::-1])
    np.testing.assert_array_equal(voxels, labels.array)
    matrix = vtk.vtkMatrix4x4()
    exported.GetIJKToRASMatrix(matrix)
    ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    np.testing.assert_allclose(ijk_to_ras, np.diag([-1, -1, 1, 1]) @ ijk_to_lps(labels), atol=1e-9)


# ------------------------------------------------------------------------------------- colours

def test_first_two_colours_are_clearly_different():
    first, second = segment_colors(2)
    assert color_distance(first, second) > 50


@pytest.mark.parametrize("count, least", [(10, 20), (50, 15), (130, 10)])
def test_many_colours_stay_distinct(count, least):
    colors = segment_colors(count)
    assert all(0.0 <= v <= 1.0 for c in colors for v in c)
    assert min(color_distance(a, b) for a, b in itertools.combinations(colors, 2)) > least


def test_a_label_keeps_its_colour_whatever_the_count():
    assert segment_colors(300)[:7] == segment_colors(7)
