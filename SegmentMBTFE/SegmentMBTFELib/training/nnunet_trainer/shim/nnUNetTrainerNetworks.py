"""UNet++, SegResNetVAE and 3D U-Net (2016) trainers for nnU-Net v2, provided by SegmentMBTFE (SegmentMBTFELib).

This module only re-exports the trainers defined in SegmentMBTFELib.training.nnunet_trainer.family_trainers, so training
and the SegmentMBTFE engine share one network definition. It was copied here by
`python -m SegmentMBTFELib.training.nnunet_trainer register`; `... unregister` removes it.
"""
# segment-mbtfe-trainer-shim: this marker lets `unregister` recognise the file as SegmentMBTFE's.
TRAINERS = ("nnUNetTrainerUNetPlusPlus", "nnUNetTrainerSegResNetVAE", "nnUNetTrainerUNet3D")

try:
    from SegmentMBTFELib.training.nnunet_trainer.family_trainers import (  # noqa: F401
        nnUNetTrainerSegResNetVAE, nnUNetTrainerUNet3D, nnUNetTrainerUNetPlusPlus)
except ImportError as _error:
    # nnU-Net imports every module in its trainer folder while searching for any trainer by name, so an
    # exception here would break all variant trainers. Define stand-ins that fail only when used.
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as _Base

    _REASON = (f"The UNet++, SegResNetVAE and 3D U-Net trainers need SegmentMBTFELib in this Python ({_error}). "
               "Install it (pip install <SegmentMBTFE source folder>) or remove them with "
               "`python -m SegmentMBTFELib.training.nnunet_trainer unregister`.")

    def _fail(*args, **kwargs):
        raise ImportError(_REASON)

    for _name in TRAINERS:
        globals()[_name] = type(_name, (_Base,), {"__init__": _fail, "build_network_architecture": staticmethod(_fail)})
