"""Real files in real formats, made the way broken converters, hand edits and odd scanners make them.

Every file is written by the library that owns the format (SimpleITK for images, nibabel for NIfTI headers,
pydicom for DICOM, torch for checkpoints, json for model folders) and then, where the case needs it, edited
the way a user's file gets damaged: a header field changed, a file cut, another file put in its place.
Used by safety_catalogue.py and the tests around it.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch


def smooth_volume(shape=(20, 24, 22), seed=0) -> np.ndarray:
    """A float32 volume with structure (smoothed noise around 200), so a random network predicts several labels."""
    from scipy.ndimage import gaussian_filter
    noise = np.random.default_rng(seed).normal(size=shape)
    return (gaussian_filter(noise, 2) * 300 + 200).astype(np.float32)


def write_image(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                direction=None, vector: bool = False) -> Path:
    image = sitk.GetImageFromArray(array, isVector=vector)
    dimension = image.GetDimension()
    image.SetSpacing(tuple(spacing)[:dimension] + (1.0,) * max(0, dimension - len(spacing)))
    image.SetOrigin(tuple(origin)[:dimension] + (0.0,) * max(0, dimension - len(origin)))
    if direction is not None:
        image.SetDirection(direction)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return Path(path)


def edit_nifti_header(path: Path, **fields) -> Path:
    """Change header fields of a (gzipped) NIfTI-1 file as a broken converter would; `pixdim2=0` sets
    pixdim[2]. The voxel data is left as it is."""
    import nibabel
    raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    header = nibabel.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    for key, value in fields.items():
        if key.startswith("pixdim"):
            pixdim = header["pixdim"]
            pixdim[int(key[len("pixdim"):])] = value
            header["pixdim"] = pixdim
        else:
            header[key] = value
    edited = header.binaryblock + raw[348:]
    path.write_bytes(gzip.compress(edited) if path.name.endswith(".gz") else edited)
    return path


def nifti_with_two_orientations(path: Path, array: np.ndarray, shift_mm: float) -> Path:
    """A NIfTI whose qform and sform disagree: the sform moved by `shift_mm` and scaled, as some tools leave it."""
    import nibabel
    image = nibabel.Nifti1Image(array.transpose(2, 1, 0), None)  # nibabel is x-y-z
    image.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    sform = np.diag([1.0, 1.0, 1.0, 1.0])
    sform[:3, 3] = [shift_mm, 0.0, 0.0]
    image.set_sform(sform, code=2)
    nibabel.save(image, str(path))
    return path


def edit_nrrd_header(path: Path, old: str, new: str) -> Path:
    """Replace text in a NRRD file's header (an uncompressed one written by SimpleITK)."""
    data = path.read_bytes()
    end = data.index(b"\n\n")
    header = data[:end].decode()
    assert old in header, header
    path.write_bytes(header.replace(old, new).encode() + data[end:])
    return path


def copy_model(model: Path, where: Path) -> Path:
    target = where / "model" / model.parent.name / model.name
    shutil.copytree(model, target, symlinks=True)
    return target


def edit_json(path: Path, edit: Callable[[dict], None]) -> Path:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, ensure_ascii=False))
    return path


def edit_checkpoint(model: Path, edit: Callable[[dict], None], fold: str = "0") -> Path:
    path = model / f"fold_{fold}" / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # our own file
    edit(checkpoint)
    torch.save(checkpoint, path)
    return path


def write_dicom_series(folder: Path, volume: np.ndarray, positions: Optional[Sequence] = None,
                       pixel_spacing=(0.8, 0.8), series_number: int = 1, description: str = "axial",
                       series_uid: Optional[str] = None, first_instance: int = 1,
                       orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), modality: str = "CT") -> Path:
    """One CT (or MR) slice file per z of `volume` (int16, z-y-x) written with pydicom, at the given positions:
    z in mm, or (x, y, z) per slice; `orientation` is Image Orientation (Patient), one per slice or for all."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
    folder.mkdir(parents=True, exist_ok=True)
    positions = list(positions if positions is not None else np.arange(volume.shape[0]) * 2.0)
    positions = [list(map(float, p)) if np.ndim(p) else [0.0, 0.0, float(p)] for p in positions]
    orientations = [list(map(float, o)) for o in (orientation if np.ndim(orientation) == 2
                                                  else [orientation] * len(positions))]
    storage = MRImageStorage if modality == "MR" else CTImageStorage
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid(entropy_srcs=[str(folder.parent)])
    for k, position in enumerate(positions):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = storage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = storage, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.PatientName, ds.Modality = "SAFETY", "Safety^Test", modality
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = series_number, first_instance + k, description
        ds.FrameOfReferenceUID = study_uid
        ds.ImagePositionPatient = position
        ds.ImageOrientationPatient = orientations[k]
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = 2.0
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(volume[k], dtype="<i2").tobytes()
        ds.save_as(folder / f"s{series_number}_{k:03d}.dcm", enforce_file_format=True)
    return folder


# ----------------------------------------------------------------------------------- environments

def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                              capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


UNSHARE = sys.platform.startswith("linux") and _unshare_works()


def read_only_prefix(folder: Path) -> Optional[list]:
    """A command prefix under which `folder` cannot be written: a read-only bind mount in a private mount
    namespace (real EROFS, also for root, who ignores permission bits), else the folder's permission bits
    (real EACCES, for a user that is not root). None when neither is possible here."""
    if UNSHARE:
        script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
        return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(folder)]
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    return None


def full_disk_prefix(folder: Path, size_kb: int = 16) -> list:
    """A command prefix under which writing more than `size_kb` into `folder` fails as on a full disk: a
    tmpfs of that size mounted there (real ENOSPC) in a private mount namespace; where unprivileged
    namespaces are not allowed, a file size limit (RLIMIT_FSIZE: the write fails with EFBIG instead).
    The command's stdout ends with a line `LEFT:[names]` listing what it left in `folder`."""
    if UNSHARE:
        script = ('mount -t tmpfs -o size=%dk tmpfs "$0" || exit 99; "$@"; code=$?; '
                  'echo "LEFT:[$(ls -A "$0" | tr "\\n" " ")]"; exit $code') % size_kb
        return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(folder)]
    limit = ("import os, resource, signal, subprocess, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size_kb * 1024}, {size_kb * 1024})); "
             "code = subprocess.call(sys.argv[2:]); print('LEFT:[' + ' '.join(os.listdir(sys.argv[1])) + ']'); "
             "sys.exit(code)")
    return [sys.executable, "-c", limit, str(folder)]
