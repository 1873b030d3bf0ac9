"""A package install seen from Slicer's main thread: pip (or light-the-torch) in a process of its own.

    job = InstallJob(steps, folder, on_progress, on_finished).start()

Why not Slicer's `slicer.util.pip_install` or the PyTorch extension's `installTorch`: both wait for pip
inside a `readline()` loop on the main thread (`slicer.util.logProcessOutput`), so a multi-gigabyte torch
download freezes Slicer between two lines of pip's output, with no way to cancel; and `installTorch` ends
with `import torch` in Slicer's process, which must never import torch. Nor a Python thread: Slicer's main
thread holds the GIL while Qt idles, so a thread would advance only while Slicer runs Python.

So each step runs in a QProcess started with Slicer's own Python (PythonSlicer, as the engine's worker is):
its output arrives as Qt events on the main thread, where it is logged and shown as the step's progress
(pip gives lines, not fractions: the fraction is -1, "unknown", and the panel shows a busy bar), and the
main thread never waits for it. Cancel closes the process's input: the small program below, which runs
pip, then ends itself and everything it started (its own process group, or taskkill /T on Windows). That
also reaches the real Python behind the PythonSlicer launcher, which killing the launcher would not.
"""
import collections
import logging
import shutil
import time
from typing import Callable, List, Optional, Tuple

import qt

import slicer

from . import jobs
from . import worker_process

log = logging.getLogger(__name__)
KILL_GRACE_MS = 2000   # a process that has not ended this long after Cancel is killed outright
PID_LINE = "SegmentMBTFE-install pid "
# Runs in Slicer's Python as `-c CHILD module arguments...`: it leads a process group of its own (POSIX),
# says its pid, and when its input closes (Cancel, or Slicer gone) ends itself and all it started; then it
# runs the module (pip, light_the_torch) as `python -m module arguments...` would. No double quotes: the
# launcher passes the code on as one more command line, which on Windows quotes with them.
CHILD = r"""
import os, runpy, subprocess, sys, threading
def end_all():
    while os.read(0, 65536):  # not sys.stdin: its lock, held here, would abort the normal exit
        pass
    if os.name == 'nt':
        subprocess.call(['taskkill', '/F', '/T', '/PID', str(os.getpid())],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        os.killpg(os.getpgrp(), 9)
if os.name != 'nt':
    os.setpgrp()
print('%s' + str(os.getpid()), flush=True)
threading.Thread(target=end_all, daemon=True).start()
del sys.argv[0]
runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
""" % PID_LINE

Step = Tuple[str, str, List[str]]   # (what the user reads, e.g. "Installing PyTorch", module, its arguments)


class InstallFailed(Exception):
    """A step's process ended with an error; str() says which step and pip's last words."""


class InstallJob(jobs.Cancellable):
    """The steps, one process after the other; on_progress(-1, text) for each line of output and
    on_finished(jobs.Outcome) exactly once. `folder` (the constraints file) is removed at the end."""
    kind = "install"
    GRACE_MS = KILL_GRACE_MS

    def __init__(self, steps: List[Step], folder: Optional[str] = None,
                 on_progress: Callable[[float, str], None] = None,
                 on_finished: Callable[[jobs.Outcome], None] = None, python: str = None):
        self.steps = list(steps)
        self.folder = folder
        self.python = python or worker_process.worker_python()
        self._on_progress, self._on_finished = on_progress, on_finished
        self.process = self._ended_process = None
        self.pid = None            # the process running pip (behind the launcher, if any)
        self.outcome = None
        self._step = -1
        self._buffer = b""
        self._last_lines = collections.deque(maxlen=20)   # for the message when a step fails
        self._cancel_time = None
        self._started = 0.0

    # -- main thread -----------------------------------------------------------------------------------
    def start(self) -> "InstallJob":
        self._started = time.perf_counter()
        self._next()
        return self

    def wait(self, cancel=None, timeout: float = None) -> jobs.Outcome:
        """Block until the install ends (console calls), keeping Slicer painting; `cancel` (a threading.Event)
        set meanwhile cancels it."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while not self.finished:
            if cancel is not None and cancel.is_set():
                self.cancel()
            if self.process is not None:
                self.process.waitForFinished(50)   # its output and end are handled as they come
            slicer.app.processEvents()
            if deadline is not None and time.perf_counter() > deadline and not self.finished:
                raise TimeoutError("the package install did not finish in time")
        return self.outcome

    # -- the steps ---------------------------------------------------------------------------------------------
    def _next(self) -> None:
        self._step += 1
        if self._step == len(self.steps):
            self._finish(jobs.Outcome())
            return
        title, module, arguments = self.steps[self._step]
        log.info("SegmentMBTFE: %s: %s -m %s %s", title, self.python, module, " ".join(arguments))
        self._progress("starting")
        process = qt.QProcess()
        process.setProgram(self.python)
        process.setArguments(["-c", CHILD, module] + list(arguments))
        process.setProcessChannelMode(qt.QProcess.MergedChannels)  # pip's errors go to stderr
        process.readyReadStandardOutput.connect(lambda: self._read(process))
        process.finished.connect(lambda *args: self._ended(process))
        process.errorOccurred.connect(lambda error: self._failedToStart(process, error))
        self.process, self.pid, self._buffer = process, None, b""
        self._last_lines.clear()
        process.start()

    def _read(self, process) -> None:
        if process is not self.process:
            return
        self._buffer += bytes(process.readAllStandardOutput().data())
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip()
            if line.startswith(PID_LINE):
                self.pid = int(line[len(PID_LINE):])
            elif line.strip():
                log.info("SegmentMBTFE pip: %s", line)
                self._last_lines.append(line.strip())
                self._progress(line.strip())

    def _ended(self, process) -> None:
        if process is not self.process or self.finished:
            return
        self._read(process)
        self.process, self._ended_process = None, process  # kept: deleting a QProcess in its own signal crashes
        if self.cancelling:
            self._finish(jobs.Outcome(cancelled=True))
        elif process.exitStatus() == qt.QProcess.NormalExit and process.exitCode() == 0:
            self._next()
        else:
            self._finish(jobs.Outcome(error=InstallFailed(self._failure(process.exitCode())),
                                      details="\n".join(self._last_lines)))

    def _failedToStart(self, process, error) -> None:
        if error != qt.QProcess.FailedToStart or process is not self.process:
            return
        self.process, self._ended_process = None, process
        failure = InstallFailed(f"{self.steps[self._step][0]} failed: {self.python} could not be started "
                                f"({process.errorString()}).")
        # later, not inside start(): whoever started the install has the job in hand before it ends
        qt.QTimer.singleShot(0, lambda: self._finish(jobs.Outcome(error=failure)))

    def _askToStop(self) -> bool:
        """Cancel ends the running step and what it started (CHILD ends itself when its input closes); a process
        that ignores it is killed after KILL_GRACE_MS."""
        if self.process is None:
            return False
        self.process.closeWriteChannel()
        return True

    def _endUnanswered(self) -> None:
        if self.process is not None and not self.finished:
            log.warning("SegmentMBTFE: the install did not stop within %d ms of Cancel; killing it", KILL_GRACE_MS)
            self.process.kill()

    def _progress(self, text: str) -> None:
        if self._on_progress and not self.cancelling:
            self._on_progress(-1.0, f"{self.steps[self._step][0]}: {text}")

    def _failure(self, code: int) -> str:
        """One sentence: the step, and pip's own reason (its last 'ERROR:' line, else its last line)."""
        errors = [line for line in self._last_lines if line.startswith("ERROR")]
        reason = (errors or list(self._last_lines) or [f"exit code {code}"])[-1]
        return f"{self.steps[self._step][0]} failed: {reason[:300]} (the whole output is in the log)"

    def _finish(self, outcome: jobs.Outcome) -> None:
        if self.finished:
            return
        outcome.seconds = time.perf_counter() - self._started
        self.outcome = outcome
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
        if self._on_finished:
            self._on_finished(outcome)
