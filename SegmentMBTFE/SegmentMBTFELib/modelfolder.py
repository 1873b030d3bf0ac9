"""Read an nnU-Net v2 model folder: dataset.json, plans.json, configurations, folds and labels.

Accepts what people have on disk: a trained configuration folder (`Trainer__Plans__3d_fullres/` with
`fold_N/`), or the dataset folder above it holding several of those. Everything here is plain JSON
reading; weights are loaded by `model.py` through `checkpoint.py`.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .errors import ModelError

CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
_FOLD = re.compile(r"^fold_(\d+|all)$")
NAMED_NETWORKS = {"MBTFEUNet": "MBTFE-UNet"}  # networks named in a model's name


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelError(f"{path.name} is missing from the model folder {path.parent}")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ModelError(f"{path} is not valid JSON ({error}).") from None


class Labels:
    """What the network's output channels mean (nnU-Net's LabelManager, labels or regions)."""

    def __init__(self, dataset: dict):
        labels = dataset.get("labels")
        if not isinstance(labels, dict) or "background" not in labels:
            raise ModelError("dataset.json has no 'labels' with a 'background' entry.")
        self.ignore_label = labels.get("ignore")
        named = {k: v for k, v in labels.items() if k != "ignore"}
        self.has_regions = any(isinstance(v, (list, tuple)) and len(v) > 1 for v in named.values())
        values = sorted({int(x) for v in named.values() for x in (v if isinstance(v, (list, tuple)) else [v])})
        self.all_labels = values
        self.foreground_labels = [v for v in values if v != 0]
        if self.has_regions:
            self.regions_class_order = dataset.get("regions_class_order")
            self.regions = [(name, tuple(v) if isinstance(v, (list, tuple)) else (v,))
                            for name, v in named.items() if not _is_background(v)]
            if self.regions_class_order is None or len(self.regions_class_order) != len(self.regions):
                raise ModelError("dataset.json defines regions but no matching 'regions_class_order'.")
        else:
            self.regions_class_order, self.regions = None, None
        self._names = named

    @property
    def num_heads(self) -> int:
        return len(self.regions) if self.has_regions else len(self.all_labels)

    def output_segments(self) -> List[Tuple[int, str]]:
        """(value in the output label map, name) for every foreground value the model can write."""
        if self.has_regions:
            return [(int(value), name) for (name, _), value in zip(self.regions, self.regions_class_order)]
        by_value = {int(v): k for k, v in self._names.items() if not isinstance(v, (list, tuple))}
        return [(v, by_value.get(v, f"label {v}")) for v in self.foreground_labels]


def _is_background(value) -> bool:
    values = set(value) if isinstance(value, (list, tuple)) else {value}
    return values == {0}


@dataclass
class Configuration:
    """One configuration of plans.json (inheritance resolved, old plans converted)."""
    name: str
    settings: dict

    def __getitem__(self, key):
        return self.settings[key]

    def get(self, key, default=None):
        return self.settings.get(key, default)

    @property
    def patch_size(self) -> List[int]:
        return [int(p) for p in self.settings["patch_size"]]

    @property
    def spacing(self) -> List[float]:
        return [float(s) for s in self.settings["spacing"]]

    @property
    def is_2d(self) -> bool:
        return len(self.patch_size) == 2

    @property
    def architecture(self) -> dict:
        return self.settings["architecture"]

    @property
    def previous_stage(self) -> Optional[str]:
        return self.settings.get("previous_stage")


def resolve_configuration(plans: dict, name: str) -> Configuration:
    configurations = plans.get("configurations", {})
    if name not in configurations:
        raise ModelError(f"Configuration '{name}' is not in plans.json (has: {', '.join(configurations)}).")
    settings = _inherit(configurations, name, set())
    if "architecture" not in settings:
        settings["architecture"] = _architecture_from_old_plans(settings)
    return Configuration(name, settings)


def _inherit(configurations: dict, name: str, seen: set) -> dict:
    """nnU-Net's recursive `inherits_from`: the parent's settings updated by the child's."""
    if name in seen:
        raise ModelError(f"plans.json: configuration '{name}' inherits from itself.")
    own = dict(configurations[name])
    parent = own.pop("inherits_from", None)
    if parent is None:
        return own
    if parent not in configurations:
        raise ModelError(f"plans.json: '{name}' inherits from unknown configuration '{parent}'.")
    merged = _inherit(configurations, parent, seen | {name})
    merged.update(own)
    return merged


def _architecture_from_old_plans(settings: dict) -> dict:
    """Plans written before nnU-Net v2.3 describe the U-Net by keys; convert them as ConfigurationManager does."""
    try:
        name = settings["UNet_class_name"]
        n_stages = len(settings["n_conv_per_stage_encoder"])
        dim = len(settings["patch_size"])
        blocks_key = {"PlainConvUNet": "n_conv_per_stage", "ResidualEncoderUNet": "n_blocks_per_stage"}[name]
        kwargs = {
            "n_stages": n_stages,
            "features_per_stage": [min(settings["UNet_base_num_features"] * 2 ** i, settings["unet_max_num_features"])
                                   for i in range(n_stages)],
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": settings["conv_kernel_sizes"],
            "strides": settings["pool_op_kernel_sizes"],
            blocks_key: settings["n_conv_per_stage_encoder"],
            "n_conv_per_stage_decoder": settings["n_conv_per_stage_decoder"],
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
        }
    except KeyError as error:
        raise ModelError(f"plans.json describes no network: neither 'architecture' nor the older key {error}.") \
            from None
    return {"network_class_name": name, "arch_kwargs": kwargs,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


class ModelFolder:
    """A trained nnU-Net v2 configuration folder: `dataset.json`, `plans.json`, `fold_*/checkpoint_*.pth`."""

    def __init__(self, path, configuration: Optional[str] = None):
        self.path = find_trained_folder(Path(path), configuration)
        self.dataset = read_json(self.path / "dataset.json")
        self.plans = read_json(self.path / "plans.json")
        self.trainer_name, self.plans_name, folder_configuration = _split_folder_name(self.path.name)
        self.configuration_name = configuration or folder_configuration or self._single_configuration()
        self.configuration = resolve_configuration(self.plans, self.configuration_name)
        self.labels = Labels(self.dataset)

    @property
    def name(self) -> str:
        """'Dataset004_Hippocampus (3d_fullres)'; a network other than nnU-Net's own is named too, so two
        models of one dataset stay apart (in the panel and in the tags of the segments they make)."""
        network = str(self.configuration.architecture.get("network_class_name", "")).rsplit(".", 1)[-1]
        extra = f", {NAMED_NETWORKS[network]}" if network in NAMED_NETWORKS else ""
        return f"{self.plans.get('dataset_name', self.path.parent.name)} ({self.configuration_name}{extra})"

    @property
    def channel_names(self) -> List[str]:
        channels = self.dataset.get("channel_names") or self.dataset.get("modality")
        if not channels:
            raise ModelError("dataset.json has no 'channel_names'.")
        return [channels[k] for k in sorted(channels, key=int)]

    @property
    def transpose_forward(self) -> List[int]:
        return list(self.plans.get("transpose_forward", [0, 1, 2]))

    @property
    def transpose_backward(self) -> List[int]:
        return list(self.plans.get("transpose_backward", [0, 1, 2]))

    @property
    def intensity_properties(self) -> Dict[str, dict]:
        return (self.plans.get("foreground_intensity_properties_per_channel")
                or self.plans.get("foreground_intensity_properties_by_modality") or {})

    def available_folds(self, checkpoint: str = "final") -> List[str]:
        """Folds holding the checkpoint; `fold_all` only when no numbered fold exists (nnU-Net skips it)."""
        filename = checkpoint_filename(checkpoint)
        folds = [m.group(1) for d in self.path.iterdir() if (m := _FOLD.match(d.name)) and (d / filename).is_file()]
        numbered = sorted((f for f in folds if f != "all"), key=int)
        return numbered or [f for f in folds if f == "all"]

    def checkpoint_path(self, fold, checkpoint: str = "final") -> Path:
        return self.path / f"fold_{fold}" / checkpoint_filename(checkpoint)

    def postprocessing(self) -> Optional[dict]:
        """nnU-Net's postprocessing.json from cross-validation, when the folder has one (the .pkl is never read)."""
        for candidate in sorted(self.path.glob("crossval_results_folds_*/postprocessing.json")):
            return read_json(candidate)
        return None

    def _single_configuration(self) -> str:
        names = list(self.plans.get("configurations", {}))
        if len(names) == 1:
            return names[0]
        if "3d_fullres" in names:
            return "3d_fullres"
        raise ModelError(f"Say which configuration to use: {', '.join(names)}.")


def checkpoint_filename(checkpoint: str) -> str:
    if checkpoint in CHECKPOINTS:
        return CHECKPOINTS[checkpoint]
    if checkpoint.endswith(".pth"):
        return checkpoint
    raise ModelError(f"Unknown checkpoint '{checkpoint}': use final, best or a file name ending in .pth.")


def _split_folder_name(name: str):
    parts = name.split("__")
    return tuple(parts) if len(parts) == 3 else (None, None, None)


def find_trained_folder(path: Path, configuration: Optional[str]) -> Path:
    """The folder with plans.json: `path` itself, or the one child `Trainer__Plans__<configuration>`."""
    if not path.exists():
        raise ModelError(f"Model folder not found: {path}")
    if not path.is_dir():
        raise ModelError(f"Not a model folder (expected a folder with dataset.json and plans.json): {path}")
    if (path / "plans.json").is_file():
        return path
    trained = sorted(d for d in path.iterdir() if d.is_dir() and (d / "plans.json").is_file())
    if configuration:
        trained = [d for d in trained if _split_folder_name(d.name)[2] == configuration]
    if len(trained) == 1:
        return trained[0]
    if not trained:
        raise ModelError(f"No trained nnU-Net model in {path}: expected plans.json, dataset.json and fold_N folders.")
    names = ", ".join(d.name for d in trained)
    raise ModelError(f"{path} holds several trained models ({names}); choose one with the configuration option.")
