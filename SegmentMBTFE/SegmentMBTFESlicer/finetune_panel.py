"""The panel's Fine-tune section: corrected segmentation in, new model version out, versions to choose from.

    section = FinetuneSection(ui, segmentSection, jobController)   # the panel's JobController
    section.setup()

It fine-tunes the model chosen in the Segment section's model selector, on the segmentation the user corrected (by
default the one Segment just made) and the volume it was drawn on (by default its reference volume; for a
model with several channels, the panel's input volumes), together with the cases added to the case list.
Like Segment, the run is a job for the worker process, with progress and Cancel, and only one
segmentation or fine-tune runs at a time. A finished run writes a new version and makes it current, so the
next Segment uses it; the version list can use an older one again, roll back, or delete versions. The
original model is never modified, and the user's segments are only read.

Qt calls are the ones that behave alike in PythonQt and PySide6 (see segment_panel.py).
"""
import logging
import traceback

import qt

import slicer

from . import corrections, jobs, logic, panel, runner

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- what the section shows

def result_text(run) -> str:
    """What the section shows after a run: Dice before -> after, per label, and what was left out."""
    result = run.result
    budget = f" (time budget {result.budget_s / 60:.1f} min)" if result.budget_s else ""
    lines = [runner.dice_text(result) or "No Dice measured (evaluation was off).",
             f"{result.iterations} training iterations in {result.seconds:.0f} s on {result.device}{budget}."]
    details = runner.dice_details(run.result)
    if details:
        lines.append(f"Per label: {details}.")
    if run.result.stopped:
        lines.append(f"Training stopped early: {run.result.stopped}.")
    if run.report:
        lines.append(run.report)
    return "\n".join(lines)


def version_text(version) -> str:
    return version.summary() + ("  \u2190 current" if version.current else "")


# ------------------------------------------------------------------------------------------ the section

class FinetuneSection:
    def __init__(self, ui, segmentSection, jobController):
        self.ui, self.segment, self.jobController = ui, segmentSection, jobController
        self._versions = []              # versions.Version, in the list's order
        self._labels = {}                # model path -> (engine model name, [(value, label name)])
        self._observed = None, []        # (segmentation node, observer tags): segments added, removed, renamed
        self._matchProblem = ""
        self._cases = []                 # further cases: (segmentation node ID, [volume node IDs])
        # Asked before a version is deleted; Yes/No, like every Slicer confirmation.
        self.confirmDelete = lambda question: slicer.util.confirmYesNoDisplay(question, windowTitle="Delete version?")

    def setup(self) -> None:
        ui = self.ui
        ui.finetuneCollapsibleButton.setProperty("collapsed", True)
        ui.finetuneSegmentationSelector.setMRMLScene(slicer.mrmlScene)
        ui.finetuneVolumeSelector.setMRMLScene(slicer.mrmlScene)
        ui.finetuneSegmentationSelector.currentNodeChanged.connect(self.onSegmentationChanged)
        ui.finetuneVolumeSelector.currentNodeChanged.connect(lambda node: self.updateButtons())
        ui.addFinetuneCaseButton.clicked.connect(self.onAddCase)
        ui.removeFinetuneCaseButton.clicked.connect(self.onRemoveCase)
        ui.finetuneCasesList.currentRowChanged.connect(lambda row: self.updateButtons())
        ui.finetuneButton.clicked.connect(self.onFinetuneButton)
        ui.finetuneCancelButton.clicked.connect(self.onCancelButton)
        ui.versionsList.currentRowChanged.connect(lambda row: self.updateVersionButtons())
        ui.useVersionButton.clicked.connect(self.onUseVersion)
        ui.rollbackButton.clicked.connect(self.onRollback)
        ui.deleteVersionButton.clicked.connect(self.onDeleteVersion)
        self.segment.onModelChanged.append(self.modelChanged)
        self.segment.onSegmented.append(self.segmented)
        self.jobController.subscribe(self.updateButtons)
        self.onSegmentationChanged(ui.finetuneSegmentationSelector.currentNode())

    def cleanup(self) -> None:
        self._observe(None)

    def sceneClosing(self) -> None:
        """The scene is being closed (the panel cancels a running job): the case list empties."""
        self._cases = []
        self.ui.finetuneCasesList.clear()

    @property
    def running(self) -> bool:
        return self.jobController.kind == "fine-tune"

    # -- what to fine-tune ---------------------------------------------------------------------------------
    def modelChanged(self) -> None:
        self.refreshVersions()
        self.refreshMatch()

    def segmented(self, node, volume=None) -> None:
        """Segment made or updated `node` from `volume`: that is the case to correct and fine-tune on."""
        self.ui.finetuneSegmentationSelector.setCurrentNode(node)
        if volume is not None and corrections.reference_volume(node) is None:
            self.ui.finetuneVolumeSelector.setCurrentNode(volume)  # an existing node naming no volume of its own

    def onSegmentationChanged(self, node) -> None:
        self._observe(node)
        volume = corrections.reference_volume(node) if node is not None else None
        if volume is not None:
            self.ui.finetuneVolumeSelector.setCurrentNode(volume)
        self.refreshMatch()

    def _observe(self, node) -> None:
        observed, tags = self._observed
        for tag in tags:
            observed.RemoveObserver(tag)
        tags = []
        if node is not None:
            for event in (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
                          slicer.vtkSegmentation.SegmentModified):
                tags.append(node.AddObserver(event, lambda caller, event: self.refreshMatch()))
        self._observed = node, tags

    def caseVolumes(self) -> list:
        model = self.segment.currentModel()
        if model is not None and len(model.channels) > 1:
            return self.segment.inputVolumes()
        return [self.ui.finetuneVolumeSelector.currentNode()]

    def cases(self):
        """([segmentation nodes], [[volume nodes] per segmentation]): the chosen one first, then the list's."""
        node, volumes = self.ui.finetuneSegmentationSelector.currentNode(), self.caseVolumes()
        segmentations, channels = ([node], [volumes]) if node is not None else ([], [])
        scene = slicer.mrmlScene
        for segmentationId, volumeIds in self._cases:
            if node is None or segmentationId != node.GetID():
                segmentations.append(scene.GetNodeByID(segmentationId))
                channels.append([scene.GetNodeByID(i) for i in volumeIds])
        return segmentations, channels

    def onAddCase(self) -> None:
        node, volumes = self.ui.finetuneSegmentationSelector.currentNode(), self.caseVolumes()
        if node is None or not volumes or any(v is None for v in volumes):
            return
        case = (node.GetID(), [v.GetID() for v in volumes])
        self._cases = [c for c in self._cases if c[0] != case[0]] + [case]
        self.refreshCases()

    def onRemoveCase(self) -> None:
        row = self.ui.finetuneCasesList.property("currentRow")
        if row is not None and 0 <= row < len(self._cases):
            del self._cases[row]
        self.refreshCases()

    def refreshCases(self) -> None:
        """The case list; cases whose segmentation or volume left the scene are dropped."""
        scene = slicer.mrmlScene
        self._cases = [(s, v) for s, v in self._cases
                       if scene.GetNodeByID(s) is not None and all(scene.GetNodeByID(i) is not None for i in v)]
        self.ui.finetuneCasesList.clear()
        for segmentationId, volumeIds in self._cases:
            names = ", ".join(scene.GetNodeByID(i).GetName() for i in volumeIds)
            self.ui.finetuneCasesList.addItem(f"{scene.GetNodeByID(segmentationId).GetName()} on {names}")
        self.updateButtons()

    def refreshMatch(self) -> None:
        """Which segments stand for which labels, and which are not used, as the user picks and edits."""
        model, node = self.segment.currentModel(), self.ui.finetuneSegmentationSelector.currentNode()
        text, self._matchProblem = "", ""
        if model is not None and not model.problem and node is not None:
            try:
                name, segments = self._modelLabels(model.path)
                matching = corrections.match_segments(node, name, segments)
                text = matching.summary()
                self._matchProblem = " ".join(matching.problems)
            except Exception as error:  # noqa: BLE001 - an unreadable model is shown, not raised
                text = self._matchProblem = panel.error_text(error)
        self.ui.finetuneMatchLabel.setText(text)
        self.updateButtons()

    def _modelLabels(self, path: str):
        if path not in self._labels:
            from SegmentMBTFELib.models.folder import ModelFolder
            folder = ModelFolder(path)
            self._labels[path] = folder.name, folder.labels.output_segments()
        return self._labels[path]

    def updateButtons(self) -> None:
        enabled, toolTip = panel.finetune_button_state(self.segment.currentModel(),
                                                       self.ui.finetuneSegmentationSelector.currentNode(),
                                                       self.caseVolumes(), self.jobController.busy, self._matchProblem)
        self.ui.finetuneButton.setEnabled(enabled)
        self.ui.finetuneButton.setToolTip(toolTip)
        self.ui.finetuneCancelButton.setEnabled(self.running and self.jobController.job is not None
                                                and not self.jobController.cancelling)
        volumes = self.caseVolumes()
        self.ui.addFinetuneCaseButton.setEnabled(self.ui.finetuneSegmentationSelector.currentNode() is not None
                                                 and bool(volumes) and all(v is not None for v in volumes))
        row = self.ui.finetuneCasesList.property("currentRow")
        self.ui.removeFinetuneCaseButton.setEnabled(row is not None and 0 <= row < len(self._cases))
        self.updateVersionButtons()

    # -- running ----------------------------------------------------------------------------------------------
    def onFinetuneButton(self) -> None:
        model = self.segment.currentModel()
        if model is None:
            return
        self.refreshCases()
        try:
            self.jobController.start("fine-tune",
                                     lambda onProgress, onFinished: self._begin(model, onProgress, onFinished),
                                     self.onProgress, self.onFinished)
        except jobs.Busy as refusal:  # another segmentation or fine-tune runs (panel or console)
            self.ui.finetuneStatusLabel.setText(str(refusal))
        except Exception as error:  # noqa: BLE001 - every failure ends in a message box, never silently
            self.ui.finetuneStatusLabel.setText(f"Failed: {panel.error_text(error)}")
            panel.show_error(error, traceback.format_exc(), title="Fine-tuning failed")

    def _begin(self, model, onProgress, onFinished):
        """Under the busy flag, the packages installed (job_controller): the corrected cases copied out of the
        scene, then the job."""
        ui = self.ui
        minutes = float(ui.finetuneMinutesSpinBox.property("value"))
        segmentations, volumes = self.cases()
        plan = runner.prepare_finetune(segmentations, volumes, model.path)
        settings = runner.finetune_settings(
            int(ui.finetuneIterationsSpinBox.property("value")), minutes or None,
            float(ui.finetuneLearningRateSpinBox.property("value")), ui.freezeEncoderCheckBox.isChecked(),
            self.segment.device())
        panel.show_fraction(ui.finetuneProgressBar, 0.0)
        ui.finetuneStatusLabel.setText("Starting...")
        ui.finetuneResultLabel.setText("")
        return logic.start_finetune(plan, settings, on_progress=onProgress, on_finished=onFinished, claimed=True)

    def onCancelButton(self) -> None:
        if self.running:
            self.jobController.cancel()
            self.ui.finetuneStatusLabel.setText("Cancelling the package install..." if self.jobController.installing
                                                else "Cancelling (stops after the current iteration)...")

    def onProgress(self, fraction: float, stage: str) -> None:
        panel.show_fraction(self.ui.finetuneProgressBar, fraction)
        self.ui.finetuneStatusLabel.setText(panel.progress_text(fraction, stage, "Fine-tuning"))

    def onFinished(self, outcome) -> None:
        """The new version is written and current (or nothing was written)."""
        ui = self.ui
        if outcome.cancelled:
            panel.show_fraction(ui.finetuneProgressBar, 0.0)
            ui.finetuneStatusLabel.setText("Cancelled: no version was written.")
        elif outcome.error is not None:
            panel.show_fraction(ui.finetuneProgressBar, 0.0)
            ui.finetuneStatusLabel.setText(f"Failed: {panel.error_text(outcome.error)}")
            panel.show_error(outcome.error, outcome.details, title="Fine-tuning failed")
        else:
            run = outcome.result
            panel.show_fraction(ui.finetuneProgressBar, 1.0)
            ui.finetuneResultLabel.setText(result_text(run))
            ui.finetuneStatusLabel.setText(
                f"Done in {outcome.seconds:.0f} s: {run.version.id} is the current version now (Segment uses it).")
        self.refreshVersions()

    # -- versions ------------------------------------------------------------------------------------------
    def modelVersions(self):
        model = self.segment.currentModel()
        if model is None or model.problem:
            return None
        from SegmentMBTFELib.models.versions import ModelVersions
        return ModelVersions(model.path)

    def refreshVersions(self) -> None:
        ui = self.ui
        ui.versionsList.clear()
        self._versions = []
        try:
            versions = self.modelVersions()
            self._versions = versions.list() if versions is not None else []
        except Exception as error:  # noqa: BLE001 - e.g. an unreadable version list: say so in the list
            ui.versionsList.addItem(panel.error_text(error))
        for row, version in enumerate(self._versions):
            item = qt.QListWidgetItem(version_text(version))
            item.setToolTip(str(version.path))
            ui.versionsList.addItem(item)
            if version.current:
                ui.versionsList.setCurrentRow(row)
        self.updateVersionButtons()

    def selectedVersion(self):
        row = self.ui.versionsList.property("currentRow")
        return self._versions[row] if row is not None and 0 <= row < len(self._versions) else None

    def updateVersionButtons(self) -> None:
        selected = self.selectedVersion()
        current = next((v for v in self._versions if v.current), None)
        idle = not self.jobController.busy
        self.ui.useVersionButton.setEnabled(idle and selected is not None and not selected.current
                                            and not selected.problem)
        self.ui.rollbackButton.setEnabled(idle and current is not None and not current.read_only)
        self.ui.deleteVersionButton.setEnabled(idle and selected is not None and not selected.read_only)

    def onUseVersion(self) -> None:
        selected = self.selectedVersion()
        if selected is not None:
            self._changeVersions(lambda versions: versions.use(selected.id), "{id} is the current version now.")

    def onRollback(self) -> None:
        self._changeVersions(lambda versions: versions.rollback(), "Rolled back: {id} is the current version now.")

    def onDeleteVersion(self) -> None:
        selected = self.selectedVersion()
        if selected is None or not self.confirmDelete(
                f"Delete {selected.id} of {self.segment.currentModel().name}? Its folder ({selected.path}) is "
                "removed; segments it made stay."):
            return
        self._changeVersions(lambda versions: versions.delete(selected.id) or versions.current(),
                             f"{selected.id} was deleted; " + "{id} is the current version.")

    def _changeVersions(self, change, message: str) -> None:
        try:
            version = change(self.modelVersions())
        except Exception as error:  # noqa: BLE001 - e.g. a damaged version cannot be used
            panel.show_error(error, traceback.format_exc(), title="Model versions")
            return
        finally:
            self.refreshVersions()
        self.ui.finetuneStatusLabel.setText(message.format(id=version.id))
