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

from ..errors import ModelError
from ..nnunet_trainers import primus_title
from .trained_folder import TrainedFolder, short_text as _short

_FOLD = re.compile(r"^fold_(\d+|all)$")
# networks named in a model's name (nnU-Net's own are not): class name in the plans -> what people call it
NAMED_NETWORKS = {"MBTFEUNet": "MBTFE-UNet", "UNetPlusPlus": "UNet++", "SegResNetVAE": "SegResNetVAE",
                  "UNet3D": "3D U-Net"}


def network_title(architecture: dict, trainer_name: Optional[str]) -> str:
    """The network's family as people call it: the Primus its trainer builds ("Primus V3-S"), a named network
    ("UNet++"), or the plans' class name ("PlainConvUNet", "ResidualEncoderUNet")."""
    network = str((architecture or {}).get("network_class_name", "")).rsplit(".", 1)[-1]
    return primus_title(trainer_name) or NAMED_NETWORKS.get(network, network)


def read_json(path: Path) -> dict:
    """A JSON object from a model folder's file; ModelError when missing, unreadable or not an object."""
    if not path.is_file():
        raise ModelError(f"{path.name} is missing from the model folder {path.parent}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise ModelError(f"{path} is not valid JSON ({str(error)[:200]}).") from None
    except OSError as error:
        raise ModelError(f"{path} cannot be read ({error.strerror}).") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object.")
    return data


class Labels:
    """What the network's output channels mean (nnU-Net's LabelManager, labels or regions)."""

    def __init__(self, dataset: dict):
        labels = dataset.get("labels")
        if not isinstance(labels, dict) or "background" not in labels:
            raise ModelError("dataset.json has no 'labels' with a 'background' entry.")
        self.ignore_label = labels.get("ignore")
        named = {k: _label_values(k, v) for k, v in labels.items() if k != "ignore"}
        self.has_regions = any(len(v) > 1 for v in named.values())
        values = sorted({x for v in named.values() for x in v})
        self.all_labels = values
        self.foreground_labels = [v for v in values if v != 0]
        if self.has_regions:
            self.regions_class_order = _label_values("regions_class_order", dataset.get("regions_class_order", []))
            self.regions = [(name, v) for name, v in named.items() if not _is_background(v)]
            if len(self.regions_class_order) != len(self.regions):
                raise ModelError("dataset.json defines regions but no matching 'regions_class_order'.")
        else:
            self.regions_class_order, self.regions = None, None
            if values != list(range(len(values))):
                raise ModelError(f"dataset.json's labels must be numbered 0, 1, 2, ... without gaps, as nnU-Net "
                                 f"requires; it has {', '.join(str(v) for v in values[:12])}.")
        self._names = {k: (v[0] if len(v) == 1 else list(v)) for k, v in named.items()}

    @property
    def num_heads(self) -> int:
        return len(self.regions) if self.has_regions else len(self.all_labels)

    def output_segments(self) -> List[Tuple[int, str]]:
        """(value in the output label map, name) for every foreground value the model can write."""
        if self.has_regions:
            return [(int(value), name) for (name, _), value in zip(self.regions, self.regions_class_order)]
        by_value = {int(v): k for k, v in self._names.items() if not isinstance(v, (list, tuple))}
        return [(v, by_value.get(v, f"label {v}")) for v in self.foreground_labels]


def _label_values(name, value) -> tuple:
    """A label's value(s) as a tuple of non-negative ints (a region lists several)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values or not all(_is_int(v) and 0 <= v < 2 ** 31 for v in values):
        raise ModelError(f"dataset.json: '{_short(name)}' must be a label number (or a list of them for a region), "
                         f"not {_short(value)}.")
    return tuple(int(v) for v in values)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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


def _configurations(plans: dict) -> dict:
    configurations = plans.get("configurations", {})
    if not isinstance(configurations, dict) or not all(isinstance(c, dict) for c in configurations.values()):
        raise ModelError("plans.json: 'configurations' must map each configuration name to its settings.")
    return configurations


def resolve_configuration(plans: dict, name: str) -> Configuration:
    configurations = _configurations(plans)
    if name not in configurations:
        raise ModelError(f"Configuration '{_short(name)}' is not in plans.json "
                         f"(has: {', '.join(_short(c) for c in configurations)}).")
    settings = _inherit(configurations, name, set())
    if "architecture" not in settings:
        settings["architecture"] = _architecture_from_old_plans(settings)
    _check_configuration(name, settings)
    return Configuration(name, settings)


# Everything the engine later reads from a configuration is checked here, once, so that a hand-edited or
# damaged plans.json ends in one sentence naming the setting instead of a failure deep in the pipeline.
def _check_configuration(name: str, settings: dict):
    where = f"plans.json, configuration {_short(name)}"
    patch = settings.get("patch_size")
    if not _numbers(patch, integral=True) or len(patch) not in (2, 3) or min(patch) < 1:
        raise ModelError(f"{where}: the patch size must be 2 or 3 positive whole numbers, not {_short(patch)}.")
    spacing = settings.get("spacing")
    if not _numbers(spacing) or len(spacing) != len(patch) or not all(0 < s < 1e6 for s in spacing):
        raise ModelError(f"{where}: the spacing must be {len(patch)} positive numbers of millimetres (one per "
                         f"patch axis), not {_short(spacing)}.")
    schemes = settings.get("normalization_schemes")
    if not isinstance(schemes, list) or not schemes or not all(isinstance(x, str) for x in schemes):
        raise ModelError(f"{where}: 'normalization_schemes' must list one scheme name per channel.")
    if not isinstance(settings.get("use_mask_for_norm") or [], list):
        raise ModelError(f"{where}: 'use_mask_for_norm' must be a list of true/false.")
    for what in ("data", "probabilities"):
        if not isinstance(settings.get(f"resampling_fn_{what}", ""), str) or \
                not isinstance(settings.get(f"resampling_fn_{what}_kwargs") or {}, dict):
            raise ModelError(f"{where}: the resampling for {what} must be a function name with keyword settings.")
    if not isinstance(settings.get("previous_stage") or "", str):
        raise ModelError(f"{where}: 'previous_stage' must name a configuration.")
    _check_architecture(where, settings["architecture"])


def _check_architecture(where: str, architecture):
    if not isinstance(architecture, dict) or not isinstance(architecture.get("network_class_name"), str) \
            or not isinstance(architecture.get("arch_kwargs"), dict):
        raise ModelError(f"{where}: 'architecture' must name the network class and give its arguments.")
    imports = architecture.get("_kw_requires_import", [])
    if not isinstance(imports, list) or not all(isinstance(x, str) for x in imports):
        raise ModelError(f"{where}: '_kw_requires_import' must list argument names.")
    features = architecture["arch_kwargs"].get("features_per_stage")
    if features is not None and (not _numbers(features, integral=True) or not features or min(features) < 1):
        raise ModelError(f"{where}: 'features_per_stage' must be positive whole numbers, not {_short(features)}.")


def _numbers(values, integral: bool = False) -> bool:
    """A non-empty list of finite numbers (whole numbers when `integral`), booleans excluded."""
    if not isinstance(values, list) or not values:
        return False
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            return False
        if integral and v != int(v):
            return False
    return True


def _inherit(configurations: dict, name: str, seen: set) -> dict:
    """nnU-Net's recursive `inherits_from`: the parent's settings updated by the child's."""
    if name in seen:
        raise ModelError(f"plans.json: configuration '{_short(name)}' inherits from itself.")
    own = dict(configurations[name])
    parent = own.pop("inherits_from", None)
    if parent is None:
        return own
    if not isinstance(parent, str) or parent not in configurations:
        raise ModelError(f"plans.json: '{_short(name)}' inherits from unknown configuration '{_short(parent)}'.")
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
    except (TypeError, ValueError, OverflowError):
        raise ModelError("plans.json: the older network keys (UNet_class_name, conv_kernel_sizes, ...) do not "
                         "describe a network.") from None
    return {"network_class_name": name, "arch_kwargs": kwargs,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


class ModelFolder(TrainedFolder):
    """A trained nnU-Net v2 configuration folder: `dataset.json`, `plans.json`, `fold_*/checkpoint_*.pth`."""
    CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
    CHECKPOINT_SUFFIX = ".pth"
    PLANS = "plans.json"

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
        title = network_title(self.configuration.architecture, self.trainer_name)
        extra = f", {title}" if title in NAMED_NETWORKS.values() or title.startswith("Primus") else ""
        dataset = " ".join(str(self.plans.get("dataset_name", self.path.parent.name)).split())
        return f"{dataset} ({self.configuration_name}{extra})"

    @property
    def channel_names(self) -> List[str]:
        channels = self.dataset.get("channel_names") or self.dataset.get("modality")
        if not isinstance(channels, dict) or not channels or \
                sorted(channels, key=_channel_number) != [str(i) for i in range(len(channels))]:
            raise ModelError("dataset.json needs 'channel_names' numbered \"0\", \"1\", ... with one name each.")
        return [str(channels[k]) for k in sorted(channels, key=_channel_number)]

    @property
    def intensity_properties(self) -> Dict[str, dict]:
        properties = (self.plans.get("foreground_intensity_properties_per_channel")
                      or self.plans.get("foreground_intensity_properties_by_modality") or {})
        if not isinstance(properties, dict) or not all(isinstance(p, dict) for p in properties.values()):
            raise ModelError("plans.json: the foreground intensity properties must hold one set of figures per "
                             "channel.")
        return properties

    def postprocessing(self) -> Optional[dict]:
        """nnU-Net's postprocessing.json from cross-validation, when the folder has one (the .pkl is never read)."""
        from .postprocessing_recipe import postprocessing_steps
        for candidate in sorted(self.path.glob("crossval_results_folds_*/postprocessing.json")):
            recipe = read_json(candidate)
            postprocessing_steps(recipe)  # checked now, not after minutes of work
            return recipe
        return None

    def _fold_folders(self) -> Dict[str, Path]:
        return fold_folders_in(self.path)

    def _single_configuration(self) -> str:
        names = list(_configurations(self.plans))
        if len(names) == 1:
            return names[0]
        if "3d_fullres" in names:
            return "3d_fullres"
        raise ModelError(f"Say which configuration to use: {', '.join(names)}.")


def _channel_number(key) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise ModelError(f"dataset.json: channel '{_short(key)}' must be numbered \"0\", \"1\", ...") from None


def fold_folders_in(trained: Path) -> Dict[str, Path]:
    """{fold: folder} for a v2 trained folder's fold_0, fold_1, ..., fold_all."""
    return {m.group(1): d for d in trained.iterdir() if (m := _FOLD.match(d.name)) and d.is_dir()}


def _split_folder_name(name: str):
    parts = name.split("__")
    return tuple(parts) if len(parts) == 3 else (None, None, None)


def find_trained_folder(path: Path, configuration: Optional[str]) -> Path:
    """The folder with plans.json: `path` itself, or the one child `Trainer__Plans__<configuration>`."""
    if not path.exists():
        raise ModelError(f"Model folder not found: {path}.")
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
