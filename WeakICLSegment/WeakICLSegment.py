"""WeakICLSegment: segment a structure over a whole CT/MR volume from a few boxes or points, correct it
with clicks, and propagate the task to other volumes.

Layout: the Widget only wires the .ui to the Logic (inside `slicer.util.tryWithErrorDisplay`); the Logic
does all MRML and engine work and runs without a GUI; MRML <-> engine conversion lives in
`WeakICLSegmentLib.mrml_bridge`. torch and the engine's session are imported inside functions, after a
dependency check, so Slicer starts and this module loads without torch.
"""

import enum
import importlib.util
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.util import VTKObservationMixin
from weakicl.errors import Cancelled, InputError
from weakicl.prompts import PromptSet
from WeakICLSegmentLib import mrml_bridge as bridge
from WeakICLSegmentLib.batch import image_files, output_path
from WeakICLSegmentLib.history import EditHistory

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
        """Stand-in base so the module's classes can be defined; only the Logic is usable."""

    ScriptedLoadableModule = ScriptedLoadableModuleWidget = _WithoutApplication
    ScriptedLoadableModuleLogic = ScriptedLoadableModuleTest = _WithoutApplication

    def parameterNodeWrapper(classtype):
        return classtype


# import name -> pip requirement; torch first, so that monai does not pull a CPU-only torch from PyPI
REQUIRED_PACKAGES = {
    "torch": "torch>=2.2",
    "monai": "monai>=1.3",
    "SimpleITK": "SimpleITK>=2.2",
    "safetensors": "safetensors>=0.4",
    "scipy": "scipy>=1.10",
}
DICE_THRESHOLD = 0.7
ProgressCallback = Callable[[float, str], None]
BankEntry = tuple  # (vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, segment ID)


class _LabelledChoice(enum.Enum):
    """A choice whose members carry their GUI text: the parameter node's combo-box connector calls label()."""

    def __new__(cls, value: str, text: str):
        member = object.__new__(cls)
        member._value_ = value
        member.text = text
        return member

    def label(self) -> str:
        return self.text


class Device(_LabelledChoice):
    AUTO = ("auto", "Automatic (GPU when there is one)")
    CUDA = ("cuda", "CUDA GPU")
    CPU = ("cpu", "CPU")


class BatchSource(_LabelledChoice):
    SCENE = ("scene", "Every other volume in the scene")
    FOLDER = ("folder", "Image files in a folder")
    DICOM = ("dicom", "A DICOM study")


class ActiveSegment(NamedTuple):
    """The segment corrections apply to, by node and segment ID, and the name its task was encoded with."""

    segmentationId: str
    segmentId: str
    targetId: str
    taskName: str


class Step(NamedTuple):
    """One undo entry: a segment's state, the segment it is about, and which segment was active then."""

    state: bridge.SegmentState
    subject: ActiveSegment
    active: Optional[ActiveSegment]


@dataclass
class SegmentResult:
    segmentId: str
    seconds: float
    device: str


#
# WeakICLSegment
#


class WeakICLSegment(ScriptedLoadableModule):
    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "WeakICL Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["WeakICLSegment developers"]
        self.parent.helpText = (
            "Draw a box or a few points on 2-3 slices, press Segment, get the structure over the whole volume; "
            "correct with points or a box; propagate the task to other volumes. "
            'See the <a href="https://github.com/weakicl/SlicerWeakICLSegment">documentation</a>.'
        )
        self.parent.acknowledgementText = (
            "Builds on weakly supervised in-context segmentation (WS-ICL, Hu et al. 2025) and Iris (CVPR 2025)."
        )


#
# Parameters: GUI state saved with the scene
#


@parameterNodeWrapper
class WeakICLSegmentParameterNode:
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


#
# WeakICLSegmentWidget
#


class WeakICLSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the .ui to the Logic; holds no segmentation state of its own."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[WeakICLSegmentLogic] = None
        self._parameterNode: Optional[WeakICLSegmentParameterNode] = None
        self._parameterNodeGuiTag = None
        self._busy = False
        self._boxBeingPlaced = None
        self._shortcuts: list = []

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/WeakICLSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = WeakICLSegmentLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        self.addObserver(interaction, interaction.InteractionModeChangedEvent, self.onInteractionModeChanged)

        roles = bridge.PromptRole
        for button, role in (
            (self.ui.placeContextBoxButton, roles.CONTEXT_BOX),
            (self.ui.placeContextPositiveButton, roles.CONTEXT_POSITIVE),
            (self.ui.placeContextNegativeButton, roles.CONTEXT_NEGATIVE),
            (self.ui.placeCorrectionBoxButton, roles.CORRECTION_BOX),
            (self.ui.placeCorrectionPositiveButton, roles.CORRECTION_POSITIVE),
            (self.ui.placeCorrectionNegativeButton, roles.CORRECTION_NEGATIVE),
        ):
            button.clicked.connect(lambda checked=False, role=role: self.onPlace(role))
        self.ui.deleteContextButton.clicked.connect(self.onDeleteContext)
        self.ui.clearContextButton.clicked.connect(self.onClearContext)
        self.ui.contextListWidget.itemDoubleClicked.connect(self.onJumpToContext)
        self.ui.segmentButton.clicked.connect(self.onSegment)
        self.ui.refineButton.clicked.connect(self.onRefine)
        self.ui.undoButton.clicked.connect(self.onUndo)
        self.ui.redoButton.clicked.connect(self.onRedo)
        self.ui.clearCorrectionsButton.clicked.connect(self.onClearCorrections)
        self.ui.addToBankButton.clicked.connect(self.onAddToBank)
        self.ui.clearBankButton.clicked.connect(self.onClearBank)
        self.ui.refreshStudiesButton.clicked.connect(self.onRefreshStudies)
        self.ui.runBatchButton.clicked.connect(self.onRunBatch)
        self.ui.installDependenciesButton.clicked.connect(self.onInstallDependencies)
        self.ui.deviceCollapsibleButton.contentsCollapsed.connect(self.onDeviceSectionToggled)
        self._createShortcuts()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self._enableShortcuts(False)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)

    def enter(self) -> None:
        self.initializeParameterNode()
        self._enableShortcuts(True)
        for node in bridge.prompt_nodes(slicer.mrmlScene, tuple(bridge.PromptRole)):
            self._observePrompt(node)
        if self.logic.missingPackages():
            self.ui.deviceCollapsibleButton.collapsed = False  # shows why Segment cannot run yet

    def exit(self) -> None:
        self._enableShortcuts(False)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self.logic.forgetEdits()

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
            self._parameterNode.targetVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode: Optional[WeakICLSegmentParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = parameterNode
        if self._parameterNode:
            # each .ui widget that carries a "SlicerParameterName" property is bound to that parameter
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self.updateGUI()

    def updateGUI(self, caller=None, event=None) -> None:
        """Button states, the context and bank lists, and which batch options apply."""
        parameters = self._parameterNode
        target = parameters.targetVolume if parameters else None
        for button in (self.ui.segmentButton, self.ui.placeContextBoxButton, self.ui.placeContextPositiveButton,
                       self.ui.placeContextNegativeButton, self.ui.runBatchButton):
            button.enabled = target is not None
        active = self.logic.activeSegment() is not None
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
    def _referenceVolume(self):
        return self._parameterNode.referenceVolume or self._parameterNode.targetVolume

    def onPlace(self, role: bridge.PromptRole) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot start placing.", waitCursor=False):
            volume = self._referenceVolume() if role.is_context else self._parameterNode.targetVolume
            if volume is None:
                raise InputError("select a target volume first")
            slicer.util.setSliceViewerLayers(background=volume)
            self._observePrompt(self.logic.placePrompt(role, volume))

    def _observePrompt(self, node) -> None:
        for event, callback in ((node.PointPositionDefinedEvent, self.onPromptPlaced),
                                (node.PointEndInteractionEvent, self.onPromptPlaced),
                                (node.PointRemovedEvent, self.updateGUI)):
            if not self.hasObserver(node, event, callback):
                self.addObserver(node, event, callback)

    def onPromptPlaced(self, node, event) -> None:
        """A prompt was placed or moved: list it; a correction re-runs refinement when asked to."""
        self.updateGUI()
        role = bridge.role_of(node)
        if not role or role.is_context or not self._parameterNode.autoRefine or self._busy:
            return
        if role.is_box and self._placing(node):
            self._boxBeingPlaced = node  # refined once its second corner is in (onInteractionModeChanged)
            return
        qt.QTimer.singleShot(0, self.onRefine)  # after the markups widget has finished its own update

    @staticmethod
    def _placing(node) -> bool:
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        selection = slicer.app.applicationLogic().GetSelectionNode()
        return interaction.GetCurrentInteractionMode() == interaction.Place and selection.GetActivePlaceNodeID() == node.GetID()

    def onInteractionModeChanged(self, caller=None, event=None) -> None:
        if self._boxBeingPlaced is not None and not self._placing(self._boxBeingPlaced):
            self._boxBeingPlaced = None
            qt.QTimer.singleShot(0, self.onRefine)

    def _selectedKeys(self, listWidget) -> list[str]:
        return [item.data(qt.Qt.UserRole) for item in listWidget.selectedItems()]

    def onDeleteContext(self) -> None:
        self.logic.removePromptNodes(self._selectedKeys(self.ui.contextListWidget))

    def onClearContext(self) -> None:
        self.logic.removePromptNodes([entry.nodeId for entry in self.logic.contextEntries()])

    def onJumpToContext(self, item) -> None:
        slicer.modules.markups.logic().JumpSlicesToNthPointInMarkup(item.data(qt.Qt.UserRole), 0, True)

    # -- segment, correct, undo ----------------------------------------------------------------------
    @contextmanager
    def _progress(self, title: str) -> Iterator[ProgressCallback]:
        """A cancellable progress dialog fed by the engine's progress callback; never a silent freeze."""
        dialog = slicer.util.createProgressDialog(windowTitle=title, labelText=f"{title}...", maximum=1000)
        dialog.setCancelButtonText("Cancel")

        def report(fraction: float, message: str) -> None:
            dialog.labelText = message
            dialog.value = int(1000 * min(max(fraction, 0.0), 1.0))
            slicer.app.processEvents()
            if dialog.wasCanceled:
                raise Cancelled(f"{title} cancelled")

        self._busy = True
        try:
            yield report
        finally:
            self._busy = False
            dialog.close()

    def _runLong(self, title: str, work: Callable[[ProgressCallback], object]):
        """Run Logic work under a progress dialog; errors go to a message box, Cancel to the status bar."""
        result = None
        try:
            with slicer.util.tryWithErrorDisplay(f"{title} failed.", waitCursor=True):
                try:
                    with self._progress(title) as report:
                        result = work(report)
                except Cancelled as cancelled:
                    slicer.util.showStatusMessage(str(cancelled), 4000)
        finally:
            self.updateGUI()
        return result

    def _showResult(self, verb: str, result: Optional[SegmentResult]) -> None:
        if result is not None:
            self.ui.statusLabel.text = f"{verb} '{self._parameterNode.segmentName}' in {result.seconds:.1f} s on {result.device}."

    def onSegment(self) -> None:
        parameters = self._parameterNode
        if not parameters.outputSegmentation:
            parameters.outputSegmentation = self.logic.createSegmentation(parameters.targetVolume)
        result = self._runLong("Segmenting", lambda report: self.logic.segment(
            parameters.targetVolume, parameters.outputSegmentation, parameters.segmentName,
            list(parameters.contextBank), parameters.device.value, report, parameters.alignContext))
        self._showResult("Segmented", result)
        if result is not None:
            parameters.outputSegmentation.GetDisplayNode().SetVisibility(True)
            slicer.util.setSliceViewerLayers(background=parameters.targetVolume)

    def onRefine(self) -> None:
        if self._busy:
            return
        parameters = self._parameterNode
        result = self._runLong("Refining", lambda report: self.logic.refine(
            list(parameters.contextBank), parameters.device.value, report))
        self._showResult("Refined", result)

    def _withoutAutoRefine(self, failure: str, action: Callable[[], None]) -> None:
        """Run an action that changes correction prompts without those changes re-running refinement."""
        self._busy = True
        try:
            with slicer.util.tryWithErrorDisplay(failure, waitCursor=True):
                action()
        finally:
            self._busy = False
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
            self._parameterNode.contextBank.append(self.logic.bankEntryOfActiveSegment())

    def onClearBank(self) -> None:
        self._parameterNode.contextBank.clear()

    # -- batch ---------------------------------------------------------------------------------------
    def onRefreshStudies(self) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot read the DICOM database.", waitCursor=True):
            self.ui.dicomStudyComboBox.clear()
            for studyUid, label in self.logic.dicomStudies():
                self.ui.dicomStudyComboBox.addItem(label, studyUid)

    def onRunBatch(self) -> None:
        parameters = self._parameterNode
        options = dict(name=parameters.segmentName, bank=list(parameters.contextBank), device=parameters.device.value,
                       folder=None if parameters.batchNextToInputs else parameters.batchOutputFolder,
                       alignContext=parameters.alignContext)
        source = parameters.batchSource
        if source == BatchSource.FOLDER:
            def work(report):
                return self.logic.batchFiles(image_files(parameters.batchInputFolder), progress=report, **options)
        else:
            def work(report):
                volumes = (self.logic.loadDicomStudy(self.ui.dicomStudyComboBox.currentData) if source == BatchSource.DICOM
                           else self.logic.otherVolumes(parameters.targetVolume))
                return self.logic.batchVolumes(volumes, progress=report, **options)
        results = self._runLong("Batch", work)
        if results is not None:
            self.ui.statusLabel.text = f"Batch: {len(results)} volume(s) segmented."

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
        missing = self.logic.missingPackages()
        question = (f"Install {', '.join(missing)} into Slicer's Python? PyTorch is large: this can take several minutes. "
                    "Slicer may need a restart afterwards.")
        if missing and slicer.util.confirmOkCancelDisplay(question):
            with slicer.util.tryWithErrorDisplay("Installing dependencies failed.", waitCursor=True):
                self.logic.installPackages(missing)
        self.updateDeviceLabel()

    # -- keyboard shortcuts (active while the module is shown) ----------------------------------------
    def _createShortcuts(self) -> None:
        roles = bridge.PromptRole
        keys = {
            "Alt+B": lambda: self.onPlace(roles.CONTEXT_BOX),
            "Alt+P": lambda: self.onPlace(roles.CONTEXT_POSITIVE),
            "Alt+N": lambda: self.onPlace(roles.CONTEXT_NEGATIVE),
            "Alt+Shift+B": lambda: self.onPlace(roles.CORRECTION_BOX),
            "Alt+Shift+P": lambda: self.onPlace(roles.CORRECTION_POSITIVE),
            "Alt+Shift+N": lambda: self.onPlace(roles.CORRECTION_NEGATIVE),
            "Alt+S": self.onSegment,
            "Alt+R": self.onRefine,
            "Alt+Z": self.onUndo,
            "Alt+Y": self.onRedo,
        }
        for key, callback in keys.items():
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.setEnabled(False)
            shortcut.activated.connect(callback)
            self._shortcuts.append(shortcut)

    def _enableShortcuts(self, enabled: bool) -> None:
        for shortcut in self._shortcuts:
            shortcut.setEnabled(enabled)


#
# WeakICLSegmentLogic
#


@dataclass
class ContextEntry:
    nodeId: str
    label: str


class WeakICLSegmentLogic(ScriptedLoadableModuleLogic):
    """All MRML and engine work, callable without the GUI (Python console, scripts, tests).

    Long methods take `progress(fraction, message)`; raising from it (Cancel) aborts the work.
    """

    def __init__(self, scene=None, segmenterFactory: Optional[Callable] = None) -> None:
        """`scene` defaults to Slicer's; `segmenterFactory(device)` builds the engine session
        (default: the shipped weights; tests pass a small network)."""
        ScriptedLoadableModuleLogic.__init__(self)
        self.scene = scene or slicer.mrmlScene
        self.history: EditHistory[Step] = EditHistory()
        self._segmenterFactory = segmenterFactory or self._shippedSegmenter
        self._segmenters: dict = {}
        self._volumes: dict = {}
        self._active: Optional[ActiveSegment] = None
        self._progress: Optional[ProgressCallback] = None

    def getParameterNode(self) -> WeakICLSegmentParameterNode:
        return WeakICLSegmentParameterNode(super().getParameterNode())

    # -- dependencies and device ---------------------------------------------------------------------
    @staticmethod
    def missingPackages() -> list[str]:
        return [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]

    def requirePackages(self) -> None:
        missing = self.missingPackages()
        if missing:
            raise InputError(f"missing Python packages: {', '.join(missing)}. Open the Device section and press Install dependencies.")

    @staticmethod
    def installPackages(names: Sequence[str]) -> None:
        """torch through the PyTorch extension's installer when present (it picks the CUDA build the
        driver supports), else from PyPI; then the engine's other packages."""
        if "torch" in names:
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.pip_install(REQUIRED_PACKAGES["torch"])
            else:
                if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=">=2.2") is None:
                    raise InputError("PyTorch was not installed")
        others = [REQUIRED_PACKAGES[name] for name in names if name != "torch"]
        if others:
            slicer.util.pip_install(others)
        importlib.invalidate_caches()  # so that missingPackages() sees them without a restart

    def describeDevices(self) -> str:
        self.requirePackages()
        import torch

        if torch.cuda.is_available():
            names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            return f"PyTorch {torch.__version__}; GPU: {names}."
        return f"PyTorch {torch.__version__}; no CUDA GPU found: the CPU is used (slower, still usable)."

    def segmenter(self, device: str = "auto"):
        """The engine session for a device, created once (loading weights takes a moment)."""
        if device not in self._segmenters:
            self.requirePackages()
            self._segmenters[device] = self._segmenterFactory(device)
        return self._segmenters[device]

    @staticmethod
    def _shippedSegmenter(device: str):
        from weakicl.session import Segmenter

        return Segmenter(device=device)

    def _relayProgress(self, fraction: float, message: str) -> None:
        if self._progress is not None:
            self._progress(fraction, message)

    @contextmanager
    def _reporting(self, progress: Optional[ProgressCallback]) -> Iterator[None]:
        self._progress = progress
        try:
            yield
        finally:
            self._progress = None

    # -- volumes and prompts -------------------------------------------------------------------------
    def engineVolume(self, volumeNode):
        """The engine Volume of a node, reused while voxels and geometry are unchanged, so the
        engine's caches (prepared image, encoded context) hit across calls."""
        geometry = bridge.geometry_from_volume_node(volumeNode)
        stamp = volumeNode.GetImageData().GetMTime()
        cached = self._volumes.get(volumeNode.GetID())
        if cached is None or cached[0] != stamp or not cached[1].geometry.same_grid(geometry):
            cached = (stamp, bridge.volume_from_node(volumeNode))
            self._volumes[volumeNode.GetID()] = cached
        return cached[1]

    def placePrompt(self, role: bridge.PromptRole, volumeNode):
        """Enter placement mode for a prompt on `volumeNode`: a fresh ROI per box, one list per point sign."""
        nodes = bridge.prompt_nodes(self.scene, (role,), volumeNode)
        reusable = [n for n in nodes if not role.is_box or n.GetNumberOfDefinedControlPoints() == 0]
        node = reusable[0] if reusable else bridge.create_prompt_node(self.scene, role, volumeNode)
        selection = self.scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
        interaction = self.scene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
        selection.SetReferenceActivePlaceNodeClassName(node.GetClassName())
        selection.SetActivePlaceNodeID(node.GetID())
        interaction.SetPlaceModePersistence(0 if role.is_box else 1)
        interaction.SetCurrentInteractionMode(interaction.Place)
        return node

    def contextEntries(self) -> list[ContextEntry]:
        """Placed context prompts on every volume, labelled for the list in the GUI."""
        entries = []
        for node in bridge.prompt_nodes(self.scene, bridge.CONTEXT_ROLES):
            volume = bridge.prompt_volume(node)
            count = node.GetNumberOfDefinedControlPoints()
            if volume is None or count == 0:
                continue
            role = bridge.role_of(node)
            try:
                detail = self._boxDetail(node, volume) if role.is_box else f"{count} point{'s' if count > 1 else ''}"
            except InputError as error:  # listed anyway, with the reason Segment will refuse it
                detail = f"not usable: {error}"
            entries.append(ContextEntry(node.GetID(), f"{role.label.capitalize()} on {volume.GetName()}: {detail}"))
        return entries

    @staticmethod
    def _boxDetail(roi, volumeNode) -> str:
        box = bridge.box_from_roi(roi, bridge.geometry_from_volume_node(volumeNode))
        thin = box.thin_axes()
        if len(thin) == 1:
            return f"slice {'IJK'[thin[0]]}={round(box.lo_ijk[thin[0]])}"
        return "3D box"

    def removePromptNodes(self, nodeIds: Sequence[str]) -> None:
        for nodeId in nodeIds:
            node = self.scene.GetNodeByID(nodeId)
            if node is not None:
                self.scene.RemoveNode(node)

    def contextItems(self, bank: Sequence[BankEntry]) -> list:
        """(Volume, PromptSet or dense mask) for every volume with weak context, then the bank."""
        volumes = []
        for node in bridge.prompt_nodes(self.scene, bridge.CONTEXT_ROLES):
            volume = bridge.prompt_volume(node)
            if volume is not None and volume not in volumes:
                volumes.append(volume)
        items = []
        for volumeNode in volumes:
            volume = self.engineVolume(volumeNode)
            prompts = bridge.prompts_from_nodes(bridge.prompt_nodes(self.scene, bridge.CONTEXT_ROLES, volumeNode), volume.geometry)
            if not prompts.is_empty():
                items.append((volume, prompts))
        for volumeNode, segmentationNode, segmentId in bank:
            if volumeNode is None or segmentationNode is None or segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
                raise InputError("a context bank entry was deleted from the scene: clear the bank and add the segments again")
            volume = self.engineVolume(volumeNode)
            items.append((volume, bridge.read_segment(segmentationNode, segmentId, volume.geometry)))
        if not items:
            raise InputError("no context yet: draw a box around the structure on 2-3 slices (Weak context), "
                             "or add an accepted segment to the context bank")
        return items

    # -- segment and correct -------------------------------------------------------------------------
    def createSegmentation(self, targetVolume):
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", self.scene.GenerateUniqueName(f"{targetVolume.GetName()} segmentation"))
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(targetVolume)
        return node

    def activeSegment(self) -> Optional[ActiveSegment]:
        """The segment corrections apply to, while its nodes and segment still exist."""
        active = self._active
        if active is None:
            return None
        segmentation = self.scene.GetNodeByID(active.segmentationId)
        if segmentation is None or self.scene.GetNodeByID(active.targetId) is None:
            return None
        return active if segmentation.GetSegmentation().GetSegment(active.segmentId) is not None else None

    def segment(self, targetVolume, segmentationNode, name: str, bank: Sequence[BankEntry] = (),
                device: str = "auto", progress: Optional[ProgressCallback] = None, alignContext: bool = True) -> SegmentResult:
        """Segment the whole target from the context into a new segment (named uniquely).

        Context drawn on the target itself also guides it (propagation within the volume); without it,
        `alignContext` registers the context volumes onto the target as a starting prior."""
        start = time.perf_counter()
        segmenter = self.segmenter(device)
        with self._reporting(progress):
            task = segmenter.encode_context(self.contextItems(bank), name, self._relayProgress)
            target = self.engineVolume(targetVolume)
            prediction = segmenter.segment(target, task, self.targetPrompts(targetVolume, bridge.CONTEXT_ROLES), align_context=alignContext, progress=self._relayProgress)
        segmentId = segmentationNode.GetSegmentation().GenerateUniqueSegmentID(name)
        self._edit(ActiveSegment(segmentationNode.GetID(), segmentId, targetVolume.GetID(), name), name, prediction.masks[0], newSegment=True)
        return SegmentResult(segmentId, time.perf_counter() - start, segmenter.device_name)

    def refine(self, bank: Sequence[BankEntry] = (), device: str = "auto",
               progress: Optional[ProgressCallback] = None) -> SegmentResult:
        """Re-run the active segment with the prompts on the target (context and corrections) and its
        current voxels (edits made in the Segment Editor count too)."""
        active = self.activeSegment()
        if active is None:
            raise InputError("press Segment first: corrections refine the last segment")
        start = time.perf_counter()
        segmentationNode = self.scene.GetNodeByID(active.segmentationId)
        target = self.engineVolume(self.scene.GetNodeByID(active.targetId))
        segment = segmentationNode.GetSegmentation().GetSegment(active.segmentId)
        prompts = self.targetPrompts(self.scene.GetNodeByID(active.targetId), tuple(bridge.PromptRole))
        previous = bridge.read_segment(segmentationNode, active.segmentId, target.geometry)
        segmenter = self.segmenter(device)
        with self._reporting(progress):
            task = segmenter.encode_context(self.contextItems(bank), active.taskName, self._relayProgress)
            prediction = segmenter.segment(target, task, prompts, previous.astype(np.float32), progress=self._relayProgress)
        self._edit(active, segment.GetName(), prediction.masks[0], newSegment=False)
        return SegmentResult(active.segmentId, time.perf_counter() - start, segmenter.device_name)

    def targetPrompts(self, targetVolume, roles: tuple) -> PromptSet:
        """The prompts of the given roles drawn on the target, in its voxel coordinates."""
        geometry = self.engineVolume(targetVolume).geometry
        return bridge.prompts_from_nodes(bridge.prompt_nodes(self.scene, roles, targetVolume), geometry)

    def _correctionNodes(self, subject: ActiveSegment) -> list:
        return bridge.prompt_nodes(self.scene, bridge.CORRECTION_ROLES, self.scene.GetNodeByID(subject.targetId))

    def _capture(self, subject: ActiveSegment, name: str) -> Step:
        segmentationNode = self.scene.GetNodeByID(subject.segmentationId)
        geometry = bridge.geometry_from_volume_node(self.scene.GetNodeByID(subject.targetId))
        state = bridge.capture_segment_state(segmentationNode, subject.segmentId, name, geometry, self._correctionNodes(subject))
        return Step(state, subject, self._active)

    def _edit(self, subject: ActiveSegment, name: str, mask: np.ndarray, newSegment: bool) -> None:
        """Write a segment as one undoable step; a new segment starts with no corrections."""
        before = self._capture(subject, name)
        if newSegment:
            self.clearCorrections(self.scene.GetNodeByID(subject.targetId))
        bridge.write_segment(self.scene.GetNodeByID(subject.segmentationId), mask, before.state.geometry, name, subject.segmentId)
        self.history.record(before)
        self._active = subject

    def _restore(self, step: Step) -> None:
        bridge.restore_segment_state(self.scene, step.state)
        self._active = step.active

    def _captureLike(self, step: Step) -> Step:
        return self._capture(step.subject, step.state.name)

    def undo(self) -> None:
        self._restore(self.history.undo(self._captureLike))

    def redo(self) -> None:
        self._restore(self.history.redo(self._captureLike))

    def forgetEdits(self) -> None:
        """Drop the undo history and the cached volumes (the scene they refer to is going away)."""
        self.history.clear()
        self._volumes.clear()
        self._active = None

    def clearCorrections(self, targetVolume) -> None:
        """Empty the target's correction prompts; the nodes stay, to be reused and for undo."""
        for node in bridge.prompt_nodes(self.scene, bridge.CORRECTION_ROLES, targetVolume):
            node.RemoveAllControlPoints()

    # -- context bank --------------------------------------------------------------------------------
    def bankEntryOfActiveSegment(self) -> BankEntry:
        active = self.activeSegment()
        if active is None:
            raise InputError("no segment yet: press Segment first")
        return (self.scene.GetNodeByID(active.targetId), self.scene.GetNodeByID(active.segmentationId), active.segmentId)

    @staticmethod
    def describeBankEntry(entry: BankEntry) -> str:
        volumeNode, segmentationNode, segmentId = entry
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId) if segmentationNode else None
        if volumeNode is None or segment is None:
            return "(deleted)"
        return f"{segment.GetName()} on {volumeNode.GetName()}"

    # -- batch ---------------------------------------------------------------------------------------
    def _batch(self, items: Sequence, name: str, bank: Sequence[BankEntry], device: str,
               progress: Optional[ProgressCallback], handle: Callable) -> list:
        """Encode the context once, then segment each item with `handle(segmenter, task, item)`."""
        segmenter = self.segmenter(device)
        results = []
        report = progress or (lambda fraction, message: None)
        with self._reporting(lambda fraction, message: report(0.0, f"context: {message}")):
            task = segmenter.encode_context(self.contextItems(bank), name, self._relayProgress)
        for index, item in enumerate(items):
            def share(fraction: float, message: str, index: int = index) -> None:
                report((index + fraction) / len(items), f"{index + 1}/{len(items)}: {message}")

            with self._reporting(share):
                share(0.0, "reading")
                results.append(handle(segmenter, task, item))
        return results

    def otherVolumes(self, targetVolume) -> list:
        """Every scalar volume of the scene but the target (label maps excluded)."""
        collection = self.scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
        nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
        return [node for node in nodes if node is not targetVolume and not node.IsA("vtkMRMLLabelMapVolumeNode")]

    def batchVolumes(self, volumeNodes: Sequence, name: str, bank: Sequence[BankEntry] = (), folder: Optional[Path] = None,
                     device: str = "auto", progress: Optional[ProgressCallback] = None, alignContext: bool = True) -> list:
        """One new segmentation node per volume; each also written to `folder`, else beside the
        volume's file when it has one."""
        from weakicl.volume import write_mask

        def handle(segmenter, task, volumeNode):
            volume = bridge.volume_from_node(volumeNode)
            prediction = segmenter.segment(volume, task, align_context=alignContext, progress=self._relayProgress)
            segmentationNode = self.createSegmentation(volumeNode)
            bridge.write_segment(segmentationNode, prediction.masks[0], volume.geometry, name)
            destination = folder or self._fileFolder(volumeNode)
            if destination is not None:
                write_mask(output_path(volumeNode.GetName(), name, Path(destination)), prediction.masks, volume.geometry, [name])
            return segmentationNode

        return self._batch(volumeNodes, name, bank, device, progress, handle)

    @staticmethod
    def _fileFolder(volumeNode) -> Optional[Path]:
        storage = volumeNode.GetStorageNode()
        fileName = storage.GetFileName() if storage else None
        return Path(fileName).parent if fileName else None

    def batchFiles(self, paths: Sequence[Path], name: str, bank: Sequence[BankEntry] = (), folder: Optional[Path] = None,
                   device: str = "auto", progress: Optional[ProgressCallback] = None, alignContext: bool = True) -> list[Path]:
        """Segment image files without loading them into the scene; results beside them or in `folder`."""
        from weakicl.volume import read_volume, write_mask

        def handle(segmenter, task, path):
            volume = read_volume(path)
            prediction = segmenter.segment(volume, task, align_context=alignContext, progress=self._relayProgress)
            return write_mask(output_path(Path(path).name, name, Path(folder or Path(path).parent)), prediction.masks, volume.geometry, [name])

        if not paths:
            raise InputError("no images (.nii, .nii.gz, .nrrd, .mha) in the chosen folder")
        return self._batch(paths, name, bank, device, progress, handle)

    @staticmethod
    def dicomStudies() -> list[tuple[str, str]]:
        """(study UID, "patient - date - description") of every study in Slicer's DICOM database."""
        database = slicer.dicomDatabase
        if database is None or not database.isOpen:
            raise InputError("the DICOM database is not open: import the study in the DICOM module first")
        studies = []
        for patient in database.patients():
            patientName = database.fieldForPatient("PatientsName", patient)
            for study in database.studiesForPatient(patient):
                date, description = database.fieldForStudy("StudyDate", study), database.fieldForStudy("StudyDescription", study)
                studies.append((study, " - ".join(part for part in (patientName, date, description) if part)))
        return studies

    def loadDicomStudy(self, studyUid: str) -> list:
        """Load a study's series into the scene; its scalar volumes are returned."""
        from DICOMLib import DICOMUtils

        if not studyUid:
            raise InputError("choose a DICOM study first (press Refresh to list the database)")
        nodeIds = DICOMUtils.loadSeriesByUID(list(slicer.dicomDatabase.seriesForStudy(studyUid)))
        volumes = [self.scene.GetNodeByID(nodeId) for nodeId in nodeIds]
        volumes = [node for node in volumes if node is not None and node.IsA("vtkMRMLScalarVolumeNode")]
        if not volumes:
            raise InputError("the study has no image series that Slicer can load as a volume")
        return volumes


#
# WeakICLSegmentTest
#


def ellipsoidStudy(scene):
    """A synthetic MR-like volume with an ellipsoid and context boxes on 3 of its slices, as a user
    would draw them: (volume node, true mask). Shared by the self-test and the pytest suite."""
    from weakicl.simulation import slice_boxes
    from weakicl.volume import Geometry, Volume

    shape = (48, 72, 72)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    truth = ((grids[0] - 24) / 14) ** 2 + ((grids[1] - 36) / 16) ** 2 + ((grids[2] - 34) / 20) ** 2 <= 1.0
    image = (60.0 + 80.0 * truth + np.random.default_rng(0).normal(0.0, 8.0, shape)).astype(np.float32)
    geometry = Geometry((0.9, 0.9, 1.5), (-30.0, -30.0, -35.0), np.eye(3), shape)
    volumeNode = bridge.volume_node_from_volume(scene, Volume(image, geometry, "MR"), "Ellipsoid")
    for box in slice_boxes(truth).boxes:
        bridge.set_roi_box(bridge.create_prompt_node(scene, bridge.PromptRole.CONTEXT_BOX, volumeNode), box, geometry)
    return volumeNode, truth


def segmentEllipsoid(logic: WeakICLSegmentLogic, device: str = "auto") -> tuple[float, SegmentResult]:
    """Segment the ellipsoid study through the Logic: (Dice against the truth, the result)."""
    volumeNode, truth = ellipsoidStudy(logic.scene)
    segmentationNode = logic.createSegmentation(volumeNode)
    result = logic.segment(volumeNode, segmentationNode, "ellipsoid", device=device)
    mask = bridge.read_segment(segmentationNode, result.segmentId, bridge.geometry_from_volume_node(volumeNode))
    return float(2.0 * (mask & truth).sum() / (mask.sum() + truth.sum())), result


class WeakICLSegmentTest(ScriptedLoadableModuleTest):
    """In the desktop application: a synthetic ellipsoid, a box on 3 slices, Segment through the Logic
    with the shipped weights, Dice against the ellipsoid."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_SegmentEllipsoidFromThreeBoxes()

    def test_SegmentEllipsoidFromThreeBoxes(self) -> None:
        self.delayDisplay("Segmenting a synthetic ellipsoid from boxes on 3 slices")
        dice, result = segmentEllipsoid(WeakICLSegmentLogic())
        slicer.util.setSliceViewerLayers(background=slicer.mrmlScene.GetFirstNodeByName("Ellipsoid"), fit=True)
        logging.info(f"WeakICLSegment self-test: Dice {dice:.3f} in {result.seconds:.1f} s on {result.device}")
        self.assertGreaterEqual(dice, DICE_THRESHOLD)
        self.delayDisplay(f"Test passed: Dice {dice:.3f}")
