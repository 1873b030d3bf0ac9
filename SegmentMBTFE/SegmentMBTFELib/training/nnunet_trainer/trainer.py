"""nnU-Net v2 trainers that train MBTFE-UNet with everything else of nnU-Net's default training.

Only the network differs from nnUNetTrainer (Dice + CE, SGD with Nesterov 0.99, poly learning rate, deep
supervision during training). Two things make a trained folder rebuild exactly:

- The trainer rewrites its configuration's `architecture` in the plans it is given into the MBTFEUNet one,
  options included, before nnUNetTrainer sees them. nnU-Net then saves those plans as the model folder's
  plans.json and inside every checkpoint (`init_args['plans']`), so both name the network completely; plans
  that already name MBTFEUNet (written by hand, with other options) are kept as they are.
- `build_network_architecture` builds through the engine's own `networks.build_network` (the same allow-list
  of layers the engine loads with), so a plan the engine could not load fails at the start of training.

This module imports nnunetv2; only nnU-Net imports it (through the registered shim).
"""
import copy

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from ...models.folder import resolve_configuration
from ...networks import build_network
from ...networks.mbtfe import TRAINER_OPTIONS, MBTFEUNet, is_mbtfe, mbtfe_architecture


def _call_arguments(first, second, third, fourth, rest, deep_supervision):
    """(architecture, input channels, output channels, deep supervision) from either way nnU-Net calls
    build_network_architecture: (plans_manager, configuration_manager, n_in, n_out[, deep_supervision]) in
    current releases, (class name, arch kwargs, kwargs requiring import, n_in, n_out[, deep_supervision])
    in older ones; deep supervision comes positionally from the trainer and by keyword from the predictor."""
    if isinstance(first, str):
        architecture = {"network_class_name": first, "arch_kwargs": second, "_kw_requires_import": third}
        n_in, n_out, rest = fourth, rest[0], rest[1:]
    else:
        architecture = {"network_class_name": second.network_arch_class_name,
                        "arch_kwargs": second.network_arch_init_kwargs,
                        "_kw_requires_import": second.network_arch_init_kwargs_req_import}
        n_in, n_out = third, fourth
    return architecture, n_in, n_out, bool(rest[0] if rest else deep_supervision)


class EngineNetworkTrainer(nnUNetTrainer):
    """nnUNetTrainer training one of the engine's networks, the base of this package's trainers (MBTFE-UNet here,
    UNet++, SegResNetVAE and the 3D U-Net in family_trainers.py). A subclass says which architecture it trains
    (`names_its_network`, `architecture_of`) and how its network starts (`initialise`); the rest is here."""

    # nnUNetTrainer records its __init__ arguments by these exact names (for checkpoints): keep them.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(self.plans_naming_the_network(plans, configuration), configuration, fold, dataset_json,
                         device)

    @classmethod
    def names_its_network(cls, architecture: dict) -> bool:
        """Whether a plans architecture already names this trainer's network (then the plans are kept)."""
        raise NotImplementedError

    @classmethod
    def architecture_of(cls, architecture: dict, patch_size) -> dict:
        """The architecture this trainer builds from a configuration's (nnU-Net's PlainConvUNet or its own)."""
        raise NotImplementedError

    @classmethod
    def initialise(cls, network) -> None:
        network.apply(MBTFEUNet.initialize)  # nnU-Net's InitWeights_He(1e-2), as for PlainConvUNet

    @classmethod
    def plans_naming_the_network(cls, plans: dict, configuration: str) -> dict:
        """A copy of `plans` whose `configuration` states the architecture this trainer trains; plans that already
        name it (e.g. edited by hand with other options) are kept."""
        plans = copy.deepcopy(plans)
        resolved = resolve_configuration(plans, configuration)
        if not cls.names_its_network(resolved.architecture):
            plans["configurations"][configuration]["architecture"] = cls.architecture_of(resolved.architecture,
                                                                                         resolved.patch_size)
        return plans

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, *older_arguments, enable_deep_supervision=True):
        # The first parameter must be called plans_manager: that is how nnU-Net picks the calling convention.
        architecture, n_in, n_out, deep_supervision = _call_arguments(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, older_arguments,
            enable_deep_supervision)
        patch = getattr(configuration_manager, "patch_size", None)
        network = build_network(cls.architecture_of(architecture, patch), n_in, n_out, deep_supervision)
        cls.initialise(network)
        return network


class nnUNetTrainerMBTFE(EngineNetworkTrainer):
    """nnU-Net's default training of MBTFE-UNet (instance norm in MBTFE, EAB with the attention gate)."""

    mbtfe_options = TRAINER_OPTIONS["nnUNetTrainerMBTFE"]

    @classmethod
    def names_its_network(cls, architecture: dict) -> bool:
        return is_mbtfe(architecture)

    @classmethod
    def architecture_of(cls, architecture: dict, patch_size) -> dict:
        options = {} if is_mbtfe(architecture) else cls.mbtfe_options  # plans naming MBTFE-UNet keep theirs
        return mbtfe_architecture(architecture, **options)


class nnUNetTrainerMBTFE_BN(nnUNetTrainerMBTFE):
    """BatchNorm in the MBTFE blocks, as the original code."""
    mbtfe_options = TRAINER_OPTIONS["nnUNetTrainerMBTFE_BN"]


class nnUNetTrainerMBTFE_noEAB(nnUNetTrainerMBTFE):
    """MBTFE blocks only, plain skips (an ablation; also the choice for plans with fewer than 3 stages)."""
    mbtfe_options = TRAINER_OPTIONS["nnUNetTrainerMBTFE_noEAB"]


class nnUNetTrainerMBTFE_blendGate(nnUNetTrainerMBTFE):
    """EAB gates that blend skip and fused feature: g * skip + (1 - g) * fused."""
    mbtfe_options = TRAINER_OPTIONS["nnUNetTrainerMBTFE_blendGate"]
