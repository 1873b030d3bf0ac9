"""`python -m SegmentMBTFELib.training.nnunet_trainer register|unregister|status|path` (also usable from cli.py).

    add_parser(subparsers)  # adds `nnunet-trainer` with these subcommands to another argparse command line
"""
import argparse
import sys

from . import registration

COMMANDS = {
    "register": "copy the MBTFE, UNet++, SegResNetVAE and 3D U-Net trainers into the installed nnunetv2 "
                "(nnUNetv2_train -tr nnUNetTrainerMBTFE, nnUNetTrainerUNetPlusPlus, ...); "
                "with --ext-trainer print the nnUNet_extTrainer line instead",
    "unregister": "remove them from the installed nnunetv2",
    "status": "say whether they are registered, and where",
    "path": "print the folder to list in nnUNet_extTrainer instead of registering (nnunetv2 2.8.1 has it)",
}


def _register(args):
    if args.ext_trainer:  # nothing is written: eval "$(segment-mbtfe nnunet-trainer register --ext-trainer)"
        print(registration.external_trainer_line())
        return
    print(f"Registered the MBTFE, UNet++, SegResNetVAE and 3D U-Net trainers: {registration.register()}")


def _unregister(args):
    removed = registration.unregister()
    print("Removed the MBTFE trainers from nnunetv2." if removed else "The MBTFE trainers were not registered.")


def _status(args):
    path = registration.registered_path()
    if registration.is_registered():
        print(f"registered: {path}")
    elif path.exists():
        print(f"registered from another SegmentMBTFE version: {path} (run register to update)")
    else:
        print(f"not registered (nnunetv2 trainer folder: {path.parent})")


def _path(args):
    print(registration.external_trainer_folder())


def add_commands(parser: argparse.ArgumentParser) -> None:
    """Adds the subcommands; each sets `run`, a function of the parsed arguments (as cli.py expects)."""
    commands = parser.add_subparsers(title="commands")
    for name, run in (("register", _register), ("unregister", _unregister), ("status", _status), ("path", _path)):
        commands.add_parser(name, help=COMMANDS[name]).set_defaults(run=run)
    commands.choices["register"].add_argument("--ext-trainer", action="store_true",
                         help="print `export nnUNet_extTrainer=...` for nnU-Net to find the trainers in their own "
                              "folder, instead of writing into nnU-Net's package (nnunetv2 2.8.1 reads it)")


def add_parser(subparsers) -> None:
    """`nnunet-trainer ...` as a subcommand of another command line (e.g. segment-mbtfe's)."""
    add_commands(subparsers.add_parser("nnunet-trainer", help="register the MBTFE, UNet++, SegResNetVAE and 3D U-Net "
                                                              "trainers with nnU-Net v2"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m SegmentMBTFELib.training.nnunet_trainer",
                                     description="Make nnU-Net v2 find the MBTFE-UNet trainers.")
    add_commands(parser)
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        args.run(args)
    except registration.RegistrationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
