"""Model zips from other people, unpacked only after every member has been checked.

nnU-Net v2's `nnUNetv2_export_model_to_zip` (nnunetv2/model_sharing/model_export.py) writes its members relative
to nnUNet_results: `Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres/` with plans.json,
dataset.json, dataset_fingerprint.json and `fold_N/` (checkpoint_final.pth, debug.json, progress.png,
validation/summary.json), possibly several configurations, with `crossval_results_folds_*/`, `ensembles/` and
`inference_information.json` beside them. People also zip a trained folder by hand. nnU-Net's own import is
`zipfile.extractall`, which quietly rewrites absolute and `..` member names; here such a zip is refused, as are
links, devices and pipes, encrypted members, more than MAX_MEMBERS members or more than MAX_UNPACKED_BYTES in
all (a zip bomb), all before a byte is written. Only the model's folder is unpacked, and no file grows past the
size its entry declares.

nnU-Net v1's zips (`nnUNet/3d_fullres/Task004_Hippocampus/nnUNetTrainerV2__nnUNetPlansv2.1/`, with plans.pkl and
fold_N/model_final_checkpoint.model(.pkl)) are unpacked from the folder above their configurations (`nnUNet/`),
so every configuration of the one task they hold is added (nnunet_v1.py reads them).

    plan = read_plan("Dataset004.zip")          # ModelError (one sentence) for anything unsafe or not a model
    root = unpack("Dataset004.zip", plan, into)  # the model's folder, inside `into`

No torch here: the Slicer panel unpacks zips in Slicer's own process.
"""
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Dict, List

from ..errors import ModelError
from ..free_memory import size_text

MAX_MEMBERS = 20_000
MAX_UNPACKED_BYTES = 32 * 10 ** 9   # five folds of three large configurations fit many times over
_CHUNK = 1 << 20
_SPECIAL = {stat.S_IFLNK: "a symbolic link", stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a device",
            stat.S_IFBLK: "a device", stat.S_IFSOCK: "a socket"}


@dataclass
class ZipPlan:
    """What a checked zip holds: its members by their safe relative path, and where the model is in it."""
    source: Path
    members: Dict[str, zipfile.ZipInfo]  # safe posix path -> entry (files and folders)
    root: str                           # the model's folder inside the zip ("" for the zip's top)
    trained: bool                       # the root is a trained configuration folder (plans.json in it)
    suggested_name: str                 # the dataset's folder name, else the zip's name
    unpacked_bytes: int


def is_zip(path: Path) -> bool:
    """A file meant as a zip: named .zip, or a zip whatever its name (a cut-short .zip is still one)."""
    return path.is_file() and (path.suffix.lower() == ".zip" or zipfile.is_zipfile(path))


def read_plan(source) -> ZipPlan:
    """Check every member from the zip's directory, and find the model in it; nothing is unpacked."""
    source = Path(source)
    with _open(source) as archive:
        entries = archive.infolist()
    if len(entries) > MAX_MEMBERS:
        raise ModelError(f"Refusing {source.name}: it holds {len(entries):,} members, more than the "
                         f"{MAX_MEMBERS:,} a model zip may hold.")
    members = {}
    for entry in entries:
        path = _safe_path(source, entry)
        if path in members:
            raise ModelError(f"Refusing {source.name}: it holds the member '{path}' twice.")
        members[path] = entry
    total = sum(e.file_size for e in entries)
    if total > MAX_UNPACKED_BYTES:
        raise ModelError(f"Refusing {source.name}: it would unpack to {size_text(total)}, more than the "
                         f"{size_text(MAX_UNPACKED_BYTES)} a model zip may hold.")
    files = [p for p, e in members.items() if not e.is_dir()]
    root, trained = _model_root(source, files)
    if _is_v1(files):
        name = _v1_task(files) or (_name(root) if root else source.stem)
    else:
        name = _name(root) if root and not trained else source.stem
    return ZipPlan(source, members, root, trained, name, total)


def unpack(source, plan: ZipPlan, into: Path) -> Path:
    """Write the model's members under `into` (an empty folder of the caller's); returns the model's folder.
    A member whose data is damaged ends in a ModelError; the caller removes `into`."""
    into = Path(into)
    prefix = f"{plan.root}/" if plan.root else ""
    with _open(Path(source)) as archive:
        for path, entry in plan.members.items():
            if not path.startswith(prefix):
                continue  # beside the model (a __MACOSX folder, a readme): not needed
            target = into.joinpath(*PurePosixPath(path).parts)
            try:
                (target if entry.is_dir() else target.parent).mkdir(parents=True, exist_ok=True)
            except OSError as error:  # e.g. a file and a folder of one name
                raise ModelError(f"Could not unpack {plan.source.name}: the folder for '{path}' cannot be made "
                                 f"({error.strerror or error}).") from None
            if not entry.is_dir():
                _copy_member(archive, entry, target, plan.source.name)
    return into.joinpath(*PurePosixPath(plan.root).parts) if plan.root else into


def _open(source: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as error:
        raise ModelError(f"{source.name} cannot be read as a zip archive ({error}); it may be incomplete or "
                         "damaged (a download cut short?).") from None
    except OSError as error:
        raise ModelError(f"{source} cannot be read ({error.strerror or error}).") from None


def _safe_path(source: Path, entry: zipfile.ZipInfo) -> str:
    """The member's relative path, or a ModelError when writing it could reach outside the folder, or when
    it is not a plain file or folder."""
    name = entry.filename.replace("\\", "/")   # zips made on Windows by hand may use backslashes
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or (parts and len(parts[0]) == 2 and parts[0][1] == ":") or "\0" in name:
        raise ModelError(f"Refusing {source.name}: the member '{entry.filename}' has an absolute path, which "
                         "would be written outside the models folder.")
    if ".." in parts:
        raise ModelError(f"Refusing {source.name}: the member '{entry.filename}' climbs out of its folder (..), "
                         "which would be written outside the models folder.")
    kind = _SPECIAL.get(stat.S_IFMT(entry.external_attr >> 16)) if entry.create_system == 3 else None
    if kind:
        raise ModelError(f"Refusing {source.name}: the member '{entry.filename}' is {kind}; a model zip holds "
                         "only files and folders.")
    if entry.flag_bits & 0x1:
        raise ModelError(f"{source.name}: the member '{entry.filename}' is encrypted; unpack the zip yourself "
                         "and add the model folder.")
    if not parts:
        raise ModelError(f"Refusing {source.name}: it holds a member without a name.")
    return "/".join(parts)


def _model_root(source: Path, files: List[str]):
    """(root, trained): the dataset folder above the trained folders (nnU-Net's export), or one trained folder."""
    if _is_v1(files):
        return _v1_root(source, files)
    trained = sorted({_parent(f) for f in files if _name(f) == "plans.json" and _has_weights(_parent(f), files)})
    if not trained:
        raise ModelError(f"{source.name} holds no nnU-Net model: no folder in it has plans.json, dataset.json "
                         "and fold_N/checkpoint_final.pth.")
    if len(trained) == 1:
        only = trained[0]
        return (only, True) if _parent(only) == "" else (_parent(only), False)
    parents = {_parent(t) for t in trained}
    if len(parents) > 1 or "" in trained:
        raise ModelError(f"{source.name} holds several models ({', '.join(sorted(p or '/' for p in parents))}); "
                         "unpack it and add each model folder.")
    return parents.pop(), False


def _has_weights(folder: str, files: List[str]) -> bool:
    """dataset.json beside plans.json, and a fold_N/checkpoint_*.pth below."""
    prefix = f"{folder}/" if folder else ""
    return f"{prefix}dataset.json" in files and any(
        _parent(_parent(f)) == folder and _name(_parent(f)).startswith("fold_") and _name(f).startswith("checkpoint_")
        and f.endswith(".pth") for f in files)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _is_v1(files: List[str]) -> bool:
    names = {_name(f) for f in files}
    return any(n.endswith(".model") for n in names) and \
        any(n == "plans.pkl" or n.endswith("_plans_3D.pkl") or n.endswith("_plans_2D.pkl") for n in names)


def _v1_trained(files: List[str]) -> List[str]:
    """Folders holding fold_N/ or all/ with a .model.pkl: v1's trained folders."""
    return sorted({_parent(_parent(f)) for f in files if f.endswith(".model.pkl") and
                   (_name(_parent(f)).startswith("fold_") or _name(_parent(f)) == "all")})


def _v1_task(files: List[str]) -> str:
    tasks = {_name(_parent(t)) for t in _v1_trained(files) if _name(_parent(t)).startswith("Task")}
    return tasks.pop() if len(tasks) == 1 else ""


def _v1_root(source: Path, files: List[str]):
    """(root, trained) of a v1 zip: the folder holding the configuration folders, or one trained folder."""
    from .nnunet_v1 import CONFIGURATIONS
    trained = _v1_trained(files)
    if not trained:
        raise ModelError(f"{source.name} holds nnU-Net v1 files but no trained model (no fold_N/ or all/ with "
                         "model_final_checkpoint.model.pkl).")
    roots = {_parent(_parent(_parent(t))) if _name(_parent(_parent(t))) in CONFIGURATIONS else t for t in trained}
    tasks = {_name(_parent(t)) for t in trained if _name(_parent(_parent(t))) in CONFIGURATIONS}
    if len(roots) > 1 or len(tasks) > 1:
        raise ModelError(f"{source.name} holds several models ({', '.join(sorted(tasks or roots))}); unpack it and "
                         "add each model folder.")
    root = roots.pop()
    return (root, True) if root in trained else (root, False)


def _copy_member(archive: zipfile.ZipFile, entry: zipfile.ZipInfo, target: Path, zip_name: str) -> None:
    """Stream one member to `target`, never more bytes than its entry declares (zipfile stops there, and so
    does this), checking the CRC zipfile checks at the end."""
    written = 0
    try:
        with archive.open(entry) as member, open(target, "xb") as out:
            while chunk := member.read(_CHUNK):
                written += len(chunk)
                if written > entry.file_size:
                    raise zipfile.BadZipFile("more data than its entry declares")
                out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as error:
        raise ModelError(f"{zip_name} is damaged: its member '{entry.filename}' could not be unpacked "
                         f"({str(error)[:120]}).") from None
    except OSError as error:
        raise ModelError(f"Could not unpack {zip_name}: writing {target.name} failed "
                         f"({error.strerror or error}).") from None
