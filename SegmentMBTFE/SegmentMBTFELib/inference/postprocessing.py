"""nnU-Net's cross-validation postprocessing: keep only the largest connected component of chosen labels.

Read from `postprocessing.json` (nnU-Net writes it beside `postprocessing.pkl`); the pickle is never
opened, because unpickling a file from a model folder can run code.
"""
from typing import List, Tuple

import numpy as np
from scipy import ndimage

from ..errors import ModelError

_KNOWN = "remove_all_but_largest_component_from_segmentation"


def apply_postprocessing(labelmap: np.ndarray, recipe: dict) -> np.ndarray:
    """Apply every step of a postprocessing.json recipe, in order, to a copy of `labelmap`."""
    for labels_or_regions, background in postprocessing_steps(recipe):
        labelmap = keep_largest_component(labelmap, labels_or_regions, background)
    return labelmap


def postprocessing_steps(recipe) -> List[Tuple[list, int]]:
    """(labels or regions, background label) of each step of a postprocessing.json recipe, checked: a
    recipe that is not nnU-Net's is one ModelError naming what is wrong."""
    names = recipe.get("postprocessing_fns", []) if isinstance(recipe, dict) else None
    arguments = recipe.get("postprocessing_kwargs", []) if isinstance(recipe, dict) else None
    if not isinstance(names, list) or not isinstance(arguments, list) or len(names) != len(arguments):
        raise ModelError("postprocessing.json must list its steps ('postprocessing_fns') with one set of "
                         "arguments each ('postprocessing_kwargs').")
    steps = []
    for name, kwargs in zip(names, arguments):
        if name != _KNOWN:
            raise ModelError(f"Unsupported postprocessing step '{str(name)[:80]}' in postprocessing.json.")
        try:
            labels = _flatten(kwargs["labels_or_regions"])
            background = kwargs.get("background_label", 0)
            if not labels or isinstance(background, bool) or not isinstance(background, int) or \
                    not all(0 <= v < 2 ** 32 for v in labels + [background]):
                raise ValueError("not label numbers")
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError):
            raise ModelError("postprocessing.json: a step's 'labels_or_regions' and 'background_label' must be "
                             "label numbers.") from None
        steps.append((kwargs["labels_or_regions"], background))
    return steps


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
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"not a label number: {value!r}")
    return [int(value)]
