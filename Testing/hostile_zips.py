"""Model zips as they reach users: packed like nnU-Net's export, and the hostile or broken ones an attacker, a
cut-short download or another tool makes. Written with Python's zipfile (what such zips are usually made with),
except the zip bomb, whose deflate stream is assembled from one compressed block repeated (compressing 33 GB of
zeros would take minutes); it is a valid zip whose members really unpack to what their entries declare.
Used by safety_catalogue.py and test_model_management.py.
"""
from __future__ import annotations

import pickle
import stat
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Optional

import torch


def export_layout_zip(model: Path, path: Path, extra: Optional[Callable[[zipfile.ZipFile], None]] = None,
                      stored: bool = False) -> Path:
    """A trained model folder zipped as nnUNetv2_export_model_to_zip lays it out (`Dataset/Trainer__Plans__c/...`);
    `extra(archive)` adds members; `stored`: checkpoints uncompressed (for damaging their bytes)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(p for p in model.rglob("*") if p.is_file()):
            name = f"{model.parent.name}/{model.name}/{file.relative_to(model).as_posix()}"
            archive.write(file, name, zipfile.ZIP_STORED if stored and file.suffix == ".pth" else None)
        if extra:
            extra(archive)
    return path


def special_member(name: str, kind: int, content: str = "") -> Callable[[zipfile.ZipFile], None]:
    """Adds a member of another file type (stat.S_IFLNK, S_IFIFO...), as `zip --symlinks` records it (Unix)."""
    def add(archive: zipfile.ZipFile):
        info = zipfile.ZipInfo(name)
        info.create_system = 3
        info.external_attr = (kind | 0o777) << 16
        archive.writestr(info, content)
    return add


def plain_member(name: str, content: bytes = b"x") -> Callable[[zipfile.ZipFile], None]:
    """Adds a member under exactly this name (zipfile keeps '/...' and '../' as given to writestr)."""
    return lambda archive: archive.writestr(zipfile.ZipInfo(name), content)


def damage_member(path: Path, name: str) -> Path:
    """Flip bytes in the middle of a stored member's data, as a bad disk or transfer does (its CRC no longer fits)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    middle = info.header_offset + 30 + name_length + extra_length + info.compress_size // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))
    return path


def zip_bomb(path: Path, gib: int) -> Path:
    """`gib` members of 1 GiB of zeros each, about 1 MB compressed apiece."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(1 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)  # state reset: repeatable
    stream = block * 1024 + compressor.flush()
    crc = 0
    for _ in range(1024):
        crc = zlib.crc32(bytes(1 << 20), crc)
    local, central = bytearray(), bytearray()
    for i in range(gib):
        name = f"zeros/{i:03d}.bin".encode()
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, crc, len(stream), 1 << 30,
                               len(name), 0, 0, 0, 0, 0, len(local)) + name
        local += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(stream), 1 << 30, len(name), 0)
        local += name + stream
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, gib, gib, len(central), len(local), 0)
    path.write_bytes(bytes(local + central + end))
    return path


def many_members_zip(path: Path, count: int) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(count):
            archive.writestr(f"files/{i:05d}.txt", b"")
    return path


def documents_zip(path: Path) -> Path:
    """A zip that holds no model: a photo and notes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("holiday/beach.jpg", b"\xff\xd8\xff\xe0" + bytes(2000))
        archive.writestr("holiday/notes.txt", "sunny")
    return path


def nnunet_v1_zip(path: Path) -> Path:
    """The layout of nnU-Net v1's exported models (`nnUNet/<configuration>/TaskNNN_Name/<trainer>__<plans>/`),
    its files written by the libraries v1 used: pickle for plans.pkl and .model.pkl, torch for .model."""
    folder = "nnUNet/3d_fullres/Task004_Hippocampus/nnUNetTrainerV2__nnUNetPlansv2.1"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{folder}/plans.pkl", pickle.dumps({"num_stages": 1, "plans_per_stage": {0: {}}}))
        with archive.open(f"{folder}/fold_0/model_final_checkpoint.model", "w") as member:
            torch.save({"epoch": 1000, "state_dict": {"conv.weight": torch.zeros(2, 1, 3, 3, 3)}}, member)
        archive.writestr(f"{folder}/fold_0/model_final_checkpoint.model.pkl",
                         pickle.dumps({"name": "nnUNetTrainerV2", "init": ()}))
    return path


SYMLINK, FIFO = stat.S_IFLNK, stat.S_IFIFO
