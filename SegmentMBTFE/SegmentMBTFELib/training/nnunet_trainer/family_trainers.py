"""nnU-Net v2 trainers for UNet++, SegResNetVAE and the 2016 3D U-Net, with nnU-Net's default training otherwise.

As nnUNetTrainerMBTFE does (both are trainer.py's EngineNetworkTrainer): the trainer rewrites its configuration's `architecture` in the plans into
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
import torch

from ...networks.families import FAMILIES, family_architecture, family_of
from .trainer import EngineNetworkTrainer


def _unwrapped(network):
    """The network inside DDP and torch.compile wrappers."""
    network = getattr(network, "module", network)
    return getattr(network, "_orig_mod", network)


class _FamilyTrainer(EngineNetworkTrainer):
    family = ""

    @classmethod
    def names_its_network(cls, architecture: dict) -> bool:
        return family_of(architecture) is not None

    @classmethod
    def architecture_of(cls, architecture: dict, patch_size) -> dict:
        if cls.names_its_network(architecture):
            return architecture
        return family_architecture(architecture, cls.family, patch_size=patch_size)

    @classmethod
    def initialise(cls, network) -> None:
        if cls.family != "SegResNetVAE":  # MONAI's SegResNetVAE keeps torch's initialisation; so do we
            super().initialise(network)


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
