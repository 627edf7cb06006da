"""AtrophyNetwork: normative models of cortical thickness, personalized atrophy maps and atrophy networks.

A thin 3D Slicer module over the Qt-free ``neuroatrophy`` library: the widget
collects parameters, the logic calls the library, and the long jobs (normative-model
fit, connectome build, atrophy network mapping) run in a separate process
(``neuroatrophy fit``, ``neuroatrophy connectome build``, ``neuroatrophy network``)
so that Slicer stays responsive and the job can be cancelled.

Use from Slicer's Python console::

    import AtrophyNetwork
    logic = AtrophyNetwork.AtrophyNetworkLogic()

    # Fit a normative model on the controls of a cohort table (blocks until done; minutes).
    model = logic.fitModel("/data/cohort.csv", "/data/freesurfer-subjects", "/data/thickness-model.npz")
    # ... or load one fitted earlier:
    model = logic.loadModel("/data/thickness-model.npz")

    # One patient's personalized atrophy map, from the cohort table ...
    patientMap = logic.computePatientMap(model, patientId="sub-042", cohortTable="/data/cohort.csv",
                                         subjectsDirectory="/data/freesurfer-subjects")
    # ... or from two thickness files resampled to fsaverage5:
    patientMap = logic.computePatientMap(model, lhFile="lh.thickness.fsaverage5.mgh",
                                         rhFile="rh.thickness.fsaverage5.mgh", age=67, sex="F", site="siteA")
    print(patientMap.regions.head())                       # most atrophic regions first

    nodes = logic.showPatientMap(patientMap, surface="inflated")   # model, colour table, regions table
    logic.updateThreshold(nodes["model"], -2.5)                      # re-threshold the shown map
    chart = logic.showCentileCurves(model, patientMap.regions["region"].iloc[0], patientMap)

Atrophy networks (each patient's atrophy map as a seed in a normative resting-state
connectome), their convergence across patients, and rTMS targets::

    # A connectome store from a runs table (subject_id, lh_file, rh_file[, confounds_file]); blocks.
    store = logic.buildConnectome("/data/runs.csv", "/data/connectome", globalSignal=True,
                                  bandpass=(0.01, 0.1), tr=2.0)
    # Map the networks of the cohort's patients (blocks; startMapNetworks returns the running job).
    targets = logic.networkTargets(markups=getNode("my targets"))  # standard targets + placed points
    analysis = logic.mapNetworks("/data/cohort.csv", "/data/freesurfer-subjects", "/data/thickness-model.npz",
                                 "/data/connectome", "/data/networks", tThreshold="auto", nNull=40,
                                 targets=targets)
    # ... or read results written earlier:
    analysis = logic.loadNetworkAnalysis("/data/networks")
    print(analysis.summary)                                   # network sizes and specificity per patient

    nodes = logic.showNetwork(analysis, analysis.patients[0])           # t-map and network on fsaverage5
    nodes = logic.showNetwork(analysis, analysis.patients[1], replace=nodes)   # switch patient
    convergence = logic.showConvergence(analysis, sign="positive", fraction=0.75)
    logic.updateConvergenceFraction(convergence["node"], 0.5)          # re-threshold; regions table too
    specific = logic.showConvergence(analysis, specific=True, folder="/data/networks")
    logic.showTargets(logic.networkTargets())                          # standard targets as labelled points
    logic.showTargetConnectivity(analysis)                             # table: patients x targets

    # Does connectivity between the atrophy network and a target go with treatment outcome?
    results = logic.testOutcome(analysis.target_connectivity, "/data/cohort.csv", "panss_change",
                                covariates=["age", "sex"], nPermutations=5000)
    outcome = logic.outcomeValues("/data/cohort.csv", "panss_change")
    nodes = logic.showOutcome(results, analysis.target_connectivity, outcome, "DLPFC_F3")  # table + plot
"""

import logging
import pathlib
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLModelNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from NeuroAtrophyLib import childEnvironment, dependenciesInstalled, ensureDependencies, isGiven, slicerPythonExecutable

PATIENT_FROM_COHORT = "cohort table"
PATIENT_FROM_FILES = "thickness files"
CONNECTOME_SPACES = ("fsaverage5", "MNI152-2mm")
SEED_WEIGHTINGS = ("binary", "abs_z")
NETWORK_SIGNS = ("positive", "negative")
OUTCOME_METHODS = ("pearson", "spearman")
# File the user's targets are written to (in the output folder) for ``neuroatrophy network --targets``.
REQUESTED_TARGETS_FILE = "requested_targets.csv"
# Milliseconds between two looks at a running job.
JOB_POLL_INTERVAL_MS = 200


#
# AtrophyNetwork
#


class AtrophyNetwork(ScriptedLoadableModule):
    """Module description (shown in Slicer's module panel)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Atrophy Network")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Neuroimaging")]
        self.parent.dependencies = []
        self.parent.contributors = ["NeuroAtrophy developers"]
        self.parent.helpText = _("""
Normative models of cortical thickness, personalized atrophy maps and atrophy networks.
Fit a model of how cortical thickness varies with age, sex and site in healthy controls (or load one),
then map where a patient's cortex is thinner than expected: a z-score on every vertex of the fsaverage5
surface, atrophic clusters, a regional summary and the centile curves of any Desikan-Killiany region.
Each patient's atrophy map then seeds a normative resting-state connectome: the atrophy network, its
convergence across patients, and its connectivity with rTMS targets, tested against treatment outcome.
See the <a href="https://github.com/neuroatrophy/SlicerNeuroAtrophy">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Developed by the NeuroAtrophy developers. Uses the fsaverage5 template surfaces distributed with nilearn and
ENIGMA effect sizes distributed with the ENIGMA Toolbox.
""")


#
# AtrophyNetworkParameterNode
#


@parameterNodeWrapper
class AtrophyNetworkParameterNode:
    """The parameters of the module.

    controlCohortTable - Cohort table (CSV/TSV) whose controls train the normative model.
    subjectsDirectory - FreeSurfer subjects folder with each subject's fsaverage5 thickness files.
    modelFile - Normative model file written by Fit and read by Load and Compute.
    heteroskedastic - Let the spread of thickness change with age.
    warp - Model non-Gaussian thickness with a SinhArcsinh warp.
    patientSource - Take the patient from a cohort table or from two thickness files.
    patientCohortTable - Cohort table holding the patient.
    patientId - Patient's subject ID in that table (set from the patient combo box).
    lhThicknessFile, rhThicknessFile - Patient's thickness files resampled to fsaverage5.
    patientAge, patientSex, patientSite - Patient's covariates when read from files.
    zThreshold - A vertex is atrophic when its z-score is below this value.
    minClusterSize - Atrophic clusters smaller than this many vertices are ignored.
    surface - fsaverage5 surface the map is drawn on.
    region - Region whose centile curves are plotted (set from the region combo box).
    outputModel - Model showing the current atrophy map (the threshold applies to it).

    connectomeFolder - Normative connectome store (built by Build connectome, or elsewhere).
    runsTable - Resting-state runs to build the connectome from (subject_id, lh_file, rh_file or volume_file).
    connectomeSpace, globalSignal, bandpassLow, bandpassHigh, repetitionTime - Build options
        (0 Hz: no bound; 0 s: repetition time unknown).
    seedWeighting - Seed weights: "binary" (atrophic vertices) or "abs_z" (|z| on atrophic vertices).
    autoTThreshold, tThreshold - Network threshold: Bonferroni-corrected |t| (auto) or this |t|.
    nNullSeeds - Matched random seeds per patient for the specificity test (0: none; at least 20 for p < 0.05).
    networkOutputFolder - Folder the network analysis is written to and loaded from.
    networkPatient - Patient whose network is shown (set from the patient combo box).
    convergenceSign, specificConvergence, convergenceFraction - Convergence map shown: positive or negative
        networks, specificity-filtered or not, thresholded at this fraction of patients.
    standardTargets - Include the standard rTMS targets.
    userTargetsMarkups, userTargetsFile - User targets: points (labels are names) and/or a CSV (name, x, y, z).
    outcomeColumn - Outcome column of the patient cohort table (set from the outcome combo box).
    covariates - Covariate columns, comma-separated (e.g. "age, sex").
    outcomeMethod, nPermutations - Correlation and number of permutations of the outcome test.
    outcomeTarget - Target whose connectivity is plotted against outcome (set from the target combo box).
    """

    controlCohortTable: pathlib.Path
    subjectsDirectory: pathlib.Path
    modelFile: pathlib.Path
    heteroskedastic: bool = False
    warp: bool = False
    patientSource: Annotated[str, Choice([PATIENT_FROM_COHORT, PATIENT_FROM_FILES])] = PATIENT_FROM_COHORT
    patientCohortTable: pathlib.Path
    patientId: str = ""
    lhThicknessFile: pathlib.Path
    rhThicknessFile: pathlib.Path
    patientAge: Annotated[float, WithinRange(0.0, 120.0)] = 40.0
    patientSex: Annotated[str, Choice(["F", "M"])] = "F"
    patientSite: str = ""
    zThreshold: Annotated[float, WithinRange(-5.0, 0.0)] = -1.96
    minClusterSize: Annotated[int, WithinRange(0, 5000)] = 20
    surface: Annotated[str, Choice(["inflated", "pial"])] = "inflated"
    region: str = ""
    outputModel: vtkMRMLModelNode

    connectomeFolder: pathlib.Path
    runsTable: pathlib.Path
    connectomeSpace: Annotated[str, Choice(list(CONNECTOME_SPACES))] = CONNECTOME_SPACES[0]
    globalSignal: bool = False
    bandpassLow: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    bandpassHigh: Annotated[float, WithinRange(0.0, 10.0)] = 0.0
    repetitionTime: Annotated[float, WithinRange(0.0, 10.0)] = 0.0
    seedWeighting: Annotated[str, Choice(list(SEED_WEIGHTINGS))] = SEED_WEIGHTINGS[0]
    autoTThreshold: bool = True
    tThreshold: Annotated[float, WithinRange(0.5, 50.0)] = 7.0
    nNullSeeds: Annotated[int, WithinRange(0, 1000)] = 40
    networkOutputFolder: pathlib.Path
    networkPatient: str = ""
    convergenceSign: Annotated[str, Choice(list(NETWORK_SIGNS))] = NETWORK_SIGNS[0]
    specificConvergence: bool = False
    convergenceFraction: Annotated[float, WithinRange(0.05, 1.0)] = 0.75
    standardTargets: bool = True
    userTargetsMarkups: vtkMRMLMarkupsFiducialNode
    userTargetsFile: pathlib.Path
    outcomeColumn: str = ""
    covariates: str = ""
    outcomeMethod: Annotated[str, Choice(list(OUTCOME_METHODS))] = OUTCOME_METHODS[0]
    nPermutations: Annotated[int, WithinRange(0, 100000)] = 5000
    outcomeTarget: str = ""


#
# AtrophyNetworkWidget
#


class AtrophyNetworkWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module's panel: collects parameters and hands them to the logic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobKind = None
        self._jobView = None
        self._jobOnSuccess = None
        self._jobTimer = None
        self._model = None
        self._modelFile = None
        self._patientMap = None
        self._centileChart = None
        self._listedCohortTable = None
        self._listedConnectome = None
        self._appliedThreshold = None
        self._updatingGui = False
        self._resetNetworkState()

    def _resetNetworkState(self) -> None:
        """Forget the loaded network analysis and the nodes showing it."""
        self._analysis = None
        self._analysisFolder = None
        self._networkNodes = None
        self._shownNetwork = None
        self._convergenceNodes = None
        self._shownConvergence = None
        self._targetNodes = None
        self._tableNodes = None
        self._outcomeResults = None
        self._outcomeValues = None
        self._outcomeNodes = None
        self._shownOutcomeTarget = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AtrophyNetwork.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = AtrophyNetworkLogic()

        self._jobTimer = qt.QTimer()
        self._jobTimer.setInterval(JOB_POLL_INTERVAL_MS)
        self._jobTimer.connect("timeout()", self._pollJob)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.fitButton.connect("clicked(bool)", self.onFitButton)
        self.ui.cancelFitButton.connect("clicked(bool)", self.onCancelJobButton)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModelButton)
        self.ui.computeButton.connect("clicked(bool)", self.onComputeButton)
        self.ui.patientIdComboBox.connect("currentTextChanged(QString)", self.onPatientIdChanged)
        self.ui.regionComboBox.connect("currentTextChanged(QString)", self.onRegionChanged)

        self.ui.buildConnectomeButton.connect("clicked(bool)", self.onBuildConnectomeButton)
        self.ui.mapNetworksButton.connect("clicked(bool)", self.onMapNetworksButton)
        self.ui.cancelNetworkButton.connect("clicked(bool)", self.onCancelJobButton)
        self.ui.loadNetworksButton.connect("clicked(bool)", self.onLoadNetworksButton)
        self.ui.networkPatientComboBox.connect("currentTextChanged(QString)", self.onNetworkPatientChanged)
        self.ui.showTargetsButton.connect("clicked(bool)", self.onShowTargetsButton)
        self.ui.testOutcomeButton.connect("clicked(bool)", self.onTestOutcomeButton)
        self.ui.outcomeColumnComboBox.connect("currentTextChanged(QString)", self.onOutcomeColumnChanged)
        self.ui.outcomeTargetComboBox.connect("currentTextChanged(QString)", self.onOutcomeTargetChanged)

        for widget in (self.ui.cancelFitButton, self.ui.fitProgressBar, self.ui.cancelNetworkButton,
                       self.ui.networkProgressBar):
            widget.visible = False

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._job is not None:
            self._job.cancel()
        if self._jobTimer is not None:
            self._jobTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self._patientMap = None
        self._centileChart = None
        self._appliedThreshold = None
        self._resetNetworkState()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui file are bound here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    # ---------------------------------------------------------------- GUI state

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._parameterNode is None or self._updatingGui:
            return
        p = self._parameterNode
        self._updatingGui = True
        try:
            self._updateCohortLists()
            self._updateConnectomeInfo()
            self._syncComboText(self.ui.patientIdComboBox, p.patientId)
            self._syncComboText(self.ui.regionComboBox, p.region)
            self._syncComboText(self.ui.networkPatientComboBox, p.networkPatient)
            self._syncComboText(self.ui.outcomeColumnComboBox, p.outcomeColumn)
            self._syncComboText(self.ui.outcomeTargetComboBox, p.outcomeTarget)
            fromFiles = p.patientSource == PATIENT_FROM_FILES
            self.ui.patientCohortWidget.visible = not fromFiles
            self.ui.patientFilesWidget.visible = fromFiles
            self.ui.tThresholdSpinBox.enabled = not p.autoTThreshold
            self._updateButtons()
        finally:
            self._updatingGui = False
        self._applyThresholdChange()
        # Convergence first: the network shown last stays in front when both change (a new analysis).
        self._applyConvergence()
        self._applyNetworkPatient()
        self._applyOutcomeTarget()

    def _updateButtons(self) -> None:
        p = self._parameterNode
        if p is None:
            return
        running = self._job is not None
        canFit = isGiven(p.controlCohortTable) and isGiven(p.modelFile) and not running
        self.ui.fitButton.enabled = canFit
        if canFit:
            self.ui.fitButton.toolTip = _("Fit the normative model on the controls (runs in the background)")
        else:
            self.ui.fitButton.toolTip = _("Select a control cohort table and a model file")
        self.ui.cancelFitButton.visible = running and self._jobKind == "fit"
        self.ui.cancelNetworkButton.visible = running and self._jobKind in ("network", "connectome")
        self.ui.loadModelButton.enabled = isGiven(p.modelFile) and not running
        if p.patientSource == PATIENT_FROM_FILES:
            patientGiven = isGiven(p.lhThicknessFile) and isGiven(p.rhThicknessFile)
        else:
            patientGiven = isGiven(p.patientCohortTable) and bool(p.patientId)
        haveModel = self._model is not None or isGiven(p.modelFile)
        canCompute = patientGiven and haveModel and not running
        self.ui.computeButton.enabled = canCompute
        if canCompute:
            self.ui.computeButton.toolTip = _("Compute and show the patient's atrophy map")
        else:
            self.ui.computeButton.toolTip = _("Select a model and a patient")

        self.ui.buildConnectomeButton.enabled = isGiven(p.runsTable) and isGiven(p.connectomeFolder) and not running
        canMap = (isGiven(p.connectomeFolder) and isGiven(p.patientCohortTable) and isGiven(p.modelFile)
                  and isGiven(p.networkOutputFolder) and not running)
        self.ui.mapNetworksButton.enabled = canMap
        if canMap:
            self.ui.mapNetworksButton.toolTip = _("Map the atrophy networks of the cohort's patients "
                                                  "(runs in the background)")
        else:
            self.ui.mapNetworksButton.toolTip = _("Select a connectome, a patient cohort table, a model file "
                                                  "and an output folder")
        self.ui.loadNetworksButton.enabled = isGiven(p.networkOutputFolder) and not running
        self.ui.testOutcomeButton.enabled = (self._analysis is not None and isGiven(p.patientCohortTable)
                                             and bool(p.outcomeColumn))

    @staticmethod
    def _syncComboText(comboBox, text) -> None:
        if comboBox.currentText == text:
            return
        index = comboBox.findText(text)
        if index >= 0:
            comboBox.currentIndex = index
        elif comboBox.editable:
            comboBox.setEditText(text)

    @staticmethod
    def _fillComboBox(comboBox, items) -> None:
        wasBlocked = comboBox.blockSignals(True)
        comboBox.clear()
        comboBox.addItems(list(items))
        comboBox.blockSignals(wasBlocked)

    def _updateCohortLists(self) -> None:
        """List the patients and the numeric columns of the patient cohort table (once per table)."""
        table = self._parameterNode.patientCohortTable
        if table == self._listedCohortTable:
            return
        ids, columns = [], []
        if isGiven(table) and pathlib.Path(table).is_file():
            if not self.logic.dependenciesInstalled():
                return  # reading tables needs pandas: list the patients once it is installed
            try:
                ids = self.logic.patientIds(table)
                columns = self.logic.outcomeColumns(table)
            except (ValueError, FileNotFoundError) as error:
                logging.warning(f"AtrophyNetwork: cannot list the subjects of {table}: {error}")
        self._listedCohortTable = table
        self._fillComboBox(self.ui.patientIdComboBox, ids)
        self._fillComboBox(self.ui.outcomeColumnComboBox, columns)
        if ids and self._parameterNode.patientId not in ids:
            self._parameterNode.patientId = ids[0]
        if self._parameterNode.outcomeColumn not in columns:
            self._parameterNode.outcomeColumn = columns[0] if columns else ""

    def _updateConnectomeInfo(self) -> None:
        """Describe the chosen connectome store (once per folder)."""
        folder = self._parameterNode.connectomeFolder
        if folder == self._listedConnectome:
            return
        text = ""
        if isGiven(folder) and pathlib.Path(folder).is_dir():
            if not self.logic.dependenciesInstalled():
                return
            text = self._connectomeText(folder)
        self._listedConnectome = folder
        self.ui.connectomeInfoLabel.text = text

    def _connectomeText(self, folder) -> str:
        if not (pathlib.Path(folder) / "connectome.json").is_file():
            return _("No connectome in this folder yet: build one from a runs table.")
        try:
            info = self.logic.connectomeInfo(folder)
        except (ValueError, FileNotFoundError) as error:
            return str(error)
        return _("{space} connectome: {subjects} subjects, {nodes} nodes with signal ({dtype}).").format(
            space=info["space"], subjects=info["n_subjects"], nodes=info["n_valid_nodes"], dtype=info["dtype"])

    def onPatientIdChanged(self, text) -> None:
        if self._parameterNode and not self._updatingGui and self._parameterNode.patientId != text:
            self._parameterNode.patientId = text

    def onRegionChanged(self, text) -> None:
        if not self._parameterNode or self._updatingGui:
            return
        if self._parameterNode.region != text:
            self._parameterNode.region = text
        self._showCentileCurves()

    def onNetworkPatientChanged(self, text) -> None:
        if self._parameterNode and not self._updatingGui and text and self._parameterNode.networkPatient != text:
            self._parameterNode.networkPatient = text

    def onOutcomeColumnChanged(self, text) -> None:
        if self._parameterNode and not self._updatingGui and self._parameterNode.outcomeColumn != text:
            self._parameterNode.outcomeColumn = text

    def onOutcomeTargetChanged(self, text) -> None:
        if self._parameterNode and not self._updatingGui and text and self._parameterNode.outcomeTarget != text:
            self._parameterNode.outcomeTarget = text

    # ------------------------------------------------------------ background jobs

    def _startJob(self, job, kind, progressBar, statusLabel, onSuccess) -> None:
        """Follow a started ``neuroatrophy.jobs.Job`` in a progress bar; ``onSuccess()`` when it succeeds."""
        self._job = job
        self._jobKind = kind
        self._jobView = (progressBar, statusLabel)
        self._jobOnSuccess = onSuccess
        progressBar.value = 0
        progressBar.visible = True
        statusLabel.text = _("Starting...")
        self._jobTimer.start()
        self._updateButtons()

    def onCancelJobButton(self) -> None:
        if self._job is not None:
            self._jobView[1].text = _("Cancelling...")
            self._job.cancel()

    def _pollJob(self) -> None:
        job = self._job
        if job is None:
            self._jobTimer.stop()
            return
        progressBar, statusLabel = self._jobView
        finished = not job.running  # read before polling: then every event is already queued
        for event in job.poll():
            if "progress" in event:
                progressBar.value = round(100 * event["progress"])
                statusLabel.text = event["message"]
            elif "log" in event:
                logging.info(f"neuroatrophy {self._jobKind}: {event['log']}")
            elif "error" in event:
                logging.error(f"neuroatrophy {self._jobKind}: {event['error']}")
        if finished:
            self._jobTimer.stop()
            self._job = None
            self._onJobFinished(job)
            if self._parameterNode:
                self._updateButtons()

    def _onJobFinished(self, job) -> None:
        progressBar, statusLabel = self._jobView
        progressBar.visible = False
        cancelled, failed, failure = {
            "fit": (_("Fitting cancelled."), _("Fitting failed."), _("Fitting the normative model failed.")),
            "connectome": (_("Connectome build cancelled."), _("Connectome build failed."),
                           _("Building the connectome failed.")),
            "network": (_("Network mapping cancelled."), _("Network mapping failed."),
                        _("Mapping the atrophy networks failed.")),
        }[self._jobKind]
        if job.cancelled:
            statusLabel.text = cancelled
            return
        if job.returncode != 0:
            statusLabel.text = failed
            slicer.util.errorDisplay(failure, detailedText=job.error or "")
            return
        self._jobOnSuccess()

    # --------------------------------------------------------------- fitting

    def onFitButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start fitting the normative model."), waitCursor=True):
            self.logic.ensureDependencies()
            p = self._parameterNode
            job = self.logic.startFit(p.controlCohortTable, p.subjectsDirectory, p.modelFile,
                                      heteroskedastic=p.heteroskedastic, warp=p.warp)
            modelFile = p.modelFile
            self._startJob(job, "fit", self.ui.fitProgressBar, self.ui.fitStatusLabel,
                           lambda: self._onFitSucceeded(modelFile))

    def _onFitSucceeded(self, modelFile) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to load the fitted model."), waitCursor=True):
            self._setModel(self.logic.loadModel(modelFile), modelFile)

    def onLoadModelButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to load the normative model."), waitCursor=True):
            self.logic.ensureDependencies()
            modelFile = self._parameterNode.modelFile
            self._setModel(self.logic.loadModel(modelFile), modelFile)

    def _setModel(self, model, modelFile) -> None:
        self._model = model
        self._modelFile = pathlib.Path(modelFile)
        low, high = model.regional.age_range_
        self.ui.fitStatusLabel.text = _("Model {name}: sites {sites}; ages {low:.0f} to {high:.0f} years.").format(
            name=self._modelFile.name, sites=", ".join(model.sites_), low=low, high=high)
        table = self.logic.showFitQuality(modelFile)
        if table is not None:
            self.ui.fitQualityTableView.setMRMLTableNode(table)
        self.ui.fitQualityTableView.visible = table is not None
        region = self._parameterNode.region if self._parameterNode else ""
        self._updatingGui = True
        try:
            self.ui.regionComboBox.clear()
            self.ui.regionComboBox.addItems(model.region_names)
            self._syncComboText(self.ui.regionComboBox, region)
        finally:
            self._updatingGui = False
        self._updateButtons()

    # ------------------------------------------------------------ patient map

    def onComputeButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to compute the atrophy map."), waitCursor=True):
            self.logic.ensureDependencies()
            p = self._parameterNode
            if self._model is None or self._modelFile != pathlib.Path(p.modelFile):
                self._setModel(self.logic.loadModel(p.modelFile), p.modelFile)
            if p.patientSource == PATIENT_FROM_FILES:
                patient = {"lhFile": p.lhThicknessFile, "rhFile": p.rhThicknessFile, "age": p.patientAge,
                           "sex": p.patientSex, "site": p.patientSite or None}
            else:
                patient = {"patientId": p.patientId, "cohortTable": p.patientCohortTable,
                           "subjectsDirectory": p.subjectsDirectory}
            self._patientMap = self.logic.computePatientMap(
                self._model, threshold=p.zThreshold, minClusterSize=p.minClusterSize, **patient)
            nodes = self.logic.showPatientMap(self._patientMap, surface=p.surface)
            self._appliedThreshold = (p.zThreshold, p.minClusterSize)
            p.outputModel = nodes["model"]
            self.ui.regionsTableView.setMRMLTableNode(nodes["regions_table"])
            self._showSummary(self._patientMap.subject_id, self._patientMap.atrophy)
            slicer.util.resetThreeDViews()
            p.region = self._patientMap.regions["region"].iloc[0]  # the most atrophic region
            self._showCentileCurves()

    def _applyThresholdChange(self) -> None:
        """Re-threshold the shown map when the threshold or the cluster size changes (fast: no model involved)."""
        p = self._parameterNode
        if p is None or self._appliedThreshold is None or p.outputModel is None:
            return
        wanted = (p.zThreshold, p.minClusterSize)
        if wanted == self._appliedThreshold:
            return
        self._appliedThreshold = wanted
        try:
            atrophyMap = self.logic.updateThreshold(p.outputModel, p.zThreshold, p.minClusterSize)
        except ValueError as error:  # e.g. a model that is not an atrophy map was selected
            logging.warning(f"AtrophyNetwork: {error}")
            return
        import neuroatrophy.scene

        self._showSummary(p.outputModel.GetAttribute(neuroatrophy.scene.ATTRIBUTE_SUBJECT) or "", atrophyMap)

    def _showSummary(self, subjectId, atrophyMap) -> None:
        self.ui.patientSummaryLabel.text = _("{subject}: {vertices} atrophic vertices in {clusters} clusters.").format(
            subject=subjectId, vertices=atrophyMap.n_atrophic, clusters=atrophyMap.n_clusters)

    def _showCentileCurves(self) -> None:
        region = self._parameterNode.region if self._parameterNode else ""
        if self._model is None or not region:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to plot the centile curves."), waitCursor=True):
            if self._centileChart is not None and slicer.mrmlScene.IsNodePresent(self._centileChart):
                self.logic.removePlot(self._centileChart)
            self._centileChart = self.logic.showCentileCurves(self._model, region, self._patientMap)
            slicer.modules.plots.logic().ShowChartInLayout(self._centileChart)

    # ------------------------------------------------------------ atrophy networks

    def onBuildConnectomeButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start building the connectome."), waitCursor=True):
            self.logic.ensureDependencies()
            p = self._parameterNode
            job = self.logic.startBuildConnectome(p.runsTable, p.connectomeFolder, space=p.connectomeSpace,
                                                  globalSignal=p.globalSignal, bandpass=_bandpass(p),
                                                  tr=p.repetitionTime or None)
            folder = p.connectomeFolder
            self._startJob(job, "connectome", self.ui.networkProgressBar, self.ui.networkStatusLabel,
                           lambda: self._onConnectomeBuilt(folder))

    def _onConnectomeBuilt(self, folder) -> None:
        self.ui.networkStatusLabel.text = self._connectomeText(folder)
        if self._parameterNode is not None:
            self._listedConnectome = None  # describe the store again
            self._updateConnectomeInfo()

    def onMapNetworksButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start mapping the atrophy networks."), waitCursor=True):
            self.logic.ensureDependencies()
            p = self._parameterNode
            job = self.logic.startMapNetworks(
                p.patientCohortTable, p.subjectsDirectory, p.modelFile, p.connectomeFolder, p.networkOutputFolder,
                weighting=p.seedWeighting, tThreshold="auto" if p.autoTThreshold else p.tThreshold,
                nNull=p.nNullSeeds, zThreshold=p.zThreshold, minClusterSize=p.minClusterSize,
                targets=self._chosenTargets())
            folder = p.networkOutputFolder
            self._startJob(job, "network", self.ui.networkProgressBar, self.ui.networkStatusLabel,
                           lambda: self._loadNetworks(folder))

    def onLoadNetworksButton(self) -> None:
        self._loadNetworks(self._parameterNode.networkOutputFolder)

    def _loadNetworks(self, folder) -> None:
        if self._parameterNode is None:  # the scene was closed while the job ran
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to load the atrophy networks."), waitCursor=True):
            self.logic.ensureDependencies()
            self._setAnalysis(self.logic.loadNetworkAnalysis(folder), folder)

    def _setAnalysis(self, analysis, folder) -> None:
        """Show a network analysis: summary, networks, convergence, targets, target connectivity."""
        self._removeShownNetworkResults()
        self._analysis = analysis
        self._analysisFolder = pathlib.Path(folder)
        p = self._parameterNode
        self.ui.networkStatusLabel.text = _(
            "{patients} atrophy networks at |t| > {threshold:.2f} in a {space} connectome of {subjects} "
            "subjects.").format(patients=len(analysis.patients), threshold=analysis.networks.threshold,
                                space=analysis.space, subjects=analysis.maps.n_subjects)
        self._tableNodes = {"summary": self.logic.showNetworkSummary(analysis),
                            "connectivity": self.logic.showTargetConnectivity(analysis)}
        self.ui.networkSummaryTableView.setMRMLTableNode(self._tableNodes["summary"])
        self.ui.targetConnectivityTableView.setMRMLTableNode(self._tableNodes["connectivity"])
        if len(analysis.targets):
            self._targetNodes = self.logic.showTargets(analysis.targets, replace=self._targetNodes)
        targets = [str(column) for column in analysis.target_connectivity.columns]
        self._fillComboBox(self.ui.networkPatientComboBox, analysis.patients)
        self._fillComboBox(self.ui.outcomeTargetComboBox, targets)
        if p.networkPatient not in analysis.patients:
            p.networkPatient = analysis.patients[0]
        if targets and p.outcomeTarget not in targets:
            p.outcomeTarget = targets[0]
        self._onParameterNodeModified()  # shows the network and the convergence

    def _removeShownNetworkResults(self) -> None:
        """Remove the nodes showing the previous analysis (they would mix two analyses)."""
        if self._outcomeNodes and slicer.mrmlScene.IsNodePresent(self._outcomeNodes["chart"]):
            self.logic.removePlot(self._outcomeNodes["chart"])
        for nodes in (self._networkNodes, self._convergenceNodes, self._targetNodes, self._tableNodes,
                      self._outcomeNodes):
            if nodes:
                self.logic.removeNodes(nodes)
        self._resetNetworkState()

    def _applyNetworkPatient(self) -> None:
        """Show the chosen patient's network when the patient, the surface or the analysis changes."""
        p = self._parameterNode
        if p is None or self._analysis is None or p.networkPatient not in self._analysis.patients:
            return
        wanted = (p.networkPatient, p.surface)  # reset with every new analysis
        if wanted == self._shownNetwork:
            return
        self._shownNetwork = wanted
        with slicer.util.tryWithErrorDisplay(_("Failed to show the atrophy network."), waitCursor=True):
            self._networkNodes = self.logic.showNetwork(self._analysis, p.networkPatient, surface=p.surface,
                                                        replace=self._networkNodes)
            self._bringToFront(self._networkNodes, self._convergenceNodes)

    def _applyConvergence(self) -> None:
        """Show the convergence map: re-threshold in place when only the fraction changed."""
        p = self._parameterNode
        if p is None or self._analysis is None:
            return
        shown = (p.convergenceSign, p.specificConvergence, p.surface)  # reset with every new analysis
        if self._shownConvergence is not None and self._shownConvergence[0] == shown:
            if self._convergenceNodes and self._shownConvergence[1] != p.convergenceFraction:
                self._shownConvergence = (shown, p.convergenceFraction)
                self.logic.updateConvergenceFraction(self._convergenceNodes["node"], p.convergenceFraction)
                self._bringToFront(self._convergenceNodes, self._networkNodes)
            return
        self._shownConvergence = (shown, p.convergenceFraction)
        try:
            self._convergenceNodes = self.logic.showConvergence(
                self._analysis, p.convergenceSign, p.convergenceFraction, specific=p.specificConvergence,
                folder=self._analysisFolder, surface=p.surface, replace=self._convergenceNodes)
        except (ValueError, FileNotFoundError) as error:  # e.g. no specificity-filtered map: say so, no pop-up
            if self._convergenceNodes:
                self.logic.removeNodes(self._convergenceNodes)  # not another map in its place
            self._convergenceNodes = None
            self.ui.convergentRegionsTableView.setMRMLTableNode(None)
            self.ui.convergenceStatusLabel.text = str(error)
            return
        self.ui.convergenceStatusLabel.text = ""
        self.ui.convergentRegionsTableView.setMRMLTableNode(self._convergenceNodes["regions_table"])
        self._bringToFront(self._convergenceNodes, self._networkNodes)

    @staticmethod
    def _bringToFront(shown, other) -> None:
        """Show one result (surface model or volume) in the views, hiding the other model."""
        if not shown:
            return
        node = shown["node"]
        if node.IsA("vtkMRMLModelNode"):
            node.SetDisplayVisibility(True)
            if other and slicer.mrmlScene.IsNodePresent(other["node"]) and other["node"].IsA("vtkMRMLModelNode"):
                other["node"].SetDisplayVisibility(False)
        else:
            slicer.util.setSliceViewerLayers(background=node, fit=True)

    # ------------------------------------------------------------ targets and outcome

    def _chosenTargets(self):
        """Targets for the network job: None for the standard ones only, else a list (maybe empty)."""
        p = self._parameterNode
        markups = p.userTargetsMarkups
        if markups is not None and markups.GetNumberOfControlPoints() == 0:
            markups = None
        table = p.userTargetsFile if isGiven(p.userTargetsFile) else None
        if markups is None and table is None:
            return None if p.standardTargets else []
        return self.logic.networkTargets(markups=markups, targetsFile=table, standard=p.standardTargets)

    def onShowTargetsButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to show the targets."), waitCursor=True):
            self.logic.ensureDependencies()
            targets = self._chosenTargets()
            targets = self.logic.networkTargets() if targets is None else targets
            if not targets:
                raise ValueError(_("No targets chosen."))
            self._targetNodes = self.logic.showTargets(targets, replace=self._targetNodes)

    def onTestOutcomeButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to test the association with outcome."), waitCursor=True):
            p = self._parameterNode
            connectivity = self._analysis.target_connectivity
            self._outcomeResults = self.logic.testOutcome(
                connectivity, p.patientCohortTable, p.outcomeColumn, covariates=self.logic.covariateNames(p.covariates),
                nPermutations=p.nPermutations, method=p.outcomeMethod)
            self._outcomeValues = self.logic.outcomeValues(p.patientCohortTable, p.outcomeColumn)
            self._shownOutcomeTarget = None
            self._applyOutcomeTarget()

    def _applyOutcomeTarget(self) -> None:
        """Plot the chosen target's connectivity against outcome (after a test, or when the target changes)."""
        p = self._parameterNode
        if p is None or self._outcomeResults is None or not p.outcomeTarget:
            return
        if p.outcomeTarget == self._shownOutcomeTarget:
            return
        self._shownOutcomeTarget = p.outcomeTarget
        with slicer.util.tryWithErrorDisplay(_("Failed to plot connectivity against outcome."), waitCursor=True):
            previous = self._outcomeNodes
            if previous is not None and slicer.mrmlScene.IsNodePresent(previous["chart"]):
                self.logic.removePlot(previous["chart"])
            self._outcomeNodes = self.logic.showOutcome(
                self._outcomeResults, self._analysis.target_connectivity, self._outcomeValues, p.outcomeTarget,
                resultsTable=previous["results_table"] if previous else None)
            self.ui.outcomeResultsTableView.setMRMLTableNode(self._outcomeNodes["results_table"])
            slicer.modules.plots.logic().ShowChartInLayout(self._outcomeNodes["chart"])


#
# AtrophyNetworkLogic
#


class AtrophyNetworkLogic(ScriptedLoadableModuleLogic):
    """Computations of the module, usable without the GUI (see the module docstring for an example).

    Paths may be ``str`` or ``pathlib.Path``; empty paths (``""`` or ``Path()``) count as not given.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._dependenciesChecked = False

    def getParameterNode(self):
        return AtrophyNetworkParameterNode(super().getParameterNode())

    # ------------------------------------------------------------ dependencies

    @staticmethod
    def requirementsPath() -> pathlib.Path:
        return pathlib.Path(__file__).parent / "Resources" / "requirements.txt"

    def dependenciesInstalled(self) -> bool:
        """True if every package of ``Resources/requirements.txt`` is installed (checks metadata only)."""
        return dependenciesInstalled(self.requirementsPath())

    def ensureDependencies(self) -> None:
        """Install missing Python packages, after asking the user. Call before using the library.

        Raises
        ------
        RuntimeError
            If the user declines the installation.
        """
        if self._dependenciesChecked:
            return
        ensureDependencies(self.requirementsPath(), requester="AtrophyNetwork")
        self._dependenciesChecked = True

    # ---------------------------------------------------------------- fitting

    @staticmethod
    def fitArguments(controlCohortTable, subjectsDirectory, modelFile, heteroskedastic=False, warp=False) -> list:
        """Arguments of ``neuroatrophy fit`` for these settings."""
        if not isGiven(controlCohortTable):
            raise ValueError(_("No control cohort table given."))
        if not isGiven(modelFile):
            raise ValueError(_("No model file given."))
        args = ["fit", "--cohort", str(controlCohortTable), "--out", str(modelFile)]
        if isGiven(subjectsDirectory):
            args += ["--subjects-dir", str(subjectsDirectory)]
        if heteroskedastic:
            args.append("--heteroskedastic")
        if warp:
            args += ["--warp", "sinharcsinh"]
        return args

    def startFit(self, controlCohortTable, subjectsDirectory, modelFile, heteroskedastic=False, warp=False):
        """Start ``neuroatrophy fit`` in a background process; returns the running ``neuroatrophy.jobs.Job``."""
        args = self.fitArguments(controlCohortTable, subjectsDirectory, modelFile, heteroskedastic, warp)
        return self._startJob(args)

    def fitModel(self, controlCohortTable, subjectsDirectory, modelFile, heteroskedastic=False, warp=False,
                 wait=True, progressCallback=None):
        """Fit a normative model of cortical thickness on the controls of a cohort table.

        Parameters
        ----------
        controlCohortTable : str or pathlib.Path
            Cohort table; rows whose ``group`` is ``control`` are used (all rows if there is no group).
        subjectsDirectory : str or pathlib.Path or None
            FreeSurfer subjects folder (not needed if the table has ``lh_file``/``rh_file``).
        modelFile : str or pathlib.Path
            Model file to write.
        heteroskedastic, warp : bool
            Model options (age-dependent spread; SinhArcsinh warp).
        wait : bool
            True: block until the fit ends and return the loaded model (for scripts).
            False: return the running job at once (poll it with ``job.poll()``).
        progressCallback : callable, optional
            With ``wait=True``, called as ``progressCallback(fraction, message)``.

        Raises
        ------
        RuntimeError
            If the fit fails (the message is the command's error).
        """
        self.ensureDependencies()
        job = self.startFit(controlCohortTable, subjectsDirectory, modelFile, heteroskedastic, warp)
        if not wait:
            return job
        self._waitForJob(job, "fit", progressCallback, _("Fitting the normative model failed."))
        return self.loadModel(modelFile)

    def loadModel(self, modelFile):
        """Read a normative model file (``neuroatrophy.thickness_model.CorticalThicknessModel``)."""
        if not isGiven(modelFile):
            raise ValueError(_("No model file given."))
        self.ensureDependencies()
        from neuroatrophy.thickness_model import CorticalThicknessModel

        return CorticalThicknessModel.load(pathlib.Path(modelFile))

    @staticmethod
    def fitQuality(modelFile):
        """Fit quality written next to the model by ``neuroatrophy fit``: ``(metrics DataFrame, calibration)``.

        Returns None if the model was fitted without held-out controls (no quality file).
        """
        import json

        import pandas as pd

        qualityFile = pathlib.Path(modelFile).with_suffix(".quality.json")
        if not qualityFile.is_file():
            return None
        summary = json.loads(qualityFile.read_text(encoding="utf-8"))
        return pd.DataFrame([summary.get("median", {})]), summary.get("calibration", {})

    def showFitQuality(self, modelFile):
        """Table node summarising the model's fit quality on held-out controls, or None if unknown."""
        import neuroatrophy.scene

        quality = self.fitQuality(modelFile)
        if quality is None:
            return None
        return neuroatrophy.scene.show_fit_quality(slicer.mrmlScene, *quality,
                                                    name=f"{pathlib.Path(modelFile).stem} fit quality")

    # ------------------------------------------------------------ patient map

    def patientIds(self, cohortTable) -> list:
        """Subject IDs of a cohort table: its non-controls if it has a ``group`` column, else all."""
        from neuroatrophy.cohort import read_cohort, split_groups

        cohort = read_cohort(pathlib.Path(cohortTable))
        if "group" in cohort.columns:
            cohort = split_groups(cohort)[1]
        return [str(s) for s in cohort["subject_id"]]

    def computePatientMap(self, model, patientId=None, cohortTable=None, subjectsDirectory=None, lhFile=None,
                          rhFile=None, age=None, sex=None, site=None, threshold=-1.96, minClusterSize=20):
        """A patient's personalized atrophy map (``neuroatrophy.thickness_model.PatientMap``).

        The patient is either a row of a cohort table (``patientId`` + ``cohortTable``, thickness
        files from the table's ``lh_file``/``rh_file`` or found in ``subjectsDirectory``), or two
        thickness files on fsaverage5 (``lhFile`` + ``rhFile``) with ``age``, ``sex`` and ``site``
        (default: the model's first site).

        Raises
        ------
        ValueError
            If the patient is not fully specified, not in the table, or the data do not fit the model.
        """
        self.ensureDependencies()
        import numpy as np
        import pandas as pd

        if isGiven(lhFile) or isGiven(rhFile):
            if not (isGiven(lhFile) and isGiven(rhFile)):
                raise ValueError(_("Give both the left and the right hemisphere thickness files."))
            if age is None or sex is None:
                raise ValueError(_("A patient given by files needs an age and a sex."))
            from neuroatrophy.io import read_surface_data

            y = np.concatenate([read_surface_data(pathlib.Path(lhFile)), read_surface_data(pathlib.Path(rhFile))])
            if not site:
                site = model.sites_[0]
                logging.warning(f"AtrophyNetwork: no site given for the patient; using the model's site '{site}'")
            subjectId = patientId or _subjectFromFile(lhFile)
            covariates = pd.DataFrame({"subject_id": [str(subjectId)], "age": [float(age)], "sex": [str(sex)],
                                       "site": [str(site)]})
        elif patientId and isGiven(cohortTable):
            from neuroatrophy.cohort import read_cohort
            from neuroatrophy.io import load_cohort_surface_data

            cohort = read_cohort(pathlib.Path(cohortTable))
            covariates = cohort[cohort["subject_id"] == str(patientId)]
            if covariates.empty:
                raise ValueError(f"Subject '{patientId}' is not in the cohort table {cohortTable}")
            subjects = pathlib.Path(subjectsDirectory) if isGiven(subjectsDirectory) else None
            y = load_cohort_surface_data(covariates, subjects)[0]
        else:
            raise ValueError(_("Give a patient ID and a cohort table, or two thickness files."))
        return model.patient_map(y, covariates, threshold=threshold, min_cluster_size=minClusterSize)

    def showPatientMap(self, patientMap, surface="inflated"):
        """Show a patient map in the scene; returns the nodes (``model``, ``color_table``, ``regions_table``)."""
        import neuroatrophy.scene

        return neuroatrophy.scene.show_patient_map(slicer.mrmlScene, patientMap, surface_kind=surface)

    def updateThreshold(self, modelNode, threshold, minClusterSize=None):
        """Re-threshold a shown patient map; returns the new ``AtrophyMap``."""
        import neuroatrophy.scene

        return neuroatrophy.scene.update_threshold(modelNode, threshold, minClusterSize)

    def showCentileCurves(self, model, region, patientMap=None):
        """Chart of a region's normative centile curves with the patient's value; returns the chart node."""
        import neuroatrophy.scene

        return neuroatrophy.scene.show_centile_curves(slicer.mrmlScene, model, region, patient_map=patientMap)

    def removePlot(self, chartNode) -> None:
        """Remove a chart made by :meth:`showCentileCurves` with its series and tables."""
        import neuroatrophy.scene

        neuroatrophy.scene.remove_plot(slicer.mrmlScene, chartNode)

    def removeNodes(self, nodes) -> None:
        """Remove shown results (a dict or list of nodes, e.g. from :meth:`showNetwork`); colour tables stay."""
        from neuroatrophy import mrml

        mrml.remove_nodes(slicer.mrmlScene, list(nodes.values()) if isinstance(nodes, dict) else list(nodes))

    # ------------------------------------------------------------ connectome

    def connectomeInfo(self, connectomeFolder) -> dict:
        """Summary of a connectome store (space, number of subjects and nodes, preprocessing)."""
        self.ensureDependencies()
        from neuroatrophy.connectome import ConnectomeStore

        return ConnectomeStore.open(pathlib.Path(connectomeFolder)).info()

    @staticmethod
    def buildConnectomeArguments(runsTable, connectomeFolder, space="fsaverage5", globalSignal=False,
                                 bandpass=None, tr=None) -> list:
        """Arguments of ``neuroatrophy connectome build`` for these settings.

        ``bandpass`` is ``(low, high)`` in Hz, None or 0 for no bound; it needs ``tr`` (seconds).
        """
        if not isGiven(runsTable):
            raise ValueError(_("No runs table given."))
        if not isGiven(connectomeFolder):
            raise ValueError(_("No connectome folder given."))
        if space not in CONNECTOME_SPACES:
            raise ValueError(f"space must be one of {CONNECTOME_SPACES}, got {space!r}")
        args = ["connectome", "build", "--runs", str(runsTable), "--out", str(connectomeFolder), "--space", space]
        if globalSignal:
            args.append("--global-signal")
        if bandpass is not None:
            low, high = (0.0 if bound is None else float(bound) for bound in bandpass)
            args += ["--bandpass", repr(low), repr(high)]
        if tr is not None:
            args += ["--tr", repr(float(tr))]
        return args

    def startBuildConnectome(self, runsTable, connectomeFolder, space="fsaverage5", globalSignal=False,
                             bandpass=None, tr=None):
        """Start ``neuroatrophy connectome build`` in a background process; returns the running job.

        An existing store in ``connectomeFolder`` is resumed or extended (same options required).
        """
        args = self.buildConnectomeArguments(runsTable, connectomeFolder, space, globalSignal, bandpass, tr)
        return self._startJob(args)

    def buildConnectome(self, runsTable, connectomeFolder, space="fsaverage5", globalSignal=False, bandpass=None,
                        tr=None, wait=True, progressCallback=None):
        """Build (or resume, or extend) a normative connectome store from a table of resting-state runs.

        Parameters
        ----------
        runsTable : str or pathlib.Path
            CSV/TSV with ``subject_id`` and ``lh_file``/``rh_file`` (fsaverage5) or ``volume_file``
            (MNI152-2mm), optionally ``confounds_file``; paths relative to the table.
        connectomeFolder : str or pathlib.Path
            Store to create (or to resume or extend).
        space : {"fsaverage5", "MNI152-2mm"}
        globalSignal : bool
            Regress the global signal.
        bandpass : (low, high), optional
            Band-pass in Hz (None or 0 for no bound); needs ``tr``.
        tr : float, optional
            Repetition time in seconds.
        wait, progressCallback :
            As in :meth:`fitModel`: with ``wait=False`` the running job is returned.

        Returns
        -------
        neuroatrophy.connectome.ConnectomeStore or neuroatrophy.jobs.Job

        Raises
        ------
        RuntimeError
            If the build fails (the message is the command's error).
        """
        self.ensureDependencies()
        job = self.startBuildConnectome(runsTable, connectomeFolder, space, globalSignal, bandpass, tr)
        if not wait:
            return job
        self._waitForJob(job, "connectome build", progressCallback, _("Building the connectome failed."))
        from neuroatrophy.connectome import ConnectomeStore

        return ConnectomeStore.open(pathlib.Path(connectomeFolder))

    # ------------------------------------------------------------ atrophy networks

    @staticmethod
    def networkArguments(cohortTable, subjectsDirectory, modelFile, connectomeFolder, outputFolder,
                         weighting="binary", tThreshold="auto", nNull=40, zThreshold=-1.96, minClusterSize=20,
                         targetsFile=None, patientIds=None) -> list:
        """Arguments of ``neuroatrophy network`` for these settings.

        ``tThreshold`` is ``"auto"`` (Bonferroni) or a positive |t|; ``targetsFile`` is None (standard
        targets), ``"none"`` (no targets) or a CSV of targets; ``patientIds`` restricts the analysis
        to these subjects (default: the table's non-controls).
        """
        for value, what in ((cohortTable, _("cohort table")), (modelFile, _("model file")),
                            (connectomeFolder, _("connectome folder")), (outputFolder, _("output folder"))):
            if not isGiven(value):
                raise ValueError(_("No {what} given.").format(what=what))
        if weighting not in SEED_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {SEED_WEIGHTINGS}, got {weighting!r}")
        if tThreshold != "auto":
            try:
                tThreshold = float(tThreshold)
            except (TypeError, ValueError):
                tThreshold = float("nan")
            if not tThreshold > 0:
                raise ValueError(f"tThreshold must be 'auto' or a positive number, got {tThreshold!r}")
        if int(nNull) < 0:
            raise ValueError(f"nNull must be 0 or more, got {nNull!r}")
        args = ["network", "--cohort", str(cohortTable), "--model", str(modelFile), "--connectome",
                str(connectomeFolder), "--out", str(outputFolder), "--weighting", weighting,
                "--t-threshold", tThreshold if tThreshold == "auto" else repr(tThreshold),
                "--n-null", str(int(nNull)), "--threshold", repr(float(zThreshold)),
                "--min-cluster-size", str(int(minClusterSize))]
        if isGiven(subjectsDirectory):
            args += ["--subjects-dir", str(subjectsDirectory)]
        if targetsFile is not None:
            args += ["--targets", str(targetsFile)]
        if patientIds:
            args += ["--subject", *[str(patient) for patient in patientIds]]
        return args

    def startMapNetworks(self, cohortTable, subjectsDirectory, modelFile, connectomeFolder, outputFolder,
                         weighting="binary", tThreshold="auto", nNull=40, zThreshold=-1.96, minClusterSize=20,
                         targets=None, patientIds=None):
        """Start ``neuroatrophy network`` in a background process; returns the running job.

        ``targets``: None for the standard targets, a list of ``neuroatrophy.targets.Target``
        (e.g. from :meth:`networkTargets`; written to ``requested_targets.csv`` in the output
        folder for the command), or ``[]`` for none.
        """
        targetsFile = None
        if targets is not None and len(targets) == 0:
            targetsFile = "none"
        elif targets is not None:
            targetsFile = self.writeTargets(targets, pathlib.Path(outputFolder) / REQUESTED_TARGETS_FILE)
        args = self.networkArguments(cohortTable, subjectsDirectory, modelFile, connectomeFolder, outputFolder,
                                     weighting, tThreshold, nNull, zThreshold, minClusterSize, targetsFile,
                                     patientIds)
        return self._startJob(args)

    def mapNetworks(self, cohortTable, subjectsDirectory, modelFile, connectomeFolder, outputFolder,
                    weighting="binary", tThreshold="auto", nNull=40, zThreshold=-1.96, minClusterSize=20,
                    targets=None, patientIds=None, wait=True, progressCallback=None):
        """Map the atrophy networks of a cohort's patients in a normative connectome.

        Each patient's atrophy map (the model's z-scores below ``zThreshold`` in clusters of at
        least ``minClusterSize`` vertices) seeds the connectome; the seed's t-map thresholded at
        ``tThreshold`` is the patient's network. Results are written to ``outputFolder``.

        Parameters
        ----------
        cohortTable, subjectsDirectory, modelFile :
            As in :meth:`computePatientMap`; the table's non-controls are the patients.
        connectomeFolder : str or pathlib.Path
            Connectome store (:meth:`buildConnectome`).
        outputFolder : str or pathlib.Path
            Folder for the results (see ``NetworkAnalysis.save``).
        weighting : {"binary", "abs_z"}
            Seed weights: atrophic vertices, or |z| on atrophic vertices.
        tThreshold : "auto" or float
            Network |t| threshold; "auto" is Bonferroni p < 0.05 over the connectome's nodes.
        nNull : int
            Matched random seeds per patient for the specificity test (0: none; at least 20, since a
            node is specific when fewer than 5 % of the nulls reach its t).
        targets : list of Target, optional
            See :meth:`startMapNetworks`.
        patientIds : list of str, optional
            Subjects to analyse (default: all non-controls).
        wait, progressCallback :
            As in :meth:`fitModel`: with ``wait=False`` the running job is returned.

        Returns
        -------
        neuroatrophy.network_analysis.NetworkAnalysis or neuroatrophy.jobs.Job

        Raises
        ------
        RuntimeError
            If the command fails (the message is its error).
        """
        self.ensureDependencies()
        job = self.startMapNetworks(cohortTable, subjectsDirectory, modelFile, connectomeFolder, outputFolder,
                                    weighting, tThreshold, nNull, zThreshold, minClusterSize, targets, patientIds)
        if not wait:
            return job
        self._waitForJob(job, "network", progressCallback, _("Mapping the atrophy networks failed."))
        return self.loadNetworkAnalysis(outputFolder)

    def loadNetworkAnalysis(self, folder):
        """Read network results written by :meth:`mapNetworks` (``neuroatrophy.network_analysis.NetworkAnalysis``)."""
        if not isGiven(folder):
            raise ValueError(_("No network output folder given."))
        self.ensureDependencies()
        from neuroatrophy.network_analysis import NetworkAnalysis

        return NetworkAnalysis.load(pathlib.Path(folder))

    def showNetwork(self, analysis, patientId, surface="inflated", replace=None) -> dict:
        """Show a patient's t-map and network (surface model, or volumes for an MNI connectome).

        ``replace``: nodes of an earlier call, removed once the new ones are shown. Returns the
        nodes (``node``, ``color_table``, and ``t_volume`` for volumes).
        """
        import neuroatrophy.network_scene

        return neuroatrophy.network_scene.show_network(slicer.mrmlScene, analysis, patientId, surface_kind=surface,
                                                       replace=replace)

    def showNetworkSummary(self, analysis, tableNode=None):
        """Table node of the per-patient network summary (network sizes, peak t, specificity)."""
        import neuroatrophy.network_scene

        return neuroatrophy.network_scene.show_network_summary(slicer.mrmlScene, analysis, table_node=tableNode)

    def showConvergence(self, analysis, sign="positive", fraction=0.75, specific=False, folder=None,
                        surface="inflated", replace=None) -> dict:
        """Show the convergence map of the positive or negative networks, thresholded at a fraction of patients.

        ``specific=True`` shows the specificity-filtered map; for an analysis loaded from a folder,
        pass that ``folder``. Returns the nodes (``node``, ``color_table``, ``regions_table``: the
        Desikan-Killiany regions by convergent fraction, None for volumes).
        """
        import neuroatrophy.network_scene

        return neuroatrophy.network_scene.show_convergence(slicer.mrmlScene, analysis, sign, fraction, specific,
                                                           folder=folder, surface_kind=surface, replace=replace)

    def updateConvergenceFraction(self, convergenceNode, fraction):
        """Re-threshold a shown convergence map (and its regions table); returns the regions table."""
        import neuroatrophy.network_scene

        return neuroatrophy.network_scene.update_convergence_fraction(convergenceNode, fraction)

    # ------------------------------------------------------------ targets and outcome

    def networkTargets(self, markups=None, targetsFile=None, standard=True) -> list:
        """Targets of an analysis: the standard rTMS targets, plus points of a markups node and rows of a CSV.

        Raises
        ------
        ValueError
            If no target is chosen or two targets share a name.
        """
        self.ensureDependencies()
        import neuroatrophy.network_scene

        table = pathlib.Path(targetsFile) if isGiven(targetsFile) else None
        return neuroatrophy.network_scene.network_targets(markups=markups, table=table, standard=standard)

    def targetsFromMarkups(self, markupsNode, radiusMm=None) -> list:
        """User targets from a point list (labels are names, positions MNI mm); 10 mm spheres by default."""
        import neuroatrophy.network_scene

        return neuroatrophy.network_scene.targets_from_markups(markupsNode, radius_mm=radiusMm)

    @staticmethod
    def writeTargets(targets, path) -> pathlib.Path:
        """Write targets to a CSV that ``neuroatrophy network --targets`` reads."""
        from neuroatrophy.io import atomic_write
        from neuroatrophy.targets import targets_table

        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            targets_table(targets).to_csv(tmp, index=False)
        return path

    def showTargets(self, targets, replace=None) -> dict:
        """Show targets (list of ``Target`` or a targets table) as labelled points and a table."""
        import neuroatrophy.network_scene

        return neuroatrophy.network_scene.show_targets(slicer.mrmlScene, targets, replace=replace)

    def showTargetConnectivity(self, analysis, method="map", tableNode=None):
        """Table node of each patient's network connectivity with each target."""
        import neuroatrophy.network_scene

        return neuroatrophy.network_scene.show_target_connectivity(slicer.mrmlScene, analysis, method=method,
                                                                   table_node=tableNode)

    def outcomeColumns(self, cohortTable) -> list:
        """Numeric columns of a cohort table that can be an outcome (all but the covariate age)."""
        from neuroatrophy.cohort import read_cohort

        import pandas as pd

        cohort = read_cohort(pathlib.Path(cohortTable))
        return [str(column) for column in cohort.columns
                if column != "age" and pd.api.types.is_numeric_dtype(cohort[column])]

    def outcomeValues(self, cohortTable, column):
        """One column of a cohort table as a Series indexed by subject_id (e.g. for :meth:`showOutcome`)."""
        from neuroatrophy.cohort import read_cohort

        cohort = read_cohort(pathlib.Path(cohortTable))
        if column not in cohort.columns:
            raise ValueError(f"Cohort table {cohortTable} has no column {column!r}; columns: {list(cohort.columns)}")
        return cohort.set_index("subject_id")[column]

    @staticmethod
    def covariateNames(text) -> list:
        """Column names from a comma-separated list, e.g. ``"age, sex"``."""
        return [name.strip() for name in str(text or "").split(",") if name.strip()]

    def testOutcome(self, connectivity, cohortTable, outcome, covariates=(), nPermutations=5000, seed=0,
                    method="pearson"):
        """Association of each target's connectivity with treatment outcome, with permutation p-values.

        Runs in Slicer's process: a few thousand permutations of a hundred patients take
        milliseconds (``neuroatrophy.outcome``), less than starting a background process.

        Parameters
        ----------
        connectivity : pandas.DataFrame
            Index subject_id, one column per target (``analysis.target_connectivity``).
        cohortTable : str or pathlib.Path
            Cohort table with the outcome and covariate columns.
        outcome : str
            Outcome column.
        covariates : sequence of str
            Covariate columns (numeric or categorical).
        nPermutations, seed, method :
            See ``neuroatrophy.outcome.target_outcome_analysis``.

        Returns
        -------
        pandas.DataFrame
            One row per target: r, p-values (parametric, permutation, FWE over targets) and,
            with covariates, the adjusted statistics.
        """
        self.ensureDependencies()
        from neuroatrophy.cohort import read_cohort
        from neuroatrophy.outcome import target_outcome_analysis

        cohort = read_cohort(pathlib.Path(cohortTable))
        return target_outcome_analysis(connectivity, cohort, outcome, covariates=list(covariates),
                                       n_permutations=int(nPermutations), seed=seed, method=method)

    def showOutcome(self, results, connectivity, outcome, target, resultsTable=None) -> dict:
        """Show outcome results as a table and a scatter plot of one target's connectivity against outcome.

        ``outcome`` holds the outcome per subject (a Series indexed by subject_id, see
        :meth:`outcomeValues`). Returns ``results_table`` and ``chart`` (scatter of patients with
        the least-squares line and its 95 % band).
        """
        import neuroatrophy.network_scene

        table = neuroatrophy.network_scene.show_outcome_results(slicer.mrmlScene, results, table_node=resultsTable)
        chart = neuroatrophy.network_scene.show_outcome_plot(slicer.mrmlScene, connectivity, outcome, target,
                                                             results=results)
        return {"results_table": table, "chart": chart}

    # ------------------------------------------------------------ jobs

    def _startJob(self, args):
        from neuroatrophy.jobs import Job

        job = Job(args, python=slicerPythonExecutable(), env=childEnvironment())
        logging.info(f"AtrophyNetwork: running {' '.join(job.command)}")
        return job.start()

    @staticmethod
    def _waitForJob(job, name, progressCallback, failure) -> None:
        """Block until a job ends, reporting progress; raise RuntimeError with its error if it failed."""

        def onEvent(event):
            if "progress" in event:
                logging.info(f"AtrophyNetwork {name}: {100 * event['progress']:.0f} % {event['message']}")
                if progressCallback is not None:
                    progressCallback(event["progress"], event["message"])
            elif "log" in event:
                logging.info(f"neuroatrophy {name}: {event['log']}")

        if job.run(on_event=onEvent) != 0:
            raise RuntimeError(job.error or failure)


#
# Helpers
#


def _subjectFromFile(path) -> str:
    """A name for a patient given by files: the subject folder of <subject>/surf/lh.thickness..., else the folder."""
    folder = pathlib.Path(path).resolve().parent
    return folder.parent.name if folder.name == "surf" else folder.name


def _bandpass(parameterNode):
    """Band-pass of the build options, ``(low, high)`` in Hz, or None when both bounds are 0 (none)."""
    low, high = parameterNode.bandpassLow, parameterNode.bandpassHigh
    return (low or None, high or None) if (low or high) else None


#
# AtrophyNetworkTest
#


class AtrophyNetworkTest(ScriptedLoadableModuleTest):
    """Runs a small synthetic cohort through the module logic, end to end."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_AtrophyNetwork_demo()
        self.setUp()
        self.test_AtrophyNetwork_networks()

    def test_AtrophyNetwork_demo(self):
        import tempfile

        import numpy as np

        self.delayDisplay("Starting the test")
        logic = AtrophyNetworkLogic()
        logic.ensureDependencies()
        from neuroatrophy.demo import make_demo_cohort, write_demo_cohort

        with tempfile.TemporaryDirectory() as folder:
            cohort = make_demo_cohort(n_controls=40, n_patients=2, n_sites=2, seed=7)
            demoFolder = write_demo_cohort(cohort, folder)
            cohortTable, subjects = demoFolder / "cohort.csv", demoFolder / "subjects"
            modelFile = pathlib.Path(folder) / "model.npz"
            self.delayDisplay("Fitting a normative model in a background process")
            model = logic.fitModel(cohortTable, subjects, modelFile, wait=True)
            self.assertTrue(modelFile.is_file())
            self.assertEqual(len(model.region_names), 68)
            self.assertIsNotNone(logic.showFitQuality(modelFile))

            patientId = logic.patientIds(cohortTable)[0]
            patientMap = logic.computePatientMap(model, patientId=patientId, cohortTable=cohortTable,
                                                 subjectsDirectory=subjects)
            nodes = logic.showPatientMap(patientMap)

        for node in nodes.values():
            self.assertTrue(slicer.mrmlScene.IsNodePresent(node))
        shownZ = slicer.util.arrayFromModelPointData(nodes["model"], "z")
        np.testing.assert_array_equal(shownZ, patientMap.z)
        patient = np.flatnonzero(cohort.covariates["subject_id"].astype(str) == patientId)[0]
        expected = model.patient_map(cohort.thickness[patient], cohort.covariates.iloc[[patient]])
        # The files hold float32 thickness, hence the tolerance.
        np.testing.assert_allclose(patientMap.z, expected.z, atol=1e-4, equal_nan=True)

        chart = logic.showCentileCurves(model, patientMap.regions["region"].iloc[0], patientMap)
        self.assertEqual(chart.GetNumberOfPlotSeriesNodes(), 6)
        self.delayDisplay("Test passed")

    def test_AtrophyNetwork_networks(self):
        """Connectome build, atrophy networks, convergence, targets and outcome through the logic."""
        import tempfile

        import numpy as np
        import pandas as pd

        self.delayDisplay("Starting the atrophy network test")
        logic = AtrophyNetworkLogic()
        logic.ensureDependencies()
        from neuroatrophy.demo import make_demo_cohort, write_demo_cohort
        from neuroatrophy.network import atrophy_seeds, seed_maps
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

            self.delayDisplay("Building a connectome in a background process")
            store = logic.buildConnectome(runsTable, folder / "connectome")
            self.assertEqual(len(store), 6)
            self.assertEqual(logic.connectomeInfo(store.path)["n_subjects"], 6)

            self.delayDisplay("Mapping the atrophy networks in a background process")
            placed = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "my targets")
            placed.AddControlPoint(_cortexPoint(), "myTarget")
            targets = logic.networkTargets(markups=placed)
            analysis = logic.mapNetworks(cohortTable, subjects, modelFile, store.path, folder / "networks",
                                         tThreshold=8.0, nNull=20, targets=targets)
            patients = logic.patientIds(cohortTable)
            self.assertEqual(analysis.patients, patients)
            self.assertEqual(analysis.networks.threshold, 8.0)
            self.assertEqual(list(analysis.target_connectivity.columns),
                             [t.name for t in standard_targets()] + ["myTarget"])

            # The library, run in this process on the same seeds, gives the same t-maps.
            maps = [logic.computePatientMap(model, patientId=patient, cohortTable=cohortTable,
                                            subjectsDirectory=subjects) for patient in patients]
            expected = seed_maps(store, *atrophy_seeds(maps), engine="numpy")
            rows = [analysis.maps.index(patient) for patient in patients]
            np.testing.assert_allclose(analysis.maps.t[rows], expected.t, rtol=1e-3, atol=1e-3, equal_nan=True)

            self.delayDisplay("Networks, convergence and targets in the scene")
            nodes = logic.showNetwork(analysis, patients[0])
            shownT = slicer.util.arrayFromModelPointData(nodes["node"], "t")
            np.testing.assert_array_equal(shownT, analysis.maps.t[rows[0]])
            second = logic.showNetwork(analysis, patients[1], replace=nodes)
            self.assertFalse(slicer.mrmlScene.IsNodePresent(nodes["node"]))
            np.testing.assert_array_equal(slicer.util.arrayFromModelPointData(second["node"], "network"),
                                          analysis.networks.signed()[1])

            convergence = logic.showConvergence(analysis, fraction=0.5)
            percent = analysis.convergence_positive
            np.testing.assert_array_equal(slicer.util.arrayFromModelPointData(convergence["node"], "convergent"),
                                          np.where(percent >= 50, percent, 0))
            regions = logic.updateConvergenceFraction(convergence["node"], 0.25)
            pd.testing.assert_frame_equal(regions, analysis.convergent_regions(0.25, "positive"))
            specific = logic.showConvergence(analysis, specific=True, folder=folder / "networks")
            self.assertEqual(specific["node"].GetName(), "Convergence (specific positive networks)")

            shownTargets = logic.showTargets(targets)
            self.assertEqual(shownTargets["markups"].GetNumberOfControlPoints(), len(targets))
            connectivity = slicer.util.dataframeFromTable(logic.showTargetConnectivity(analysis))
            np.testing.assert_allclose(connectivity["myTarget"], analysis.target_connectivity["myTarget"])

            self.delayDisplay("Target connectivity against outcome")
            results = logic.testOutcome(analysis.target_connectivity, cohortTable, "panss_change",
                                        covariates=["age"], nPermutations=200)
            self.assertEqual(list(results["target"]), list(analysis.target_connectivity.columns))
            outcome = logic.outcomeValues(cohortTable, "panss_change")
            shown = logic.showOutcome(results, analysis.target_connectivity, outcome, "myTarget")
            self.assertEqual(shown["chart"].GetNumberOfPlotSeriesNodes(), 4)
            self.assertEqual(shown["results_table"].GetNumberOfRows(), len(results))
        self.delayDisplay("Test passed")


def _writeSimulatedRuns(folder, nSubjects, nTimepoints):
    """A runs table of simulated fsaverage5 resting-state runs (``neuroatrophy.demo_connectome``), as .npy files."""
    import numpy as np
    import pandas as pd

    from neuroatrophy.demo_connectome import simulate_connectome_subjects

    folder = pathlib.Path(folder)
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
    import numpy as np

    from neuroatrophy.connectome import fsaverage5_coordinates
    from neuroatrophy.surface import dk_atlas

    atlas = dk_atlas()
    label = list(atlas.names).index("L_rostralmiddlefrontal") + 1  # label 0 is the medial wall
    vertex = int(np.flatnonzero(np.asarray(atlas.labels) == label)[0])
    return [float(c) for c in fsaverage5_coordinates()[vertex]]
