"""A Slicer session without torch, in a process of its own, that installs it: prints one JSON line.

    PythonSlicer install_session.py SCENARIO WORK_DIR

Run with fake_packages' Slicer Python (this environment minus torch), pip pointed at a slow local index
(PIP_FIND_LINKS, PIP_NO_INDEX) and $FAKE_TORCH_MARKS collecting the pid of every process that imports the
fake torch. The PyTorch extension is there (the stand-in PyTorchUtils, which records its calls). The
event loop is Slicer's (the GIL held while Qt idles); a 10 ms timer measures how long the main thread
stalls, and records what the panel shows, while the scenario runs:

- panel: Segment clicked with torch missing: the install runs, then Segment goes on (its start recorded);
- cancel: Segment clicked, Cancel clicked once pip downloads; the install ends and its process is gone;
- console: SegmentMBTFELogic().ensureDependencies() (blocks, pumping events);
- pytorchutils: the stand-in PyTorchUtils' installTorch, as other extensions call it (imports torch here);
- upgrade: the command the "too old" message gives, typed into the console (slicer.util.pip_install).
"""
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class Meter:
    """The main thread's longest gap between two 10 ms timer ticks, and what the panel showed meanwhile."""

    def __init__(self, widget=None):
        import qt
        self.widget, self.longest, self.shown, self.busy_bar = widget, 0.0, [], False
        self._last = time.perf_counter()
        self.timer = qt.QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self.tick)
        self.timer.start()

    def tick(self):
        now = time.perf_counter()
        self.longest, self._last = max(self.longest, now - self._last), now
        if self.widget is not None:
            text = self.widget.ui.statusLabel.text()
            if not self.shown or self.shown[-1] != text:
                self.shown.append(text)
            self.busy_bar |= self.widget.ui.progressBar.maximum() == 0


def alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, TypeError):
        return False
    return True


def panel_session(scenario, report):
    import slicer
    import slicer_app
    import SegmentMBTFE
    from slicer_testing import load_volume
    from SegmentMBTFESlicer import logic, selftest
    import SimpleITK as sitk
    started = []
    logic.start_segmentation = lambda *args, **kwargs: started.append(args[1])  # the worker needs a real torch
    widget = SegmentMBTFE.SegmentMBTFEWidget()
    image = Path(sys.argv[2]) / "case.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(selftest.test_image()), str(image))
    widget.segment.channelSelectors()[0].setCurrentNode(load_volume(slicer.mrmlScene, image))
    widget.segment.addModelFolder(str(selftest.model_folder()))
    meter = Meter(widget)
    widget.ui.segmentButton.click()
    job = widget.jobs.job
    report["install_started"] = job is not None and job.kind == "install"
    if scenario == "cancel":
        slicer_app.run_event_loop(lambda: "Downloading" in widget.ui.statusLabel.text(), timeout=60)
        report["cancel_enabled"] = widget.ui.cancelButton.isEnabled()
        report["pid_before_cancel_alive"] = alive(job.pid)
        launcher = int(job.process.processId())
        report["behind_a_launcher"] = launcher != job.pid
        cancelled = time.perf_counter()
        widget.ui.cancelButton.click()
        report["cancelling_shown"] = widget.ui.statusLabel.text()
        slicer_app.run_event_loop(lambda: widget.jobs.job is None, timeout=30)
        report["cancel_seconds"] = time.perf_counter() - cancelled
        time.sleep(0.2)
        report["pid_after_cancel_alive"] = alive(job.pid) or alive(launcher)
    else:
        slicer_app.run_event_loop(lambda: widget.jobs.job is None, timeout=120)
    meter.timer.stop()
    report.update(longest_stall_ms=1000 * meter.longest, shown=meter.shown, busy_bar=meter.busy_bar,
                  status=widget.ui.statusLabel.text(), segmentation_started=bool(started),
                  busy_after=widget.jobs.busy)
    widget.cleanup()


def main(scenario, work_dir) -> dict:
    for path in (HERE.parent / "standins", HERE.parents[2] / "SegmentMBTFE", HERE):
        sys.path.insert(0, str(path))
    import ctk  # noqa: F401 - the .ui's custom widgets
    import slicer_app
    slicer_app.install(str(Path(work_dir) / "Slicer.ini"),
                       {"SegmentMBTFE": str(HERE.parents[2] / "SegmentMBTFE" / "SegmentMBTFE.py")})
    import importlib.metadata
    import slicer
    import PyTorchUtils
    from SegmentMBTFESlicer import dependencies
    report = {"missing_before": [r.distribution for r in dependencies.check().missing],
              "numpy_before": importlib.metadata.version("numpy"), "asked": []}
    # the user agrees (slicer-core's testing-mode answer, True, is no QMessageBox.Ok)
    slicer.util.confirmOkCancelDisplay = lambda text, *args, **kwargs: report["asked"].append(text) or True
    if scenario in ("panel", "cancel"):
        panel_session(scenario, report)
    elif scenario == "console":
        import SegmentMBTFE
        meter = Meter()
        SegmentMBTFE.SegmentMBTFELogic().ensureDependencies()
        report["longest_stall_ms"] = 1000 * meter.longest
    elif scenario == "pytorchutils":
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(torchVersionRequirement=">=2.2")
        report["returned"] = getattr(torch, "__version__", None)
    elif scenario == "upgrade":
        slicer.util.pip_install("torch==2.1.0 torchvision==0.16.0")   # what an old install left
        report["old"] = dependencies.too_old_message(dependencies.check())
        command = report["old"].split("run ")[1].split(" in the Python console")[0]
        exec(command, {"slicer": slicer})  # as typed into Slicer's Python console
    importlib.invalidate_caches()
    marks = Path(os.environ["FAKE_TORCH_MARKS"])
    report.update(
        missing_after=[r.distribution for r in dependencies.check().missing],
        too_old_after=dependencies.check().message(),
        torch=importlib.metadata.version("torch") if dependencies.installed_version("torch") else None,
        torchvision=dependencies.installed_version("torchvision"),
        numpy_after=importlib.metadata.version("numpy"),
        torch_in_sys_modules=sorted(n for n in sys.modules if n == "torch" or n.startswith("torch.")),
        torch_imported_here=str(os.getpid()) in (marks.read_text().split() if marks.exists() else []),
        pytorchutils_calls=[c if isinstance(c, str) else c[0] for c in PyTorchUtils.CALLS])
    return report


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:3])))
