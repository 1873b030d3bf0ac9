"""scipy.ndimage.zoom's spline resampling (mode "nearest", grid_mode), the very same numbers, on several cores.

Why: nnU-Net resamples the image with scipy's cubic spline, one core, and preprocessing has to match it bit for
bit; on a 512 x 512 x 300 CT that is 10 s while the other core waits. scipy releases the GIL in its C loops, so
threads can share the work, but zoom() itself takes the whole array. Its two steps split exactly:
- the spline prefilter is one 1D filter per line along each axis; lines along one axis lie whole in either part
  of a split along another axis;
- the interpolation computes each output voxel's source coordinate from its own index alone
  (`(index + shift + 0.5) * zoom - 0.5`), so a slab of output rows is the whole output's with shift = its first
  row (whole numbers in float64, added exactly).
That second step is scipy's private `_nd_image.zoom_shift`, the function zoom() calls; if a scipy release changes
it, `zoom` falls back to scipy.ndimage.zoom, and Testing/test_engine_units.py compares both bit for bit.
"""
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.ndimage

log = logging.getLogger(__name__)

PAD = 12  # what zoom() pads a "nearest" spline with before prefiltering (scipy's _prepad_for_spline_filter)


def zoom(x: np.ndarray, new_shape, order: int, threads: int) -> np.ndarray:
    """scipy.ndimage.zoom(x, new_shape / x.shape, order=order, mode="nearest", grid_mode=True, output=float64)."""
    if tuple(new_shape) == x.shape:  # zoom() returns the input itself then, not its interpolation
        return x.astype(np.float64)
    if threads > 1 and order > 1 and min(x.shape) > 1:
        try:
            return _zoom_in_parts(x, [int(n) for n in new_shape], order, threads)
        except (ImportError, AttributeError, TypeError, RuntimeError) as error:  # scipy's private API moved
            log.info("Resampling on one core (%s).", error)
    factors = [n / o for n, o in zip(new_shape, x.shape)]
    return scipy.ndimage.zoom(x, factors, order=order, mode="nearest", grid_mode=True, output=np.float64)


def _zoom_in_parts(x: np.ndarray, new_shape, order: int, threads: int) -> np.ndarray:
    from scipy.ndimage import _nd_image
    from scipy.ndimage._ni_support import _extend_mode_to_code
    padded = np.pad(x, PAD, mode="edge")
    filtered = np.empty(padded.shape, dtype=np.float64)
    with ThreadPoolExecutor(threads, "resampling") as pool:
        source = padded
        for axis in range(x.ndim):
            across = (axis + 1) % x.ndim
            _in_parts(pool, padded.shape[across], threads, lambda part: scipy.ndimage.spline_filter1d(
                source[_along(across, part)], order, axis, output=filtered[_along(across, part)], mode="nearest"))
            source = filtered
        # the zoom factors exactly as zoom() computes them
        factors = np.divide(np.array(x.shape), np.array(new_shape), out=np.ones(x.ndim, dtype=np.float64),
                            where=np.array(new_shape) != 0)
        out = np.empty(new_shape, dtype=np.float64)
        mode = _extend_mode_to_code("nearest")

        def rows(part: slice):
            shift = np.zeros(x.ndim, dtype=np.float64)
            shift[0] = part.start
            _nd_image.zoom_shift(filtered, factors, shift, out[part], order, mode, 0.0, PAD, True)

        _in_parts(pool, new_shape[0], threads, rows)
    return out


def _along(axis: int, part: slice) -> tuple:
    return (slice(None),) * axis + (part,)


def _in_parts(pool: ThreadPoolExecutor, length: int, parts: int, work) -> None:
    bounds = np.linspace(0, length, min(parts, length) + 1).astype(int)
    for done in [pool.submit(work, slice(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]:
        done.result()
