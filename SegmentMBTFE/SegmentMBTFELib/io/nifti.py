"""What ITK's NIfTI reader hides: a NIfTI file's raw header and float voxels, read to check them.

ITK reads NIfTI through nifti1_io, which quietly repairs what it cannot use: a voxel spacing of 0 becomes
1 mm, a negative one its absolute value (flipping the axis), NaN and infinite voxels become 0, and of the
header's two orientations (qform, sform) one is chosen without a word when they disagree. A model would
then segment another image than the file holds, and nnU-Net (which reads with SimpleITK) would too. So
images.py reads the header here (NIfTI-1's 348 bytes, either byte order, gzipped or not) and, for float
images, the voxel values, to refuse such a file or to say which orientation was used. (NIfTI-2 files
SimpleITK does not read at all; they are only recognised, to say so.)
"""
import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

# datatype code -> numpy type, for the float types whose voxels can be NaN or infinite
_FLOAT_TYPES = {16: "f4", 64: "f8", 1536: "f16"}
_CHUNK = 1 << 24


@dataclass
class NiftiHeader:
    dims: Tuple[int, ...]          # dim[1..dim[0]]
    datatype: int
    pixdim: Tuple[float, ...]      # pixdim[0] (qfac), then one per dimension
    vox_offset: int
    qform_code: int
    sform_code: int
    quatern: Tuple[float, float, float]
    qoffset: Tuple[float, float, float]
    srow: np.ndarray               # 3 x 4
    endian: str                    # "<" or ">"

    @property
    def spatial_spacing(self) -> Tuple[float, ...]:
        return tuple(self.pixdim[1:1 + min(3, len(self.dims))])


def read_header(path) -> Optional[NiftiHeader]:
    """The header of a NIfTI-1 file, or None when the bytes are not one (ITK then says why)."""
    raw = _first_bytes(path, 348)
    for endian in "<>":
        if len(raw) == 348 and struct.unpack(endian + "i", raw[:4])[0] == 348:
            return _nifti1(raw, endian)
    return None


def is_nifti2(path) -> bool:
    """Whether the file is NIfTI-2 (540-byte header), which SimpleITK does not read."""
    raw = _first_bytes(path, 4)
    return len(raw) == 4 and 540 in (struct.unpack("<i", raw)[0], struct.unpack(">i", raw)[0])


def _first_bytes(path, count: int) -> bytes:
    try:
        with _open(path) as file:
            return file.read(count)
    except (OSError, EOFError, zlib.error):
        return b""


def _nifti1(raw: bytes, e: str) -> NiftiHeader:
    dim = struct.unpack_from(e + "8h", raw, 40)
    srow = np.array(struct.unpack_from(e + "12f", raw, 280), dtype=float).reshape(3, 4)
    return NiftiHeader(tuple(dim[1:1 + max(0, min(dim[0], 7))]), struct.unpack_from(e + "h", raw, 70)[0],
                       struct.unpack_from(e + "8f", raw, 76), int(struct.unpack_from(e + "f", raw, 108)[0]),
                       *struct.unpack_from(e + "2h", raw, 252), struct.unpack_from(e + "3f", raw, 256),
                       struct.unpack_from(e + "3f", raw, 268), srow, e)


def _open(path):
    path = Path(path)
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


# ---------------------------------------------------------------------------------------------- checks

def spacing_problem(header: NiftiHeader) -> str:
    """'' when every spatial voxel spacing is a positive number, else what is wrong, in words."""
    for axis, value in zip("xyz", header.spatial_spacing):
        if not np.isfinite(value) or value <= 0:
            return f"a voxel spacing of {value:g} mm along {axis}"
    return ""


def non_finite_voxels(path, header: NiftiHeader) -> int:
    """How many voxels of a float NIfTI are NaN or infinite (0 for integer types), reading the raw data."""
    code = _FLOAT_TYPES.get(header.datatype)
    if code is None:
        return 0
    dtype = np.dtype(header.endian + code)
    count, rest = 0, b""
    with _open(path) as file:
        _skip(file, header.vox_offset)
        while chunk := file.read(_CHUNK):
            chunk = rest + chunk
            usable = len(chunk) - len(chunk) % dtype.itemsize
            count += int(np.count_nonzero(~np.isfinite(np.frombuffer(chunk[:usable], dtype))))
            rest = chunk[usable:]
    return count


def _skip(file, count: int):
    while count > 0:
        block = file.read(min(count, _CHUNK))
        if not block:
            return
        count -= len(block)


def orientation_disagreement(header: NiftiHeader, itk_corners_ras: np.ndarray) -> str:
    """'' unless the header sets both a qform and an sform that place the image differently; then a note
    saying by how much, and which of the two ITK used (given the corners of the image as ITK placed it)."""
    if header.qform_code <= 0 or header.sform_code <= 0 or len(header.dims) < 3:
        return ""
    corners = _corner_indices(header.dims[:3])
    q = _apply(_qform_affine(header), corners)
    s = _apply(np.vstack([header.srow, [0, 0, 0, 1]]), corners)
    apart = float(np.max(np.linalg.norm(q - s, axis=1)))
    if apart <= 0.1 * min(abs(p) for p in header.spatial_spacing if p) or not np.isfinite(apart):
        return ""
    used = "sform" if np.max(np.abs(s - itk_corners_ras)) <= np.max(np.abs(q - itk_corners_ras)) else "qform"
    return (f"its header's two orientations (qform and sform) disagree by up to {apart:.1f} mm; the {used} was "
            "used, as ITK (and so nnU-Net and 3D Slicer) reads it")


def _corner_indices(dims) -> np.ndarray:
    return np.array([[i, j, k] for i in (0, dims[0] - 1) for j in (0, dims[1] - 1) for k in (0, dims[2] - 1)],
                    dtype=float)


def _apply(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ affine[:3, :3].T + affine[:3, 3]


def _qform_affine(header: NiftiHeader) -> np.ndarray:
    """The qform's voxel-to-RAS matrix (NIfTI-1 standard, method 2)."""
    b, c, d = header.quatern
    a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    rotation = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                         [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                         [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
    qfac = -1.0 if header.pixdim[0] < 0 else 1.0
    scale = np.array([abs(header.pixdim[1]), abs(header.pixdim[2]), abs(header.pixdim[3]) * qfac])
    affine = np.eye(4)
    affine[:3, :3] = rotation * scale
    affine[:3, 3] = header.qoffset
    return affine
