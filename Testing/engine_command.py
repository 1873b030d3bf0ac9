"""The engine's command line as a user runs it, for tests that start it as a process of its own."""
import sys
from pathlib import Path


def cli_command(python: str = None) -> list:
    """`segment-mbtfe` of the environment whose interpreter is `python` (default: this one), or
    `python -m SegmentMBTFELib.cli` where that environment has no such script."""
    python = python or sys.executable
    script = Path(python).with_name("segment-mbtfe")
    return [str(script)] if script.is_file() else [python, "-m", "SegmentMBTFELib.cli"]
