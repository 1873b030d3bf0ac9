"""SegmentMBTFELib: the SegmentMBTFE engine (torch, numpy, scipy, SimpleITK; never slicer or qt).

    from SegmentMBTFELib import load_model, read_volume
    model = load_model("path/to/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres")
    prediction = model.predict([read_volume("case.nii.gz")])
"""
__version__ = "0.1.0"

from .errors import Cancelled, InputError, ModelError, OutOfMemory, SegmentError  # noqa: E402
from .volume import Volume  # noqa: E402

# torch is imported on first use of these, so `segment-mbtfe models info` and image IO start quickly.
_LAZY = {"Model": "inference.model", "Prediction": "inference.model", "load_model": "inference.loading",
         "read_volume": "io.images", "read_channels": "io.images"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
