"""nnU-Net v1 model folders, presented as the engine's ModelFolder and predicted the way nnU-Net v1 predicts.

Many trained models are still nnU-Net v1 (`RESULTS_FOLDER/nnUNet/<2d|3d_lowres|3d_fullres|3d_cascade_fullres>/
TaskXXX_Name/<Trainer>__<plans>/` with plans.pkl and `fold_N/` or `all/` holding model_final_checkpoint.model
and its .model.pkl). This module is separate from folder.py (v2's JSON) because everything about v1 differs
in kind, not in detail: its files are pickles, its network is Generic_UNet, and its prediction averages
probabilities, not logits. A v1 folder is turned into the same interface the engine already runs (a
Configuration whose architecture is our PlainConvUNet, Labels, folds, checkpoints), and V1Model replaces only the
steps where v1 computes differently (NNUNET_INFERENCE_SPEC.md section 6):

- preprocessing: crop to non-zero, NaN -> 0, resample, and only then normalise with v1's schemes (`nonCT`
  z-score with + 1e-8, `CT` with the key `sd`, `CT2`, `noNorm`; the masked variants use the resampled mask);
  the cascade's previous stage is resized uncropped onto the preprocessed grid, one-hot, as v1's predict does;
- sliding window: softmax per forward pass; the passes of one tile weighted 1/2^|mirror axes| in v1's fixed
  8-branch order; the Gaussian (sigma patch/8, peak 1, float32) only when there is more than one tile; float32
  sums of probabilities, averaged over tiles and then folds (with uncertainty maps, each pass's own entropy is
  averaged alongside, and the maps are those of the averaged probabilities, as uncertainty.py defines them);
- export: the averaged probabilities resampled with the plans' `segmentation_export_params` (default order 1,
  z order 0), argmax; v1's postprocessing.json (`for_which_classes`, `min_valid_object_sizes`).

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
from functools import lru_cache
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..errors import ModelError
from .folder import Configuration, Labels

CONFIGURATIONS = ("2d", "3d_lowres", "3d_fullres", "3d_cascade_fullres")
CHECKPOINTS = {"final": "model_final_checkpoint.model", "best": "model_best.model"}
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

class V1ModelFolder:
    """A v1 trained folder with the interface of folder.ModelFolder (what model.Model reads)."""
    nnunet_version = 1

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
    def transpose_forward(self) -> List[int]:
        return _permutation(self.plans.get("transpose_forward", [0, 1, 2]), "transpose_forward")

    @property
    def transpose_backward(self) -> List[int]:
        return _permutation(self.plans.get("transpose_backward", [0, 1, 2]), "transpose_backward")

    @property
    def intensity_properties(self) -> dict:
        properties = (self.plans.get("dataset_properties") or {}).get("intensityproperties") or {}
        return properties if isinstance(properties, dict) else {}

    def available_folds(self, checkpoint: str = "final") -> List[str]:
        filename = checkpoint_filename(checkpoint)
        folds = [_fold_id(d.name) for d in _fold_dirs(self.path) if (d / filename).is_file()]
        numbered = sorted((f for f in folds if f != "all"), key=int)
        return numbered or [f for f in folds if f == "all"]

    def fold_folders(self) -> List[str]:
        return sorted(_fold_id(d.name) for d in _fold_dirs(self.path))

    def checkpoint_path(self, fold, checkpoint: str = "final") -> Path:
        folder = "all" if str(fold) == "all" else f"fold_{fold}"
        return self.path / folder / checkpoint_filename(checkpoint)

    def postprocessing(self) -> Optional[dict]:
        """v1's postprocessing.json (written by its determine_postprocessing), checked now."""
        path = self.path / "postprocessing.json"
        if not path.is_file():
            return None
        return read_postprocessing(path)

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


def checkpoint_filename(checkpoint: str) -> str:
    if checkpoint in CHECKPOINTS:
        return CHECKPOINTS[checkpoint]
    if checkpoint.endswith(".model") and "/" not in checkpoint:
        return checkpoint
    raise ModelError(f"Unknown checkpoint '{checkpoint}' for an nnU-Net v1 model: use final, best or a file name "
                     "ending in .model.")


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


def _permutation(value, key: str) -> List[int]:
    try:
        axes = [int(v) for v in value]
    except (TypeError, ValueError):
        axes = []
    if sorted(axes) != [0, 1, 2]:
        raise ModelError(f"The v1 plans' '{key}' must be an order of the axes 0, 1, 2.")
    return axes


# -- weights ---------------------------------------------------------------------------------------------------

def v2_weights(v1_state: dict, network) -> dict:
    """v1 Generic_UNet weights under our PlainConvUNet's names (spec section 6): context stages ->
    encoder stages, the bottleneck's 1 + 1 convolutions -> its stage, `tu` -> transpconvs, localization ->
    decoder stages, `seg_outputs` -> seg_layers; up-convolutions and heads have no bias in v1, so theirs are 0."""
    import torch
    n_stages = len(network.encoder.stages)
    per_stage = len(network.encoder.stages[0][0].convs)
    out, used = {}, set()
    for key, template in network.state_dict().items():
        source = _v1_key(_canonical(key), n_stages, per_stage)
        if source is None:      # a bias v1 does not have
            out[key] = torch.zeros_like(template)
        elif source in v1_state:
            out[key] = v1_state[source]
            used.add(source)
    # weights of another network (a v1 trainer with its own architecture) stay under their names, so that
    # checkpoint.load_weights names them as unexpected instead of their being left out silently
    out.update({k: v for k, v in v1_state.items() if k not in used})
    return out


def _canonical(key: str) -> str:
    """Our network's aliases of one weight (decoder.encoder..., all_modules.N) under its plain name."""
    key = key[len("decoder."):] if key.startswith("decoder.encoder.") else key
    return key.replace(".all_modules.0.", ".conv.").replace(".all_modules.1.", ".norm.")


def _v1_key(name: str, n_stages: int, per_stage: int) -> Optional[str]:
    part = {"conv": "conv", "norm": "instnorm"}
    match = re.fullmatch(r"encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.(conv|norm)\.(weight|bias)", name)
    if match:
        s, c, layer, what = int(match[1]), int(match[2]), match[3], match[4]
        if s < n_stages - 1:
            return f"conv_blocks_context.{s}.blocks.{c}.{part[layer]}.{what}"
        block, index = (0, c) if c < per_stage - 1 else (1, 0)
        return f"conv_blocks_context.{s}.{block}.blocks.{index}.{part[layer]}.{what}"
    match = re.fullmatch(r"decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.(weight|bias)", name)
    if match:
        u, c, layer, what = int(match[1]), int(match[2]), match[3], match[4]
        block, index = (0, c) if c < per_stage - 1 else (1, 0)
        return f"conv_blocks_localization.{u}.{block}.blocks.{index}.{part[layer]}.{what}"
    match = re.fullmatch(r"decoder\.(transpconvs|seg_layers)\.(\d+)\.(weight|bias)", name)
    if match:
        if match[3] == "bias":
            return None
        return f"{'tu' if match[1] == 'transpconvs' else 'seg_outputs'}.{match[2]}.weight"
    return name


def mirror_axes_for(trainer_name: str, dimensions: int):
    """nnUNetTrainerV2's mirror axes ((0, 1, 2) in 3D, (0, 1) in 2D); trainers named noMirroring have none."""
    if "nomirror" in trainer_name.lower():
        return None
    return tuple(range(dimensions))


# -- preprocessing ---------------------------------------------------------------------------------------------

def preprocess_v1(channels, spacing_zyx, configuration: Configuration, transpose_forward, intensity_properties,
                  previous_stage=None, foreground_labels=()):
    """v1's preprocess_test_case (+ predict's previous-stage channels): transpose, crop to non-zero, NaN -> 0,
    resample (order 3, z order 0; the non-zero mask linearly), then normalise."""
    from ..inference.preprocessing import Preprocessed, transpose_and_crop
    from ..inference.resampling import compute_new_shape, resample
    data, nonzero, spacing, shape_before, bbox = transpose_and_crop(channels, spacing_zyx, transpose_forward)
    shape_after_cropping = data.shape[1:]
    data[np.isnan(data)] = 0
    target = configuration.spacing
    if len(target) < data.ndim - 1:   # PreprocessorFor2D keeps the slice spacing
        target = [spacing[0]] + target
    new_shape = compute_new_shape(shape_after_cropping, spacing, target)
    data = resample(data, new_shape, spacing, target, order=3, order_z=0, force_separate_z=None)
    masks = configuration.get("use_mask_for_norm") or []
    inside = None
    if any(masks):   # v1 resamples its seg (-1 outside, 0 inside) with order 1 per label, z order 0
        inside = resample(nonzero.astype(np.float32)[None], new_shape, spacing, target, order=1, order_z=0)[0] >= 0.5
    normalize_v1(data, inside, configuration, intensity_properties)
    if previous_stage is not None:
        data = np.vstack((data, _previous_stage_one_hot(previous_stage, transpose_forward, data.shape[1:],
                                                         foreground_labels))).astype(np.float32)
    return Preprocessed(data, shape_before, bbox, shape_after_cropping, spacing, list(target))


def normalize_v1(data: np.ndarray, inside, configuration: Configuration, intensity_properties: dict):
    """GenericPreprocessor.resample_and_normalize's normalisation, written as v1 writes it (same numpy types)."""
    schemes = configuration["normalization_schemes"]
    use_mask = configuration.get("use_mask_for_norm") or [False] * len(schemes)
    for c in range(len(data)):
        scheme = schemes[c]
        if scheme in ("CT", "CT2"):
            stats = intensity_properties.get(c, intensity_properties.get(str(c)))
            if not isinstance(stats, dict) or not all(k in stats for k in ("mean", "sd", "percentile_00_5",
                                                                             "percentile_99_5")):
                raise ModelError(f"The v1 plans lack the intensity statistics CT normalisation needs for channel {c}.")
            lower_bound, upper_bound = stats["percentile_00_5"], stats["percentile_99_5"]
            if scheme == "CT":
                data[c] = np.clip(data[c], lower_bound, upper_bound)
                data[c] = (data[c] - stats["mean"]) / stats["sd"]
            else:
                mask = (data[c] > lower_bound) & (data[c] < upper_bound)
                data[c] = np.clip(data[c], lower_bound, upper_bound)
                mn, sd = data[c][mask].mean(), data[c][mask].std()
                data[c] = (data[c] - mn) / sd
            if use_mask[c]:
                data[c][~inside] = 0
        elif scheme == "noNorm":
            pass
        elif use_mask[c]:
            data[c][inside] = (data[c][inside] - data[c][inside].mean()) / (data[c][inside].std() + 1e-8)
            data[c][~inside] = 0
        else:
            mn = data[c].mean()
            std = data[c].std()
            data[c] = (data[c] - mn) / (std + 1e-8)


def _previous_stage_one_hot(previous, transpose_forward, shape, labels) -> np.ndarray:
    """v1's predict: the lowres label map transposed, resized (uncropped, as v1 does) onto the preprocessed grid
    with resize_segmentation(order=1), one channel per foreground label."""
    import scipy.ndimage
    seg = np.asarray(previous).transpose(transpose_forward)
    resized = np.zeros(shape, dtype=seg.dtype)
    zoom = [n / o for n, o in zip(shape, seg.shape)]
    for value in np.unique(seg):
        mask = scipy.ndimage.zoom((seg == value).astype(float), zoom, order=1, mode="nearest", grid_mode=True)
        resized[mask >= 0.5] = value
    return np.stack([(resized == label).astype(np.float32) for label in labels]) if len(labels) else \
        np.zeros((0, *shape), np.float32)


# -- sliding window --------------------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def _gaussian_v1(patch_size: tuple) -> np.ndarray:
    """SegmentationNetwork._get_gaussian: sigma patch/8, peak 1, float32, zeros lifted to the smallest value."""
    from scipy.ndimage import gaussian_filter
    tmp = np.zeros(patch_size)
    tmp[tuple(p // 2 for p in patch_size)] = 1
    g = gaussian_filter(tmp, [p / 8 for p in patch_size], 0, mode="constant", cval=0)
    g = (g / np.max(g) * 1).astype(np.float32)
    g[g == 0] = np.min(g[g != 0])
    return g


def _v1_flips(mirror_axes, dims: int) -> List[tuple]:
    """The mirrored passes of _internal_maybe_mirror_and_pred_3D/2D, in v1's order (batch axes: +2)."""
    if not mirror_axes:
        return []
    axes = set(mirror_axes)
    if dims == 3:
        order = [((2,), (4,)), ((1,), (3,)), ((2, 1), (4, 3)), ((0,), (2,)), ((0, 2), (4, 2)), ((0, 1), (3, 2)),
                 ((0, 1, 2), (4, 3, 2))]
    else:
        order = [((1,), (3,)), ((0,), (2,)), ((0, 1), (3, 2))]
    return [flip for needed, flip in order if axes.issuperset(needed)]


def predict_probabilities_v1(network, data, patch_size, num_heads: int, *, step_size=0.5, mirror_axes=None,
                             device=None, results_device=None, batch_size: int = 2, progress=None, pass_entropy=None):
    """Sliding-window softmax probabilities (float32) as v1's predict_3D computes them; same arguments and
    results as sliding_window.predict_logits (with `pass_entropy`: (probabilities, mean entropy of the passes)),
    so model.Model runs it in place of that."""
    import torch
    from ..inference.sliding_window import pad_to_patch, run_passes, tiles
    from ..progress import Progress
    from ..tensors import to_tensor
    progress = progress or Progress()
    padded, undo = pad_to_patch(data, patch_size)
    padded = padded.to(results_device)
    spatial = padded.shape[1:]
    all_tiles = tiles(spatial, patch_size, step_size)
    per_window = len(all_tiles) // spatial[0] if len(patch_size) < len(spatial) else len(all_tiles)
    gaussian = to_tensor(_gaussian_v1(tuple(int(p) for p in patch_size))).to(results_device) \
        if per_window > 1 else None
    weight = gaussian if gaussian is not None else torch.ones(tuple(patch_size), device=results_device)
    probabilities = torch.zeros((num_heads, *spatial), dtype=torch.float32, device=results_device)
    counts = torch.zeros(spatial, dtype=torch.float32, device=results_device)
    expected = torch.zeros(spatial, dtype=torch.float32, device=results_device) if pass_entropy else None
    flips = _v1_flips(mirror_axes, len(patch_size))
    share = 1 / (2 ** len(mirror_axes)) if flips else 1
    per_step = max(1, batch_size // (len(flips) + 1))
    for first in range(0, len(all_tiles), per_step):
        group = all_tiles[first:first + per_step]
        progress.report(first / len(all_tiles), f"tile {first + 1} of {len(all_tiles)}")
        patches = torch.stack([padded[tile] for tile in group]).to(device)
        copies = torch.cat([patches] + [torch.flip(patches, axes) for axes in flips])
        outputs = torch.cat([o.float() for o in run_passes(network, copies, batch_size, progress)])
        n = len(group)
        result = torch.zeros((n, num_heads, *patch_size), dtype=torch.float32, device=device)
        entropy = 0
        for k, axes in enumerate([()] + flips):
            softmax = torch.softmax(outputs[k * n:(k + 1) * n], 1)
            result += share * (torch.flip(softmax, axes) if axes else softmax)
            if pass_entropy:   # each pass's own entropy (uncertainty.py), averaged over the passes
                each = pass_entropy(outputs[k * n:(k + 1) * n])
                entropy = entropy + (torch.flip(each, [a - 1 for a in axes]) if axes else each) / (len(flips) + 1)
        if gaussian is not None:
            result *= gaussian.to(device)
        result = result.to(results_device)
        for i, (tile, prediction) in enumerate(zip(group, result)):
            probabilities[tile] += prediction
            counts[tile[1:]] += weight
            if pass_entropy:
                expected[tile[1:]] += entropy[i].to(results_device) * weight
    progress.report(1.0, f"tile {len(all_tiles)} of {len(all_tiles)}")
    probabilities /= counts
    if pass_entropy:
        return probabilities[undo], (expected / counts)[undo[1:]]
    return probabilities[undo]


# -- postprocessing --------------------------------------------------------------------------------------------

def remove_all_but_largest_component_v1(labelmap: np.ndarray, recipe: dict, voxel_volume: float) -> np.ndarray:
    """postprocessing/connected_components.py::remove_all_but_the_largest_connected_component: per class (or
    group of classes) keep the largest 6-connected object(s); with min_valid_object_sizes, only smaller objects
    below that volume (mm3) go."""
    from scipy.ndimage import label
    sizes_min = recipe.get("min_valid_object_sizes")
    for c in recipe["for_which_classes"]:
        mask = np.isin(labelmap, c if isinstance(c, tuple) else [c])
        components, count = label(mask.astype(int))
        if count == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=count + 1)[1:] * voxel_volume
        largest = sizes.max()
        for index, size in enumerate(sizes, start=1):
            if size != largest and (sizes_min is None or size < sizes_min[c]):
                labelmap[(components == index) & mask] = 0
    return labelmap


# -- the model -------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _v1_model_class():
    """model.Model with v1's steps; defined on first use so importing this module never imports torch."""
    import torch
    from ..inference.export import export
    from ..inference.model import Model
    from ..inference.uncertainty import maps_at_model_spacing
    from ..networks import build_network
    from .checkpoint import load_checkpoint

    class V1Model(Model):
        """An nnU-Net v1 model: weights mapped onto PlainConvUNet, predicted with v1's arithmetic."""
        _preprocess = staticmethod(preprocess_v1)
        _sliding_window = staticmethod(predict_probabilities_v1)
        _export = staticmethod(lambda *args, **kwargs: export(*args, given_probabilities=True, **kwargs))
        # uncertainty.py reads logits: the log of v1's averaged probabilities has those very probabilities as softmax
        _maps_at_model_spacing = staticmethod(lambda probabilities, expected, regions: maps_at_model_spacing(
            torch.log(probabilities.float().clamp_min(1e-30)), expected, regions))

        def _read_checkpoint(self, path) -> dict:
            checkpoint = load_checkpoint(path, weights_key="state_dict", kind="an nnU-Net v1 checkpoint")
            template = getattr(self, "_template", None)
            if template is None:
                n_in = len(self.folder.channel_names) + (len(self.folder.labels.foreground_labels)
                                                         if self.folder.configuration.previous_stage else 0)
                template = self._template = build_network(self.folder.configuration.architecture, n_in,
                                                          self.folder.labels.num_heads)
            return {"network_weights": v2_weights(checkpoint["state_dict"], template),
                    "trainer_name": self.folder.trainer_name, "epoch": checkpoint.get("epoch"),
                    "inference_allowed_mirroring_axes": mirror_axes_for(self.folder.trainer_name,
                                                                        len(self.folder.configuration.patch_size))}

        def finish(self, case):
            """v1 postprocesses the written label map, with the image's voxel volume for object sizes."""
            recipe = self.postprocessing if case.postprocess else None
            case.postprocess = False
            prediction = super().finish(case)
            if recipe:
                voxel_volume = float(np.prod(case.volume.spacing, dtype=np.float64))
                labels = prediction.labels.array
                prediction.labels = prediction.labels.with_array(
                    remove_all_but_largest_component_v1(labels, recipe, voxel_volume), name="segmentation")
                prediction.settings["postprocessing"] = True
            return prediction

    return V1Model


def load_v1_model(path, configuration: str = None, folds=None, checkpoint: str = "final"):
    return _v1_model_class()(V1ModelFolder(path, configuration), folds, checkpoint)
