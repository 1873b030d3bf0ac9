"""`python -m SegmentMBTFELib ...` is `segment-mbtfe ...`: how the Slicer module starts its worker with
Slicer's own Python (PythonSlicer), where the `segment-mbtfe` script is not installed."""
import sys

from .cli import main

sys.exit(main())
