"""Helpers shared by the Slicer module's tests (imported by name: `conftest` is ambiguous between
Testing/conftest.py and this folder's)."""
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
SCREENSHOTS = REPO / "Resources" / "Screenshots"


def load_volume(scene, path, name=None):
    """Load an image file into the scene through its storage node, as Slicer's "Add data" does."""
    import slicer
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or Path(path).name.split(".")[0])
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    node.CreateDefaultDisplayNodes()
    assert isinstance(node, slicer.vtkMRMLScalarVolumeNode)
    return node


def process_events(seconds=0.0):
    """Let Slicer's event loop run for `seconds` (the GIL held while Qt idles, as in Slicer)."""
    import slicer
    import slicer_app
    if seconds:
        slicer_app.run_event_loop(None, timeout=seconds)
    else:
        slicer.app.processEvents()


def process_running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, dead but not yet reaped, is not)."""
    import os
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # Linux: the state letter follows the parenthesised command name
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def wait_for(until, timeout=120.0, what="the job"):
    """Run Slicer's event loop until `until()` is true; fail after `timeout` seconds."""
    import slicer_app
    assert slicer_app.run_event_loop(until, timeout), f"{what} did not finish within {timeout:.0f} s"


def wait_for_panel(panel, timeout=120.0, until=None):
    """Run the event loop (the worker's messages arrive as Qt events) until the panel's job ends or `until()`."""
    wait_for(lambda: panel.jobs.job is None or bool(until and until()), timeout, "the panel's job")


def scene_state(scene) -> list:
    """What a user could see change: every node with its name, attributes and (for segmentations) each
    segment's name, colour, tags and voxel count."""
    state = []
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        entry = [node.GetID(), node.GetClassName(), node.GetName(),
                 sorted((a, node.GetAttribute(a)) for a in node.GetAttributeNames() or ())]
        if node.IsA("vtkMRMLSegmentationNode"):
            segmentation = node.GetSegmentation()
            for i in range(segmentation.GetNumberOfSegments()):
                segment = segmentation.GetNthSegment(i)
                entry.append((segmentation.GetNthSegmentID(i), segment.GetName(), tuple(segment.GetColor()),
                              _voxel_count(segment)))
        state.append(entry)
    return state


def _voxel_count(segment) -> int:
    import slicer
    from vtk.util import numpy_support
    image = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    if image is None or image.GetPointData().GetScalars() is None:
        return 0
    return int(np.count_nonzero(numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
                                == segment.GetLabelValue()))
