"""The console and batch API behind SegmentMBTFELogic: every engine call is a job for the worker process.

    job = start_segmentation(volumes, model, options)   # returns at once; the job writes the segments
    node = segment(volumes, model, options)             # the same, blocking until the segments are in the scene
    files = segment_files(paths, model, output_dir, options)
    job = start_finetune(plan, settings); run = finetune(plan, settings)

Blocking calls keep Slicer painting while they wait (jobs.Job.wait) and raise the engine's own errors
(one sentence each); background jobs report through on_progress / on_finished on the main thread. Only
one job runs at a time in the application (jobs.claim): a second is refused with a sentence.
"""
import logging
import shutil
import tempfile

import slicer

from SegmentMBTFELib import exchange
from SegmentMBTFELib.errors import Cancelled, InputError, SomeCasesFailed

from . import jobs, runner, uncertainty_display

log = logging.getLogger(__name__)


def start_segmentation(volume_nodes, model_path: str, options: runner.Options, output=None, on_progress=None,
                       on_finished=None, claimed: bool = False) -> jobs.Job:
    """Copy the inputs into a job folder and send them to the worker; when its result comes back (main
    thread) the segments are written into `output` or a new segmentation node, unless cancelled meanwhile.
    `claimed`: the caller already holds the busy flag (the panel takes it before installing packages)."""
    if not claimed:
        jobs.claim("segmentation")
    folder = None
    try:
        inputs = runner.prepare_inputs(volume_nodes)
        folder = tempfile.mkdtemp(prefix="SegmentMBTFE-")
        request = exchange.request("segment", folder=folder, model=model_path, options=options.request(), inputs=[
            exchange.volume_message(folder, f"input_{i}", v) for i, v in enumerate(inputs.volumes)])
    except BaseException:
        _abandon(folder)
        raise
    scene = slicer.mrmlScene

    def settle(message: dict, folder: str):
        maps = {name: exchange.read_array(folder, file) for name, file in (message.get("uncertainty") or {}).items()}
        result = runner.SegmentsResult(exchange.read_array(folder, message["labels"]),
                                       [(int(v), str(n)) for v, n in message["segments"]],
                                       dict(message.get("settings") or {}), list(message.get("messages") or []),
                                       maps, list(message.get("statistics") or []))
        node = runner.apply_prediction(result, inputs.geometry, scene, output, show3d=options.show3d,
                                       reference_volume_id=inputs.node_ids[0])
        if maps:
            uncertainty_display.show(result, inputs.geometry, scene, node)
        return node
    return jobs.Job("segmentation", request, folder, settle, on_progress, on_finished).start()


def segment(volume_nodes, model_path: str, options: runner.Options, output=None, progress=None, cancel=None):
    """start_segmentation, waiting for the segmentation node (or the error, or Cancelled)."""
    job = start_segmentation(volume_nodes, model_path, options, output, on_progress=progress)
    return result_of(job.wait(cancel))


def segment_files(paths, model_path: str, output_dir, options: runner.Options, progress=None, cancel=None,
                  file_format: str = "seg.nrrd") -> list:
    """Image files or DICOM folders (a path, or a list of channel paths, per case) to output_dir/<case>.seg.nrrd
    (or the extension of `file_format`: 'dicom-seg' writes <case>.dcm); the scene is not touched. Returns the
    files written; the cases' notes (which DICOM series was read, ...) go to the log.

    A case that fails does not stop the others (as the command line's batch): once every case was tried,
    SomeCasesFailed is raised when any failed; its .written lists the files written, its .failed each
    failed case with its reason (each also logged), and its message is the reason itself for a single case."""
    from pathlib import Path
    if not output_dir:
        raise InputError("Give the folder to write the segmentations into (outputDir).")
    cases = [[str(p)] if isinstance(p, (str, Path)) else [str(c) for c in p] for p in paths]
    request = exchange.request("segment_files", model=model_path, cases=cases, format=file_format,
                               output_dir=str(Path(output_dir).expanduser().resolve()), options=options.request())
    jobs.claim("segmentation")  # only now: a request that could not be made must not leave the flag taken
    job = jobs.Job("segmentation", request, None, _written_files, progress)
    return result_of(job.start().wait(cancel))


def _written_files(message: dict, folder) -> list:
    for note in message.get("messages") or []:
        log.info("SegmentMBTFE: %s", note)
    failed = [(str(case), str(reason)) for case, reason in message.get("failed") or []]
    for case, reason in failed:
        log.error("SegmentMBTFE: %s was not segmented: %s", case, reason)
    if failed:
        raise SomeCasesFailed(message["written"], failed, message.get("cases"))
    return list(message["written"])


def start_finetune(plan: runner.FinetunePlan, settings: dict, make_current: bool = True, on_progress=None,
                   on_finished=None, claimed: bool = False) -> jobs.Job:
    """Send the corrected cases to the worker, which writes a new version; on the main thread the version
    becomes current (make_current) and the job's result is a runner.FinetuneRun. A version that arrives
    after Cancel is deleted again."""
    from SegmentMBTFELib.models.versions import ModelVersions
    if not claimed:
        jobs.claim("fine-tune")
    folder = None
    try:
        folder = tempfile.mkdtemp(prefix="SegmentMBTFE-")
        cases = [{"name": case.name, "labels": exchange.volume_message(folder, f"labels_{i}", case.labels),
                  "images": [exchange.volume_message(folder, f"image_{i}_{c}", v) for c, v in enumerate(case.images)]}
                 for i, case in enumerate(plan.cases)]
        request = exchange.request("finetune", folder=folder, model=plan.model_path, cases=cases,
                                   settings=settings)
    except BaseException:
        _abandon(folder)
        raise

    def settle(message: dict, folder: str):
        versions = ModelVersions(plan.model_path)
        version = versions.use(message["version"]) if make_current else versions.get(message["version"])
        run = runner.FinetuneRun(version, exchange.FinetuneSummary.from_message(message),
                                 str(message.get("parent", "")), plan.report())
        log.info("SegmentMBTFE: %s of %s written to %s (%s)", version.id, plan.model_name, version.path,
                 run.dice_text())
        return run

    def discard(message: dict):  # the version was written, but the user had cancelled: take it back
        ModelVersions(plan.model_path).delete(message["version"])
    return jobs.Job("fine-tune", request, folder, settle, on_progress, on_finished, discard=discard).start()


def finetune(plan: runner.FinetunePlan, settings: dict, make_current: bool = True, progress=None, cancel=None):
    job = start_finetune(plan, settings, make_current, on_progress=progress)
    return result_of(job.wait(cancel))


class LogProgress:
    """Default progress for console calls: a log line at each new stage and every 10%."""

    def __init__(self):
        self.last_stage, self.last_tenth = None, -1

    def __call__(self, fraction: float, stage: str) -> None:
        name = stage.split(":")[0].split(" of ")[0].rstrip("0123456789 ")
        tenth = int(fraction * 10)
        if name != self.last_stage or tenth != self.last_tenth:
            log.info(f"SegmentMBTFE: {int(100 * fraction)}% {stage}")
            self.last_stage, self.last_tenth = name, tenth


def result_of(outcome: jobs.Outcome):
    """A blocking call's return value: the job's result, or its error raised (Cancelled when cancelled)."""
    if outcome.cancelled:
        raise Cancelled()
    if outcome.error is not None:
        raise outcome.error
    return outcome.result


def _abandon(folder) -> None:
    """A job that could not start: its folder goes, and the busy flag is free again."""
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
    jobs.release()
