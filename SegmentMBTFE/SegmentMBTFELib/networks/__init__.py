"""Build the network a model folder describes, from plain data, without importing arbitrary classes.

nnU-Net resolves class names in plans with `pydoc.locate`, which imports whatever a plans file names.
We resolve names only against the allow-lists below, so a model folder cannot make us import code.
"""
from functools import partial

from torch import nn

from ..errors import ModelError
from .families import FAMILIES, TRAINER_FAMILIES, checkpoint_family, inference_architecture, inference_weights  # noqa: F401
from .mbtfe import MBTFEUNet, TRAINER_OPTIONS, checkpoint_architecture, is_mbtfe_checkpoint
from .primus import Primus, primus_architecture
from ..nnunet_trainers import builds_plans_network, primus_of
from .unet import PlainConvUNet, ResidualEncoderUNet

# Networks by class name (the last dotted part of `network_class_name`). Other modules add theirs
# (MBTFE-UNet registers itself here), so the loader stays one table lookup.
NETWORKS = {
    "PlainConvUNet": PlainConvUNet,
    "ResidualEncoderUNet": ResidualEncoderUNet,
    "MBTFEUNet": MBTFEUNet,
    "Primus": Primus,  # built from the trainer's name (nnunet_trainers.py), never from plans alone
    **{name: family.network for name, family in FAMILIES.items()},  # UNet++, SegResNetVAE, 3D U-Net (families.py)
}

# Layer classes plans may name in `_kw_requires_import` entries.
LAYERS = {cls.__name__: cls for cls in (
    nn.Conv2d, nn.Conv3d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm,
    nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.LeakyReLU, nn.ReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU)}

# Arguments of dynamic-network-architectures that change nothing we rebuild (or only their default).
_IGNORED_DEFAULTS = {"block": "BasicBlockD", "bottleneck_channels": None}


# What the network classes raise for arguments of the wrong type, length or value (a hand-edited plans.json).
_BAD_ARGUMENTS = (TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError, ZeroDivisionError,
                  OverflowError, AssertionError)


def short_name(dotted: str) -> str:
    return str(dotted).rsplit(".", 1)[-1]


def resolve_layer(dotted):
    if dotted is None:
        return None
    cls = LAYERS.get(short_name(dotted))
    if cls is None:
        raise ModelError(f"The plans name a layer type this extension does not support: {dotted}")
    return cls


def build_network(architecture: dict, input_channels: int, num_classes: int, deep_supervision=False) -> nn.Module:
    """Instantiate `architecture` ({network_class_name, arch_kwargs, _kw_requires_import}) with fresh weights."""
    name = short_name(architecture["network_class_name"])
    cls = NETWORKS.get(name)
    if cls is None:
        raise ModelError(f"Unsupported network '{architecture['network_class_name']}'. "
                         f"Supported: {', '.join(sorted(NETWORKS))}.")
    kwargs = dict(architecture["arch_kwargs"])
    for key, default in _IGNORED_DEFAULTS.items():
        value = kwargs.pop(key, default)
        if value is not None and short_name(value) != default:
            raise ModelError(f"Unsupported {key} '{value}' in the plans' architecture.")
    for key in architecture.get("_kw_requires_import", ()):
        if key in kwargs:
            kwargs[key] = resolve_layer(kwargs[key])
    try:
        return cls(input_channels=input_channels, num_classes=num_classes, deep_supervision=deep_supervision,
                   **kwargs)
    except _BAD_ARGUMENTS as error:
        raise ModelError(f"The plans' architecture does not fit {name}: {str(error)[:200]}") from None


def _with_batchnorm(architecture: dict, checkpoint: dict = None) -> dict:
    """nnUNetTrainerBN swaps instance norm for batch norm."""
    kwargs = dict(architecture["arch_kwargs"])
    dim = "2d" if str(kwargs.get("conv_op", "")).endswith("2d") else "3d"
    kwargs["norm_op"] = f"torch.nn.BatchNorm{dim}"
    return {**architecture, "arch_kwargs": kwargs}


# Trainers whose network differs from the plans' architecture: trainer name -> architecture transform
# (architecture, checkpoint) -> architecture. Any other trainer (nnUNetTrainer_250epochs,
# nnUNetTrainerNoMirroring, ...) builds the plans' network.
TRAINERS = {"nnUNetTrainerBN": _with_batchnorm}
TRAINERS.update({name: partial(checkpoint_architecture, defaults=options) for name, options in TRAINER_OPTIONS.items()})


def architecture_for_trainer(trainer_name: str, architecture: dict, checkpoint: dict = None,
                             patch_size=None) -> dict:
    """The architecture of the network that `checkpoint` (nnU-Net's dict, optional) holds weights for;
    `patch_size` (the configuration's) sizes a Primus, whose position embedding has one entry per token."""
    if primus_of(trainer_name):
        return primus_architecture(*primus_of(trainer_name), patch_size)
    transform = TRAINERS.get(trainer_name)
    family = checkpoint_family(trainer_name, architecture, checkpoint) if transform is None else None
    if family:  # UNet++, SegResNetVAE, 3D U-Net: by trainer name, the plans, or the plans inside the checkpoint
        transform = partial(inference_architecture, family)
    elif transform is None and is_mbtfe_checkpoint(checkpoint):
        transform = checkpoint_architecture  # a subclass of an MBTFE trainer, or the original MBTFE code
    try:
        return transform(architecture, checkpoint) if transform else architecture
    except _BAD_ARGUMENTS as error:
        raise ModelError(f"The plans' architecture does not fit the {trainer_name} network: {str(error)[:200]}") \
            from None


def knows_trainer(trainer_name: str) -> bool:
    """Whether the engine knows which network this trainer builds: nnU-Net 2.8's (nnunet_trainers.py) and
    SegmentMBTFE's own (MBTFE-UNet, UNet++, SegResNetVAE, 3D U-Net)."""
    return builds_plans_network(trainer_name) or primus_of(trainer_name) is not None or \
        trainer_name in TRAINERS or trainer_name in TRAINER_FAMILIES
