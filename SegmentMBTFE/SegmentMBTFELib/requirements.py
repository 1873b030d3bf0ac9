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
