"""AtrophySubtypes through its widget, the way a user drives it.

A small simulated cohort (two atrophy subtypes over five regions, one of them
"Spinal cord", which the default atlas lacks) is written to a CSV file and fitted
with the Fit button: the fit runs as a background job polled by a QTimer, so the
test pumps Qt events while waiting. A first fit is cancelled, a second one (few
start points and MCMC iterations) completes; then the subjects table, the
positional variance diagram and the stage sequences are checked, and the shown
subtype is switched.
"""

import pathlib
import tempfile
import time

import numpy as np
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

FIT_TIMEOUT_S = 600


class AtrophySubtypesSelfTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_fit_cancel_and_show_through_the_widget()

    def _waitForJob(self, widget, timeout):
        deadline = time.monotonic() + timeout
        while widget._job is not None:
            self.assertLess(time.monotonic(), deadline, "the subtype job did not finish in time")
            slicer.app.processEvents()
            time.sleep(0.05)
        slicer.app.processEvents()

    def test_fit_cancel_and_show_through_the_widget(self):
        import AtrophySubtypes

        slicer.util.selectModule("AtrophySubtypes")
        widget = slicer.util.getModuleWidget("AtrophySubtypes")
        logic = widget.logic
        logic.ensureDependencies()

        with tempfile.TemporaryDirectory() as folder:
            folder = pathlib.Path(folder)
            cohort, truth = AtrophySubtypes.simulatedCohort(nPatients=120, nControls=80, seed=5)
            cohortFile = folder / "cohort.csv"
            cohort.to_csv(cohortFile, index=False)
            outputFolder = folder / "subtypes"

            parameters = logic.getParameterNode()
            parameters.cohortTable = cohortFile
            parameters.outputFolder = outputFolder
            parameters.covariates = "age, sex, icv"
            parameters.maxSubtypes = 2
            parameters.zLevels = "1,2"
            parameters.startPoints = 4
            parameters.mcmcIterations = 200000
            slicer.app.processEvents()
            self.assertTrue(widget.ui.fitButton.enabled)

            self.delayDisplay("Fit, then cancel")
            widget.ui.fitButton.click()
            job = widget._job
            self.assertIsNotNone(job)
            self.assertFalse(widget.ui.fitButton.enabled)
            widget.ui.cancelButton.click()
            self._waitForJob(widget, timeout=60)
            self.assertTrue(job.cancelled)
            self.assertFalse(outputFolder.exists())
            self.assertTrue(widget.ui.fitButton.enabled)

            self.delayDisplay("Fit to the end")
            parameters.mcmcIterations = 2000
            widget.ui.fitButton.click()
            self._waitForJob(widget, timeout=FIT_TIMEOUT_S)
            result = widget._result
            self.assertIsNotNone(result, widget.ui.statusLabel.text)
            self.assertEqual(result.chosen_n_subtypes, 2)
            self.assertEqual(list(result.staged.index), list(truth["patients"]))

            self.delayDisplay("Subjects, diagram and stage sequences")
            table = slicer.util.dataframeFromTable(widget.ui.subjectsTableView.mrmlTableNode())
            self.assertEqual(list(table["subject_id"]), list(truth["patients"]))
            np.testing.assert_array_equal(table["ml_stage"], result.staged["ml_stage"])
            self.assertTrue(widget.ui.pvdLabel.visible)
            self.assertIn("Spinal cord", widget.ui.resultSummaryLabel.text)
            nodes = widget._nodes
            model = result.models[1]
            self.assertEqual([s.GetNumberOfDataNodes() for s in nodes["stage_sequences"]], [model.n_stages] * 2)

            self.delayDisplay("Show the second subtype")
            parameters.shownSubtype = 2
            slicer.app.processEvents()
            browser, sequence = nodes["stage_browsers"][1], nodes["stage_sequences"][1]
            background = slicer.app.layoutManager().sliceWidget("Red").sliceLogic().GetBackgroundLayer()
            self.assertEqual(background.GetVolumeNode().GetID(), browser.GetProxyNode(sequence).GetID())

            self.delayDisplay("Load the results again: the earlier nodes go")
            widget.ui.loadButton.click()
            self.assertFalse(slicer.mrmlScene.IsNodePresent(nodes["subjects_table"]))
            self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLSequenceBrowserNode")), 2)
        self.delayDisplay("Test passed")
