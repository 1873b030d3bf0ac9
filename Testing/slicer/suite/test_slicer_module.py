"""Defects a real Slicer would hit, each found by reading Slicer's, CTK's and PythonQt's sources, each a test that
fails without its fix: a widget made without a parent, a second package install started while the first runs,
a self-test that would install packages, a loaded scene's panel settings, a segmentation deleted while
the console's segment() waits, Reload leaving the module's packages (and the worker) as they were, a console
call given no output folder, a worker that cannot be started at all, and background calls that skipped the
package check."""
import sys
import unittest

import pytest

from slicer_testing import load_volume, scene_state, wait_for_panel

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def missing_package(monkeypatch, tmp_path):
    """A requirement this environment lacks (the check stays the real one), installed for real, by pip in its
    own process, from a local wheel into a folder on sys.path (never into this environment); the install
    plans the module made are recorded."""
    import slicer
    import fake_packages
    from SegmentMBTFESlicer import dependencies
    absent = dependencies.Requirement("segmentmbtfe_absent_module", "segmentmbtfe-absent-package", "1.0")
    monkeypatch.setattr(dependencies, "REQUIREMENTS", dependencies.REQUIREMENTS + (absent,))
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *args, **kwargs: True)
    package = fake_packages.wheel(tmp_path, "segmentmbtfe_absent_package", "1.0",
                                  {"segmentmbtfe_absent_module.py": "\n"})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    plans = []

    def install_steps(status, constraints, light_the_torch=None):
        plans.append([r.distribution for r in status.missing])
        return [("Installing segmentmbtfe-absent-package", "pip",
                 ["install", "--no-index", "--target", str(tmp_path / "site"), str(package)])]
    monkeypatch.setattr(dependencies, "install_steps", install_steps)
    return plans


def test_a_widget_made_without_a_parent_sets_itself_up(module, scene, tiny_model):
    """ScriptedLoadableModuleWidget.__init__(parent=None) calls setup() itself, before the subclass's __init__
    goes on: what setup() needs must exist by then."""
    widget = module.SegmentMBTFEWidget()
    try:
        assert widget.parent.isVisible() and widget.segment.currentModel() is not None
        assert widget.segment.addModelFolder(str(tiny_model)) is not None
    finally:
        widget.cleanup()
        widget.parent.deleteLater()


def test_packages_are_installed_once_however_often_the_user_clicks(widget, scene, tiny_model, missing_package):
    """The install runs in the background: the user can click again meanwhile, and the Segment goes on after it."""
    import slicer_app
    volume = load_volume(scene, selftest_image(scene))
    widget.segment.addModelFolder(str(tiny_model))
    widget.segment.channelSelectors()[0].setCurrentNode(volume)
    widget.ui.segmentButton.click()
    assert widget.jobs.job is not None and widget.jobs.job.kind == "install"
    slicer_app.run_event_loop(lambda: "Installing" in widget.ui.statusLabel.text(), timeout=30)
    states = [(widget.ui.segmentButton.isEnabled(), widget.ui.finetuneButton.isEnabled(),
               widget.ui.cancelButton.isEnabled())]
    widget.ui.segmentButton.click()  # the impatient second click
    widget.segment.onSegmentButton()  # even one that reaches the handler
    widget.finetune.onFinetuneButton()
    wait_for_panel(widget, until=lambda: widget.jobs.job is not None and widget.jobs.job.kind != "install")
    wait_for_panel(widget)
    assert missing_package == [["segmentmbtfe-absent-package"]] and states == [(False, False, True)]
    assert widget.ui.statusLabel.text().startswith("Done"), widget.ui.statusLabel.text()


def test_the_self_test_never_installs_anything(module, scene, missing_package):
    with pytest.raises(unittest.SkipTest, match="segmentmbtfe-absent-package.*click Segment once"):
        module.SegmentMBTFETest().runTest()
    assert missing_package == []


def test_loading_a_scene_brings_its_panel_settings(widget, scene, tiny_model, tmp_path):
    import slicer
    volume = load_volume(scene, selftest_image(scene, tmp_path / "case.nrrd"), "case")
    widget.segment.addModelFolder(str(tiny_model))
    widget.ui.deviceSelector.setCurrentIndex(widget.ui.deviceSelector.findData("cpu"))
    widget.ui.ttaCheckBox.setChecked(False)
    widget.ui.stepSizeSpinBox.setValue(0.7)
    widget.ui.foldsLineEdit.setText("0")
    scene.SetURL(str(tmp_path / "saved.mrml"))
    assert scene.Commit()
    widget.ui.ttaCheckBox.setChecked(True)  # changed after saving
    widget.ui.stepSizeSpinBox.setValue(0.5)
    widget.ui.foldsLineEdit.setText("")
    slicer.app.processEvents()

    scene.SetURL(str(tmp_path / "saved.mrml"))
    assert scene.Connect()  # File > Load Scene: close, then import

    assert not widget.ui.ttaCheckBox.isChecked() and widget.ui.stepSizeSpinBox.value() == 0.7
    assert widget.ui.foldsLineEdit.text() == "0" and widget.ui.deviceSelector.currentText() == "CPU"
    loaded = scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
    assert loaded.GetName() == volume.GetName() and widget.segment.inputVolumes() == [loaded]


def test_a_segmentation_deleted_while_the_console_waits_gets_nothing(module, scene, tiny_model):
    from SegmentMBTFELib.errors import InputError
    volume = load_volume(scene, selftest_image(scene))
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "to be deleted")

    def delete_at_first_tile(fraction, text):
        if "tile" in text and output.GetScene() is not None:
            scene.RemoveNode(output)  # the user deletes it in the Data module while segment() waits
            state.append(scene_state(scene))
    state = []
    with pytest.raises(InputError, match="to be deleted was deleted while segmenting; nothing was written"):
        module.SegmentMBTFELogic().segment(volume, str(tiny_model), outputSegmentation=output, tta=False,
                                           progress=delete_at_first_tile)
    assert state and scene_state(scene) == state[0]
    assert output.GetSegmentation().GetNumberOfSegments() == 0


def test_segment_files_without_an_output_folder_says_so_and_leaves_nothing_busy(module, scene, tiny_model, tmp_path):
    from SegmentMBTFELib.errors import InputError
    from SegmentMBTFESlicer import jobs
    logic = module.SegmentMBTFELogic()
    with pytest.raises(InputError, match=r"folder to write the segmentations into \(outputDir\)"):
        logic.segmentFiles([selftest_image(scene)], str(tiny_model), None)
    assert not jobs.is_running()  # every later Segment and console call would be refused as "already running"
    with pytest.raises(TypeError):  # any request that cannot be made: the flag is taken only after it is made
        logic.segmentFiles([None], str(tiny_model), tmp_path)
    assert not jobs.is_running()


def test_a_worker_that_cannot_be_started_fails_the_job_in_one_sentence(module, scene, tiny_model, monkeypatch):
    """QProcess reports some start failures at once, inside start() (no program; on Windows, CreateProcess)."""
    from SegmentMBTFESlicer import jobs, worker_process
    worker_process.stop_shared()
    monkeypatch.setattr(worker_process.shared(), "python", "")
    volume = load_volume(scene, selftest_image(scene))
    with pytest.raises(worker_process.WorkerUnavailable, match=r"^The segmentation worker could not be started with "
                                                       r"\(no program\) \(.+\)\.$"):
        module.SegmentMBTFELogic().startSegmentation(volume, str(tiny_model), tta=False)
    assert not jobs.is_running() and worker_process.shared()._jobs == {} and worker_process.shared().process is None


def test_background_calls_check_the_packages_first(module, scene, tiny_model, missing_package, monkeypatch, tmp_path):
    """As segment() does: without it a missing torch ended in the worker dying at import, and the advice to
    use fewer folds or TTA off."""
    from SegmentMBTFESlicer import dependencies, jobs, worker_process

    def failing_install(status, constraints, light_the_torch=None):  # pip really runs, and fails
        missing_package.append([r.distribution for r in status.missing])
        return [("Installing", "pip", ["install", "--no-index", str(tmp_path / "no-such-package-1.0-py3-none-any.whl")])]
    monkeypatch.setattr(dependencies, "install_steps", failing_install)
    started = worker_process.shared().started
    logic = module.SegmentMBTFELogic()
    volume = load_volume(scene, selftest_image(scene))
    with pytest.raises(dependencies.DependencyError):
        logic.startSegmentation(volume, str(tiny_model), tta=False)
    with pytest.raises(dependencies.DependencyError):
        logic.startFinetune(None, model=str(tiny_model))
    assert len(missing_package) == 2 and worker_process.shared().started == started and not jobs.is_running()


@pytest.fixture
def reloadable(module):
    """Reload replaces the module's packages in sys.modules; the session's other tests keep the originals."""
    from SegmentMBTFESlicer import worker_process
    saved = {name: m for name, m in sys.modules.items()
             if name.split(".")[0] in ("SegmentMBTFE", "SegmentMBTFESlicer", "SegmentMBTFELib")}
    yield
    sys.modules["SegmentMBTFESlicer.worker_process"].stop_shared()
    for name in [n for n in sys.modules if n.split(".")[0] in ("SegmentMBTFE", "SegmentMBTFESlicer", "SegmentMBTFELib")]:
        del sys.modules[name]
    sys.modules.update(saved)
    worker_process.stop_shared()


def test_reload_reloads_the_module_packages_and_the_worker(widget, scene, tiny_model, reloadable):
    import slicer
    from SegmentMBTFESlicer import segment_panel, worker_process
    volume = load_volume(scene, selftest_image(scene))
    widget.logic.segment(volume, str(tiny_model), tta=False, show3D=False)
    old_worker = worker_process.shared()
    assert old_worker.running

    widget.onReload()  # the Reload button of Slicer's developer section

    reloaded = slicer.modules.SegmentMBTFEWidget
    assert reloaded is not widget and sys.modules["SegmentMBTFESlicer.segment_panel"] is not segment_panel
    assert type(reloaded.segment).__module__ == "SegmentMBTFESlicer.segment_panel"
    assert type(reloaded.segment) is sys.modules["SegmentMBTFESlicer.segment_panel"].SegmentSection
    assert not old_worker.running  # the next job starts a worker running the reloaded engine
    node = reloaded.logic.segment(volume, str(tiny_model), tta=False, show3D=False)
    assert node.GetSegmentation().GetNumberOfSegments() == 2


def selftest_image(scene, path=None):
    """The self-test's synthetic image written to a file (volumes load from files, as in Slicer)."""
    import tempfile
    from pathlib import Path
    import SimpleITK as sitk
    from SegmentMBTFESlicer import selftest
    path = Path(path or Path(tempfile.mkdtemp(prefix="selftest-image-")) / "case.nrrd")
    sitk.WriteImage(sitk.GetImageFromArray(selftest.test_image()), str(path))
    return path
