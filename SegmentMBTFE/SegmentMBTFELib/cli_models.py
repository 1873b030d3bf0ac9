"""`segment-mbtfe models ...`: list, add and remove models, inspect them, choose among their versions; and -m, the
model a command works on (cli.py's predict and finetune read it here too)."""
from pathlib import Path


def add_parser(commands):
    """`models list|add|remove|info|versions|use|rollback|delete` under the command line's `commands`."""
    models = commands.add_parser("models", help="list, add and remove models; inspect them and their versions"
                                 ).add_subparsers(title="model commands")
    listing = models.add_parser("list", help="every model by name: shipped, added and registered")
    listing.set_defaults(run=_list)
    add = models.add_parser("add", help="add a model folder or an nnU-Net model zip (nnUNetv2_export_model_to_zip)",
                            description="Copy a trained nnU-Net v2 model folder (or the dataset folder above it), or "
                                        "unpack a zip made by nnUNetv2_export_model_to_zip, into the models folder "
                                        "of the user's SegmentMBTFE folder; --link registers a folder where it is.")
    add.add_argument("path", metavar="PATH", help="model folder, dataset folder or model zip")
    add.add_argument("--name", help="the name to use with -m (default: the dataset folder's name)")
    add.add_argument("--link", action="store_true",
                     help="register the folder where it is instead of copying it (remove then only forgets it)")
    add.set_defaults(run=models_add)
    remove = models.add_parser("remove", help="delete an added model; forget a registered one (its folder stays)")
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(run=_remove)
    info = models.add_parser("info", help="labels, channels, configurations, folds, patch size, spacing")
    info.add_argument("model", help="model folder or name (models list)")
    info.add_argument("-c", "--configuration")
    info.set_defaults(run=_info)

    versions = models.add_parser("versions", help="list a model's versions (* marks the current one)")
    versions.add_argument("model", nargs="?", help="model folder or name (default: the shipped default model)")
    model_options(versions, positional=True)
    versions.set_defaults(run=_versions)
    use = models.add_parser("use", help="make a version current: original, v1, v2...")
    model_options(use)
    use.add_argument("version_id", metavar="VERSION")
    use.set_defaults(run=_use)
    rollback = models.add_parser("rollback", help="make the current version's parent current")
    model_options(rollback)
    rollback.set_defaults(run=_rollback)
    delete = models.add_parser("delete", help="delete a version and its folder (never the original)")
    model_options(delete)
    delete.add_argument("version_id", metavar="VERSION")
    delete.set_defaults(run=_delete)


def model_options(parser, positional=False):
    model_option(parser, positional)
    parser.add_argument("-c", "--configuration", help="configuration of a dataset folder with several")


def model_option(parser, positional=False):
    """-m: what every command that works on one model reads with chosen_model."""
    parser.add_argument("-m", "--model", dest="model_option" if positional else "model",
                        help="model folder or name (models list; default: the shipped default model)")


def chosen_model(args) -> Path:
    """-m (or the positional MODEL): a folder or a name `models list` shows; else the default shipped model."""
    from .models.home import model_path
    from .models.shipped import default_model
    given = getattr(args, "model_option", None) or getattr(args, "model", None)
    return model_path(given) if given else default_model()


def _info(args):
    from .models.opening import open_model_folder
    from .models.table import network_text
    folder = open_model_folder(chosen_model(args), args.configuration)
    c = folder.configuration
    rows = [
        ("Model", folder.name),
        ("Folder", str(folder.path)),
        ("Trainer", folder.trainer_name or "unknown"),
        ("Channels", ", ".join(f"{i}: {n}" for i, n in enumerate(folder.channel_names))),
        ("Labels", ", ".join(f"{v}: {n}" for v, n in folder.labels.output_segments())
         + (" (regions)" if folder.labels.has_regions else "")),
        ("Configurations", ", ".join(folder.plans.get("configurations", {})) or folder.configuration.name),
        ("Configuration", c.name + (f" (refines {c.previous_stage})" if c.previous_stage else "")),
        ("Folds", ", ".join(folder.available_folds("final")) or f"none with {folder.checkpoint_filename('final')}"),
        ("Folds (best)", ", ".join(folder.available_folds("best")) or "none"),
        ("Network", network_text(c.architecture, folder.trainer_name or "")),
        ("Patch size", " x ".join(str(p) for p in c.patch_size)),
        ("Spacing", " x ".join(f"{s:g}" for s in c.spacing) + " mm"),
        ("Normalization", ", ".join(c["normalization_schemes"])),
        ("Postprocessing", "yes" if folder.postprocessing() else "none"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _list(args):
    from .models.home import installed
    from .models.table import models_table
    print(models_table(installed()))


def models_add(args):
    from .models.home import add, listed_at, models_home
    from .models.table import configurations_text
    already = listed_at(args.path) if Path(args.path).is_dir() else None
    if already is not None:
        print(f"{args.path} is already listed, as {already.name} ({already.source}).")
        return
    model = add(args.path, args.name, link=args.link)
    how = "registered where it is" if args.link else f"copied into {models_home()}" if Path(args.path).is_dir() \
        else f"unpacked into {models_home()}"
    print(f"Added {model.name} ({how}): {configurations_text(model)}. Use it with -m {model.name}.")


def _remove(args):
    from .models.home import REGISTERED, remove
    model = remove(args.name)
    if model.source == REGISTERED:
        print(f"Forgot {model.name}; its folder {model.path} was left as it is.")
    else:
        print(f"Removed {model.name} and deleted its folder {model.path}.")


def _versions(args):
    from .models.versions import ModelVersions
    versions = ModelVersions(chosen_model(args), configuration=args.configuration)
    print(f"Versions of {versions.name} ({versions.original}):")
    for version in versions.list():
        where = f"  {version.path}" if version.id != "original" else ""
        print(f"{'*' if version.current else ' '} {version.summary()}{where}")


def _use(args):
    from .models.versions import ModelVersions
    version = ModelVersions(chosen_model(args), configuration=args.configuration).use(args.version_id)
    print(f"Now using {version.summary()}.")


def _rollback(args):
    from .models.versions import ModelVersions
    version = ModelVersions(chosen_model(args), configuration=args.configuration).rollback()
    print(f"Rolled back; now using {version.summary()}.")


def _delete(args):
    from .models.versions import ModelVersions
    versions = ModelVersions(chosen_model(args), configuration=args.configuration)
    folder = versions.get(args.version_id).path
    versions.delete(args.version_id)
    print(f"Deleted {args.version_id} ({folder}); now using {versions.current().summary()}.")
