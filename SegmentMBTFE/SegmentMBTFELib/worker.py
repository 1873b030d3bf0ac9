"""The worker process: all engine work the Slicer module asks for, in a process of its own.

Why a process: Slicer runs PythonQt without thread support, so its main thread holds Python's GIL while Qt
idles and a Python thread in Slicer's process advances only when the main thread happens to run Python
(inference there ran 9-15x slower than from a terminal). SlicerNNUnet, SlicerMONAIAuto3DSeg and
SlicerTotalSegmentator start a new process for every run; this one stays: it keeps the models it loaded,
so a second Segment starts at once, and it exits after an idle time, when asked, or when its input closes
(Slicer exited or died). Torch is imported here, never in Slicer's process.

Started by the module as `<PythonSlicer> -c "...main()" worker [--idle-timeout SECONDS]`: `segment-mbtfe worker`
with the engine found beside the module (`python -m SegmentMBTFELib worker` is the same from a terminal).

Requests, one JSON object per line on stdin (arrays are files in the job's folder: see exchange.py):
  {"id": 3, "command": "segment", "folder": DIR, "model": PATH, "inputs": [VOLUME, ...], "options": {...}}
  {"id": 4, "command": "segment_files", "model": PATH, "cases": [[PATH, ...], ...], "output_dir": DIR,
   "format": "seg.nrrd" | "dicom-seg" | ".nii.gz" ..., "options": {...}}
  {"id": 5, "command": "finetune", "folder": DIR, "model": PATH, "cases": [CASE, ...], "settings": {...}}
  Every job request also names "home", the versions home of the module's process (SEGMENTMBTFE_HOME).
  {"command": "cancel", "id": 3}     stop that job at its next cancel point (network pass, export class, iteration)
  {"command": "shutdown"}             cancel what runs, then exit
Replies, one JSON object per line on stdout (nothing else is written there: prints go to stderr):
  {"type": "started", "pid": ...}      at once, before torch is imported: the pid the module ends it by
  {"type": "ready", "protocol": 1, "pid": ..., "python": ..., "torch": ...}
  {"id": 3, "type": "progress", "fraction": 0.42, "stage": "tile 3 of 27", "tile": 3, "tiles": 27}
  {"id": 3, "type": "fallback", "message": "GPU memory ran out; retrying ..."}
  {"id": 3, "type": "result", ...}     what the command made (see the _segment, ... functions; segment_files
                                       lists the cases that failed, with their reasons, beside the files written)
  {"id": 3, "type": "error", "class": "ModelError", "message": "one sentence"[, "details": traceback]}
  {"id": 3, "type": "cancelled"}
  {"type": "exit", "reason": "idle" | "shutdown" | "input closed"}   before every exit of its own
Log records of WARNING and above go to stderr as exchange.LOG_FORMAT lines, which the module logs again.

The worker leads a process group (a session) of its own: between the module and the worker sits Slicer's
launcher, which forwards no signal, so the module ends the worker, and whatever it started, by its group.
A worker the module does not hear from any more ends itself: its input closes when Slicer exits or dies.
"""
import logging
import os
import queue
import re
import signal
import sys
import threading
import time
import traceback

from . import exchange
from .errors import Cancelled, SegmentError
from .requirements import import_torch_quietly

log = logging.getLogger("SegmentMBTFE.worker")
DEFAULT_IDLE_TIMEOUT = 600.0   # seconds; the module's setting overrides it
PROGRESS_INTERVAL = 0.05       # at most 20 progress messages a second: the module's display needs no more
TILE = re.compile(r"tile (\d+) of (\d+)")
DIGITS = re.compile(r"\d+")


def main(idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
    """Serve until idle, asked to stop, or the input closes; then exit the process (never returns)."""
    _lead_own_process_group()
    # The protocol owns the real stdout; anything else printed (by us, torch or a library) goes to stderr.
    output = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C in Slicer's terminal is Slicer's, not ours
    # force: the command line already configured logging for itself (errors only), which would hide warnings
    logging.basicConfig(level=logging.WARNING, format=exchange.LOG_FORMAT, stream=sys.stderr, force=True)
    worker = Worker(output, idle_timeout)
    worker.send(exchange.reply("started", pid=os.getpid()))
    threading.Thread(target=worker.read_requests, args=(sys.stdin.buffer,), name="requests", daemon=True).start()
    worker.serve()
    _exit_at_once(0)


def _lead_own_process_group() -> None:
    """A session (and process group) of its own, whose id is the worker's pid: the module ends the worker and
    everything it started with os.killpg. (On Windows the module ends the process tree with taskkill /T.)"""
    if hasattr(os, "setsid"):
        try:
            os.setsid()
        except OSError:  # already a group leader (a shell started it as a job of its own): that group is its own
            pass


def _exit_at_once(code: int) -> None:
    """Exit without the interpreter's shutdown, once what was written is flushed. Shutdown would meet the request
    reader, a daemon thread blocked reading stdin with the buffer's lock held, and abort ("Fatal Python error:
    _enter_buffered_busy", exit -6) on Python 3.9 to 3.13 alike; no reader can be woken portably (closing or
    interrupting a blocking read is not). Nothing here needs the shutdown: the last message is sent (unbuffered),
    the job folders are the module's, and torch's threads and GPU memory go with the process."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(code)


class Worker:
    def __init__(self, output, idle_timeout: float = DEFAULT_IDLE_TIMEOUT):
        from .inference.loading import ModelCache
        self._output = output
        self._write = threading.Lock()
        self._requests = queue.Queue()
        self._state = threading.Lock()  # guards the running job's id and the cancel requests
        self._running = None
        self._cancel = threading.Event()
        self._cancelled_ids = set()      # cancelled before they started
        self.idle_timeout = idle_timeout
        self.models = ModelCache()

    # -- messages ---------------------------------------------------------------------------------------
    def send(self, message: dict) -> None:
        with self._write:
            self._output.write(exchange.encode(message))

    def read_requests(self, stream) -> None:
        """Reader thread: queue the jobs; cancel and shutdown act at once, even while a job runs."""
        for line in stream:
            request = exchange.decode(line)
            if request is None:
                log.warning("ignored a line that is not a JSON object: %r", line[:200])
                continue
            at_once = {"cancel": self._cancel_job, "shutdown": self._shutdown}  # the rest wait in the queue
            if exchange.dispatch(request, at_once, otherwise=self._requests.put) == "stopped":
                return
        self._stop("input closed")  # Slicer exited or died: nobody is waiting for results

    def _shutdown(self, request: dict) -> str:
        self._stop("shutdown")
        return "stopped"

    def _cancel_job(self, request: dict) -> None:
        job_id = request.get("id")
        with self._state:
            if job_id is None or job_id == self._running:
                self._cancel.set()
            else:
                self._cancelled_ids.add(job_id)

    def _stop(self, reason: str) -> None:
        self._cancel.set()
        self._requests.put(reason)

    # -- jobs -------------------------------------------------------------------------------------------------
    def serve(self) -> None:
        import_torch_quietly()  # now, so the first job does not wait for it
        import torch
        self.send(exchange.reply("ready", protocol=exchange.PROTOCOL, pid=os.getpid(), python=sys.executable,
                                 torch=torch.__version__))
        while True:
            try:
                request = self._requests.get(timeout=self.idle_timeout)
            except queue.Empty:
                self.send(exchange.reply("exit", reason="idle"))
                return
            if isinstance(request, str):
                self.send(exchange.reply("exit", reason=request))
                return
            self.run(request)

    def run(self, request: dict) -> None:
        job_id = request.get("id")
        handler = COMMANDS.get(request.get("command"))
        with self._state:
            self._running = job_id
            self._cancel.clear()
            if job_id in self._cancelled_ids:
                self._cancelled_ids.discard(job_id)
                self._cancel.set()
        if request.get("home"):  # model versions live where the module looks for them
            os.environ["SEGMENTMBTFE_HOME"] = str(request["home"])
        try:
            if handler is None:
                raise SegmentError(f"The worker does not know the command {request.get('command')!r}.")
            result = handler(self, request, Reporter(self, job_id), self._cancel)
            if self._cancel.is_set():
                raise Cancelled()
            self.send(exchange.reply("result", job_id, **result))
        except Cancelled:
            self.send(exchange.reply("cancelled", job_id))
        except SegmentError as error:
            self.send(exchange.error_reply(job_id, error))
        except Exception as error:  # noqa: BLE001 - a bug: its class, message and traceback go to the module
            self.send(exchange.error_reply(job_id, error, traceback.format_exc()))
        finally:
            with self._state:
                self._running = None


class Reporter:
    """The engine's progress callback: progress messages and fallbacks, as they happen. Within one stage
    ("tile 3 of 27", "tile 4 of 27"...) at most one message per PROGRESS_INTERVAL; a new stage always."""

    def __init__(self, worker: Worker, job_id):
        self.worker, self.job_id = worker, job_id
        self._last, self._last_stage = 0.0, None

    def __call__(self, fraction: float, stage: str) -> None:
        from .inference.devices import FALLBACK_MESSAGES
        if stage in FALLBACK_MESSAGES:
            self.worker.send(exchange.reply("fallback", self.job_id, message=stage))
        now, kind = time.monotonic(), DIGITS.sub("#", stage)
        if now - self._last < PROGRESS_INTERVAL and fraction < 1.0 and kind == self._last_stage:
            return
        self._last, self._last_stage = now, kind
        tile = TILE.search(stage)
        tiles = {"tile": int(tile.group(1)), "tiles": int(tile.group(2))} if tile else {}
        self.worker.send(exchange.reply("progress", self.job_id, fraction=round(float(fraction), 4), stage=stage,
                                        **tiles))


# ------------------------------------------------------------------------------------------------ commands

def _segment(worker: Worker, request: dict, progress, cancel) -> dict:
    """One case from volume files: the label map comes back as a file, segments and provenance as JSON."""
    from .tasks import open_model, predict
    folder, options = request["folder"], request.get("options") or {}
    volumes = [exchange.volume_from_message(folder, v) for v in request["inputs"]]
    progress(0.0, "loading the model")
    model, version = open_model(request["model"], options.get("version"), options.get("configuration"),
                                options.get("folds"), options.get("checkpoint", "final"), cache=worker.models)
    prediction = predict(model, version, volumes, options.get("device", "auto"), options.get("step_size", 0.5),
                         options.get("tta", True), progress=progress, cancel=cancel,
                         uncertainty=bool(options.get("uncertainty")), backend=options.get("backend", "torch"))
    result = {"labels": exchange.write_array(folder, "labels", prediction.labels.array),
              "segments": [[int(value), str(name)] for value, name in prediction.segments],
              "settings": prediction.settings, "messages": prediction.messages,
              "model_cached": worker.models.last_was_cached}
    if prediction.uncertainty:
        from .inference.uncertainty import WRITTEN_MAPS, segment_statistics
        result["uncertainty"] = {name: exchange.write_array(folder, name, prediction.uncertainty[name].array)
                                 for name in WRITTEN_MAPS if name in prediction.uncertainty}
        result["statistics"] = segment_statistics(prediction)
    return result


def _segment_files(worker: Worker, request: dict, progress, cancel) -> dict:
    """Files to files; the cases that failed come back in "failed" ([case, reason] each) beside the others."""
    from .errors import SomeCasesFailed
    from .tasks import open_model, segment_files
    options = request.get("options") or {}
    progress(0.0, "loading the model")
    model, version = open_model(request["model"], options.get("version"), options.get("configuration"),
                                options.get("folds"), options.get("checkpoint", "final"), cache=worker.models)
    messages, failed = [], []
    try:
        written = segment_files(model, version, request["cases"], request["output_dir"],
                                options.get("device", "auto"), options.get("step_size", 0.5), options.get("tta", True),
                                progress, cancel, request.get("format") or "seg.nrrd", messages,
                                options.get("backend", "torch"))
    except SomeCasesFailed as error:  # the module raises it again, with the same written files and reasons
        written, failed = error.written, error.failed
    return {"written": [str(path) for path in written], "failed": [list(f) for f in failed],
            "cases": len(request["cases"]), "messages": messages}


def _finetune(worker: Worker, request: dict, progress, cancel) -> dict:
    """A new version (not made current: the module does that once it knows nobody cancelled meanwhile)."""
    from dataclasses import fields
    from .tasks import open_model, finetune_version
    from .training.finetune import FinetuneSettings
    from .volume import CorrectedCase
    folder, started = request["folder"], time.perf_counter()
    known = {f.name for f in fields(FinetuneSettings)}
    settings = FinetuneSettings(**{k: v for k, v in (request.get("settings") or {}).items() if k in known})
    cases = [CorrectedCase(str(case["name"]), [exchange.volume_from_message(folder, v) for v in case["images"]],
                           exchange.volume_from_message(folder, case["labels"])) for case in request["cases"]]
    progress(0.0, "loading the model")
    model, parent = open_model(request["model"], cache=worker.models)
    version, result = finetune_version(model, request["model"], cases, (), settings, progress, cancel,
                                       make_current=False, started=started)
    return {"version": version.id, "version_path": str(version.path), "parent": parent.id,
            **exchange.FinetuneSummary.of(result).message()}


COMMANDS = {"segment": _segment, "segment_files": _segment_files, "finetune": _finetune}
