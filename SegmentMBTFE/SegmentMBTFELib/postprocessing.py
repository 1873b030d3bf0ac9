"""nnU-Net's cross-validation postprocessing: keep only the largest connected component of chosen labels.

Read from `postprocessing.json` (nnU-Net writes it beside `postprocessing.pkl`); the pickle is never
opened, because unpickling a file from a model folder can run code.
"""
import numpy as np
from scipy import ndimage

from .errors import ModelError

_KNOWN = "remove_all_but_largest_component_from_segmentation"


def apply_postprocessing(labelmap: np.ndarray, recipe: dict) -> np.ndarray:
    """Apply every step of a postprocessing.json recipe, in order, to a copy of `labelmap`."""
    names = recipe.get("postprocessing_fns", [])
    kwargs = recipe.get("postprocessing_kwargs", [])
    for name, arguments in zip(names, kwargs):
        if name != _KNOWN:
            raise ModelError(f"Unsupported postprocessing step '{name}' in postprocessing.json.")
        labelmap = keep_largest_component(labelmap, arguments["labels_or_regions"],
                                          arguments.get("background_label", 0))
    return labelmap


def keep_largest_component(labelmap: np.ndarray, labels_or_regions, background_label=0) -> np.ndarray:
    """Set to background every component but the largest of the union of the given labels (or regions)."""
    mask = np.isin(labelmap, np.asarray(_flatten(labels_or_regions)))
    # Full (26-) connectivity, as skimage.measure.label's default that nnU-Net relies on.
    components, count = ndimage.label(mask, structure=np.ones((3,) * labelmap.ndim, bool))
    if count <= 1:
        return labelmap
    sizes = np.bincount(components.ravel())[1:]
    keep = np.flatnonzero(sizes == sizes.max()) + 1  # nnU-Net keeps every component of the largest size
    result = labelmap.copy()
    result[mask & ~np.isin(components, keep)] = background_label
    return result


def _flatten(value):
    if isinstance(value, (list, tuple)):
        return [int(x) for v in value for x in _flatten(v)]
    return [int(value)]
