"""nnU-Net v2 trainers for UNet++, SegResNetVAE and the 2016 3D U-Net, with nnU-Net's default training otherwise.

As nnUNetTrainerMBTFE does (trainer.py): the trainer rewrites its configuration's `architecture` in the plans into
the family's (options included, networks/families.py), so plans.json and every checkpoint's `init_args` name the
network completely, and `build_network_architecture` builds through the engine's own `networks.build_network`.
What differs from nnUNetTrainer, per family:
- nnUNetTrainerUNetPlusPlus: UNet++'s deep-supervision heads are all at full resolution, so the targets are not
  down-sampled and the heads' losses are averaged with equal weights (the paper's deep supervision).
- nnUNetTrainerSegResNetVAE: the loss adds the VAE branch's terms, 0.1 L_KL + 0.1 L_L2 (the paper's weights),
  to nnU-Net's Dice + CE; validation (eval mode) runs without the branch.
- nnUNetTrainerUNet3D: nothing beyond the network (BatchNorm and ReLU are in its plans).

This module imports nnunetv2; only nnU-Net imports it (through the registered shim).
"""
import copy

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from ...models.folder import resolve_configuration
from ...networks import build_network
from ...networks.families import FAMILIES, family_architecture, family_of
from ...networks.mbtfe import MBTFEUNet
from .trainer import _call_arguments


def plans_with_family(plans: dict, configuration: str, family: str) -> dict:
    """A copy of `plans` whose `configuration` states the `family` architecture it trains (plans that already name
    it, e.g. edited by hand with other options, are kept)."""
    plans = copy.deepcopy(plans)
    resolved = resolve_configuration(plans, configuration)
    if family_of(resolved.architecture) is None:
        plans["configurations"][configuration]["architecture"] = family_architecture(
            resolved.architecture, family, patch_size=resolved.patch_size)
    return plans


def _unwrapped(network):
    """The network inside DDP and torch.compile wrappers."""
    network = getattr(network, "module", network)
    return getattr(network, "_orig_mod", network)


class _FamilyTrainer(nnUNetTrainer):
    family = ""

    # nnUNetTrainer records its __init__ arguments by these exact names (for checkpoints): keep them.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans_with_family(plans, configuration, self.family), configuration, fold, dataset_json,
                         device)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, *older_arguments, enable_deep_supervision=True):
        # The first parameter must be called plans_manager: that is how nnU-Net picks the calling convention.
        architecture, n_in, n_out, deep_supervision = _call_arguments(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, older_arguments,
            enable_deep_supervision)
        if family_of(architecture) is None:
            patch = getattr(configuration_manager, "patch_size", None)
            architecture = family_architecture(architecture, cls.family, patch_size=patch)
        network = build_network(architecture, n_in, n_out, deep_supervision)
        if cls.family != "SegResNetVAE":  # MONAI's SegResNetVAE keeps torch's initialisation; so do we
            network.apply(MBTFEUNet.initialize)  # nnU-Net's InitWeights_He(1e-2), as for PlainConvUNet
        return network


class nnUNetTrainerUNetPlusPlus(_FamilyTrainer):
    """UNet++ (nested dense skips, deep supervision on X(0,1)..X(0,n-1) with equal weights)."""
    family = "UNetPlusPlus"

    def _get_deep_supervision_scales(self):
        if not self.enable_deep_supervision:
            return None
        strides = self.configuration_manager.pool_op_kernel_sizes
        return [[1.0] * len(strides[0]) for _ in range(len(strides) - 1)]  # every head is full resolution

    def _build_loss(self):
        loss = super()._build_loss()
        if self.enable_deep_supervision:
            heads = len(self.configuration_manager.pool_op_kernel_sizes) - 1
            loss.weight_factors = (1.0 / heads,) * heads
        return loss


class VAERegularisedLoss(torch.nn.Module):
    """nnU-Net's loss plus the VAE terms of the network's last forward pass (none in eval mode)."""

    def __init__(self, loss, trainer):
        super().__init__()
        self.loss = loss
        self._trainer = [trainer]  # a list: not a submodule, and no reference cycle through nn.Module

    def forward(self, output, target):
        return self.loss(output, target) + _unwrapped(self._trainer[0].network).vae_loss()


class nnUNetTrainerSegResNetVAE(_FamilyTrainer):
    """SegResNetVAE: GroupNorm residual encoder, additive skips, VAE regularisation (0.1 KL + 0.1 L2) in training."""
    family = "SegResNetVAE"

    def _build_loss(self):
        return VAERegularisedLoss(super()._build_loss(), self)


class nnUNetTrainerUNet3D(_FamilyTrainer):
    """The 2016 3D U-Net (conv-BN-ReLU, channel doubling, max pooling, transposed convolutions)."""
    family = "UNet3D"


TRAINERS = {cls.__name__: cls for cls in (nnUNetTrainerUNetPlusPlus, nnUNetTrainerSegResNetVAE, nnUNetTrainerUNet3D)}
assert all(FAMILIES[cls.family].trainers == (name,) for name, cls in TRAINERS.items())
