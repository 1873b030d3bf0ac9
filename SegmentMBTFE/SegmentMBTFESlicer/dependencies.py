"""The engine's Python packages inside Slicer: check them, and install only what is missing.

Rules, from what users of other AI extensions complain about:
- PyTorch comes from the PyTorch extension's `PyTorchUtils`, which picks the build that fits the GPU and
  driver. Without that extension we say exactly what to install rather than pulling a multi-gigabyte
  wheel that may not match the GPU.
- Everything else is installed only when it is missing, under constraints that pin every package
  already there (numpy, SimpleITK, scipy, torch, ... as Slicer ships them), so pip can never replace
  one Slicer relies on.
Finding a package uses `importlib.util.find_spec` and package metadata, never an import: importing
torch takes seconds and must happen only when a model actually runs.
"""
import importlib.metadata
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

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
PINNED = ("numpy", "scipy", "SimpleITK", "torch", "vtk", "pydicom", "Pillow", "requests", "packaging")
TORCH_HELP = ("SegmentMBTFE needs PyTorch {minimum} or newer. Install the \"PyTorch\" extension "
              "(View > Extensions Manager, search \"PyTorch\"), restart Slicer, then click Segment again: "
              "it installs the PyTorch build that fits your GPU.")


class DependencyError(Exception):
    """A package is missing or too old and was not (or could not be) installed; str() is the message."""


@dataclass
class Status:
    missing: List[Requirement]     # not installed at all
    too_old: List[str]             # "name X.Y (needs >= A.B)"

    @property
    def ready(self) -> bool:
        return not self.missing and not self.too_old

    def message(self) -> str:
        parts = []
        if self.missing:
            parts.append("missing: " + ", ".join(r.distribution for r in self.missing))
        if self.too_old:
            parts.append("too old: " + ", ".join(self.too_old))
        return "; ".join(parts)


def check(requirements=None, find_spec=importlib.util.find_spec,
          version: Callable[[str], Optional[str]] = None) -> Status:
    """What is missing or too old (of REQUIREMENTS unless given), without importing anything."""
    version = version or installed_version
    requirements = REQUIREMENTS if requirements is None else requirements
    missing, too_old = [], []
    for requirement in requirements:
        if find_spec(requirement.module) is None:
            missing.append(requirement)
            continue
        found = version(requirement.distribution)
        if found and _version_tuple(found) < _version_tuple(requirement.minimum):
            too_old.append(f"{requirement.distribution} {found} (needs >= {requirement.minimum})")
    return Status(missing, too_old)


def ensure(confirm: Callable[[str], bool], pip_install: Callable[[List[str]], None],
           torch_utils=None, requirements=None, status: Status = None) -> None:
    """Install what is missing, after the user agrees. Raises DependencyError when something stays missing.

    `torch_utils` is the PyTorch extension's module (`import PyTorchUtils`) or None when it is not
    installed; `pip_install` is Slicer's `slicer.util.pip_install` (a list of pip arguments).
    """
    status = status or check(requirements)
    if status.ready:
        return
    if status.too_old:
        raise DependencyError("SegmentMBTFE cannot use the installed " + ", ".join(status.too_old) +
                              "; these come with Slicer or another extension and are not replaced: "
                              "update Slicer or the PyTorch extension.")
    names = ", ".join(r.distribution for r in status.missing)
    if not confirm(f"SegmentMBTFE needs these Python packages, which are not installed yet: {names}.\n\n"
                   "Install them now? This can take a few minutes."):
        raise DependencyError(f"Not installed: {names}. Segmenting needs them.")
    others = [r for r in status.missing if r.module != TORCH.module]
    if any(r.module == TORCH.module for r in status.missing):
        install_torch(torch_utils)
    if others:  # the constraints file lives only as long as pip needs it
        with tempfile.TemporaryDirectory(prefix="SegmentMBTFE-") as folder:
            pip_install(pip_arguments(others, folder))


_installing = [False]  # an install pumps Qt events (pip, PyTorchUtils): a second one must not start meanwhile


def ensure_in_slicer(ask_confirmation: bool = True) -> None:
    """`ensure` with Slicer's pip and PyTorch extension; refuses to start while an install is under way."""
    status = check()
    if status.ready:
        return
    if _installing[0]:
        raise DependencyError("SegmentMBTFE's Python packages are being installed; wait for it to finish.")
    import slicer
    confirm = slicer.util.confirmOkCancelDisplay if ask_confirmation else (lambda text: True)
    _installing[0] = True
    try:
        ensure(confirm, slicer.util.pip_install, torch_utils_module(), status=status)
    finally:
        _installing[0] = False


def install_torch(torch_utils) -> None:
    """PyTorch through the PyTorch extension (the build for this GPU and driver), or a clear instruction."""
    if torch_utils is None:
        raise DependencyError(TORCH_HELP.format(minimum=TORCH.minimum))
    torch = torch_utils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                          torchVersionRequirement=f">={TORCH.minimum}")
    if torch is None:
        raise DependencyError("PyTorch was not installed (cancelled or failed; see the log). "
                              "Install it from the PyTorch Utils module, then click Segment again.")


def pip_arguments(requirements: List[Requirement], constraints_dir: str) -> List[str]:
    """pip arguments installing `requirements` with every already-installed PINNED package held in place
    (by a constraints file written into `constraints_dir`)."""
    constraints = constraints_text()
    arguments = [r.specifier for r in requirements]
    if constraints:
        path = os.path.join(constraints_dir, "constraints.txt")
        with open(path, "w") as f:
            f.write(constraints)
        arguments += ["--constraint", path]
    return arguments


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


def torch_utils_module():
    """The PyTorch extension's Python module, when that extension is installed."""
    if importlib.util.find_spec("PyTorchUtils") is None:
        return None
    import PyTorchUtils
    return PyTorchUtils


def versions() -> Dict[str, Optional[str]]:
    return {r.distribution: installed_version(r.distribution) for r in REQUIREMENTS}
