"""The worker process as Slicer's process sees it, under Slicer's own kind of event loop (the GIL held while Qt
idles) and behind Slicer's kind of launcher (standins/python_slicer.py: the worker is the launcher's child, no
signal is forwarded, a crash becomes exit code 1): it stays and keeps its models, exits cleanly when idle and
comes back, is killed, with nothing left running, when it does not answer a cancel or the module stops it, and
a worker that dies mid-run is reported as a crash and leaves the scene exactly as it was and the next Segment
working. Its warnings reach Slicer's log; one speaking another protocol is refused. Slicer's process never
imports torch (checked in a process of its own, slicer_session.py)."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from slicer_testing import load_volume, process_running, scene_state, wait_for, wait_for_panel

pytestmark = pytest.mark.timeout(300)
HERE = Path(__file__).resolve().parent


def job_folders() -> set:
    return set(Path(tempfile.gettempdir()).glob("SegmentMBTFE-*"))


def start_segment(widget, scene, model, image, tta=False):
    volume = load_volume(scene, image)
    widget.segment.addModelFolder(str(model))
    widget.ui.ttaCheckBox.setChecked(tta)
    widget.ui.segmentButton.click()
    assert widget.jobs.job is not None, widget.ui.statusLabel.text()
    return volume


def worker_pid() -> int:
    """The real worker's pid (behind the launcher, whose pid the QProcess knows), once the worker said it."""
    from SegmentMBTFESlicer import worker_process
    wait_for(lambda: worker_process.shared().pid is not None, timeout=60, what="the worker's first message")
    return worker_process.shared().pid


def test_the_event_loop_holds_the_gil_as_slicers_does(slicer_app):
    """The stand-in loop must starve Python threads as Slicer's does, or a thread-based design would pass here."""
    counts, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            counts[0] += 1
    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    time.sleep(0.5)  # releases the GIL: the thread runs freely
    free = counts[0]
    slicer_app.run_event_loop(None, timeout=0.5)  # Qt idles in C++ with the GIL held, Python only in timers
    held = counts[0] - free
    stop.set()
    thread.join()
    assert held < 0.2 * free, f"a Python thread advanced {held} steps in Slicer's loop, {free} when free"


def test_the_worker_stays_and_keeps_the_model(module, scene, hippo3d_model, hippo_case):
    from SegmentMBTFESlicer import worker_process
    logic = module.SegmentMBTFELogic()
    volume = load_volume(scene, hippo_case)
    first = logic.startSegmentation(volume, str(hippo3d_model), tta=False, show3D=False)
    wait_for(lambda: first.finished)
    pid = worker_pid()
    second = logic.startSegmentation(volume, str(hippo3d_model), tta=False, show3D=False)
    wait_for(lambda: second.finished)
    assert first.outcome.error is None and second.outcome.error is None, (first.outcome, second.outcome)
    assert second.reply["model_cached"] and worker_pid() == pid  # the same process, the model already loaded
    shared = worker_process.shared()  # started through the launcher, as inside Slicer: the real worker is its child
    assert Path(shared.python).name == "PythonSlicer" and pid != shared.process.processId()
    assert shared.ready["python"] == (os.environ.get("SEGMENTMBTFE_TEST_PYTHON_REAL") or sys.executable)
    assert not (job_folders() & {Path(first.folder), Path(second.folder)})  # the job folders are gone


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSEGV], ids=["killed", "segfault"])
def test_a_worker_that_dies_mid_run_changes_nothing_and_the_next_segment_works(
        widget, scene, hippo3d_model, hippo_case, large_hippo_case, how):
    before_folders = job_folders()
    start_segment(widget, scene, hippo3d_model, large_hippo_case)
    wait_for_panel(widget, until=lambda: "tile" in widget.ui.statusLabel.text())
    before = scene_state(scene)
    pid = worker_pid()
    os.kill(pid, how)  # the real worker: the launcher turns its death into exit code 1, as Slicer's does
    wait_for_panel(widget, timeout=30)

    status = widget.ui.statusLabel.text()
    assert status.startswith("Failed: The segmentation worker process crashed or was killed"), status
    assert "exit abnormally" not in status  # the launcher's line is no message from the worker
    assert "\n" not in status and scene_state(scene) == before and job_folders() == before_folders
    widget.ui.segmentButton.click()  # a new worker, transparently
    wait_for_panel(widget)
    assert widget.ui.statusLabel.text().startswith("Done"), widget.ui.statusLabel.text()
    assert worker_pid() != pid


def test_a_worker_that_does_not_answer_cancel_is_killed_within_two_seconds(
        widget, scene, hippo3d_model, large_hippo_case):
    before_folders = job_folders()
    start_segment(widget, scene, hippo3d_model, large_hippo_case)
    wait_for_panel(widget, until=lambda: "tile" in widget.ui.statusLabel.text())
    before = scene_state(scene)
    pid = worker_pid()
    os.kill(pid, signal.SIGSTOP)  # frozen: it cannot answer
    started = time.perf_counter()
    widget.ui.cancelButton.click()
    wait_for_panel(widget, timeout=30)
    elapsed = time.perf_counter() - started

    assert widget.ui.statusLabel.text() == "Cancelled: nothing was changed."
    assert 1.9 < elapsed < 6, elapsed
    assert scene_state(scene) == before and job_folders() == before_folders
    assert not process_running(pid)  # the real worker, not only the launcher in front of it


def test_an_idle_worker_exits_cleanly_and_comes_back(module, scene, hippo3d_model, hippo_case, caplog):
    import qt
    from SegmentMBTFESlicer import worker_process
    qt.QSettings().setValue(worker_process.SETTINGS_IDLE, 0.03)  # minutes: 1.8 s
    worker_process.stop_shared()
    logic = module.SegmentMBTFELogic()
    volume = load_volume(scene, hippo_case)
    with caplog.at_level("DEBUG", logger=worker_process.__name__):  # the worker's stderr, line by line
        logic.segment(volume, str(hippo3d_model), tta=False, show3D=False)
        shared = worker_process.shared()
        process = shared.process
        wait_for(lambda: not shared.running, timeout=30, what="the idle worker's exit")
    assert shared.exit_reason == "idle"
    stderr = "\n".join(r.getMessage() for r in caplog.records if r.getMessage().startswith("SegmentMBTFE worker:"))
    assert process.exitStatus() == qt.QProcess.NormalExit and process.exitCode() == 0, stderr
    assert "Fatal Python error" not in stderr
    qt.QSettings().remove(worker_process.SETTINGS_IDLE)
    node = logic.segment(volume, str(hippo3d_model), tta=False, show3D=False)  # started again, transparently
    assert node.GetSegmentation().GetNumberOfSegments() == 2 and shared.running


def test_cleanup_mid_run_is_quick_and_ends_the_worker(widget, scene, hippo3d_model, large_hippo_case):
    import slicer
    from SegmentMBTFESlicer import jobs, worker_process
    start_segment(widget, scene, hippo3d_model, large_hippo_case, tta=True)
    wait_for_panel(widget, until=lambda: "tile" in widget.ui.statusLabel.text())
    before = scene_state(scene)
    pid = worker_pid()
    os.kill(pid, signal.SIGSTOP)  # stuck (in a long C call, say): it cannot exit by itself
    started = time.perf_counter()
    slicer.app.moduleManager().unload("SegmentMBTFE")  # what Slicer does at exit: the widget's cleanup() runs
    assert time.perf_counter() - started < 3  # half a second for the worker to exit, then it is killed
    assert not process_running(pid)  # nothing left behind the launcher
    assert not worker_process.shared().running and widget.jobs.job is None and not jobs.is_running()
    assert widget.ui.statusLabel.text() == "Cancelled: nothing was changed."
    assert scene_state(scene) == before


def test_a_worker_stopped_mid_job_ends_it_as_cancelled_not_crashed(widget, scene, hippo3d_model, large_hippo_case):
    """Reload (or an exit) may have to kill a busy worker: its job is cancelled, whichever panel or console
    call started it, and the scene is unchanged."""
    from SegmentMBTFESlicer import worker_process
    start_segment(widget, scene, hippo3d_model, large_hippo_case, tta=True)
    wait_for_panel(widget, until=lambda: "tile" in widget.ui.statusLabel.text())
    before = scene_state(scene)
    pid = worker_pid()
    os.kill(pid, signal.SIGSTOP)  # frozen: it cannot exit by itself, and nothing may be left running
    worker_process.stop_shared(wait_ms=0)  # no time to exit by itself: killed
    wait_for_panel(widget)
    assert widget.ui.statusLabel.text() == "Cancelled: nothing was changed."
    assert scene_state(scene) == before and not process_running(pid)


STARTS_A_CHILD = """
import os, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from SegmentMBTFELib.worker import _lead_own_process_group
_lead_own_process_group()  # as the worker does first
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(os.getpid(), child.pid, flush=True)
time.sleep(120)
"""


def test_killing_the_worker_ends_what_it_started(slicer_app):
    """Behind the launcher, as the worker runs: ending it by its pid ends the processes it started too."""
    from SegmentMBTFESlicer import worker_process
    launcher = subprocess.Popen([worker_process.worker_python(), "-c", STARTS_A_CHILD, str(worker_process.ENGINE_DIR)],
                                stdout=subprocess.PIPE, text=True)
    try:
        real, child = map(int, launcher.stdout.readline().split())
        assert real != launcher.pid and os.getpgid(child) == real  # the group the worker leads holds its child
        worker_process.end_process_tree(real)
        assert launcher.wait(timeout=10) == 1  # the launcher saw its child killed
        wait_for(lambda: not process_running(child), timeout=5, what="the end of the worker's child")
        assert not process_running(real)
    finally:
        launcher.kill()
        launcher.wait()


def test_the_workers_warnings_reach_slicers_log(module, scene, tiny_model, hippo_case, caplog):
    from SegmentMBTFESlicer import worker_process
    logic = module.SegmentMBTFELogic()
    logic.segment(load_volume(scene, hippo_case), str(tiny_model), tta=False, show3D=False)  # a worker runs
    with caplog.at_level("WARNING", logger=worker_process.__name__):
        worker_process.shared().process.write(b"not a request\n")  # the worker logs a warning about it
        wait_for(lambda: any("not a JSON object" in r.getMessage() for r in caplog.records), timeout=30,
                 what="the worker's warning")
    record = next(r for r in caplog.records if "not a JSON object" in r.getMessage())
    assert record.levelname == "WARNING" and record.getMessage().startswith("SegmentMBTFE worker: ignored a line")


def test_a_worker_speaking_another_protocol_is_refused(module, scene, tiny_model, hippo_case, monkeypatch):
    from SegmentMBTFELib import exchange
    from SegmentMBTFESlicer import jobs, worker_process
    worker_process.stop_shared()
    monkeypatch.setattr(exchange, "PROTOCOL", exchange.PROTOCOL + 1)  # this module, newer than its worker
    volume = load_volume(scene, hippo_case)
    before = scene_state(scene)
    job = module.SegmentMBTFELogic().startSegmentation(volume, str(tiny_model), tta=False, show3D=False)
    pid = worker_pid()
    wait_for(lambda: job.finished, timeout=60)
    assert isinstance(job.outcome.error, jobs.WorkerDied), job.outcome
    assert str(job.outcome.error) == (f"The segmentation worker speaks protocol {exchange.PROTOCOL - 1} and this "
                                      f"module {exchange.PROTOCOL}, so it was refused: they come from different "
                                      f"versions of SegmentMBTFE; restart Slicer, or reinstall the extension if "
                                      f"this persists.")
    assert scene_state(scene) == before and not process_running(pid) and not jobs.is_running()


def test_messages_the_module_does_not_understand_are_logged_never_run(slicer_app, caplog, tmp_path):
    from SegmentMBTFESlicer import worker_process
    marker = tmp_path / "ran"
    process = worker_process.WorkerProcess()
    with caplog.at_level("WARNING"):
        process._handle(b"Traceback (most recent call last): not a message")
        process._handle(json.dumps({"type": "exec", "code": f"open({str(marker)!r}, 'w')"}).encode())
        process._handle(json.dumps({"id": 12345, "type": "result", "labels": "../../etc/passwd"}).encode())
    assert len([r for r in caplog.records if "ignored" in r.getMessage()]) == 3 and not marker.exists()


def test_slicers_process_never_imports_torch(tiny_model, hippo_case, tmp_path):
    result = subprocess.run([sys.executable, str(HERE / "slicer_session.py"), str(hippo_case), str(tiny_model),
                             str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["dependencies_ready"] and report["segments"] == 2, report
    assert report["version"] == "v1" and report["written"] == [hippo_case.name.replace(".nii.gz", ".seg.nrrd")]
    assert report["torch_imported"] == [] and report["torch_attempts"] == [], report
