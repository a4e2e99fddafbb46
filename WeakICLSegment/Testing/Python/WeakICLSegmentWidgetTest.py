"""Desktop-application test of the GUI wiring (the Logic is covered by the pytest suite and the module's
self-test): parameters bound to the .ui, placement buttons, and the state surviving a scene save/load."""

import os

import numpy as np
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest
from weakicl.prompts import Box
from weakicl.volume import Geometry, Volume
from WeakICLSegmentLib import mrml_bridge as bridge


class WeakICLSegmentWidgetTest(ScriptedLoadableModuleTest):
    def setUp(self) -> None:
        slicer.mrmlScene.Clear()
        slicer.util.selectModule("WeakICLSegment")
        self.widget = slicer.modules.weakiclsegment.widgetRepresentation().self()
        volume = Volume(np.zeros((8, 16, 16), np.float32), Geometry.identity((8, 16, 16)))
        self.volume = bridge.volume_node_from_volume(slicer.mrmlScene, volume, "CT")
        self.widget.initializeParameterNode()

    def runTest(self) -> None:
        self.setUp()
        self.test_ParametersFollowTheGui()
        self.setUp()
        self.test_BoxButtonEntersPlaceMode()
        self.setUp()
        self.test_StateSurvivesSceneSaveAndLoad()
        self.setUp()
        self.test_ShortcutsDoNothingWhileTheirButtonIsDisabled()
        self.setUp()
        self.test_GuiIsBoundOnceHoweverOftenTheModuleIsEntered()

    def test_ParametersFollowTheGui(self) -> None:
        parameters = self.widget.logic.getParameterNode()
        self.assertIs(self.widget.ui.targetVolumeSelector.currentNode(), self.volume)
        self.widget.ui.segmentNameLineEdit.text = "left kidney"
        self.assertEqual(parameters.segmentName, "left kidney")
        parameters.autoRefine = False
        self.assertFalse(self.widget.ui.autoRefineCheckBox.checked)
        self.assertTrue(self.widget.ui.alignContextCheckBox.checked)
        self.widget.ui.alignContextCheckBox.checked = False
        self.assertFalse(parameters.alignContext)
        self.assertTrue(self.widget.ui.segmentButton.enabled)
        self.assertFalse(self.widget.ui.refineButton.enabled)  # nothing segmented yet

    def test_BoxButtonEntersPlaceMode(self) -> None:
        self.widget.ui.placeContextBoxButton.click()
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        selection = slicer.app.applicationLogic().GetSelectionNode()
        self.assertEqual(interaction.GetCurrentInteractionMode(), interaction.Place)
        roi = slicer.mrmlScene.GetNodeByID(selection.GetActivePlaceNodeID())
        self.assertEqual(bridge.role_of(roi), bridge.PromptRole.CONTEXT_BOX)
        interaction.SetCurrentInteractionMode(interaction.ViewTransform)

    def test_StateSurvivesSceneSaveAndLoad(self) -> None:
        parameters = self.widget.logic.getParameterNode()
        parameters.segmentName = "spleen"
        roi = bridge.create_prompt_node(slicer.mrmlScene, bridge.PromptRole.CONTEXT_BOX, self.volume)
        bridge.set_roi_box(roi, Box((2, 3, 4), (9, 10, 4)), bridge.geometry_from_volume_node(self.volume))
        path = os.path.join(slicer.app.temporaryPath, "WeakICLSegmentWidgetTest.mrb")
        self.assertTrue(slicer.util.saveScene(path))
        slicer.mrmlScene.Clear()
        slicer.util.loadScene(path)
        self.widget.initializeParameterNode()
        restored = self.widget.logic.getParameterNode()
        self.assertEqual(restored.segmentName, "spleen")
        self.assertEqual(restored.targetVolume.GetName(), "CT")
        self.assertEqual(len(self.widget.logic.contextEntries()), 1)

    def test_ShortcutsDoNothingWhileTheirButtonIsDisabled(self) -> None:
        """Defect 8 of issue 14: Alt+S with no target volume must not segment (nor create a node)."""
        self.widget.enter()
        self.widget.logic.getParameterNode().targetVolume = None
        self.assertFalse(self.widget.ui.segmentButton.enabled)
        before = slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems()
        for shortcut in self.widget._shortcuts:
            if shortcut.key.toString() == "Alt+S":
                shortcut.activated()  # PythonQt: calling a signal emits it
        self.assertEqual(slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems(), before)
        self.widget.exit()

    def test_GuiIsBoundOnceHoweverOftenTheModuleIsEntered(self) -> None:
        """Defect 7 of issue 14: entering the module again must not add GUI connections (5.6/5.8)."""
        for _ in range(3):
            self.widget.enter()
            self.widget.exit()
        parameters = self.widget._parameterNode
        self.assertEqual(len(parameters._parameterGUIs), 1)
        self.widget.setParameterNode(None)
        self.assertEqual(len(parameters._parameterGUIs), 0)
        self.widget.initializeParameterNode()
