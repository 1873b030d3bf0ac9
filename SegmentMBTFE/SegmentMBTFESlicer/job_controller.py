"""The panel's one job at a time, shared by its Segment and Fine-tune sections.

A section starts its job through the controller, which takes the application-wide busy flag first, so both
sections' buttons are disabled from the click on: while questions are asked (modal dialogs run Qt's event
loop, and a second click must not start a second job), and while the job runs. When Python packages are
missing, the job first is their install (dependencies.py): it reports progress and cancels like any job,
and when it succeeds the section's own job starts, as if the user had clicked then. The controller hands
progress and the outcome back to the section that started the job and tells every section when the busy
state changes, so no section reads another's fields.
"""
import logging
import traceback

from . import dependencies, jobs

log = logging.getLogger(__name__)


class JobController:
    def __init__(self):
        self.job = None          # the running jobs.Job
        self.kind = None         # "segmentation" or "fine-tune" while busy, also before the job exists
        self._listeners = []

    def subscribe(self, listener) -> None:
        """listener() is called whenever busy, job or cancelling changes."""
        self._listeners.append(listener)

    @property
    def busy(self) -> bool:
        return self.kind is not None

    @property
    def installing(self) -> bool:
        """The job is the package install that comes before the section's own job."""
        return self.job is not None and self.job.kind == "install"

    @property
    def cancelling(self) -> bool:
        return self.job is not None and self.job.cancelling

    def start(self, kind: str, begin, on_progress, on_finished):
        """Take the busy flag, install missing packages (a job of its own), then `begin(on_progress, on_finished)`
        prepares (asks) and returns the started jobs.Job, or None when it decided not to run. Raises the busy
        refusal or whatever the install's start or `begin` raised; the flag is free again in those cases."""
        jobs.claim(kind)
        self.kind = kind
        self._changed()
        try:
            self.job = dependencies.start_in_slicer(
                on_progress, lambda outcome: self._installed(outcome, begin, on_progress, on_finished))
            if self.job is None:
                self.job = begin(on_progress, lambda outcome: self._finished(outcome, on_finished))
        except BaseException:
            self._idle()
            raise
        if self.job is None:
            self._idle()
        else:
            self._changed()
        return self.job

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self._changed()

    def _installed(self, outcome, begin, on_progress, on_finished) -> None:
        """The install ended: on success the section's job starts; otherwise the outcome is the section's."""
        self.job = None
        if outcome.cancelled or outcome.error is not None:
            jobs.release()
            self._finished(outcome, on_finished)
            return
        try:
            self.job = begin(on_progress, lambda outcome: self._finished(outcome, on_finished))
        except Exception as error:  # noqa: BLE001 - no caller to raise to: the section shows it like any failure
            self._idle()
            on_finished(jobs.Outcome(error=error, details=traceback.format_exc()))
            return
        if self.job is None:
            self._idle()
        else:
            self._changed()

    def _finished(self, outcome, on_finished) -> None:
        self.job, self.kind = None, None
        try:
            on_finished(outcome)
        finally:
            self._changed()

    def _idle(self) -> None:
        self.job, self.kind = None, None
        jobs.release()
        self._changed()

    def _changed(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:  # noqa: BLE001 - one section's display must not stop the others'
                log.exception("SegmentMBTFE: updating the panel failed")
