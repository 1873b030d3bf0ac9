"""MBTFE-UNet: nnU-Net's PlainConvUNet with an MBTFE block after every encoder stage and EAB skip fusion.

The network (see ../shared/MBTFE.md):
- `MBTFE`: four parallel branches (1, 1, 2 and 3 stacked convs: receptive fields 1, 3, 5, 7), each conv
  followed by norm and per-channel PReLU; a softmax over 4 logits computed from the pooled branch sum weights
  the branches. Applied to every stage's output; the result feeds the next stage and the skip.
- EAB: a shared, channel-agnostic spatial attention (`mattn`) on the first three stages' outputs, strided
  convs (`mdcat1`, `mdcat2`) that fuse them at stage-3 resolution, up-projections back to each of the three
  levels (`mupcat1..3`) and gates (`gate1..3`) that merge the result into the skips the decoder receives.
- Encoder stages and the whole decoder are nnU-Net's, with nnU-Net's key names (`encoder.stages...`,
  `decoder...`, and `decoder.encoder...` repeating the encoder as dynamic-network-architectures does).

Choices MBTFE.md leaves open, and why:
- `mbtfe_norm`: "instance" (default; InstanceNorm eps 1e-5 affine, as nnU-Net, because nnU-Net trains with
  batches of 2 where batch statistics are noise) or "batch" (BatchNorm, default eps/momentum, as the original
  code, so its checkpoints load with their running statistics). The norms keep the original names `bn*`.
- Branch kernels follow the stage's own kernel: 3 in every axis where the plan convolves (so 3x3x3 on the
  usual isotropic plans, exactly the original), 1 where nnU-Net chose 1 for anisotropic data ([1,3,3]):
  the plan decided that neighbouring slices are too far apart to mix at that level.
- Convs in MBTFE have a bias (torch's default, which the original code most likely used; harmless before a norm).
- `mattn`: mean and max over channels -> conv (7 per axis, 1 on axes no stage 1-3 kernel convolves) -> sigmoid.
- `mdcat1`/`mdcat2`: convs with stage 2's/3's kernel and stride and nnU-Net's padding, so their output sizes
  equal the encoder's at every input size the encoder accepts. No norm: they are learned resampling, like
  the decoder's transposed convs.
- `mupcat1`/`mupcat2`: transposed convs with kernel = stride = the cumulative stride from stage 3 back to
  stage 1/2. `mupcat3`: stage 3's resolution is already right, so a 1x1 conv to stage 3's width.
- Gates (`eab_gate`): a 1x1 conv over [skip, fused] -> sigmoid g, per channel and voxel. "attention" (default,
  the form MBTFE.md sketches): skip + g * skip. "blend": g * skip + (1 - g) * fused (classic gated fusion).
- EAB needs three stages; a plan with fewer raises unless `eab=False`. With exactly three stages the third
  fused feature is also the decoder's bottom input (there is no deeper stage).

The options are plain values in `arch_kwargs` (`mbtfe_norm`, `eab`, `eab_gate`), so an nnU-Net plans
architecture names the network completely; `mbtfe_architecture` turns a PlainConvUNet architecture into one,
and `checkpoint_architecture` is how the engine finds the options of a checkpoint it loads.
"""
from typing import Optional

import torch
from torch import nn

from ..errors import ModelError
from .blocks import conv_dim
from .unet import PlainConvEncoder, UNetDecoder

CLASS_PATH = "SegmentMBTFELib.networks.mbtfe.MBTFEUNet"
DEFAULT_OPTIONS = {"mbtfe_norm": "instance", "eab": True, "eab_gate": "attention"}
NORMS = ("instance", "batch")
GATES = ("attention", "blend")

# The nnU-Net trainers (nnunet_trainer/trainer.py) and the options each trains with, on top of DEFAULT_OPTIONS.
# The engine rebuilds a checkpoint of any of them by name from this same table.
TRAINER_OPTIONS = {
    "nnUNetTrainerMBTFE": {},
    "nnUNetTrainerMBTFE_BN": {"mbtfe_norm": "batch"},
    "nnUNetTrainerMBTFE_noEAB": {"eab": False},
    "nnUNetTrainerMBTFE_blendGate": {"eab_gate": "blend"},
}
_BASES = ("PlainConvUNet", "MBTFEUNet")


def _ops(dim: int):
    """(conv, transposed conv, instance norm, batch norm) for 2D or 3D."""
    if dim == 2:
        return nn.Conv2d, nn.ConvTranspose2d, nn.InstanceNorm2d, nn.BatchNorm2d
    return nn.Conv3d, nn.ConvTranspose3d, nn.InstanceNorm3d, nn.BatchNorm3d


def _norm(dim: int, kind: str, channels: int) -> nn.Module:
    _, _, instance, batch = _ops(dim)
    if kind == "instance":
        return instance(channels, eps=1e-5, affine=True)
    if kind == "batch":
        return batch(channels)
    raise ValueError(f"mbtfe_norm must be one of {NORMS}, not {kind!r}")


class MBTFE(nn.Module):
    """Multi-branch feature extraction with branch selection; C channels in and out."""

    # branch -> names of its conv/norm/PReLU units, in order (the original code's attribute suffixes)
    BRANCHES = (("1",), ("3",), ("5_1", "5_2"), ("7_1", "7_2", "7_3"))

    def __init__(self, dim: int, channels: int, kernel_size, norm: str = "instance"):
        super().__init__()
        self.dim = dim
        conv = _ops(dim)[0]
        big = [3 if k > 1 else 1 for k in kernel_size]
        for branch in self.BRANCHES:
            for suffix in branch:
                kernel = [1] * dim if suffix == "1" else big
                setattr(self, f"conv{suffix}", conv(channels, channels, kernel, padding=[k // 2 for k in kernel]))
                setattr(self, f"bn{suffix}", _norm(dim, norm, channels))
                setattr(self, f"prelu{suffix}", nn.PReLU(channels))
        self.fc1 = nn.Linear(channels, max(1, channels // 2))  # max: a 1-channel stage still gets a unit
        self.fc2 = nn.Linear(max(1, channels // 2), len(self.BRANCHES))

    def _branch(self, suffixes, x):
        for s in suffixes:
            x = getattr(self, f"prelu{s}")(getattr(self, f"bn{s}")(getattr(self, f"conv{s}")(x)))
        return x

    def forward(self, x):
        branches = [self._branch(b, x) for b in self.BRANCHES]
        pooled = sum(branches).mean(dim=tuple(range(2, 2 + self.dim)))      # (N, C)
        weights = torch.softmax(self.fc2(self.fc1(pooled)), dim=1)           # (N, 4), per sample
        weights = weights.view(*weights.shape, *([1] * self.dim))
        return sum(weights[:, k:k + 1] * b for k, b in enumerate(branches))


class SpatialAttention(nn.Module):
    """Channel-agnostic (so one module serves all three levels): x * sigmoid(conv([mean_c x, max_c x]))."""

    def __init__(self, dim: int, kernel_size):
        super().__init__()
        self.conv = _ops(dim)[0](2, 1, kernel_size, padding=[k // 2 for k in kernel_size], bias=False)

    def forward(self, x):
        summary = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(summary))


class GatedFusion(nn.Module):
    """Merges the fused feature into a skip with a per-channel, per-voxel gate (see the module docstring)."""

    def __init__(self, dim: int, channels: int, form: str = "attention"):
        super().__init__()
        if form not in GATES:
            raise ValueError(f"eab_gate must be one of {GATES}, not {form!r}")
        self.form = form
        self.conv = _ops(dim)[0](2 * channels, channels, 1)

    def forward(self, skip, fused):
        gate = torch.sigmoid(self.conv(torch.cat([skip, fused], dim=1)))
        if self.form == "attention":
            return skip + gate * skip
        return gate * skip + (1 - gate) * fused


def _product(a, b):
    return [x * y for x, y in zip(a, b)]


class MBTFEEncoder(PlainConvEncoder):
    """PlainConvEncoder whose every stage output goes through an MBTFE block, and whose first three skips
    are fused by EAB. Key names: `stages` (nnU-Net's), `mbtfe_modules`, and EAB's parts directly on the
    encoder (`mattn`, `mdcat1`, ..., `gate3`), as MBTFE.md names them."""

    def __init__(self, input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                 n_conv_per_stage, conv_bias=False, norm_op=None, norm_op_kwargs=None, dropout_op=None,
                 dropout_op_kwargs=None, nonlin=None, nonlin_kwargs=None, nonlin_first=False,
                 mbtfe_norm="instance", eab=True, eab_gate="attention"):
        super().__init__(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                         n_conv_per_stage, conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs,
                         nonlin, nonlin_kwargs, nonlin_first)
        dim = conv_dim(conv_op)
        self.mbtfe_modules = nn.ModuleList(
            MBTFE(dim, c, k, mbtfe_norm) for c, k in zip(self.output_channels, self.kernel_sizes))
        self.eab = bool(eab)
        if self.eab:
            if n_stages < 3:
                raise ValueError(f"EAB fuses the first three encoder stages; this plan has {n_stages} "
                                 "(use eab=False)")
            self._add_eab(dim, eab_gate)

    def _add_eab(self, dim: int, gate: str):
        conv, transposed = _ops(dim)[:2]
        (c1, c2, c3), (k2, k3), (s2, s3) = self.output_channels[:3], self.kernel_sizes[1:3], self.strides[1:3]
        convolved = [max(k[d] for k in self.kernel_sizes[:3]) > 1 for d in range(dim)]
        self.mattn = SpatialAttention(dim, [7 if c else 1 for c in convolved])
        self.mdcat1 = conv(c1, c1, k2, s2, padding=[k // 2 for k in k2], bias=self.conv_bias)
        self.mdcat2 = conv(c1 + c2, c1 + c2, k3, s3, padding=[k // 2 for k in k3], bias=self.conv_bias)
        fused = c1 + c2 + c3
        up1 = _product(s2, s3)
        self.mupcat1 = transposed(fused, c1, up1, up1, bias=self.conv_bias)
        self.mupcat2 = transposed(fused, c2, s3, s3, bias=self.conv_bias)
        self.mupcat3 = conv(fused, c3, 1, bias=self.conv_bias)
        for i, c in enumerate((c1, c2, c3), start=1):
            setattr(self, f"gate{i}", GatedFusion(dim, c, gate))

    def _fuse(self, f1, f2, f3):
        """EAB: the three skips after attention fusion."""
        m1, m2, m3 = self.mattn(f1), self.mattn(f2), self.mattn(f3)
        fused = torch.cat([self.mdcat2(torch.cat([self.mdcat1(m1), m2], dim=1)), m3], dim=1)
        return [self.gate1(f1, self.mupcat1(fused)), self.gate2(f2, self.mupcat2(fused)),
                self.gate3(f3, self.mupcat3(fused))]

    def forward(self, x):
        skips = []
        for stage, mbtfe in zip(self.stages, self.mbtfe_modules):
            x = mbtfe(stage(x))
            skips.append(x)
        if self.eab:
            skips[:3] = self._fuse(*skips[:3])
        return skips


class MBTFEUNet(nn.Module):
    """PlainConvUNet's arguments plus `mbtfe_norm`, `eab`, `eab_gate` (see the module docstring)."""

    def __init__(self, input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                 n_conv_per_stage, num_classes, n_conv_per_stage_decoder, conv_bias=False, norm_op=None,
                 norm_op_kwargs=None, dropout_op=None, dropout_op_kwargs=None, nonlin=None, nonlin_kwargs=None,
                 deep_supervision=False, nonlin_first=False, mbtfe_norm="instance", eab=True,
                 eab_gate="attention"):
        super().__init__()
        self.encoder = MBTFEEncoder(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                                    n_conv_per_stage, conv_bias, norm_op, norm_op_kwargs, dropout_op,
                                    dropout_op_kwargs, nonlin, nonlin_kwargs, nonlin_first, mbtfe_norm, eab,
                                    eab_gate)
        self.decoder = UNetDecoder(self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision,
                                   nonlin_first)

    def forward(self, x):
        return self.decoder(self.encoder(x))

    @staticmethod
    def initialize(module):
        """nnU-Net's InitWeights_He(1e-2) for every conv, as its trainer initializes PlainConvUNet
        (`network.apply(network.initialize)`); Linear and PReLU keep torch's defaults."""
        if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(module.weight, a=1e-2)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)


# ----------------------------------------------------------------------------------------------------------
# Architectures (plans data): what the trainer writes into plans.json and what the engine rebuilds.
# ----------------------------------------------------------------------------------------------------------

def _short(name) -> str:
    return str(name).rsplit(".", 1)[-1]


def is_mbtfe(architecture: Optional[dict]) -> bool:
    return bool(architecture) and _short(architecture.get("network_class_name")) == "MBTFEUNet"


def mbtfe_options(architecture: dict) -> dict:
    """The MBTFE options an MBTFEUNet architecture states (defaults for those it leaves out)."""
    kwargs = architecture["arch_kwargs"]
    return {key: kwargs.get(key, default) for key, default in DEFAULT_OPTIONS.items()}


def mbtfe_architecture(architecture: dict, **options) -> dict:
    """A PlainConvUNet (or MBTFEUNet) plans architecture as an MBTFEUNet one with `options` applied on top
    of what it states (DEFAULT_OPTIONS for a PlainConvUNet). Raises ModelError for what cannot be built."""
    name = _short(architecture.get("network_class_name"))
    if name not in _BASES:
        raise ModelError(f"MBTFE-UNet extends nnU-Net's PlainConvUNet; these plans describe a {name} "
                         "(train MBTFE-UNet with the default nnUNetPlans).")
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise ModelError(f"Unknown MBTFE option(s): {', '.join(sorted(unknown))}.")
    kwargs = {**architecture["arch_kwargs"], **(mbtfe_options(architecture) if name == "MBTFEUNet" else
                                                DEFAULT_OPTIONS), **options}
    _check_options(kwargs)
    return {"network_class_name": CLASS_PATH, "arch_kwargs": kwargs,
            "_kw_requires_import": list(architecture.get("_kw_requires_import",
                                                         ("conv_op", "norm_op", "dropout_op", "nonlin")))}


def _check_options(kwargs: dict) -> None:
    if kwargs["mbtfe_norm"] not in NORMS:
        raise ModelError(f"mbtfe_norm must be one of {', '.join(NORMS)}; got {kwargs['mbtfe_norm']!r}.")
    if kwargs["eab_gate"] not in GATES:
        raise ModelError(f"eab_gate must be one of {', '.join(GATES)}; got {kwargs['eab_gate']!r}.")
    if not isinstance(kwargs["eab"], bool):
        raise ModelError(f"eab must be true or false; got {kwargs['eab']!r}.")
    n_stages = kwargs["n_stages"]
    if kwargs["eab"] and n_stages < 3:
        raise ModelError(f"EAB fuses the first three encoder stages but this plan has {n_stages}; "
                         "train with nnUNetTrainerMBTFE_noEAB (eab=False).")


def is_mbtfe_checkpoint(checkpoint: Optional[dict]) -> bool:
    """Whether a checkpoint holds MBTFE-UNet weights, whatever trainer name it carries (a user's subclass
    of nnUNetTrainerMBTFE, or the original code's trainer)."""
    if not checkpoint:
        return False
    weights = checkpoint.get("network_weights") or {}
    return is_mbtfe(_trained_architecture(checkpoint)) or any(".mbtfe_modules." in k for k in weights)


def checkpoint_architecture(architecture: dict, checkpoint: Optional[dict] = None,
                            defaults: Optional[dict] = None) -> dict:
    """The MBTFEUNet architecture of a checkpoint, built on the model folder's plans `architecture`.

    Options, later sources winning: DEFAULT_OPTIONS, `defaults` (the trainer's, by its name), the plans'
    (if they name MBTFEUNet), the plans the checkpoint was trained with (its `init_args`), and finally what
    the weights themselves show (BatchNorm running statistics, EAB keys present), since they are what loads.
    """
    options = {**DEFAULT_OPTIONS, **(defaults or {})}
    for source in (architecture, _trained_architecture(checkpoint)):
        if is_mbtfe(source):
            options.update(mbtfe_options(source))
    options.update(_options_from_weights((checkpoint or {}).get("network_weights")))
    return mbtfe_architecture(architecture, **options)


def _trained_architecture(checkpoint: Optional[dict]) -> Optional[dict]:
    """The architecture in the plans nnU-Net's trainer saved in the checkpoint (`init_args`), if readable."""
    try:
        init_args = checkpoint["init_args"]
        configurations = init_args["plans"]["configurations"]
        configuration = configurations[init_args["configuration"]]
        for _ in configurations:  # inherited, e.g. 3d_cascade_fullres from 3d_fullres; bounded against cycles
            if "architecture" in configuration:
                return configuration["architecture"]
            configuration = configurations[configuration["inherits_from"]]
    except (KeyError, TypeError):
        pass
    return None


def _options_from_weights(weights: Optional[dict]) -> dict:
    keys = list(weights or ())
    mbtfe_keys = [k for k in keys if k.startswith("encoder.mbtfe_modules.")]
    if not mbtfe_keys:
        return {}
    return {"mbtfe_norm": "batch" if any(k.endswith(".running_mean") for k in mbtfe_keys) else "instance",
            "eab": any(k.startswith("encoder.mattn.") for k in keys)}
