"""Stand-in for the PyTorch extension's module (fepegar/SlicerPyTorch, PyTorchUtils/PyTorchUtils.py), which
other extensions call to get torch. It does what the real one does, as far as a caller can tell:

- installTorch(askConfirmation, forceComputationBackend, torchVersionRequirement,
  torchvisionVersionRequirement) installs torch AND torchvision, waiting for pip on the main thread, then
  imports torch in the calling process and returns it;
- torchInstalled() and the `torch` property import torch too.

The one difference: the real one runs light-the-torch (`slicer.util._executePythonModule("light_the_torch",
["install", "torch<req>", "torchvision<req>", ...])`), which picks the build from PyTorch's own index; here
Slicer's real `slicer.util.pip_install` gets the same requirements, so tests serve them from a local index.
Every call is recorded in CALLS: a test can tell whether a module used it.
"""
import importlib.metadata
import logging

import slicer

CALLS = []


class PyTorchUtilsLogic:
    def __init__(self):
        self._torch = None

    @property
    def torch(self):
        CALLS.append("torch")
        if self._torch is None:
            self._torch = self.importTorch()
        return self._torch

    @staticmethod
    def torchInstalled():
        CALLS.append("torchInstalled")
        try:
            importlib.metadata.files("torch")
        except importlib.metadata.PackageNotFoundError:
            return False
        try:
            import torch  # noqa: F401 - as the real one: installed means importable
        except ModuleNotFoundError:
            return False
        return True

    def importTorch(self):
        CALLS.append("importTorch")
        if PyTorchUtilsLogic.torchInstalled():
            import torch
            return torch
        return self.installTorch()

    def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                     torchvisionVersionRequirement=None):
        CALLS.append(("installTorch", askConfirmation, forceComputationBackend, torchVersionRequirement,
                      torchvisionVersionRequirement))
        args = self._getPipInstallArguments(forceComputationBackend, torchVersionRequirement,
                                            torchvisionVersionRequirement)
        if askConfirmation and not slicer.app.testingEnabled():
            if not slicer.util.confirmOkCancelDisplay(f"PyTorch will be downloaded and installed ({' '.join(args)})."):
                return None
        slicer.util.pip_install(args[1:])   # the real one: light-the-torch with these arguments
        import torch
        logging.info(f"PyTorch {torch.__version__} installed successfully.")
        return torch

    def uninstallTorch(self, askConfirmation=False, forceComputationBackend=None):
        CALLS.append("uninstallTorch")
        slicer.util.pip_uninstall("torch torchvision")

    @staticmethod
    def _getPipInstallArguments(forceComputationBackend=None, torchVersionRequirement=None,
                                torchvisionVersionRequirement=None):
        args = ["install", "torch" + (torchVersionRequirement or ""),
                "torchvision" + (torchvisionVersionRequirement or "")]
        if forceComputationBackend is not None:  # light-the-torch's option; pip does not know it
            logging.warning("the stand-in ignores forceComputationBackend=%s", forceComputationBackend)
        return args
