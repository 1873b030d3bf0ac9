"""A segmentation running in a worker thread, talking to the main thread only through a queue.

MRML and Qt objects belong to the main thread, so the worker never touches them: it runs the engine on
plain arrays and puts events (progress, result, error) in a `queue.Queue`; the panel drains the queue
from a QTimer on the main thread (`poll`), where it updates widgets and writes the result into the scene.
Cancelling sets a `threading.Event` that the engine checks at every tile, so it stops within one tile and
nothing is written.
"""
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """How a job ended: exactly one of result / error is set, or cancelled."""
    result: Any = None
    error: Optional[BaseException] = None
    details: str = ""          # traceback text of an unexpected error, for the log
    cancelled: bool = False
    seconds: float = 0.0


class SegmentationJob:
    """`work(progress, cancel)` runs in a thread; `poll()` (main thread) delivers its events to the callbacks.

    on_progress(fraction, text) is called with the latest progress only (a burst of tiles between two
    polls shows as one update); on_finished(outcome) is called exactly once.
    """

    def __init__(self, work: Callable, on_progress: Callable[[float, str], None] = None,
                 on_finished: Callable[[Outcome], None] = None):
        self._work = work
        self._on_progress = on_progress
        self._on_finished = on_finished
        self._events: "queue.Queue" = queue.Queue()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="SegmentMBTFE worker", daemon=True)
        self._finished = False
        self._started = 0.0

    # -- main thread ---------------------------------------------------------------------------------------
    def start(self) -> "SegmentationJob":
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelling(self) -> bool:
        return self._cancel.is_set()

    @property
    def finished(self) -> bool:
        """True once on_finished has been delivered by poll()."""
        return self._finished

    def poll(self) -> bool:
        """Deliver queued events; returns True while the job still runs (or has undelivered events)."""
        latest_progress, outcome = None, None
        while True:
            try:
                kind, payload = self._events.get_nowait()
            except queue.Empty:
                break
            if kind == "progress":
                latest_progress = payload
            else:
                outcome = payload
        if latest_progress is not None and self._on_progress and not self._finished:
            self._on_progress(*latest_progress)
        if outcome is not None and not self._finished:
            self._finished = True
            if self._on_finished:
                self._on_finished(outcome)
        return not self._finished

    def wait(self, timeout: float = None, interval: float = 0.05) -> Outcome:
        """Block (polling) until the job ends; for the console and tests."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        captured = []
        callback = self._on_finished
        self._on_finished = lambda outcome: (captured.append(outcome), callback and callback(outcome))
        while self.poll():
            if deadline is not None and time.perf_counter() > deadline:
                raise TimeoutError("the segmentation did not finish in time")
            time.sleep(interval)
        return captured[0] if captured else Outcome()

    # -- worker thread ---------------------------------------------------------------------------------------
    def _run(self):
        from SegmentMBTFELib.errors import Cancelled  # the engine imports torch: only ever in a running job
        outcome = Outcome()
        try:
            outcome.result = self._work(self._report, self._cancel)
            if self._cancel.is_set():  # cancelled after the last check: still write nothing
                outcome = Outcome(cancelled=True)
        except Cancelled:
            outcome = Outcome(cancelled=True)
        except Exception as error:  # noqa: BLE001 - every failure must reach the panel, never vanish in a thread
            outcome = Outcome(error=error, details=traceback.format_exc())
        outcome.seconds = time.perf_counter() - self._started
        self._events.put(("finished", outcome))

    def _report(self, fraction: float, text: str):
        self._events.put(("progress", (fraction, text)))
