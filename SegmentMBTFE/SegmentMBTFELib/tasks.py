"""The engine's jobs as the command line and the Slicer module's worker process both run them.

One code path: `segment-mbtfe predict`, the Segment button, the console's `segmentFiles` and Fine-tune all
open a model's version, predict, write files and add fine-tuned versions through these functions, so a
model behaves the same from a terminal and from Slicer.
"""
from pathlib import Path
from typing import List, Sequence, Tuple

from .errors import SegmentError

SEG_NRRD = ".seg.nrrd"


def open_model(model_path, version: str = None, configuration: str = None, folds: Sequence = None,
               checkpoint: str = "final", cache=None):
    """(Model, Version): the model's chosen version (by default its current one), loaded."""
    from .inference.loading import load_model
    from .models.folder import ModelFolder
    from .models.versions import ORIGINAL, resolve
    folder, chosen = resolve(model_path, version, configuration=configuration)
    # a version is a v2 folder of final checkpoints (versions.py)
    if chosen.id != ORIGINAL and ModelFolder.checkpoint_filename(checkpoint) != ModelFolder.CHECKPOINTS["final"]:
        raise SegmentError(f"Version {chosen.id} holds only final checkpoints; use --version original for "
                           f"--checkpoint {checkpoint}.")
    load = cache.get if cache is not None else load_model
    return load(folder, configuration, folds, checkpoint), chosen


def predict(model, version, volumes, device="auto", step_size: float = 0.5, tta: bool = True,
            probabilities: bool = False, postprocess: bool = True, previous_stage=None, progress=None,
            cancel=None, uncertainty: bool = False, backend: str = "torch"):
    """model.predict, with the version recorded in the prediction's provenance when it is not the original.
    backend: what runs the network on the CPU: torch, openvino or auto (OpenVINO when installed; backends.py)."""
    from .inference.backends import use_backend
    from .models.versions import with_version
    use_backend(model, backend)
    prediction = model.predict(volumes, device=device, step_size=step_size, tta=tta, probabilities=probabilities,
                               postprocess=postprocess, previous_stage=previous_stage, progress=progress,
                               cancel=cancel, uncertainty=uncertainty)
    return with_version(prediction, version)


def segment_files(model, version, cases: Sequence, output_dir, device="auto", step_size: float = 0.5,
                  tta: bool = True, progress=None, cancel=None, file_format: str = "seg.nrrd",
                  messages: list = None, backend: str = "torch") -> List[Path]:
    """Segment image files or DICOM folders (one path, or a list of channel paths, per case) into
    output_dir/<case>.seg.nrrd, or the extension of `file_format` ('dicom-seg': <case>.dcm, 'nifti', '.nrrd'...);
    returns the files written. `messages` collects the cases' notes (which DICOM series was read, ...).

    As the command line's batch (batch.run_batch, reading and writing beside the network): a case that
    fails does not stop the others; when any failed, SomeCasesFailed is raised once all were tried, with
    the files written and each failed case's reason (its message is the reason itself for a single case).
    Existing outputs are replaced. Cancel stops at once (Cancelled); the cases written before it stay."""
    from .batch.cases import FAILED, BatchSettings, Case, flag_name_clashes, run_batch
    from .errors import SomeCasesFailed
    from .inference.backends import check_backend
    from .io.writers import output_extension
    settings = BatchSettings(output_extension(file_format), overwrite=True, device=device, step_size=step_size,
                             tta=tta, backend=check_backend(backend))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    channels = [[p] if isinstance(p, (str, Path)) else list(p) for p in cases]
    batch = flag_name_clashes([Case(case_name(c[0]), [Path(p) for p in c]) for c in channels])
    results = run_batch(model, version, batch, output_dir, settings, progress=progress, cancel=cancel)
    written = [Path(r.output) for r in results if r.status != FAILED]
    if messages is not None:
        messages += [f"{r.case}: {note}" for r in results for note in r.notes if note != "bug"]
    failed = [(r.case, r.reason) for r in results if r.status == FAILED]
    if failed:
        raise SomeCasesFailed(written, failed, len(results))
    return written


def finetune_version(model, model_path, cases, validation=(), settings=None, progress=None, cancel=None,
                     target=None, make_current: bool = True, configuration: str = None,
                     started: float = None) -> Tuple[object, object]:
    """Fine-tune `model` (a loaded version of the model at `model_path`) and write the result as a new
    version: (Version, FinetuneResult). The model it started from is never modified. `started`
    (time.perf_counter()) is when the user asked: a time budget counts from then."""
    from .models.versions import ModelVersions
    from .training.finetune import finetune
    versions = ModelVersions(model_path, configuration=configuration)
    versions.check_writable(target)  # before minutes of training
    result = finetune(model, cases, validation, settings, progress=progress, cancel=cancel, started=started)
    if progress:
        progress(1.0, "writing the new version")
    return versions.add(model, result, target=target, make_current=make_current, cancel=cancel), result


def case_name(path) -> str:
    """hippocampus_001_0000.nii.gz -> hippocampus_001 (nnU-Net's channel suffix dropped)."""
    name = Path(path).name
    for ending in (SEG_NRRD, ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(ending):
            name = name[: -len(ending)]
            break
    stem, _, suffix = name.rpartition("_")
    return stem if stem and len(suffix) == 4 and suffix.isdigit() else name

