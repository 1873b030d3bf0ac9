"""DICOM folders as users have them: several series (the model's modality chosen, or a UID), uneven or missing
slices, a tilted gantry and mixed orientations, handled as Slicer's DICOM scalar volume plugin does.

Real series from ../shared/data where they exist; slice geometry that no shared series has (tilt, gaps) is
written with pydicom (hostile_files.write_dicom_series), with voxel values that are a linear function of the
physical position: linear resampling reproduces such a function exactly, so every voxel can be checked against
where it truly lies.
"""
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hostile_files import write_dicom_series
from SegmentMBTFELib.errors import InputError
from SegmentMBTFELib.io.images import read_channels, read_volume
from SegmentMBTFELib.models.modality import channel_modality, modality
from SegmentMBTFELib.volume import DICOM_SOURCE_FILES

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not available")
MR_SERIES = DATA / "hippocampus" / "dicom" / "13_HCropVolume"          # 32 MR slices
CT_SERIES = DATA / "formats" / "dcmqi" / "ct-3slice"                   # 3 CT slices
CT_UID = "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"


@pytest.fixture(scope="module")
def ct_and_mr(tmp_path_factory) -> Path:
    """A folder holding a real MR series (32 slices) and a real CT series (3 slices)."""
    folder = tmp_path_factory.mktemp("ct_and_mr")
    for prefix, series in (("mr", MR_SERIES), ("ct", CT_SERIES)):
        for file in series.iterdir():
            shutil.copy(file, folder / f"{prefix}_{file.name}")
    return folder


def test_channel_names_map_to_dicom_modalities():
    assert [channel_modality(c) for c in ("CT", "MRI", "T1", "t2 flair", "FLAIR", "noNorm", "PET")] == \
        ["CT", "MR", "MR", "MR", "MR", "", ""]
    assert modality(["T1", "T1ce", "T2", "FLAIR"]) == "MR" and modality(["CT"]) == "CT"
    assert modality(["noNorm", "MRI"]) == "noNorm, MRI" and modality([]) == "unknown"


@needs_data
def test_a_ct_model_reads_the_ct_series_though_the_mr_series_is_larger(ct_and_mr):
    volume, = read_channels([ct_and_mr], ["CT"])
    assert volume.shape == (3, 512, 512) and volume.metadata["dicom_modality"] == "CT"
    assert volume.metadata["note"] == (f"The folder {ct_and_mr.name} holds 2 image series; read the only CT series "
                                       f"(the model expects CT): 'no description' (UID {CT_UID}, 3 slices).")
    reference = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(CT_SERIES)))  # sorted by GDCM
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(reference))


@needs_data
@pytest.mark.parametrize("channel, why", [("MRI", "the only MR series (the model expects MR)"),
                                          ("noNorm", "the largest")])
def test_other_models_read_the_mr_series_and_say_why(ct_and_mr, channel, why):
    volume, = read_channels([ct_and_mr], [channel])
    assert volume.shape == (32, 51, 35) and volume.metadata["dicom_modality"] == "MR"
    assert f"; read {why}: 'HippoCrop' (UID 1.2.826." in volume.metadata["note"]
    assert volume.metadata["note"].endswith(", 32 slices).")


@needs_data
def test_a_series_uid_picks_that_series(ct_and_mr):
    volume = read_volume(ct_and_mr, series=CT_UID, modality="MR")
    assert volume.shape == (3, 512, 512)
    assert volume.metadata["note"] == (f"Read the series asked for, 'no description' (UID {CT_UID}, 3 slices), of 2 "
                                       f"image series in {ct_and_mr.name}.")


@needs_data
def test_a_uid_the_folder_does_not_hold_is_refused_with_what_it_holds(ct_and_mr):
    with pytest.raises(InputError) as refused:
        read_volume(ct_and_mr, series="1.2.3")
    text = str(refused.value)
    assert text.startswith(f"The folder {ct_and_mr.name} holds no image series with UID 1.2.3; it holds 'HippoCrop'")
    assert text.endswith(f"; 'no description' (UID {CT_UID}, 3 slices).") and "\n" not in text


@needs_data
def test_a_uid_for_a_file_is_refused(tmp_path):
    with pytest.raises(InputError, match="is a file, not a DICOM folder"):
        read_volume(DATA / "formats" / "dcmqi" / "liver_seg.nrrd", series=CT_UID)


@needs_data
def test_the_volume_names_its_slice_files_in_slice_order_and_its_label_map_keeps_them():
    volume = read_volume(MR_SERIES)
    files = volume.metadata[DICOM_SOURCE_FILES].splitlines()
    z = [float(sitk.ReadImage(f).GetOrigin()[2]) for f in files]
    assert len(files) == 32 and z == sorted(z)
    assert volume.with_array(np.zeros(volume.shape, np.uint8)).metadata[DICOM_SOURCE_FILES] == "\n".join(files)


# ------------------------------------------------------------------------------------------- slice geometry

def slices_of(function, positions, orientation, shape=(24, 22), spacing=0.8) -> np.ndarray:
    """int16 slices whose pixels hold function(x, y, z) of their own physical (LPS) position."""
    row, column = np.array(orientation[:3]), np.array(orientation[3:])
    j, i = np.mgrid[:shape[0], :shape[1]]
    points = [np.asarray(p)[:, None, None] + spacing * (i * row[:, None, None] + j * column[:, None, None])
              for p in positions]
    return np.array([np.round(function(*p)) for p in points], dtype=np.int16)


def physical_points(volume, k: int) -> np.ndarray:
    """(3, y, x): the LPS position of every voxel of slice k."""
    matrix = np.array(volume.direction).reshape(3, 3) * np.array(volume.spacing)
    j, i = np.mgrid[:volume.shape[1], :volume.shape[2]]
    index = np.stack([i, j, np.full_like(i, k)])
    return np.array(volume.origin)[:, None, None] + np.einsum("ab,bij->aij", matrix, index)


def ramp(x, y, z):
    return 100 + 10 * x + 20 * y + 30 * z


@pytest.mark.parametrize("gaps, count, step", [([2.0] * 5 + [4.0] + [2.0] * 5, 13, 2.0),     # one missing slice
                                               ([1, 1, 3, 1, 2, 2, 1, 3, 2, 1, 2], 11, 1.9)])  # uneven spacing
def test_unevenly_spaced_slices_are_resampled_where_they_were_acquired(tmp_path, gaps, count, step):
    positions = [(0.0, 0.0, z) for z in np.concatenate([[0.0], np.cumsum(gaps)]) - 40.0]
    axial = (1, 0, 0, 0, 1, 0)
    folder = write_dicom_series(tmp_path / "series", slices_of(ramp, positions, axial), positions)
    volume = read_volume(folder)
    assert volume.shape[0] == count and volume.spacing == pytest.approx((0.8, 0.8, step))
    assert volume.origin == pytest.approx(positions[0]) and volume.direction == pytest.approx(np.eye(3).ravel())
    for k in range(count):
        np.testing.assert_allclose(volume.array[k], ramp(*physical_points(volume, k)), atol=0.51)
    assert f"resampled onto {count} slices {step:g} mm apart" in volume.metadata["warning"]


def test_a_tilted_gantry_series_puts_every_voxel_where_it_was_acquired(tmp_path):
    angle = np.radians(20)
    tilted = (1, 0, 0, 0, np.cos(angle), -np.sin(angle))          # slices tilted about x, the table moves along z
    positions = [(5.0, -3.0, 2.0 * k) for k in range(12)]
    folder = write_dicom_series(tmp_path / "tilt", slices_of(ramp, positions, tilted), positions,
                                orientation=tilted)
    volume = read_volume(folder)
    normal = np.cross(tilted[:3], tilted[3:])
    assert volume.direction == pytest.approx(np.stack([tilted[:3], tilted[3:], normal], axis=1).ravel())
    assert volume.spacing == pytest.approx((0.8, 0.8, 2.0 * np.cos(angle)))
    for k in range(12):  # the rows every slice still covers after its shift along the plane (0.86 rows a slice)
        np.testing.assert_allclose(volume.array[k, :13], ramp(*physical_points(volume, k))[:13], atol=0.51)
    assert "tilted by 20 degrees (gantry tilt)" in volume.metadata["warning"]
    # ITK alone puts slices 2 mm apart along the tilted normal: far from where they were acquired.
    itk = sitk.ReadImage(sorted(str(p) for p in folder.iterdir()))
    assert np.linalg.norm(np.array(itk.TransformIndexToPhysicalPoint((0, 0, 11))) - positions[11]) > 7


def test_a_series_mixing_orientations_is_read_as_its_larger_part(tmp_path):
    axial, sagittal = (1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1)
    positions = [(0.0, 0.0, 2.0 * k) for k in range(10)] + [(2.0 * k, 0.0, 0.0) for k in range(4)]
    slices = np.concatenate([slices_of(ramp, positions[:10], axial), slices_of(ramp, positions[10:], sagittal)])
    folder = write_dicom_series(tmp_path / "mixed", slices, positions, orientation=[axial] * 10 + [sagittal] * 4)
    volume = read_volume(folder)
    assert volume.shape == (10, 24, 22) and "warning" not in volume.metadata
    np.testing.assert_array_equal(volume.array, slices[:10])
    assert volume.metadata["note"].endswith("read the largest: 'axial' (UID "
                                            f"{volume.metadata['dicom_series_uid']}, 10 slices; its axial slices, "
                                            "1 of 2 orientations).")


def test_regular_slices_are_read_as_itk_reads_them(tmp_path):
    positions = [(0.0, 0.0, 1.5 * k) for k in range(8)]
    folder = write_dicom_series(tmp_path / "regular", slices_of(ramp, positions, (1, 0, 0, 0, 1, 0)), positions)
    volume = read_volume(folder)
    itk = sitk.ReadImage(sorted(str(p) for p in folder.iterdir()))
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(itk))
    assert volume.spacing == pytest.approx(itk.GetSpacing()) and "warning" not in volume.metadata
