"""Progress reporting and cancellation shared by prediction and fine-tuning.

A `Progress` turns the work's structure (stages, tiles, folds) into one fraction for a progress bar and
checks the cancel flag each time it reports, so every reporting point is also a cancel point.
"""
from typing import Callable, Optional

from .errors import Cancelled

# Callback signature: (fraction done in [0, 1], stage text such as "fold 1/2: tile 3 of 27").
ProgressCallback = Callable[[float, str], None]


class Progress:
    """Reports a fraction of the whole run and raises `Cancelled` once `cancel` is set.

    `cancel` is anything with `is_set()` (a `threading.Event`), so the Slicer panel, the command line and
    tests can all stop a run from another thread.
    """

    def __init__(self, callback: Optional[ProgressCallback] = None, cancel=None):
        self._callback = callback
        self._cancel = cancel
        self._start, self._span = 0.0, 1.0

    def check_cancel(self):
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled()

    def report(self, fraction: float, stage: str):
        """Report progress within the current span (fraction 0..1 of the span)."""
        self.check_cancel()
        if self._callback is not None:
            self._callback(min(1.0, self._start + self._span * fraction), stage)

    def span(self, start: float, end: float) -> "Progress":
        """A child reporter that maps its own 0..1 onto [start, end] of this one."""
        child = Progress(self._callback, self._cancel)
        child._start = self._start + self._span * start
        child._span = self._span * (end - start)
        return child
