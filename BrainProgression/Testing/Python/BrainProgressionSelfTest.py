"""BrainProgression through its widget and logic, without BrLP's networks (which are not shipped).

Inputs: the Forecast button stays disabled, with a message saying why, until a baseline
volume, valid target ages and a complete weights folder are given; the weights message
tells where to download BrLP's networks. The command line the logic builds for the
``neuroatrophy progression predict`` job is checked. A synthetic forecast folder (written
as the command writes it) is loaded with Load results: the prediction, uncertainty and
difference sequences have one item per target age, the browser moves them together, and
the table and chart of regional volumes are shown.
"""

import pathlib
import tempfile

import numpy as np
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest


class BrainProgressionSelfTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_inputs_weights_message_and_command_line()
        self.setUp()
        self.test_load_a_forecast_through_the_widget()

    def test_inputs_weights_message_and_command_line(self):
        from neuroatrophy import mrml

        slicer.util.selectModule("BrainProgression")
        widget = slicer.util.getModuleWidget("BrainProgression")
        logic = widget.logic
        logic.ensureResultDependencies()
        parameters = logic.getParameterNode()

        self.delayDisplay("The Forecast button waits for a baseline, target ages and the weights")
        volume = mrml.add_volume(slicer.mrmlScene, np.ones((8, 9, 10), np.float32), np.eye(4), "T1w")
        parameters.baselineVolume = volume
        parameters.age = 70.0
        parameters.targetAges = "72, 6x"
        slicer.app.processEvents()
        self.assertFalse(widget.ui.applyButton.enabled)
        self.assertIn("'6x' is not a number", widget.ui.inputStatusLabel.text)
        parameters.targetAges = "72, 74"
        slicer.app.processEvents()
        self.assertFalse(widget.ui.applyButton.enabled)
        self.assertIn("github.com/LemuelPuglisi/BrLP", widget.ui.weightsStatusLabel.text)
        with tempfile.TemporaryDirectory() as folder:
            weights = pathlib.Path(folder)
            (weights / "autoencoder.pth").write_bytes(b"x")
            parameters.weights = weights
            slicer.app.processEvents()
            self.assertIn("missing unet, controlnet", widget.ui.weightsStatusLabel.text)
            (weights / "unet.pth").write_bytes(b"x")
            (weights / "cnet.pth").write_bytes(b"x")
            parameters.weights = pathlib.Path()  # the files changed, the path did not: select it again
            parameters.weights = weights
            slicer.app.processEvents()
            self.assertEqual(widget.ui.weightsStatusLabel.text, "")
            self.assertTrue(widget.ui.applyButton.enabled, widget.ui.inputStatusLabel.text)

            self.delayDisplay("The command line of the job")
            args = logic.predictArguments("t1.nii.gz", parameters.age, parameters.sex, parameters.diagnosis,
                                          parameters.targetAges, weights, "/tmp/out", m=parameters.samples,
                                          steps=parameters.ddimSteps, device=parameters.device)
            self.assertEqual(args, ["progression", "predict", "--t1", "t1.nii.gz", "--age", "70.0", "--sex", "F",
                                    "--diagnosis", "CN", "--target-ages", "72.0", "74.0", "--weights", str(weights),
                                    "--m", "4", "--steps", "25", "--device", "cpu", "--out", "/tmp/out"])
        self.delayDisplay("Test passed")

    def test_load_a_forecast_through_the_widget(self):
        import BrainProgression

        slicer.util.selectModule("BrainProgression")
        widget = slicer.util.getModuleWidget("BrainProgression")
        logic = widget.logic
        logic.ensureResultDependencies()
        parameters = logic.getParameterNode()

        self.delayDisplay("Load a synthetic forecast with Load results")
        ages = [72.0, 74.0, 76.0]
        with tempfile.TemporaryDirectory() as folder:
            expected = BrainProgression.syntheticForecast(folder, ages)
            parameters.outputFolder = pathlib.Path(folder)
            slicer.app.processEvents()
            self.assertTrue(widget.ui.loadButton.enabled)
            widget.ui.loadButton.click()
        nodes = widget._nodes
        self.assertIsNotNone(nodes)
        for kind in ("predicted", "uncertainty", "difference"):
            sequence = nodes[f"{kind}_sequence"]
            self.assertEqual(sequence.GetNumberOfDataNodes(), len(ages))
            self.assertEqual([float(sequence.GetNthIndexValue(i)) for i in range(len(ages))], ages)
        browser = nodes["browser"]
        browser.SetSelectedItemNumber(1)
        slicer.app.processEvents()
        shown = slicer.util.arrayFromVolume(nodes["predicted_proxy"])
        np.testing.assert_allclose(shown, expected["predicted"][1].transpose(2, 1, 0), rtol=1e-6)
        shown = slicer.util.arrayFromVolume(nodes["uncertainty_proxy"])
        np.testing.assert_allclose(shown, expected["uncertainty"][1].transpose(2, 1, 0), rtol=1e-6)
        table = slicer.util.dataframeFromTable(widget.ui.volumesTableView.mrmlTableNode())
        np.testing.assert_allclose(table["target_age"].astype(float), ages)
        self.assertIn("hippocampus -8.3 %", widget.ui.resultSummaryLabel.text)
        self.assertEqual(nodes["volumes_chart"].GetNumberOfPlotSeriesNodes(), 5)

        self.delayDisplay("The difference map over the prediction, and off again")
        composite = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        self.assertEqual(composite.GetBackgroundVolumeID(), nodes["predicted_proxy"].GetID())
        self.assertEqual(composite.GetForegroundVolumeID(), nodes["difference_proxy"].GetID())
        parameters.showDifference = False
        slicer.app.processEvents()
        self.assertIsNone(composite.GetForegroundVolumeID())
        self.delayDisplay("Test passed")
