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
