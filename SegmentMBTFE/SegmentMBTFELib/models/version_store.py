"""How model versions are kept on disk (versions.py uses them): a version folder's version.json, the family's
identity (the SHA-256 of the original's checkpoints, remembered per file), a version folder checked against its
record, JSON written atomically, and the lock files that name the program holding them.
"""
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import ModelError
from .folder import ModelFolder, find_trained_folder, fold_folders_in
from .trained_folder import folds_holding

VERSION_FILE = "version.json"
ORIGINAL = "original"     # the version id of the model itself
CHECKPOINT = ModelFolder.CHECKPOINTS["final"]
VERSION_ID = re.compile(r"^v(\d+)$")
LOCK_STALE_S = 300
HOLDER_FILE = ".holder.json"   # in a version being written: which program writes it
FAMILY_KEY = re.compile(r"^[A-Za-z0-9_.-]{0,80}-[0-9a-f]{12}$")


class Unidentified(ModelError):
    """The folder is not a model whose checkpoints can identify it (missing, no checkpoints...)."""


def version_root(path: Path) -> Optional[Path]:
    """The version folder holding `path` (the folder itself or its trained child), or None."""
    if (path / VERSION_FILE).is_file():
        return path
    if (path / "plans.json").is_file() and (path.parent / VERSION_FILE).is_file():
        return path.parent
    return None


def read_version_file(root: Path) -> dict:
    """A version folder's version.json, checked where it names other places: its family (a folder name in
    the versions home, so never a path) and its original model."""
    file = root / VERSION_FILE
    try:
        record = json.loads(file.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("family"), str) or \
                not FAMILY_KEY.match(record["family"]) or not VERSION_ID.match(str(record.get("id"))):
            raise ValueError("it names no valid family and version id")
        if not isinstance(record.get("original"), str) or not record["original"] or "\0" in record["original"]:
            raise ValueError("it does not name its original model")
        if not isinstance(record.get("parent") or {}, dict):
            raise ValueError("its parent is not described")
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as error:
        raise ModelError(f"{file} cannot be read ({str(error)[:120]}); open the version through its original "
                         f"model folder to see or delete it.") from None
    return record


def checkpoint_files(trained: Path) -> List[Path]:
    """fold_*/checkpoint_final.pth in the order Model loads all folds (numbered folds, else fold_all)."""
    folders = fold_folders_in(trained)
    return [folders[fold] / CHECKPOINT for fold in folds_holding(folders, CHECKPOINT)]


def family_sha256(trained: Path, home: Path) -> str:
    """SHA-256 of the checkpoint files' bytes (as Model.checksum over all folds). Remembered per file
    size and modification time, in this process and in <home>/versions/keys.json when that folder exists."""
    files = checkpoint_files(trained)
    if not files:
        raise Unidentified(f"No fold of {trained} has a {CHECKPOINT}.")
    stamp = [[f.relative_to(trained).as_posix(), *_stat_key(f)[1:]] for f in files]
    key = json.dumps([str(trained), stamp])
    if key in _FAMILY_CACHE:
        return _FAMILY_CACHE[key]
    cache_file = home / "versions" / "keys.json"
    try:
        cached = json.loads(cache_file.read_text()).get(str(trained)) if cache_file.is_file() else None
    except (OSError, ValueError, AttributeError):
        cached = None
    if cached and cached.get("files") == stamp and cached.get("sha256"):
        _FAMILY_CACHE[key] = cached["sha256"]
        return cached["sha256"]
    digest = hashlib.sha256()
    for file in files:
        _hash_into(digest, file)
    _FAMILY_CACHE[key] = digest.hexdigest()
    if cache_file.parent.is_dir():  # only where versions were made before: reading never creates the home
        try:
            known = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
            known = known if isinstance(known, dict) else {}
            known[str(trained)] = {"files": stamp, "sha256": _FAMILY_CACHE[key]}
            write_json(cache_file, known, atomic=True)
        except (OSError, ValueError):
            pass  # a cache only
    return _FAMILY_CACHE[key]


_FAMILY_CACHE: Dict[str, str] = {}
_FILE_CACHE: Dict[tuple, str] = {}


def _stat_key(file: Path) -> tuple:
    stat = file.stat()
    return (str(file.absolute()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


def file_sha256(file: Path) -> str:
    key = _stat_key(file)
    if key not in _FILE_CACHE:
        digest = hashlib.sha256()
        _hash_into(digest, file)
        _FILE_CACHE[key] = digest.hexdigest()
    return _FILE_CACHE[key]


def _hash_into(digest, file: Path):
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def write_json(path: Path, data: dict, atomic: bool = False):
    text = json.dumps(data, indent=2, default=str)
    if not atomic:
        path.write_text(text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def holder_gone(file: Path) -> bool:
    """True when `file` names a program on this machine that no longer runs."""
    try:
        holder = json.loads(file.read_text())
        pid, host = int(holder["pid"]), holder["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname() or sys.platform == "win32":  # os.kill(pid, 0) would end it on Windows
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def break_if_stale(lock: Path) -> bool:
    """Remove a lock whose holder is gone or that is older than LOCK_STALE_S; True when the lock is gone."""
    try:
        text = lock.read_text()
        stale = holder_gone(lock) or time.time() - lock.stat().st_mtime > LOCK_STALE_S
        if stale and lock.read_text() == text:  # still the same holder's lock, not a new one
            lock.unlink()
        return stale
    except FileNotFoundError:
        return True
    except OSError:
        return False


def check_version_folder(path: Path, id: str, family: str) -> Tuple[dict, str]:
    """(version.json contents, problem) of version `id` of `family`: its folder, its record, its checkpoints."""
    if not path.is_dir():
        return {}, f"its folder {path} is missing"
    try:
        record = json.loads((path / VERSION_FILE).read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return {}, f"{VERSION_FILE} is missing from {path}"
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as error:
        return {}, f"{path / VERSION_FILE} cannot be read ({str(error)[:120]})"
    if record.get("family") != family or str(record.get("id")) != id:
        return record, f"{path / VERSION_FILE} describes {str(record.get('id'))[:20]} of another model"
    checkpoints = record.get("checkpoints")
    if not isinstance(checkpoints, dict) or not checkpoints:
        return record, f"{path / VERSION_FILE} lists no checkpoints"
    for relative, expected in checkpoints.items():
        if Path(relative).is_absolute() or ".." in Path(relative).parts or "\0" in relative:
            return record, f"{path / VERSION_FILE} lists a checkpoint outside the version's folder"
        file = path / relative
        if not file.is_file():
            return record, f"checkpoint {relative} is missing"
        if file_sha256(file) != expected:
            return record, f"checkpoint {relative} was changed or corrupted (its checksum is not the recorded one)"
    return record, ""


def writable_folder(folder: Path, name: str):
    """Create `folder` if needed and check a file can be written there; ModelError saying why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ModelError(unwritable(folder, name, error)) from None


def unwritable(folder: Path, name: str, error: OSError) -> str:
    return (f"Cannot write versions of {name} to {folder} ({error.strerror or error}); set SEGMENTMBTFE_HOME to a "
            "writable folder, or give the new version's folder.")


@contextmanager
def locked(family_dir: Path, name: str):
    """One program at a time changes a family's registry: a lock file naming its holder. A lock left by a
    program that died (Ctrl+C at the wrong moment, killed, a crash) is broken at once when its holder is
    known to be gone on this machine, else after LOCK_STALE_S."""
    writable_folder(family_dir, name)
    lock = family_dir / ".lock"
    deadline = time.monotonic() + 30
    while True:
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(handle, json.dumps(holder()).encode())
            break
        except FileExistsError:
            if break_if_stale(lock):
                continue
            if time.monotonic() > deadline:
                raise ModelError(f"The versions of {name} are being changed by another program "
                                 f"(lock file {lock}); try again, or delete that file if none is.") from None
            time.sleep(0.1)
        except OSError as error:
            raise ModelError(unwritable(family_dir, name, error)) from None
    try:
        yield
    finally:
        os.close(handle)
        lock.unlink(missing_ok=True)


def remove_leftovers(family_dir: Path):
    """Remove what programs that died while writing or deleting a version left in the family folder
    (hidden .vN.partial-* and .vN.deleting-* folders), when their program is known to be gone."""
    if not family_dir.is_dir():
        return
    for folder in family_dir.glob(".v*.*-*"):
        if ".deleting-" in folder.name or (".partial-" in folder.name and holder_gone(folder / HOLDER_FILE)):
            shutil.rmtree(folder, ignore_errors=True)


def trained_folder(path: Path, configuration: Optional[str]) -> Path:
    try:
        return find_trained_folder(path, configuration)
    except ModelError as error:
        from .nnunet_v1 import is_v1_folder  # a v1 folder predicts as it is, but has no versions (yet)
        if is_v1_folder(path):
            raise Unidentified(f"{path.name} is an nnU-Net v1 model, which can segment but not be fine-tuned "
                               f"or versioned here; retrain it with nnU-Net v2 to fine-tune it.") from None
        raise Unidentified(str(error)) from None


def family_name(trained: Path) -> str:
    parts = trained.name.split("__")
    name = f"{trained.parent.name}_{parts[2]}" if len(parts) == 3 else trained.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:60] or "model"


def read_registry(path: Path, original: str, missing_ok: bool = False) -> dict:
    """A family's versions.json, its entries checked (those that are not well-formed are left out)."""
    if not path.is_file() and missing_ok:
        return {"original": original, "current": ORIGINAL, "versions": []}
    try:
        registry = json.loads(path.read_text())
        if not isinstance(registry, dict) or not isinstance(registry.get("versions", []), list):
            raise ValueError("not a version list")
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as error:
        raise ModelError(f"The version list {path} cannot be read ({str(error)[:120]}); restore or delete it "
                         f"(the version folders are kept).") from None
    registry.setdefault("versions", [])
    registry["versions"] = [e for e in registry["versions"] if isinstance(e, dict) and isinstance(e.get("id"), str)
                            and isinstance(e.get("path"), str) and "\0" not in e["path"]
                            and isinstance(e.get("parent") or "", str)]
    if not isinstance(registry.get("original") or "", str) or "\0" in str(registry.get("original")):
        registry["original"] = ""
    return registry
