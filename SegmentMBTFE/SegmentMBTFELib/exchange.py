"""What crosses between the Slicer module and its worker process: arrays as files, everything else as JSON.

The module (Slicer's process) and the worker (`segment-mbtfe worker`, see worker.py) share one private job
folder per request. Arrays travel as `.npy` files, numpy's own format of raw numbers, read back with
`allow_pickle=False` so that a file can never carry an object to unpickle; geometry, options and results
travel as JSON. Messages are JSON objects, one per line. This module is the one place both sides agree on
that format; it imports numpy only (never torch), because Slicer's process uses it too.
"""
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from .volume import Volume

PROTOCOL = 1  # bumped when a message's meaning changes; the module refuses a worker speaking another one
# The worker's log records on its stderr, one line each, so that the module can log them again at their level.
LOG_FORMAT = "SegmentMBTFE worker %(levelname)s: %(message)s"
_LOG_LINE = re.compile(r"SegmentMBTFE worker (DEBUG|INFO|WARNING|ERROR|CRITICAL): (.*)")


def encode(message: dict) -> bytes:
    """One message as one line of UTF-8 JSON."""
    return (json.dumps(message, separators=(",", ":"), default=str) + "\n").encode("utf-8")


def decode(line) -> Optional[dict]:
    """The message on one line, or None when the line is not a JSON object (it is then only logged)."""
    try:
        message = json.loads(line.decode("utf-8") if isinstance(line, (bytes, bytearray)) else line)
    except (UnicodeDecodeError, ValueError):
        return None
    return message if isinstance(message, dict) else None


# -- the messages: built and handed on here, by both sides ----------------------------------------------------
# A request names its "command" (segment, segment_files, finetune; cancel, shutdown), a reply its "type" (started,
# ready, progress, fallback, result, error, cancelled, exit); a job's messages carry its "id". worker.py documents
# each message's fields.
LAST_REPLIES = ("result", "error", "cancelled")   # a job's last message: one of these, once


def request(command: str, job_id=None, **fields) -> dict:
    """A message from the module to the worker."""
    return {"command": command, **({"id": job_id} if job_id is not None else {}), **fields}


def reply(kind: str, job_id=None, **fields) -> dict:
    """A message from the worker to the module."""
    return {**({"id": job_id} if job_id is not None else {}), "type": kind, **fields}


def error_reply(job_id, error: BaseException, details: str = "") -> dict:
    """An error as the module raises it again (SegmentMBTFESlicer/jobs.error_from): its class, one sentence and,
    for a bug, the traceback."""
    fields = {"class": type(error).__name__, "message": str(error) or type(error).__name__}
    return reply("error", job_id, **fields, **({"details": details} if details else {}))


def dispatch(message: dict, handlers: dict, otherwise: Callable[[dict], Any] = None):
    """Hand a message to the handler of its kind (a request's "command", a reply's "type"); a kind without one
    goes to `otherwise` (by default it is ignored). Returns what the handler returned."""
    kind = message.get("command", message.get("type"))
    handler = handlers.get(kind) if isinstance(kind, str) else None
    handler = handler or otherwise
    return handler(message) if handler is not None else None


def log_record(line: str) -> Optional[Tuple[str, str]]:
    """(level name, message) of a line the worker's logging wrote (LOG_FORMAT), None for any other line."""
    match = _LOG_LINE.fullmatch(line.rstrip("\r\n"))
    return (match.group(1), match.group(2)) if match else None


def write_array(folder, name: str, array: np.ndarray) -> str:
    """Save `array` as folder/name.npy; returns the file name to put in a message."""
    file_name = f"{name}.npy"
    np.save(Path(folder) / file_name, np.ascontiguousarray(array), allow_pickle=False)
    return file_name


def read_array(folder, file_name: str) -> np.ndarray:
    """An array written by write_array; the name must be a plain file inside the job folder."""
    path = Path(folder) / file_name
    if Path(file_name).name != file_name or path.suffix != ".npy":
        raise ValueError(f"not an array file of the job folder: {file_name!r}")
    return np.load(path, allow_pickle=False)


def volume_message(folder, name: str, volume: Volume) -> dict:
    """A Volume for a message: its array written to an .npy file in the job folder, its geometry (ITK/LPS, as
    Volume states it) beside the file's name."""
    return {"file": write_array(folder, name, volume.array), "spacing": list(volume.spacing),
            "origin": list(volume.origin), "direction": list(volume.direction), "name": volume.name,
            "metadata": dict(volume.metadata)}


def volume_from_message(folder, description: dict) -> Volume:
    """The Volume a message describes (volume_message's other end)."""
    return Volume(read_array(folder, description["file"]), description["spacing"], description["origin"],
                  description["direction"], name=str(description.get("name", "")),
                  metadata={str(k): str(v) for k, v in (description.get("metadata") or {}).items()})


@dataclass
class FinetuneSummary:
    """What a fine-tune reports to the module: training/finetune.FinetuneResult's figures, without the weights."""
    iterations: int = 0
    seconds: float = 0.0
    device: str = ""
    stopped: str = ""
    frozen: List[str] = field(default_factory=list)
    dice_before: dict = field(default_factory=dict)   # "training" -> label name -> Dice, and "mean"
    dice_after: dict = field(default_factory=dict)
    budget_s: Optional[float] = None                  # the time budget the run fitted (None: fixed iterations)
    timing: dict = field(default_factory=dict)        # where the seconds went

    @classmethod
    def of(cls, result) -> "FinetuneSummary":
        """The summary of a FinetuneResult (the worker's side)."""
        return cls(**{f.name: getattr(result, f.name) for f in fields(cls)})

    @classmethod
    def from_message(cls, message: dict) -> "FinetuneSummary":
        """The summary in the worker's reply (the module's side); fields the reply lacks keep their defaults."""
        return cls(**{f.name: message[f.name] for f in fields(cls) if f.name in message})

    def message(self) -> dict:
        return asdict(self)
