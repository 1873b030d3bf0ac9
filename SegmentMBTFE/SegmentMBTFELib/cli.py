"""`segment-mbtfe`: segment images, fine-tune models on corrected cases, and manage models from a terminal.

    segment-mbtfe predict [-m MODEL] [--version ID] -i IMAGE [IMAGE ...] [--series UID ...]
                          -o OUTPUT.nii.gz|.nrrd|.seg.nrrd|.mha|.dcm
    segment-mbtfe predict [-m MODEL] -i CASES_DIR -o OUTPUT_DIR [--overwrite] [--parts N --part I]
                          [--overlap auto|on|off] [--workers N | --devices cuda:0,cuda:1 | --dask ADDRESS]
    segment-mbtfe finetune [-m MODEL] -i CASE_IMAGE... -l CASE_LABELS... [-o NEW_VERSION_DIR] [--iterations N]
    segment-mbtfe models list;  models add PATH|ZIP [--name NAME] [--link];  models remove NAME
    segment-mbtfe models info|versions [MODEL]
    segment-mbtfe models use|delete [-m MODEL] VERSION;  models rollback [-m MODEL]
    segment-mbtfe nnunet-trainer register [--ext-trainer]   (lets nnUNetv2_train use -tr nnUNetTrainerMBTFE)

-m takes a model folder or a name `models list` shows; without -m the default shipped model is used. A
model's current version (see `models versions`) is what `predict` and `finetune` load unless --version names
another; fine-tuning writes a new version and never changes the model it started from.

User mistakes end with one line on stderr and a non-zero exit, never a traceback (unless --debug), and
never a partial output: outputs (files, version folders) are written only after the work succeeded,
atomically; Ctrl+C (exit 130) and SIGTERM (exit 143, what a scheduler or `kill` sends) write nothing.
A batch (-o a folder) goes on past a case that fails, and exits 1 when any did.
"""
import argparse
import logging
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .cli_models import add_parser as add_models_commands, chosen_model, model_option, models_add
from .errors import Cancelled, InputError, SegmentError
from .inference.backends import BACKENDS, check_backend
from .requirements import import_torch_quietly

EXIT_ERROR, EXIT_CANCELLED, EXIT_TERMINATED = 1, 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that every partial output is cleaned up on the way out."""


STARTED = time.perf_counter()  # the command's start (as good as): a fine-tune's time budget counts from here


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.ERROR, format="%(message)s")
    if not getattr(args, "imports_torch_itself", False):
        import_torch_quietly()
    try:
        with _sigterm_stops(args.run in (_predict, _finetune, models_add)):
            return args.run(args) or 0
    except (Cancelled, KeyboardInterrupt) as stop:
        text = str(stop) or "Cancelled; nothing was written."
        print(f"\nStopped (SIGTERM). {text}" if isinstance(stop, Terminated) else f"\n{text}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(stop, Terminated) else EXIT_CANCELLED
    except SegmentError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:  # a bug: say so in one line, details with --debug
        if args.debug:
            raise
        print(f"error: unexpected failure ({type(error).__name__}: {error}); rerun with --debug for details.",
              file=sys.stderr)
        return EXIT_ERROR


@contextmanager
def _sigterm_stops(wanted: bool):
    """While a command writes outputs, SIGTERM stops it as Ctrl+C does: partial files are removed on the way
    out. (Python's default for SIGTERM ends the process at once, leaving them.)"""
    if not wanted or threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def stop(signum, frame):
        if not received:  # a second SIGTERM while cleaning up must not interrupt the clean-up
            received.append(signum)
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segment-mbtfe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and log details")
    commands = parser.add_subparsers(title="commands")

    _add_predict(commands)
    _add_finetune(commands)
    add_models_commands(commands)
    worker = commands.add_parser(
        "worker", help="serve the Slicer module: JSON requests on stdin, replies on stdout (see worker.py)")
    worker.add_argument("--idle-timeout", type=float, default=600.0, metavar="SECONDS",
                        help="exit after this long without a request (600)")
    # imports_torch_itself: the worker says its pid at once, before the seconds torch takes (worker.py)
    worker.set_defaults(run=lambda args: __import__(f"{__package__}.worker", fromlist=["main"]).main(
        args.idle_timeout), imports_torch_itself=True)

    from .training.nnunet_trainer.commands import add_parser as add_trainer_commands
    add_trainer_commands(commands)  # `nnunet-trainer register|unregister|status|path` (for nnUNetv2_train)
    return parser


def _add_predict(commands):
    predict = commands.add_parser(
        "predict", help="segment one case, or a folder of cases",
        description="Segment one case (-o a file), or every case in a folder (-o a folder): one image file per "
                    "case, nnU-Net's case_0000.nii.gz channel files, or one DICOM series folder per case.")
    model_option(predict)
    predict.add_argument("--version", metavar="ID",
                         help="model version to use: original, v1, v2... (default: the current one)")
    predict.add_argument("-i", "--input", nargs="+", required=True, metavar="IMAGE",
                         help="one image per model channel: NIfTI, NRRD, MHA file or DICOM series folder; "
                              "or, with -o a folder, a folder of cases (or several case files)")
    predict.add_argument("-o", "--output", required=True,
                         help="label map to write: .nii.gz, .nii, .nrrd, .mha, .seg.nrrd for Slicer segments, or .dcm "
                              "for a DICOM SEG (DICOM input; needs the [dicom] extra); or a folder: one output per "
                              "case, with manifest.csv and manifest.json")
    predict.add_argument("-c", "--configuration", help="2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres")
    predict.add_argument("-f", "--folds", nargs="+", help="folds to ensemble (default: all present)")
    predict.add_argument("--checkpoint", default="final", help="final (default), best, or a .pth file name")
    predict.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    predict.add_argument("--backend", default="torch", choices=BACKENDS,
                         help="what runs the network on the CPU: torch (default), openvino (the [openvino] extra: "
                              "faster, labels may differ slightly, see the README), auto (OpenVINO when installed, "
                              "else torch); a GPU always runs torch")
    predict.add_argument("--step", type=float, default=0.5, help="tile step as a fraction of the patch (0.5)")
    predict.add_argument("--no-tta", action="store_true", help="no mirroring test-time augmentation (~8x faster)")
    predict.add_argument("--probabilities", action="store_true",
                         help="also write per-class probabilities to OUTPUT's name + .npz (as nnU-Net)")
    predict.add_argument("--uncertainty", action="store_true",
                         help="also write OUTPUT's name + _entropy and _disagreement maps and _segments.csv "
                              "(volume, mean probability and uncertainty per segment)")
    predict.add_argument("--no-postprocessing", action="store_true",
                         help="ignore the model folder's postprocessing.json")
    predict.add_argument("--previous-stage", help="3d_lowres prediction (for 3d_cascade_fullres)")
    predict.add_argument("--series", nargs="+", metavar="UID",
                         help="the DICOM series to read from a folder holding several: its Series Instance UID, "
                              "one per -i input ('-' for an input that is not a DICOM folder); default: the largest "
                              "series of the model's modality, else the largest")
    predict.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    batch = predict.add_argument_group("a folder of cases (-o OUTPUT_DIR)")
    batch.add_argument("--format", default=".seg.nrrd", choices=[".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha"],
                       help="output file type per case (.seg.nrrd)")
    batch.add_argument("--overwrite", action="store_true", help="segment cases whose output exists again")
    batch.add_argument("--parts", type=int, default=1, metavar="N", help="split the cases into N parts (jobs)")
    batch.add_argument("--part", type=int, default=1, metavar="I", help="the part this job segments, 1..N")
    batch.add_argument("--overlap", choices=("auto", "on", "off"), default="auto",
                       help="read the next case and write the last one while the network works: auto (default) "
                            "when the network runs on a GPU; on; off (one stage at a time)")
    batch.add_argument("--workers", type=int, metavar="N",
                       help="N worker processes on this machine, each on its share of the cases (default: one per GPU "
                            "when several GPUs are visible)")
    batch.add_argument("--devices", metavar="LIST",
                       help="one worker process per device named, e.g. cuda:0,cuda:1 or cpu,cpu")
    batch.add_argument("--dask", metavar="ADDRESS",
                       help="send one case per task to the Dask distributed scheduler at ADDRESS (tcp://host:8786; "
                            "needs the [dask] extra and a filesystem the workers share)")
    predict.set_defaults(run=_predict)


def _add_finetune(commands):
    finetune = commands.add_parser(
        "finetune", help="fine-tune a model on corrected cases: writes a new version, the model is unchanged",
        description="Fine-tune a model on corrected cases. The result is a new version of the model (listed by "
                    "`models versions`, made current); the model fine-tuned from is never changed.")
    model_option(finetune)
    finetune.add_argument("--version", metavar="ID",
                          help="version to start from: original, v1... (default: the current one)")
    finetune.add_argument("-i", "--images", nargs="+", action="extend", required=True, metavar="IMAGE",
                          help="one image per case; for several channels join one case's files with commas "
                               "(a_0000.nii.gz,a_0001.nii.gz)")
    finetune.add_argument("-l", "--labels", nargs="+", action="extend", required=True, metavar="LABELS",
                          help="the corrected label map of each case, in the order of -i")
    finetune.add_argument("--val-image", nargs="+", action="extend", default=[], metavar="IMAGE",
                          help="validation cases (not trained on), as -i")
    finetune.add_argument("--val-label", nargs="+", action="extend", default=[], metavar="LABELS",
                          help="label maps of the validation cases")
    finetune.add_argument("-o", "--output", metavar="NEW_VERSION_DIR",
                          help="folder for the new version (default: the user's SegmentMBTFE versions folder)")
    finetune.add_argument("--iterations", type=int,
                          help="training iterations per fold (default: as many as the time budget allows)")
    finetune.add_argument("--time-budget", type=float, metavar="SECONDS",
                          help="seconds for the whole command, Dice before and after included (default: 300 on a "
                               "CPU, 120 on a GPU, unless --iterations is given)")
    finetune.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    finetune.add_argument("--freeze-encoder", action="store_true", help="train the decoder only")
    finetune.add_argument("--seed", type=int, help="random seed (default 0)")
    finetune.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    finetune.add_argument("-c", "--configuration", help="configuration of a dataset folder with several")
    finetune.add_argument("-f", "--folds", nargs="+", help="folds to fine-tune (default: all present)")
    finetune.add_argument("--no-evaluation", action="store_true",
                          help="skip measuring Dice on the cases before and after")
    finetune.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    finetune.set_defaults(run=_finetune)


def _open_model(args, folds=None, checkpoint="final"):
    """(Model, Version, note): the note says which model is used when that is not what the user typed
    (the default model, or a fine-tuned version rather than the folder given), "" otherwise."""
    from .models.versions import ORIGINAL
    from .tasks import open_model
    path = chosen_model(args)
    model, version = open_model(path, args.version, args.configuration, folds, checkpoint)
    note = ""
    if not args.model or version.id != ORIGINAL:
        what = "default model " if not args.model else ""
        note = f"Using {what}{path}, version {version.id}" + (f" ({version.path})" if version.id != ORIGINAL else "")
    return model, version, note


def _predict(args):
    from .io.images import read_channels, read_volume
    from .io.writers import check_output, output_format, write_prediction
    from .tasks import predict

    output = Path(args.output)
    check_backend(args.backend)  # OpenVINO asked for but not installed: said before any work
    if _is_folder_output(output):
        return _predict_batch(args)
    output_format(output)  # refuse an unknown extension before minutes of work
    started = time.perf_counter()
    series = _series_per_input(args)
    model, version, note = _open_model(args, args.folds, args.checkpoint)  # its channels choose DICOM series
    volumes = read_channels(args.input, model.channel_names, series)
    check_output(output, args.input + ([args.previous_stage] if args.previous_stage else []), volumes[0])
    previous = read_volume(args.previous_stage) if args.previous_stage else None
    bar = _ProgressBar(enabled=not args.quiet and sys.stderr.isatty(), note=note)
    prediction = predict(model, version, volumes, args.device, args.step, not args.no_tta, args.probabilities,
                         not args.no_postprocessing, previous, progress=bar, uncertainty=args.uncertainty,
                         backend=args.backend)
    bar.close()
    written = write_prediction(prediction, output)  # notes after it: a DICOM SEG adds its own
    if args.uncertainty:
        from .inference.uncertainty import write_uncertainty
        try:
            written += write_uncertainty(prediction, output)
        except BaseException:
            for done in written:  # all the outputs or none
                done.unlink(missing_ok=True)
            raise
    for message in prediction.messages:
        print(f"note: {message}", file=sys.stderr)
    names = ", ".join(name for _, name in prediction.segments)
    engine = " with OpenVINO" if prediction.settings.get("backend") == "openvino" else ""
    print(f"Wrote {', '.join(str(p) for p in written)} ({names}) in {time.perf_counter() - started:.1f} s "
          f"on {prediction.settings['device']}{engine}.")


def _series_per_input(args) -> list:
    """--series as one UID (or None) per -i input."""
    given = args.series or []
    if given and len(given) != len(args.input):
        raise InputError(f"Give one --series UID per -i input, in the same order ('-' for an input that is not a "
                         f"DICOM folder): {len(args.input)} input(s) but {len(given)} UID(s).")
    return [None if uid == "-" else uid for uid in given]


def _is_folder_output(output: Path) -> bool:
    """-o names a folder (batch) when it is one, or ends in a separator, or has no file extension at all."""
    return output.is_dir() or str(output).endswith(("/", "\\")) or not output.suffix


def _predict_batch(args):
    from .batch.distribute import Collector, ModelSpec, run_on_dask, run_processes, worker_devices
    from .batch.cases import BatchSettings, Manifest, find_cases, run_batch, shard, summary
    from .io.images import check_writable

    started, output_dir = time.perf_counter(), Path(args.output)
    if args.previous_stage:
        raise InputError("--previous-stage takes one case's file; a folder of cases cannot use it.")
    if args.series:
        raise InputError("--series picks a series of one case's DICOM folder; a folder of cases cannot use it.")
    for given in args.input:
        if not Path(given).exists():
            raise InputError(f"Input not found: {given}.")
        if Path(given).resolve() == output_dir.resolve():
            raise InputError(f"The output folder {output_dir} is the folder of the cases; give another one "
                             "(a folder inside it is fine).")
    check_writable(output_dir)
    model, version, note = _open_model(args, args.folds, args.checkpoint)
    found, ignored = find_cases(args.input, model.channel_names, leave_out=[output_dir])
    cases = shard(found, args.parts, args.part)
    if not cases:
        raise InputError(f"No cases found in {', '.join(args.input)}" + (f" for part {args.part} of {args.parts}"
                         if found else "") + ": give image files (case.nii.gz or case_0000.nii.gz per channel) "
                         "or one DICOM series folder per case.")
    if note:
        print(note, file=sys.stderr)
    if ignored:
        print(f"note: left out {len(ignored)} file(s) that are not images (e.g. {ignored[0].name}).", file=sys.stderr)
    if args.dask and (args.workers or args.devices):
        raise InputError("--dask sends the cases to the cluster's workers; --workers and --devices start workers on "
                         "this machine: give one or the other.")
    devices = [] if args.dask else worker_devices(args.device, args.workers, args.devices)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(output_dir, [name for _, name in model.labels.output_segments()], args.parts, args.part)
    settings = BatchSettings(args.format, args.overwrite, args.device, args.step, not args.no_tta,
                             args.probabilities, not args.no_postprocessing,
                             overlap={"on": True, "off": False}.get(args.overlap), backend=args.backend)
    bar = _ProgressBar(enabled=not args.quiet and sys.stderr.isatty())
    try:
        if args.dask or devices:
            collector = Collector(len(cases), manifest, lambda result: _case_line(result, bar), bar)
            try:
                spread = run_on_dask if args.dask else run_processes
                where = args.dask if args.dask else devices
                results = spread(where, ModelSpec.of(model, version), model, cases, output_dir, settings, collector)
            finally:
                collector.close()
        else:
            results = run_batch(model, version, cases, output_dir, settings, manifest, progress=bar,
                                on_result=lambda result: _case_line(result, bar))
    except (Cancelled, KeyboardInterrupt) as stop:
        bar.close()
        kept = (f"Cancelled; the cases finished before are kept in {output_dir} and listed in "
                f"{manifest.csv_path.name}; the case being segmented was not written.")
        raise (Terminated if isinstance(stop, Terminated) else Cancelled)(kept) from None
    bar.close()
    for line in summary(results, time.perf_counter() - started):
        print(line)
    print(f"Manifest: {manifest.csv_path} and {manifest.json_path.name}")
    return EXIT_ERROR if any(r.status == "failed" for r in results) else 0


def _case_line(result, bar):
    """One line per finished case: on stdout, and a failure also on stderr (where errors go)."""
    bar.clear()
    if result.status == "failed":
        print(f"error: {result.case}: {result.reason}", file=sys.stderr)
    extra = f" in {result.seconds:.1f} s" if result.status == "segmented" else ""
    print(f"{result.case}: {result.status}{extra}" + (f" ({result.reason})" if result.status == "skipped" else ""),
          flush=True)


def _finetune(args):
    from .models.versions import ModelVersions
    from .tasks import finetune_version
    from .training.finetune import FinetuneSettings

    if len(args.images) != len(args.labels):
        raise SegmentError(f"Give one label map per case: {len(args.images)} case image(s) (-i) but "
                           f"{len(args.labels)} label map(s) (-l).")
    if len(args.val_image) != len(args.val_label):
        raise SegmentError(f"Give one label map per validation case: {len(args.val_image)} --val-image but "
                           f"{len(args.val_label)} --val-label.")
    model, version, note = _open_model(args, args.folds)
    cases = _read_cases(args.images, args.labels)
    validation = _read_cases(args.val_image, args.val_label)
    settings = FinetuneSettings(device=args.device, evaluate=not args.no_evaluation,
                                freeze_encoder=args.freeze_encoder, time_budget_s=args.time_budget)
    for field_name, value in (("iterations", args.iterations), ("learning_rate", args.lr), ("seed", args.seed)):
        if value is not None:
            setattr(settings, field_name, value)
    # finetune's progress text says the iteration, the loss and the time left
    bar = _ProgressBar(enabled=not args.quiet and sys.stderr.isatty(), note=note)
    new, result = finetune_version(model, model.folder.path, cases, validation, settings, progress=bar,
                                   target=args.output, configuration=args.configuration, started=STARTED)
    bar.close()
    name = ModelVersions(model.folder.path, configuration=args.configuration).name
    print(f"Wrote {new.id} of {name} (from {version.id}) to {new.path}; it is now the current version.")
    for which in ("training", "validation"):
        before = (result.dice_before.get(which) or {}).get("mean")
        after = (result.dice_after.get(which) or {}).get("mean")
        if after is not None:
            print(f"Dice on the {which} cases: " + (f"{before:.3f} -> " if before is not None else "") + f"{after:.3f}")
    stopped = f" ({result.stopped})" if result.stopped else ""
    budget = f" (time budget {result.budget_s:.0f} s)" if result.budget_s else ""
    print(f"{result.iterations} iterations per fold on {len(cases)} case(s){stopped}; "
          f"{time.perf_counter() - STARTED:.1f} s in all on {result.device}{budget}.")
    print(f"Time: {_timing_text(result.timing)}.")


def _timing_text(timing: dict) -> str:
    """Where a fine-tune's time went: 'preparing 0.1 s, Dice before 4.2 s, patches 1.9 s, network 281 s, ...'."""
    words = (("preparing_s", "preparing"), ("dice_before_s", "Dice before"), ("sampling_s", "drawing patches"),
             ("forward_backward_s", "network training steps"), ("dice_after_s", "Dice after"))
    return ", ".join(f"{word} {timing[key]:.1f} s" for key, word in words if key in timing)


def _read_cases(image_specs, label_paths):
    """CorrectedCase objects from the command line's case images ("a.nii.gz" or "a_0000.nii.gz,a_0001.nii.gz")."""
    from .io.images import read_channels, read_volume
    from .volume import CorrectedCase
    cases = []
    for spec, label_path in zip(image_specs, label_paths):
        channels = [p for p in spec.split(",") if p]
        images = read_channels(channels)
        labels = read_volume(label_path)
        cases.append(CorrectedCase(Path(channels[0]).name, images, labels))
    return cases


class _ProgressBar:
    """A one-line terminal progress bar; Ctrl+C cancels between tiles (or training iterations).

    `note` (which model is used) goes to stderr at the first report, that is once the inputs passed the
    checks: a user error stays the one line on stderr."""

    def __init__(self, enabled: bool, note: str = ""):
        self.enabled = enabled
        self.note = note
        self._last = 0.0

    def __call__(self, fraction: float, stage: str):
        if self.note:
            print(self.note, file=sys.stderr, flush=True)
            self.note = ""
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.1 and fraction < 1):
            return
        self._last = now
        filled = int(fraction * 30)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {fraction * 100:3.0f}% {stage[:70]:<70}")
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")

    def clear(self):
        """Blank the bar's line, so a line printed now starts at the left (the bar comes back at the next report)."""
        if self.enabled:
            sys.stderr.write("\r" + " " * 108 + "\r")


if __name__ == "__main__":
    sys.exit(main())
