"""What every trained model folder offers the engine, nnU-Net v2's (folder.ModelFolder) or v1's
(nnunet_v1.V1ModelFolder): one base class, so the two differ only where nnU-Net's two versions do (file names,
fold folder names, how the plans are read) and inference/model.Model reads either without asking which it is.
"""
import json
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import ModelError


class TrainedFolder:
    """A trained configuration: its plans, labels and configuration (set by the subclass) and its folds'
    checkpoints. A subclass sets the class attributes and `_fold_folders`; the rest is the same for v1 and v2."""
    nnunet_version = 2
    CHECKPOINTS: Dict[str, str] = {}   # "final", "best" -> the checkpoint file's name
    CHECKPOINT_SUFFIX = ""             # a checkpoint named by its file name ends so
    PLANS = ""                         # the plans file, as messages name it

    path: Path
    plans: dict
    trainer_name: Optional[str]
    configuration_name: str

    @property
    def name(self) -> str:
        raise NotImplementedError

    def _fold_folders(self) -> Dict[str, Path]:
        """{fold ("0", "all"...): its folder} for every fold folder present."""
        raise NotImplementedError

    def postprocessing(self) -> Optional[dict]:
        raise NotImplementedError

    @classmethod
    def checkpoint_filename(cls, checkpoint: str) -> str:
        """"final", "best" or a file name of this folder's kind (never a path: it is read inside a fold folder)."""
        if checkpoint in cls.CHECKPOINTS:
            return cls.CHECKPOINTS[checkpoint]
        if checkpoint.endswith(cls.CHECKPOINT_SUFFIX) and Path(checkpoint).name == checkpoint \
                and "\\" not in checkpoint:
            return checkpoint
        version = " for an nnU-Net v1 model" if cls.nnunet_version == 1 else ""
        raise ModelError(f"Unknown checkpoint '{checkpoint}'{version}: use final, best or a file name ending in "
                         f"{cls.CHECKPOINT_SUFFIX}.")

    def checkpoint_path(self, fold, checkpoint: str = "final") -> Path:
        return self.path / self._fold_folder_name(str(fold)) / self.checkpoint_filename(checkpoint)

    def _fold_folder_name(self, fold: str) -> str:
        return f"fold_{fold}"

    def fold_folders(self) -> List[str]:
        """Every fold folder's fold ("0", "all"...), with or without a checkpoint."""
        return sorted(self._fold_folders(), key=_fold_order)

    def available_folds(self, checkpoint: str = "final") -> List[str]:
        """Folds holding the checkpoint; "all" only when no numbered fold does (nnU-Net skips it then)."""
        return folds_holding(self._fold_folders(), self.checkpoint_filename(checkpoint))

    @property
    def transpose_forward(self) -> List[int]:
        return self._permutation("transpose_forward")

    @property
    def transpose_backward(self) -> List[int]:
        return self._permutation("transpose_backward")

    def _permutation(self, key: str) -> List[int]:
        value = self.plans.get(key, [0, 1, 2])
        # whole numbers (Python's or numpy's: v1's plans are pickles), not booleans
        whole = isinstance(value, (list, tuple)) and all(
            hasattr(type(v), "__index__") and not isinstance(v, bool) for v in value)
        if not whole or sorted(int(v) for v in value) != [0, 1, 2]:
            raise ModelError(f"{self.PLANS}: '{key}' must be an order of the axes 0, 1, 2, not {short_text(value)}.")
        return [int(v) for v in value]


def folds_holding(fold_folders: Dict[str, Path], filename: str) -> List[str]:
    """The folds whose folder holds `filename`, in the order nnU-Net loads them: the numbered ones, else "all"."""
    folds = [f for f, folder in fold_folders.items() if (folder / filename).is_file()]
    numbered = sorted((f for f in folds if f != "all"), key=int)
    return numbered or [f for f in folds if f == "all"]


def _fold_order(fold: str):
    return (1, 0) if fold == "all" else (0, int(fold))


def short_text(value) -> str:
    """A value from a model's files as messages quote it: printable, at most 40 characters."""
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= 40 else text[:37] + "..."
