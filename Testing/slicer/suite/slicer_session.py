"""A Slicer session in a process of its own, in which importing torch is impossible.

    python slicer_session.py IMAGE MODEL_FOLDER WORK_DIR   -> prints one JSON line describing what happened

It opens the module's panel the way Slicer's own code can (SegmentMBTFEWidget() without a parent), checks the
Python packages, clicks Segment on a real image, fine-tunes through the console API and segments files in a
batch, all under Slicer's GIL-holding event loop. An import hook refuses torch and records every attempt, so
a code path in Slicer's process that reaches for torch fails here, even where a caller would catch the error.
test_slicer_worker.py runs it; the pytest process itself imports torch for its reference computations.
"""
import importlib.abc
import importlib.machinery
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ATTEMPTS = []


class RefuseTorch(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """torch can be found (the dependency check asks whether it is installed) but not imported."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch" and not name.startswith("torch."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            spec.loader = self
        return spec

    def create_module(self, spec):
        ATTEMPTS.append(spec.name)
        raise ImportError(f"Slicer's process must not import {spec.name}")

    def exec_module(self, module):
        raise ImportError(f"Slicer's process must not import {module.__name__}")


def main(image, model, work_dir) -> dict:
    sys.meta_path.insert(0, RefuseTorch())
    os.environ["SEGMENTMBTFE_HOME"] = str(Path(work_dir) / "versions")
    for path in (HERE.parent / "standins", HERE.parents[2] / "SegmentMBTFE", HERE):
        sys.path.insert(0, str(path))
    import ctk  # noqa: F401 - the .ui's custom widgets
    import slicer_app
    slicer_app.install(str(Path(work_dir) / "Slicer.ini"),
                       {"SegmentMBTFE": str(HERE.parents[2] / "SegmentMBTFE" / "SegmentMBTFE.py")})
    import slicer
    from slicer_testing import load_volume

    import SegmentMBTFE
    from SegmentMBTFESlicer import dependencies, worker_process
    report = {"dependencies_ready": dependencies.check().ready}
    widget = SegmentMBTFE.SegmentMBTFEWidget()  # no parent: Slicer's base class runs setup() itself
    volume = load_volume(slicer.mrmlScene, image)
    widget.segment.addModelFolder(model)
    widget.segment.channelSelectors()[0].setCurrentNode(volume)
    widget.ui.ttaCheckBox.setChecked(False)
    widget.ui.segmentButton.click()
    slicer_app.run_event_loop(lambda: widget.jobs.job is None, timeout=120)
    node = widget.ui.outputSegmentationSelector.currentNode()
    report["status"] = widget.ui.statusLabel.text()
    report["segments"] = node.GetSegmentation().GetNumberOfSegments() if node is not None else 0

    logic = SegmentMBTFE.SegmentMBTFELogic()
    run = logic.finetune(node, volume, model=model, iterations=1)
    report["version"] = run.version.id
    report["written"] = [Path(p).name for p in logic.segmentFiles([image], model, Path(work_dir) / "out", tta=False)]
    report["worker_pid"] = worker_process.shared().ready.get("pid")
    widget.cleanup()
    report["torch_imported"] = sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))
    report["torch_attempts"] = ATTEMPTS
    return report


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
