"""`segment-mbtfe`: segment images and inspect models from a terminal.

    segment-mbtfe predict -m MODEL -i IMAGE [IMAGE ...] -o OUTPUT.nii.gz|.nrrd|.seg.nrrd|.mha
    segment-mbtfe models info MODEL
    segment-mbtfe nnunet-trainer register     (lets nnUNetv2_train use -tr nnUNetTrainerMBTFE)

User mistakes end with one line on stderr and a non-zero exit, never a traceback (unless --debug), and
never a partial output file: outputs are written only after prediction succeeded, atomically.
"""
import argparse
import logging
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .errors import Cancelled, SegmentError

EXIT_ERROR, EXIT_CANCELLED = 1, 130


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.ERROR, format="%(message)s")
    try:
        return args.run(args) or 0
    except Cancelled as error:
        print(f"\n{error}", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        print("\nCancelled; nothing was written.", file=sys.stderr)
        return EXIT_CANCELLED
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segment-mbtfe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and log details")
    commands = parser.add_subparsers(title="commands")

    predict = commands.add_parser("predict", help="segment one case")
    predict.add_argument("-m", "--model", required=True, help="nnU-Net v2 model folder")
    predict.add_argument("-i", "--input", nargs="+", required=True, metavar="IMAGE",
                         help="one image per model channel: NIfTI, NRRD, MHA file or DICOM series folder")
    predict.add_argument("-o", "--output", required=True,
                         help="label map to write: .nii.gz, .nii, .nrrd, .mha, or .seg.nrrd for Slicer segments")
    predict.add_argument("-c", "--configuration", help="2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres")
    predict.add_argument("-f", "--folds", nargs="+", help="folds to ensemble (default: all present)")
    predict.add_argument("--checkpoint", default="final", help="final (default), best, or a .pth file name")
    predict.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    predict.add_argument("--step", type=float, default=0.5, help="tile step as a fraction of the patch (0.5)")
    predict.add_argument("--no-tta", action="store_true", help="no mirroring test-time augmentation (~8x faster)")
    predict.add_argument("--probabilities", action="store_true",
                         help="also write per-class probabilities to OUTPUT's name + .npz (as nnU-Net)")
    predict.add_argument("--no-postprocessing", action="store_true",
                         help="ignore the model folder's postprocessing.json")
    predict.add_argument("--previous-stage", help="3d_lowres prediction (for 3d_cascade_fullres)")
    predict.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    predict.set_defaults(run=_predict)

    models = commands.add_parser("models", help="inspect models").add_subparsers(title="model commands")
    info = models.add_parser("info", help="labels, channels, configurations, folds, patch size, spacing")
    info.add_argument("model")
    info.add_argument("-c", "--configuration")
    info.set_defaults(run=_info)

    from .nnunet_trainer.commands import add_parser as add_trainer_commands
    add_trainer_commands(commands)  # `nnunet-trainer register|unregister|status|path` (for nnUNetv2_train)
    return parser


def _predict(args):
    from .imageio import read_channels, read_volume
    from .model import load_model
    from .writers import output_format, write_prediction

    output = Path(args.output)
    output_format(output)  # refuse an unknown extension before minutes of work
    started = time.perf_counter()
    volumes = read_channels(args.input)
    previous = read_volume(args.previous_stage) if args.previous_stage else None
    model = load_model(args.model, args.configuration, args.folds, args.checkpoint)
    bar = _ProgressBar(enabled=not args.quiet and sys.stderr.isatty())
    prediction = model.predict(volumes, device=args.device, step_size=args.step, tta=not args.no_tta,
                               probabilities=args.probabilities, postprocess=not args.no_postprocessing,
                               previous_stage=previous, progress=bar)
    bar.close()
    for message in prediction.messages:
        print(f"note: {message}", file=sys.stderr)
    written = write_prediction(prediction, output)
    names = ", ".join(name for _, name in prediction.segments)
    print(f"Wrote {', '.join(str(p) for p in written)} ({names}) in {time.perf_counter() - started:.1f} s "
          f"on {prediction.settings['device']}.")


def _info(args):
    from .modelfolder import ModelFolder
    folder = ModelFolder(args.model, args.configuration)
    c = folder.configuration
    rows = [
        ("Model", folder.name),
        ("Folder", str(folder.path)),
        ("Trainer", folder.trainer_name or "unknown"),
        ("Channels", ", ".join(f"{i}: {n}" for i, n in enumerate(folder.channel_names))),
        ("Labels", ", ".join(f"{v}: {n}" for v, n in folder.labels.output_segments())
         + (" (regions)" if folder.labels.has_regions else "")),
        ("Configurations", ", ".join(folder.plans.get("configurations", {}))),
        ("Configuration", c.name + (f" (refines {c.previous_stage})" if c.previous_stage else "")),
        ("Folds", ", ".join(folder.available_folds("final")) or "none with checkpoint_final.pth"),
        ("Folds (best)", ", ".join(folder.available_folds("best")) or "none"),
        ("Network", c.architecture["network_class_name"].rsplit(".", 1)[-1]),
        ("Patch size", " x ".join(str(p) for p in c.patch_size)),
        ("Spacing", " x ".join(f"{s:g}" for s in c.spacing) + " mm"),
        ("Normalization", ", ".join(c["normalization_schemes"])),
        ("Postprocessing", "yes" if folder.postprocessing() else "none"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


class _ProgressBar:
    """A one-line terminal progress bar; Ctrl+C cancels between tiles."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._last = 0.0

    def __call__(self, fraction: float, stage: str):
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.1 and fraction < 1):
            return
        self._last = now
        filled = int(fraction * 30)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {fraction * 100:3.0f}% {stage[:60]:<60}")
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")


if __name__ == "__main__":
    sys.exit(main())
