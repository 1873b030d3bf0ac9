"""Slicer's half of the terminology: loading our terminology context into Slicer's Terminologies module.

The names, codes and the context file itself live in the engine (SegmentMBTFELib/io/terminology.py and
SegmentMBTFELib/io/SegmentMBTFE.term.json), so that the command line writes the same entries into .seg.nrrd
files as the module writes into segments. What only Slicer needs is the file loaded: the Segment Editor
shows a segment's terminology only when the context its entry names is loaded, so the module loads ours
at startup, as SlicerTotalSegmentator loads its own.
"""
from SegmentMBTFELib.io.terminology import TERMINOLOGY_FILE, context_name


def load_into_slicer() -> bool:
    """Load SegmentMBTFE.term.json into Slicer's terminologies logic; False where that module is absent
    (Slicer started without it, or no Slicer application) or the file could not be read."""
    import slicer
    module = getattr(slicer.modules, "terminologies", None)
    if module is None:
        return False
    # LoadTerminologyFromFile returns the context name it loaded ("" on failure) and replaces an earlier
    # load of the same context, so calling this again (module reload) is harmless.
    return module.logic().LoadTerminologyFromFile(str(TERMINOLOGY_FILE)) == context_name()
