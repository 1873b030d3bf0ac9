"""What the engine needs of its Python environment, stated once (read without importing torch).

The Slicer module checks these before the first Segment (SegmentMBTFESlicer/dependencies.py) and the engine
refuses a torch older than MINIMUM["torch"] with the same number. torch 2.2 is the floor because it is the
newest torch for macOS x86_64, which is what Slicer's macOS releases run (under Rosetta); the engine keeps to
what torch 2.2 has (see compat.py for the numpy bridge that torch 2.2 lacks under numpy 2).
"""
MINIMUM = {"torch": "2.2", "numpy": "1.22", "scipy": "1.8", "SimpleITK": "2.2"}


def version_tuple(text: str):
    """(major, minor, patch) of '2.5.1+cu121' -> (2, 5, 1); enough to compare against the minimums."""
    import re
    numbers = [int(n) for n in re.findall(r"\d+", text.split("+")[0])[:3]]
    return tuple(numbers + [0] * (3 - len(numbers)))


def too_old(name: str, version: str) -> bool:
    return version_tuple(version) < version_tuple(MINIMUM[name])


def import_torch_quietly() -> None:
    """Import torch now, holding back numpy's warning when torch was built against numpy 1 and numpy is 2.

    That pair is macOS Slicer 5.10's (torch 2.2.2, numpy 2.0.2): numpy prints a long "A module that was compiled
    using NumPy 1.x cannot be run in NumPy 2..." with a traceback to stderr, while the engine does not need what
    it warns about (tensors.py). Elsewhere nothing is imported here: commands that need no torch stay quick.
    """
    import importlib.metadata
    import io
    import sys
    if "torch" in sys.modules:
        return
    try:
        numpy, torch = (importlib.metadata.version(name) for name in ("numpy", "torch"))
    except importlib.metadata.PackageNotFoundError:
        return
    if version_tuple(numpy) < (2,) or version_tuple(torch) >= (2, 3):  # torch 2.3 is built against numpy 2
        return
    stderr, sys.stderr = sys.stderr, io.StringIO()
    try:
        import torch  # noqa: F401
    except ImportError:
        pass  # a broken torch says so when the engine imports it again
    finally:
        sys.stderr = stderr
