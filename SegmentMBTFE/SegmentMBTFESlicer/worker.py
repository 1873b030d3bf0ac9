"""The engine's worker process, seen from Slicer's process: started on first use, kept, restarted when it died.

Slicer's main thread holds Python's GIL while Qt idles, so the engine runs in a process of its own
(SegmentMBTFELib/worker.py), started with Slicer's own Python (`PythonSlicer`), and Slicer's process never
imports torch. The worker stays after a job and keeps its loaded models; it exits after the idle time set
in the application settings (SegmentMBTFE/WorkerIdleMinutes, default 10), when the module is cleaned up,
or when Slicer exits (its input closes), and its GPU memory goes with it.

A QProcess, not `subprocess` plus a reader thread: its output arrives as Qt events on the main thread,
where the panel and the scene live, and a Python thread would only run while the main thread runs Python.
Messages are JSON lines (exchange.py); one the module does not understand is logged, never executed.
"""
import collections
import logging
import os
import shutil
import sys
from pathlib import Path

import qt

from SegmentMBTFELib import exchange

log = logging.getLogger(__name__)
SETTINGS_IDLE = "SegmentMBTFE/WorkerIdleMinutes"
DEFAULT_IDLE_MINUTES = 10.0
ENGINE_DIR = Path(__file__).resolve().parents[1]  # the folder holding SegmentMBTFELib
# `segment-mbtfe worker` with the engine found where the module is, whatever PYTHONPATH the launcher sets
BOOTSTRAP = "import sys; sys.path.insert(0, {engine!r}); from SegmentMBTFELib.cli import main; sys.exit(main())"


def worker_python() -> str:
    """Slicer's own Python (PythonSlicer, next to sys.executable inside Slicer), else this Python."""
    here = Path(sys.executable).parent
    for name in ("PythonSlicer.exe", "PythonSlicer") if os.name == "nt" else ("PythonSlicer",):
        if (here / name).is_file():
            return str(here / name)
    return shutil.which("PythonSlicer") or sys.executable


def idle_seconds() -> float:
    value = qt.QSettings().value(SETTINGS_IDLE, DEFAULT_IDLE_MINUTES)
    try:
        return max(0.01, float(value)) * 60.0
    except (TypeError, ValueError):
        return DEFAULT_IDLE_MINUTES * 60.0


class WorkerProcess:
    """One worker process and the jobs sent to it, by id. Jobs receive their messages through
    job.receive(message) and, when the process dies under them, job.workerDied(text)."""

    def __init__(self, python: str = None):
        self.python = python or worker_python()
        self.process = None
        self.ready = None           # the worker's "ready" message (pid, python, torch version)
        self.exit_reason = ""       # what the worker said when it exited on its own
        self._jobs = {}             # id -> job, waiting for their result
        self._next_id = 1
        self._buffer = b""
        self._stderr = collections.deque(maxlen=40)  # the last lines, for the message when it dies
        self.started = 0            # processes started, for tests and the log

    # -- lifecycle ---------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.process is not None and self.process.state() != qt.QProcess.NotRunning

    def start(self) -> None:
        process = qt.QProcess()
        process.setProgram(self.python)
        process.setArguments(["-c", BOOTSTRAP.format(engine=str(ENGINE_DIR)), "worker",
                              "--idle-timeout", f"{idle_seconds():g}"])
        process.readyReadStandardOutput.connect(self._readOutput)
        process.readyReadStandardError.connect(self._readErrors)
        process.finished.connect(lambda *args: self._finished(process))
        process.errorOccurred.connect(lambda error: self._failedToStart(process, error))
        self.process, self.ready, self.exit_reason, self._buffer = process, None, "", b""
        self._stderr.clear()
        process.start()
        self.started += 1
        log.info("SegmentMBTFE: started the worker (%s)", self.python)

    def stop(self, wait_ms: int = 500) -> None:
        """Ask the worker to exit, give it `wait_ms`, then kill it: never blocks Slicer for long. Its jobs end
        as cancelled (the module is unloading or reloading), not as a crash, however slowly the worker exits."""
        process = self.process
        if process is None:
            return
        for job, _request in list(self._jobs.values()):
            job.cancel()
        if self.running:
            process.write(qt.QByteArray(exchange.encode({"command": "shutdown"})))
            process.closeWriteChannel()
            if not process.waitForFinished(wait_ms):
                process.kill()
                process.waitForFinished(1000)
        self._finished(process)

    def kill(self) -> None:
        """End the worker now (a cancel it did not answer); its jobs end through workerDied."""
        if self.running:
            self.process.kill()
            self.process.waitForFinished(2000)
        if self.process is not None:
            self._finished(self.process)

    # -- jobs ----------------------------------------------------------------------------------------------------
    def submit(self, job, request: dict) -> int:
        """Send a request for `job` (starting the worker when none runs); returns the job's id."""
        if not self.running:
            self.start()
        from SegmentMBTFELib.models.versions import versions_home
        job_id, self._next_id = self._next_id, self._next_id + 1
        self._jobs[job_id] = (job, request)
        # the versions home as this process sees it now, so both processes agree on a model's current version
        self._send({**request, "id": job_id, "home": str(versions_home())})
        return job_id

    def cancel(self, job_id: int) -> None:
        if self.running:
            self._send({"command": "cancel", "id": job_id})

    def forget(self, job_id: int) -> None:
        self._jobs.pop(job_id, None)

    def waitForMessages(self, milliseconds: int) -> None:
        """For blocking calls: wait up to `milliseconds` for output and handle it."""
        if self.running:
            self.process.waitForReadyRead(milliseconds)
            self._readOutput()

    def _send(self, message: dict) -> None:
        self.process.write(qt.QByteArray(exchange.encode(message)))

    # -- what the worker says --------------------------------------------------------------------------
    def _readOutput(self) -> None:
        if self.process is None:
            return
        self._buffer += bytes(self.process.readAllStandardOutput().data())
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self._handle(line)

    def _handle(self, line: bytes) -> None:
        message = exchange.decode(line)
        if message is None:
            log.warning("SegmentMBTFE worker: ignored output that is not a message: %r", line[:200])
            return
        kind = message.get("type")
        if kind == "ready":
            self.ready = message
            if message.get("protocol") != exchange.PROTOCOL:
                log.warning("SegmentMBTFE worker speaks protocol %s, expected %s", message.get("protocol"),
                            exchange.PROTOCOL)
        elif kind == "exit":
            self.exit_reason = str(message.get("reason", ""))
        elif message.get("id") in self._jobs:
            job, _request = self._jobs[message["id"]]
            if kind in ("result", "error", "cancelled"):
                del self._jobs[message["id"]]
            job.receive(message)
        else:
            log.warning("SegmentMBTFE worker: ignored a message the module does not understand: %r", line[:200])

    def _readErrors(self) -> None:
        if self.process is None:
            return
        text = bytes(self.process.readAllStandardError().data()).decode("utf-8", "replace")
        for line in text.splitlines():
            if line.strip():
                self._stderr.append(line)
                log.debug("SegmentMBTFE worker: %s", line)

    def _failedToStart(self, process, error) -> None:
        if error == qt.QProcess.FailedToStart:
            self._finished(process, f"The segmentation worker could not be started with {self.python} "
                                    f"({process.errorString()}).")

    def _finished(self, process, reason: str = "") -> None:
        """The process ended: pending jobs are resent to a new worker when it only went idle, else they fail."""
        if process is not self.process:
            return
        self._readOutput()
        self._readErrors()
        self.process = None
        pending, self._jobs = list(self._jobs.values()), {}
        if not pending:
            return
        if self.exit_reason == "idle" and not reason:  # a request crossed its idle exit: start a new one
            for job, request in pending:
                job.resubmitted(self.submit(job, request))
            return
        text = reason or self._death_text(process)
        for job, _request in pending:
            job.workerDied(text)

    def _death_text(self, process) -> str:
        """One sentence on how the worker ended, and its last error line when it said something."""
        code = process.exitCode()
        if process.exitStatus() == qt.QProcess.CrashExit:
            how = "crashed or was killed (for example by the system for lack of memory)"
        else:
            how = f"exited with code {code}"
        last = next((line.strip() for line in reversed(self._stderr) if line.strip()), "")
        return (f"The segmentation worker process {how}; nothing was written. Try again, or with fewer folds "
                f"or TTA off if memory is short." + (f" Its last message: {last[:300]}" if last else ""))


_shared = None


def shared() -> WorkerProcess:
    """The one worker of this Slicer session (the panel and the console share it and its loaded models)."""
    global _shared
    if _shared is None:
        _shared = WorkerProcess()
    return _shared


def stop_shared(wait_ms: int = 500) -> None:
    if _shared is not None:
        _shared.stop(wait_ms)
