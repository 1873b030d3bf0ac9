"""The models the panel offers: the ones shipped with the extension plus folders the user added.

Only JSON is read here (dataset.json, plans.json, the fold folders), never a checkpoint, and no torch: the
panel lists models and shows their labels, channels and modality before PyTorch is even installed.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional

from SegmentMBTFELib.errors import ModelError
from SegmentMBTFELib.shipped import default_model, shipped_models

SETTINGS_FOLDERS = "SegmentMBTFE/ModelFolders"
SETTINGS_LAST = "SegmentMBTFE/LastModel"
CT_WORDS = ("ct", "computed tomography")
MR_WORDS = ("mr", "mri", "t1", "t2", "flair", "adc", "dwi", "pd", "t1ce", "t1gd", "magnetic")


@dataclass
class ModelInfo:
    """What the panel shows about a model folder; `problem` says why it cannot be used ('' when it can)."""
    path: str
    name: str
    channels: List[str] = field(default_factory=list)
    labels: List[str] = field(default_factory=list)
    folds: List[str] = field(default_factory=list)
    shipped: bool = False
    problem: str = ""

    @property
    def modality(self) -> str:
        return modality(self.channels)

    def summary(self) -> str:
        """One short paragraph for the panel."""
        if self.problem:
            return self.problem
        return (f"Modality: {self.modality}. Channels: {', '.join(self.channels)}. "
                f"Labels: {', '.join(self.labels)}. Folds: {', '.join(self.folds) or 'none'}.")


def available_models(user_folders: Iterable[str] = ()) -> List[ModelInfo]:
    """Shipped models first (sorted), then the user's folders in the order they were added; no duplicates."""
    models, seen = [], set()
    for folder in shipped_models():
        _add(models, seen, describe(folder, shipped=True))
    for folder in user_folders:
        if Path(folder).is_dir():  # a folder deleted since it was added is dropped, not listed as broken
            _add(models, seen, describe(folder))
    return models


def describe(path, shipped: bool = False) -> ModelInfo:
    """Read a model folder's description; a folder that is not a usable model gets `problem` set."""
    path = Path(path)
    try:
        trained = trained_folder(path)
        dataset = json.loads((trained / "dataset.json").read_text())
        channels = dataset.get("channel_names") or dataset.get("modality") or {}
        labels = [name for name, value in (dataset.get("labels") or {}).items()
                  if name not in ("background", "ignore") and value not in (0, [0])]
        folds = sorted((p.name[len("fold_"):] for p in trained.glob("fold_*")
                        if any(p.glob("checkpoint_*.pth"))), key=_fold_order)
        info = ModelInfo(str(path), _model_name(trained), [channels[k] for k in sorted(channels, key=int)],
                         labels, folds, shipped)
        if not folds:
            info.problem = f"{info.name} has no trained fold (no fold_N/checkpoint_final.pth)."
        return info
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ModelError) as error:
        return ModelInfo(str(path), path.name, shipped=shipped,
                         problem=f"{path.name} is not a usable nnU-Net model folder ({_reason(error)}).")


def trained_folder(path: Path) -> Path:
    """The folder holding plans.json: the path itself or its one trained configuration subfolder."""
    if (path / "plans.json").is_file():
        return path
    trained = sorted(p for p in path.iterdir() if (p / "plans.json").is_file()) if path.is_dir() else []
    if len(trained) == 1:
        return trained[0]
    if not trained:
        raise ValueError("no plans.json")
    raise ValueError(f"{len(trained)} trained configurations; add one of them")


def default_path() -> str:
    """The shipped default model's folder ('' when it is not installed): the panel's first choice."""
    try:
        return str(default_model())
    except ModelError:
        return ""


def find(models: List[ModelInfo], wanted: str) -> Optional[ModelInfo]:
    """A model by path or by name (case-insensitive, also the folder name) for the console API."""
    wanted_path = str(Path(wanted).expanduser().resolve()) if wanted else ""
    for info in models:
        if wanted_path == str(Path(info.path).resolve()) or wanted.lower() in (info.name.lower(),
                                                                                Path(info.path).name.lower()):
            return info
    return None


def modality(channels: List[str]) -> str:
    """'CT', 'MR' or the channel names themselves: what kind of image each input expects."""
    words = [c.strip().lower() for c in channels]
    if words and all(w in CT_WORDS for w in words):
        return "CT"
    if words and all(any(w == m or w.startswith(m + " ") for m in MR_WORDS) for w in words):
        return "MR"
    return ", ".join(channels) or "unknown"


def remembered_folders(settings) -> List[str]:
    """The user's added model folders from QSettings (a list, or one string when only one was stored)."""
    value = settings.value(SETTINGS_FOLDERS) if settings.contains(SETTINGS_FOLDERS) else []
    if isinstance(value, str):
        value = [value] if value else []
    return [str(v) for v in (value or [])]


def remember_folder(settings, path: str) -> None:
    folders = remembered_folders(settings)
    if path not in folders:
        settings.setValue(SETTINGS_FOLDERS, folders + [path])


def forget_folder(settings, path: str) -> None:
    settings.setValue(SETTINGS_FOLDERS, [f for f in remembered_folders(settings) if f != path])


def _add(models, seen, info):
    key = str(Path(info.path).resolve())
    if key not in seen:
        seen.add(key)
        models.append(info)


def _model_name(trained: Path) -> str:
    """The engine's name for the model, which tags the segments it makes."""
    from SegmentMBTFELib.modelfolder import ModelFolder
    return ModelFolder(trained).name


def _fold_order(fold: str):
    return (0, int(fold)) if fold.isdigit() else (1, 0)


def _reason(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return f"{Path(error.filename).name if error.filename else 'a file'} is missing"
    if isinstance(error, json.JSONDecodeError):
        return "dataset.json is not valid JSON"
    return str(error) or type(error).__name__
