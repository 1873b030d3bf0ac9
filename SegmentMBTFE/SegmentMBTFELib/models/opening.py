"""Which reader a model folder needs: nnU-Net v2's JSON (folder.py) or v1's pickles (nnunet_v1.py).

The one place that tells the two apart; inference/loading.py loads the Model that goes with the folder it gives.
"""
from typing import Optional

from .folder import ModelFolder
from .nnunet_v1 import V1ModelFolder, is_v1_folder


def open_model_folder(path, configuration: Optional[str] = None):
    """The model folder at `path`: a ModelFolder, or for nnU-Net v1 folders a V1ModelFolder, which has the same
    interface."""
    if is_v1_folder(path):
        return V1ModelFolder(path, configuration)
    return ModelFolder(path, configuration)
