"""The trainers nnU-Net 2.8 ships, by name: which network each builds, so the engine knows a folder before loading it.

A model folder names its trainer twice (`<Trainer>__<Plans>__<configuration>` and the checkpoint's `trainer_name`).
Most of nnU-Net's trainers change only training (epochs, loss, optimizer, augmentation, sampling) and build the
network the plans describe; those run as they are, and what they change for inference, the mirroring TTA may use,
is in the checkpoint (`inference_allowed_mirroring_axes`). A few build another network: BN swaps the norm
(networks/__init__.py), NoDeepSupervision trains without the extra heads inference never uses, and the Primus
trainers build the Primus transformer (networks/primus.py) from the trainer's name and the configuration's patch size.

A trainer outside this table whose weights do not fit the plans' network builds a network the engine does not know:
it is refused by name before any weight is loaded (`unknown_trainer_message`), not with "the weights do not fit".
"""
import re
from typing import Optional

# nnU-Net 2.8's Primus trainers (nnunetv2/training/nnUNetTrainer/primus/primus_trainers.py) -> (version, size).
# The _96_BS1/_48_BS1 ones change the patch in the plans they save, so the saved plans build them right.
PRIMUS_TRAINERS = {
    "nnUNet_Primus_S_Trainer": ("v1", "S"), "nnUNet_Primus_B_Trainer": ("v1", "B"),
    "nnUNet_Primus_M_Trainer": ("v1", "M"), "nnUNet_Primus_L_Trainer": ("v1", "L"),
    "nnUNet_Primus_M_Trainer_BS8": ("v1", "M"), "nnUNet_Primus_M_Trainer_BS8_2e4": ("v1", "M"),
    "_Primus_S_96_BS1": ("v1", "S"), "_Primus_B_96_BS1": ("v1", "B"), "_Primus_M_96_BS1": ("v1", "M"),
    "_Primus_L_48_BS1": ("v1", "L"),
    **{f"nnUNet_PrimusV{v}{s}_Trainer": (f"v{v}", s) for v in (2, 3) for s in "SBML"},
}

# nnU-Net 2.8's trainers that build the plans' own network (only training differs), nnUNetTrainer included.
PLANS_NETWORK_TRAINERS = frozenset((
    "nnUNetTrainer", "nnUNet_Trainer_BS8", "nnUNetTrainerBN", "nnUNetTrainerNoDeepSupervision",
    "nnUNetTrainerBenchmark_5epochs", "nnUNetTrainerBenchmark_5epochs_noDataLoading",
    "nnUNetTrainerDA5", "nnUNetTrainerDA5ord0", "nnUNetTrainerDA5Segord0", "nnUNetTrainerDA5_10epochs",
    "nnUNetTrainerNoDA", "nnUNetTrainer_DASegOrd0", "nnUNetTrainer_DASegOrd0_NoMirroring", "nnUNetTrainer_noDummy2DDA",
    "nnUNetTrainerNoMirroring", "nnUNetTrainer_onlyMirror01", "nnUNetTrainer_onlyMirror01_1500ep",
    "nnUNetTrainer_onlyMirror01_DASegOrd0", "nnUNetTrainer_onlyMirror01_DA5",
    "nnUNetTrainer_warmup", "nnUNetTrainerCosAnneal",
    "nnUNetTrainerAdan", "nnUNetTrainerAdan1en3", "nnUNetTrainerAdan3en4", "nnUNetTrainerAdan1en1",
    "nnUNetTrainerAdanCosAnneal", "nnUNetTrainerAdam", "nnUNetTrainerVanillaAdam", "nnUNetTrainerVanillaAdam1en3",
    "nnUNetTrainerVanillaAdam3en4", "nnUNetTrainerAdam1en3", "nnUNetTrainerAdam3en4",
    "nnUNetTrainerDiceLoss", "nnUNetTrainerDiceCELoss_noSmooth", "nnUNetTrainerTopk10Loss",
    "nnUNetTrainerTopk10LossLS01", "nnUNetTrainerDiceTopK10Loss", "nnUNetTrainerCELoss", "nnUNetTrainerCELoss_5epochs",
    "nnUNetTrainer_probabilisticOversampling", "nnUNetTrainer_probabilisticOversampling_033",
    "nnUNetTrainer_probabilisticOversampling_010",
))
# nnUNetTrainer_<X>epochs[_NoMirroring] (training_length/), the names published models use most
_EPOCHS = re.compile(r"^nnUNetTrainer_\d+epochs?(_NoMirroring)?$")

# Trainers of nnU-Net's repository outside the 2.8 release (nnssl fine-tuning) and what to do about them.
REFUSED = {
    "PretrainedTrainer": "nnU-Net's PretrainedTrainer (nnssl fine-tuning, not in the 2.8 release) builds the network "
                         "its nnssl plans name",
}


def primus_of(trainer_name: Optional[str]):
    """(version, size) of the Primus a trainer builds, or None."""
    return PRIMUS_TRAINERS.get(str(trainer_name))


def primus_title(trainer_name: Optional[str]) -> Optional[str]:
    """What people call the Primus a trainer builds ("Primus-S", "Primus V3-S"), or None."""
    found = primus_of(trainer_name)
    if found is None:
        return None
    version, size = found
    return f"Primus-{size}" if version == "v1" else f"Primus V{version[1:]}-{size}"


def builds_plans_network(trainer_name: Optional[str]) -> bool:
    """Whether nnU-Net 2.8's trainer of this name builds the network its plans describe."""
    name = str(trainer_name)
    return name in PLANS_NETWORK_TRAINERS or bool(_EPOCHS.match(name))


def unknown_trainer_message(trainer_name: str, folder: str, detail: str) -> str:
    """The one sentence for a trainer that builds a network the engine does not know."""
    reason = REFUSED.get(trainer_name, f"{trainer_name} is not one of nnU-Net 2.8's trainers nor one this "
                                       "SegmentMBTFE knows, and it builds a network other than the one the plans "
                                       "describe")
    return (f"{folder} was trained with {trainer_name}: {reason} ({detail}). This SegmentMBTFE cannot rebuild that "
            "network; segment it with nnU-Net itself (nnUNetv2_predict with the trainer's code installed), or ask "
            "for the trainer to be supported.")
