"""nnU-Net's cross-validation postprocessing: keep only the largest connected component of chosen labels.

The recipe is `postprocessing.json`, read and checked by models/postprocessing_recipe.py.
"""
import numpy as np
from scipy import ndimage

from ..models.postprocessing_recipe import label_numbers, postprocessing_steps


def apply_postprocessing(labelmap: np.ndarray, recipe: dict) -> np.ndarray:
    """Apply every step of a postprocessing.json recipe, in order, to a copy of `labelmap`."""
    for labels_or_regions, background in postprocessing_steps(recipe):
        labelmap = keep_largest_component(labelmap, labels_or_regions, background)
    return labelmap


def keep_largest_component(labelmap: np.ndarray, labels_or_regions, background_label=0) -> np.ndarray:
    """Set to background every component but the largest of the union of the given labels (or regions)."""
    mask = np.isin(labelmap, np.asarray(label_numbers(labels_or_regions)))
    # Full (26-) connectivity, as skimage.measure.label's default that nnU-Net relies on.
    components, count = ndimage.label(mask, structure=np.ones((3,) * labelmap.ndim, bool))
    if count <= 1:
        return labelmap
    sizes = np.bincount(components.ravel())[1:]
    keep = np.flatnonzero(sizes == sizes.max()) + 1  # nnU-Net keeps every component of the largest size
    result = labelmap.copy()
    result[mask & ~np.isin(components, keep)] = background_label
    return result
