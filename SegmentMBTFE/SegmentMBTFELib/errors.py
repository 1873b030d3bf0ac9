"""The errors a user can meet, each with one clear sentence.

Every failure that comes from the user's input (files, checkpoints, channels, memory, cancel) is raised
as a `SegmentError` subclass whose message is meant to be shown as it is: in the command line's one
line, in Slicer's message box. Anything else is a bug and keeps its traceback.
"""


class SegmentError(Exception):
    """A problem the user can act on; str(error) is the one-line message to show."""


class ModelError(SegmentError):
    """The model folder or checkpoint is missing, incomplete, corrupt, unsafe or does not fit."""


class InputError(SegmentError):
    """The image(s) given cannot be segmented with this model (format, channels, dimensions, content)."""


class OutOfMemory(SegmentError):
    """Even the most frugal device plan ran out of memory."""


class Cancelled(SegmentError):
    """The user cancelled; nothing was written."""

    def __init__(self, message="Cancelled by the user; nothing was written."):
        super().__init__(message)


class SomeCasesFailed(SegmentError):
    """Segmenting several files (the console's segmentFiles): some cases failed, the others were written.

    `written` lists the files written, `failed` the (case, reason) of each case that was not; the message
    is the reason itself when only one case was given, else the count and every case's reason."""

    def __init__(self, written=(), failed=(), total: int = None):
        self.written = [str(p) for p in written]
        self.failed = [(str(case), str(reason)) for case, reason in failed]
        self.total = len(self.failed) + len(self.written) if total is None else int(total)
        super().__init__(self._text())

    def _text(self) -> str:
        if self.total <= 1 and len(self.failed) == 1:
            return self.failed[0][1]
        reasons = " ".join(f"{case}: {reason.rstrip('.')}." for case, reason in self.failed)
        kept = f"the other {self.total - len(self.failed)} were written" if self.total > len(self.failed) else \
            "none was written"
        return f"{len(self.failed)} of {self.total} cases could not be segmented ({kept}). {reasons}"
