"""Dependency handling inside Slicer: what is checked, what is installed, how, and what is never replaced.

The checks run against this real environment. The installs really run pip, in a Slicer session of its own
(install_session.py) whose Python lacks torch (fake_packages.py), against a slow local index with a fake
torch whose import leaves a mark: so "torch never enters Slicer's process" and "Slicer never stalls" are
measured where they happen, and the stand-in PyTorchUtils, which imports torch like the real one, is there.
"""
import importlib.metadata
import json
import os
import subprocess
from pathlib import Path

import pytest

from SegmentMBTFESlicer import dependencies
from SegmentMBTFESlicer.dependencies import DependencyError, Requirement, Status

pytestmark = pytest.mark.timeout(300)
HERE = Path(__file__).resolve().parent
ABSENT = Requirement("segmentmbtfe_absent_module", "segmentmbtfe-absent-package", "1.0")
STALL_LIMIT_MS = 200


# ------------------------------------------------------------------------------------------ checks and plans

def test_this_environment_has_everything():
    status = dependencies.check()
    assert status.ready, status.message()


def test_a_missing_package_is_found_without_importing_it():
    status = dependencies.check(dependencies.REQUIREMENTS + (ABSENT,))
    assert status.missing == [ABSENT] and "segmentmbtfe-absent-package" in status.message()


def test_torch_and_torchvision_are_asked_for_under_constraints_pinning_slicers_packages(tmp_path):
    status = Status([dependencies.TORCH, ABSENT], [])
    [torch, other] = dependencies.install_steps(status, "c.txt", light_the_torch=False)
    assert torch == ("Installing PyTorch", "pip",
                     ["install", f"torch>={dependencies.TORCH.minimum}", "torchvision", "--constraint", "c.txt"])
    assert other[1:] == ("pip", ["install", "segmentmbtfe-absent-package>=1.0", "--constraint", "c.txt"])
    # light-the-torch, when the PyTorch extension installed it, picks the build for the GPU, as installTorch does
    assert dependencies.install_steps(status, "c.txt", light_the_torch=True)[0][1] == "light_the_torch"
    pinned = dependencies.constraints_text().split()
    for name in ("numpy", "scipy", "SimpleITK", "torch", "pip"):
        assert f"{name}=={importlib.metadata.version(name)}" in pinned  # pip may not replace them


def test_too_old_packages_are_reported_not_replaced(slicer_app, monkeypatch):
    asked = []
    monkeypatch.setattr(dependencies, "installed_version", lambda name: "2.1.0" if name == "torch" else "99")
    import slicer
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text: asked.append(text))
    with pytest.raises(DependencyError) as raised:
        dependencies.start_in_slicer()
    message = str(raised.value)
    assert "torch 2.1.0" in message and "neither Slicer nor the PyTorch extension upgrades" in message
    assert 'slicer.util.pip_install("--upgrade torch>=2.2 torchvision")' in message and asked == []
    old_numpy = Status([], [(Requirement("numpy", "numpy", "999.0"), "1.26.4")])
    assert "numpy 1.26.4 (needs >= 999.0)" in dependencies.too_old_message(old_numpy)
    assert "newer Slicer" in dependencies.too_old_message(old_numpy)


def test_nothing_is_installed_when_the_user_declines(slicer_app, monkeypatch):
    import slicer
    monkeypatch.setattr(dependencies, "REQUIREMENTS", dependencies.REQUIREMENTS + (ABSENT,))
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text: False)
    monkeypatch.setattr(dependencies, "install_steps", lambda *args: pytest.fail("an install was started"))
    with pytest.raises(DependencyError, match="Not installed: segmentmbtfe-absent-package"):
        dependencies.start_in_slicer()


def test_the_panel_offers_the_install_when_something_is_missing(widget, monkeypatch):
    """The panel's status line tells the user before they click (the check is the real one, on a requirement
    list that includes a package this environment lacks)."""
    monkeypatch.setattr(dependencies, "REQUIREMENTS", dependencies.REQUIREMENTS + (ABSENT,))
    widget.segment.showDependencyStatus()
    assert "segmentmbtfe-absent-package" in widget.ui.statusLabel.text()
    assert "offers to install" in widget.ui.statusLabel.text()


# ------------------------------------------------------------------------------- installs, in a Slicer of their own

@pytest.fixture(scope="session")
def index(tmp_path_factory):
    """The local index, served at 1 MB/s: the 3 MB torch takes about 3 s to download."""
    import fake_packages
    folders = fake_packages.build_index(tmp_path_factory.mktemp("index"))
    served = {name: fake_packages.serve(folder, 1 << 20) for name, folder in folders.items()}
    yield {name: url for name, (url, _server) in served.items()}
    for _url, server in served.values():
        server.shutdown()


def install_session(scenario: str, index_url: str, work: Path) -> dict:
    """install_session.py SCENARIO in a fresh Slicer Python without torch, pip pointed at `index_url`."""
    import fake_packages
    python = fake_packages.fake_slicer_python(work / "slicer")
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=index_url, PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_NO_CACHE_DIR="1", FAKE_TORCH_MARKS=str(work / "torch-imported-by"), QT_QPA_PLATFORM="offscreen",
               PATH=f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}", SEGMENTMBTFE_HOME=str(work / "home"))
    done = subprocess.run([str(python), str(HERE / "install_session.py"), scenario, str(work)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["log"] = done.stderr
    return report


def assert_torch_never_entered_slicer(report):
    assert report["torch_in_sys_modules"] == [] and not report["torch_imported_here"]
    assert report["pytorchutils_calls"] == []  # the PyTorch extension's installTorch would import it


def test_segment_installs_torch_in_the_background(index, tmp_path):
    """Segment with torch missing: pip installs torch and torchvision in a process of its own while Slicer
    keeps running (never a stall over 200 ms), the panel shows pip's progress with a busy bar, torch never
    enters Slicer's process, Slicer's packages stay, and Segment then goes on."""
    report = install_session("panel", index["normal"], tmp_path)
    assert report["missing_before"] == ["torch"] and report["install_started"], report["log"][-2000:]
    assert report["missing_after"] == [] and report["torch"] == "2.2.0" and report["torchvision"] == "0.17.0"
    assert_torch_never_entered_slicer(report)
    assert report["longest_stall_ms"] < STALL_LIMIT_MS, report["longest_stall_ms"]
    assert report["busy_bar"] and any(s.startswith("Installing PyTorch: Downloading") for s in report["shown"])
    assert report["segmentation_started"] and report["numpy_after"] == report["numpy_before"]


def test_cancel_stops_the_install_and_its_process(index, tmp_path):
    report = install_session("cancel", index["normal"], tmp_path)
    """Cancel while pip downloads: pip's process (behind the PythonSlicer launcher) is gone within 3 s."""
    assert report["install_started"] and report["cancel_enabled"] and report["pid_before_cancel_alive"]
    assert report["behind_a_launcher"] and report["cancelling_shown"] == "Cancelling the package install..."
    assert not report["pid_after_cancel_alive"] and report["cancel_seconds"] < 3, report["cancel_seconds"]
    assert report["status"] == "Cancelled: nothing was changed." and not report["segmentation_started"]
    assert report["missing_after"] == ["torch"] and not report["busy_after"]
    assert report["longest_stall_ms"] < STALL_LIMIT_MS, report["longest_stall_ms"]


def test_slicers_packages_are_never_replaced(index, tmp_path):
    """An index whose torch wants another numpy: pip refuses (the constraints), and says why in one line."""
    report = install_session("panel", index["greedy"], tmp_path)
    assert report["numpy_after"] == report["numpy_before"] and report["missing_after"] == ["torch"]
    assert report["status"].startswith("Failed: Installing PyTorch failed: ERROR: "), report["status"]
    assert not report["segmentation_started"] and not report["busy_after"]


def test_the_console_installs_the_same_way(index, tmp_path):
    report = install_session("console", index["normal"], tmp_path)
    assert report["missing_before"] == ["torch"] and report["missing_after"] == []
    assert_torch_never_entered_slicer(report)
    assert report["longest_stall_ms"] < STALL_LIMIT_MS, report["longest_stall_ms"]


def test_the_standin_pytorchutils_imports_torch_as_the_real_one_does(index, tmp_path):
    """What the module no longer calls: installTorch installs torch and torchvision, then imports torch in
    Slicer's process. (So the checks above would catch a module that used it.)"""
    report = install_session("pytorchutils", index["normal"], tmp_path)
    assert report["returned"] == "2.2.0" and report["torchvision"] == "0.17.0"
    assert "torch" in report["torch_in_sys_modules"] and report["torch_imported_here"]


def test_the_too_old_message_gives_the_step_that_upgrades(index, tmp_path):
    """The command the message gives, typed into Slicer's console, upgrades an old torch (and its torchvision)."""
    report = install_session("upgrade", index["normal"], tmp_path)
    assert "finds torch 2.1.0" in report["old"]
    assert report["torch"] == "2.2.0" and report["torchvision"] == "0.17.0" and report["too_old_after"] == ""
