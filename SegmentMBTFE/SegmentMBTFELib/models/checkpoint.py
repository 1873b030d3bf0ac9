"""Load nnU-Net checkpoints without ever running code from them.

`torch.load(weights_only=True)` refuses every pickled global that is not on an allow-list. nnU-Net
checkpoints hold, besides tensors, numpy scalars and dtypes (training logs, `_best_ema`); those, and
nothing else, are allowed. A checkpoint that needs any other global (a class, `os.system`, ...) is
refused with a message naming it, so a malicious file cannot execute code by being opened.

torch 2.2 and 2.3 (2.2.2 is the newest torch for macOS x86_64, Slicer's macOS builds) have weights_only but
cannot add numpy's scalars to its allow-list. There torch.load is given an unpickler whose `find_class` allows
exactly torch's own weights_only list plus the same numpy objects (the restriction Python's pickle documents
for untrusted data); everything else torch.load does (storages, tensors) is unchanged.
"""
import contextlib
import pickle
import types
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelError
from ..requirements import MINIMUM, too_old


def _numpy_globals():
    """The numpy objects nnU-Net checkpoints pickle: scalars (under numpy 2 and numpy 1 names) and dtypes."""
    # numpy 2 moved numpy.core to numpy._core; numpy 1.26 (Slicer 5.6 to 5.8) has a numpy._core without multiarray
    core = np._core if hasattr(getattr(np, "_core", None), "multiarray") else np.core
    scalar = core.multiarray.scalar
    allowed = [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes through these classes
    if dtypes is not None:
        for name in ("Float16DType", "Float32DType", "Float64DType", "Int8DType", "Int16DType", "Int32DType",
                     "Int64DType", "UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType", "BoolDType",
                     "StrDType", "BytesDType"):
            if hasattr(dtypes, name):
                allowed.append(getattr(dtypes, name))
    return allowed


def load_checkpoint(path, weights_key: str = "network_weights", kind: str = "an nnU-Net v2 checkpoint") -> dict:
    """The checkpoint's dict, loaded as data only. Raises ModelError with one line on any problem.
    nnU-Net v1's `.model` files hold their weights under `state_dict` (inference/v1_model.py passes that key)."""
    path = Path(path)
    if too_old("torch", torch.__version__):
        raise ModelError(f"torch {torch.__version__} is too old for SegmentMBTFE: it needs torch {MINIMUM['torch']} "
                         "or newer.")
    if not path.is_file():
        raise ModelError(f"Checkpoint not found: {path}")
    try:
        checkpoint = _load_data_only(path)
    except pickle.UnpicklingError as error:
        refused = _offending_global(error)
        if refused is None:  # not a refused global but bytes the unpickler cannot parse: damage
            raise ModelError(f"Cannot read checkpoint {path}: the file is truncated or corrupt "
                             f"(unreadable pickle data).") from None
        raise ModelError(f"Refusing to load {path}: it contains objects that are not plain data "
                         f"({refused}); only weights and numbers are allowed.") from None
    except Exception as error:  # noqa: BLE001 - damaged bytes make torch.load raise almost anything
        # (RuntimeError and zip errors for a cut zip, EOFError, IndexError or KeyError from garbage
        # read as a legacy pickle, ...): every one of them means the file cannot be used.
        other_zip = _other_zip(path)
        if other_zip:
            raise ModelError(f"{path} is a zip archive but not a PyTorch checkpoint (it holds {other_zip}); "
                             "the wrong file was put in its place.") from None
        reason = (str(error).splitlines() or [type(error).__name__])[0][:120]
        raise ModelError(f"Cannot read checkpoint {path}: the file is truncated or corrupt "
                         f"({type(error).__name__}: {reason}).") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(weights_key), dict):
        raise ModelError(f"{path} is not {kind} (no '{weights_key}').")
    checkpoint[weights_key] = _plain_keys(checkpoint[weights_key])
    return checkpoint


def _other_zip(path: Path) -> str:
    """A few of the names in a zip file that is not a torch checkpoint (which holds `<name>/data.pkl`), else ''."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return ""
    if any(name.endswith("/data.pkl") for name in names):
        return ""
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return shown or "nothing"


def _load_data_only(path: Path, modern: bool = None):
    """torch.load allowing only weights, numbers and the numpy objects (see the module's docstring)."""
    modern = hasattr(torch.serialization, "add_safe_globals") if modern is None else modern
    if modern:
        with _allowed(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle())


def _allowed(globals_):
    """torch >= 2.5 scopes the allow-list to this load; torch 2.4 can only extend it for the process."""
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals(globals_)
    torch.serialization.add_safe_globals(globals_)
    return contextlib.nullcontext()


def _restricted_pickle():
    """A pickle module for torch.load whose unpickler finds only allowed globals (torch < 2.4)."""
    from torch._weights_only_unpickler import _get_allowed_globals
    import codecs
    import collections
    # plain data that later torch allows as well: numpy's scalars carry their bytes through _codecs.encode,
    # and checkpoints written by torch >= 2.4 name devices
    later = {"_codecs.encode": codecs.encode, "builtins.set": set, "builtins.bytearray": bytearray,
             "builtins.complex": complex, "collections.Counter": collections.Counter, "torch.device": torch.device}
    allowed = {**_get_allowed_globals(), **later}
    for entry in _numpy_globals():
        value, name = entry if isinstance(entry, tuple) else (entry, f"{entry.__module__}.{entry.__qualname__}")
        allowed[name] = value

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            found = allowed.get(f"{module}.{name}")
            if found is None:  # worded as torch words it, which _offending_global reads
                raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} was not an allowed global")
            return found

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()
    return types.SimpleNamespace(Unpickler=Unpickler, load=load, __name__="restricted_pickle")


def _plain_keys(state_dict):
    """Strip the DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes some trainings leave in keys."""
    def plain(key):
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        return key
    return {plain(k): v for k, v in state_dict.items()}


def _offending_global(error):
    """The global torch refused, from its long message, or None when the error is not a refusal.

    torch words refusals as "Unsupported global: GLOBAL __main__.Evil was not an allowed global ..." and,
    for blocked modules, "Trying to load unsupported GLOBAL posix.system whose module posix is blocked";
    garbage bytes give other messages ("Unsupported operand 39", ...).
    """
    for line in str(error).splitlines():
        if "GLOBAL " in line:
            return (line.split("GLOBAL ", 1)[1].split() or ["a global"])[0][:120]
        if "but got" in line:
            return line.split("but got", 1)[1].strip()[:120]
    return None


def weights_mismatch(network: torch.nn.Module, weights: dict) -> str:
    """How `weights` do not fit `network` (missing and unexpected keys, or the first wrong shape); '' when they fit.
    Reads names and shapes only, so a model can be refused before any weight is loaded."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        def few(keys):
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        parts = ([f"missing {len(missing)} keys: {few(missing)}"] if missing else []) + \
                ([f"unexpected {len(unexpected)} keys: {few(unexpected)}"] if unexpected else [])
        return "; ".join(parts)
    wrong = [k for k, v in weights.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        return f"{k} has shape {tuple(weights[k].shape)}, expected {tuple(expected[k].shape)}"
    return ""


def load_weights(network: torch.nn.Module, weights: dict, source) -> None:
    """Load weights strictly; a mismatch names the missing and unexpected keys (the usual sign of a wrong trainer)."""
    problem = weights_mismatch(network, weights)
    if problem:
        raise ModelError(f"The weights in {source} do not fit the network its plans describe: {problem}.")
    _refuse_non_finite(weights, source)
    network.load_state_dict(weights)


def _refuse_non_finite(weights: dict, source) -> None:
    """NaN or infinite weights (a training that diverged, a damaged file) make NaN logits, which argmax still
    turns into a plausible-looking label map: refuse them rather than segment silently."""
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ModelError(f"Refusing the weights in {source}: they hold NaN or infinite values ({bad[0]}{more}), "
                         f"the sign of a training that diverged or of a damaged file.")
