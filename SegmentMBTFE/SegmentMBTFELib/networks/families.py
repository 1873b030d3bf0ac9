"""UNet++, SegResNetVAE and the 2016 3D U-Net as nnU-Net plans architectures: names, options, checks.

Each family is built from nnU-Net's PlainConvUNet plans (stages, widths, kernels, strides, layers) plus a few
options of its own, all plain values in `arch_kwargs`. The trainers (nnunet_trainer/trainer.py) write the
family's architecture, options included, into the plans they train with, so nnU-Net saves it in plans.json and in
every checkpoint's `init_args`; the engine rebuilds from there (or, when plans.json was replaced by the plain
planner's, from the trainer's name and the checkpoint). An option this code does not know, or a value it cannot
build, is refused with a message naming it; class names are only ever looked up in FAMILIES.
"""
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from ..errors import ModelError
from .mbtfe import _trained_architecture as trained_architecture  # the plans nnU-Net saved in a checkpoint
from .segresnet_vae import SegResNetVAE, default_blocks_down
from .unet3d import UNet3D
from .unetpp import UNetPlusPlus

# PlainConvUNet's plans arguments, which every family takes.
PLAIN_KEYS = ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage",
              "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op", "dropout_op_kwargs",
              "nonlin", "nonlin_kwargs", "nonlin_first")
_BASE = "PlainConvUNet"


def _dim(kwargs: dict) -> str:
    return "2d" if str(kwargs.get("conv_op", "")).endswith("2d") else "3d"


def _batchnorm_relu(kwargs: dict) -> dict:
    """The 2016 3D U-Net's layers: BatchNorm (torch's defaults) and ReLU."""
    return {"norm_op": f"torch.nn.BatchNorm{_dim(kwargs)}", "norm_op_kwargs": {"eps": 1e-5, "momentum": 0.1,
                                                                              "affine": True},
            "nonlin": "torch.nn.ReLU", "nonlin_kwargs": {"inplace": True}}


def _groupnorm_relu(kwargs: dict) -> dict:
    """Myronenko's layers: GroupNorm with 8 groups and ReLU."""
    return {"norm_op": "torch.nn.GroupNorm", "norm_op_kwargs": {"num_groups": 8, "eps": 1e-5, "affine": True},
            "nonlin": "torch.nn.ReLU", "nonlin_kwargs": {"inplace": True}}


@dataclass(frozen=True)
class Family:
    name: str                      # the class name plans carry (last dotted part)
    title: str                     # what people call the network
    network: type
    defaults: dict                 # its options and their defaults
    layers: Optional[Callable] = None  # plans kwargs -> the layers the paper fixes (replacing the planner's)
    reference: str = ""
    trainers: tuple = field(default_factory=tuple)

    @property
    def class_path(self) -> str:
        return f"{self.network.__module__}.{self.name}"


FAMILIES = {f.name: f for f in (
    Family("UNetPlusPlus", "UNet++", UNetPlusPlus, {"prune_depth": None},
           reference="Zhou et al. 2018, UNet++: A Nested U-Net Architecture", trainers=("nnUNetTrainerUNetPlusPlus",)),
    Family("SegResNetVAE", "SegResNetVAE", SegResNetVAE,
           {"blocks_down": None, "blocks_up": None, "vae": True, "vae_input_size": None, "vae_latent": 128,
            "vae_kl_weight": 0.1, "vae_l2_weight": 0.1}, layers=_groupnorm_relu,
           reference="Myronenko 2018, 3D MRI brain tumor segmentation using autoencoder regularization",
           trainers=("nnUNetTrainerSegResNetVAE",)),
    Family("UNet3D", "3D U-Net", UNet3D, {"channel_doubling": True}, layers=_batchnorm_relu,
           reference="Cicek et al. 2016, 3D U-Net: Learning Dense Volumetric Segmentation from Sparse Annotation",
           trainers=("nnUNetTrainerUNet3D",)),
)}
# nnU-Net trainer name -> the family it trains (the engine rebuilds a checkpoint by its trainer's name)
TRAINER_FAMILIES = {trainer: f.name for f in FAMILIES.values() for trainer in f.trainers}


def _short(name) -> str:
    return str(name).rsplit(".", 1)[-1]


def family_of(architecture: Optional[dict]) -> Optional[Family]:
    if not isinstance(architecture, dict):
        return None
    return FAMILIES.get(_short(architecture.get("network_class_name")))


def family_architecture(architecture: dict, family: str, patch_size=None, **options) -> dict:
    """A PlainConvUNet (or `family`) plans architecture as the `family` one, with `options` on top of what it
    states (the family's defaults for a PlainConvUNet; `patch_size` sizes SegResNetVAE's VAE branch)."""
    spec = FAMILIES[family]
    name = _short(architecture.get("network_class_name"))
    if name not in (_BASE, spec.name):
        raise ModelError(f"{spec.title} is built from nnU-Net's PlainConvUNet plans; these plans describe a {name} "
                         "(train it with the default nnUNetPlans).")
    _check_known(spec, options)
    kwargs = dict(architecture["arch_kwargs"])
    if name == _BASE:
        kwargs.update(spec.layers(kwargs) if spec.layers else {})
        kwargs.update(_defaults(spec, kwargs, patch_size))
    kwargs.update(options)
    check_options(spec, kwargs)
    return {"network_class_name": spec.class_path, "arch_kwargs": kwargs,
            "_kw_requires_import": list(architecture.get("_kw_requires_import",
                                                         ("conv_op", "norm_op", "dropout_op", "nonlin")))}


def _defaults(spec: Family, kwargs: dict, patch_size) -> dict:
    defaults = dict(spec.defaults)
    if spec.name == "SegResNetVAE":
        n = int(kwargs.get("n_stages", 0))
        defaults.update(blocks_down=default_blocks_down(n), blocks_up=[1] * max(0, n - 1),
                        vae_input_size=[int(p) for p in patch_size] if patch_size is not None else None)
    return defaults


def check_options(spec: Family, kwargs: dict) -> None:
    """ModelError naming an option the family does not know, or a value it cannot take."""
    _check_known(spec, kwargs)
    for key, value in kwargs.items():
        problem = _CHECKS.get(key, lambda v, k: None)(value, kwargs)
        if problem:
            raise ModelError(f"{spec.title} option {key!r} {problem}; got {value!r}.")


def _check_known(spec: Family, kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - set(PLAIN_KEYS) - set(spec.defaults))
    if unknown:
        raise ModelError(f"Unknown {spec.title} option {', '.join(repr(k) for k in unknown)} in the network's plans; "
                         f"this SegmentMBTFE knows {', '.join(sorted(spec.defaults))}.")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prune_problem(value, kwargs):
    if value is None:
        return None
    depth = kwargs.get("n_stages")
    if not _whole(value) or not _whole(depth) or not 1 <= value <= depth - 1:
        return f"must be a whole number from 1 to {depth - 1 if _whole(depth) else 'n_stages - 1'}, or null"
    return None


def _blocks_problem(value, kwargs):
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(_whole(v) and v >= 0 for v in value):
        return "must be a list of block counts (whole numbers)"
    return None


def _bool_problem(value, kwargs):
    return None if isinstance(value, bool) else "must be true or false"


def _size_problem(value, kwargs):
    if value is None:
        return "must be the patch size the VAE branch trains on" if kwargs.get("vae") else None
    if not isinstance(value, (list, tuple)) or not all(_whole(v) and v > 0 for v in value):
        return "must be a list of positive whole numbers (the patch size)"
    return None


def _latent_problem(value, kwargs):
    return None if _whole(value) and value > 0 else "must be a positive whole number"


def _weight_problem(value, kwargs):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")
    return None if ok else "must be a number of at least 0"


_CHECKS = {"prune_depth": _prune_problem, "blocks_down": _blocks_problem, "blocks_up": _blocks_problem,
           "vae": _bool_problem, "channel_doubling": _bool_problem, "vae_input_size": _size_problem,
           "vae_latent": _latent_problem, "vae_kl_weight": _weight_problem, "vae_l2_weight": _weight_problem}


# ----------------------------------------------------------------------------------------------------------
# The engine's side: which architecture a checkpoint holds weights for, and what inference builds of it.
# ----------------------------------------------------------------------------------------------------------

def checkpoint_family(trainer_name: str, architecture: dict, checkpoint: Optional[dict]) -> Optional[str]:
    """The family a checkpoint holds, from the plans, the plans inside it, or its trainer's name; None for others."""
    for source in (architecture, trained_architecture(checkpoint)):
        if family_of(source):
            return family_of(source).name
    return TRAINER_FAMILIES.get(trainer_name)


def inference_architecture(family: str, architecture: dict, checkpoint: Optional[dict] = None) -> dict:
    """The architecture the engine builds to segment with: the one the plans (or else the checkpoint's plans)
    state for `family`, the family's defaults on plain plans, and no VAE branch (it only regularises training)."""
    source = architecture if family_of(architecture) else trained_architecture(checkpoint)
    if family_of(source) is None or family_of(source).name != family:
        source = architecture
    options = {"vae": False} if family == "SegResNetVAE" else {}
    return family_architecture(source, family, **options)  # refuses an option it does not know, naming it


def inference_weights(network: nn.Module, weights: dict) -> dict:
    """`weights` without those of a VAE branch the network was built without (a SegResNetVAE checkpoint
    segments the same with or without them)."""
    if isinstance(network, SegResNetVAE) and not hasattr(network, "vae"):
        return {k: v for k, v in weights.items() if not k.startswith("vae.")}
    return weights
