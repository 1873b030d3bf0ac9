"""What the panel shows, as plain functions of its state (so they read the same in PythonQt and PySide6)."""
import logging
import re
from typing import List, Optional, Sequence, Tuple

from .catalog import ModelInfo

log = logging.getLogger(__name__)


def segment_button_state(model: Optional[ModelInfo], inputs: Sequence, running: bool,
                         folds_problem: str = "") -> Tuple[bool, str]:
    """(enabled, tooltip) of the Segment button: the tooltip says what is missing when it is disabled."""
    unavailable = _model_unavailable(model, running, "Choose a model (or add a model folder).")
    if unavailable:
        return False, unavailable
    missing = [channel for channel, node in zip(model.channels, inputs) if node is None]
    if missing or len(inputs) < len(model.channels):
        return False, "Choose the input volume for: " + ", ".join(missing or model.channels[len(inputs):]) + "."
    if folds_problem:
        return False, folds_problem
    return True, f"Segment {', '.join(model.labels)} with {model.name}."


def finetune_button_state(model: Optional[ModelInfo], segmentation_node, volumes: Sequence, running: bool,
                          problem: str = "") -> Tuple[bool, str]:
    """(enabled, tooltip) of the Fine-tune button: the tooltip says what is missing when it is disabled."""
    unavailable = _model_unavailable(model, running, "Choose a model (or add a model folder) above.")
    if unavailable:
        return False, unavailable
    if segmentation_node is None:
        return False, "Choose the corrected segmentation."
    if not volumes or any(v is None for v in volumes):
        return False, ("Choose the volume the segmentation was drawn on." if len(model.channels) < 2 else
                       "Choose the input volume for every channel above.")
    if problem:
        return False, problem
    return True, (f"Fine-tune {model.name} on {segmentation_node.GetName()}: a new version is written, "
                  "the original stays as it is.")


def _model_unavailable(model: Optional[ModelInfo], running: bool, choose_model: str) -> str:
    """Why neither button can start now (a job running, no model, an unusable one), or ''."""
    if running:
        return "A segmentation or fine-tune is running: wait for it, or press Cancel."
    if model is None:
        return choose_model
    return model.problem or ""


def parse_folds(text: str, available: Sequence[str]) -> Tuple[Optional[List[str]], str]:
    """('0, 2' or '' for all) -> (folds or None for all, problem text or '')."""
    wanted = [f for f in re.split(r"[\s,;]+", text or "") if f]
    if not wanted:
        return None, ""
    unknown = [f for f in wanted if f not in available]
    if unknown:
        return None, f"Fold {', '.join(unknown)} is not trained in this model (has: {', '.join(available)})."
    return wanted, ""


def progress_text(fraction: float, stage: str, doing: str = "Segmenting") -> str:
    """'Segmenting: tile 3 of 27 (45%)', 'Fine-tuning: iteration 3/5, loss 0.412, about 4 s left (60%)'; a stage
    without a fraction (a package install's) as it is."""
    if fraction < 0:
        return stage
    return f"{doing}: {stage} ({int(round(100 * fraction))}%)" if stage else f"{doing} ({int(100 * fraction)}%)"


def show_fraction(bar, fraction: float) -> None:
    """A progress bar at `fraction`, or busy (Qt's moving bar) when the fraction is unknown (below 0)."""
    bar.setRange(0, 0 if fraction < 0 else 100)
    if fraction >= 0:
        bar.setValue(int(round(100 * fraction)))


def guess_volume(channel: str, names: Sequence[str], index: int) -> Optional[int]:
    """Which of the scene's volumes (by name) most likely is this channel: one whose name contains the
    channel name ('T2' in 'case1_T2'); for the first channel, failing that, the first volume."""
    token = channel.strip().lower()
    for i, name in enumerate(names):
        if token and re.search(rf"(^|[^a-z0-9]){re.escape(token)}($|[^a-z0-9])", name.lower()):
            return i
    return 0 if index == 0 and names else None


def error_text(error: BaseException) -> str:
    """The user's message for an error: the engine's errors and DependencyError say it themselves; anything
    else is a bug, shown by its type and first line (the traceback is in the log)."""
    from SegmentMBTFELib.errors import SegmentError
    from .dependencies import DependencyError
    from .jobs import EngineBug
    text = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, (SegmentError, DependencyError)):
        return text
    kind = error.kind if isinstance(error, EngineBug) else type(error).__name__
    return f"Unexpected error ({kind}): {text}. See the log for details."


def show_error(error: BaseException, details: str = "", title: str = "Segmentation failed") -> None:
    """A message box with one line saying what went wrong; the details go to the log."""
    import slicer
    message = error_text(error)
    log.error(f"SegmentMBTFE: {message}\n{details}" if details else f"SegmentMBTFE: {message}")
    slicer.util.errorDisplay(message, windowTitle=title, detailedText=details)
