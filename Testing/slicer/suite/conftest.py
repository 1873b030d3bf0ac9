"""Fixtures for the Slicer module's tests: the real Slicer core (PyPI `slicer-core`: scene, nodes, storage,
segmentations logic), real Qt (PySide6, offscreen) and, from ../standins, small stand-ins for what exists
only inside the Slicer application (PythonQt's `qt`, ctk, qMRML widgets, ScriptedLoadableModule, ...).

Layout note: Testing/slicer/ holds folders only. slicer-core's `slicer` package extends itself with every
`slicer` folder on sys.path and imports each .py file in it; Testing/ is on sys.path during tests, so a .py
file placed directly in Testing/slicer/ would be imported as part of `slicer`.
"""
import os
import sys
from pathlib import Path

import pytest

from slicer_testing import wait_for_panel

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
STANDINS = HERE.parent / "standins"
MODULE_DIR = REPO / "SegmentMBTFE"
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

pytest.importorskip("slicer", reason="the slicer-core package is not installed (Testing/requirements.txt)")
pytest.importorskip("PySide6", reason="PySide6 is not installed (Testing/requirements.txt)")


@pytest.fixture(scope="session")
def slicer_app(tmp_path_factory):
    """`slicer` as inside the application: returns the stand-in module (with `new_scene`)."""
    for path in (str(STANDINS), str(MODULE_DIR)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import ctk  # noqa: F401 - registers ctkCollapsibleButton with the .ui loader
    import slicer_app
    import tempfile
    # The module's job folders in a folder of this session's own: tests compare the SegmentMBTFE-* folders before
    # and after, which other test sessions on the same machine create and remove in the shared temporary folder.
    tempfile.tempdir = str(tmp_path_factory.mktemp("temporary"))
    settings = tmp_path_factory.mktemp("settings") / "Slicer.ini"
    slicer_app.install(str(settings), {"SegmentMBTFE": str(MODULE_DIR / "SegmentMBTFE.py")})
    yield slicer_app
    from SegmentMBTFESlicer import worker_process
    worker_process.stop_shared()  # as when Slicer exits: the worker process goes with it


@pytest.fixture
def scene(slicer_app):
    """A fresh, empty scene as slicer.mrmlScene; the settings and the models added by other tests are cleared too
    (the session's models home: registered folders are only forgotten, never deleted)."""
    import shutil
    import qt
    import slicer
    from SegmentMBTFELib.models.home import models_home
    slicer.mrmlScene = slicer_app.new_scene()
    qt.QSettings().clear()
    slicer.app.settings().clear()
    shutil.rmtree(models_home(), ignore_errors=True)
    return slicer.mrmlScene


@pytest.fixture(scope="session")
def module(slicer_app):
    """The SegmentMBTFE module file, imported as Slicer imports it."""
    import SegmentMBTFE
    return SegmentMBTFE


@pytest.fixture
def widget(module, scene):
    """The module panel, set up in real Qt on the fresh scene, as Slicer shows it (slicer.modules.segmentmbtfe's
    widget representation). The worker process is shared by the tests, as by a Slicer session's panels."""
    import slicer
    parent = slicer.modules.segmentmbtfe.newPanel()
    panel = parent.self()
    parent.resize(420, 640)
    parent.show()
    yield panel
    if panel.jobs.job is not None:
        panel.jobs.cancel()
        wait_for_panel(panel)
    panel.finetune.cleanup()
    panel.removeObservers()
    slicer.modules.segmentmbtfe.closePanel()


@pytest.fixture(scope="session")
def tiny_model(slicer_app):
    """The untrained model the in-Slicer self-test uses (Resources/SelfTest; no nnunetv2 needed)."""
    from SegmentMBTFESlicer import selftest
    return selftest.model_folder()


@pytest.fixture(scope="session")
def hippo_case(hippo_test_cases) -> Path:
    """A real hippocampus MR image (nnU-Net's test case, never used to train the model)."""
    return hippo_test_cases[0][0]


@pytest.fixture(scope="session")
def large_hippo_case(hippo_case, tmp_path_factory) -> Path:
    """The same real image resampled to 0.4 mm: about 15 times the voxels and tiles, so a run lasts long
    enough to be cancelled in the middle."""
    import SimpleITK as sitk
    image = sitk.ReadImage(str(hippo_case))
    spacing = [s * 0.4 for s in image.GetSpacing()]
    size = [int(round(n / 0.4)) for n in image.GetSize()]
    larger = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                           image.GetDirection(), 0.0, image.GetPixelID())
    path = tmp_path_factory.mktemp("large_case") / "hippocampus_large.nii.gz"
    sitk.WriteImage(larger, str(path))
    return path
