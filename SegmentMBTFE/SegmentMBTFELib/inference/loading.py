"""A model folder loaded as the Model that predicts it: nnU-Net v2 (model.Model) or v1 (v1_model.V1Model).

models/opening.py tells the folders apart; this module picks the Model that goes with the folder.
"""
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

from ..models.nnunet_v1 import V1ModelFolder
from ..models.opening import open_model_folder
from .model import Model
from .v1_model import V1Model


def load_model(path, configuration: str = None, folds: Sequence = None, checkpoint: str = "final") -> Model:
    """Load an nnU-Net v2 model folder (trained configuration folder, or the dataset folder above it), or an
    nnU-Net v1 one (models/nnunet_v1.py)."""
    folder = open_model_folder(path, configuration)
    model_class = V1Model if isinstance(folder, V1ModelFolder) else Model
    return model_class(folder, folds, checkpoint)


class ModelCache:
    """Loaded models by (folder, configuration, folds, checkpoint), the most recently used kept.

    Loading reads every checkpoint and builds the network, so the worker keeps the models it used last: a
    second Segment with the same model starts at once. Only a few are kept, because each holds its weights."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._models = OrderedDict()
        self.last_was_cached = False

    def get(self, folder, configuration=None, folds=None, checkpoint: str = "final"):
        key = (str(Path(folder).resolve()), configuration, tuple(str(f) for f in folds or ()), checkpoint)
        self.last_was_cached = key in self._models
        if self.last_was_cached:
            self._models.move_to_end(key)
        else:
            self._models[key] = load_model(folder, configuration, list(folds) if folds else None, checkpoint)
            while len(self._models) > self.keep:
                self._models.popitem(last=False)
        return self._models[key]

    def clear(self):
        self._models.clear()
