"""numpy arrays <-> torch tensors, sharing memory, also where torch has no numpy bridge.

torch 2.2.2 is the newest torch for macOS x86_64, which is what Slicer's macOS releases run, and it was built
against numpy 1: beside numpy 2 (Slicer 5.10) its compiled bridge is off and `torch.from_numpy`, `.numpy()`
and `torch.as_tensor(array)` raise "Numpy is not available". Two interfaces that need no compiled bridge do
the same job without a copy: torch reads an array through Python's buffer protocol (`torch.frombuffer`) and
numpy reads a tensor's memory through its array interface (`__array_interface__`). Where the bridge works,
it is used as it is. The engine converts only through these two functions (a test checks that).
"""
import numpy as np
import torch


def _bridge_works() -> bool:
    try:
        return bool(torch.from_numpy(np.zeros(1, np.float32)).numpy()[0] == 0)
    except (RuntimeError, TypeError, ValueError):
        return False


BRIDGE = _bridge_works()
# numpy's dtype for each torch dtype that both have (the ones from_numpy and .numpy() accept)
_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
                 torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64,
                 torch.uint8: np.uint8, torch.bool: np.bool_, torch.complex64: np.complex64,
                 torch.complex128: np.complex128}
_TORCH_DTYPES = {np.dtype(n): t for t, n in _NUMPY_DTYPES.items()}


def to_tensor(array: np.ndarray, use_bridge: bool = None) -> torch.Tensor:
    """The array as a CPU tensor on the same memory, as torch.from_numpy gives it (a non-contiguous array
    is copied once when the bridge is off)."""
    if BRIDGE if use_bridge is None else use_bridge:
        return torch.from_numpy(array)
    dtype = _TORCH_DTYPES.get(array.dtype)
    if dtype is None or not array.dtype.isnative:
        raise TypeError(f"can't convert an array of type {array.dtype} to a tensor")
    array = np.ascontiguousarray(array)
    if array.size == 0:
        return torch.empty(array.shape, dtype=dtype)
    # frombuffer keeps the array alive for as long as the tensor lives; a read-only array warns as from_numpy does
    return torch.frombuffer(array, dtype=dtype).view(array.shape)


def to_numpy(tensor: torch.Tensor, use_bridge: bool = None) -> np.ndarray:
    """The tensor as an array on the same memory (moved to the CPU first if needed), as tensor.numpy() gives it."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if BRIDGE if use_bridge is None else use_bridge:
        return tensor.numpy()
    dtype = _NUMPY_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise TypeError(f"Got unsupported ScalarType {tensor.dtype}")
    if tensor.numel() == 0:
        return np.empty(tuple(tensor.shape), dtype)
    return np.asarray(_ArrayView(tensor, np.dtype(dtype)))


class _ArrayView:
    """A tensor's memory as numpy's array interface describes it; the array made from it keeps this object,
    and so the tensor, alive."""

    def __init__(self, tensor: torch.Tensor, dtype: np.dtype):
        self.tensor = tensor
        self.__array_interface__ = {
            "version": 3, "shape": tuple(tensor.shape), "typestr": dtype.str,
            "data": (tensor.data_ptr(), False),
            "strides": tuple(step * tensor.element_size() for step in tensor.stride())}
