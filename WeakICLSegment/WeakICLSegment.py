"""WeakICLSegment: segment a structure over a whole CT/MR volume from a few boxes or points, correct it
with clicks, and propagate the task to other volumes.

Layout: this file holds the module, a thin Widget (wires the .ui to the Logic, runs long work on a
worker thread under a modal progress dialog) and a thin Logic (parameter node, dependencies, device);
the scene work is `WeakICLSegmentLib.scene_logic.SceneLogic`, MRML <-> engine conversion
`WeakICLSegmentLib.mrml_bridge`. torch and the engine's session are imported inside functions, after a
dependency check, so Slicer starts and this module loads without torch.
"""

import importlib
import logging
from pathlib import Path
from typing import Callable, Optional

import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.util import VTKObservationMixin
from weakicl.errors import Cancelled, InputError
from WeakICLSegmentLib import dependencies
from WeakICLSegmentLib import mrml_bridge as bridge
from WeakICLSegmentLib.batch import image_files
from WeakICLSegmentLib.choices import BatchSource, Device
from WeakICLSegmentLib.corrections import RefineQueue
from WeakICLSegmentLib.scene_logic import BatchResult, Job, SceneLogic, SegmentResult, dicom_studies
from WeakICLSegmentLib import synthetic_study
from WeakICLSegmentLib.synthetic_study import segmentEllipsoid

try:
    import qt
    from slicer.parameterNodeWrapper import parameterNodeWrapper
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
except ImportError:  # pip's slicer-core: MRML without the application; the Logic still works (tests, scripts)

    class _WithoutApplication:
        """Stand-in base so the module's classes can be defined; only the Logic is usable. Cooperative,
        as Slicer's ScriptedLoadable* bases are (each calls super().__init__()), so a base order that
        breaks in the application breaks in tests too."""

        def __init__(self, *args) -> None:
            super().__init__()

    ScriptedLoadableModule = ScriptedLoadableModuleWidget = _WithoutApplication
    ScriptedLoadableModuleLogic = ScriptedLoadableModuleTest = _WithoutApplication

    def parameterNodeWrapper(classtype):
        return classtype


REQUIRED_PACKAGES = dependencies.REQUIRED_PACKAGES


class WeakICLSegment(ScriptedLoadableModule):
    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "WeakICL Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Markups", "Segmentations"]  # prompts are markups; results are segments
        self.parent.contributors = ["WeakICLSegment developers"]
        self.parent.helpText = (
            "Draw a box or a few points on 2-3 slices, press Segment, get the structure over the whole volume; "
            "correct with points or a box; propagate the task to other volumes. "
            'See the <a href="https://github.com/weakicl/SlicerWeakICLSegment">documentation</a>.'
        )
        self.parent.acknowledgementText = (
            "Builds on weakly supervised in-context segmentation (WS-ICL, Hu et al. 2025) and Iris (CVPR 2025)."
        )


@parameterNodeWrapper
class WeakICLSegmentParameterNode:
    """GUI state saved with the scene. Bank entries point at hidden snapshot segmentations."""

    targetVolume: vtkMRMLScalarVolumeNode
    referenceVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    segmentName: str = "structure"
    autoRefine: bool = True
    alignContext: bool = True
    contextBank: list[tuple[vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, str]]
    device: Device = Device.AUTO
    batchSource: BatchSource = BatchSource.SCENE
    batchInputFolder: Path = Path.home()
    batchNextToInputs: bool = True
    batchOutputFolder: Path = Path.home()


class WeakICLSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the .ui to the Logic; holds no segmentation state of its own."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[WeakICLSegmentLogic] = None
        self._parameterNode: Optional[WeakICLSegmentParameterNode] = None
        self._parameterNodeGuiTag = None
        self._busy = False
        self._refines = RefineQueue()
        self._boxBeingPlaced = None
        self._shortcuts: list = []

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self._panel = slicer.util.loadUI(self.resourcePath("UI/WeakICLSegment.ui"))
        self.layout.addWidget(self._panel)
        self.ui = slicer.util.childWidgetVariables(self._panel)
        self._panel.setMRMLScene(slicer.mrmlScene)
        self.logic = WeakICLSegmentLogic()
        self.logic.onBoxPlaced = lambda roi: self.onPromptChanged(roi, None)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        self.addObserver(interaction, interaction.InteractionModeChangedEvent, self.onInteractionModeChanged)

        roles = bridge.PromptRole
        self._placeButtons = {
            roles.CONTEXT_BOX: self.ui.placeContextBoxButton, roles.CONTEXT_POSITIVE: self.ui.placeContextPositiveButton,
            roles.CONTEXT_NEGATIVE: self.ui.placeContextNegativeButton, roles.CORRECTION_BOX: self.ui.placeCorrectionBoxButton,
            roles.CORRECTION_POSITIVE: self.ui.placeCorrectionPositiveButton,
            roles.CORRECTION_NEGATIVE: self.ui.placeCorrectionNegativeButton,
        }
        for role, button in self._placeButtons.items():
            button.clicked.connect(lambda checked=False, role=role: self.onPlace(role))
        for button, slot in (
            (self.ui.deleteContextButton, self.onDeleteContext), (self.ui.clearContextButton, self.onClearContext),
            (self.ui.segmentButton, self.onSegment), (self.ui.refineButton, self.onRefine),
            (self.ui.undoButton, self.onUndo), (self.ui.redoButton, self.onRedo),
            (self.ui.clearCorrectionsButton, self.onClearCorrections), (self.ui.addToBankButton, self.onAddToBank),
            (self.ui.clearBankButton, self.onClearBank), (self.ui.refreshStudiesButton, self.onRefreshStudies),
            (self.ui.runBatchButton, self.onRunBatch), (self.ui.installDependenciesButton, self.onInstallDependencies),
        ):
            button.clicked.connect(slot)
        self.ui.contextListWidget.itemDoubleClicked.connect(self.onJumpToContext)
        self.ui.deviceCollapsibleButton.contentsCollapsed.connect(self.onDeviceSectionToggled)
        self._createShortcuts()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self._enableShortcuts(False)
        self.setParameterNode(None)

    def enter(self) -> None:
        self.initializeParameterNode()
        self._enableShortcuts(True)
        for node in bridge.prompt_nodes(slicer.mrmlScene, tuple(bridge.PromptRole)):
            self._observePrompt(node)
        if self.logic.missingPackages():
            self.ui.deviceCollapsibleButton.collapsed = False  # shows why Segment cannot run yet

    def exit(self) -> None:
        self._enableShortcuts(False)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self.logic.forgetEdits()
        self._refines.clear()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(self, caller, event, node) -> None:
        if bridge.role_of(node) is not None:
            self._observePrompt(node)  # prompts of a loaded scene, or placed from another module
            self.updateGUI()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeRemoved(self, caller, event, node) -> None:
        if bridge.role_of(node) is not None:
            self.updateGUI()

    # -- parameter node ------------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.targetVolume:
            self._parameterNode.targetVolume = self.logic.defaultTargetVolume()

    def setParameterNode(self, parameterNode: Optional[WeakICLSegmentParameterNode]) -> None:
        """Bind the .ui to a parameter node once (binding again on every enter piles up connections).

        `connectParametersToGui` returns the tag that `disconnectGui` takes on 5.6 and later, where
        `connectGui` itself returns None before 5.10 (see docs/SLICER.md, defect 7)."""
        if parameterNode is not None and self._parameterNode is not None and parameterNode.parameterNode is self._parameterNode.parameterNode:
            return
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
            self._parameterNodeGuiTag = None
        self._parameterNode = parameterNode
        if self._parameterNode:
            bound = {w.property("SlicerParameterName"): w for w in self._panel.findChildren(qt.QWidget) if w.property("SlicerParameterName")}
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(bound)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self.updateGUI()

    def updateGUI(self, caller=None, event=None) -> None:
        """Button states, the context and bank lists, and which batch options apply."""
        parameters = self._parameterNode
        target = parameters.targetVolume if parameters else None
        for button in (self.ui.segmentButton, self.ui.placeContextBoxButton, self.ui.placeContextPositiveButton,
                       self.ui.placeContextNegativeButton, self.ui.runBatchButton):
            button.enabled = target is not None
        active = target is not None and self.logic.activeSegment(target) is not None
        for button in (self.ui.placeCorrectionBoxButton, self.ui.placeCorrectionPositiveButton,
                       self.ui.placeCorrectionNegativeButton, self.ui.refineButton, self.ui.addToBankButton):
            button.enabled = active
        self.ui.undoButton.enabled = self.logic.history.can_undo
        self.ui.redoButton.enabled = self.logic.history.can_redo
        self._fillList(self.ui.contextListWidget, [(entry.label, entry.nodeId) for entry in self.logic.contextEntries()])
        bank = list(parameters.contextBank) if parameters else []
        self._fillList(self.ui.bankListWidget, [(self.logic.describeBankEntry(entry), str(i)) for i, entry in enumerate(bank)])
        if parameters:
            source = parameters.batchSource
            self.ui.batchInputFolderButton.enabled = source == BatchSource.FOLDER
            self.ui.dicomStudyComboBox.enabled = self.ui.refreshStudiesButton.enabled = source == BatchSource.DICOM
            self.ui.batchOutputFolderButton.enabled = not parameters.batchNextToInputs

    @staticmethod
    def _fillList(listWidget, rows: list[tuple[str, str]]) -> None:
        listWidget.clear()
        for text, key in rows:
            item = qt.QListWidgetItem(text)
            item.setData(qt.Qt.UserRole, key)
            listWidget.addItem(item)

    # -- prompts -------------------------------------------------------------------------------------
    def onPlace(self, role: bridge.PromptRole) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot start placing.", waitCursor=False):
            parameters = self._parameterNode
            volume = (parameters.referenceVolume or parameters.targetVolume) if role.is_context else parameters.targetVolume
            if volume is None:
                raise InputError("select a target volume first")
            slicer.util.setSliceViewerLayers(background=volume)
            self._observePrompt(self.logic.placePrompt(role, volume))

    def _observePrompt(self, node) -> None:
        if node.IsA("vtkMRMLMarkupsROINode"):
            self.logic.watchBox(node)
        for event, callback in ((node.PointPositionDefinedEvent, self.onPromptChanged),
                                (node.PointEndInteractionEvent, self.onPromptChanged),
                                (node.PointRemovedEvent, self.onPromptChanged)):
            if not self.hasObserver(node, event, callback):
                self.addObserver(node, event, callback)

    def onPromptChanged(self, node, event) -> None:
        """A prompt was placed, moved or deleted: list it; a correction is refined when asked to (queued
        behind a refine in progress; a box once its second corner is in)."""
        self.updateGUI()
        role = bridge.role_of(node)
        if not role or role.is_context or not self._parameterNode.autoRefine or self._quiet:
            return
        if role.is_box and self._placing(node):
            self._boxBeingPlaced = node  # refined once its second corner is in (onInteractionModeChanged)
            return
        qt.QTimer.singleShot(0, self._requestRefine)  # after the markups widget has finished its own update

    _quiet = False  # prompts moved by the module itself (undo, redo, a new segment's cleared corrections)

    @staticmethod
    def _placing(node) -> bool:
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        selection = slicer.app.applicationLogic().GetSelectionNode()
        return interaction.GetCurrentInteractionMode() == interaction.Place and selection.GetActivePlaceNodeID() == node.GetID()

    def onInteractionModeChanged(self, caller=None, event=None) -> None:
        if self._boxBeingPlaced is not None and not self._placing(self._boxBeingPlaced):
            self._boxBeingPlaced = None
            qt.QTimer.singleShot(0, self._requestRefine)

    def _selectedKeys(self, listWidget) -> list[str]:
        return [item.data(qt.Qt.UserRole) for item in listWidget.selectedItems()]

    def onDeleteContext(self) -> None:
        self.logic.removePromptNodes(self._selectedKeys(self.ui.contextListWidget))

    def onClearContext(self) -> None:
        self.logic.removePromptNodes([entry.nodeId for entry in self.logic.contextEntries()])

    def onJumpToContext(self, item) -> None:
        slicer.modules.markups.logic().JumpSlicesToNthPointInMarkup(item.data(qt.Qt.UserRole), 0, True)

    # -- long work: a worker thread, a modal progress dialog, MRML writes back on the main thread -----
    def _startJob(self, makeJob: Callable[[], Job], done: Callable[[object], None], failed: Callable[[], None] = lambda: None,
                  modal: bool = True) -> None:
        """Prepare on the main thread, compute on a worker thread (the engine only: no MRML), apply on
        the main thread; the panel (and so the shortcuts' buttons) is off meanwhile; Cancel stops the
        engine. A refine is not modal: the slice views stay live, so clicks placed meanwhile queue up."""
        from WeakICLSegmentLib.gui_runner import run_job

        job = None
        try:
            with slicer.util.tryWithErrorDisplay("Cannot start.", waitCursor=True):  # shows the error, then re-raises
                try:
                    self.logic.requirePackages()
                    job = makeJob()
                except Cancelled as cancelled:  # DICOM loading, cancelled by the user: not an error
                    slicer.util.showStatusMessage(str(cancelled), 4000)
        except Exception:
            pass  # already shown; the caller learns of it through failed()
        if job is None:
            failed()
            return
        self._setBusy(True)

        def finished(error: Optional[BaseException], computed) -> None:
            result = None
            try:
                with slicer.util.tryWithErrorDisplay(f"{job.title} failed.", waitCursor=True):
                    if isinstance(error, Cancelled):
                        slicer.util.showStatusMessage(str(error), 4000)
                    elif error is not None:
                        raise error
                    else:
                        self._quiet = True  # a new segment clears the target's corrections: not a click
                        try:
                            result = job.apply(computed)
                        finally:
                            self._quiet = False
            except Exception:
                pass  # shown by tryWithErrorDisplay; failed() below lets queued refines go on
            finally:
                self._setBusy(False)
                self.updateGUI()
            done(result) if result is not None else failed()

        run_job(job, finished, modal)

    def _setBusy(self, busy: bool) -> None:
        self._busy = busy
        self._panel.enabled = not busy

    def onSegment(self) -> None:
        parameters = self._parameterNode

        def done(result: SegmentResult) -> None:
            parameters.outputSegmentation = result.segmentationNode
            result.segmentationNode.GetDisplayNode().SetVisibility(True)
            slicer.util.setSliceViewerLayers(background=parameters.targetVolume)
            self._showResult("Segmented", result)

        self._startJob(lambda: self.logic.prepareSegment(
            parameters.targetVolume, parameters.outputSegmentation, parameters.segmentName, list(parameters.contextBank),
            parameters.device.value, parameters.alignContext), done)

    def onRefine(self) -> None:
        self._requestRefine()

    def _requestRefine(self) -> None:
        """Refine now, or after the refine in progress (requests made meanwhile coalesce into one)."""
        if self._refines.request():
            self._refineNext()

    def _refineNext(self) -> None:
        parameters = self._parameterNode

        def finished(result: Optional[SegmentResult] = None) -> None:
            self._showResult("Refined", result)
            if self._refines.finished():
                qt.QTimer.singleShot(0, self._refineNext)

        self._startJob(lambda: self.logic.prepareRefine(parameters.targetVolume, list(parameters.contextBank),
                                                        parameters.device.value), finished, finished, modal=False)

    def _showResult(self, verb: str, result: Optional[SegmentResult]) -> None:
        if result is not None:
            self.ui.statusLabel.text = f"{verb} '{self._parameterNode.segmentName}' in {result.seconds:.1f} s on {result.device}."

    def _withoutAutoRefine(self, failure: str, action: Callable[[], None]) -> None:
        """Run an action that moves correction prompts without those moves counting as corrections."""
        self._quiet = True
        try:
            with slicer.util.tryWithErrorDisplay(failure, waitCursor=True):
                action()
        finally:
            self._quiet = False
            self.updateGUI()

    def onUndo(self) -> None:
        self._withoutAutoRefine("Undo failed.", self.logic.undo)

    def onRedo(self) -> None:
        self._withoutAutoRefine("Redo failed.", self.logic.redo)

    def onClearCorrections(self) -> None:
        self._withoutAutoRefine("Cannot clear the corrections.", lambda: self.logic.clearCorrections(self._parameterNode.targetVolume))

    # -- context bank --------------------------------------------------------------------------------
    def onAddToBank(self) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot add the segment to the context bank.", waitCursor=False):
            self._parameterNode.contextBank.append(self.logic.bankEntryOfActiveSegment(self._parameterNode.targetVolume))

    def onClearBank(self) -> None:
        self.logic.removeBankSnapshots(list(self._parameterNode.contextBank))
        self._parameterNode.contextBank.clear()

    # -- batch ---------------------------------------------------------------------------------------
    def onRefreshStudies(self) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot read the DICOM database.", waitCursor=True):
            self.ui.dicomStudyComboBox.clear()
            for studyUid, label in dicom_studies(slicer.dicomDatabase):
                self.ui.dicomStudyComboBox.addItem(label, studyUid)

    def onRunBatch(self) -> None:
        parameters = self._parameterNode
        options = dict(name=parameters.segmentName, bank=list(parameters.contextBank), device=parameters.device.value,
                       folder=None if parameters.batchNextToInputs else parameters.batchOutputFolder,
                       alignContext=parameters.alignContext)
        skipped: list[str] = []

        def makeJob() -> Job:
            source = parameters.batchSource
            if source == BatchSource.FOLDER:
                return self.logic.prepareBatchFiles(image_files(parameters.batchInputFolder), **options)
            if source == BatchSource.DICOM:
                volumes, left = self._loadDicomStudy(self.ui.dicomStudyComboBox.currentData)
            else:
                volumes, left = self.logic.otherVolumes(parameters.targetVolume)
            skipped.extend(left)
            return self.logic.prepareBatchVolumes(volumes, **options)

        def done(results) -> None:
            count = len(results.segmentationNodes) if isinstance(results, BatchResult) else len(results)
            notes = skipped + (results.skipped if isinstance(results, BatchResult) else [])
            self.ui.statusLabel.text = f"Batch: {count} volume(s) segmented." + (f" {'; '.join(notes)}." if notes else "")

        self._startJob(makeJob, done)

    def _loadDicomStudy(self, studyUid: str):
        """Load on the main thread (it writes the scene), series by series under a cancellable dialog."""
        from DICOMLib import DICOMUtils

        if not studyUid:
            raise InputError("choose a DICOM study first (press Refresh to list the database)")
        dialog = slicer.util.createProgressDialog(windowTitle="Loading DICOM", labelText="Loading the study...", maximum=1000)
        dialog.setWindowModality(qt.Qt.ApplicationModal)

        def report(fraction: float, message: str) -> None:
            dialog.labelText, dialog.value = message, int(999 * fraction)
            slicer.app.processEvents()
            if dialog.wasCanceled:
                raise Cancelled("DICOM loading cancelled")

        try:
            return self.logic.loadDicomStudy(list(slicer.dicomDatabase.seriesForStudy(studyUid)), DICOMUtils.loadSeriesByUID, report)
        finally:
            dialog.close()

    # -- device and dependencies ---------------------------------------------------------------------
    def onDeviceSectionToggled(self, collapsed: bool) -> None:
        if not collapsed:  # importing torch takes seconds: only when the section is looked at
            self.updateDeviceLabel()

    def updateDeviceLabel(self) -> None:
        missing = self.logic.missingPackages()
        self.ui.installDependenciesButton.visible = bool(missing)
        if missing:
            self.ui.deviceLabel.text = f"Missing Python packages: {', '.join(missing)}. Press Install dependencies."
            return
        with slicer.util.tryWithErrorDisplay("Cannot query PyTorch.", waitCursor=True):
            self.ui.deviceLabel.text = self.logic.describeDevices()

    def onInstallDependencies(self) -> None:
        """pip in a QProcess (the GUI stays live): PyTorch first, through the PyTorch extension's
        installer tool when that extension is there, then the rest with the installed torch pinned."""
        missing = self.logic.missingPackages()
        question = (f"Install {', '.join(missing)} into Slicer's Python? PyTorch is large: this can take several minutes. "
                    "Slicer may need a restart afterwards.")
        if not missing or not slicer.util.confirmOkCancelDisplay(question):
            return
        from WeakICLSegmentLib.gui_runner import CommandRunner

        commands = dependencies.torch_commands(self._hasPyTorchExtension()) if "torch" in missing else []
        commands.append(lambda: dependencies.other_packages_command(missing, dependencies.installed_torch_version()))

        def finished(succeeded: bool, output: str) -> None:
            importlib.invalidate_caches()  # so that missingPackages() sees them without a restart
            self._setBusy(False)
            if not succeeded:
                slicer.util.errorDisplay("Installing dependencies failed.", detailedText=output)
            self.updateDeviceLabel()

        try:
            with slicer.util.tryWithErrorDisplay("Cannot install dependencies."):  # shows the error, then re-raises
                self._installer = CommandRunner(commands, finished, lambda command: setattr(self.ui.deviceLabel, "text", f"Running {' '.join(command)} ..."))
        except RuntimeError:
            return
        self._setBusy(True)
        self._installer.start()

    @staticmethod
    def _hasPyTorchExtension() -> bool:
        return hasattr(slicer.modules, "pytorchutils")

    # -- keyboard shortcuts (active while the module is shown) ----------------------------------------
    def _createShortcuts(self) -> None:
        """Each shortcut clicks its button, so a disabled button (no target, busy) does nothing."""
        roles = bridge.PromptRole
        keys = {
            "Alt+B": self._placeButtons[roles.CONTEXT_BOX], "Alt+P": self._placeButtons[roles.CONTEXT_POSITIVE],
            "Alt+N": self._placeButtons[roles.CONTEXT_NEGATIVE], "Alt+Shift+B": self._placeButtons[roles.CORRECTION_BOX],
            "Alt+Shift+P": self._placeButtons[roles.CORRECTION_POSITIVE],
            "Alt+Shift+N": self._placeButtons[roles.CORRECTION_NEGATIVE],
            "Alt+S": self.ui.segmentButton, "Alt+R": self.ui.refineButton,
            "Alt+Z": self.ui.undoButton, "Alt+Y": self.ui.redoButton,
        }
        for key, button in keys.items():
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.setEnabled(False)
            shortcut.activated.connect(button.click)
            self._shortcuts.append(shortcut)

    def _enableShortcuts(self, enabled: bool) -> None:
        for shortcut in self._shortcuts:
            shortcut.setEnabled(enabled)


class WeakICLSegmentLogic(SceneLogic, ScriptedLoadableModuleLogic):
    """The parameter node, dependencies and device; the scene work is `SceneLogic`'s. Callable without
    the GUI (Python console, scripts, tests); long methods take `progress(fraction, message)`, and
    raising from it (Cancel) aborts the work. `SceneLogic` comes first: ScriptedLoadableModuleLogic's
    __init__ calls super().__init__(), which must reach `object`, not SceneLogic's (scene, factory)."""

    def __init__(self, scene=None, segmenterFactory: Optional[Callable] = None) -> None:
        """`scene` defaults to Slicer's; `segmenterFactory(device)` builds the engine session
        (default: the shipped weights; tests pass a small network)."""
        ScriptedLoadableModuleLogic.__init__(self)
        SceneLogic.__init__(self, scene or slicer.mrmlScene, segmenterFactory or self._shippedSegmenter)

    def getParameterNode(self) -> WeakICLSegmentParameterNode:
        return WeakICLSegmentParameterNode(super().getParameterNode())

    @staticmethod
    def missingPackages() -> list[str]:
        return dependencies.missing_packages()

    def requirePackages(self) -> None:
        missing = self.missingPackages()
        if missing:
            raise InputError(f"missing Python packages: {', '.join(missing)}. Open the Device section and press Install dependencies.")

    def segmenter(self, device: str = "auto"):
        self.requirePackages()
        return SceneLogic.segmenter(self, device)

    def describeDevices(self) -> str:
        self.requirePackages()
        import torch

        if torch.cuda.is_available():
            names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            return f"PyTorch {torch.__version__}; GPU: {names}."
        return f"PyTorch {torch.__version__}; no CUDA GPU found: the CPU is used (slower, still usable)."

    @staticmethod
    def _shippedSegmenter(device: str):
        from weakicl.session import Segmenter

        return Segmenter(device=device)


#
# WeakICLSegmentTest
#


class WeakICLSegmentTest(ScriptedLoadableModuleTest):
    """In the desktop application: a synthetic ellipsoid, a box on 3 slices, Segment through the Logic
    with the shipped weights, Dice against the ellipsoid."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        from weakicl.weights import default_weights_path

        missing = WeakICLSegmentLogic.missingPackages() + ([] if default_weights_path().is_file() else ["the shipped weights"])
        if missing:  # extension build machines have neither torch nor the weights: nothing to test there
            self.delayDisplay(f"WeakICLSegment self-test skipped: missing {', '.join(missing)}")
            return
        self.setUp()
        self.test_SegmentEllipsoidFromThreeBoxes()

    def test_SegmentEllipsoidFromThreeBoxes(self) -> None:
        self.delayDisplay("Segmenting a synthetic ellipsoid from boxes on 3 slices")
        dice, result = segmentEllipsoid(WeakICLSegmentLogic())
        slicer.util.setSliceViewerLayers(background=slicer.mrmlScene.GetFirstNodeByName("Ellipsoid"), fit=True)
        logging.info(f"WeakICLSegment self-test: Dice {dice:.3f} in {result.seconds:.1f} s on {result.device}")
        self.assertGreaterEqual(dice, synthetic_study.DICE_THRESHOLD)
        self.delayDisplay(f"Test passed: Dice {dice:.3f}")
