"""The panel's Segment section: model, input volumes (one per model channel), output, advanced settings, the
Segment and Cancel buttons, progress.

    section = SegmentSection(ui, jobController)   # ui: the module's .ui widgets; the panel's JobController
    section.setup(); section.setParameterNode(parameterNode)

The run is a job for the worker process (logic.py): the panel stays responsive, shows the stage and tile,
and Cancel stops it (2 s at most) without changing the scene. In an existing segmentation only this
model's earlier segments are replaced, and only after the user agreed. The settings live in the module's
parameter node, so they are saved with the scene and restored when it is loaded.

Qt calls are the ones that behave alike in PythonQt (Slicer) and PySide6 (the tests): constructors, setters,
isChecked()-style getters, property("name") for values PythonQt exposes as properties, signal.connect(f).
"""
import logging
import traceback

import qt

import slicer
from slicer.i18n import tr as _

from SegmentMBTFELib.errors import SegmentError

from . import catalog, dependencies, jobs, logic, panel, runner

log = logging.getLogger(__name__)
ADD_MODEL_FOLDER = "<add model folder>"
ADD_MODEL_ZIP = "<add model zip>"
DEVICES = (("Auto (GPU when available)", "auto"), ("GPU (CUDA)", "cuda"), ("CPU", "cpu"))


class SegmentSection:
    def __init__(self, ui, jobController):
        self.ui, self.jobController = ui, jobController
        self._parameterNode = None   # the module's parameterNodeWrapper
        self._models = []            # catalog.ModelInfo, in the model selector's order
        self._channelSelectors = []  # one qMRMLNodeComboBox per model channel
        self._updatingGUI = False
        self.onModelChanged = []     # listeners: the Fine-tune section follows the chosen model
        self.onSegmented = []        # listeners(node, volume): a Segment just made or updated `node`
        # Asked before this model's earlier segments are replaced; Yes/No, like every Slicer confirmation.
        self.confirm = lambda question: slicer.util.confirmYesNoDisplay(question, windowTitle=_("Replace segments?"))

    def setup(self) -> None:
        ui = self.ui
        ui.outputSegmentationSelector.setMRMLScene(slicer.mrmlScene)
        ui.advancedCollapsibleButton.setProperty("collapsed", True)
        for text, device in DEVICES:
            ui.deviceSelector.addItem(_(text), device)
        ui.modelSelector.currentIndexChanged.connect(self.onModelSelected)
        ui.outputSegmentationSelector.currentNodeChanged.connect(self.onSettingChanged)
        ui.deviceSelector.currentIndexChanged.connect(self.onSettingChanged)
        ui.ttaCheckBox.toggled.connect(self.onSettingChanged)
        ui.stepSizeSpinBox.valueChanged.connect(self.onSettingChanged)
        ui.foldsLineEdit.textChanged.connect(self.onSettingChanged)
        ui.uncertaintyCheckBox.toggled.connect(self.onSettingChanged)
        ui.segmentButton.clicked.connect(self.onSegmentButton)
        ui.cancelButton.clicked.connect(self.onCancelButton)
        self.jobController.subscribe(self.updateButtonState)

    # -- parameter node ------------------------------------------------------------------------------------
    def setParameterNode(self, parameterNode) -> None:
        self._parameterNode = parameterNode
        if parameterNode is not None:
            self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self) -> None:
        p = self._parameterNode
        self._updatingGUI = True
        try:
            self.ui.outputSegmentationSelector.setCurrentNode(p.outputSegmentation)
            self.ui.deviceSelector.setCurrentIndex(max(0, self.ui.deviceSelector.findData(p.device)))
            self.ui.ttaCheckBox.setChecked(p.tta)
            self.ui.stepSizeSpinBox.setValue(p.stepSize)
            self.ui.foldsLineEdit.setText(p.folds)
            self.ui.uncertaintyCheckBox.setChecked(p.uncertainty)
            if p.modelPath:
                self._selectModel(p.modelPath)
            for selector, node in zip(self._channelSelectors, p.inputVolumes):
                selector.setCurrentNode(node)
        finally:
            self._updatingGUI = False
        self.updateButtonState()

    def updateParameterNodeFromGUI(self) -> None:
        if self._parameterNode is None or self._updatingGUI:
            return
        p = self._parameterNode
        model = self.currentModel()
        p.modelPath = model.path if model else ""
        p.inputVolumes = [node for node in self.inputVolumes() if node is not None]
        p.outputSegmentation = self.ui.outputSegmentationSelector.currentNode()
        p.device = self.device()
        p.tta = self.ui.ttaCheckBox.isChecked()
        p.stepSize = float(self.ui.stepSizeSpinBox.property("value"))
        p.folds = self.ui.foldsLineEdit.property("text")
        p.uncertainty = self.ui.uncertaintyCheckBox.isChecked()

    # -- models ----------------------------------------------------------------------------------------------
    def refreshModels(self, select: str = None) -> None:
        """Fill the model selector: the models `segment-mbtfe models list` shows, then "Add model folder..."
        and "Add model zip..."."""
        self._models = catalog.available_models(qt.QSettings())
        wanted = select or (self._parameterNode.modelPath if self._parameterNode else "") or \
            slicer.util.settingsValue(catalog.SETTINGS_LAST, "") or catalog.default_path()
        combo = self.ui.modelSelector
        combo.blockSignals(True)
        combo.clear()
        for info in self._models:
            combo.addItem(info.name + ("" if not info.problem else " " + _("(unusable)")), info.path)
            combo.setItemData(combo.findData(info.path), info.summary(), qt.Qt.ToolTipRole)
        combo.addItem(_("Add model folder..."), ADD_MODEL_FOLDER)
        combo.addItem(_("Add model zip..."), ADD_MODEL_ZIP)
        index = combo.findData(wanted) if wanted else -1
        combo.setCurrentIndex(index if index >= 0 else (0 if self._models else -1))
        combo.blockSignals(False)
        self.onModelSelected()

    def currentModel(self):
        path = self.ui.modelSelector.itemData(self.ui.modelSelector.property("currentIndex"))
        return next((m for m in self._models if m.path == path), None)

    def addModelFolder(self, path: str):
        """Add a trained model folder (registered where it is) or a model zip made by nnUNetv2_export_model_to_zip
        (unpacked into the models folder) to the selector, as `segment-mbtfe models add` does, and select it."""
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)  # a large zip takes a while to unpack
        try:
            info = catalog.add(path)
            problem = info.problem
        except SegmentError as error:
            info, problem = None, str(error)
        finally:
            qt.QApplication.restoreOverrideCursor()
        if problem:
            slicer.util.errorDisplay(problem, windowTitle=_("Not a model"))
            self._selectModel(self._parameterNode.modelPath if self._parameterNode else "")
            return None
        self.refreshModels(select=info.path)
        return info

    def _selectModel(self, path: str) -> None:
        index = self.ui.modelSelector.findData(path) if path else -1
        self.ui.modelSelector.setCurrentIndex(index if index >= 0 else (0 if self._models else -1))

    def onModelSelected(self, *args) -> None:
        combo = self.ui.modelSelector
        if combo.itemData(combo.property("currentIndex")) in (ADD_MODEL_FOLDER, ADD_MODEL_ZIP):
            chosen = self._askForModel(combo.itemData(combo.property("currentIndex")) == ADD_MODEL_ZIP)
            if chosen:
                self.addModelFolder(chosen)
            else:
                self._selectModel(self._parameterNode.modelPath if self._parameterNode else "")
            return
        model = self.currentModel()
        self.ui.modelInfoLabel.setText(model.summary() if model else _("No model yet: add a trained model folder."))
        if model is not None:
            qt.QSettings().setValue(catalog.SETTINGS_LAST, model.path)
        self._buildChannelSelectors(model)
        self.onSettingChanged()
        for listener in self.onModelChanged:
            listener()

    def _askForModel(self, zipFile: bool) -> str:
        if not zipFile:
            return qt.QFileDialog.getExistingDirectory(self.ui.modelSelector, _("Choose a trained model folder"))
        chosen = qt.QFileDialog.getOpenFileName(self.ui.modelSelector, _("Choose a model zip"), "",
                                                _("Model zips (*.zip)"))
        return chosen[0] if isinstance(chosen, tuple) else chosen  # PySide gives (file, filter), PythonQt the file

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
        scene = slicer.mrmlScene
        volumes = [scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
                   for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
        volumes = [v for v in volumes if v.GetClassName() == "vtkMRMLScalarVolumeNode" and not v.GetHideFromEditors()]
        found = panel.guess_volume(channel, [v.GetName() for v in volumes], index)
        return volumes[found] if found is not None else None

    def volumeAdded(self) -> None:
        """A volume was loaded: offer it for the channels that have none yet (as Slicer's selectors do)."""
        model = self.currentModel()
        for index, selector in enumerate(self._channelSelectors):
            if selector.currentNode() is None and model is not None:
                guess = self._guessVolume(model.channels[index], index)
                if guess is not None and guess not in self.inputVolumes():
                    selector.setCurrentNode(guess)

    def inputVolumes(self) -> list:
        return [selector.currentNode() for selector in self._channelSelectors]

    def channelSelectors(self) -> list:
        return list(self._channelSelectors)

    def device(self) -> str:
        return self.ui.deviceSelector.itemData(self.ui.deviceSelector.property("currentIndex")) or "auto"

    def showDependencyStatus(self) -> None:
        """Say before the first click when Python packages are missing (Segment offers to install them)."""
        status = dependencies.check()
        if not status.ready:
            self.ui.statusLabel.setText(_("Python packages {what}. Clicking Segment offers to install them.")
                                        .format(what=status.message()))

    # -- state of the buttons ----------------------------------------------------------------------------------
    def onSettingChanged(self, *args) -> None:
        self.updateParameterNodeFromGUI()
        self.updateButtonState()

    def updateButtonState(self) -> None:
        model = self.currentModel()
        _folds, foldsProblem = panel.parse_folds(self.ui.foldsLineEdit.property("text"), model.folds if model else [])
        enabled, toolTip = panel.segment_button_state(model, self.inputVolumes(), self.jobController.busy, foldsProblem)
        self.ui.segmentButton.setEnabled(enabled)
        self.ui.segmentButton.setToolTip(toolTip)
        segmenting = self.jobController.kind == "segmentation" and self.jobController.job is not None
        self.ui.cancelButton.setEnabled(segmenting and not self.jobController.cancelling)

    # -- running -----------------------------------------------------------------------------------------------
    def onSegmentButton(self) -> None:
        model = self.currentModel()
        if model is None:
            return
        try:
            self.jobController.start("segmentation",
                                     lambda onProgress, onFinished: self._begin(model, onProgress, onFinished),
                                     self.onProgress, self.onFinished)
        except jobs.Busy as refusal:  # another segmentation or fine-tune runs (panel or console)
            self.ui.statusLabel.setText(str(refusal))
        except Exception as error:  # noqa: BLE001 - every failure ends in a message, never silently
            self.ui.statusLabel.setText(_("Failed: {reason}").format(reason=panel.error_text(error)))
            panel.show_error(error, traceback.format_exc())

    def _begin(self, model, onProgress, onFinished):
        """Under the busy flag, the packages installed (job_controller): the replace question, then the job
        (None when the user said No)."""
        output = self.ui.outputSegmentationSelector.currentNode()
        question = runner.replace_question(output, model.name) if output is not None else ""
        if question and not self.confirm(question):
            self.ui.statusLabel.setText(_("Nothing was changed."))
            return None
        folds, _problem = panel.parse_folds(self.ui.foldsLineEdit.property("text"), model.folds)
        options = runner.Options(self.device(), self.ui.ttaCheckBox.isChecked(),
                                 float(self.ui.stepSizeSpinBox.property("value")), folds,
                                 uncertainty=self.ui.uncertaintyCheckBox.isChecked())
        panel.show_fraction(self.ui.progressBar, 0.0)
        self.ui.statusLabel.setText(_("Starting..."))
        return logic.start_segmentation(self.inputVolumes(), model.path, options, output, onProgress, onFinished,
                                        claimed=True)

    def onCancelButton(self) -> None:
        if self.jobController.kind == "segmentation":
            self.jobController.cancel()
            self.ui.statusLabel.setText(_("Cancelling the package install...") if self.jobController.installing
                                        else _("Cancelling (stops after the current tile)..."))

    def onProgress(self, fraction: float, stage: str) -> None:
        panel.show_fraction(self.ui.progressBar, fraction)
        self.ui.statusLabel.setText(panel.progress_text(fraction, stage))

    def onFinished(self, outcome) -> None:
        """The segments are in the scene (or nothing was written)."""
        if outcome.cancelled:
            panel.show_fraction(self.ui.progressBar, 0.0)
            self.ui.statusLabel.setText(_("Cancelled: nothing was changed."))
        elif outcome.error is not None:
            panel.show_fraction(self.ui.progressBar, 0.0)
            self.ui.statusLabel.setText(_("Failed: {reason}").format(reason=panel.error_text(outcome.error)))
            panel.show_error(outcome.error, outcome.details)
        else:
            node = outcome.result
            panel.show_fraction(self.ui.progressBar, 1.0)
            self._updatingGUI = True
            self.ui.outputSegmentationSelector.setCurrentNode(node)
            self._updatingGUI = False
            self.updateParameterNodeFromGUI()
            for listener in self.onSegmented:
                listener(node, next(iter(self.inputVolumes()), None))
            count = node.GetSegmentation().GetNumberOfSegments()
            notes = " ".join(outcome.messages)
            self.ui.statusLabel.setText(_("Done in {seconds:.1f} s: {node} has {count} segment(s).")
                                        .format(seconds=outcome.seconds, node=node.GetName(), count=count)
                                        + (f" {notes}" if notes else ""))
