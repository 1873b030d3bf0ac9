"""`segment-mbtfe models list` as text: one row per model, in columns a terminal lines up.

Long label lists are cut to fit a row (`models info NAME` shows them all); a model that cannot be used says why
in place of its details, so a broken download or a moved folder shows up here rather than at `predict`.
"""
from typing import List

from ..free_memory import size_text
from ..nnunet_trainers import primus_of, primus_title
from .folder import NAMED_NETWORKS
from .home import InstalledModel

# The options each network family keeps in its plans (networks/families.py, networks/mbtfe.py), shown by `models info`.
FAMILY_OPTIONS = {
    "MBTFEUNet": ("mbtfe_norm", "eab", "eab_gate"),
    "UNetPlusPlus": ("prune_depth",),
    "SegResNetVAE": ("blocks_down", "blocks_up", "vae", "vae_input_size", "vae_latent", "vae_kl_weight",
                     "vae_l2_weight"),
    "UNet3D": ("channel_doubling",),
}
# Trainers whose network differs from plain plans (a folder whose plans.json is the planner's, not the trainer's)
TRAINER_NETWORKS = {"nnUNetTrainerUNetPlusPlus": "UNetPlusPlus", "nnUNetTrainerSegResNetVAE": "SegResNetVAE",
                    "nnUNetTrainerUNet3D": "UNet3D"}

HEADER = ("NAME", "FROM", "NETWORK", "CHANNELS", "LABELS", "CONFIGURATIONS (FOLDS)", "SIZE", "FOLDER")
_LABELS_WIDTH = 40


def models_table(models: List[InstalledModel]) -> str:
    rows = [HEADER] + [_row(m) for m in models]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def configurations_text(model: InstalledModel) -> str:
    """'3d_fullres (0, 1, 2, 3, 4), 2d (0)'."""
    return ", ".join(f"{c.name} ({', '.join(c.folds) or 'no folds'})" for c in model.configurations)


def _row(model: InstalledModel) -> tuple:
    if model.problem:  # why goes last, so that it does not widen the columns of the other rows
        return (model.name, model.source, "unusable", "", "", "", size_text(model.size_bytes),
                f"{model.path}  ({model.problem})")
    networks = ", ".join(dict.fromkeys(c.network for c in model.configurations))
    return (model.name, model.source, networks, ", ".join(model.channels), _labels(model.labels),
            configurations_text(model), size_text(model.size_bytes), str(model.path))


def _labels(labels: List[str]) -> str:
    text = ", ".join(labels)
    if len(text) <= _LABELS_WIDTH:
        return text
    return text[:_LABELS_WIDTH - 12].rsplit(", ", 1)[0] + f", ... ({len(labels)})"


def network_text(architecture: dict, trainer_name: str = "") -> str:
    """The network family and the options its plans state, for `models info`: 'UNet++ (UNetPlusPlus; prune_depth:
    None)', 'SegResNetVAE (SegResNetVAE; GroupNorm 8 groups; blocks_down: [1, 2, 2, 4]; ...)', 'PlainConvUNet'."""
    name = str(architecture.get("network_class_name", "")).rsplit(".", 1)[-1]
    if primus_of(trainer_name):
        version, size = primus_of(trainer_name)
        return (f"{primus_title(trainer_name)} (Primus {version} size {size}, by the trainer's name: a transformer; "
                "the plans' U-Net settings are unused)")
    if name == "ResidualEncoderUNet":
        return "ResEnc U-Net (ResidualEncoderUNet)"
    if name not in FAMILY_OPTIONS and trainer_name in TRAINER_NETWORKS:
        family = TRAINER_NETWORKS[trainer_name]
        return f"{NAMED_NETWORKS[family]} ({family}, by the trainer's name; options: the trainer's defaults)"
    if name not in NAMED_NETWORKS:
        return name
    kwargs = architecture.get("arch_kwargs") or {}
    parts = [name]
    if str(kwargs.get("norm_op", "")).endswith("GroupNorm"):
        parts.append(f"GroupNorm {(kwargs.get('norm_op_kwargs') or {}).get('num_groups')} groups")
    parts += [f"{key}: {kwargs[key]}" for key in FAMILY_OPTIONS.get(name, ()) if key in kwargs]
    return f"{NAMED_NETWORKS[name]} ({'; '.join(parts)})"
