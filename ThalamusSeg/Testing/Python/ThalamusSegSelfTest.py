"""ThalamusSeg through its widget, the way a user drives it.

Evaluation: two synthetic thalamus segmentations (a reference and a copy shifted by two
voxels) and a label map are added to the scene; the reference is selected, the others are
checked, and Evaluate fills the metrics table. Cohort results written to a folder are
loaded with Load results, which fills the Bland-Altman chart selector.

With a trained model shipped in ``neuroatrophy/data/models``, a synthetic head (the
FreeSurfer atlas painted with T1-like intensities) is segmented with the Segment button:
the job runs in the background, polled by a QTimer, so the test pumps Qt events while
waiting; a first run is cancelled, a second one completes. Then a small cohort table of
such heads is run with Run cohort.
"""

import pathlib
import tempfile
import time

import numpy as np
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

JOB_TIMEOUT_S = 600


class ThalamusSegSelfTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_evaluate_and_load_cohort_through_the_widget()
        self.setUp()
        self.test_segment_cancel_and_cohort_through_the_widget()

    def _waitForJob(self, widget, timeout):
        deadline = time.monotonic() + timeout
        while widget._job is not None:
            self.assertLess(time.monotonic(), deadline, "the thalamus job did not finish in time")
            slicer.app.processEvents()
            time.sleep(0.05)
        slicer.app.processEvents()

    def test_evaluate_and_load_cohort_through_the_widget(self):
        import nibabel as nib
        import pandas as pd

        import ThalamusSeg
        from neuroatrophy import mrml
        from neuroatrophy.thalamus_eval import agreement_table, evaluate_masks

        slicer.util.selectModule("ThalamusSeg")
        widget = slicer.util.getModuleWidget("ThalamusSeg")
        logic = widget.logic
        logic.ensureDependencies()

        self.delayDisplay("Evaluate two segmentations against a reference")
        labels = ThalamusSeg.syntheticThalamusLabels()
        data = np.asarray(labels.dataobj)
        shifted = nib.Nifti1Image(np.roll(data, 2, axis=0), labels.affine)
        reference = logic.addSegmentation(labels, "Manual")
        ours = logic.addSegmentation(shifted, "Shifted")
        copy = mrml.add_volume(slicer.mrmlScene, data.transpose(2, 1, 0), labels.affine, "Copy", label_map=True)
        parameters = logic.getParameterNode()
        parameters.referenceNode = reference
        slicer.app.processEvents()
        self.assertFalse(widget.ui.evaluateButton.enabled)
        widget.ui.comparedSelector.check(ours)
        widget.ui.comparedSelector.check(copy)
        slicer.app.processEvents()
        self.assertTrue(widget.ui.evaluateButton.enabled)
        widget.ui.evaluateButton.click()
        table = slicer.util.dataframeFromTable(widget.ui.resultsTableView.mrmlTableNode())
        expected = evaluate_masks({"Shifted": shifted, "Copy": labels}, labels, subject="Manual")
        self.assertEqual(list(table["method"]), list(expected["method"]))
        np.testing.assert_allclose(table["dice"].astype(float), expected["dice"])
        self.assertIn("Dice (both thalami)", widget.ui.resultSummaryLabel.text)

        self.delayDisplay("Load a cohort's results: one Bland-Altman chart per method")
        with tempfile.TemporaryDirectory() as folder:
            folder = pathlib.Path(folder)
            frames = []
            for index, radius in enumerate((5.0, 6.0, 7.0)):
                truth = ThalamusSeg.syntheticThalamusLabels(radius=radius)
                grown = ThalamusSeg.syntheticThalamusLabels(radius=radius + 1.0)
                frames.append(evaluate_masks({"grown": grown}, truth, subject=f"sub-{index}"))
            metrics = pd.concat(frames, ignore_index=True)
            pd.DataFrame({"subject": ["sub-0", "sub-1", "sub-2"], "left": [1.0, 2.0, 3.0], "right": [1.0, 2.0, 3.0],
                          "both": [2.0, 4.0, 6.0]}).to_csv(folder / "volumes.csv", index=False)
            metrics.to_csv(folder / "metrics.csv", index=False)
            agreement_table(metrics).to_csv(folder / "agreement.csv", index=False)
            parameters.cohortOutputFolder = folder
            slicer.app.processEvents()
            self.assertTrue(widget.ui.loadCohortButton.enabled)
            widget.ui.loadCohortButton.click()
        self.assertEqual(widget.ui.chartComboBox.count, 1)
        self.assertEqual(widget.ui.chartComboBox.currentText, "grown")
        self.assertIn("3 subjects", widget.ui.resultSummaryLabel.text)
        self.delayDisplay("Test passed")

    def test_segment_cancel_and_cohort_through_the_widget(self):
        import nibabel as nib
        import pandas as pd

        import ThalamusSeg
        from neuroatrophy import mrml

        slicer.util.selectModule("ThalamusSeg")
        widget = slicer.util.getModuleWidget("ThalamusSeg")
        logic = widget.logic
        if logic.defaultModelFile() is None:
            self.delayDisplay("No trained thalamus model is shipped: segmentation through the widget not tested")
            return
        logic.ensureSegmentationDependencies()

        with tempfile.TemporaryDirectory() as folder:
            folder = pathlib.Path(folder)
            image, truth = ThalamusSeg.syntheticHead()
            volume = mrml.add_volume(slicer.mrmlScene, image.get_fdata().transpose(2, 1, 0), image.affine, "T1w")
            parameters = logic.getParameterNode()
            parameters.t1wVolume = volume
            parameters.outputFolder = folder / "thalamus"
            slicer.app.processEvents()
            self.assertTrue(widget.ui.segmentButton.enabled)
            self.assertFalse(widget.ui.ensembleComboBox.enabled)  # one input: nothing to combine

            self.delayDisplay("Segment, then cancel")
            widget.ui.segmentButton.click()
            job = widget._job
            self.assertIsNotNone(job)
            self.assertFalse(widget.ui.segmentButton.enabled)
            widget.ui.cancelButton.click()
            self._waitForJob(widget, timeout=60)
            self.assertTrue(job.cancelled)
            self.assertTrue(widget.ui.segmentButton.enabled)
            self.assertTrue((folder / "thalamus-inputs" / "T1w.nii.gz").is_file())

            self.delayDisplay("Segment to the end")
            widget.ui.segmentButton.click()
            self._waitForJob(widget, timeout=JOB_TIMEOUT_S)
            self.assertIsNotNone(widget._nodes, widget.ui.statusLabel.text)
            segmentation = widget._nodes["segmentation"]
            self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 2)
            table = slicer.util.dataframeFromTable(widget.ui.resultsTableView.mrmlTableNode())
            self.assertEqual(list(table["structure"]), ["left", "right", "both"])
            self.assertIn("Thalamic volume", widget.ui.resultSummaryLabel.text)
            self.assertIn(segmentation, widget.ui.comparedSelector.checkedNodes())

            self.delayDisplay("A cohort of three synthetic heads with references")
            rows = []
            for index in range(3):
                image, truth = ThalamusSeg.syntheticHead(seed=index)
                nib.save(image, folder / f"t1w-{index}.nii.gz")
                nib.save(truth, folder / f"reference-{index}.nii.gz")
                rows.append({"subject": f"sub-{index}", "t1w": str(folder / f"t1w-{index}.nii.gz"),
                             "reference": str(folder / f"reference-{index}.nii.gz")})
            pd.DataFrame(rows).to_csv(folder / "cohort.csv", index=False)
            parameters.cohortTable = folder / "cohort.csv"
            parameters.cohortOutputFolder = folder / "cohort"
            slicer.app.processEvents()
            self.assertTrue(widget.ui.runCohortButton.enabled)
            widget.ui.runCohortButton.click()
            self._waitForJob(widget, timeout=JOB_TIMEOUT_S)
            self.assertIn("3 subjects", widget.ui.resultSummaryLabel.text, widget.ui.statusLabel.text)
            self.assertGreaterEqual(widget.ui.chartComboBox.count, 1)
        self.delayDisplay("Test passed")
