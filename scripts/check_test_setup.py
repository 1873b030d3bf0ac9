#!/usr/bin/env python3
"""Stop the test suite before it starts when what its reference tests need is missing (scripts/test.sh runs this).

The tests that need the real data (../shared/data) or a reference package (nnU-Net v2 and v1, the Slicer core,
Qt, highdicom, dcmqi, ...) skip without it, so such a run would pass while checking little. This exits 1 with one
sentence naming what is missing; Testing/test_known_skips.py catches a skip for any other reason.
"""
import importlib.metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing"))

from nnunet_reference import DEFAULT_DATA_DIR  # noqa: E402  (found through the path above; imports no nnU-Net)

DATA_FOLDERS = ("hippocampus", "formats")
# The project's test extra, and nnU-Net v1 (test_nnunet_v1.py's reference), which scripts/setup-venv.sh installs
# on its own (--no-deps); Testing/requirements.txt lists the rest.
PROJECT, TEST_EXTRA, NNUNET_V1 = "SegmentMBTFE", "test", "nnunet"


def required_packages() -> list:
    lines = (ROOT / "Testing" / "requirements.txt").read_text().splitlines()
    names = [Requirement(line).name for line in lines if line.strip() and not line.lstrip().startswith("#")]
    try:
        extra = [Requirement(r) for r in importlib.metadata.requires(PROJECT) or []]
    except importlib.metadata.PackageNotFoundError:
        return [PROJECT] + names + [NNUNET_V1]
    return [r.name for r in extra if r.marker and r.marker.evaluate({"extra": TEST_EXTRA})] + names + [NNUNET_V1]


def missing() -> list:
    """What is missing, in words ([] when nothing is)."""
    found = []
    if not all((DEFAULT_DATA_DIR / folder).is_dir() for folder in DATA_FOLDERS):
        found.append(f"the real test data at {DEFAULT_DATA_DIR} (../shared/data beside the repository)")
    absent = []
    for name in required_packages():
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            absent.append(name)
    if absent:
        found.append(f"the package{'s' if len(absent) > 1 else ''} {', '.join(absent)} "
                     f"(scripts/setup-venv.sh --test installs {'them' if len(absent) > 1 else 'it'})")
    return found


def main() -> int:
    found = missing()
    if found:
        print(f"Cannot run the tests: missing {' and '.join(found)}.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
