"""The models a user has, by name: shipped with SegmentMBTFE, added (copied or unpacked into the models home),
or registered (a folder of the user's, left where it is and never deleted). `segment-mbtfe models list|add|remove`,
`-m NAME` and the Slicer panel's model list all read this module, so they name and show the same models.

    add("Dataset004_Hippocampus.zip")            # unpacked into <home>/models/Dataset004_Hippocampus
    add("/data/nnUNet_results/Dataset004_Hippocampus", link=True)   # registered where it is
    installed()         # every model: name, where it came from, network, channels, labels, configurations, folds, size
    remove("Dataset004_Hippocampus")              # deletes what add copied; only forgets a registered folder

The models home is `models/` in the versions home ($SEGMENTMBTFE_HOME). An added model is written into a hidden
folder there and renamed into place when complete, so a failed or interrupted add leaves nothing that is listed,
and a later add clears what a killed one left. Each added model is a folder as nnU-Net's results hold it: the
dataset folder with its trained configuration folders. Registered folders are listed in
`models/registered.json`. Only JSON is read here (and an nnU-Net v1 model's plans.pkl and .model.pkl, through the
restricted unpickler of nnunet_v1.py, which builds plain data only), never a checkpoint, and torch is never
imported: the Slicer panel lists and adds models in Slicer's own process.
"""
import json
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from ..errors import ModelError
from ..free_memory import size_text
from . import zips as model_zips
from .folder import find_trained_folder, network_title
from .nnunet_v1 import is_v1_folder, is_v1_trained_folder, v1_trained_folders
from .opening import open_model_folder
from .shipped import shipped_models
from .versions import versions_home

SHIPPED, ADDED, REGISTERED = "shipped", "added", "registered"
REGISTRY_FILE = "registered.json"
_WORK_PREFIX, _TRASH_PREFIX = ".adding-", ".removing-"
_LEFTOVER_AGE_S = 24 * 3600   # an add's hidden folder this old belongs to a program that is gone
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")


@dataclass
class TrainedConfiguration:
    name: str          # "3d_fullres"
    path: Path         # its trained folder (plans.json, fold_N/)
    title: str         # the engine's name, which tags its segments: "Dataset004_Hippocampus (3d_fullres)"
    network: str       # "PlainConvUNet", "ResidualEncoderUNet", "MBTFE-UNet", "Primus V3-S"
    folds: List[str]   # folds with a checkpoint
    trainer: str = ""  # the nnU-Net trainer it was trained with (the folder's name says)


@dataclass
class InstalledModel:
    name: str                 # what `-m` accepts and `models list` shows
    path: Path                # the model folder: a dataset folder or a trained configuration folder
    source: str               # SHIPPED, ADDED or REGISTERED
    configurations: List[TrainedConfiguration] = field(default_factory=list)
    channels: List[str] = field(default_factory=list)
    labels: List[str] = field(default_factory=list)
    size_bytes: int = 0
    problem: str = ""         # why it cannot be used ("" when it can)


def models_home() -> Path:
    return versions_home() / "models"


# -- reading ---------------------------------------------------------------------------------------------------

def installed() -> List[InstalledModel]:
    """Every model: the shipped ones, then those added, then those registered (each group by name)."""
    home = models_home()
    models = [describe(p, p.name, SHIPPED) for p in shipped_models()]
    if home.is_dir():
        models += [describe(p, p.name, ADDED) for p in sorted(home.iterdir())
                   if p.is_dir() and not p.name.startswith(".")]
    models += [describe(Path(e["path"]), e["name"], REGISTERED) for e in sorted(_registry(home), key=_by_name)]
    return models


def find(name: str) -> Optional[InstalledModel]:
    """The model `models list` shows by this name (exactly, else ignoring case)."""
    models = installed()
    return next((m for m in models if m.name == name), None) or \
        next((m for m in models if m.name.lower() == name.lower()), None)


def listed_at(path) -> Optional[InstalledModel]:
    """The model listed with this folder, if any (adding a folder twice only finds it again)."""
    wanted = Path(path).expanduser().resolve()
    return next((m for m in installed() if m.path.resolve() == wanted), None)


def model_path(given: str) -> Path:
    """What `-m` names: an existing path as it is, else the model of that name in `models list`. A path that
    does not exist is returned as it is, so the engine says what is missing."""
    path = Path(given).expanduser()
    if path.exists() or not _NAME.match(given):
        return path
    found = find(given)
    if found is None:
        raise ModelError(f"No model folder or model named '{given}'; `segment-mbtfe models list` shows the "
                         "models by name.")
    return found.path


def describe(path, name: str = None, source: str = REGISTERED) -> InstalledModel:
    """A model folder described from its JSON files; a folder that is not a usable model gets `problem` set."""
    path = Path(path)
    model = InstalledModel(name or suggested_name(path), path, source)
    if source == REGISTERED and not path.is_dir():
        model.problem = f"its folder {path} is missing (models remove {model.name} forgets it)"
        return model
    try:
        trained = _trained_folders(path)
        model.configurations = [_configuration(folder) for folder in trained]
        first = open_model_folder(trained[0])
        model.channels = first.channel_names
        model.labels = [label for _, label in first.labels.output_segments()]
    except (ModelError, OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        model.problem = _reason(path, error)
    if not model.problem and not any(c.folds for c in model.configurations):
        model.problem = f"{model.configurations[0].title} has no trained fold (no fold_N/checkpoint_final.pth)."
    model.size_bytes = _size(path)
    return model


def suggested_name(path: Path) -> str:
    """A name from the folder: the dataset folder's (also for a trained folder inside one), made safe."""
    trained = len(path.name.split("__")) == 3 or is_v1_trained_folder(path)
    folder = path.parent if trained and path.parent.name else path
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "_", folder.name).lstrip("._+-")[:100]
    return safe or "model"


# -- changing ----------------------------------------------------------------------------------------------------

def add(source, name: str = None, link: bool = False, unique: bool = False) -> InstalledModel:
    """Add a model folder (copied) or an nnU-Net model zip (unpacked) to the models home, or register a folder
    where it is (`link`). `unique`: take `name-2`, `name-3`... when the name is taken, instead of refusing."""
    source = Path(source).expanduser()
    if not source.exists():
        raise ModelError(f"Not found: {source}.")
    if model_zips.is_zip(source):
        if link:
            raise ModelError(f"{source.name} is a zip: it cannot be registered where it is; add it without --link "
                             "to unpack it into the models folder.")
        plan = model_zips.read_plan(source)
        return _add_unpacked(source, plan, _new_name(name or plan.suggested_name, unique))
    if not source.is_dir():
        raise ModelError(f"{source.name} is neither a model folder nor a zip made by nnUNetv2_export_model_to_zip.")
    model = describe(source.resolve(), name)
    if model.problem:
        raise ModelError(model.problem)
    new_name = _new_name(name or model.name, unique)
    return _register(source.resolve(), new_name) if link else _add_copy(source.resolve(), new_name)


def remove(name: str) -> InstalledModel:
    """Delete an added model's folder, or forget a registered one (its folder is left as it is)."""
    model = find(name)
    if model is None:
        raise ModelError(f"No model named '{name}'; `segment-mbtfe models list` shows the names.")
    home = models_home()
    if model.source == SHIPPED:
        raise ModelError(f"{model.name} is shipped with SegmentMBTFE and cannot be removed.")
    if model.source == REGISTERED:
        _write_registry(home, [e for e in _registry(home) if e["name"] != model.name])
        return model
    if model.path.parent != home:  # never delete anything but a folder of the models home
        raise ModelError(f"{model.path} is not in the models folder {home}; it was not removed.")
    _delete(model.path, home)
    return model


# -- adding ------------------------------------------------------------------------------------------------------

def _add_unpacked(source: Path, plan, name: str) -> InstalledModel:
    home = models_home()
    _check_space(home, plan.unpacked_bytes, source.name)
    with _work_folder(home) as work:
        root = model_zips.unpack(source, plan, work / "unpacked")
        return _place(root, plan.trained, plan.suggested_name, work, name, source.name)


def _add_copy(source: Path, name: str) -> InstalledModel:
    home = models_home()
    _check_space(home, _size(source), source.name)
    with _work_folder(home) as work:
        copy = work / "unpacked" / source.name
        try:
            shutil.copytree(source, copy)
        except (shutil.Error, OSError) as error:
            raise ModelError(f"Could not copy {source}: {_copy_reason(error)}.") from None
        trained = (source / "plans.json").is_file() or is_v1_trained_folder(source)
        return _place(copy, trained, source.name, work, name, source.name)


def _place(root: Path, trained: bool, trained_name: str, work: Path, name: str, given: str) -> InstalledModel:
    """Check the unpacked model, then rename it into place: `<home>/<name>/` holding the trained folder(s)."""
    problem = describe(root, name, ADDED).problem
    if problem:
        raise ModelError(f"{given}: {problem}")
    if trained:  # a trained folder on its own: put it in a folder as nnU-Net's results hold it
        wrapper = work / "model"
        wrapper.mkdir()
        root.rename(wrapper / (root.name if root.name != "unpacked" else trained_name))
        root = wrapper
    target = work.parent / name
    try:
        root.rename(target)   # fails when a model of that name appeared meanwhile
    except OSError as error:
        raise ModelError(f"Could not add {given} as {name} ({error.strerror or error}).") from None
    return describe(target, name, ADDED)


def _register(folder: Path, name: str) -> InstalledModel:
    home = models_home()
    entries = _registry(home)
    entries.append({"name": name, "path": str(folder), "added": time.strftime("%Y-%m-%dT%H:%M:%S")})
    _write_registry(home, entries)
    return describe(folder, name, REGISTERED)


def _new_name(wanted: str, unique: bool) -> str:
    if not _NAME.match(wanted):
        raise ModelError(f"'{wanted}' cannot name a model: use letters, digits, '.', '_', '+' and '-' (up to 100, "
                         "starting with a letter or digit).")
    taken = {m.name.lower() for m in installed()}
    name, number = wanted, 1
    while name.lower() in taken and unique:
        number += 1
        name = f"{wanted}-{number}"
    if name.lower() in taken:
        raise ModelError(f"A model named {wanted} is already listed; give another name (--name), or remove it "
                         f"first (segment-mbtfe models remove {wanted}).")
    return name


@contextmanager
def _work_folder(home: Path):
    """A hidden folder in the models home for one add, removed whatever happens; the models home (and the
    folders above it) too when this add created them and nothing else is there."""
    created = [p for p in (home, *home.parents) if not p.exists()]
    _clear_leftovers(home)
    work = home / f"{_WORK_PREFIX}{uuid.uuid4().hex[:12]}"
    try:
        work.mkdir(parents=True)
    except OSError as error:
        raise ModelError(_unwritable(home, error)) from None
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for folder in created:  # the innermost first
            try:
                folder.rmdir()
            except OSError:
                break


def _clear_leftovers(home: Path) -> None:
    """What a killed add or remove left: hidden work folders (old ones only: another add may be running)."""
    if not home.is_dir():
        return
    for folder in home.iterdir():
        try:
            old = folder.name.startswith(_WORK_PREFIX) and time.time() - folder.stat().st_mtime > _LEFTOVER_AGE_S
        except OSError:
            continue  # just removed by the program that made it
        if old or folder.name.startswith(_TRASH_PREFIX):
            shutil.rmtree(folder, ignore_errors=True)


def _delete(folder: Path, home: Path) -> None:
    """Renamed out of the list first, then deleted: a remove cut short leaves no half-deleted model listed."""
    if folder.is_symlink():  # a link someone put there: remove the link, never what it points to
        folder.unlink()
        return
    trash = home / f"{_TRASH_PREFIX}{uuid.uuid4().hex[:12]}"
    try:
        folder.rename(trash)
    except OSError as error:
        raise ModelError(f"Cannot remove {folder} ({error.strerror or error}).") from None
    shutil.rmtree(trash, ignore_errors=True)


def _check_space(home: Path, needed: int, given: str) -> None:
    existing = next(p for p in (home, *home.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise ModelError(f"Cannot add {given}: it needs {size_text(needed)} but only {size_text(free)} are free "
                         f"in {existing}.")


# -- the list of registered folders ----------------------------------------------------------------------------

def _registry(home: Path) -> List[dict]:
    path = home / REGISTRY_FILE
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())["registered"]
        if not isinstance(entries, list):
            raise ValueError("not a list")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as error:
        raise ModelError(f"The list of registered models {path} cannot be read ({str(error)[:120]}); restore or "
                         "delete it (the registered folders themselves are not touched).") from None
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)
            and isinstance(e.get("path"), str) and "\0" not in e["path"]]


def _write_registry(home: Path, entries: List[dict]) -> None:
    path = home / REGISTRY_FILE
    partial = home / f".{REGISTRY_FILE}.{uuid.uuid4().hex[:8]}.partial"
    try:
        home.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"registered": entries}, indent=1))
        os.replace(partial, path)   # readers see the old list or the new one, never half of one
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise ModelError(_unwritable(home, error)) from None


def _by_name(entry: dict) -> str:
    return entry["name"].lower()


# -- describing ----------------------------------------------------------------------------------------------------

def _trained_folders(path: Path) -> List[Path]:
    if is_v1_folder(path):  # nnU-Net v1: the trained folders anywhere below (nnUNet/<configuration>/TaskXXX/...)
        return v1_trained_folders(path)
    if (path / "plans.json").is_file() or not path.is_dir():
        return [find_trained_folder(path, None)]
    trained = sorted(d for d in path.iterdir() if d.is_dir() and (d / "plans.json").is_file())
    return trained or [find_trained_folder(path, None)]  # none: its error says what a model folder holds


def _configuration(trained: Path) -> TrainedConfiguration:
    folder = open_model_folder(trained)
    network = network_title(folder.configuration.architecture, folder.trainer_name)
    network = "Generic_UNet (nnU-Net v1)" if folder.nnunet_version == 1 else network
    folds = folder.available_folds("final") or folder.available_folds("best")
    return TrainedConfiguration(folder.configuration_name, trained, folder.name, network, folds,
                                str(folder.trainer_name or ""))


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass  # a broken link: it takes no space
    return total


def _reason(path: Path, error: Exception) -> str:
    if isinstance(error, ModelError):
        return str(error)
    if isinstance(error, FileNotFoundError):
        return f"{path.name} is not a usable nnU-Net model folder ({Path(error.filename or 'a file').name} is missing)."
    return f"{path.name} is not a usable nnU-Net model folder ({str(error)[:120] or type(error).__name__})."


def _copy_reason(error: Exception) -> str:
    if isinstance(error, shutil.Error) and error.args and isinstance(error.args[0], list) and error.args[0]:
        source, _, why = error.args[0][0]
        return f"{Path(source).name}: {why}"
    return str(getattr(error, "strerror", None) or error)


def _unwritable(home: Path, error: OSError) -> str:
    return (f"Cannot write into the models folder {home} ({error.strerror or error}); set SEGMENTMBTFE_HOME to a "
            "writable folder.")
