"""imageio: every supported format read as SimpleITK reads it, geometry kept through writes, one-sentence
errors for every user mistake, and writes that never leave a partial file.

Real files come from ../shared/data (tests using them skip when it is absent); the rest are real files
written here by SimpleITK itself.
"""
import gzip
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegmentMBTFELib.errors import InputError, SegmentError
from SegmentMBTFELib.io.images import atomic_output, is_dicom_folder, read_channels, read_volume, write_volume
from SegmentMBTFELib.io.sitk_volume import SUPPORTED_EXTENSIONS
from SegmentMBTFELib.volume import Volume

DATA = Path(__file__).parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real test data not found at {DATA}")
HIPPOCAMPUS_IMAGE = DATA / "hippocampus" / "train" / "images" / "hippocampus_001.nii.gz"
HIPPOCAMPUS_LABEL = DATA / "hippocampus" / "train" / "labels" / "hippocampus_001.nii.gz"
MESSY_CT = DATA / "formats" / "totalsegmentator" / "example_ct_dicom"
CT_3SLICE = DATA / "formats" / "dcmqi" / "ct-3slice"


def assert_same_as_simpleitk(volume: Volume, image: sitk.Image):
    array = sitk.GetArrayFromImage(image)
    assert volume.array.dtype == array.dtype
    np.testing.assert_array_equal(volume.array, array)
    assert volume.spacing == image.GetSpacing()
    assert volume.origin == image.GetOrigin()
    assert volume.direction == image.GetDirection()


def read_series_with_simpleitk(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def assert_one_line_error(call, *words):
    with pytest.raises(InputError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and message.endswith(".")
    for word in words:
        assert word in message
    return message


def oblique_volume(dtype=np.int16) -> Volume:
    c, s = math.cos(0.3), math.sin(0.3)
    array = (np.arange(4 * 5 * 6).reshape(4, 5, 6) * 7 % 251).astype(dtype)
    return Volume(array, spacing=(0.3, 0.7, 1.1), origin=(193.09599304199222, -1.1, 3.333333333333333),
                  direction=(c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))


# ------------------------------------------------------------------------------------- real formats

@needs_data
def test_nifti_reads_as_simpleitk_reads_it():
    volume = read_volume(HIPPOCAMPUS_IMAGE)
    assert_same_as_simpleitk(volume, sitk.ReadImage(str(HIPPOCAMPUS_IMAGE)))
    assert volume.shape == (35, 51, 35)
    assert volume.name == "hippocampus_001"
    assert volume.metadata["format"] == "NIfTI" and volume.metadata["dimension"] == "3"


@needs_data
@pytest.mark.parametrize("name", ["liver_seg.nrrd", "partial_overlaps-1.nrrd"])
def test_nrrd_reads_as_simpleitk_reads_it(name):
    path = DATA / "formats" / "dcmqi" / name
    volume = read_volume(path)
    assert_same_as_simpleitk(volume, sitk.ReadImage(str(path)))
    assert volume.shape == (3, 512, 512) and volume.array.dtype == np.int16
    assert volume.metadata["format"] == "NRRD"


@needs_data
@pytest.mark.parametrize("folder, size", [("11_HCropVolume", (34, 50, 40)), ("13_HCropVolume", (35, 51, 32)),
                                          ("14_HCropVolume", (36, 48, 35))])
def test_hippocampus_dicom_series_reads_as_simpleitk_reads_it(folder, size):
    path = DATA / "hippocampus" / "dicom" / folder
    volume = read_volume(path)
    assert_same_as_simpleitk(volume, read_series_with_simpleitk(path))
    assert volume.shape == size[::-1] and volume.spacing == (1.0, 1.0, 1.0)
    assert volume.metadata["format"] == "DICOM" and volume.metadata["dicom_modality"] == "MR"
    assert volume.metadata["dicom_files"] == str(size[2]) and volume.metadata["dicom_series_count"] == "1"
    assert volume.metadata["dicom_series_uid"].startswith("1.2.826.")
    assert is_dicom_folder(path)


@needs_data
def test_messy_ct_series_with_empty_uids_reads_in_place():
    volume = read_volume(MESSY_CT)
    assert_same_as_simpleitk(volume, read_series_with_simpleitk(MESSY_CT))
    assert volume.shape == (20, 512, 512) and volume.spacing == (0.9765625, 0.9765625, 2.0)
    assert volume.metadata["dicom_series_uid"] == "" and volume.metadata["dicom_modality"] == "CT"
    assert "warning" not in volume.metadata
    # The TotalSegmentator label map made from this series (stored flipped in y) covers the same box.
    label = sitk.ReadImage(str(MESSY_CT.parent / "example_seg_dicom.nii.gz"))
    np.testing.assert_allclose(sorted(corners(volume)), sorted(corners_of_image(label)), atol=1e-3)


def corners(volume: Volume):
    matrix = np.array(volume.direction).reshape(3, 3) * volume.spacing
    last = np.array(volume.shape[::-1]) - 1
    return [tuple(volume.origin + matrix @ (last * np.array(c))) for c in np.ndindex(2, 2, 2)]


def corners_of_image(image: sitk.Image):
    last = np.array(image.GetSize()) - 1
    return [image.TransformContinuousIndexToPhysicalPoint((last * np.array(c)).tolist())
            for c in np.ndindex(2, 2, 2)]


@needs_data
def test_three_slice_ct_keeps_the_pixel_type_gdcm_gives():
    volume = read_volume(CT_3SLICE)
    assert_same_as_simpleitk(volume, read_series_with_simpleitk(CT_3SLICE))
    assert volume.shape == (3, 512, 512) and volume.spacing[0] == pytest.approx(0.810547)


@needs_data
def test_folder_with_two_series_reads_the_one_with_most_files(tmp_path):
    for file in (DATA / "hippocampus" / "dicom" / "13_HCropVolume").iterdir():
        shutil.copy(file, tmp_path / f"mr_{file.name}")
    for file in CT_3SLICE.iterdir():
        shutil.copy(file, tmp_path / f"ct_{file.name}")
    volume = read_volume(tmp_path)
    assert volume.shape == (32, 51, 35) and volume.metadata["dicom_modality"] == "MR"
    assert volume.metadata["dicom_series_count"] == "2"
    assert "2 image series" in volume.metadata["note"] and "32" in volume.metadata["note"]


@needs_data
def test_folder_mixing_two_copies_of_a_series_is_refused(tmp_path):
    for file in CT_3SLICE.iterdir():
        shutil.copy(file, tmp_path / f"a_{file.name}")
        shutil.copy(file, tmp_path / f"b_{file.name}")
    assert_one_line_error(lambda: read_volume(tmp_path), "same position")


@needs_data
def test_series_with_a_missing_slice_is_regularized_as_slicer_does(tmp_path):
    """Slicer's acquisition geometry regularization, hardened: the slices stay where they were acquired and
    the missing one is filled in between its neighbours, on the full series' own grid."""
    full_path = DATA / "hippocampus" / "dicom" / "13_HCropVolume"
    files = sorted(full_path.iterdir(), key=lambda p: int(p.stem))
    for file in files[:10] + files[11:]:
        shutil.copy(file, tmp_path / file.name)
    volume, full = read_volume(tmp_path), read_volume(full_path)
    assert volume.same_geometry(full) and volume.shape[0] == 32
    kept = [k for k in range(32) if k != 10]
    np.testing.assert_array_equal(volume.array[kept], full.array[kept])
    np.testing.assert_allclose(volume.array[10], (full.array[9].astype(np.float32) + full.array[11]) / 2)
    assert "Slice spacing varies from 1 to 2 mm" in volume.metadata["warning"]
    assert "resampled onto 32 slices 1 mm apart" in volume.metadata["warning"]


@needs_data
def test_folder_of_dicom_segmentations_only_is_refused():
    folder = DATA / "formats" / "dcmqi"  # liver.dcm and partial_overlaps.dcm are DICOM SEG objects
    assert_one_line_error(lambda: read_volume(folder), "without an image")


def test_metaimage_reads_as_simpleitk_reads_it(tmp_path):
    for extension in (".mha", ".mhd"):
        path = tmp_path / f"image{extension}"
        sitk.WriteImage(volume_image(oblique_volume(np.float32)), str(path))
        volume = read_volume(path)
        assert_same_as_simpleitk(volume, sitk.ReadImage(str(path)))
        assert volume.metadata["format"] == "MetaImage" and volume.name == "image"


def volume_image(volume: Volume) -> sitk.Image:
    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction)
    return image


# ------------------------------------------------------------------------------------- dimensions

def test_2d_image_becomes_one_flagged_slice(tmp_path):
    image = sitk.GetImageFromArray(np.arange(30, dtype=np.float32).reshape(5, 6))
    image.SetSpacing((0.5, 0.25))
    image.SetOrigin((10.0, 20.0))
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(image, str(path))
    volume = read_volume(path)
    assert volume.shape == (1, 5, 6) and volume.metadata["dimension"] == "2"
    assert volume.spacing == (0.5, 0.25, 1.0) and volume.origin == (10.0, 20.0, 0.0)
    np.testing.assert_array_equal(volume.array[0], sitk.GetArrayFromImage(image))


def test_4d_image_with_one_volume_reads_as_3d(tmp_path):
    image = sitk.JoinSeries([volume_image(oblique_volume())])
    path = tmp_path / "one.nrrd"
    sitk.WriteImage(image, str(path))
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.array, oblique_volume().array)
    assert volume.spacing == pytest.approx(oblique_volume().spacing)


@pytest.mark.parametrize("extension", [".nii.gz", ".nrrd"])
def test_4d_image_is_refused(tmp_path, extension):
    image = sitk.JoinSeries([volume_image(oblique_volume())] * 2)
    path = tmp_path / f"series{extension}"
    sitk.WriteImage(image, str(path))
    assert_one_line_error(lambda: read_volume(path), "4D", path.name)


@pytest.mark.parametrize("extension", [".nii.gz", ".mha"])
def test_vector_image_is_refused(tmp_path, extension):
    path = tmp_path / f"rgb{extension}"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.uint8), isVector=True), str(path))
    assert_one_line_error(lambda: read_volume(path), "3 values per voxel", path.name)


# ------------------------------------------------------------------------------------- user mistakes

def test_missing_path(tmp_path):
    assert_one_line_error(lambda: read_volume(tmp_path / "nothing.nii.gz"), "not found", "nothing.nii.gz")


@needs_data
def test_truncated_nifti_gz_is_refused(tmp_path):
    """ITK itself reads a truncated .nii.gz without complaint, zero-filling the missing voxels."""
    data = HIPPOCAMPUS_IMAGE.read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    assert sitk.ReadImage(str(path)).GetSize() == (35, 51, 35)  # the silent zero fill this guards against
    assert_one_line_error(lambda: read_volume(path), "truncated", "truncated.nii.gz")


@needs_data
def test_truncated_uncompressed_nifti_is_refused(tmp_path):
    path = tmp_path / "truncated.nii"
    path.write_bytes(gzip.decompress(HIPPOCAMPUS_IMAGE.read_bytes())[:20000])
    assert_one_line_error(lambda: read_volume(path), "truncated")


@pytest.mark.parametrize("extension", [".nrrd", ".mha"])
def test_truncated_nrrd_and_metaimage_are_refused(tmp_path, extension):
    whole = tmp_path / f"whole{extension}"
    sitk.WriteImage(volume_image(oblique_volume(np.float32)), str(whole))
    path = tmp_path / f"truncated{extension}"
    path.write_bytes(whole.read_bytes()[:-100])
    assert_one_line_error(lambda: read_volume(path), "could not be read", path.name)


@needs_data
def test_multi_member_gzip_nifti_is_complete(tmp_path):
    """The quick size check at the end of a gzip file does not reject a valid multi-member file."""
    data = gzip.decompress(HIPPOCAMPUS_IMAGE.read_bytes())
    path = tmp_path / "members.nii.gz"
    path.write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))
    np.testing.assert_array_equal(read_volume(path).array, read_volume(HIPPOCAMPUS_IMAGE).array)


def test_text_file_named_nifti_is_refused(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("these are not voxels\n")
    assert_one_line_error(lambda: read_volume(path), "could not be read as a NIfTI image", "notes.nii.gz")


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.nrrd"
    path.write_bytes(b"")
    assert_one_line_error(lambda: read_volume(path), "could not be read")


def test_unsupported_extension_lists_the_supported_ones(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"\x89PNG")
    message = assert_one_line_error(lambda: read_volume(path), "photo.png")
    for extension in SUPPORTED_EXTENSIONS:
        assert extension in message
    assert "DICOM" in message


@needs_data
def test_single_dicom_file_asks_for_its_folder():
    assert_one_line_error(lambda: read_volume(CT_3SLICE / "01.dcm"), "folder")


def test_empty_folder(tmp_path):
    assert not is_dicom_folder(tmp_path)
    assert_one_line_error(lambda: read_volume(tmp_path), "no DICOM series", str(tmp_path))


def test_folder_of_image_files_asks_for_the_file(tmp_path):
    sitk.WriteImage(volume_image(oblique_volume()), str(tmp_path / "a.nii.gz"))
    assert_one_line_error(lambda: read_volume(tmp_path), "give the image file itself")


# ------------------------------------------------------------------------------------- channels

@needs_data
def test_channels_on_one_grid_are_read_in_order():
    volumes = read_channels([HIPPOCAMPUS_IMAGE, HIPPOCAMPUS_LABEL])
    assert [v.name for v in volumes] == ["hippocampus_001", "hippocampus_001"]
    assert volumes[0].array.max() > 3 and set(np.unique(volumes[1].array)) == {0, 1, 2}


@needs_data
def test_channels_on_different_grids_name_both_files():
    other = DATA / "hippocampus" / "train" / "images" / "hippocampus_003.nii.gz"
    message = assert_one_line_error(lambda: read_channels([HIPPOCAMPUS_IMAGE, other]),
                                    "hippocampus_001.nii.gz", "hippocampus_003.nii.gz")
    assert "size 35x51x35 vs" in message


def test_channels_differing_only_in_origin(tmp_path):
    volume = oblique_volume()
    shifted = Volume(volume.array, volume.spacing, (0.0, 0.0, 0.0), volume.direction)
    write_volume(volume, tmp_path / "t1.nrrd")
    write_volume(shifted, tmp_path / "t2.nrrd")
    assert_one_line_error(lambda: read_channels([tmp_path / "t1.nrrd", tmp_path / "t2.nrrd"]),
                          "origin", "t1.nrrd", "t2.nrrd")


def test_no_channels():
    assert_one_line_error(lambda: read_channels([]), "No input image")


# ------------------------------------------------------------------------------------- writing

# NIfTI stores geometry as 32-bit floats; NRRD writes spacing x direction as 17 digits; MetaImage is exact.
@pytest.mark.parametrize("extension, tolerance", [(".nii.gz", 1e-6), (".nii", 1e-6), (".nrrd", 1e-14),
                                                  (".mha", 0.0)])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_write_keeps_voxels_and_geometry(tmp_path, extension, tolerance, dtype):
    volume = oblique_volume(dtype)
    path = write_volume(volume, tmp_path / "new" / "folder" / f"out{extension}")
    written = read_volume(path)
    assert written.array.dtype == dtype
    np.testing.assert_array_equal(written.array, volume.array)
    for what in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(getattr(written, what), getattr(volume, what), rtol=tolerance, atol=tolerance)
    assert sorted(p.name for p in path.parent.iterdir()) == [f"out{extension}"]


@needs_data
@pytest.mark.parametrize("extension", [".nii.gz", ".nrrd", ".mha"])
def test_real_image_survives_a_write(tmp_path, extension):
    original = read_volume(MESSY_CT)
    written = read_volume(write_volume(original, tmp_path / f"ct{extension}"))
    np.testing.assert_array_equal(written.array, original.array)
    assert written.origin == pytest.approx(original.origin, abs=1e-4)
    assert written.spacing == pytest.approx(original.spacing, abs=1e-6)


def test_compress_flag(tmp_path):
    noise = Volume(np.zeros((20, 30, 40), np.int16))
    small = write_volume(noise, tmp_path / "small.nrrd", compress=True)
    large = write_volume(noise, tmp_path / "large.nrrd", compress=False)
    assert small.stat().st_size < large.stat().st_size / 10
    assert gzip.open(write_volume(noise, tmp_path / "a.nii.gz")).read(4)  # a real gzip stream


def test_write_refuses_two_file_formats_and_unknown_extensions(tmp_path):
    for name in ("out.mhd", "out.nhdr", "out.png"):
        with pytest.raises(InputError):
            write_volume(oblique_volume(), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_nifti_write_refuses_a_sheared_orientation(tmp_path):
    """ITK's NIfTI writer would silently straighten it, moving every voxel."""
    sheared = Volume(np.zeros((2, 3, 4), np.uint8), direction=(1, 0, 0, 0, 1, 0.6, 0, 0, 0.8))
    with pytest.raises(SegmentError, match="sheared"):
        write_volume(sheared, tmp_path / "out.nii.gz")
    written = read_volume(write_volume(sheared, tmp_path / "out.nrrd"))
    np.testing.assert_allclose(written.direction, sheared.direction, atol=1e-12)
    assert not (tmp_path / "out.nii.gz").exists()


def test_failure_inside_an_atomic_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "result.nii.gz"
    target.write_bytes(b"previous result")
    for failure in (RuntimeError("writer failed"), KeyboardInterrupt()):
        with pytest.raises((SegmentError, KeyboardInterrupt)):
            with atomic_output(target) as temporary:
                temporary.write_bytes(b"half a file")
                raise failure
        assert target.read_bytes() == b"previous result"
        assert [p.name for p in tmp_path.iterdir()] == ["result.nii.gz"]


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file size limits")
def test_disk_full_leaves_no_file(tmp_path):
    """A file size limit makes the real writers fail part way, as a full disk does.

    ITK's NIfTI writer only prints a message on a short write; write_volume must still notice.
    One subprocess (the limit must not hit pytest itself) tries every format.
    """
    script = textwrap.dedent(f"""
        import resource, signal
        import numpy as np
        from SegmentMBTFELib.errors import SegmentError
        from SegmentMBTFELib.io.images import write_volume
        from SegmentMBTFELib.volume import Volume
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        noise = Volume(np.random.default_rng(0).random((20, 50, 50), dtype=np.float32))
        for extension in (".nii.gz", ".nii", ".nrrd", ".mha"):
            try:
                write_volume(noise, {str(tmp_path)!r} + "/out" + extension)
                print(extension, "written")
            except SegmentError as error:
                print(extension, "SegmentError:", error)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    lines = result.stdout.splitlines()
    assert len(lines) == 4, result.stdout + result.stderr
    for line in lines:
        assert "SegmentError: Could not write" in line
    assert os.listdir(tmp_path) == []


def test_write_into_a_path_below_a_file_fails_cleanly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SegmentError, match="output folder"):
        write_volume(oblique_volume(), blocker / "out.nrrd")


# ------------------------------------------------------------------- NIfTI: what ITK repairs silently

def nifti_variant(path: Path, array: np.ndarray, kind: str) -> Path:
    """A NIfTI-1 file written by nibabel, little- or big-endian."""
    nibabel = pytest.importorskip("nibabel")
    cls = nibabel.Nifti1Image
    image = cls(array.transpose(2, 1, 0), np.diag([0.8, 0.9, 2.0, 1.0]))
    if kind == "big-endian":
        image = cls(image.dataobj, image.affine, image.header.as_byteswapped(">"))
    nibabel.save(image, str(path))
    return path


@pytest.mark.parametrize("kind", ["little-endian", "big-endian"])
def test_nifti_raw_header_and_voxels_are_checked(tmp_path, kind):
    import nibabel
    array = np.random.default_rng(0).random((6, 7, 8), dtype=np.float32)
    good = read_volume(nifti_variant(tmp_path / "good.nii.gz", array, kind))
    np.testing.assert_array_equal(good.array, array)
    assert good.spacing == pytest.approx((0.8, 0.9, 2.0))

    array[2, 3, 4], array[5, 6, 7] = np.nan, np.inf
    path = nifti_variant(tmp_path / "nan.nii.gz", array, kind)
    assert not np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).any()  # ITK made them 0
    assert_one_line_error(lambda: read_volume(path), "nan.nii.gz contains 2 NaN or infinite voxels")

    zero = nifti_variant(tmp_path / "zero.nii.gz", np.ones((6, 7, 8), np.int16), kind)
    loaded = nibabel.load(str(zero))
    header = loaded.header.copy()
    pixdim = header["pixdim"]
    pixdim[1] = 0
    header["pixdim"] = pixdim
    raw = gzip.decompress(zero.read_bytes())
    zero.write_bytes(gzip.compress(header.binaryblock + raw[len(header.binaryblock):]))
    assert sitk.ReadImage(str(zero)).GetSpacing()[0] == 1.0  # ITK made it 1 mm
    assert_one_line_error(lambda: read_volume(zero), "zero.nii.gz has a voxel spacing of 0 mm along x")
