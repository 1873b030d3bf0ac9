"""Train MBTFE-UNet with nnU-Net v2: the trainers and their registration with an installed nnunetv2.

    python -m SegmentMBTFELib.training.nnunet_trainer register        # once per Python environment (and after
    nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerMBTFE   # upgrading nnunetv2, which drops it)

nnU-Net finds trainers by class name inside its own package (and, in recent releases such as 2.8.1, in folders in
`nnUNet_extTrainer`). `register` copies a small re-exporting module (`shim/nnUNetTrainerMBTFE.py`) into
nnunetv2's trainer folder; `path` prints the shim's folder for `nnUNet_extTrainer` instead. Either way the
trainers themselves live only in `trainer.py` here, so training and the engine share one network definition.

Trainers (options in `networks.mbtfe.TRAINER_OPTIONS`): nnUNetTrainerMBTFE (instance norm, EAB with the
attention gate), nnUNetTrainerMBTFE_BN (BatchNorm in MBTFE, as the original code), nnUNetTrainerMBTFE_noEAB,
nnUNetTrainerMBTFE_blendGate. Subclass any of them (e.g. to change the epochs) and the options carry over.
`family_trainers.py` (shim `shim/nnUNetTrainerNetworks.py`, registered alongside): nnUNetTrainerUNetPlusPlus,
nnUNetTrainerSegResNetVAE, nnUNetTrainerUNet3D (networks/families.py).

nnunetv2 is imported only by `trainer.py`, which only nnU-Net imports: the engine, and this package's
registration commands, never need it.
"""
from .registration import (RegistrationError, external_trainer_folder, is_registered, register,  # noqa: F401
                           registered_path, unregister)
