"""BrainProgression: an individual forecast of the brain at future ages from one T1w scan (BrLP).

A thin 3D Slicer module over the Qt-free ``neuroatrophy`` library. From a baseline T1w
volume, the subject's age, sex and diagnosis (and optionally a label map for the regional
volumes and a table of earlier visits) it predicts the brain MRI at the target ages with
Brain Latent Progression (BrLP: Puglisi et al., MICCAI 2024 / Medical Image Analysis 2025),
in a separate process (``neuroatrophy progression predict``) so that Slicer stays
responsive and the forecast can be cancelled. The result comes back as a sequence over
age (prediction, voxel uncertainty, difference from the baseline, and the prediction in
the subject's space) scrubbed by one sequence browser, with the predicted regional
volumes as a table and a chart. BrLP's trained networks are not shipped: the user
downloads them (see ``neuroatrophy.progression_scene.WEIGHTS_HELP``).

Use from Slicer's Python console::

    import BrainProgression
    logic = BrainProgression.BrainProgressionLogic()
    print(logic.weightsProblem("/data/brlp-weights"))     # None when the networks are all there

    # Forecast (blocks until done; minutes per target age on CPU). startForecast returns the running job.
    nodes = logic.forecast(getNode("T1"), age=70, sex="F", diagnosis="MCI", targetAges="72, 74, 76",
                           weights="/data/brlp-weights", outputFolder="/data/sub-01/forecast",
                           labelNode=getNode("aseg"), m=4, steps=25, device="cpu")
    nodes["browser"].SetSelectedItemNumber(2)             # show the prediction at 76 years
    print(logic.tableFrame(nodes["volumes_table"]))        # predicted regional volumes (mm3)

    # Only the command line, or a forecast written earlier:
    args = logic.predictArguments("t1.nii.gz", 70, "F", "MCI", "72, 74", "/data/brlp-weights", "/tmp/out")
    nodes = logic.loadForecast("/data/sub-01/forecast")
"""

import logging
import pathlib
import threading
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode
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

SEXES = ("F", "M")
DIAGNOSES = ("CN", "MCI", "AD")
# Milliseconds between two looks at a running job (and at the device probe).
JOB_POLL_INTERVAL_MS = 200
# Oldest PyTorch the networks run with.
TORCH_REQUIREMENT = ">=2.1"
# Installed without their dependencies: they pin old torch/numpy (leaspy) or a GUI toolkit (deepbet)
# that the forecast does not need; their runtime dependencies are in Resources/requirements.txt.
NO_DEPS_REQUIREMENTS = ("leaspy>=2.1,<2.2", "deepbet>=1.0.2,<1.1")
# Opacity of the difference map over the predicted brain.
DIFFERENCE_OPACITY = 0.5
# Seconds the device probe may take (it imports torch in the job's Python).
DEVICE_PROBE_TIMEOUT_S = 120


#
# BrainProgression
#


class BrainProgression(ScriptedLoadableModule):
    """Module description (shown in Slicer's module panel)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Brain Progression")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Neuroimaging")]
        self.parent.dependencies = []
        self.parent.contributors = ["NeuroAtrophy developers"]
        self.parent.helpText = _("""
An individual forecast of the brain at future ages from one T1-weighted MRI, with Brain Latent Progression (BrLP):
a latent diffusion model conditioned on age, sex, diagnosis and regional volumes, steered by the baseline scan
through a ControlNet and by a disease-course model of the regional volumes. Several samples are averaged per age
(latent average stabilisation); their spread gives a voxel-wise uncertainty map. The forecast is shown as a
sequence over age with the difference from the baseline, and the predicted regional volumes as a table and chart.
BrLP's trained networks must be downloaded separately (links in the BrLP README).
Research use only: a forecast is not a diagnosis.
See the <a href="https://github.com/neuroatrophy/SlicerNeuroAtrophy/blob/main/docs/progression.md">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Developed by the NeuroAtrophy developers. BrLP: Puglisi et al., "Enhancing spatiotemporal disease progression
models via latent diffusion and prior knowledge", MICCAI 2024, and Medical Image Analysis 2025
(https://github.com/LemuelPuglisi/BrLP, MIT licence). Networks from MONAI; disease-course model after leaspy.
""")


#
# BrainProgressionParameterNode
#


@parameterNodeWrapper
class BrainProgressionParameterNode:
    """The parameters of the module.

    baselineVolume - T1w volume at the baseline visit.
    labelVolume - FreeSurfer/SynthSeg label map of the baseline, for the regional volumes (optional).
    age, sex, diagnosis - Covariates at the baseline visit (years; "F"/"M"; "CN"/"MCI"/"AD").
    visitsTable - CSV of earlier visits for the disease-course model (optional).
    targetAges - Ages to predict, e.g. "72, 74, 76".
    samples - Latent average stabilisation samples (m) per target age.
    ddimSteps - Denoising steps per sample.
    weights - BrLP weights folder or configuration file.
    device - "cpu" or "cuda" (set from the device combo box, whose items depend on the job's PyTorch).
    outputFolder - Folder the forecast is written to and loaded from (empty: a temporary folder).
    showDifference - Overlay the difference from the baseline on the prediction.
    """

    baselineVolume: vtkMRMLScalarVolumeNode
    labelVolume: vtkMRMLLabelMapVolumeNode
    age: Annotated[float, WithinRange(1.0, 119.0)] = 70.0
    sex: Annotated[str, Choice(list(SEXES))] = SEXES[0]
    diagnosis: Annotated[str, Choice(list(DIAGNOSES))] = DIAGNOSES[0]
    visitsTable: pathlib.Path
    targetAges: str = "72, 74, 76"
    samples: Annotated[int, WithinRange(1, 64)] = 4
    ddimSteps: Annotated[int, WithinRange(1, 1000)] = 25
    weights: pathlib.Path
    device: str = "cpu"
    outputFolder: pathlib.Path
    showDifference: bool = True


#
# BrainProgressionWidget
#


class BrainProgressionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module's panel: collects the inputs, runs the forecast as a background job, shows the result."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobFolder = None
        self._jobName = None
        self._jobTimer = None
        self._devices = None
        self._deviceTimer = None
        self._playWidget = None
        self._seekWidget = None
        self._updatingGui = False
        self._nodes = None
        self._differenceShown = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BrainProgression.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = BrainProgressionLogic()

        self._jobTimer = qt.QTimer()
        self._jobTimer.setInterval(JOB_POLL_INTERVAL_MS)
        self._jobTimer.connect("timeout()", self._pollJob)

        self._addPlayer()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.loadButton.connect("clicked(bool)", self.onLoadButton)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)

        self.ui.cancelButton.visible = False
        self.ui.progressBar.visible = False

        self.initializeParameterNode()
        self._startDeviceProbe()

    def _addPlayer(self) -> None:
        """Play and seek controls of the Sequences module, if this Slicer has them."""
        layout = qt.QVBoxLayout(self.ui.playerWidget)
        layout.setContentsMargins(0, 0, 0, 0)
        if hasattr(slicer, "qMRMLSequenceBrowserPlayWidget"):
            self._playWidget = slicer.qMRMLSequenceBrowserPlayWidget()
            self._seekWidget = slicer.qMRMLSequenceBrowserSeekWidget()
            layout.addWidget(self._playWidget)
            layout.addWidget(self._seekWidget)
        else:
            layout.addWidget(qt.QLabel(_("Use the Sequences module to step through the ages.")))

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._job is not None:
            self._job.cancel()
        for timer in (self._jobTimer, self._deviceTimer):
            if timer is not None:
                timer.stop()
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
        self._nodes = None
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

    # ---------------------------------------------------------------- devices

    def _startDeviceProbe(self) -> None:
        """Find out in the background whether the job's PyTorch sees a GPU (importing torch takes seconds)."""
        self._fillDevices(["cpu"], final=False)

        def probe():
            try:
                self._devices = self.logic.availableDevices()
            except Exception as error:  # a broken PyTorch install must not break the panel
                logging.warning(f"BrainProgression: device probe failed: {error}")
                self._devices = ["cpu"]

        threading.Thread(target=probe, name="BrainProgression-device-probe", daemon=True).start()
        self._deviceTimer = qt.QTimer()
        self._deviceTimer.setInterval(JOB_POLL_INTERVAL_MS)
        self._deviceTimer.connect("timeout()", self._checkDeviceProbe)
        self._deviceTimer.start()

    def _checkDeviceProbe(self) -> None:
        if self._devices is None:
            return
        self._deviceTimer.stop()
        self._fillDevices(self._devices, final=True)

    def _fillDevices(self, devices, final) -> None:
        """Offer ``devices``; once the probe is done (``final``) a device that is not there falls back to cpu."""
        combo = self.ui.deviceComboBox
        combo.blockSignals(True)
        combo.clear()
        for device in devices:
            combo.addItem(device)
        combo.blockSignals(False)
        p = self._parameterNode
        if final and p is not None and p.device not in devices:
            p.device = "cpu"
        self._showDevice()

    def _showDevice(self) -> None:
        p = self._parameterNode
        if p is None:
            return
        combo = self.ui.deviceComboBox
        index = combo.findText(p.device)
        if index >= 0 and index != combo.currentIndex:
            combo.blockSignals(True)
            combo.currentIndex = index
            combo.blockSignals(False)

    def onDeviceChanged(self, index=None) -> None:
        if self._parameterNode is not None and self.ui.deviceComboBox.currentText:
            self._parameterNode.device = self.ui.deviceComboBox.currentText

    # ---------------------------------------------------------------- GUI state

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._parameterNode is None or self._updatingGui:
            return
        self._updatingGui = True
        try:
            self._showDevice()
            self._updateButtons()
        finally:
            self._updatingGui = False
        if self._parameterNode.showDifference != self._differenceShown:
            self._showDifferenceLayer()

    def _inputProblems(self) -> list:
        """Why the forecast cannot start yet (empty when it can), in the order the panel asks."""
        p = self._parameterNode
        problems = []
        if p.baselineVolume is None:
            problems.append(_("Select the baseline T1w volume."))
        try:
            self.logic.targetAges(p.targetAges, p.age)
        except ValueError as error:
            problems.append(str(error))
        except ImportError:
            pass  # the library's dependencies are installed when the forecast starts
        return problems

    def _updateButtons(self) -> None:
        p = self._parameterNode
        if p is None:
            return
        running = self._job is not None
        problems = self._inputProblems()
        weightsProblem = self.logic.weightsProblem(p.weights, quiet=True)
        self.ui.weightsStatusLabel.text = weightsProblem or ""
        self.ui.weightsStatusLabel.visible = bool(weightsProblem)
        if weightsProblem:
            problems.append(_("Select BrLP's weights (see the message above)."))
        self.ui.inputStatusLabel.text = " ".join(problems)
        self.ui.applyButton.enabled = not problems and not running
        self.ui.applyButton.toolTip = (_("Predict the brain at the target ages (runs in the background)")
                                       if not problems else problems[0])
        self.ui.cancelButton.visible = running
        self.ui.progressBar.visible = running
        self.ui.loadButton.enabled = isGiven(p.outputFolder) and not running

    # ------------------------------------------------------------ background job

    def onApplyButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start the forecast."), waitCursor=True):
            p = self._parameterNode
            folder = p.outputFolder if isGiven(p.outputFolder) else self.logic.temporaryFolder() / "forecast"
            job = self.logic.startForecast(
                p.baselineVolume, p.age, p.sex, p.diagnosis, p.targetAges, p.weights, folder,
                labelNode=p.labelVolume, visits=p.visitsTable, m=p.samples, steps=p.ddimSteps, device=p.device)
            self._job, self._jobFolder = job, pathlib.Path(folder)
            self._jobName = f"{p.baselineVolume.GetName()} forecast"
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
                logging.info(f"neuroatrophy progression: {event['log']}")
            elif "error" in event:
                logging.error(f"neuroatrophy progression: {event['error']}")
        if not finished:
            return
        self._jobTimer.stop()
        self._job = None
        if job.cancelled:
            self.ui.statusLabel.text = _("Forecast cancelled.")
        elif job.returncode != 0:
            self.ui.statusLabel.text = _("Forecast failed.")
            slicer.util.errorDisplay(_("The forecast failed."), detailedText=job.error or "")
        else:
            self.ui.statusLabel.text = ""
            self._loadForecast(self._jobFolder, self._jobName)
        if self._parameterNode:
            self._updateButtons()

    # ------------------------------------------------------------ results

    def onLoadButton(self) -> None:
        self._loadForecast(self._parameterNode.outputFolder)

    def _loadForecast(self, folder, name=None) -> None:
        if self._parameterNode is None:  # the scene was closed while the job ran
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to load the forecast."), waitCursor=True):
            nodes = self.logic.loadForecast(folder, name=name)
            self._nodes = nodes
            self._setBrowser(nodes["browser"])
            self.ui.volumesTableView.setMRMLTableNode(nodes["volumes_table"])
            self.ui.resultSummaryLabel.text = self.logic.forecastSummary(nodes)
            slicer.util.setSliceViewerLayers(background=nodes["predicted_proxy"], fit=True)
            self._differenceShown = None
            self._showDifferenceLayer()
            slicer.modules.plots.logic().ShowChartInLayout(nodes["volumes_chart"])

    def _showDifferenceLayer(self) -> None:
        """The difference map over the prediction in the slice views, when asked for."""
        nodes, p = self._nodes, self._parameterNode
        if not nodes or p is None or "difference_proxy" not in nodes:
            return
        difference = nodes["difference_proxy"]
        if not slicer.mrmlScene.IsNodePresent(difference):
            return
        self._differenceShown = p.showDifference
        if p.showDifference:
            slicer.util.setSliceViewerLayers(foreground=difference, foregroundOpacity=DIFFERENCE_OPACITY)
        else:
            slicer.util.setSliceViewerLayers(foreground=None)

    def _setBrowser(self, browser) -> None:
        for widget in (self._playWidget, self._seekWidget):
            if widget is not None:
                widget.setMRMLSequenceBrowserNode(browser)


#
# BrainProgressionLogic
#


class BrainProgressionLogic(ScriptedLoadableModuleLogic):
    """Computations of the module, usable without the GUI (see the module docstring for an example).

    Paths may be ``str`` or ``pathlib.Path``; empty paths (``""`` or ``Path()``) count as not given.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._dependenciesChecked = False
        self._devices = None

    def getParameterNode(self):
        return BrainProgressionParameterNode(super().getParameterNode())

    # ------------------------------------------------------------ dependencies

    @staticmethod
    def requirementsPath() -> pathlib.Path:
        return pathlib.Path(__file__).parent / "Resources" / "requirements.txt"

    def dependenciesInstalled(self) -> bool:
        """True if PyTorch and every package of ``Resources/requirements.txt`` are installed (metadata only)."""
        import importlib.util

        return (importlib.util.find_spec("torch") is not None and dependenciesInstalled(self.requirementsPath())
                and all(importlib.util.find_spec(_moduleName(r)) is not None for r in NO_DEPS_REQUIREMENTS))

    def ensureDependencies(self) -> None:
        """PyTorch (through the PyTorch extension), then the packages of the forecast, after asking the user.

        PyTorch is never installed from PyPI here: its default wheel may not match the GPU driver,
        and MONAI's requirement would pull it in, so PyTorch comes first.

        Raises
        ------
        RuntimeError
            If PyTorch is missing and cannot be installed, or the user declines an installation.
        """
        if self._dependenciesChecked:
            return
        self._ensureTorch()
        ensureDependencies(self.requirementsPath(), requester="BrainProgression")
        self._ensureWithoutDependencies()
        self._dependenciesChecked = True

    def ensureResultDependencies(self) -> None:
        """What showing a forecast folder needs (pandas, nibabel): all dependencies if these are missing."""
        import importlib.util

        if all(importlib.util.find_spec(name) is not None for name in ("pandas", "nibabel")):
            return
        self.ensureDependencies()

    @staticmethod
    def _ensureTorch() -> None:
        import importlib.util

        if importlib.util.find_spec("torch") is not None:
            return
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError(_("Brain progression needs PyTorch. Install the PyTorch extension from the "
                                 "Extensions Manager, restart Slicer, then try again.")) from None
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True,
                                                               torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            raise RuntimeError(_("Brain progression cannot run without PyTorch."))

    @staticmethod
    def _ensureWithoutDependencies() -> None:
        """leaspy and deepbet, installed with ``--no-deps`` after asking (their pins would replace PyTorch)."""
        import importlib.util

        missing = [r for r in NO_DEPS_REQUIREMENTS if importlib.util.find_spec(_moduleName(r)) is None]
        if not missing:
            return
        question = _("Brain progression needs these Python packages, which are not installed yet:\n\n{packages}\n\n"
                     "Install them now (without their dependencies, which are already there)?").format(
            packages="\n".join(missing))
        if not slicer.util.confirmOkCancelDisplay(question, windowTitle=_("Install Python packages")):
            raise RuntimeError(_("Brain progression cannot run without these Python packages: {packages}").format(
                packages=", ".join(missing)))
        slicer.util.pip_install(" ".join(f'"{r}"' for r in missing) + " --no-deps")

    # ------------------------------------------------------------ inputs

    @staticmethod
    def targetAges(text, age=None) -> list:
        """Target ages from a text such as "72, 74, 76" (sorted; each after ``age``); ValueError otherwise."""
        from neuroatrophy.progression_scene import parse_target_ages

        return parse_target_ages(text, baseline_age=age)

    @staticmethod
    def weightsProblem(weights, quiet=False):
        """What is missing in a weights folder or configuration file, with how to get it; None if complete.

        With ``quiet=True`` a library that cannot be imported yet (dependencies not installed)
        gives None instead of raising: the check then happens when the forecast starts.
        """
        try:
            from neuroatrophy.progression_scene import weights_problem
        except ImportError:
            if quiet:
                return None
            raise
        try:
            return weights_problem(weights)
        except ImportError:
            if quiet:
                return None
            raise

    def availableDevices(self) -> list:
        """``["cpu"]``, plus ``"cuda"`` when PyTorch in the job's Python sees a GPU (probed once)."""
        import importlib.util
        import subprocess

        if self._devices is not None:
            return list(self._devices)
        devices = ["cpu"]
        if importlib.util.find_spec("torch") is not None:
            command = [slicerPythonExecutable(), "-c", "import torch; print(int(torch.cuda.is_available()))"]
            try:
                result = subprocess.run(command, env=childEnvironment(), capture_output=True, text=True,
                                        check=False, timeout=DEVICE_PROBE_TIMEOUT_S)
                if result.returncode == 0 and result.stdout.strip().endswith("1"):
                    devices.append("cuda")
            except (OSError, subprocess.TimeoutExpired) as error:
                logging.warning(f"BrainProgression: could not ask PyTorch for a GPU: {error}")
        self._devices = devices
        return list(devices)

    @staticmethod
    def temporaryFolder() -> pathlib.Path:
        """A new empty folder in Slicer's temporary folder (an output folder's parent when the user gives none)."""
        import tempfile

        return pathlib.Path(tempfile.mkdtemp(prefix="BrainProgression-", dir=slicer.app.temporaryPath))

    @staticmethod
    def inputFolder(outputFolder) -> pathlib.Path:
        """Where the input volumes are written: ``<outputFolder>-inputs`` beside the output folder."""
        folder = pathlib.Path(outputFolder)
        return folder.parent / f"{folder.name}-inputs"

    def writeInputs(self, baselineNode, outputFolder, labelNode=None) -> dict:
        """Write the baseline (and label map) as NIfTI for the job; returns ``{"t1": path[, "labels": path]}``."""
        from neuroatrophy.thalamus_scene import write_volume

        if not isGiven(outputFolder):
            raise ValueError(_("No output folder given."))
        if baselineNode is None:
            raise ValueError(_("Select the baseline T1w volume."))
        if not isinstance(baselineNode, vtkMRMLScalarVolumeNode) or isinstance(baselineNode, vtkMRMLLabelMapVolumeNode):
            raise ValueError(f"the baseline must be a scalar volume node, got {baselineNode.GetClassName()}")
        folder = self.inputFolder(outputFolder)
        if not folder.parent.is_dir():
            raise FileNotFoundError(f"folder of the output folder does not exist: {folder.parent}")
        folder.mkdir(exist_ok=True)
        files = {"t1": write_volume(baselineNode, folder / "t1.nii.gz")}
        if labelNode is not None:
            files["labels"] = write_volume(labelNode, folder / "labels.nii.gz")
        return files

    @staticmethod
    def predictArguments(t1, age, sex, diagnosis, targetAges, weights, outputFolder, labels=None, visits=None, m=4,
                         steps=25, device="cpu") -> list:
        """Arguments of ``neuroatrophy progression predict`` (``--progress json`` is added by the job)."""
        from neuroatrophy.progression_scene import predict_arguments

        return predict_arguments(t1, age, sex, diagnosis, targetAges, weights, outputFolder, labels=labels,
                                 visits=visits, m=m, steps=steps, device=device)

    # ------------------------------------------------------------ forecast

    def startForecast(self, baselineNode, age, sex, diagnosis, targetAges, weights, outputFolder, labelNode=None,
                      visits=None, m=4, steps=25, device="cpu"):
        """Check the inputs, write them, then start ``neuroatrophy progression predict`` in a background process.

        Parameters
        ----------
        baselineNode : vtkMRMLScalarVolumeNode
            Baseline T1w.
        age : float
            Age at the baseline, in years.
        sex : {"F", "M"}
        diagnosis : {"CN", "MCI", "AD"}
        targetAges : str or list of float
            E.g. ``"72, 74, 76"``; each after ``age``.
        weights : str or pathlib.Path
            BrLP weights folder or configuration file.
        outputFolder : str or pathlib.Path
            Folder the command writes; the inputs go to :meth:`inputFolder`.
        labelNode : vtkMRMLLabelMapVolumeNode, optional
            FreeSurfer/SynthSeg label map of the baseline, for the regional volumes.
        visits : str or pathlib.Path, optional
            CSV of earlier visits for the disease-course model.
        m, steps, device
            Samples per target age, DDIM steps, "cpu" or "cuda".

        Returns
        -------
        neuroatrophy.jobs.Job
            The running job (poll it with ``job.poll()``, stop it with ``job.cancel()``); progress
            is reported per diffusion step.
        """
        self.ensureDependencies()
        problem = self.weightsProblem(weights)
        if problem:
            raise ValueError(problem)
        if isGiven(visits) and not pathlib.Path(visits).is_file():
            raise FileNotFoundError(f"visits table not found: {visits}")
        # The command line is checked before anything is written.
        self.predictArguments("t1", age, sex, diagnosis, targetAges, weights, outputFolder, m=m, steps=steps,
                              device=device)
        inputs = self.writeInputs(baselineNode, outputFolder, labelNode)
        args = self.predictArguments(inputs["t1"], age, sex, diagnosis, targetAges, weights, outputFolder,
                                     labels=inputs.get("labels"), visits=visits if isGiven(visits) else None, m=m,
                                     steps=steps, device=device)
        return self._startJob(args)

    def forecast(self, baselineNode, age, sex, diagnosis, targetAges, weights, outputFolder=None, wait=True,
                 progressCallback=None, **options) -> dict:
        """Forecast the brain; see :meth:`startForecast` for the options.

        With ``wait=True`` (default) block until the job ends and return the shown nodes
        (:meth:`loadForecast`); with ``wait=False`` return the running job at once. Without
        ``outputFolder`` a temporary folder is used.

        Raises
        ------
        RuntimeError
            If the job fails (the message is the command's error).
        """
        outputFolder = outputFolder if isGiven(outputFolder) else self.temporaryFolder() / "forecast"
        job = self.startForecast(baselineNode, age, sex, diagnosis, targetAges, weights, outputFolder, **options)
        if not wait:
            return job

        def onEvent(event):
            if "progress" in event:
                if progressCallback is not None:
                    progressCallback(event["progress"], event["message"])
            elif "log" in event:
                logging.info(f"neuroatrophy progression: {event['log']}")

        if job.run(on_event=onEvent) != 0:
            raise RuntimeError(job.error or _("The forecast failed."))
        return self.loadForecast(outputFolder, name=f"{baselineNode.GetName()} forecast")

    def _startJob(self, args):
        from neuroatrophy.jobs import Job

        job = Job(args, python=slicerPythonExecutable(), env=childEnvironment())
        logging.info(f"BrainProgression: running {' '.join(job.command)}")
        return job.start()

    # ------------------------------------------------------------ results

    def loadForecast(self, outputFolder, name=None) -> dict:
        """Show a forecast folder (``neuroatrophy.progression_scene.load_forecast``); returns its nodes."""
        self.ensureResultDependencies()
        from neuroatrophy.progression_scene import load_forecast

        if not isGiven(outputFolder):
            raise ValueError(_("No output folder given."))
        name = slicer.mrmlScene.GenerateUniqueName(name or "Forecast")
        return load_forecast(slicer.mrmlScene, pathlib.Path(outputFolder), name=name)

    @staticmethod
    def tableFrame(tableNode):
        """A table node's content as a DataFrame."""
        from neuroatrophy import mrml

        return mrml.dataframe_from_table(tableNode)

    def forecastSummary(self, nodes) -> str:
        """One line: the target ages and each region's volume change from the first to the last of them."""
        from neuroatrophy.progression_covariates import REGIONS

        frame = self.tableFrame(nodes["volumes_table"])
        if frame.empty:
            return ""
        ages = ", ".join(f"{age:.1f}" for age in frame["target_age"])
        text = _("Forecast at {ages} years.").format(ages=ages)
        if len(frame) > 1:
            first, last = frame.iloc[0], frame.iloc[-1]
            changes = ", ".join(f"{region.replace('_', ' ')} {100.0 * (last[region] / first[region] - 1.0):+.1f} %"
                                for region in REGIONS if first[region])
            text += " " + _("From {start:.1f} to {end:.1f} years: {changes}.").format(
                start=first["target_age"], end=last["target_age"], changes=changes)
        return text

    def removeNodes(self, nodes) -> None:
        """Remove a shown forecast (a :meth:`loadForecast` dict or a list of nodes); colour tables stay."""
        from neuroatrophy.progression_scene import remove_forecast_nodes

        remove_forecast_nodes(slicer.mrmlScene, nodes)


def _moduleName(requirement) -> str:
    """The import name of a simple ``name>=x,<y`` requirement (the packages here import by their name)."""
    import re

    return re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0].strip().replace("-", "_")


#
# BrainProgressionTest
#


class BrainProgressionTest(ScriptedLoadableModuleTest):
    """The logic without BrLP's networks: command line, weight checks, a synthetic forecast folder."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_BrainProgression_command_line()
        self.setUp()
        self.test_BrainProgression_load_forecast()

    def test_BrainProgression_command_line(self):
        import tempfile

        self.delayDisplay("Command line and input checks")
        logic = BrainProgressionLogic()
        logic.ensureResultDependencies()
        args = logic.predictArguments("t1.nii.gz", 70, "F", "MCI", "74, 72", "/w", "/out", labels="aseg.nii.gz")
        self.assertEqual(args[:2], ["progression", "predict"])
        self.assertEqual(args[args.index("--target-ages") + 1:args.index("--labels")], ["72.0", "74.0"])
        self.assertEqual(args[args.index("--m") + 1], "4")
        self.assertEqual(args[args.index("--steps") + 1], "25")
        self.assertEqual(args[args.index("--out") + 1], "/out")
        with self.assertRaises(ValueError):
            logic.targetAges("69, 72", 70)
        with tempfile.TemporaryDirectory() as folder:
            problem = logic.weightsProblem(folder)
            self.assertIn("github.com/LemuelPuglisi/BrLP", problem)
            for name in ("autoencoder.pth", "unet.pth", "cnet.pth"):
                (pathlib.Path(folder) / name).write_bytes(b"x")
            self.assertIsNone(logic.weightsProblem(folder))
        self.delayDisplay("Test passed")

    def test_BrainProgression_load_forecast(self):
        import tempfile

        import numpy as np

        from neuroatrophy import mrml

        self.delayDisplay("Load a synthetic forecast folder")
        logic = BrainProgressionLogic()
        logic.ensureResultDependencies()
        ages = [72.0, 74.0, 76.0]
        with tempfile.TemporaryDirectory() as folder:
            expected = syntheticForecast(folder, ages)
            nodes = logic.loadForecast(folder, name="Synthetic forecast")
        sequence = nodes["predicted_sequence"]
        self.assertEqual(sequence.GetNumberOfDataNodes(), 3)
        self.assertEqual([sequence.GetNthIndexValue(i) for i in range(3)], ["72.0", "74.0", "76.0"])
        self.assertEqual(sequence.GetIndexName(), "age")
        browser = nodes["browser"]
        for index in (2, 0):
            browser.SetSelectedItemNumber(index)
            shown = mrml.array_from_volume(nodes["predicted_proxy"])
            np.testing.assert_allclose(shown, expected["predicted"][index].transpose(2, 1, 0), rtol=1e-6)
            shown = mrml.array_from_volume(nodes["difference_proxy"])
            np.testing.assert_allclose(shown, expected["difference"][index].transpose(2, 1, 0), rtol=1e-6)
        table = logic.tableFrame(nodes["volumes_table"])
        np.testing.assert_allclose(table["target_age"], ages)
        self.assertEqual(nodes["volumes_chart"].GetNumberOfPlotSeriesNodes(), 5)
        self.assertIn("hippocampus", logic.forecastSummary(nodes))
        logic.removeNodes(nodes)
        self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLSequenceBrowserNode")), 0)
        self.delayDisplay("Test passed")


def syntheticForecast(folder, ages=(72.0, 74.0, 76.0), shape=(24, 28, 24)):
    """Write a small forecast folder as ``neuroatrophy progression predict`` does; returns its images.

    A brain-like ellipsoid on BrLP's MNI 1.5 mm affine whose ventricles widen and cortex thins
    with age; volumes shrink by 1 % a year (hippocampus 2 %), the ventricles grow by 3 %. Returns ``{"predicted": [...],
    "uncertainty": [...], "difference": [...]}`` (nibabel IJK arrays in age order).
    """
    import json

    import nibabel as nib
    import numpy as np
    import pandas as pd

    from neuroatrophy.progression_covariates import REGIONS

    folder = pathlib.Path(folder)
    affine = np.array([[-1.5, 0, 0, 90], [0, 1.5, 0, -126], [0, 0, 1.5, -72], [0, 0, 0, 1]])
    grid = np.moveaxis(np.indices(shape).astype(float), 0, -1)
    radius = np.sqrt((((grid - (np.asarray(shape) - 1) / 2) / (np.asarray(shape) / 2.5)) ** 2).sum(axis=-1))

    def brain(years):
        ventricle = 0.25 + 0.01 * years
        return np.where(radius < 1.0, np.where(radius < ventricle, 0.2, 0.8), 0.0).astype(np.float32)

    baseline = brain(0.0)
    nib.save(nib.Nifti1Image(baseline, affine), folder / "baseline_mni.nii.gz")
    images = {"predicted": [], "uncertainty": [], "difference": []}
    files = {"baseline": "baseline_mni.nii.gz", "volumes": "volumes.csv", "predicted": {}, "uncertainty": {},
             "difference": {}}
    rows = []
    rates = {"hippocampus": -0.02, "lateral_ventricle": 0.03}  # per year; other regions -1 %
    for age in ages:
        predicted = brain(age - ages[0] + 2.0)
        maps = {"predicted": predicted, "uncertainty": (0.01 * (age - 70.0) * (radius < 1.0)).astype(np.float32),
                "difference": predicted - baseline}
        for kind, data in maps.items():
            name = f"{kind}_{age:.1f}.nii.gz"
            nib.save(nib.Nifti1Image(data, affine), folder / name)
            files[kind][f"{age:.1f}"] = name
            images[kind].append(data)
        years = age - 70.0
        rows.append({"target_age": age, **{r: 1000.0 * (1 + rates.get(r, -0.01) * years) for r in REGIONS},
                     "source": "regression"})
    pd.DataFrame(rows).to_csv(folder / "volumes.csv", index=False)
    description = {"format_version": 1, "target_ages": list(ages), "baseline_age": 70.0, "m": 2, "ddim_steps": 3,
                   "global_uncertainty": [0.01 * (a - 70.0) for a in ages], "files": files}
    (folder / "forecast.json").write_text(json.dumps(description, indent=2), encoding="utf-8")
    return images
