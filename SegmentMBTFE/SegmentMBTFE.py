"""SegmentMBTFE: AI segmentation with nnU-Net and MBTFE-UNet models in 3D Slicer.

The shell after Slicer's scripted-module template: Module, parameter node, Widget (assembles the panel's
sections), Logic (the console API) and Test. The work is in SegmentMBTFESlicer (segment_panel,
finetune_panel, logic, jobs, worker, ...) and in the engine, SegmentMBTFELib, which runs in a worker
process started with Slicer's own Python: Slicer's process never imports torch.

Console use:
    logic = slicer.util.getModuleLogic("SegmentMBTFE")   # or SegmentMBTFE.SegmentMBTFELogic()
    segmentation = logic.segment(volumeNode, model="Dataset004_Hippocampus")
    logic.segmentFiles(["case1.nii.gz"], model="/path/to/model", outputDir="/tmp/out")
    run = logic.finetune(segmentation, model="Dataset004_Hippocampus", minutes=5)  # after correcting it
"""
import sys
from typing import Annotated

import qt

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from SegmentMBTFESlicer import (catalog, dependencies, finetune_panel, logic, runner, segment_panel, selftest,
                                terminology, worker_process)
from SegmentMBTFESlicer.job_controller import JobController
from SegmentMBTFESlicer.resources import resource_path


class SegmentMBTFE(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Segment MBTFE")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SegmentMBTFE developers"]
        self.parent.helpText = _(
            "Segment a volume with an nnU-Net or MBTFE-UNet model: pick the model and the input volume(s), "
            "click Segment, and edit the resulting segments right away in Segment Editor. "
            "Fine-tune adapts the model to your corrections as a new model version (the original stays). "
            "From the Python console: <code>SegmentMBTFE.SegmentMBTFELogic().segment(volumeNode, model=...)</code>.")
        self.parent.acknowledgementText = _(
            "Runs models trained with nnU-Net (Isensee et al., Nature Methods 2021) without needing nnU-Net.")
        self.parent.icon = qt.QIcon(resource_path("Icons/SegmentMBTFE.png"))


@parameterNodeWrapper
class SegmentMBTFEParameterNode:
    """The panel's state, saved with the scene (see segment_panel.py)."""
    inputVolumes: list[vtkMRMLScalarVolumeNode]
    modelPath: str = ""
    outputSegmentation: vtkMRMLSegmentationNode
    device: str = "auto"
    tta: bool = True
    stepSize: Annotated[float, WithinRange(0.1, 1.0)] = 0.5
    folds: str = ""
    uncertainty: bool = False


class SegmentMBTFEWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        # Slicer's base class calls setup() itself when there is no parent: what setup() uses must exist first.
        VTKObservationMixin.__init__(self)
        self.logic = self.segment = self.finetune = None
        self.jobs = JobController()  # the one job the panel runs, for both sections
        ScriptedLoadableModuleWidget.__init__(self, parent)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resource_path("UI/SegmentMBTFE.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SegmentMBTFELogic()
        self.segment = segment_panel.SegmentSection(self.ui, self.jobs)
        self.finetune = finetune_panel.FinetuneSection(self.ui, self.segment, self.jobs)
        self.segment.setup()
        self.finetune.setup()
        scene = slicer.mrmlScene
        self.addObserver(scene, scene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(scene, scene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(scene, scene.EndImportEvent, self.onSceneEndImport)
        self.addObserver(scene, scene.NodeAddedEvent, self.onNodeAdded)
        self.initializeParameterNode()
        self.segment.refreshModels()
        self.segment.showDependencyStatus()

    def cleanup(self) -> None:
        """Never blocks Slicer for long: the job is cancelled and the worker gets half a second to exit."""
        self.jobs.cancel()
        worker_process.stop_shared(wait_ms=500)
        if self.finetune is not None:
            self.finetune.cleanup()
        self.removeObservers()

    def onReload(self) -> None:
        """Reload the module's packages too (Slicer's Reload re-reads this file only), and the worker."""
        worker_process.stop_shared(wait_ms=500)
        for name in [n for n in sys.modules if n.split(".")[0] in ("SegmentMBTFESlicer", "SegmentMBTFELib")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.segment.setParameterNode(self.logic.getParameterNode())

    def onSceneStartClose(self, caller, event) -> None:
        self.jobs.cancel()  # its nodes are going away: write nothing
        self.finetune.sceneClosing()
        self.segment.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if getattr(self.parent, "isEntered", True):  # a panel made without a module (parent=None) has no such flag
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event) -> None:
        self.initializeParameterNode()  # a loaded scene brings its own panel settings

    def onNodeAdded(self, caller, event) -> None:
        if not slicer.mrmlScene.IsImporting():  # a scene being loaded brings its own choices
            self.segment.volumeAdded()


class SegmentMBTFELogic(ScriptedLoadableModuleLogic):
    """Segmentation without the panel: the console and batch API.

    `model` is a model folder path, the name of a model the panel lists (as the panel shows it, e.g.
    "Dataset004_Hippocampus (3d_fullres)", as `segment-mbtfe models list` shows it, or the folder name), or a
    loaded engine Model. Every call runs the engine in the worker process, which keeps the models it loaded for
    the next call.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        terminology.load_into_slicer()  # so Segment Editor knows the terminology the segments carry

    def getParameterNode(self):
        return SegmentMBTFEParameterNode(super().getParameterNode())

    def ensureDependencies(self, askConfirmation: bool = True) -> None:
        """Install missing Python packages (pip in a process of its own; Slicer keeps painting), after asking;
        raise if any stay missing (Cancelled when cancelled)."""
        dependencies.ensure_in_slicer(askConfirmation)

    def availableModels(self) -> list:
        """The models the panel offers (those `segment-mbtfe models list` shows: shipped, added, registered), each
        with name, path, channels, labels, folds."""
        return catalog.available_models(qt.QSettings())

    def segment(self, volumeNodes, model, outputSegmentation=None, device: str = "auto", tta: bool = True,
                stepSize: float = 0.5, folds=None, checkpoint: str = "final", show3D: bool = True,
                progress=None, cancel=None, uncertainty: bool = False, backend: str = "torch"):
        """Segment `volumeNodes` (one per model channel, or a single node) and return the segmentation node.

        outputSegmentation: None creates a new node; an existing node keeps its other segments and only this
        model's earlier segments are replaced. progress(fraction, text) is called along the way (default: the
        log); `cancel` (a threading.Event) stops the run (2 s at most). Blocks, keeping Slicer painting.
        uncertainty: also the entropy (and disagreement) maps over the image and a table per segment.
        backend: what runs the network on the CPU: "torch" (default), "openvino" (faster; needs openvino in
        Slicer's Python) or "auto" (OpenVINO when installed, else torch); a GPU always runs torch.
        """
        self.ensureDependencies()
        options = runner.Options(device, tta, stepSize, runner.fold_list(folds), checkpoint, show3D, uncertainty,
                                 backend)
        return logic.segment(volumeNodes, self._modelPath(model), options, outputSegmentation,
                             progress or logic.LogProgress(), cancel)

    def segmentFiles(self, paths, model, outputDir, device: str = "auto", tta: bool = True, stepSize: float = 0.5,
                     folds=None, checkpoint: str = "final", progress=None, cancel=None, format: str = "seg.nrrd",
                     backend: str = "torch") -> list:
        """Segment image files or DICOM series folders (each a path, or a list of channel paths) into
        outputDir/<case>.seg.nrrd. format: "seg.nrrd", "dicom-seg" (<case>.dcm, a DICOM SEG referencing the
        input series; needs DICOM inputs and highdicom), "nifti" or an extension (".nrrd"). Nothing is added to
        the scene. Returns the paths written; which DICOM series each case used is logged. A case that fails
        does not stop the others: once all were tried, SomeCasesFailed (SegmentMBTFELib.errors) is raised if any
        failed, with .written (the files written) and .failed ((case, reason) each; also logged)."""
        self.ensureDependencies()
        options = runner.Options(device, tta, stepSize, runner.fold_list(folds), checkpoint, backend=backend)
        return logic.segment_files(paths, self._modelPath(model), outputDir, options, progress or logic.LogProgress(),
                                   cancel, format)

    def startSegmentation(self, volumeNodes, model, outputSegmentation=None, device: str = "auto", tta: bool = True,
                          stepSize: float = 0.5, folds=None, checkpoint: str = "final", show3D: bool = True,
                          onProgress=None, onFinished=None, uncertainty: bool = False, backend: str = "torch"):
        """Start segmenting in the worker and return the job at once. Its progress and end arrive as Qt events:
        onProgress(fraction, text), then onFinished(outcome) with outcome.result the segmentation node (or
        outcome.error / outcome.cancelled set). job.cancel() stops it; job.wait() blocks until it ends."""
        self.ensureDependencies()
        options = runner.Options(device, tta, stepSize, runner.fold_list(folds), checkpoint, show3D, uncertainty,
                                 backend)
        return logic.start_segmentation(volumeNodes, self._modelPath(model), options, outputSegmentation,
                                        onProgress, onFinished)

    def finetune(self, segmentationNodes, volumeNodes=None, model=None, iterations: int = None, minutes: float = None,
                 learningRate: float = 1e-3, freezeEncoder: bool = False, device: str = "auto",
                 makeCurrent: bool = True, progress=None, cancel=None):
        """Fine-tune `model` on corrected segmentation(s) and write the result as a new version of it.

        segmentationNodes: one node or a list; their segments are only read, and map to the model's labels
        by the tags Segment wrote or by their names (segments matching no label are left out and reported).
        volumeNodes: None (each segmentation's reference volume), or per segmentation a volume node or a
        list of channel volumes. model: a folder, a model's name, or None for the model that made the first
        segmentation. minutes: the whole run's time budget (default 5 on a CPU, 2 on a GPU, unless iterations
        is given); iterations: a fixed count instead. Returns a run with .version (id, path; current when makeCurrent), .result
        (dice_before / dice_after) and .dice_text(). The original model is never modified. Blocks.
        """
        self.ensureDependencies()
        plan = self._finetunePlan(segmentationNodes, volumeNodes, model)
        settings = runner.finetune_settings(iterations, minutes, learningRate, freezeEncoder, device)
        return logic.finetune(plan, settings, makeCurrent, progress or logic.LogProgress(), cancel)

    def startFinetune(self, segmentationNodes, volumeNodes=None, model=None, iterations: int = None,
                      minutes: float = None, learningRate: float = 1e-3, freezeEncoder: bool = False,
                      device: str = "auto", onProgress=None, onFinished=None):
        """finetune() as a background job, like startSegmentation; outcome.result is the run."""
        self.ensureDependencies()
        plan = self._finetunePlan(segmentationNodes, volumeNodes, model)
        settings = runner.finetune_settings(iterations, minutes, learningRate, freezeEncoder, device)
        return logic.start_finetune(plan, settings, on_progress=onProgress, on_finished=onFinished)

    def _modelPath(self, model) -> str:
        return runner.resolve_model(model, qt.QSettings())

    def _finetunePlan(self, segmentationNodes, volumeNodes, model):
        if model is None:  # the model that made the (first) segmentation
            nodes = [segmentationNodes] if hasattr(segmentationNodes, "GetAttribute") else list(segmentationNodes or [])
            model = nodes[0].GetAttribute("SegmentMBTFE.Model") if nodes and nodes[0] is not None else None
            if not model:
                from SegmentMBTFELib.errors import InputError
                raise InputError("Name the model to fine-tune (model=...): the segmentation does not say which "
                                 "model made it.")
        return runner.prepare_finetune(segmentationNodes, volumeNodes, self._modelPath(model))


class SegmentMBTFETest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload and Test, or ctest): the steps of SegmentMBTFESlicer/selftest.py on a tiny
    untrained model shipped in Resources/SelfTest (no download). Skipped, with the reason, when the Python
    packages are not installed: a test never installs anything."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def logic(self):
        """A fresh console API for a step of selftest.py (which never imports this module: it is the layer above)."""
        return SegmentMBTFELogic()

    def runTest(self):
        status = dependencies.check()
        if not status.ready:
            self.skipTest(f"SegmentMBTFE's Python packages are not ready ({status.message()}); click Segment once "
                          "to install them, then run the test again.")
        for step in selftest.STEPS:
            self.setUp()
            self.delayDisplay(step.__doc__)
            step(self)
        self.delayDisplay("SegmentMBTFE tests passed")
