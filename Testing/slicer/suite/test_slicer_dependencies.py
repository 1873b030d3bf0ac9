"""Dependency handling inside Slicer: what is checked, what is installed, and what is never replaced.

The package checks run against this real environment. Slicer's installers (`slicer.util.pip_install`, the
PyTorch extension's `PyTorchUtilsLogic.installTorch`) exist only inside Slicer, so small recorders stand in
for them; what they are asked to do (arguments, constraints file) is checked exactly.
"""
import importlib.metadata
import os

import pytest

from SegmentMBTFESlicer import dependencies
from SegmentMBTFESlicer.dependencies import DependencyError, Requirement

ABSENT = Requirement("segmentmbtfe_absent_module", "segmentmbtfe-absent-package", "1.0")


class Recorder:
    def __init__(self, answer=True):
        self.calls, self.answer, self.constraints = [], answer, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if args and "--constraint" in args[0]:  # what pip would read, while it runs
            self.constraints.append(open(args[0][args[0].index("--constraint") + 1]).read())
        return self.answer


class FakePyTorchUtils:
    """The PyTorch extension's module as far as we use it: PyTorchUtilsLogic().installTorch(...)."""

    def __init__(self, result="torch module"):
        self.calls, self.result = [], result
        outer = self

        class PyTorchUtilsLogic:
            def installTorch(self, **kwargs):
                outer.calls.append(kwargs)
                return outer.result
        self.PyTorchUtilsLogic = PyTorchUtilsLogic


def test_this_environment_has_everything():
    status = dependencies.check()
    assert status.ready, status.message()


def test_a_missing_package_is_found_without_importing_it():
    status = dependencies.check(dependencies.REQUIREMENTS + (ABSENT,))
    assert status.missing == [ABSENT] and "segmentmbtfe-absent-package" in status.message()


def test_missing_packages_are_installed_with_slicers_packages_pinned(tmp_path):
    confirm, pip = Recorder(), Recorder()
    dependencies.ensure(confirm, pip, requirements=(ABSENT,))
    assert "segmentmbtfe-absent-package" in confirm.calls[0][0][0]
    [((arguments,), _)] = pip.calls
    assert arguments[:3] == ["segmentmbtfe-absent-package>=1.0", "--constraint", arguments[2]]
    pinned = pip.constraints[0].split()
    for name in ("numpy", "scipy", "SimpleITK", "torch"):
        assert f"{name}=={importlib.metadata.version(name)}" in pinned  # pip may not replace them
    assert not os.path.exists(os.path.dirname(arguments[2]))  # the constraints' folder is gone afterwards


def test_nothing_is_installed_when_the_user_declines():
    pip = Recorder()
    with pytest.raises(DependencyError, match="Not installed: segmentmbtfe-absent-package"):
        dependencies.ensure(Recorder(answer=False), pip, requirements=(ABSENT,))
    assert pip.calls == []


def test_torch_comes_from_the_pytorch_extension():
    torch_utils, pip = FakePyTorchUtils(), Recorder()
    missing = dependencies.Status([dependencies.TORCH, ABSENT], [])
    dependencies.ensure(Recorder(), pip, torch_utils, status=missing)
    assert torch_utils.calls == [{"askConfirmation": False, "torchVersionRequirement": ">=2.1"}]
    [((arguments,), _)] = pip.calls  # pip gets only the other package, never torch
    assert arguments[0] == "segmentmbtfe-absent-package>=1.0" and not any(a.startswith("torch") for a in arguments)


def test_without_the_pytorch_extension_the_message_says_what_to_install():
    pip = Recorder()
    with pytest.raises(DependencyError) as raised:
        dependencies.ensure(Recorder(), pip, None, status=dependencies.Status([dependencies.TORCH], []))
    assert "Install the \"PyTorch\" extension" in str(raised.value) and "Extensions Manager" in str(raised.value)
    assert pip.calls == []  # never a blind `pip install torch` (gigabytes, maybe the wrong CUDA)


def test_a_cancelled_torch_install_is_reported():
    with pytest.raises(DependencyError, match="PyTorch was not installed"):
        dependencies.ensure(Recorder(), Recorder(), FakePyTorchUtils(result=None),
                            status=dependencies.Status([dependencies.TORCH], []))


def test_too_old_packages_are_reported_not_replaced():
    confirm, pip = Recorder(), Recorder()
    old = dependencies.check((Requirement("numpy", "numpy", "999.0"),))
    assert old.too_old and "numpy" in old.too_old[0]
    with pytest.raises(DependencyError, match="not replaced"):
        dependencies.ensure(confirm, pip, status=old)
    assert confirm.calls == [] and pip.calls == []


def test_the_panel_offers_the_install_when_something_is_missing(widget, monkeypatch):
    """The panel's status line tells the user before they click (the check is the real one, on a requirement
    list that includes a package this environment lacks)."""
    monkeypatch.setattr(dependencies, "REQUIREMENTS", dependencies.REQUIREMENTS + (ABSENT,))
    widget.segment.showDependencyStatus()
    assert "segmentmbtfe-absent-package" in widget.ui.statusLabel.text()
    assert "offers to install" in widget.ui.statusLabel.text()
