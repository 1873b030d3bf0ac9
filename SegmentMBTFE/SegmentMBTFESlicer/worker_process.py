"""The engine's worker process, seen from Slicer's process: started on first use, kept, restarted when it died.

Slicer's main thread holds Python's GIL while Qt idles, so the engine runs in a process of its own
(SegmentMBTFELib/worker.py), started with Slicer's own Python (`PythonSlicer`), and Slicer's process never
imports torch. The worker stays after a job and keeps its loaded models; it exits after the idle time set
in the application settings (SegmentMBTFE/WorkerIdleMinutes, default 10), when the module is cleaned up,
or when Slicer exits (its input closes), and its GPU memory goes with it.

A QProcess, not `subprocess` plus a reader thread: its output arrives as Qt events on the main thread,
where the panel and the scene live, and a Python thread would only run while the main thread runs Python.
Messages are JSON lines (exchange.py); one the module does not understand is logged, never executed.

The QProcess runs Slicer's launcher, not the worker: PythonSlicer (a CTKAppLauncher) starts `python-real` as
its own child, forwards no signal, and turns a crashing child into exit code 1 after its line "exit abnormally
- Report the problem". So the worker is ended by its own pid (it says it at once), with what it started, and
a crash is recognised by that line as well as by Qt's CrashExit.
"""
import collections
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import qt

from SegmentMBTFELib import exchange
from SegmentMBTFELib.errors import SegmentError

log = logging.getLogger(__name__)
LAUNCHER_CRASH = "exit abnormally - Report the problem"  # ctkAppLauncher.cpp, when its child crashed
END_WAIT_MS = 2000  # for the launcher to see its killed child and exit by itself (it reaps the child)
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


class WorkerUnavailable(SegmentError):
    """The worker process could not be started at all."""


def end_process_tree(pid: int) -> None:
    """Kill the worker `pid` and every process it started, at once (it may be frozen)."""
    if os.name == "nt":
        # Windows has no process groups to signal and keeps no parent links to re-parent: taskkill /T ends the
        # process with this pid and the tree of processes it started, /F without asking them to close first.
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True, timeout=30,
                       creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        return
    try:
        os.killpg(pid, signal.SIGKILL)  # the worker leads its own process group (SegmentMBTFELib/worker.py)
    except ProcessLookupError:  # no such group (a worker that did not make one): the worker alone
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


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
        self.pid = None             # the real worker's pid (behind the launcher), from its first message
        self.exit_reason = ""       # what the worker said when it exited on its own
        self._kill_reason = ""      # why the module killed it, for its jobs
        self._jobs = {}             # id -> job, waiting for their result
        self._next_id = 1
        self._buffer = b""
        self._error_buffer = b""
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
        self.process, self.ready, self.pid, self.exit_reason, self._kill_reason = process, None, None, "", ""
        self._buffer, self._error_buffer = b"", b""
        self._stderr.clear()
        process.start()
        if self.process is not process:  # it failed at once (no program, CreateProcess refused): nothing runs
            raise WorkerUnavailable(self._start_failure(process))
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
            process.write(qt.QByteArray(exchange.encode(exchange.request("shutdown"))))
            process.closeWriteChannel()
            if not process.waitForFinished(wait_ms):
                self._end(process)
        self._finished(process)

    def kill(self, reason: str = "") -> None:
        """End the worker now (a cancel it did not answer, a worker refused); its jobs end through
        workerDied(reason, or how it ended)."""
        self._kill_reason = reason  # _finished may run inside _end, when Qt reports the end while waiting for it
        if self.running:
            self._end(self.process)
        if self.process is not None:
            self._finished(self.process)

    def _end(self, process) -> None:
        """Kill the real worker and what it started, then the launcher in between (killing only the launcher
        would leave the worker running). The pid is used only while the launcher still runs: until then it is
        its child's, alive or not yet reaped, and cannot belong to another process."""
        if self.pid and process.state() != qt.QProcess.NotRunning:
            end_process_tree(self.pid)
            if process.waitForFinished(END_WAIT_MS):  # the launcher reaped the worker and exited (code 1)
                return
        process.closeWriteChannel()  # a worker not yet heard of exits by itself once it reads the end of its input
        process.kill()
        process.waitForFinished(END_WAIT_MS)

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
            self._send(exchange.request("cancel", job_id))

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
        process = self.process
        if process is None:
            return
        self._buffer += bytes(process.readAllStandardOutput().data())
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if self.process is not process:  # refused and ended meanwhile: the rest is not for anyone
                return
            if line.strip():
                self._handle(line)

    def _handle(self, line: bytes) -> None:
        message = exchange.decode(line)
        if message is None:
            log.warning("SegmentMBTFE worker: ignored output that is not a message: %r", line[:200])
            return
        exchange.dispatch(message, {"started": self._greeted, "ready": self._greeted, "exit": self._exited},
                          otherwise=self._toJob)

    def _exited(self, message: dict) -> None:
        self.exit_reason = str(message.get("reason", ""))

    def _toJob(self, message: dict) -> None:
        """A job's message goes to its job; its last (result, error, cancelled) ends the job's place here."""
        if message.get("id") not in self._jobs:
            log.warning("SegmentMBTFE worker: ignored a message the module does not understand: %r",
                        exchange.encode(message)[:200])
            return
        job, _request = self._jobs[message["id"]]
        if message.get("type") in exchange.LAST_REPLIES:
            del self._jobs[message["id"]]
        job.receive(message)

    def _greeted(self, message: dict) -> None:
        """The first messages, "started" (at once) and "ready" (torch imported), name the real worker's pid;
        "ready" its protocol, and a worker speaking another one is refused: its messages could mean another thing."""
        if isinstance(message.get("pid"), int):
            self.pid = message["pid"]
        if message["type"] != "ready":
            return
        self.ready = message
        if message.get("protocol") != exchange.PROTOCOL:
            self.kill(f"The segmentation worker speaks protocol {message.get('protocol')} and this module "
                      f"{exchange.PROTOCOL}, so it was refused: they come from different versions of SegmentMBTFE; "
                      f"restart Slicer, or reinstall the extension if this persists.")

    def _readErrors(self) -> None:
        """The worker's stderr: its log records of WARNING and above are logged again at their level, the rest
        (library noise, tracebacks) at debug level; the last lines are kept for the message when it dies."""
        if self.process is None:
            return
        self._error_buffer += bytes(self.process.readAllStandardError().data())
        *lines, self._error_buffer = self._error_buffer.split(b"\n")
        self._logErrors(lines)

    def _logErrors(self, lines) -> None:
        for line in (raw.decode("utf-8", "replace").rstrip() for raw in lines):
            if not line.strip():
                continue
            level, text = exchange.log_record(line) or ("DEBUG", line)
            self._stderr.append(text)
            level = logging.getLevelName(level)
            log.log(level if level >= logging.WARNING else logging.DEBUG, "SegmentMBTFE worker: %s", text)

    def _failedToStart(self, process, error) -> None:
        if error == qt.QProcess.FailedToStart:
            self._finished(process, self._start_failure(process))

    def _start_failure(self, process) -> str:
        return f"The segmentation worker could not be started with {self.python or '(no program)'} " \
               f"({process.errorString()})."

    def _finished(self, process, reason: str = "") -> None:
        """The process ended: pending jobs are resent to a new worker when it only went idle, else they fail."""
        if process is not self.process:
            return
        self._readOutput()
        self._readErrors()
        self._logErrors([self._error_buffer])  # a last line without its line break
        self._error_buffer = b""
        self.process = None
        pending, self._jobs = list(self._jobs.values()), {}
        reason = reason or self._kill_reason
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
        last = next((line.strip() for line in reversed(self._stderr)
                     if line.strip() and LAUNCHER_CRASH not in line), "")
        if self._crashed(process):
            text = ("The segmentation worker process crashed or was killed (for example by the system for lack of "
                    "memory); nothing was written. Try again, or with fewer folds or TTA off if memory is short.")
        else:
            text = f"The segmentation worker process exited with code {process.exitCode()}; nothing was written."
        return text + (f" Its last message: {last[:300]}" if last else "")

    def _crashed(self, process) -> bool:
        """Killed by a signal: Qt says so when it started the worker itself; behind Slicer's launcher, the exit
        is a normal one with code 1, after the launcher's own "exit abnormally" line."""
        if process.exitStatus() == qt.QProcess.CrashExit:
            return True
        return process.exitCode() == 1 and any(LAUNCHER_CRASH in line for line in self._stderr)


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
