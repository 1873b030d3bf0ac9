"""Segmenting a folder of cases with the model loaded once: resumable, shardable, reported case by case.

    segment-mbtfe predict -i CASES_DIR -o OUTPUT_DIR [--overwrite] [--parts N --part I] [--format .nii.gz]

An archive is not one case many times: some files are broken, a job is killed half-way, a cluster runs
the same command as many jobs. So each case's failure is recorded and the batch goes on; a case whose
output exists (complete, since outputs are written atomically) is skipped, so a rerun finishes the rest;
`--parts N --part I` takes every N-th case, so N jobs share a folder without talking to each other; and a
manifest (CSV and JSON, rewritten as cases finish) says for every case what happened, why, how long it
took, on which device, and the volume of each segment.

Cases are found as nnU-Net's `predict -i` finds them and as archives hold them: one image file per case
(`case.nii.gz`), one file per channel in nnU-Net's naming (`case_0000.nii.gz`, `case_0001.nii.gz`), or one
DICOM series folder per case. Hidden files (our own partial outputs among them) and files that are not
images are left alone.
"""
import csv
import io
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import Cancelled, SegmentError
from ..free_memory import available_bytes
from ..io.images import read_channels, read_volume, atomic_output
from ..io.sitk_volume import image_extension
from ..io.writers import check_output, write_prediction
from ..models.versions import with_version
from .overlap import run_in_stages

SEGMENTED, SKIPPED, FAILED = "segmented", "skipped", "failed"
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_MANIFEST_SAVE_S = 5.0   # the manifest is rewritten at most this often while cases finish (and at the end)


@dataclass
class Case:
    name: str
    inputs: List[Path]       # one file per channel in channel order, or one DICOM series folder
    problem: str = ""        # why it cannot be segmented, found while listing (a missing channel, ...)


@dataclass
class CaseResult:
    case: str
    status: str              # segmented, skipped or failed
    reason: str = ""         # why it failed or was skipped
    seconds: float = 0.0
    device: str = ""
    inputs: List[str] = field(default_factory=list)
    output: str = ""
    volumes_ml: Dict[str, float] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ finding cases

def find_cases(paths: Sequence, channel_names: Sequence[str], leave_out: Sequence = ()) -> Tuple[List[Case], List[Path]]:
    """The cases in `paths` (folders of cases, DICOM series folders, image files), sorted by name, and the
    files left out because they are not images. `leave_out`: folders never to look into (the output)."""
    leave_out = [Path(p).resolve() for p in leave_out]
    files, folders, ignored = [], [], []
    for path in map(Path, paths):
        if path.is_dir() and not _holds_dicom(path):
            for child in sorted(path.iterdir()):
                _sort_entry(child, files, folders, ignored, leave_out)
        else:
            _sort_entry(path, files, folders, ignored, leave_out, given=True)
    cases = _cases_from_files(files, list(channel_names)) + [_case_from_folder(f, channel_names) for f in folders]
    return flag_name_clashes(sorted(cases, key=lambda c: c.name)), ignored


def _sort_entry(path: Path, files, folders, ignored, leave_out, given: bool = False):
    resolved = path.resolve()
    if path.name.startswith(".") or any(resolved == p or p in resolved.parents for p in leave_out):
        return
    if path.is_dir():
        folders.append(path)
    elif given or (image_extension(path) and not path.name.lower().endswith(".seg.nrrd")):
        files.append(path)  # a file named on the command line is a case even if it is not an image
    else:
        ignored.append(path)


def _holds_dicom(folder: Path) -> bool:
    from ..io.images import is_dicom_folder
    return is_dicom_folder(folder)


def _cases_from_files(files: List[Path], channel_names: List[str]) -> List[Case]:
    """Group channel files into cases: `case_0000` ... is channel 0 ...; with one channel, a file without
    the suffix (or with another number, such as a patient number) is a case of its own."""
    groups: Dict[str, Dict[int, List[Path]]] = {}
    for path in files:
        case, channel = _case_and_channel(path, len(channel_names))
        groups.setdefault(case, {}).setdefault(channel, []).append(path)
    return [_case_from_channels(name, channels, channel_names) for name, channels in groups.items()]


def _case_and_channel(path: Path, channel_count: int) -> Tuple[str, int]:
    extension = image_extension(path) or path.suffix
    stem = path.name[: len(path.name) - len(extension)] if extension else path.name
    match = _CHANNEL.match(stem)
    if match and (channel_count > 1 or int(match.group("channel")) == 0):
        return match.group("case"), int(match.group("channel"))
    return stem, 0


def _case_from_channels(name: str, channels: Dict[int, List[Path]], channel_names: List[str]) -> Case:
    doubled = [paths for paths in channels.values() if len(paths) > 1]
    if doubled:
        return Case(name, doubled[0], f"several files are channel {_channel_suffix(doubled[0][0])} of case "
                                      f"{name} ({', '.join(p.name for p in doubled[0])})")
    missing = [i for i in range(len(channel_names)) if i not in channels]
    extra = sorted(i for i in channels if i >= len(channel_names))
    inputs = [channels[i][0] for i in sorted(channels)]
    if missing:
        wanted = ", ".join(f"{name}_{i:04d} ({channel_names[i]})" for i in missing)
        return Case(name, inputs, f"the channel file {wanted} is missing")
    if extra:
        return Case(name, inputs, f"there is a channel {extra[0]:04d} file but the model takes "
                                  f"{len(channel_names)} channel(s) ({', '.join(channel_names)})")
    return Case(name, inputs)


def _channel_suffix(path: Path) -> str:
    match = _CHANNEL.match(path.name.split(".")[0])
    return match.group("channel") if match else "0000"


def _case_from_folder(folder: Path, channel_names: Sequence[str]) -> Case:
    if len(channel_names) > 1:
        return Case(folder.name, [folder], f"it is a folder (one DICOM series), but the model needs "
                                           f"{len(channel_names)} channels ({', '.join(channel_names)}) as "
                                           f"files named {folder.name}_0000, {folder.name}_0001, ...")
    return Case(folder.name, [folder])


def flag_name_clashes(cases: List[Case]) -> List[Case]:
    """Two cases with one name (a folder and a file) would write one output: both are refused."""
    seen: Dict[str, int] = {}
    for case in cases:
        seen[case.name] = seen.get(case.name, 0) + 1
    for case in cases:
        if seen[case.name] > 1 and not case.problem:
            case.problem = f"{seen[case.name]} inputs are named {case.name}; rename one so each case has its own output"
    return cases


def shard(cases: Sequence[Case], parts: int, part: int) -> List[Case]:
    """Part `part` (1..parts) of the cases: every parts-th one, so the parts are even whatever the sizes
    of the cases' names. Every job must list the same input folder."""
    if parts < 1 or not 1 <= part <= parts:
        raise SegmentError(f"--part must be between 1 and --parts ({parts}); got {part}.")
    return [case for index, case in enumerate(cases) if index % parts == part - 1]


# ---------------------------------------------------------------------------------------------- running

@dataclass
class BatchSettings:
    extension: str = ".seg.nrrd"
    overwrite: bool = False
    device: str = "auto"
    step_size: float = 0.5
    tta: bool = True
    probabilities: bool = False
    postprocess: bool = True
    overlap: Optional[bool] = None  # read the next case and write the last one while the network works
                                    # (overlap.py); None: when the network runs on a GPU (see run_batch)
    backend: str = "torch"   # what runs the network on the CPU: torch, openvino, auto (backends.py)


def run_batch(model, version, cases: Sequence[Case], output_dir, settings: BatchSettings, manifest=None,
              progress=None, on_result=None, cancel=None) -> List[CaseResult]:
    """Segment each case into output_dir/<case><extension>; a case that fails is recorded and the batch goes
    on. `manifest` (a Manifest) is kept up to date; `on_result(result)` is called as each case ends, in the
    cases' order. Ctrl+C or `cancel` (a threading.Event) stops at once: the case in the network is not
    written, the one before it is (its network work was done), and so is the manifest.

    With settings.overlap None, the stages run side by side only when the network runs on a GPU: on the
    CPU the network's threads take every core, and stages beside them slowed a batch down (1.32x with 2
    cores, benchmarks/bench_batch.py)."""
    import threading
    from dataclasses import replace
    from ..inference.backends import use_backend
    from ..inference.devices import choose_device
    use_backend(model, settings.backend)
    if settings.overlap is None:
        settings = replace(settings, overlap=choose_device(settings.device).type != "cpu")
    output_dir = Path(output_dir)
    shared = _SharedProgress(progress)
    stopping = threading.Event()
    stages = _Stages(model, version, output_dir, settings, shared, cancel, stopping, len(cases))
    results: List[CaseResult] = []

    def done(result: CaseResult):
        results.append(result)
        # a segmented case's end moves the bar (its export may have run beside the next case's network)
        end = shared.main if result.status == SEGMENTED else shared.side
        end(len(results) / len(cases), f"{result.case} ({len(results)}/{len(cases)}): {result.status}")
        if manifest is not None:
            manifest.update(results)
        if on_result is not None:
            on_result(result)
    try:
        run_in_stages(list(enumerate(cases)), stages.prepare, stages.compute, stages.finish, done,
                      room=stages.room, overlap=settings.overlap, stop_ahead=stopping.set)
    finally:
        if manifest is not None:
            manifest.update(results, force=True)
    return results


@dataclass
class _Working:
    """A case on its way through the stages; `job` is None once its result is final (failed, skipped)."""
    result: CaseResult
    output: Path
    prefix: str = ""
    span: tuple = (0.0, 1.0)
    job: object = None           # model.CaseInProgress
    prediction: object = None


class _Stages:
    """The batch's three stages for overlap.run_in_stages: each records a case's failure in its result and
    lets only Cancelled and Ctrl+C through. The network stage runs in the caller's thread and reports the
    progress; the other two report their stage texts at the network's latest fraction (they run beside it)."""

    def __init__(self, model, version, output_dir: Path, settings: BatchSettings, shared, cancel, stopping, count):
        self.model, self.version, self.output_dir, self.settings = model, version, output_dir, settings
        self.shared, self.cancel, self.stopping, self.count = shared, cancel, stopping, count

    def prepare(self, indexed) -> _Working:
        index, case = indexed
        output = self.output_dir / f"{case.name}{self.settings.extension}"
        work = _Working(CaseResult(case.name, FAILED, inputs=[str(p) for p in case.inputs], output=str(output)),
                        output, f"{case.name} ({index + 1}/{self.count}): ",
                        (index / self.count, (index + 1) / self.count))
        settled = settled_result(self.model, case, output, self.settings)
        if settled is not None:
            work.result = settled
            return work
        reporter = self._reporter(work, self.shared.side if self.settings.overlap else self.shared.main,
                                  _Either(self.cancel, self.stopping))
        s = self.settings
        return self._guarded(work, lambda: self._read_and_preprocess(case, work, reporter, s))

    def _read_and_preprocess(self, case: Case, work: _Working, reporter, s: BatchSettings):
        volumes = read_channels(case.inputs, self.model.channel_names)  # the model's modality picks DICOM series
        check_output(work.output, case.inputs, volumes[0])
        work.job = self.model.prepare(volumes, s.device, s.step_size, s.tta, s.probabilities, s.postprocess,
                                      reporter=reporter)

    def compute(self, work: _Working) -> _Working:
        if work.job is None:
            return work
        work.job.reporter = self._reporter(work, self.shared.main, self.cancel)
        return self._guarded(work, lambda: self.model.run_network(work.job))

    def finish(self, work: _Working) -> CaseResult:
        if work.job is None:
            return work.result
        # not cancellable: the network's work on this case is done, so a cancel from here on still writes it
        work.job.reporter = self._reporter(work, self.shared.side if self.settings.overlap else self.shared.main)
        work = self._guarded(work, lambda: self._export_and_write(work))
        result = work.result
        if work.prediction is not None:
            prediction = work.prediction
            result.status, result.device, result.notes = SEGMENTED, prediction.settings["device"], prediction.messages
            result.volumes_ml = segment_volumes_ml(prediction.labels, prediction.segments)
        return result

    def _export_and_write(self, work: _Working):
        prediction = with_version(self.model.finish(work.job), self.version)
        work.job = None
        write_prediction(prediction, work.output)
        work.prediction = prediction

    def room(self, work: _Working) -> bool:
        """Whether this case leaves room for one more beside it in each of the other two stages (three in all)."""
        if work.job is None:
            return True
        available = available_bytes()
        return available is None or available >= 3 * work.job.needed_bytes

    def _reporter(self, work: _Working, callback, cancel=None):
        from ..progress import Progress
        prefix = work.prefix
        return Progress(lambda fraction, text: callback(fraction, prefix + text), cancel).span(*work.span)

    def _guarded(self, work: _Working, stage) -> _Working:
        """Run a stage; a failure becomes the case's result (and ends its way through the stages)."""
        started = time.perf_counter()
        try:
            stage()
        except (Cancelled, KeyboardInterrupt):
            raise
        except SegmentError as error:
            work.result.reason, work.job = str(error), None
        except Exception as error:  # noqa: BLE001 - a bug on one case must not lose the rest of an archive run
            work.result.reason = (f"unexpected failure ({type(error).__name__}: {str(error)[:200]}); "
                                  "rerun it with --debug")
            work.result.notes.append("bug")
            work.job = None
        finally:
            work.result.seconds = round(work.result.seconds + time.perf_counter() - started, 3)
        return work



class _Either:
    """A cancel flag set when either of two is (the user's cancel, or the batch stopping its read-ahead)."""

    def __init__(self, *flags):
        self.flags = [f for f in flags if f is not None]

    def is_set(self) -> bool:
        return any(f.is_set() for f in self.flags)


class _SharedProgress:
    """One progress callback fed from the three stages' threads: the network's stage (main) sets the
    fraction; the stages beside it (side) show their text at that fraction, so the bar never jumps back."""

    def __init__(self, callback):
        import threading
        self.callback, self.fraction, self.lock = callback, 0.0, threading.Lock()

    def main(self, fraction: float, text: str):
        with self.lock:
            self.fraction = max(self.fraction, fraction)
            if self.callback is not None:
                self.callback(self.fraction, text)

    def side(self, fraction: float, text: str):
        with self.lock:
            if self.callback is not None:
                self.callback(self.fraction, text)


def settled_result(model, case: Case, output: Path, settings: BatchSettings) -> Optional[CaseResult]:
    """The case's result when it is known without segmenting it (refused while listing, or its output is
    there from an earlier run), else None."""
    result = CaseResult(case.name, FAILED, inputs=[str(p) for p in case.inputs], output=str(output))
    if case.problem:
        result.reason = case.problem[0].upper() + case.problem[1:] + "."
        return result
    if not settings.overwrite and _finished(output, model, result):
        return result
    return None


def _finished(output: Path, model, result: CaseResult) -> bool:
    """True (and `result` filled in) when a readable output of an earlier run exists. Outputs are written
    atomically, so one that exists is complete; one that cannot be read is segmented again."""
    if not output.is_file():
        return False
    try:
        labels = read_volume(output)
    except SegmentError:
        return False
    result.status, result.reason = SKIPPED, "its output already exists (--overwrite segments it again)"
    result.volumes_ml = segment_volumes_ml(labels, model.labels.output_segments())
    return True


def segment_volumes_ml(labels, segments) -> Dict[str, float]:
    """Each segment's volume in millilitres (voxel count x voxel volume)."""
    counts = np.bincount(np.asarray(labels.array).ravel().astype(np.int64, copy=False))
    voxel_ml = float(np.prod(labels.spacing)) / 1000.0
    return {name: round(float(counts[value] if value < len(counts) else 0) * voxel_ml, 6)
            for value, name in segments}


# --------------------------------------------------------------------------------------------- reporting

class Manifest:
    """manifest.csv and manifest.json in the output folder (manifest.part2of4.* for a part), rewritten
    atomically as cases finish, so a killed job still leaves a readable list of what it did."""

    def __init__(self, output_dir, segment_names: Sequence[str], parts: int = 1, part: int = 1):
        stem = "manifest" if parts == 1 else f"manifest.part{part}of{parts}"
        self.csv_path = Path(output_dir) / f"{stem}.csv"
        self.json_path = Path(output_dir) / f"{stem}.json"
        self.segment_names = list(segment_names)
        self._saved = 0.0

    def update(self, results: List[CaseResult], force: bool = False):
        if not force and time.monotonic() - self._saved < _MANIFEST_SAVE_S:
            return
        self._saved = time.monotonic()
        _write_text(self.json_path, json.dumps([asdict(r) for r in results], indent=2))
        _write_text(self.csv_path, self._csv(results))

    def _csv(self, results: List[CaseResult]) -> str:
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["case", "status", "reason", "seconds", "device", "inputs", "output", "notes"]
                        + [f"{name} (mL)" for name in self.segment_names])
        for r in results:
            writer.writerow([r.case, r.status, r.reason, f"{r.seconds:.3f}", r.device, ";".join(r.inputs), r.output,
                             " ".join(r.notes)] + [_ml(r.volumes_ml.get(name)) for name in self.segment_names])
        return text.getvalue()


def _ml(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.6g}"


def _write_text(path: Path, text: str):
    with atomic_output(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def summary(results: Sequence[CaseResult], seconds: float) -> List[str]:
    """The closing lines: counts, and each failed case with its reason."""
    count = {status: sum(r.status == status for r in results) for status in (SEGMENTED, SKIPPED, FAILED)}
    devices = sorted({r.device for r in results if r.device})
    lines = [f"{count[SEGMENTED]} segmented, {count[SKIPPED]} skipped (already done), {count[FAILED]} failed, of "
             f"{len(results)} case(s) in {seconds:.1f} s" + (f" on {', '.join(devices)}" if devices else "") + "."]
    lines += [f"  failed: {r.case}: {r.reason}" for r in results if r.status == FAILED]
    return lines
