"""Versions of a model: fine-tuned copies written beside it, never over it.

    versions = ModelVersions("models/hippocampus_nnunet")
    version = versions.add(model, finetune_result)     # v1, written to <home>/versions/<key>/v1, now current
    versions.rollback()                                # back to the original
    folder, version = resolve("models/hippocampus_nnunet")   # what to load: the current version

The original model folder (shipped or the user's) is only ever read. A model's versions form a family,
identified by the SHA-256 of the original's checkpoint files, so the same model finds its versions from any
path it is opened by. The family's registry, `<home>/versions/<key>/versions.json`, lists the versions and
which one is current; each version folder also describes itself in its own `version.json` (family, id, parent,
checksums of its checkpoints, how it was fine-tuned), so a version folder opened directly finds its family,
and a damaged one (folder gone, file edited, disk error) is reported instead of loaded.

A version folder is an nnU-Net model folder: `V/<trainer>__<plans>__<configuration>/` with dataset.json,
plans.json and `fold_N/checkpoint_final.pth`, loadable here and by nnU-Net's own predictor.

No torch at module level: the Slicer panel lists versions before PyTorch is installed.
"""
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import List, Optional, Tuple

from ..errors import Cancelled, ModelError
from .shipped import is_shipped
from .version_store import (CHECKPOINT, HOLDER_FILE, ORIGINAL, VERSION_FILE, VERSION_ID, Unidentified,
                            check_version_folder, family_name, family_sha256, file_sha256, holder, locked,
                            read_registry, read_version_file, remove_leftovers, trained_folder, version_root,
                            writable_folder, write_json)

REGISTRY_FILE = "versions.json"


def with_version(prediction, version):
    """The version recorded in the prediction's provenance (.seg.nrrd files, segmentation nodes) when it is
    not the original."""
    if version is not None and version.id != ORIGINAL:
        prediction.settings["version"] = version.id
    return prediction


def versions_home() -> Path:
    """Where versions live: $SEGMENTMBTFE_HOME, else the user's data folder / SegmentMBTFE."""
    configured = os.environ.get("SEGMENTMBTFE_HOME")
    if configured:
        return Path(configured).expanduser()
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "SegmentMBTFE"


@dataclass
class Version:
    id: str                # "original", "v1", "v2", ...
    path: Path             # the folder to load (a trained nnU-Net folder or a folder above one)
    parent: Optional[str]  # the version it was fine-tuned from (None for the original)
    created: str           # ISO time, "" for the original
    current: bool
    read_only: bool        # the original: never modified or deleted
    problem: str = ""      # why it cannot be loaded ("" when it can)
    provenance: dict = field(default_factory=dict)  # its version.json ({} for the original)

    def summary(self) -> str:
        """One line for lists: 'v2 (from v1, 2026-11-22 10:40, 200 iterations on 3 cases, Dice 0.81 -> 0.86)'."""
        if self.problem:
            return f"{self.id}: damaged ({self.problem})"
        if self.id == ORIGINAL:
            return f"{ORIGINAL} (read-only)"
        parts = [f"from {self.parent}"] if self.parent else []
        if self.created:
            parts.append(_local_time(self.created))
        run = _mapping(self.provenance.get("finetune"))  # version.json is a file users can edit: check each field
        cases = run.get("cases") if isinstance(run.get("cases"), list) else None
        if isinstance(run.get("iterations"), int):
            parts.append(_plural(run["iterations"], "iteration") + (f" on {_plural(len(cases), 'case')}" if cases else ""))
        dice = _dice_text(_mapping(run.get("dice_before")), _mapping(run.get("dice_after")))
        if dice:
            parts.append(dice)
        return f"{self.id} ({', '.join(parts)})" if parts else self.id


class ModelVersions:
    """The versions of one model. `model_path`: the original model folder, or any version folder of it."""

    def __init__(self, model_path, home=None, configuration: Optional[str] = None):
        self.home = Path(home).expanduser() if home is not None else versions_home()
        path = Path(model_path).expanduser()
        root = version_root(path)
        self.opened: Optional[str] = None      # the version id when a version folder was opened
        self._opened_record: Optional[dict] = None
        self._opened_root: Optional[Path] = None
        if root is not None:
            record = read_version_file(root)
            self.key = record["family"]
            self.family_dir = self.home / "versions" / self.key
            self.original = Path(record["original"])
            original = self._read_registry(missing_ok=True).get("original") or record["original"]
            self.original = Path(original)
            self.opened, self._opened_record, self._opened_root = record["id"], record, root.resolve()
        else:
            self.original = trained_folder(path, configuration).resolve()
            sha = family_sha256(self.original, self.home)[:12]
            # the checksum is the identity, the name only makes the folder readable: a model copied or
            # renamed since its versions were made still finds them
            known = sorted(self.home.glob(f"versions/*-{sha}/{REGISTRY_FILE}")) if (self.home / "versions").is_dir() \
                else []
            self.key = known[0].parent.name if known else f"{family_name(self.original)}-{sha}"
            self.family_dir = self.home / "versions" / self.key

    # -- reading -----------------------------------------------------------------------------------------
    @property
    def registry_path(self) -> Path:
        return self.family_dir / REGISTRY_FILE

    def list(self) -> List[Version]:
        """The original first, then the versions in the order they were made (damaged ones with `problem`)."""
        registry = self._read_registry(missing_ok=True)
        current = self._current_id(registry)
        original_problem = "" if self.original.is_dir() else f"the original model folder {self.original} is missing"
        found = [Version(ORIGINAL, self.original, None, "", current == ORIGINAL, True, original_problem)]
        entries = sorted(_live(registry), key=lambda e: _number(e["id"]))  # ids grow with creation
        for entry in entries:
            path = self._entry_path(entry)
            record, problem = check_version_folder(path, entry["id"], self.key)
            found.append(Version(entry["id"], path, entry.get("parent"), entry.get("created", ""),
                                 entry["id"] == current, False, problem, record))
        return found

    def current(self) -> Version:
        return next(v for v in self.list() if v.current)

    def get(self, id: str) -> Version:
        for version in self.list():
            if version.id == id:
                return version
        if self.opened == id and self._opened_record is not None:  # a version folder not in this registry
            record, problem = check_version_folder(self._opened_root, id, self.key)
            parent = (self._opened_record.get("parent") or {}).get("id")
            return Version(id, self._opened_root, parent, self._opened_record.get("created", ""), False, False,
                           problem, record)
        known = ", ".join(v.id for v in self.list())
        raise ModelError(f"{self.name} has no version '{id}' (it has: {known}).")

    @property
    def name(self) -> str:
        return _display_name(self.original)

    def next_path(self) -> Path:
        return self.family_dir / f"v{self._next_number(self._read_registry(missing_ok=True))}"

    # -- choosing ----------------------------------------------------------------------------------------
    def use(self, id: str) -> Version:
        """Make `id` the current version (the one loaded when no version is named)."""
        version = self.get(id)
        if version.problem:
            raise ModelError(f"Cannot use {version.id} of {self.name}: {version.problem}.")
        with locked(self.family_dir, self.name):
            registry = self._read_registry(missing_ok=True)
            if id != ORIGINAL and id not in {e["id"] for e in _live(registry)}:
                registry["versions"].append(self._entry(id, version.path, version.parent, version.created))
            registry["current"] = id
            self._write_registry(registry)
        return self.get(id)

    def rollback(self) -> Version:
        """Make the current version's parent current (skipping deleted ancestors)."""
        current = self.current()
        if current.id == ORIGINAL:
            raise ModelError(f"{self.name} is already at its original version; there is nothing to roll back.")
        parent = self._nearest_ancestor(current.id)
        target = self.get(parent)
        if target.problem:
            raise ModelError(f"Cannot roll back to {parent} of {self.name}: {target.problem}; "
                             f"use another version or delete {parent}.")
        return self.use(parent)

    def delete(self, id: str) -> None:
        """Remove a version and its folder; when it was current, its parent becomes current."""
        if id == ORIGINAL:
            raise ModelError(f"The original version of {self.name} is read-only and cannot be deleted.")
        version = self.get(id)
        if self._is_protected(version.path):
            raise ModelError(f"Refusing to delete {version.path}: it is the original model or a shipped model.")
        with locked(self.family_dir, self.name):
            registry = self._read_registry(missing_ok=True)
            if id not in {e["id"] for e in _live(registry)}:  # an unregistered folder opened directly
                registry["versions"].append(self._entry(id, version.path, version.parent, version.created))
            was_current = self._current_id(registry) == id
            parked = None
            # out of the way first, so a failure below leaves it as it was; a folder that is not this
            # version's (a version list edited by hand can point anywhere) is only taken off the list
            if version.path.exists() and self._owns(version.path, id):
                parked = version.path.with_name(f".{version.path.name}.deleting-{uuid.uuid4().hex[:8]}")
                os.replace(version.path, parked)
            try:
                for entry in registry["versions"]:
                    if entry["id"] == id:
                        entry["deleted"] = _now()  # kept so that rollback can walk past it
                if was_current:
                    registry["current"] = self._nearest_ancestor(id, registry)
                self._write_registry(registry)
            except BaseException:
                if parked is not None:
                    os.replace(parked, version.path)
                raise
        if parked is not None:
            shutil.rmtree(parked, ignore_errors=True)

    # -- writing a new version ---------------------------------------------------------------------------
    def check_target(self, target) -> Path:
        """The absolute folder a new version may be written to; ModelError when it may not."""
        path = Path(target).expanduser().absolute()
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ModelError(f"The output folder {path} already exists and is not an empty folder; "
                             f"give a new folder.")
        resolved = path.resolve()
        for version in self.list()[1:]:
            if version.path.resolve() in resolved.parents:
                raise ModelError(f"Cannot write into {path}: it is inside version {version.id}; give a folder "
                                 f"elsewhere.")
        if is_shipped(path):
            raise ModelError(f"Cannot write into {path}: shipped models are read-only; give a folder elsewhere.")
        if self._is_protected(path):
            raise ModelError(f"Cannot write into {path}: it is inside the original model folder "
                             f"{self.original}, which is never modified; give a folder elsewhere.")
        return path

    def add(self, model, result, target=None, make_current: bool = True, cancel=None) -> Version:
        """Write a fine-tuning result as a new version of this model and register it.

        `model`: the loaded model that was fine-tuned (the original or one of its versions: the parent);
        `result`: a finetune.FinetuneResult. The version is built in a hidden folder beside the target and
        renamed into place only when complete: on any failure or cancel (`cancel.is_set()`, Ctrl+C) nothing
        is left behind and nothing is registered.
        """
        parent = self._parent_of(model)
        folds = [str(f) for f in result.weights]
        unknown = [f for f in folds if f not in model.folds]
        if not folds or unknown:
            raise ModelError(f"The fine-tuning result has weights for fold(s) {', '.join(folds) or 'none'}, "
                             f"but the model has fold(s) {', '.join(model.folds)}.")
        explicit = target is not None
        number = self._next_number(self._read_registry(missing_ok=True))
        path = self.check_target(target) if explicit else self.family_dir / f"v{number}"
        writable_folder(path.parent, self.name)
        remove_leftovers(self.family_dir)
        partial = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            partial.mkdir()
            write_json(partial / HOLDER_FILE, holder())  # lets a later run remove it if this one dies
            record = self._write_folder(partial, model, result, folds, f"v{number}", parent, cancel)
            _check_cancel(cancel)
            with locked(self.family_dir, self.name):
                registry = self._read_registry(missing_ok=True)
                taken = {e["id"] for e in registry["versions"]}
                if record["id"] in taken or (not explicit and path.exists()):  # another program was quicker
                    number = self._next_number(registry)
                    record["id"] = f"v{number}"
                    write_json(partial / VERSION_FILE, record)
                    if not explicit:
                        path = self.family_dir / record["id"]
                if path.exists():
                    if not path.is_dir() or any(path.iterdir()):
                        raise ModelError(f"The output folder {path} was filled while the version was written; "
                                         f"nothing was written.")
                    path.rmdir()
                (partial / HOLDER_FILE).unlink()
                os.replace(partial, path)
                try:
                    registry["versions"].append(self._entry(record["id"], path, parent, record["created"]))
                    if make_current:
                        registry["current"] = record["id"]
                    self._write_registry(registry)
                except BaseException:
                    shutil.rmtree(path, ignore_errors=True)
                    raise
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return self.get(record["id"])

    def _write_folder(self, folder: Path, model, result, folds, id, parent, cancel) -> dict:
        import torch  # only writing checkpoints needs it

        source = Path(model.folder.path)
        plans_name = model.folder.plans.get("plans_name") or "nnUNetPlans"
        trained_name = f"{model.trainer_name}__{plans_name}__{model.configuration.name}"
        trained = folder / trained_name
        trained.mkdir()
        for name in ("dataset.json", "plans.json", "dataset_fingerprint.json"):
            if (source / name).is_file():
                shutil.copyfile(source / name, trained / name)
        for recipe in sorted(source.glob("crossval_results_folds_*/postprocessing.json")):
            (trained / recipe.parent.name).mkdir(exist_ok=True)
            shutil.copyfile(recipe, trained / recipe.parent.name / recipe.name)
        checksums = {}
        for fold in folds:
            _check_cancel(cancel)
            checkpoint = dict(model.checkpoint_entries[model.folds.index(fold)])
            checkpoint["network_weights"] = result.weights[fold]
            relative = f"{trained_name}/fold_{fold}/{CHECKPOINT}"
            (folder / relative).parent.mkdir()
            torch.save(checkpoint, folder / relative)
            checksums[relative] = file_sha256(folder / relative)
        record = {
            "id": id, "family": self.key, "original": str(self.original),
            "parent": {"id": parent, "path": str(source), "checksum": model.checksum(),
                       "checkpoint": model.checkpoint_name},
            "created": _now(), "model": model.name, "configuration": model.configuration.name,
            "trainer": model.trainer_name, "folds": folds, "checkpoints": checksums,
            "finetune": result.provenance(),
        }
        write_json(folder / VERSION_FILE, record)
        return record

    # -- helpers -----------------------------------------------------------------------------------------
    def _parent_of(self, model) -> str:
        """Which version of this family `model` was loaded from."""
        loaded = Path(model.folder.path).resolve()
        if loaded == self.original or self.original in loaded.parents:
            return ORIGINAL
        for version in self.list()[1:]:
            root = version.path.resolve()
            if loaded == root or root in loaded.parents:
                return version.id
        if self.opened and (loaded == self._opened_root or self._opened_root in loaded.parents):
            return self.opened
        raise ModelError(f"The fine-tuned model ({loaded}) is neither {self.original} nor one of its versions.")

    def _nearest_ancestor(self, id: str, registry: dict = None) -> str:
        """The closest ancestor of `id` that still exists (the original at the latest)."""
        registry = registry or self._read_registry(missing_ok=True)
        entries = {e["id"]: e for e in registry["versions"]}
        parent = (entries.get(id) or {}).get("parent") or ORIGINAL
        seen = {id}
        while parent != ORIGINAL and parent not in seen:
            entry = entries.get(parent)
            if entry is None:
                return ORIGINAL
            if not entry.get("deleted"):
                return parent
            seen.add(parent)
            parent = entry.get("parent") or ORIGINAL
        return ORIGINAL

    def _owns(self, path: Path, id: str) -> bool:
        """Whether `path` is version `id`'s own folder: inside this family's folder, or describing itself
        as that version of this family."""
        resolved, family = path.resolve(), self.family_dir.resolve()
        if family in resolved.parents:
            return True
        try:
            record = json.loads((path / VERSION_FILE).read_text())
            return isinstance(record, dict) and record.get("family") == self.key and record.get("id") == id
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            return False

    def _is_protected(self, path: Path) -> bool:
        path = Path(path).absolute()
        resolved = path.resolve()
        return (is_shipped(path) or resolved == self.original or self.original in resolved.parents)

    def _entry(self, id, path: Path, parent, created) -> dict:
        path = Path(path).absolute()
        try:  # inside the family folder: stored relative, so the home can be moved
            stored = path.relative_to(self.family_dir.absolute()).as_posix()
        except ValueError:
            stored = str(path)
        return {"id": id, "path": stored, "parent": parent, "created": created}

    def _entry_path(self, entry: dict) -> Path:
        path = Path(entry["path"])
        return path if path.is_absolute() else self.family_dir / path

    def _current_id(self, registry: dict) -> str:
        current = registry.get("current") or ORIGINAL
        return current if isinstance(current, str) and current in {e["id"] for e in _live(registry)} else ORIGINAL

    def _next_number(self, registry: dict) -> int:
        numbers = [_number(e["id"]) for e in registry["versions"]]
        if self.family_dir.is_dir():
            numbers += [_number(p.name) for p in self.family_dir.iterdir()]
        return max([0] + numbers) + 1

    def _read_registry(self, missing_ok: bool = False) -> dict:
        return read_registry(self.registry_path, str(getattr(self, "original", "")), missing_ok)

    def _write_registry(self, registry: dict):
        if self.opened is None:  # opened through the original: remember where it is now
            registry["original"] = str(self.original)
        write_json(self.registry_path, registry, atomic=True)

    def check_writable(self, target=None):
        """ModelError now, before minutes of fine-tuning, when the new version could not be written."""
        if target is not None:
            path = self.check_target(target)
            writable_folder(path.parent, self.name)
        else:
            writable_folder(self.family_dir, self.name)



def resolve(model_path, version: str = None, home=None, configuration: Optional[str] = None) -> Tuple[Path, Version]:
    """The folder to load for `model_path`: the named `version`, else the folder itself when it is a version
    folder, else the model's current version. A damaged version is refused with a ModelError."""
    path = Path(model_path).expanduser()
    try:
        versions = ModelVersions(path, home, configuration)
    except Unidentified:
        if version in (None, ORIGINAL):  # not a usable model folder: loading it says exactly why
            return path, Version(ORIGINAL, path, None, "", True, True)
        raise
    if version is not None:
        chosen = versions.get(version)
    elif versions.opened is not None:
        chosen = versions.get(versions.opened)
    else:
        chosen = versions.current()
    if chosen.problem:
        if chosen.id == ORIGINAL:
            raise ModelError(f"The original version of {versions.name} cannot be used: {chosen.problem}.")
        raise ModelError(f"Version {chosen.id} of {versions.name} cannot be used: {chosen.problem}; "
                         f"use another version (models use), roll back (models rollback) or delete it "
                         f"(models delete {chosen.id}).")
    return chosen.path, chosen


# ----------------------------------------------------------------------------------------------- helpers

def _display_name(trained: Path) -> str:
    parts = trained.name.split("__")
    return f"{trained.parent.name} ({parts[2]})" if len(parts) == 3 else trained.name


def _live(registry: dict) -> List[dict]:
    return [e for e in registry["versions"] if not e.get("deleted")]


def _number(id: str) -> int:
    match = VERSION_ID.match(str(id))
    return int(match.group(1)) if match else 0


def _check_cancel(cancel):
    if cancel is not None and cancel.is_set():
        raise Cancelled()


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _local_time(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except (ValueError, TypeError, OverflowError):
        return str(iso)[:40]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _mean_dice(dice: dict, which: str):
    value = _mapping(dice.get(which)).get("mean")
    usable = isinstance(value, (int, float)) and value == value and abs(value) < 1e300  # NaN: nothing labelled
    return float(value) if usable else None


def _dice_text(before: dict, after: dict) -> str:
    for which, label in (("validation", "validation Dice"), ("training", "Dice")):
        b, a = _mean_dice(before, which), _mean_dice(after, which)
        if a is not None:
            return f"{label} {b:.2f} -> {a:.2f}" if b is not None else f"{label} {a:.2f}"
    return ""
