"""SegmentMBTFE: AI segmentation with nnU-Net v2 and MBTFE-UNet models in 3D Slicer.

Module, parameter node, Widget, Logic and Test after Slicer's scripted-module template. This file is thin
glue: the work is in SegmentMBTFESlicer (MRML, jobs, catalog, dependencies) and the engine, SegmentMBTFELib.
Widget code uses only the Qt calls that behave the same under PythonQt (Slicer) and PySide6 (the tests):
constructors, setters, isChecked()-style getters, property("name") for values PythonQt exposes as
properties, and signal.connect(function).

Console use:
    logic = slicer.util.getModuleLogic("SegmentMBTFE")   # or SegmentMBTFE.SegmentMBTFELogic()
    segmentation = logic.segment(volumeNode, model="Dataset004_Hippocampus")
    logic.segmentFiles(["case1.nii.gz"], model="/path/to/model", outputDir="/tmp/out")
    run = logic.finetune(segmentation, model="Dataset004_Hippocampus", iterations=100)  # after correcting it
"""
import logging
import os
import traceback
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

from SegmentMBTFESlicer import catalog, dependencies, finetune_panel, panel, runner, segmentation
from SegmentMBTFESlicer.jobs import SegmentationJob

ADD_MODEL_FOLDER = "<add model folder>"
DEVICES = (("Auto (GPU when available)", "auto"), ("GPU (CUDA)", "cuda"), ("CPU", "cpu"))


def resourcePath(filename: str) -> str:
    """Resources/<filename>: beside the module when installed, at the repository root in a source checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join(here, "Resources", filename), os.path.join(os.path.dirname(here), "Resources", filename)]
    return next((path for path in candidates if os.path.exists(path)), candidates[0])


#
# SegmentMBTFE
#

class SegmentMBTFE(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Segment MBTFE")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SegmentMBTFE developers"]
        self.parent.helpText = _(
            "Segment a volume with an nnU-Net v2 or MBTFE-UNet model: pick the model and the input volume(s), "
            "click Segment, and edit the resulting segments right away in Segment Editor. "
            "Fine-tune adapts the model to your corrections as a new model version (the original stays). "
            "From the Python console: <code>SegmentMBTFE.SegmentMBTFELogic().segment(volumeNode, model=...)</code>.")
        self.parent.acknowledgementText = _(
            "Runs models trained with nnU-Net v2 (Isensee et al., Nature Methods 2021) without needing nnU-Net.")
        iconPath = resourcePath("Icons/SegmentMBTFE.png")
        if os.path.exists(iconPath):
            self.parent.icon = qt.QIcon(iconPath)


#
# SegmentMBTFEParameterNode
#

@parameterNodeWrapper
class SegmentMBTFEParameterNode:
    """The panel's state, saved with the scene.

    inputVolumes - one volume per model channel, in the model's channel order.
    modelPath - the chosen model folder.
    outputSegmentation - where the segments go; None creates a new segmentation.
    device - "auto", "cuda" or "cpu".
    tta - test-time augmentation (mirroring).
    stepSize - sliding-window step as a fraction of the tile.
    folds - folds to use, e.g. "0,1"; empty means all trained folds.
    """
    inputVolumes: list[vtkMRMLScalarVolumeNode]
    modelPath: str = ""
    outputSegmentation: vtkMRMLSegmentationNode
    device: str = "auto"
    tta: bool = True
    stepSize: Annotated[float, WithinRange(0.1, 1.0)] = 0.5
    folds: str = ""


#
# SegmentMBTFEWidget
#

class SegmentMBTFEWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._models = []            # catalog.ModelInfo, in the model selector's order
        self._channelSelectors = []  # one qMRMLNodeComboBox per model channel
        self._job = None             # the running SegmentationJob, if any
        self.finetune = None         # the Fine-tune section (finetune_panel.FinetuneSection)
        self._updatingGUI = False
        # Asked before this model's earlier segments are replaced; Yes/No, like every Slicer confirmation.
        self.confirm = lambda question: slicer.util.confirmYesNoDisplay(question, windowTitle=_("Replace segments?"))

    # -- setup and teardown -----------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resourcePath("UI/SegmentMBTFE.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.outputSegmentationSelector.setMRMLScene(slicer.mrmlScene)
        self.ui.advancedCollapsibleButton.setProperty("collapsed", True)
        for text, device in DEVICES:
            self.ui.deviceSelector.addItem(_(text), device)
        self.logic = SegmentMBTFELogic()

        # The worker thread never touches Qt or MRML: this timer brings its progress and result to the main thread.
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(100)
        self.pollTimer.timeout.connect(self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.ui.modelSelector.currentIndexChanged.connect(self.onModelSelected)
        self.ui.outputSegmentationSelector.currentNodeChanged.connect(self.onSettingChanged)
        self.ui.deviceSelector.currentIndexChanged.connect(self.onSettingChanged)
        self.ui.ttaCheckBox.toggled.connect(self.onSettingChanged)
        self.ui.stepSizeSpinBox.valueChanged.connect(self.onSettingChanged)
        self.ui.foldsLineEdit.textChanged.connect(self.onSettingChanged)
        self.ui.segmentButton.clicked.connect(self.onSegmentButton)
        self.ui.cancelButton.clicked.connect(self.onCancelButton)
        self.finetune = finetune_panel.FinetuneSection(self)
        self.finetune.setup()

        self.initializeParameterNode()
        self.refreshModels()
        self._showDependencyStatus()

    def cleanup(self) -> None:
        if self._job is not None:
            # Stop the run and let it end (within one tile), so the application-wide "running" flag is released.
            self._job.cancel()
            try:
                self._job.wait(timeout=60)
            except TimeoutError:
                logging.warning("SegmentMBTFE: the cancelled segmentation did not stop within 60 s")
        self.pollTimer.stop()
        if self.finetune is not None:
            self.finetune.cleanup()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        pass  # the parameter node is written on every change; nothing to disconnect

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:
            self._job.cancel()  # its nodes are going away: write nothing
        if self.finetune is not None:
            self.finetune.sceneClosing()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node ------------------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, parameterNode) -> None:
        self._parameterNode = parameterNode
        if parameterNode is not None and hasattr(self, "ui"):
            self._updateGUIFromParameterNode()

    def _updateGUIFromParameterNode(self) -> None:
        p = self._parameterNode
        self._updatingGUI = True
        try:
            self.ui.outputSegmentationSelector.setCurrentNode(p.outputSegmentation)
            self.ui.deviceSelector.setCurrentIndex(max(0, self.ui.deviceSelector.findData(p.device)))
            self.ui.ttaCheckBox.setChecked(p.tta)
            self.ui.stepSizeSpinBox.setValue(p.stepSize)
            self.ui.foldsLineEdit.setText(p.folds)
        finally:
            self._updatingGUI = False
        if p.modelPath:
            self._selectModel(p.modelPath)
        self.updateButtonState()

    def _updateParameterNodeFromGUI(self) -> None:
        if self._parameterNode is None or self._updatingGUI:
            return
        p = self._parameterNode
        model = self.currentModel()
        p.modelPath = model.path if model else ""
        p.inputVolumes = [node for node in self.inputVolumes() if node is not None]
        p.outputSegmentation = self.ui.outputSegmentationSelector.currentNode()
        p.device = self.ui.deviceSelector.itemData(self.ui.deviceSelector.property("currentIndex")) or "auto"
        p.tta = self.ui.ttaCheckBox.isChecked()
        p.stepSize = float(self.ui.stepSizeSpinBox.property("value"))
        p.folds = self.ui.foldsLineEdit.property("text")

    # -- models ----------------------------------------------------------------------------------------------
    def refreshModels(self, select: str = None) -> None:
        """Fill the model selector: shipped models, the user's folders, then "Add model folder..."."""
        settings = qt.QSettings()
        self._models = catalog.available_models(catalog.remembered_folders(settings))
        wanted = select or (self._parameterNode.modelPath if self._parameterNode else "") or \
            slicer.util.settingsValue(catalog.SETTINGS_LAST, "") or catalog.default_path()
        combo = self.ui.modelSelector
        combo.blockSignals(True)
        combo.clear()
        for info in self._models:
            combo.addItem(info.name + ("" if not info.problem else " " + _("(unusable)")), info.path)
            combo.setItemData(combo.findData(info.path), info.summary(), qt.Qt.ToolTipRole)
        combo.addItem(_("Add model folder..."), ADD_MODEL_FOLDER)
        index = combo.findData(wanted) if wanted else -1
        combo.setCurrentIndex(index if index >= 0 else (0 if self._models else -1))
        combo.blockSignals(False)
        self.onModelSelected()

    def currentModel(self):
        path = self.ui.modelSelector.itemData(self.ui.modelSelector.property("currentIndex"))
        return next((m for m in self._models if m.path == path), None)

    def addModelFolder(self, folder: str):
        """Add a trained model folder to the selector (remembered across sessions) and select it."""
        info = catalog.describe(folder)
        if info.problem:
            slicer.util.errorDisplay(info.problem, windowTitle=_("Not a model folder"))
            self._selectModel(self._parameterNode.modelPath if self._parameterNode else "")
            return None
        catalog.remember_folder(qt.QSettings(), info.path)
        self.refreshModels(select=info.path)
        return info

    def _selectModel(self, path: str) -> None:
        index = self.ui.modelSelector.findData(path) if path else -1
        self.ui.modelSelector.setCurrentIndex(index if index >= 0 else (0 if self._models else -1))

    def onModelSelected(self, *args) -> None:
        combo = self.ui.modelSelector
        if combo.itemData(combo.property("currentIndex")) == ADD_MODEL_FOLDER:
            folder = qt.QFileDialog.getExistingDirectory(self.parent, _("Choose a trained model folder"))
            if folder:
                self.addModelFolder(folder)
            else:
                self._selectModel(self._parameterNode.modelPath if self._parameterNode else "")
            return
        model = self.currentModel()
        self.ui.modelInfoLabel.setText(model.summary() if model else _("No model yet: add a trained model folder."))
        if model is not None:
            qt.QSettings().setValue(catalog.SETTINGS_LAST, model.path)
        self._buildChannelSelectors(model)
        self.onSettingChanged()
        if self.finetune is not None:
            self.finetune.modelChanged()

    # -- input selectors, one per model channel -------------------------------------------------------------
    def _buildChannelSelectors(self, model) -> None:
        previous = self.inputVolumes()
        if not any(previous) and self._parameterNode is not None:
            previous = list(self._parameterNode.inputVolumes)
        layout = self.ui.inputVolumesFrame.layout()
        while layout.rowCount() > 0:
            layout.removeRow(0)
        self._channelSelectors = []
        for index, channel in enumerate(model.channels if model else []):
            selector = self._newVolumeSelector(channel)
            known = previous[index] if index < len(previous) else None
            selector.setCurrentNode(known if known is not None else self._guessVolume(channel, index))
            selector.currentNodeChanged.connect(self.onSettingChanged)
            layout.addRow(_("{channel} volume:").format(channel=channel), selector)
            self._channelSelectors.append(selector)

    def _newVolumeSelector(self, channel: str):
        selector = slicer.qMRMLNodeComboBox()
        selector.setProperty("nodeTypes", ["vtkMRMLScalarVolumeNode"])
        selector.setProperty("showChildNodeTypes", False)  # no label maps
        selector.setProperty("noneEnabled", True)
        selector.setProperty("noneDisplay", _("Choose the {channel} volume").format(channel=channel))
        selector.setProperty("addEnabled", False)
        selector.setProperty("removeEnabled", False)
        selector.setMRMLScene(slicer.mrmlScene)
        selector.setToolTip(_("The image the model reads as its '{channel}' channel.").format(channel=channel))
        return selector

    def _guessVolume(self, channel: str, index: int):
        volumes = [slicer.mrmlScene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
                   for i in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
        volumes = [v for v in volumes if v.GetClassName() == "vtkMRMLScalarVolumeNode" and not v.GetHideFromEditors()]
        found = panel.guess_volume(channel, [v.GetName() for v in volumes], index)
        return volumes[found] if found is not None else None

    def onNodeAdded(self, caller, event) -> None:
        """A volume was loaded: offer it for the channels that have none yet (as Slicer's selectors do)."""
        model = self.currentModel()
        for index, selector in enumerate(self._channelSelectors):
            if selector.currentNode() is None and model is not None:
                guess = self._guessVolume(model.channels[index], index)
                if guess is not None and guess not in self.inputVolumes():
                    selector.setCurrentNode(guess)

    def inputVolumes(self) -> list:
        return [selector.currentNode() for selector in self._channelSelectors]

    # -- state of the Segment button -------------------------------------------------------------------------
    def onSettingChanged(self, *args) -> None:
        self._updateParameterNodeFromGUI()
        self.updateButtonState()

    def updateButtonState(self) -> None:
        model = self.currentModel()
        _folds, foldsProblem = panel.parse_folds(self.ui.foldsLineEdit.property("text"), model.folds if model else [])
        running = self._job is not None or (self.finetune is not None and self.finetune.running)
        enabled, toolTip = panel.button_state(model, self.inputVolumes(), running, foldsProblem)
        self.ui.segmentButton.setEnabled(enabled)
        self.ui.segmentButton.setToolTip(toolTip)
        self.ui.cancelButton.setEnabled(self._job is not None and not self._job.cancelling)
        if self.finetune is not None:
            self.finetune.updateButtons()

    def device(self) -> str:
        return self.ui.deviceSelector.itemData(self.ui.deviceSelector.property("currentIndex")) or "auto"

    def _showDependencyStatus(self) -> None:
        status = dependencies.check()
        if not status.ready:
            self.ui.statusLabel.setText(_("Python packages {what}. Clicking Segment offers to install them.")
                                        .format(what=status.message()))

    # -- running -----------------------------------------------------------------------------------------------
    def onSegmentButton(self) -> None:
        if self._job is not None or runner.is_running():
            self.ui.statusLabel.setText(_(runner.busy_message()))
            return
        model = self.currentModel()
        if model is None:
            return
        try:
            self.logic.ensureDependencies()
            output = self.ui.outputSegmentationSelector.currentNode()
            question = runner.replace_question(output, model.name) if output is not None else ""
            if question and not self.confirm(question):
                self.ui.statusLabel.setText(_("Nothing was changed."))
                return
            folds, _problem = panel.parse_folds(self.ui.foldsLineEdit.property("text"), model.folds)
            self._job = self.logic.startSegmentation(
                self.inputVolumes(), model.path, outputSegmentation=output,
                device=self.device(), tta=self.ui.ttaCheckBox.isChecked(),
                stepSize=float(self.ui.stepSizeSpinBox.property("value")),
                folds=folds, onProgress=self.onProgress, onFinished=self.onFinished)
        except Exception as error:  # noqa: BLE001 - every failure ends in a message box, never silently
            self.showError(error, traceback.format_exc())
            return
        self.ui.progressBar.setValue(0)
        self.ui.statusLabel.setText(_("Starting..."))
        self.updateButtonState()
        self.pollTimer.start()

    def onCancelButton(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self.ui.statusLabel.setText(_("Cancelling (stops after the current tile)..."))
            self.updateButtonState()

    def onPoll(self) -> None:
        if self._job is not None:
            self._job.poll()

    def onProgress(self, fraction: float, stage: str) -> None:
        self.ui.progressBar.setValue(int(round(100 * fraction)))
        self.ui.statusLabel.setText(panel.progress_text(fraction, stage))

    def onFinished(self, outcome) -> None:
        """Main thread, from onPoll: the segments are already in the scene (or nothing was written)."""
        self._job = None
        self.pollTimer.stop()
        if outcome.cancelled:
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.setText(_("Cancelled: nothing was changed."))
        elif outcome.error is not None:
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.setText(_("Failed: {reason}").format(reason=oneLine(outcome.error)))
            self.showError(outcome.error, outcome.details)
        else:
            node = outcome.result
            self.ui.progressBar.setValue(100)
            self._updatingGUI = True
            self.ui.outputSegmentationSelector.setCurrentNode(node)
            self._updatingGUI = False
            self._updateParameterNodeFromGUI()
            self.finetune.segmented(node, next(iter(self.inputVolumes()), None))
            count = node.GetSegmentation().GetNumberOfSegments()
            self.ui.statusLabel.setText(_("Done in {seconds:.1f} s: {node} has {count} segment(s).")
                                        .format(seconds=outcome.seconds, node=node.GetName(), count=count))
        self.updateButtonState()

    def showError(self, error: BaseException, details: str = "", title: str = None) -> None:
        """A message box with one line saying what went wrong; the details go to the log."""
        message = oneLine(error)
        logging.error(f"SegmentMBTFE: {message}\n{details}" if details else f"SegmentMBTFE: {message}")
        slicer.util.errorDisplay(message, windowTitle=title or _("Segmentation failed"), detailedText=details)

    @staticmethod
    def errorText(error: BaseException) -> str:
        return oneLine(error)


def oneLine(error: BaseException) -> str:
    """The user's message for an error: SegmentError and DependencyError say it themselves; anything else is a
    bug, shown by its type and first line (the traceback is in the log)."""
    from SegmentMBTFESlicer.dependencies import DependencyError
    text = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, DependencyError) or type(error).__module__.startswith("SegmentMBTFELib"):
        return text
    return _("Unexpected error ({kind}): {text}. See the log for details.").format(kind=type(error).__name__,
                                                                                   text=text)


#
# SegmentMBTFELogic
#

class SegmentMBTFELogic(ScriptedLoadableModuleLogic):
    """Segmentation without the panel: the console and batch API.

    Every method takes `model` as a model folder path, the name of a shipped or added model (as shown in
    the panel, e.g. "Dataset004_Hippocampus (3d_fullres)" or the folder name), or a loaded engine Model.
    Loaded models are cached, so repeated calls do not read the checkpoints again.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.models = runner.ModelCache()

    def getParameterNode(self):
        return SegmentMBTFEParameterNode(super().getParameterNode())

    def ensureDependencies(self, askConfirmation: bool = True) -> None:
        """Install missing Python packages (PyTorch through the PyTorch extension); raise if any stay missing."""
        status = dependencies.check()
        if status.ready:
            return
        confirm = (lambda text: slicer.util.confirmOkCancelDisplay(text)) if askConfirmation else (lambda text: True)
        dependencies.ensure(confirm, slicer.util.pip_install, dependencies.torch_utils_module(), status=status)

    def availableModels(self) -> list:
        """The models the panel offers (shipped and added), each with name, path, channels, labels, folds."""
        return catalog.available_models(catalog.remembered_folders(qt.QSettings()))

    def segment(self, volumeNodes, model, outputSegmentation=None, device: str = "auto", tta: bool = True,
                stepSize: float = 0.5, folds=None, checkpoint: str = "final", show3D: bool = True,
                progress=None, cancel=None):
        """Segment `volumeNodes` (one per model channel, or a single node) and return the segmentation node.

        outputSegmentation: None creates a new node; an existing node keeps its other segments and only this
        model's earlier segments are replaced. progress(fraction, text) is called along the way (default: the
        log); `cancel` is a threading.Event that stops the run within one tile. Blocks until done: use the
        panel (or startSegmentation) to keep the application responsive.
        """
        self.ensureDependencies()
        runner.claim()
        try:
            inputs = runner.prepare_inputs(volumeNodes)
            model = runner.resolve_model(model, catalog.remembered_folders(qt.QSettings()))
            options = runner.Options(device, tta, stepSize, _foldList(folds), checkpoint, show3D)
            prediction = runner.predict(self.models, model, inputs.volumes, options, progress or LogProgress(), cancel)
            return runner.apply_prediction(prediction, inputs.geometry, slicer.mrmlScene, outputSegmentation,
                                           show3d=show3D, reference_volume_id=inputs.node_ids[0])
        finally:
            runner.release()

    def segmentFiles(self, paths, model, outputDir, device: str = "auto", tta: bool = True, stepSize: float = 0.5,
                     folds=None, checkpoint: str = "final", progress=None, cancel=None) -> list:
        """Segment image files (each a path, or a list of channel paths) into outputDir/<case>.seg.nrrd.

        Nothing is added to the scene. Returns the paths written.
        """
        self.ensureDependencies()
        runner.claim()
        try:
            model = runner.resolve_model(model, catalog.remembered_folders(qt.QSettings()))
            options = runner.Options(device, tta, stepSize, _foldList(folds), checkpoint)
            written = runner.segment_files(self.models, paths, model, outputDir, options, progress or LogProgress(),
                                           cancel)
            return [str(path) for path in written]
        finally:
            runner.release()

    def startSegmentation(self, volumeNodes, model, outputSegmentation=None, device: str = "auto", tta: bool = True,
                          stepSize: float = 0.5, folds=None, checkpoint: str = "final", show3D: bool = True,
                          onProgress=None, onFinished=None) -> SegmentationJob:
        """Start segmenting in a worker thread and return the job at once.

        Call job.poll() from the main thread (the panel does it from a QTimer): it reports progress, and when
        the model is done it writes the segments into the scene and calls onFinished(outcome), where
        outcome.result is the segmentation node (or outcome.error / outcome.cancelled is set).
        """
        runner.claim()
        try:
            inputs = runner.prepare_inputs(volumeNodes)
            model = runner.resolve_model(model, catalog.remembered_folders(qt.QSettings()))
            options = runner.Options(device, tta, stepSize, _foldList(folds), checkpoint, show3D)
        except Exception:
            runner.release()
            raise

        def work(progress, cancel):
            return runner.predict(self.models, model, inputs.volumes, options, progress, cancel)

        def settle(outcome, job):
            self._writeResult(outcome, job, inputs, outputSegmentation, show3D)
        return self._startJob(work, settle, onProgress, onFinished)

    @staticmethod
    def _startJob(work, settle, onProgress, onFinished) -> SegmentationJob:
        """Run `work` in a worker thread under the claim the caller took; when it ends, on the main thread,
        settle(outcome, job) puts its result into the scene, the claim is released, onFinished(outcome) runs."""
        job = None

        def finished(outcome):
            try:
                settle(outcome, job)
            finally:
                runner.release()
            if onFinished:
                onFinished(outcome)

        job = SegmentationJob(work, onProgress, finished)
        return job.start()

    def _writeResult(self, outcome, job, inputs, output, show3D) -> None:
        """Main thread: put a finished prediction into the scene, unless the run was cancelled meanwhile."""
        if outcome.result is None:
            return
        if job.cancelling:
            outcome.result, outcome.cancelled = None, True
            return
        try:
            if output is not None and output.GetScene() is None:
                from SegmentMBTFELib.errors import InputError
                raise InputError(f"The output segmentation {output.GetName()} was deleted while segmenting; "
                                 "nothing was written.")
            outcome.result = runner.apply_prediction(outcome.result, inputs.geometry, slicer.mrmlScene, output,
                                                     show3d=show3D, reference_volume_id=inputs.node_ids[0])
        except Exception as error:  # noqa: BLE001 - reported through the outcome like any other failure
            outcome.result, outcome.error, outcome.details = None, error, traceback.format_exc()


    # -- fine-tuning -------------------------------------------------------------------------------------------
    def finetune(self, segmentationNodes, volumeNodes=None, model=None, iterations: int = 200, minutes: float = None,
                 learningRate: float = 1e-3, freezeEncoder: bool = False, device: str = "auto",
                 makeCurrent: bool = True, progress=None, cancel=None):
        """Fine-tune `model` on corrected segmentation(s) and write the result as a new version of it.

        segmentationNodes: one node or a list; their segments are only read, and map to the model's labels
        by the tags Segment wrote or by their names (segments matching no label are left out and reported).
        volumeNodes: None (each segmentation's reference volume), or per segmentation a volume node or a
        list of channel volumes. model: a folder, a model's name, or None for the model that made the first
        segmentation. iterations / minutes: the budget (minutes None: no time limit). Returns a run with
        .version (id, path; current when makeCurrent), .result (dice_before / dice_after) and .dice_text().
        The original model is never modified. Blocks until done (see startFinetune for the background).
        """
        self.ensureDependencies()
        runner.claim("fine-tune")
        try:
            plan = self._finetunePlan(segmentationNodes, volumeNodes, model)
            settings = runner.finetune_settings(iterations, minutes, learningRate, freezeEncoder, device)
            return runner.finetune_model(self.models, plan, settings, progress or LogProgress(), cancel,
                                         make_current=makeCurrent)
        finally:
            runner.release()

    def startFinetune(self, segmentationNodes, volumeNodes=None, model=None, iterations: int = 200,
                      minutes: float = None, learningRate: float = 1e-3, freezeEncoder: bool = False,
                      device: str = "auto", onProgress=None, onFinished=None) -> SegmentationJob:
        """finetune() in a worker thread, polled like startSegmentation; outcome.result is the run. The new
        version becomes current on the main thread when the job ends; a cancelled job leaves no version."""
        runner.claim("fine-tune")
        try:
            plan = self._finetunePlan(segmentationNodes, volumeNodes, model)
            settings = runner.finetune_settings(iterations, minutes, learningRate, freezeEncoder, device)
        except Exception:
            runner.release()
            raise
        written = []

        def work(progress, cancel):
            return runner.finetune_model(self.models, plan, settings, progress, cancel, make_current=False,
                                         written=written)

        def settle(outcome, job):
            self._settleVersion(outcome, job, plan, written)
        return self._startJob(work, settle, onProgress, onFinished)

    def _finetunePlan(self, segmentationNodes, volumeNodes, model):
        if model is None:
            nodes = [segmentationNodes] if hasattr(segmentationNodes, "GetAttribute") else list(segmentationNodes or [])
            first = nodes[0] if nodes else None
            model = first.GetAttribute(segmentation.ATTRIBUTE_PREFIX + "Model") if first is not None else None
            if not model:
                from SegmentMBTFELib.errors import InputError
                raise InputError("Name the model to fine-tune (model=...): the segmentation does not say which "
                                 "model made it.")
        path = runner.resolve_model(model, catalog.remembered_folders(qt.QSettings()))
        if hasattr(path, "predict"):
            path = str(path.folder.path)  # a loaded model: its folder (the versions are the folder's)
        return runner.prepare_finetune(segmentationNodes, volumeNodes, path)

    def _settleVersion(self, outcome, job, plan, written) -> None:
        """Main thread: make the written version current, or remove it when the run was cancelled meanwhile."""
        from SegmentMBTFELib.versions import ModelVersions
        try:
            versions = ModelVersions(plan.model_path)
            if outcome.cancelled or job.cancelling:
                for version in written:
                    versions.delete(version.id)
                outcome.result, outcome.cancelled = None, True
            elif outcome.result is not None:
                outcome.result.version = versions.use(outcome.result.version.id)
        except Exception as error:  # noqa: BLE001 - reported through the outcome like any other failure
            outcome.result, outcome.error, outcome.details = None, error, traceback.format_exc()


class LogProgress:
    """Default progress for the console: a log line at each new stage and every 10%."""

    def __init__(self):
        self.lastStage, self.lastTenth = None, -1

    def __call__(self, fraction: float, stage: str) -> None:
        stageName = stage.split(":")[0].split(" of ")[0].rstrip("0123456789 ")
        tenth = int(fraction * 10)
        if stageName != self.lastStage or tenth != self.lastTenth:
            logging.info(f"SegmentMBTFE: {int(100 * fraction)}% {stage}")
            self.lastStage, self.lastTenth = stageName, tenth
        slicer.app.processEvents()  # keep the application painting while the console call runs


def _foldList(folds):
    if folds is None or folds == "":
        return None
    if isinstance(folds, (int, str)):
        folds = [f for f in str(folds).replace(",", " ").split() if f]
    return [str(f) for f in folds]


#
# SegmentMBTFETest
#

class SegmentMBTFETest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload and Test, or `Slicer --testing`): the same flow as the pytest suite, on a
    tiny untrained model written on the fly (no download) and a synthetic volume."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ConsoleSegmentMatchesEngine()
        self.setUp()
        self.test_PanelSegmentsAndKeepsUserSegments()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()
        self.setUp()
        self.test_FinetuneWritesANewVersion()
        self.delayDisplay("SegmentMBTFE tests passed")

    def _modelAndVolume(self):
        import tempfile
        import numpy as np
        from SegmentMBTFESlicer import selftest
        logic = SegmentMBTFELogic()
        logic.ensureDependencies(askConfirmation=False)
        folder = selftest.write_tiny_model(tempfile.mkdtemp(prefix="SegmentMBTFETest-"))
        volume = slicer.util.addVolumeFromArray(selftest.test_image(), name="SelfTestVolume")
        volume.SetSpacing(1.0, 1.0, 1.0)
        return logic, folder, volume, np

    def _enginePrediction(self, logic, folder, volume):
        from SegmentMBTFESlicer.volumes import volume_from_node
        model = logic.models.get(str(folder))
        return model.predict([volume_from_node(volume)], tta=False)

    def test_ConsoleSegmentMatchesEngine(self):
        self.delayDisplay("Console API: segment() puts the engine's labels into named segments")
        logic, folder, volume, np = self._modelAndVolume()
        node = logic.segment(volume, model=str(folder), tta=False)
        expected = self._enginePrediction(logic, folder, volume)
        segments = node.GetSegmentation()
        self.assertEqual([segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())],
                         ["anterior", "posterior"])
        for index, (value, name) in enumerate(expected.segments):
            voxels = segmentation.segment_array(node, segments.GetNthSegmentID(index))
            np.testing.assert_array_equal(voxels, (expected.labels.array == value).astype(np.uint8))
        self.assertEqual(segmentation.provenance(node)["Model"], expected.settings["model"])

    def test_PanelSegmentsAndKeepsUserSegments(self):
        self.delayDisplay("Panel: Segment into a segmentation that holds a user's segment")
        logic, folder, volume, np = self._modelAndVolume()
        output = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Mine")
        output.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        userId = output.GetSegmentation().AddEmptySegment("", "my tumour")
        userVoxels = np.zeros(slicer.util.arrayFromVolume(volume).shape, np.uint8)
        userVoxels[2:6, 3:9, 4:8] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(userVoxels, output, userId, volume)
        widget = slicer.modules.segmentmbtfe.widgetRepresentation().self()
        widget.confirm = lambda question: True  # the user says "Replace"
        widget.addModelFolder(str(folder))
        widget._channelSelectors[0].setCurrentNode(volume)
        widget.ui.outputSegmentationSelector.setCurrentNode(output)
        widget.ui.ttaCheckBox.setChecked(False)
        try:
            for _round in range(2):  # the second run replaces the model's segments (after the confirmation)
                widget.ui.segmentButton.click()
                while widget._job is not None:
                    slicer.app.processEvents()
                    widget.onPoll()
        finally:
            catalog.forget_folder(qt.QSettings(), str(folder))  # leave the user's model list as it was
            widget.refreshModels()
        names = [output.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(output.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual(names, ["my tumour", "anterior", "posterior"])
        np.testing.assert_array_equal(segmentation.segment_array(output, userId), userVoxels)

    def test_CancelLeavesSceneUnchanged(self):
        self.delayDisplay("Cancel: nothing is written")
        import threading
        logic, folder, volume, np = self._modelAndVolume()
        before = slicer.mrmlScene.GetNumberOfNodes()
        cancel = threading.Event()
        cancel.set()
        from SegmentMBTFELib.errors import Cancelled
        with self.assertRaises(Cancelled):
            logic.segment(volume, model=str(folder), tta=False, cancel=cancel)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)

    def test_FinetuneWritesANewVersion(self):
        self.delayDisplay("Fine-tune: corrected segments make a new current version; the original and segments stay")
        import os
        import tempfile
        from SegmentMBTFESlicer import selftest
        logic, folder, volume, np = self._modelAndVolume()
        node = logic.segment(volume, model=str(folder), tta=False, show3D=False)
        labels, ids = selftest.test_labels(), {}
        for value, name in ((1, "anterior"), (2, "posterior")):  # the user's corrections, as Segment Editor makes
            ids[value] = node.GetSegmentation().GetSegmentIdBySegmentName(name)
            slicer.util.updateSegmentBinaryLabelmapFromArray((labels == value).astype(np.uint8), node, ids[value],
                                                             volume)
        checkpoint = (folder / "fold_0" / "checkpoint_final.pth").read_bytes()
        home = os.environ.get("SEGMENTMBTFE_HOME")
        os.environ["SEGMENTMBTFE_HOME"] = tempfile.mkdtemp(prefix="SegmentMBTFETest-versions-")  # not the user's
        try:
            run = logic.finetune(node, volume, model=str(folder), iterations=2)
        finally:
            os.environ.pop("SEGMENTMBTFE_HOME") if home is None else os.environ.update(SEGMENTMBTFE_HOME=home)
        self.assertEqual((run.version.id, run.version.current, run.parent), ("v1", True, "original"))
        self.assertTrue(run.dice_text().startswith("Dice before "))
        self.assertEqual((folder / "fold_0" / "checkpoint_final.pth").read_bytes(), checkpoint)
        for value, segmentId in ids.items():
            np.testing.assert_array_equal(segmentation.segment_array(node, segmentId), labels == value)
