"""AtrophyNetwork through its widget, the way a user drives it.

A small synthetic cohort (``neuroatrophy.demo``) is fitted with the Fit button: the
fit runs as a background job polled by a QTimer, so the test pumps Qt events while
waiting. A first fit is cancelled, a second one completes; then the patient map is
computed with the Compute button and re-thresholded with the threshold parameter.
"""

import pathlib
import tempfile
import time

import numpy as np

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

FIT_TIMEOUT_S = 600


class AtrophyNetworkSelfTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_fit_cancel_and_map_through_the_widget()

    def _waitForJob(self, widget, timeout):
        deadline = time.monotonic() + timeout
        while widget._job is not None:
            self.assertLess(time.monotonic(), deadline, "the fit job did not finish in time")
            slicer.app.processEvents()
            time.sleep(0.05)
        slicer.app.processEvents()

    def test_fit_cancel_and_map_through_the_widget(self):
        slicer.util.selectModule("AtrophyNetwork")
        widget = slicer.util.getModuleWidget("AtrophyNetwork")
        logic = widget.logic
        logic.ensureDependencies()
        from neuroatrophy.demo import make_demo_cohort, write_demo_cohort

        with tempfile.TemporaryDirectory() as folder:
            cohort = make_demo_cohort(n_controls=40, n_patients=2, n_sites=2, seed=11)
            demoFolder = write_demo_cohort(cohort, folder)
            cohortTable, subjects = demoFolder / "cohort.csv", demoFolder / "subjects"
            modelFile = pathlib.Path(folder) / "model.npz"

            parameters = logic.getParameterNode()
            parameters.controlCohortTable = cohortTable
            parameters.subjectsDirectory = subjects
            parameters.modelFile = modelFile
            slicer.app.processEvents()
            self.assertTrue(widget.ui.fitButton.enabled)

            self.delayDisplay("Fit, then cancel")
            widget.ui.fitButton.click()
            self.assertIsNotNone(widget._job)
            self.assertFalse(widget.ui.fitButton.enabled)
            job = widget._job
            widget.ui.cancelFitButton.click()
            self._waitForJob(widget, timeout=60)
            self.assertTrue(job.cancelled)
            self.assertFalse(modelFile.exists())
            self.assertTrue(widget.ui.fitButton.enabled)

            self.delayDisplay("Fit to the end")
            widget.ui.fitButton.click()
            self._waitForJob(widget, timeout=FIT_TIMEOUT_S)
            self.assertTrue(modelFile.is_file())
            self.assertIsNotNone(widget._model)
            self.assertEqual(widget.ui.regionComboBox.count, 68)
            self.assertIsNotNone(widget.ui.fitQualityTableView.mrmlTableNode())

            self.delayDisplay("Patient atrophy map")
            parameters.patientCohortTable = cohortTable
            slicer.app.processEvents()
            patients = logic.patientIds(cohortTable)
            self.assertEqual(parameters.patientId, patients[0])  # the first patient is preselected
            self.assertTrue(widget.ui.computeButton.enabled)
            widget.ui.computeButton.click()

            patient = {"patientId": patients[0], "cohortTable": cohortTable, "subjectsDirectory": subjects,
                       "minClusterSize": parameters.minClusterSize}
            expected = logic.computePatientMap(widget._model, threshold=parameters.zThreshold, **patient)
            strict = logic.computePatientMap(widget._model, threshold=-3.0, **patient)

        modelNode = parameters.outputModel
        self.assertIsNotNone(modelNode)
        np.testing.assert_array_equal(slicer.util.arrayFromModelPointData(modelNode, "z"), expected.z)
        np.testing.assert_array_equal(slicer.util.arrayFromModelPointData(modelNode, "atrophic"),
                                      expected.atrophy.mask)
        self.assertEqual(parameters.region, expected.regions["region"].iloc[0])
        self.assertIsNotNone(widget._centileChart)
        self.assertTrue(slicer.mrmlScene.IsNodePresent(widget._centileChart))

        self.delayDisplay("Re-threshold the shown map")
        original = parameters.zThreshold
        parameters.zThreshold = -3.0
        slicer.app.processEvents()
        np.testing.assert_array_equal(slicer.util.arrayFromModelPointData(modelNode, "atrophic"),
                                      strict.atrophy.mask)
        self.assertLess(strict.atrophy.n_atrophic, expected.atrophy.n_atrophic)
        parameters.zThreshold = original
        slicer.app.processEvents()
        np.testing.assert_array_equal(slicer.util.arrayFromModelPointData(modelNode, "atrophic"),
                                      expected.atrophy.mask)
        self.delayDisplay("Test passed")
