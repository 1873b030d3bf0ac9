"""The models shipped with the extension, and the one used when none is chosen.

No torch here: the Slicer panel lists models before PyTorch is installed.
"""
from pathlib import Path
from typing import List

from ..errors import ModelError

MODULE_DIR = Path(__file__).resolve().parents[2]  # SegmentMBTFE/, which holds SegmentMBTFELib/models/
# Source checkout (and editable install): <repo>/models next to the module folder. Installed extension: CMake copies
# the same folder into the module's Resources. Installed wheel: setup.py copies its models into the package.
SHIPPED_MODEL_DIRS = (MODULE_DIR.parent / "models", MODULE_DIR / "Resources" / "Models",
                      Path(__file__).resolve().parents[1] / "shipped_models")
# The better of the two shipped hippocampus models on their cross-validation (models/README.md).
DEFAULT_MODEL = "hippocampus_mbtfe"


def shipped_models() -> List[Path]:
    """The shipped model folders, sorted by name (models/ also holds scripts and caches)."""
    found = []
    for root in SHIPPED_MODEL_DIRS:
        if root.is_dir():
            found += sorted(p for p in root.iterdir() if _holds_model(p))
    return found


def default_model() -> Path:
    for folder in shipped_models():
        if folder.name == DEFAULT_MODEL:
            return folder
    raise ModelError(f"No model was given and the default model ({DEFAULT_MODEL}) is not installed; "
                     f"give a model folder with -m.")


def is_shipped(path) -> bool:
    """True for a shipped model folder or anything inside one: those are read-only."""
    path = Path(path).resolve()
    return any(path == root.resolve() or root.resolve() in path.parents for root in SHIPPED_MODEL_DIRS
               if root.is_dir())


def _holds_model(folder: Path) -> bool:
    """A model folder, or a dataset folder above one."""
    return folder.is_dir() and ((folder / "plans.json").is_file() or any(folder.glob("*/plans.json")))
