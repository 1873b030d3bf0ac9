"""nnU-Net v1 model folders, read and presented as the engine's ModelFolder.

Many trained models are still nnU-Net v1 (`RESULTS_FOLDER/nnUNet/<2d|3d_lowres|3d_fullres|3d_cascade_fullres>/
TaskXXX_Name/<Trainer>__<plans>/` with plans.pkl and `fold_N/` or `all/` holding model_final_checkpoint.model
and its .model.pkl). This module is separate from folder.py (v2's JSON) because everything about v1 differs
in kind, not in detail: its files are pickles and its network is Generic_UNet. A v1 folder is turned into the
same interface the engine already runs (a Configuration whose architecture is our PlainConvUNet, Labels, folds,
checkpoints, v1's weights under PlainConvUNet's names); the steps where v1 predicts differently (its
preprocessing, probabilities and postprocessing) are inference/v1_model.py's.

No code from a model folder ever runs: pickles are read by a restricted unpickler (`read_pickle`) that builds
only the plain types v1 writes (dicts, lists, tuples, OrderedDict, numpy arrays, dtypes and scalars) and refuses
anything else naming it; `.model` checkpoints go through checkpoint.py's weights-only torch loading.
"""
import ast
import io
import json
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..errors import ModelError
from .folder import Configuration, Labels
from .trained_folder import TrainedFolder

CONFIGURATIONS = ("2d", "3d_lowres", "3d_fullres", "3d_cascade_fullres")
PLANS_FILE = "plans.pkl"
_FOLD = re.compile(r"^(?:fold_(\d+)|(all))$")
MAX_PICKLE_BYTES = 256 << 20   # plans and .model.pkl files are kilobytes; this bounds what a hostile one costs
_SEARCH_LEVELS = 5             # RESULTS_FOLDER/nnUNet/<configuration>/TaskXXX/<Trainer>__<plans>: from the top down
# v1's Generic_UNet caps (generic_UNet.py: MAX_NUM_FILTERS_3D, MAX_FILTERS_2D), which nnUNetTrainerV2 keeps
MAX_FEATURES = {2: 480, 3: 320}
DEFAULT_EXPORT = {"force_separate_z": None, "interpolation_order": 1, "interpolation_order_z": 0}


# -- restricted unpickling -------------------------------------------------------------------------------------

def _allowed_globals() -> dict:
    """(module, name) -> object for the only globals v1's pickles need; numpy 1 and numpy 2 names both."""
    core = np._core if hasattr(getattr(np, "_core", None), "multiarray") else np.core
    allowed = {("collections", "OrderedDict"): OrderedDict, ("numpy", "ndarray"): np.ndarray,
               ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_bytes}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = core.multiarray._reconstruct
        allowed[(module, "scalar")] = core.multiarray.scalar
    dtypes = getattr(np, "dtypes", None)   # numpy >= 1.25 may name dtype classes
    for name in dir(dtypes) if dtypes is not None else ():
        if name.endswith("DType") and name not in ("ObjectDType", "VoidDType"):
            allowed[("numpy.dtypes", name)] = getattr(dtypes, name)
    return allowed


def _latin1_bytes(text, encoding="latin1"):
    """What protocol-2 pickles call for bytes (`_codecs.encode(text, 'latin1')`), limited to that."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode called with something other than text and latin1")
    return text.encode("latin1")


class _PlainUnpickler(pickle.Unpickler):
    allowed = None

    def find_class(self, module, name):
        found = self.allowed.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found

    def persistent_load(self, pid):
        raise _Refused("a persistent reference")


class _Refused(pickle.UnpicklingError):
    """A global the restricted unpickler does not build."""


def read_pickle(path) -> object:
    """A v1 pickle's plain data; ModelError (one sentence) when it is missing, damaged, too large or holds
    anything but plain data: nothing it names is ever imported or called."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_PICKLE_BYTES:
            raise ModelError(f"{path} is {size / 1e6:.0f} MB; a v1 plans or .model.pkl file is a few kilobytes, so "
                             "it is not one.")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{path.name} is missing from the nnU-Net v1 model folder {path.parent}.") from None
    except OSError as error:
        raise ModelError(f"{path} cannot be read ({error.strerror or error}).") from None
    unpickler = _PlainUnpickler(io.BytesIO(data))
    unpickler.allowed = _allowed_globals()
    try:
        return unpickler.load()
    except _Refused as refused:
        raise ModelError(f"Refusing to load {path}: it contains {refused}, which is not plain data; only dicts, "
                         "lists, numbers, text and numpy arrays are read from nnU-Net v1 files.") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            UnicodeDecodeError, RecursionError, MemoryError, OverflowError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0][:120]
        raise ModelError(f"Cannot read {path}: the file is truncated or corrupt ({type(error).__name__}: "
                         f"{reason}).") from None


# -- finding a v1 folder ---------------------------------------------------------------------------------------

def is_v1_trained_folder(path: Path) -> bool:
    """plans.pkl (or a *_plans_3D/2D.pkl) beside fold_N/ or all/ folders holding a .model.pkl."""
    try:
        if not path.is_dir() or _plans_file(path) is None and not _fold_dirs(path):
            return False
        return any(any(f.glob("*.model.pkl")) for f in _fold_dirs(path))
    except OSError:
        return False


def is_v1_folder(path) -> bool:
    """A v1 trained folder, or a folder holding v1 trained folders (a task folder, a configuration folder, the
    nnUNet folder of RESULTS_FOLDER, an unpacked v1 zip)."""
    path = Path(path)
    return path.is_dir() and not (path / "plans.json").is_file() and bool(v1_trained_folders(path))


def v1_trained_folders(path: Path) -> List[Path]:
    """Every v1 trained folder at `path` or up to four levels below it, sorted."""
    found, level = [], [path]
    for _ in range(_SEARCH_LEVELS):
        next_level = []
        for folder in level:
            if is_v1_trained_folder(folder):
                found.append(folder)
                continue
            try:
                next_level += sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
            except OSError:
                pass
        level = next_level[:2000]
    return sorted(found)


def folder_configuration(trained: Path) -> Optional[str]:
    """The configuration a v1 folder path names (`<configuration>/TaskXXX/<Trainer>__<plans>`), or None."""
    name = trained.parent.parent.name
    return name if name in CONFIGURATIONS else None


def find_v1_trained_folder(path: Path, configuration: Optional[str]) -> Path:
    trained = v1_trained_folders(path)
    if configuration:
        trained = [t for t in trained if folder_configuration(t) in (configuration, None)]
    if len(trained) == 1:
        return trained[0]
    if not trained:
        which = f"{configuration} model" if configuration else "model"
        raise ModelError(f"No nnU-Net v1 {which} in {path}: expected plans.pkl and "
                         "fold_N/model_final_checkpoint.model(.pkl).")
    names = ", ".join(f"{folder_configuration(t) or '?'} ({t.name})" for t in trained)
    raise ModelError(f"{path} holds several nnU-Net v1 models ({names}); choose one with the configuration option.")


def _fold_dirs(path: Path) -> List[Path]:
    return [d for d in path.iterdir() if _FOLD.match(d.name) and d.is_dir()]


def _plans_file(path: Path) -> Optional[Path]:
    if (path / PLANS_FILE).is_file():
        return path / PLANS_FILE
    others = sorted(path.glob("*_plans_3D.pkl")) + sorted(path.glob("*_plans_2D.pkl"))
    return others[0] if others else None


# -- the folder ------------------------------------------------------------------------------------------------

class V1ModelFolder(TrainedFolder):
    """A v1 trained folder, read into what every TrainedFolder offers (what model.Model reads)."""
    nnunet_version = 1
    CHECKPOINTS = {"final": "model_final_checkpoint.model", "best": "model_best.model"}
    CHECKPOINT_SUFFIX = ".model"
    PLANS = "The v1 plans"

    def __init__(self, path, configuration: Optional[str] = None):
        path = Path(path)
        if not path.exists():
            raise ModelError(f"Model folder not found: {path}.")
        self.path = find_v1_trained_folder(path, configuration)
        self.trainer_name, _, self.plans_name = self.path.name.partition("__")
        info = self._model_info()
        plans_file = _plans_file(self.path)
        if plans_file is not None:
            self.plans = _dict(read_pickle(plans_file), plans_file.name)
        elif isinstance(info.get("plans"), dict):
            self.plans = info["plans"]   # the .model.pkl embeds the plans
        else:
            raise ModelError(f"{self.path} has no plans.pkl (nor plans inside its .model.pkl): it is not a usable "
                             "nnU-Net v1 model folder.")
        self.trainer_name = str(info.get("name") or self.trainer_name)
        self.configuration_name = configuration or folder_configuration(self.path) or self._guess_configuration(info)
        if self.configuration_name not in CONFIGURATIONS:
            raise ModelError(f"Unknown nnU-Net v1 configuration '{self.configuration_name}' (v1 has "
                             f"{', '.join(CONFIGURATIONS)}).")
        self.stage = self._stage(info)
        self.dataset = {"labels": self._label_names(), "channel_names": self._channels()}
        self.labels = Labels(self.dataset)
        self.configuration = Configuration(self.configuration_name, self._settings())

    # what model.Model and models_home read
    @property
    def name(self) -> str:
        task = self.path.parent.name or "nnU-Net v1 model"
        return f"{task} ({self.configuration_name}, nnU-Net v1)"

    @property
    def channel_names(self) -> List[str]:
        return [self.dataset["channel_names"][k] for k in sorted(self.dataset["channel_names"], key=int)]

    @property
    def intensity_properties(self) -> dict:
        properties = (self.plans.get("dataset_properties") or {}).get("intensityproperties") or {}
        return properties if isinstance(properties, dict) else {}

    def postprocessing(self) -> Optional[dict]:
        """v1's postprocessing.json (written by its determine_postprocessing), checked now."""
        path = self.path / "postprocessing.json"
        if not path.is_file():
            return None
        return read_postprocessing(path)

    def _fold_folders(self) -> Dict[str, Path]:
        return {_fold_id(d.name): d for d in _fold_dirs(self.path)}

    def _fold_folder_name(self, fold: str) -> str:
        return "all" if fold == "all" else f"fold_{fold}"

    # -- reading the plans ---------------------------------------------------------------------------------
    def _model_info(self) -> dict:
        """The first fold's .model.pkl ({init, name, class, plans}); {} when none can be found."""
        for fold in sorted(_fold_dirs(self.path)):
            for name in ("model_final_checkpoint.model.pkl", "model_best.model.pkl"):
                if (fold / name).is_file():
                    return _dict(read_pickle(fold / name), name)
        return {}

    def _guess_configuration(self, info: dict) -> str:
        """For a trained folder taken out of its `<configuration>/TaskXXX/` place: from the patch, the trainer
        and the stage the trainer was given (stage 0 of several is 3d_lowres)."""
        stages = self._stages()
        patch = stages[min(stages)].get("patch_size")
        if isinstance(patch, (list, tuple)) and len(patch) == 2:
            return "2d"
        if "cascade" in self.trainer_name.lower():
            return "3d_cascade_fullres"
        init = info.get("init")
        stage = init[5] if isinstance(init, (list, tuple)) and len(init) > 5 else None
        return "3d_lowres" if len(stages) > 1 and stage == min(stages) else "3d_fullres"

    def _stages(self) -> dict:
        stages = self.plans.get("plans_per_stage")
        if not isinstance(stages, dict) or not stages or not all(isinstance(s, dict) for s in stages.values()):
            raise ModelError("The v1 plans have no 'plans_per_stage' describing the network.")
        return stages

    def _stage(self, info: dict):
        stages = self._stages()
        init = info.get("init")
        if isinstance(init, (list, tuple)) and len(init) > 5 and init[5] in stages:
            return init[5]   # the stage the trainer was given, as v1's restore_model uses it
        if self.configuration_name in ("2d", "3d_lowres"):
            return min(stages)
        return max(stages)

    def _label_names(self) -> dict:
        classes = self.plans.get("all_classes")
        if not isinstance(classes, (list, tuple)) or not all(_whole(c) and c > 0 for c in classes):
            count = self.plans.get("num_classes")
            if not _whole(count) or not 0 < count < 1000:
                raise ModelError("The v1 plans name no classes ('all_classes' / 'num_classes').")
            classes = list(range(1, int(count) + 1))
        names = self._dataset_json_labels()
        labels = {"background": 0}
        for c in sorted(int(c) for c in classes):
            name = names.get(str(c)) or f"label {c}"
            labels[name if name not in labels else f"{name} ({c})"] = c
        return labels

    def _dataset_json_labels(self) -> dict:
        """Label names from a dataset.json beside the model (v1 results folders seldom have one)."""
        for candidate in (self.path / "dataset.json", self.path.parent / "dataset.json"):
            if candidate.is_file():
                try:
                    labels = json.loads(candidate.read_text()).get("labels")
                except (ValueError, OSError, UnicodeDecodeError, AttributeError, RecursionError):
                    return {}
                if isinstance(labels, dict):
                    return {str(k): str(v) for k, v in labels.items() if isinstance(v, str)}
        return {}

    def _channels(self) -> dict:
        modalities = self.plans.get("modalities")
        if not isinstance(modalities, dict) or not modalities:
            count = self.plans.get("num_modalities")
            if not _whole(count) or not 0 < count < 100:
                raise ModelError("The v1 plans name no input channels ('modalities').")
            modalities = {i: f"channel {i}" for i in range(int(count))}
        try:
            keys = sorted(int(k) for k in modalities)
        except (TypeError, ValueError):
            keys = []
        if keys != list(range(len(modalities))):
            raise ModelError("The v1 plans' 'modalities' must be numbered 0, 1, ...")
        return {str(k): str(modalities.get(k, modalities.get(str(k)))) for k in keys}

    def _settings(self) -> dict:
        """The configuration as the engine reads it (v2's keys), from v1's plans."""
        stage = self._stages()[self.stage]
        try:
            patch = [int(p) for p in stage["patch_size"]]
            spacing = [float(s) for s in stage["current_spacing"]][-len(patch):]
            pools = [[int(k) for k in p] for p in stage["pool_op_kernel_sizes"]]
            kernels = [[int(k) for k in p] for p in stage["conv_kernel_sizes"]]
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"The v1 plans' stage {self.stage} lacks a patch size, spacing or network "
                             "topology.") from None
        if len(patch) not in (2, 3) or min(patch) < 1 or not all(0 < s < 1e6 for s in spacing) or \
                len(kernels) != len(pools) + 1 or any(len(k) != len(patch) for k in kernels + pools):
            raise ModelError(f"The v1 plans' stage {self.stage} does not describe a network for its patch size.")
        channels = len(self.dataset["channel_names"])
        schemes = _per_channel(self.plans.get("normalization_schemes"), channels, "normalization_schemes", str)
        masks = _per_channel(self.plans.get("use_mask_for_norm"), channels, "use_mask_for_norm", bool)
        export_params = dict(DEFAULT_EXPORT, **_dict(self.plans.get("segmentation_export_params") or {},
                                                      "segmentation_export_params"))
        settings = {
            "patch_size": patch, "spacing": spacing, "normalization_schemes": schemes, "use_mask_for_norm": masks,
            "architecture": generic_unet_architecture(self.plans, patch, pools, kernels),
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"order": export_params["interpolation_order"],
                                                   "order_z": export_params["interpolation_order_z"],
                                                   "force_separate_z": export_params["force_separate_z"]},
        }
        if self.configuration_name == "3d_cascade_fullres":
            settings["previous_stage"] = "3d_lowres"
        return settings


def generic_unet_architecture(plans: dict, patch, pools, kernels) -> dict:
    """v1's Generic_UNet (nnUNetTrainerV2.initialize_network) as our PlainConvUNet: the same layers, with the
    decoder kernels v1 uses (conv_kernel_sizes[-(u+1)] at decoder step u)."""
    dim = len(patch)
    base = plans.get("base_num_features", 32)
    per_stage = plans.get("conv_per_stage", 2)
    if not _whole(base) or not 0 < base <= 4096 or not _whole(per_stage) or not 2 <= per_stage <= 16:
        raise ModelError("The v1 plans' base_num_features or conv_per_stage is not a sensible whole number.")
    n_stages = len(kernels)
    features, width = [], int(base)
    for _ in range(n_stages):
        features.append(min(width, MAX_FEATURES[dim]))
        width = min(int(np.round(width * 2)), MAX_FEATURES[dim])
    kwargs = {
        "n_stages": n_stages, "features_per_stage": features, "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
        "kernel_sizes": kernels, "strides": [[1] * dim] + pools, "n_conv_per_stage": [int(per_stage)] * n_stages,
        "n_conv_per_stage_decoder": [int(per_stage)] * (n_stages - 1), "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"negative_slope": 1e-2, "inplace": True},
        "decoder_kernel_sizes": [kernels[-(u + 1)] for u in range(n_stages - 1)],
    }
    return {"network_class_name": "PlainConvUNet", "arch_kwargs": kwargs,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def read_postprocessing(path: Path) -> dict:
    """{"for_which_classes": [1, (1, 2), ...], "min_valid_object_sizes": {class: mm3} or None} from v1's json."""
    try:
        recipe = json.loads(path.read_text())
        classes = recipe["for_which_classes"]
        sizes = recipe.get("min_valid_object_sizes")
        sizes = ast.literal_eval(sizes) if isinstance(sizes, str) else sizes   # v1 writes str(dict)
    except (ValueError, OSError, KeyError, TypeError, SyntaxError, UnicodeDecodeError, RecursionError,
            MemoryError) as error:
        raise ModelError(f"{path} is not nnU-Net v1's postprocessing.json ({type(error).__name__}).") from None
    classes = [tuple(c) if isinstance(c, list) else c for c in classes] if isinstance(classes, list) else None
    valid = classes is not None and all(_whole(c) and c > 0 or isinstance(c, tuple) and c and
                                        all(_whole(x) and x > 0 for x in c) for c in classes)
    if not valid or (sizes is not None and not (isinstance(sizes, dict) and all(
            isinstance(v, (int, float)) for v in sizes.values()))):
        raise ModelError(f"{path}: 'for_which_classes' must list labels (or lists of labels) and "
                         "'min_valid_object_sizes' map them to volumes.")
    if sizes is not None and any(c not in sizes for c in classes):
        raise ModelError(f"{path}: 'min_valid_object_sizes' must give a size for every class in 'for_which_classes'.")
    return {"for_which_classes": classes, "min_valid_object_sizes": sizes}


def _fold_id(name: str) -> str:
    match = _FOLD.match(name)
    return match.group(1) or match.group(2)


def _dict(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise ModelError(f"{what} does not hold the dictionary nnU-Net v1 writes (it holds {type(value).__name__}).")
    return value


def _whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _per_channel(value, channels: int, key: str, kind) -> list:
    """v1's {channel: value} (OrderedDict) as a list, one entry per channel."""
    if value is None and kind is bool:
        return [False] * channels
    if not isinstance(value, dict) or not all(_whole(k) or str(k).isdigit() for k in value):
        raise ModelError(f"The v1 plans' '{key}' must give one value per channel.")
    by_channel = {int(k): v for k, v in value.items()}
    if sorted(by_channel) != list(range(channels)) or not all(isinstance(v, (kind, np.bool_)) for v in
                                                              by_channel.values()):
        raise ModelError(f"The v1 plans' '{key}' must give one {kind.__name__} per channel.")
    return [kind(by_channel[c]) for c in range(channels)]
