"""The models the panel offers: the same models as `segment-mbtfe models list` (SegmentMBTFELib.models.home),
one entry per trained configuration; and adding a model folder or zip, the way `models add` does.

Only JSON is read (dataset.json, plans.json, the fold folders; for an nnU-Net v1 model its pickles, as plain data
only: models/nnunet_v1.py), never a checkpoint, and torch is never imported:
the panel lists models and shows their labels, channels and modality before PyTorch is even installed, and
unpacks a zip in Slicer's own process. A folder is registered where it is (as `models add --link`, so removing
it later never deletes it); a zip is unpacked into the models home. Earlier releases kept the added folders in
Slicer's settings: those are registered once, and the setting is cleared.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from SegmentMBTFELib.errors import ModelError
from SegmentMBTFELib.models import home as models_home
from SegmentMBTFELib.models.modality import modality  # the engine's mapping, also used to pick DICOM series
from SegmentMBTFELib.models.shipped import default_model, shipped_models

SETTINGS_FOLDERS = "SegmentMBTFE/ModelFolders"  # earlier releases' added folders
SETTINGS_LAST = "SegmentMBTFE/LastModel"


@dataclass
class ModelInfo:
    """What the panel shows about a model; `problem` says why it cannot be used ('' when it can)."""
    path: str
    name: str                # the engine's name, which tags the segments: "Dataset004_Hippocampus (3d_fullres)"
    channels: List[str] = field(default_factory=list)
    labels: List[str] = field(default_factory=list)
    folds: List[str] = field(default_factory=list)
    shipped: bool = False
    problem: str = ""
    listed_as: str = ""      # its name in `segment-mbtfe models list` (what -m takes)
    network: str = ""        # its family: "PlainConvUNet", "ResidualEncoderUNet", "UNet++", "Primus V3-S", ...
    trainer: str = ""        # the nnU-Net trainer that trained it

    @property
    def modality(self) -> str:
        return modality(self.channels)

    def summary(self) -> str:
        """One short paragraph for the panel."""
        if self.problem:
            return self.problem
        network = f" Network: {self.network} (trainer {self.trainer or 'unknown'})." if self.network else ""
        return (f"Modality: {self.modality}. Channels: {', '.join(self.channels)}. "
                f"Labels: {', '.join(self.labels)}. Folds: {', '.join(self.folds) or 'none'}.{network}")


def available_models(settings=None) -> List[ModelInfo]:
    """Every model `models list` shows, shipped first, one entry per trained configuration. A registered folder
    that went missing is left out here (`models list` shows it). `settings`: Slicer's, to take over the folders
    an earlier release kept there."""
    if settings is not None:
        _adopt_remembered(settings)
    try:
        models = models_home.installed()
    except ModelError as error:  # the list of registered folders is unreadable: say so, offer the others
        shipped = [models_home.describe(p, p.name, models_home.SHIPPED) for p in shipped_models()]
        return [e for m in shipped for e in entries(m)] + [
            ModelInfo(str(models_home.models_home()), "registered models", problem=str(error))]
    present = [m for m in models if m.source != models_home.REGISTERED or m.path.is_dir()]
    return [entry for model in present for entry in entries(model)]


def entries(model) -> List[ModelInfo]:
    """A models_home.InstalledModel as the panel lists it: the model's folder when it has one trained
    configuration, else each configuration's folder (the engine needs one configuration to segment)."""
    shipped = model.source == models_home.SHIPPED
    if model.problem:
        return [ModelInfo(str(model.path), model.name, shipped=shipped, problem=model.problem, listed_as=model.name)]
    single = len(model.configurations) == 1
    return [ModelInfo(str(model.path if single else c.path), c.title, model.channels, model.labels, c.folds, shipped,
                      listed_as=model.name, network=c.network, trainer=c.trainer) for c in model.configurations]


def describe(path) -> ModelInfo:
    """A folder as the panel would list it (its first configuration); `problem` set when it is not usable."""
    return entries(models_home.describe(Path(path)))[0]


def add(path) -> ModelInfo:
    """Add a model folder (registered where it is) or a model zip (unpacked into the models home) and return its
    entry; a folder already listed (a shipped model, one added before) is only found again. ModelError (one
    sentence) when it is not a model, or a zip is unsafe."""
    path = Path(path).expanduser()
    model = models_home.listed_at(path) if path.is_dir() else None
    if model is None:
        model = models_home.add(path, link=path.is_dir(), unique=True)
    return entries(model)[0]


def forget(path) -> None:
    """Forget a folder registered by `add` (the folder itself is left as it is)."""
    model = models_home.listed_at(path)
    if model is not None and model.source == models_home.REGISTERED:
        models_home.remove(model.name)


def default_path() -> str:
    """The shipped default model's folder ('' when it is not installed): the panel's first choice."""
    try:
        return str(default_model())
    except ModelError:
        return ""


def find(models: List[ModelInfo], wanted: str) -> Optional[ModelInfo]:
    """A model by path or by name (case-insensitive: the panel's name, the `models list` name or the folder name)
    for the console API."""
    wanted_path = str(Path(wanted).expanduser().resolve()) if wanted else ""
    for info in models:
        if wanted_path == str(Path(info.path).resolve()) or wanted.lower() in (
                info.name.lower(), info.listed_as.lower(), Path(info.path).name.lower()):
            return info
    return None


def _adopt_remembered(settings) -> None:
    """Folders an earlier release kept in Slicer's settings are registered (once); the setting is then removed."""
    if not settings.contains(SETTINGS_FOLDERS):
        return
    value = settings.value(SETTINGS_FOLDERS)
    for folder in [value] if isinstance(value, str) else list(value or []):
        try:
            if folder and Path(str(folder)).is_dir() and models_home.listed_at(folder) is None:
                models_home.add(str(folder), link=True, unique=True)
        except ModelError:
            pass  # no longer a usable model: dropped, as the panel always dropped such folders
    settings.remove(SETTINGS_FOLDERS)
