"""The engine's Python packages inside Slicer: check them, and install only what is missing.

Rules, from what users of other AI extensions complain about:
- Nothing is imported to check: `importlib.util.find_spec` and package metadata only. Slicer's process
  never imports torch (the engine runs in a worker process), not even to install it.
- Installing never blocks Slicer and can be cancelled: pip runs in a process of its own whose output
  arrives as Qt events (installer.py); the panel shows it with a busy bar and a Cancel button. Slicer's
  `pip_install` and the PyTorch extension's `installTorch` wait on the main thread, and `installTorch`
  ends with `import torch` in Slicer's process, so neither is used.
- PyTorch: torch >= the engine's minimum and torchvision (the pair the PyTorch extension installs, so a
  later torchvision install does not pull another torch), with light-the-torch as the PyTorch extension
  uses it (the build for this GPU and driver) when it is there, else with pip's default build.
  light-the-torch is not installed here: it pins pip and would replace Slicer's.
- Whatever is installed, pip runs under constraints that pin every package already there (numpy, SimpleITK,
  scipy, pip, ... as Slicer ships them), so it can never replace one Slicer relies on.
- What is too old is not replaced: the message says the one step that upgrades it.
"""
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from SegmentMBTFELib.requirements import MINIMUM, version_tuple as _version_tuple

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Requirement:
    module: str        # import name
    distribution: str  # pip name
    minimum: str       # lowest version the engine works with

    @property
    def specifier(self) -> str:
        return f"{self.distribution}>={self.minimum}"


# The engine's own minimums (SegmentMBTFELib/requirements.py): the module asks for exactly what the engine needs.
REQUIREMENTS = tuple(Requirement(name, name, minimum) for name, minimum in MINIMUM.items())
TORCH = REQUIREMENTS[0]
# Never replaced: pinned at the installed version whenever pip runs.
PINNED = ("numpy", "scipy", "SimpleITK", "torch", "vtk", "pydicom", "Pillow", "requests", "packaging", "pip")
TORCH_TOO_OLD = ("SegmentMBTFE needs PyTorch {minimum} or newer and finds torch {found}, which neither Slicer nor "
                 "the PyTorch extension upgrades: run slicer.util.pip_install(\"--upgrade torch>={minimum} "
                 "torchvision\") in the Python console (View > Python Console), then restart Slicer.")
SLICER_TOO_OLD = ("SegmentMBTFE cannot use the installed {what}, which come(s) with Slicer and is not replaced: "
                  "use a newer Slicer.")


class DependencyError(Exception):
    """A package is missing or too old and was not (or could not be) installed; str() is the message."""


@dataclass
class Status:
    missing: List[Requirement]                   # not installed at all
    too_old: List[Tuple[Requirement, str]]       # with the version found

    @property
    def ready(self) -> bool:
        return not self.missing and not self.too_old

    def message(self) -> str:
        parts = []
        if self.missing:
            parts.append("missing: " + ", ".join(r.distribution for r in self.missing))
        if self.too_old:
            parts.append("too old: " + ", ".join(_too_old_text(r, found) for r, found in self.too_old))
        return "; ".join(parts)


def _too_old_text(requirement: Requirement, found: str) -> str:
    return f"{requirement.distribution} {found} (needs >= {requirement.minimum})"


def check(requirements=None, find_spec: Callable = None,
          version: Callable[[str], Optional[str]] = None) -> Status:
    """What is missing or too old (of REQUIREMENTS unless given), without importing anything."""
    find_spec = find_spec or importlib.util.find_spec
    version = version or installed_version
    requirements = REQUIREMENTS if requirements is None else requirements
    missing, too_old = [], []
    for requirement in requirements:
        if find_spec(requirement.module) is None:
            missing.append(requirement)
            continue
        found = version(requirement.distribution)
        if found and _version_tuple(found) < _version_tuple(requirement.minimum):
            too_old.append((requirement, found))
    return Status(missing, too_old)


def too_old_message(status: Status) -> str:
    """The truth about a too-old package: nothing here upgrades it; the one step that does."""
    torch = [found for r, found in status.too_old if r.module == TORCH.module]
    if torch:
        return TORCH_TOO_OLD.format(minimum=TORCH.minimum, found=torch[0])
    return SLICER_TOO_OLD.format(what=", ".join(_too_old_text(r, found) for r, found in status.too_old))


def confirmation(status: Status) -> str:
    names = ", ".join(r.distribution for r in status.missing)
    download = " (PyTorch is a download of up to a few GB)" if TORCH in status.missing else ""
    return (f"SegmentMBTFE needs these Python packages, which are not installed yet: {names}.\n\n"
            f"Install them now? This can take a few minutes{download}; Slicer stays usable and the panel's "
            "Cancel button stops it.")


def install_steps(status: Status, constraints: str, light_the_torch: bool = None) -> list:
    """installer.InstallJob's steps for what is missing, each under the constraints file `constraints`."""
    if light_the_torch is None:
        light_the_torch = importlib.util.find_spec("light_the_torch") is not None
    steps = []
    if TORCH in status.missing:
        steps.append(("Installing PyTorch", "light_the_torch" if light_the_torch else "pip",
                      ["install", TORCH.specifier, "torchvision", "--constraint", constraints]))
    others = [r for r in status.missing if r != TORCH]
    if others:
        steps.append(("Installing " + ", ".join(r.distribution for r in others), "pip",
                      ["install", *[r.specifier for r in others], "--constraint", constraints]))
    return steps


_current = [None]  # the install under way (the panel's or the console's): never two at once


def start_in_slicer(on_progress=None, on_finished=None, ask_confirmation: bool = True):
    """Start installing what is missing, after the user agrees, and return the installer.InstallJob (None
    when nothing is missing). on_finished(outcome) comes once; a successful outcome means all is there.
    Raises DependencyError when something is too old, the user declines, or an install already runs."""
    from . import installer
    status = check()
    if status.ready:
        return None
    if _current[0] is not None and not _current[0].finished:
        raise DependencyError("SegmentMBTFE's Python packages are being installed; wait for it to finish.")
    if status.too_old:
        raise DependencyError(too_old_message(status))
    import slicer
    if ask_confirmation and not slicer.util.confirmOkCancelDisplay(confirmation(status)):
        raise DependencyError(f"Not installed: {', '.join(r.distribution for r in status.missing)}. "
                              "Segmenting needs them.")
    folder = tempfile.mkdtemp(prefix="SegmentMBTFE-")  # the constraints file lives as long as the install
    constraints = os.path.join(folder, "constraints.txt")
    with open(constraints, "w") as f:
        f.write(constraints_text())
    job = installer.InstallJob(install_steps(status, constraints), folder, on_progress,
                               lambda outcome: _installed(outcome, on_finished))
    _current[0] = job
    return job.start()


def _installed(outcome, on_finished) -> None:
    """The install's outcome in the module's words; a successful one only when everything is there now."""
    if outcome.cancelled:
        pass  # ended as the user asked: the panel says so, the console raises Cancelled
    elif outcome.error is not None:
        outcome.error = DependencyError(str(outcome.error))
    else:
        importlib.invalidate_caches()  # the new packages' folders appeared while Python was running
        status = check()
        if not status.ready:
            outcome.error = DependencyError(f"pip finished, but SegmentMBTFE still finds its packages {status.message()} "
                                            "(see the log).")
    if on_finished:
        on_finished(outcome)


def ensure_in_slicer(ask_confirmation: bool = True, cancel=None) -> None:
    """start_in_slicer, waiting for the install (console calls; Slicer keeps painting, pip's lines go to the
    log; `cancel`, a threading.Event, stops it). Raises DependencyError when something stays missing,
    Cancelled when cancelled."""
    job = start_in_slicer(ask_confirmation=ask_confirmation)
    if job is None:
        return
    outcome = job.wait(cancel)
    if outcome.cancelled:
        from SegmentMBTFELib.errors import Cancelled
        raise Cancelled()
    if outcome.error is not None:
        raise outcome.error


def constraints_text(version: Callable[[str], Optional[str]] = None) -> str:
    """'name==version' lines for the PINNED packages that are installed."""
    version = version or installed_version
    lines = [f"{name}=={found}" for name in PINNED if (found := version(name))]
    return "\n".join(lines) + ("\n" if lines else "")


def installed_version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> Dict[str, Optional[str]]:
    return {r.distribution: installed_version(r.distribution) for r in REQUIREMENTS}
