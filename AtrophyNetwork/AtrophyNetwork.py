"""AtrophyNetwork: normative models of cortical thickness and personalized atrophy maps.

A thin 3D Slicer module over the Qt-free ``neuroatrophy`` library: the widget
collects parameters, the logic calls the library, and the long normative-model fit
runs in a separate process (``neuroatrophy fit``) so that Slicer stays responsive
and the fit can be cancelled.

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
"""

import logging
import os
import pathlib
import shutil
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLModelNode
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

PATIENT_FROM_COHORT = "cohort table"
PATIENT_FROM_FILES = "thickness files"
# Milliseconds between two looks at a running fit job.
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
Normative models of cortical thickness and personalized atrophy maps.
Fit a model of how cortical thickness varies with age, sex and site in healthy controls (or load one),
then map where a patient's cortex is thinner than expected: a z-score on every vertex of the fsaverage5
surface, atrophic clusters, a regional summary and the centile curves of any Desikan-Killiany region.
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
        self._jobModelFile = None
        self._jobTimer = None
        self._model = None
        self._modelFile = None
        self._patientMap = None
        self._centileChart = None
        self._listedCohortTable = None
        self._appliedThreshold = None
        self._updatingGui = False

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
        self.ui.cancelFitButton.connect("clicked(bool)", self.onCancelFitButton)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModelButton)
        self.ui.computeButton.connect("clicked(bool)", self.onComputeButton)
        self.ui.patientIdComboBox.connect("currentTextChanged(QString)", self.onPatientIdChanged)
        self.ui.regionComboBox.connect("currentTextChanged(QString)", self.onRegionChanged)

        self.ui.cancelFitButton.visible = False
        self.ui.fitProgressBar.visible = False

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
        self._updatingGui = True
        try:
            self._updatePatientIds()
            self._syncComboText(self.ui.patientIdComboBox, self._parameterNode.patientId)
            self._syncComboText(self.ui.regionComboBox, self._parameterNode.region)
            fromFiles = self._parameterNode.patientSource == PATIENT_FROM_FILES
            self.ui.patientCohortWidget.visible = not fromFiles
            self.ui.patientFilesWidget.visible = fromFiles
            self._updateButtons()
        finally:
            self._updatingGui = False
        self._applyThresholdChange()

    def _updateButtons(self) -> None:
        p = self._parameterNode
        if p is None:
            return
        running = self._job is not None
        canFit = _isGiven(p.controlCohortTable) and _isGiven(p.modelFile) and not running
        self.ui.fitButton.enabled = canFit
        if canFit:
            self.ui.fitButton.toolTip = _("Fit the normative model on the controls (runs in the background)")
        else:
            self.ui.fitButton.toolTip = _("Select a control cohort table and a model file")
        self.ui.cancelFitButton.visible = running
        self.ui.loadModelButton.enabled = _isGiven(p.modelFile) and not running
        if p.patientSource == PATIENT_FROM_FILES:
            patientGiven = _isGiven(p.lhThicknessFile) and _isGiven(p.rhThicknessFile)
        else:
            patientGiven = _isGiven(p.patientCohortTable) and bool(p.patientId)
        haveModel = self._model is not None or _isGiven(p.modelFile)
        canCompute = patientGiven and haveModel and not running
        self.ui.computeButton.enabled = canCompute
        if canCompute:
            self.ui.computeButton.toolTip = _("Compute and show the patient's atrophy map")
        else:
            self.ui.computeButton.toolTip = _("Select a model and a patient")

    @staticmethod
    def _syncComboText(comboBox, text) -> None:
        if comboBox.currentText == text:
            return
        index = comboBox.findText(text)
        if index >= 0:
            comboBox.currentIndex = index
        elif comboBox.editable:
            comboBox.setEditText(text)

    def _updatePatientIds(self) -> None:
        """List the patients of the patient cohort table in the patient combo box (once per table)."""
        table = self._parameterNode.patientCohortTable
        if table == self._listedCohortTable:
            return
        ids = []
        if _isGiven(table) and pathlib.Path(table).is_file():
            if not self.logic.dependenciesInstalled():
                return  # reading tables needs pandas: list the patients once it is installed
            try:
                ids = self.logic.patientIds(table)
            except (ValueError, FileNotFoundError) as error:
                logging.warning(f"AtrophyNetwork: cannot list the subjects of {table}: {error}")
        self._listedCohortTable = table
        wasBlocked = self.ui.patientIdComboBox.blockSignals(True)
        self.ui.patientIdComboBox.clear()
        self.ui.patientIdComboBox.addItems(ids)
        self.ui.patientIdComboBox.blockSignals(wasBlocked)
        if ids and self._parameterNode.patientId not in ids:
            self._parameterNode.patientId = ids[0]

    def onPatientIdChanged(self, text) -> None:
        if self._parameterNode and not self._updatingGui and self._parameterNode.patientId != text:
            self._parameterNode.patientId = text

    def onRegionChanged(self, text) -> None:
        if not self._parameterNode or self._updatingGui:
            return
        if self._parameterNode.region != text:
            self._parameterNode.region = text
        self._showCentileCurves()

    # --------------------------------------------------------------- fitting

    def onFitButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start fitting the normative model."), waitCursor=True):
            self.logic.ensureDependencies()
            p = self._parameterNode
            self._job = self.logic.startFit(p.controlCohortTable, p.subjectsDirectory, p.modelFile,
                                            heteroskedastic=p.heteroskedastic, warp=p.warp)
            self._jobModelFile = p.modelFile
            self.ui.fitProgressBar.value = 0
            self.ui.fitProgressBar.visible = True
            self.ui.fitStatusLabel.text = _("Starting...")
            self._jobTimer.start()
            self._updateButtons()

    def onCancelFitButton(self) -> None:
        if self._job is not None:
            self.ui.fitStatusLabel.text = _("Cancelling...")
            self._job.cancel()

    def _pollJob(self) -> None:
        job = self._job
        if job is None:
            self._jobTimer.stop()
            return
        finished = not job.running  # read before polling: then every event is already queued
        for event in job.poll():
            if "progress" in event:
                self.ui.fitProgressBar.value = round(100 * event["progress"])
                self.ui.fitStatusLabel.text = event["message"]
            elif "log" in event:
                logging.info(f"neuroatrophy fit: {event['log']}")
            elif "error" in event:
                logging.error(f"neuroatrophy fit: {event['error']}")
        if finished:
            self._jobTimer.stop()
            self._job = None
            self._onFitFinished(job)
            if self._parameterNode:
                self._updateButtons()

    def _onFitFinished(self, job) -> None:
        self.ui.fitProgressBar.visible = False
        if job.cancelled:
            self.ui.fitStatusLabel.text = _("Fitting cancelled.")
            return
        if job.returncode != 0:
            self.ui.fitStatusLabel.text = _("Fitting failed.")
            slicer.util.errorDisplay(_("Fitting the normative model failed."), detailedText=job.error or "")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to load the fitted model."), waitCursor=True):
            self._setModel(self.logic.loadModel(self._jobModelFile), self._jobModelFile)

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
        return not _missingRequirements(_readRequirements(self.requirementsPath()))

    def ensureDependencies(self) -> None:
        """Install missing Python packages, after asking the user. Call before using the library.

        Raises
        ------
        RuntimeError
            If the user declines the installation.
        """
        if self._dependenciesChecked:
            return
        requirements = _readRequirements(self.requirementsPath())
        packaging = _slicerPackaging()
        if packaging is not None:
            # Slicer >= 5.12: asks, shows progress, offers a restart if an imported package changed.
            packaging.pip_ensure(packaging.load_requirements(str(self.requirementsPath())), requester="AtrophyNetwork")
        else:
            missing = _missingRequirements(requirements)
            if missing:
                _installWithConsent(missing)
        self._dependenciesChecked = True

    # ---------------------------------------------------------------- fitting

    @staticmethod
    def fitArguments(controlCohortTable, subjectsDirectory, modelFile, heteroskedastic=False, warp=False) -> list:
        """Arguments of ``neuroatrophy fit`` for these settings."""
        if not _isGiven(controlCohortTable):
            raise ValueError(_("No control cohort table given."))
        if not _isGiven(modelFile):
            raise ValueError(_("No model file given."))
        args = ["fit", "--cohort", str(controlCohortTable), "--out", str(modelFile)]
        if _isGiven(subjectsDirectory):
            args += ["--subjects-dir", str(subjectsDirectory)]
        if heteroskedastic:
            args.append("--heteroskedastic")
        if warp:
            args += ["--warp", "sinharcsinh"]
        return args

    def startFit(self, controlCohortTable, subjectsDirectory, modelFile, heteroskedastic=False, warp=False):
        """Start ``neuroatrophy fit`` in a background process; returns the running ``neuroatrophy.jobs.Job``."""
        from neuroatrophy.jobs import Job

        args = self.fitArguments(controlCohortTable, subjectsDirectory, modelFile, heteroskedastic, warp)
        job = Job(args, python=slicer_python_executable(), env=_childEnvironment())
        logging.info(f"AtrophyNetwork: running {' '.join(job.command)}")
        return job.start()

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

        def onEvent(event):
            if "progress" in event:
                logging.info(f"AtrophyNetwork fit: {100 * event['progress']:.0f} % {event['message']}")
                if progressCallback is not None:
                    progressCallback(event["progress"], event["message"])
            elif "log" in event:
                logging.info(f"neuroatrophy fit: {event['log']}")

        if job.run(on_event=onEvent) != 0:
            raise RuntimeError(job.error or _("Fitting the normative model failed."))
        return self.loadModel(modelFile)

    def loadModel(self, modelFile):
        """Read a normative model file (``neuroatrophy.thickness_model.CorticalThicknessModel``)."""
        if not _isGiven(modelFile):
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

        if _isGiven(lhFile) or _isGiven(rhFile):
            if not (_isGiven(lhFile) and _isGiven(rhFile)):
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
        elif patientId and _isGiven(cohortTable):
            from neuroatrophy.cohort import read_cohort
            from neuroatrophy.io import load_cohort_surface_data

            cohort = read_cohort(pathlib.Path(cohortTable))
            covariates = cohort[cohort["subject_id"] == str(patientId)]
            if covariates.empty:
                raise ValueError(f"Subject '{patientId}' is not in the cohort table {cohortTable}")
            subjects = pathlib.Path(subjectsDirectory) if _isGiven(subjectsDirectory) else None
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


#
# Helpers
#


def slicer_python_executable() -> str:
    """The ``PythonSlicer`` launcher, which runs Slicer's Python with Slicer's environment.

    Inside Slicer ``sys.executable`` is the application itself, which cannot run ``python -m``.
    """
    found = shutil.which("PythonSlicer")
    if found:
        return found
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    candidate = pathlib.Path(slicer.app.slicerHome) / "bin" / name
    if candidate.is_file():
        return str(candidate)
    raise RuntimeError(_("The PythonSlicer executable was not found (looked on PATH and in {folder}).").format(
        folder=candidate.parent))


def _subjectFromFile(path) -> str:
    """A name for a patient given by files: the subject folder of <subject>/surf/lh.thickness..., else the folder."""
    folder = pathlib.Path(path).resolve().parent
    return folder.parent.name if folder.name == "surf" else folder.name


def _childEnvironment() -> dict:
    # The launcher sets Slicer's paths itself; start it from the environment Slicer was started in.
    return slicer.util.startupEnvironment()


def _isGiven(path) -> bool:
    """False for None, "" and pathlib.Path() (which a parameter node holds for an empty path)."""
    return path is not None and str(path) not in ("", ".")


def _slicerPackaging():
    try:
        import slicer.packaging
    except ImportError:  # Slicer < 5.12
        return None
    return slicer.packaging if hasattr(slicer.packaging, "pip_ensure") else None


def _readRequirements(path) -> list:
    lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def _missingRequirements(requirements) -> list:
    """The requirements (``name>=version`` strings) that are not installed or too old."""
    import importlib.metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:
        Requirement = None
    missing = []
    for requirement in requirements:
        if Requirement is not None:
            parsed = Requirement(requirement)
            name, specifier = parsed.name, parsed.specifier
        else:
            name, specifier = requirement.split(">=")[0].strip(), None
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
            continue
        if specifier is not None and not specifier.contains(version, prereleases=True):
            missing.append(requirement)
    return missing


def _installWithConsent(missing) -> None:
    """Slicer < 5.12: ask, then install with ``slicer.util.pip_install`` behind a progress dialog."""
    question = _("AtrophyNetwork needs these Python packages, which are not installed yet:\n\n{packages}\n\n"
                 "Install them now? This may take a few minutes.").format(packages="\n".join(missing))
    if not slicer.util.confirmOkCancelDisplay(question, windowTitle=_("Install Python packages")):
        raise RuntimeError(_("AtrophyNetwork cannot run without these Python packages: {packages}").format(
            packages=", ".join(missing)))
    progress = slicer.util.createProgressDialog(labelText=_("Installing {packages}...").format(
        packages=", ".join(missing)), maximum=0)
    slicer.app.processEvents()
    try:
        slicer.util.pip_install(missing)
    finally:
        progress.close()


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
