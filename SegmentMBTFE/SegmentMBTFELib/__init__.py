"""SegmentMBTFELib: the SegmentMBTFE engine (torch, numpy, scipy, SimpleITK; never slicer or qt).

    from SegmentMBTFELib import load_model, read_volume
    model = load_model("path/to/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres")
    prediction = model.predict([read_volume("case.nii.gz")])
"""
__version__ = "0.1.0"

from .errors import Cancelled, InputError, ModelError, OutOfMemory, SegmentError  # noqa: E402
from .volume import Volume  # noqa: E402
from .model import Model, Prediction, load_model  # noqa: E402
