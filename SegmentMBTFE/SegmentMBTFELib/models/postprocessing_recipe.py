"""nnU-Net's cross-validation postprocessing recipe, `postprocessing.json`, read and checked.

nnU-Net writes it beside `postprocessing.pkl`; the pickle is never opened, because unpickling a file from a model
folder can run code. inference/postprocessing.py applies the steps.
"""
from typing import List, Tuple

import numpy as np

from ..errors import ModelError

_KNOWN = "remove_all_but_largest_component_from_segmentation"


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
            labels = label_numbers(kwargs["labels_or_regions"])
            background = kwargs.get("background_label", 0)
            if not labels or isinstance(background, bool) or not isinstance(background, int) or \
                    not all(0 <= v < 2 ** 32 for v in labels + [background]):
                raise ValueError("not label numbers")
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError):
            raise ModelError("postprocessing.json: a step's 'labels_or_regions' and 'background_label' must be "
                             "label numbers.") from None
        steps.append((kwargs["labels_or_regions"], background))
    return steps


def label_numbers(value) -> list:
    """The label numbers of a label or a (nested) list of them; TypeError for anything else."""
    if isinstance(value, (list, tuple)):
        return [int(x) for v in value for x in label_numbers(v)]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"not a label number: {value!r}")
    return [int(value)]
