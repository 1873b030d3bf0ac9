"""What fine-tuning needs to know of a network family: its deep-supervision switch, its encoder, its optimizer.

The U-Nets (nnU-Net's, MBTFE-UNet, UNet++, SegResNetVAE, the 3D U-Net) have `encoder` and `decoder` with a
`deep_supervision` flag and fine-tune as nnU-Net trains them: SGD with Nesterov momentum, gradients clipped at 12.
Primus has one output, its "encoder" is the patch embedding and the transformer, and it fine-tunes as nnU-Net's
Primus trainers train it (AdamW, betas 0.9/0.98, weight decay 5e-2, gradients clipped at 1) from a learning rate ten
times below the U-Nets' setting (nnU-Net trains Primus from 3e-4 where it trains the U-Nets from 1e-2).
"""
from typing import List, Tuple

import torch
from torch import nn

from ..networks.primus import Primus

PRIMUS_RATE = 0.1  # Primus' learning rate as a share of the U-Nets' (nnU-Net: 3e-4 against 1e-2, a bit less)


def set_deep_supervision(network: nn.Module, on: bool) -> None:
    """Every decoder stage's output (training) or the last one only; Primus has only one."""
    decoder = getattr(network, "decoder", None)
    if decoder is not None:
        decoder.deep_supervision = on


def encoder_of(network: nn.Module) -> nn.Module:
    """The part `freeze_encoder` keeps as it is."""
    if isinstance(network, Primus):
        return nn.ModuleList([network.down_projection, network.eva])
    return network.encoder


def optimizer_for(network: nn.Module, parameters: List[nn.Parameter], learning_rate: float
                  ) -> Tuple[torch.optim.Optimizer, float]:
    """(optimizer, gradient-norm clip) as the family's nnU-Net trainer uses them."""
    if isinstance(network, Primus):
        return torch.optim.AdamW(parameters, learning_rate * PRIMUS_RATE, weight_decay=5e-2, betas=(0.9, 0.98)), 1.0
    return torch.optim.SGD(parameters, learning_rate, momentum=0.99, nesterov=True, weight_decay=3e-5), 12.0
