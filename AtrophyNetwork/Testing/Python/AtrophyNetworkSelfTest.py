"""AtrophyNetwork through its widget, the way a user drives it.

A small synthetic cohort (``neuroatrophy.demo``) is fitted with the Fit button: the
fit runs as a background job polled by a QTimer, so the test pumps Qt events while
waiting. A first fit is cancelled, a second one completes; then the patient map is
computed with the Compute button and re-thresholded with the threshold parameter.

The network part builds a tiny connectome of simulated resting-state runs
(``neuroatrophy.demo_connectome``) with the Build connectome button, maps the demo
patients' atrophy networks with Map networks (one run cancelled, one completed), then
switches the shown patient, re-thresholds the convergence map, shows the targets and
tests target connectivity against the demo outcome.
"""

import pathlib
import tempfile
import time

import numpy as np

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

FIT_TIMEOUT_S = 600
NETWORK_TIMEOUT_S = 300


class AtrophyNetworkSelfTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_fit_cancel_and_map_through_the_widget()
        self.setUp()
        self.test_networks_convergence_targets_and_outcome_through_the_widget()

    def _waitForJob(self, widget, timeout):
        deadline = time.monotonic() + timeout
        while widget._job is not None:
            self.assertLess(time.monotonic(), deadline, f"the {widget._jobKind} job did not finish in time")
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

    def test_networks_convergence_targets_and_outcome_through_the_widget(self):
        slicer.util.selectModule("AtrophyNetwork")
        widget = slicer.util.getModuleWidget("AtrophyNetwork")
        logic = widget.logic
        logic.ensureDependencies()
        from neuroatrophy.demo import make_demo_cohort, write_demo_cohort
        from neuroatrophy.io import read_surface_data
        from neuroatrophy.targets import standard_targets
        from neuroatrophy.thickness_model import CorticalThicknessModel

        with tempfile.TemporaryDirectory() as folder:
            folder = pathlib.Path(folder)
            cohort = make_demo_cohort(n_controls=40, n_patients=4, n_sites=2, seed=5)
            demoFolder = write_demo_cohort(cohort, folder / "demo")
            cohortTable, subjects = demoFolder / "cohort.csv", demoFolder / "subjects"
            controls = ~cohort.is_patient
            model = CorticalThicknessModel().fit(cohort.thickness[controls], cohort.covariates[controls])
            modelFile = folder / "model.npz"
            model.save(modelFile)
            runsTable = _writeSimulatedRuns(folder / "runs", nSubjects=6, nTimepoints=60)
            patients = logic.patientIds(cohortTable)

            parameters = logic.getParameterNode()
            parameters.patientCohortTable = cohortTable
            parameters.subjectsDirectory = subjects
            parameters.modelFile = modelFile
            parameters.runsTable = runsTable
            parameters.connectomeFolder = folder / "connectome"
            parameters.networkOutputFolder = folder / "networks"
            parameters.autoTThreshold = False
            parameters.tThreshold = 8.0
            parameters.nNullSeeds = 20
            slicer.app.processEvents()

            self.delayDisplay("Build the connectome")
            self.assertTrue(widget.ui.buildConnectomeButton.enabled)
            widget.ui.buildConnectomeButton.click()
            self.assertFalse(widget.ui.mapNetworksButton.enabled)  # one job at a time
            self._waitForJob(widget, timeout=NETWORK_TIMEOUT_S)
            self.assertIn("6 subjects", widget.ui.connectomeInfoLabel.text)

            self.delayDisplay("Map the networks, then cancel")
            self.assertTrue(widget.ui.mapNetworksButton.enabled)
            widget.ui.mapNetworksButton.click()
            job = widget._job
            self.assertIsNotNone(job)
            self.assertFalse(widget.ui.cancelNetworkButton.isHidden())
            widget.ui.cancelNetworkButton.click()
            self._waitForJob(widget, timeout=60)
            self.assertTrue(job.cancelled)
            self.assertIsNone(widget._analysis)
            self.assertFalse((folder / "networks" / "network_analysis.json").exists())

            self.delayDisplay("Map the networks with a user target")
            placed = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "my targets")
            placed.AddControlPoint(_cortexPoint(), "myTarget")
            parameters.userTargetsMarkups = placed
            widget.ui.showTargetsButton.click()
            self.assertEqual(widget._targetNodes["markups"].GetNumberOfControlPoints(), len(standard_targets()) + 1)
            widget.ui.mapNetworksButton.click()
            self._waitForJob(widget, timeout=NETWORK_TIMEOUT_S)
            analysis = widget._analysis
            self.assertIsNotNone(analysis, widget.ui.networkStatusLabel.text)
            self.assertEqual(analysis.patients, patients)
            self.assertEqual(analysis.networks.threshold, 8.0)
            targetNames = [t.name for t in standard_targets()] + ["myTarget"]
            self.assertEqual(list(analysis.target_connectivity.columns), targetNames)

            self.delayDisplay("The first patient's network, then another patient's")
            self.assertEqual(parameters.networkPatient, patients[0])
            first = widget._networkNodes["node"]
            np.testing.assert_array_equal(slicer.util.arrayFromModelPointData(first, "t"),
                                          analysis.maps.t[analysis.maps.index(patients[0])])
            np.testing.assert_array_equal(slicer.util.arrayFromModelPointData(first, "network"),
                                          analysis.networks.signed()[0])
            self.assertEqual(widget.ui.networkSummaryTableView.mrmlTableNode().GetNumberOfRows(), len(patients))
            widget.ui.networkPatientComboBox.currentIndex = 2
            slicer.app.processEvents()
            self.assertEqual(parameters.networkPatient, patients[2])
            shown = widget._networkNodes["node"]
            self.assertFalse(slicer.mrmlScene.IsNodePresent(first))
            self.assertTrue(shown.GetDisplayVisibility())
            np.testing.assert_array_equal(slicer.util.arrayFromModelPointData(shown, "t"),
                                          analysis.maps.t[analysis.maps.index(patients[2])])

            self.delayDisplay("Convergence: re-threshold, then the specificity-filtered map")
            convergence = widget._convergenceNodes["node"]
            percent = analysis.convergence_positive
            parameters.convergenceFraction = 0.5
            slicer.app.processEvents()
            self.assertEqual(widget._convergenceNodes["node"].GetID(), convergence.GetID())  # updated in place
            np.testing.assert_array_equal(slicer.util.arrayFromModelPointData(convergence, "convergent"),
                                          np.where(percent >= 50, percent, 0))
            self.assertTrue(convergence.GetDisplayVisibility())
            self.assertFalse(shown.GetDisplayVisibility())
            regions = slicer.util.dataframeFromTable(widget.ui.convergentRegionsTableView.mrmlTableNode())
            expected = analysis.convergent_regions(0.5, "positive")
            self.assertEqual(list(regions["region"]), list(expected["region"]))
            parameters.specificConvergence = True
            slicer.app.processEvents()
            specific = widget._convergenceNodes["node"]
            self.assertEqual(specific.GetName(), "Convergence (specific positive networks)")
            self.assertFalse(slicer.mrmlScene.IsNodePresent(convergence))
            files = [folder / "networks" / f"{hemi}.specific_convergence_positive.mgh" for hemi in ("lh", "rh")]
            written = np.concatenate([read_surface_data(path) for path in files])
            np.testing.assert_allclose(slicer.util.arrayFromModelPointData(specific, "convergence"), written)

            self.delayDisplay("Targets and their connectivity")
            points = widget._targetNodes["markups"]
            self.assertEqual([points.GetNthControlPointLabel(i) for i in range(points.GetNumberOfControlPoints())],
                             targetNames)
            connectivity = slicer.util.dataframeFromTable(widget.ui.targetConnectivityTableView.mrmlTableNode())
            np.testing.assert_allclose(connectivity["myTarget"], analysis.target_connectivity["myTarget"])

            self.delayDisplay("Target connectivity against the outcome")
            self.assertEqual(parameters.outcomeColumn, "panss_change")  # the table's only numeric outcome
            parameters.covariates = "age"
            parameters.nPermutations = 200
            slicer.app.processEvents()
            self.assertTrue(widget.ui.testOutcomeButton.enabled)
            widget.ui.testOutcomeButton.click()
            expected = logic.testOutcome(analysis.target_connectivity, cohortTable, "panss_change", ["age"],
                                         nPermutations=200)
            np.testing.assert_allclose(widget._outcomeResults["r"], expected["r"])
            np.testing.assert_allclose(widget._outcomeResults["p_permutation"], expected["p_permutation"])
            self.assertEqual(widget.ui.outcomeResultsTableView.mrmlTableNode().GetNumberOfRows(), len(targetNames))
            self.assertEqual(parameters.outcomeTarget, targetNames[0])
            chart = widget._outcomeNodes["chart"]
            self.assertEqual(chart.GetNumberOfPlotSeriesNodes(), 4)
            parameters.outcomeTarget = "myTarget"
            slicer.app.processEvents()
            self.assertFalse(slicer.mrmlScene.IsNodePresent(chart))
            chart = widget._outcomeNodes["chart"]
            scatter = chart.GetNthPlotSeriesNode(0)
            self.assertEqual(scatter.GetPlotType(), scatter.PlotTypeScatter)
            plotted = slicer.util.dataframeFromTable(scatter.GetTableNode())
            np.testing.assert_allclose(plotted["connectivity"], analysis.target_connectivity["myTarget"])

            self.delayDisplay("Load the results again: the earlier analysis's nodes go")
            widget.ui.loadNetworksButton.click()
            self.assertIsNot(widget._analysis, analysis)
            models = slicer.util.getNodesByClass("vtkMRMLModelNode")
            kinds = [model.GetAttribute("NeuroAtrophy.Kind") for model in models]
            self.assertEqual((kinds.count("network"), kinds.count("convergence")), (1, 1))
            # Two point lists: the user's and the targets'.
            self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLMarkupsFiducialNode")), 2)
            self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLPlotChartNode")), 0)
        self.delayDisplay("Test passed")


def _writeSimulatedRuns(folder, nSubjects, nTimepoints):
    """A runs table of simulated fsaverage5 resting-state runs (``neuroatrophy.demo_connectome``), as .npy files."""
    import pandas as pd

    from neuroatrophy.demo_connectome import simulate_connectome_subjects

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for subjectId, timeseries in simulate_connectome_subjects(n_subjects=nSubjects, n_timepoints=nTimepoints, seed=0):
        half = timeseries.shape[1] // 2
        for hemi, part in (("lh", slice(0, half)), ("rh", slice(half, None))):
            np.save(folder / f"{subjectId}.{hemi}.npy", np.ascontiguousarray(timeseries[:, part].T))
        rows.append({"subject_id": subjectId, "lh_file": f"{subjectId}.lh.npy", "rh_file": f"{subjectId}.rh.npy"})
    pd.DataFrame(rows).to_csv(folder / "runs.csv", index=False)
    return folder / "runs.csv"


def _cortexPoint() -> list:
    """MNI position of a cortical fsaverage5 vertex: a user target that surely holds connectome nodes."""
    from neuroatrophy.connectome import fsaverage5_coordinates
    from neuroatrophy.surface import dk_atlas

    atlas = dk_atlas()
    label = list(atlas.names).index("L_rostralmiddlefrontal") + 1  # label 0 is the medial wall
    vertex = int(np.flatnonzero(np.asarray(atlas.labels) == label)[0])
    return [float(c) for c in fsaverage5_coordinates()[vertex]]
