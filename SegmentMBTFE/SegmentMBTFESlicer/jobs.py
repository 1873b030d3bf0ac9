"""A job: one request to the worker process, seen from Slicer's main thread, and the application-wide busy flag.

    job = Job(kind, request, folder, settle, on_progress, on_finished).start()

The job owns a private folder where its input volumes were written (exchange.py) and where the worker
writes results; the folder is removed when the job ends, however it ends. Messages from the worker arrive
as Qt events on the main thread (worker_process.py): progress goes to on_progress(fraction, text); a result is
handed to settle(message, folder), which turns it into the job's result on the main thread (for Segment:
segments written into the scene) unless the job was cancelled meanwhile (then discard(message) takes back
what the worker made, e.g. a fine-tuned version); on_finished(outcome) is called
exactly once. Cancel asks the worker to stop (it does at its next cancel point: README, The worker process); a worker
that does not answer within 2 s is killed. Either way nothing is settled, so nothing reaches the scene.
"""
import logging
import shutil
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import qt

import slicer

from SegmentMBTFELib import errors, exchange

from . import worker_process

log = logging.getLogger(__name__)
CANCEL_GRACE_MS = 2000   # a worker that has not stopped this long after Cancel is killed
_busy = {"task": None}   # the application-wide "a model runs" flag: one job at a time (one GPU, two cores...)


@dataclass
class Outcome:
    """How a job ended: exactly one of result / error is set, or cancelled."""
    result: Any = None
    error: Optional[BaseException] = None
    details: str = ""          # traceback text of an unexpected error, for the log
    cancelled: bool = False
    seconds: float = 0.0
    messages: List[str] = field(default_factory=list)   # fallbacks the worker took (GPU out of memory, ...)


class Busy(errors.SegmentError):
    """Another segmentation or fine-tune runs: only one at a time in the application."""


class WorkerDied(errors.SegmentError):
    """The worker process ended in the middle of a job (crash, killed for memory)."""


class EngineBug(Exception):
    """An unexpected error inside the worker: its class name, message and traceback, as the worker sent them."""

    def __init__(self, kind: str, message: str, details: str = ""):
        super().__init__(message)
        self.kind, self.details = kind, details


# ------------------------------------------------------------------------------------- the busy flag

def claim(task: str = "segmentation") -> None:
    """Take the application-wide flag (task: "segmentation" or "fine-tune"); refuse when it is taken."""
    if _busy["task"] is not None:
        raise Busy(busy_message())
    _busy["task"] = task


def release() -> None:
    _busy["task"] = None


def is_running() -> bool:
    return _busy["task"] is not None


def busy_message() -> str:
    return f"A {_busy['task'] or 'segmentation'} is already running; wait for it to finish or cancel it first."


def error_from(message: dict) -> BaseException:
    """The exception a worker's error message stands for: the engine's own error classes for the user's
    problems (one sentence), EngineBug for anything else."""
    kind, text = str(message.get("class", "Exception")), str(message.get("message", ""))
    known = getattr(errors, kind, None)
    if isinstance(known, type) and issubclass(known, errors.SegmentError):
        return known(text)
    return EngineBug(kind, text, str(message.get("details", "")))


# ------------------------------------------------------------------------------------------------- the job

class Cancellable:
    """What the panel's long jobs share (Job here, installer.InstallJob): an outcome once finished, and a Cancel
    that asks the work to stop (_askToStop) and, GRACE_MS later, ends what has not stopped (_endUnanswered)."""
    GRACE_MS = CANCEL_GRACE_MS
    outcome = None
    _cancel_time = None

    def cancel(self) -> None:
        if self.finished or self.cancelling:
            return
        self._cancel_time = time.perf_counter()
        if self._askToStop():
            qt.QTimer.singleShot(self.GRACE_MS, self._endUnanswered)

    @property
    def cancelling(self) -> bool:
        return self._cancel_time is not None

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def _askToStop(self) -> bool:
        """Ask the work to stop; False when nothing runs that could ignore it."""
        raise NotImplementedError

    def _endUnanswered(self) -> None:
        raise NotImplementedError


class Job(Cancellable):
    def __init__(self, kind: str, request: dict, folder: Optional[str] = None,
                 settle: Callable[[dict, str], Any] = None, on_progress: Callable[[float, str], None] = None,
                 on_finished: Callable[[Outcome], None] = None, worker: worker_process.WorkerProcess = None,
                 claimed: bool = True, discard: Callable[[dict], None] = None):
        self.kind = kind
        self.request = request
        self.folder = folder
        self._settle = settle
        self._on_progress = on_progress
        self._on_finished = on_finished
        self._discard = discard     # undoes a result that arrives after Cancel (a version written meanwhile)
        self.worker = worker or worker_process.shared()
        self._claimed = claimed     # release the busy flag when done
        self.id = None
        self.outcome = None
        self.reply = None           # the worker's result message, as it came
        self.messages = []
        self._cancel_time = None
        self._started = 0.0

    # -- main thread -----------------------------------------------------------------------------------
    def start(self) -> "Job":
        self._started = time.perf_counter()
        try:
            self.id = self.worker.submit(self, self.request)
        except BaseException:
            self._cleanup()
            raise
        return self

    def poll(self) -> bool:
        """Handle what the worker sent so far; True while the job runs (its events also arrive by themselves)."""
        self.worker.waitForMessages(0)
        return not self.finished

    def wait(self, cancel=None, timeout: float = None) -> Outcome:
        """Block until the job ends (console calls), keeping Slicer painting; `cancel` (a threading.Event)
        set meanwhile cancels it."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while not self.finished:
            if cancel is not None and cancel.is_set():
                self.cancel()
            self.worker.waitForMessages(50)
            slicer.app.processEvents()
            if self.cancelling and time.perf_counter() - self._cancel_time >= CANCEL_GRACE_MS / 1000.0:
                self._endUnanswered()
            if deadline is not None and time.perf_counter() > deadline and not self.finished:
                raise TimeoutError(f"the {self.kind} did not finish in time")
        return self.outcome

    # -- from the worker (main thread, through worker_process.py) --------------------------------------------------
    def receive(self, message: dict) -> None:
        exchange.dispatch(message, {"progress": self._progressed, "fallback": self._fellBack,
                                    "cancelled": lambda _message: self._finish(Outcome(cancelled=True)),
                                    "error": self._failed, "result": self._succeeded})

    def _progressed(self, message: dict) -> None:
        if self._on_progress and not self.cancelling:
            self._on_progress(float(message.get("fraction", 0.0)), str(message.get("stage", "")))

    def _fellBack(self, message: dict) -> None:
        self.messages.append(str(message.get("message", "")))
        log.warning("SegmentMBTFE: %s", message.get("message"))

    def _failed(self, message: dict) -> None:
        error = error_from(message)
        self._finish(Outcome(error=error, details=getattr(error, "details", "")))

    def _succeeded(self, message: dict) -> None:
        self.reply = message
        self._finish(self._settled(message))

    def workerDied(self, text: str) -> None:
        self._finish(Outcome(cancelled=True) if self.cancelling else Outcome(error=WorkerDied(text)))

    def resubmitted(self, job_id: int) -> None:
        self.id = job_id

    # -- internals ---------------------------------------------------------------------------------------------
    def _settled(self, message: dict) -> Outcome:
        if self.cancelling:  # the result crossed the cancel: write nothing, undo what the worker made
            if self._discard:
                try:
                    self._discard(message)
                except Exception:  # noqa: BLE001 - logged; the job still ends as cancelled
                    log.exception("SegmentMBTFE: could not take back the result of a cancelled %s", self.kind)
            return Outcome(cancelled=True)
        try:
            return Outcome(result=self._settle(message, self.folder) if self._settle else message)
        except errors.Cancelled:
            return Outcome(cancelled=True)
        except Exception as error:  # noqa: BLE001 - reported through the outcome like any other failure
            return Outcome(error=error, details=traceback.format_exc())

    def _askToStop(self) -> bool:
        self.worker.cancel(self.id)
        return True

    def _endUnanswered(self) -> None:
        """CANCEL_GRACE_MS after Cancel: a worker still busy with this job is killed (it ends as cancelled)."""
        if self.finished:
            return
        log.warning("SegmentMBTFE: the worker did not stop within %d ms of Cancel; ending it", CANCEL_GRACE_MS)
        self.worker.kill()
        if not self.finished:  # the worker had already forgotten the job
            self._finish(Outcome(cancelled=True))

    def _finish(self, outcome: Outcome) -> None:
        if self.finished:
            return
        outcome.seconds = time.perf_counter() - self._started
        outcome.messages = list(self.messages)
        self.outcome = outcome
        self.worker.forget(self.id)
        self._cleanup()
        if self._on_finished:
            self._on_finished(outcome)

    def _cleanup(self) -> None:
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
        if self._claimed:
            self._claimed = False
            release()
