"""Put the MBTFE trainers where nnU-Net looks for trainers, and take them away again.

The module goes into nnunetv2's `training/nnUNetTrainer/` folder itself, next to nnUNetTrainer.py, not into
`variants/`: nnU-Net's lookup imports every module it passes, a folder's own modules before its subfolders,
so there it is found before the lookup imports unrelated trainers. (In 2.8.1 `primus/` comes before
`variants/` and imports timm and torchvision, which fail to import against a CPU build of torch.)

nnunetv2 is located with `importlib.util.find_spec`, never imported: importing it reads the nnUNet_* paths
once for the whole process and takes seconds. We only ever write or delete our own file, recognised by a
marker line, so `unregister` cannot remove anything nnU-Net or a user put there.

nnunetv2 2.8.1 also looks for a trainer it does not have in the folders listed in the `nnUNet_extTrainer`
environment variable (nnunetv2/utilities/find_objects.py). `external_trainer_line()` gives the shell line that
lists our shim folder there, for those who cannot or would rather not write into nnU-Net's package.
"""
import importlib.util
import os
import shlex
import sys
from pathlib import Path

from ...errors import SegmentError

SHIM = Path(__file__).resolve().parent / "shim" / "nnUNetTrainerMBTFE.py"
# Every module registration copies: MBTFE-UNet's, then UNet++'s, SegResNetVAE's and the 3D U-Net's trainers.
SHIMS = (SHIM, SHIM.with_name("nnUNetTrainerNetworks.py"))
MARKER = "segment-mbtfe-trainer-shim"


class RegistrationError(SegmentError):
    """nnunetv2 is missing, or its trainer folder cannot be written; the message says what to do."""


def trainer_folder() -> Path:
    """nnunetv2's `training/nnUNetTrainer` folder in this Python."""
    spec = importlib.util.find_spec("nnunetv2")
    if spec is None or not spec.submodule_search_locations:
        raise RegistrationError(f"nnunetv2 is not installed in this Python ({sys.executable}); "
                                "install it (pip install nnunetv2) in the environment you train with.")
    folder = Path(list(spec.submodule_search_locations)[0]) / "training" / "nnUNetTrainer"
    if not (folder / "nnUNetTrainer.py").is_file():
        raise RegistrationError(f"This nnunetv2 has no trainer folder at {folder}; is it nnU-Net v2?")
    return folder


def registered_path() -> Path:
    return trainer_folder() / SHIM.name


def external_trainer_folder() -> Path:
    """The folder to list in `nnUNet_extTrainer` (recent nnunetv2, e.g. 2.8.1) instead of registering."""
    return SHIM.parent


def external_trainer_line() -> str:
    """`export nnUNet_extTrainer=...` (`set ...` on Windows) listing our shim folder first, keeping any folders
    already listed; refused when the installed nnunetv2 does not read the variable."""
    _check_reads_external_trainers()
    folder = str(external_trainer_folder())
    listed = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p and p != folder]
    value = os.pathsep.join([folder, *listed])
    if sys.platform == "win32":
        return f"set nnUNet_extTrainer={value}"
    return f"export nnUNet_extTrainer={shlex.quote(value)}"


def _check_reads_external_trainers() -> None:
    """nnunetv2 that predates nnUNet_extTrainer would ignore the line; say so instead (nnunetv2 missing here is
    fine: the line is for the environment nnU-Net trains in)."""
    spec = importlib.util.find_spec("nnunetv2")
    if spec is None or not spec.submodule_search_locations:
        return
    finder = Path(list(spec.submodule_search_locations)[0]) / "utilities" / "find_objects.py"
    if finder.is_file() and "nnUNet_extTrainer" not in finder.read_text(errors="replace"):
        raise RegistrationError("The nnunetv2 installed here does not read nnUNet_extTrainer; update it, or run "
                                "`segment-mbtfe nnunet-trainer register` without --ext-trainer.")


def is_registered() -> bool:
    folder = trainer_folder()
    return all((folder / shim.name).is_file() and (folder / shim.name).read_text(errors="replace") == shim.read_text()
               for shim in SHIMS)


def register() -> Path:
    """Writes (or updates) the trainer modules in nnunetv2's trainer folder; returns the MBTFE module's path."""
    folder = trainer_folder()
    for shim in SHIMS:
        _check_ours(folder / shim.name)
    for shim in SHIMS:
        _write(shim, folder / shim.name)
    return folder / SHIM.name


def _write(shim: Path, target: Path) -> None:
    partial = target.with_suffix(".partial")
    try:  # write then rename: nnU-Net's search never imports a half-written file
        partial.write_text(shim.read_text())
        os.replace(partial, target)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise RegistrationError(f"Cannot write {target} ({error.strerror}). Run with write access to the "
                                f"nnunetv2 installation, or set nnUNet_extTrainer={external_trainer_folder()} "
                                "(recent nnunetv2 releases) instead.") from None


def unregister() -> bool:
    """Removes the trainer modules (and their compiled copies); False if none was registered."""
    targets = [trainer_folder() / shim.name for shim in SHIMS]
    present = [t for t in targets if t.exists()]
    for target in present:
        _check_ours(target)
    for target in present:
        try:
            target.unlink()
            for compiled in (target.parent / "__pycache__").glob(f"{target.stem}.*.pyc"):
                compiled.unlink()
        except OSError as error:
            raise RegistrationError(f"Cannot remove {target} ({error.strerror}).") from None
    return bool(present)


def _check_ours(path: Path) -> None:
    if path.exists() and MARKER not in path.read_text(errors="replace"):
        raise RegistrationError(f"{path} exists but was not written by SegmentMBTFE; leaving it alone.")
