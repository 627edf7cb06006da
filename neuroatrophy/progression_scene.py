"""Show a brain-progression forecast (BrLP) in an MRML scene.

The display side of ``neuroatrophy progression predict``. Functions that add nodes take
the scene (``vtkMRMLScene``) as their first argument and reach MRML through
:mod:`neuroatrophy.mrml`, so the same calls work in 3D Slicer (``slicer.mrmlScene``)
and headless with ``slicer-core``. They leave the scene as it was when they raise.

* :func:`read_forecast`: check a forecast output folder and resolve its files.
* :func:`load_forecast`: the whole folder in a scene: the baseline (MNI), one volume
  per target age, sequences over age (prediction, uncertainty, difference, native-space
  prediction) scrubbed together by one sequence browser, the predicted regional volumes
  as a table and a chart over age.
* :func:`add_volume_sequence`: generic: volumes as a sequence node with a browser (or
  synchronised with an existing browser).
* :func:`remove_forecast_nodes`: take a loaded forecast out of the scene again.
* :func:`parse_target_ages`, :func:`predict_arguments`, :func:`weights_problem`: the
  BrainProgression module's input checks and command line, kept here so they run (and
  are tested) without Slicer.

Forecast folder
---------------
Written by ``neuroatrophy progression predict``::

    forecast.json                  {"format_version": 1, "target_ages": [...], "baseline_age": ..,
                                    "m": .., "ddim_steps": .., "global_uncertainty": [...],
                                    "files": {"baseline": .., "volumes": .., "predicted": {"72.0": ..},
                                              "uncertainty": {..}, "difference": {..}, "native": {..}}}
    baseline_mni.nii.gz            baseline in MNI152 space, 1.5 mm
    predicted_<age>.nii.gz         prediction at each target age (MNI152, 1.5 mm)
    predicted_<age>_native.nii.gz  the same in the subject's space (optional)
    uncertainty_<age>.nii.gz       voxel-wise SD over the LAS samples
    difference_<age>.nii.gz        prediction minus baseline
    volumes.csv                    target_age, five regional volumes (mm3), source

``<age>`` has one decimal (``predicted_72.0.nii.gz``). File names come from
``forecast.json["files"]`` when it lists them, else from these patterns. Uncertainty,
difference and native maps are each given for every target age or for none.

Sequences
---------
A sequence browser shows the selected age in a *proxy* volume per sequence. In Slicer
(and headless when a ``vtkSlicerSequencesLogic`` is attached to the scene) the
Sequences module logic creates the proxies and updates them whenever the browser's
selected item changes. Without that logic (a bare ``slicer-core`` scene) the proxies
are created here, holding the first age; they then do not follow the browser.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from . import mrml
from .mrml import _remove_added_nodes_on_error
from .progression_covariates import REGIONS

__all__ = [
    "FORECAST_FILE",
    "FORMAT_VERSION",
    "MAP_KINDS",
    "format_age",
    "read_forecast",
    "load_forecast",
    "add_volume_sequence",
    "add_volumes_table",
    "add_volumes_chart",
    "remove_forecast_nodes",
    "parse_target_ages",
    "predict_arguments",
    "weights_problem",
    "WEIGHTS_HELP",
]

#: Description of a forecast folder.
FORECAST_FILE = "forecast.json"
#: Newest ``format_version`` of ``forecast.json`` this module reads.
FORMAT_VERSION = 1
#: Per-age maps of a forecast folder: kind -> (file pattern, required).
MAP_KINDS = {
    "predicted": ("predicted_{age}.nii.gz", True),
    "uncertainty": ("uncertainty_{age}.nii.gz", False),
    "difference": ("difference_{age}.nii.gz", False),
    "native": ("predicted_{age}_native.nii.gz", False),
}
BASELINE_FILE = "baseline_mni.nii.gz"
VOLUMES_FILE = "volumes.csv"
#: Ages per second when a forecast sequence plays.
PLAYBACK_FPS = 1.0
#: Sexes, diagnoses and devices the ``progression predict`` command accepts.
SEXES = ("F", "M")
DIAGNOSES = ("CN", "MCI", "AD")
DEVICES = ("cpu", "cuda")

#: How to get BrLP's networks, shown whenever they are missing.
WEIGHTS_HELP = (
    "BrLP's trained networks are not shipped with NeuroAtrophy. Download the published weights (autoencoder, "
    "diffusion UNet, ControlNet and the disease-course models dcm_cn/dcm_mci/dcm_ad.json) from the links in the "
    "BrLP README (https://github.com/LemuelPuglisi/BrLP), put them in one folder, optionally with a "
    "configuration file (BrLP's confs.yaml or brainprogression.json) that names them, and select that folder "
    "or file. See docs/progression.md."
)
#: Networks a forecast cannot run without.
REQUIRED_NETWORKS = ("autoencoder", "unet", "controlnet")

_ATTR = "NeuroAtrophy."
ATTRIBUTE_KIND = _ATTR + "Kind"
ATTRIBUTE_FOLDER = _ATTR + "Forecast.Folder"
ATTRIBUTE_GLOBAL_UNCERTAINTY = _ATTR + "Forecast.GlobalUncertainty"

_REGION_LABELS = {
    "cerebral_cortex": "Cerebral cortex",
    "hippocampus": "Hippocampus",
    "amygdala": "Amygdala",
    "cerebral_white_matter": "Cerebral white matter",
    "lateral_ventricle": "Lateral ventricles",
}
_REGION_COLORS = {
    "cerebral_cortex": (0.86, 0.47, 0.0),
    "hippocampus": (0.86, 0.85, 0.08),
    "amygdala": (0.40, 0.76, 0.65),
    "cerebral_white_matter": (0.45, 0.45, 0.45),
    "lateral_ventricle": (0.47, 0.07, 0.53),
}
# Display names of the per-age maps (node names "<name> <label>").
_KIND_LABELS = {"predicted": "predicted", "uncertainty": "uncertainty", "difference": "difference",
                "native": "predicted (native)"}


def format_age(age) -> str:
    """An age as it appears in forecast file names: one decimal (``72`` -> ``"72.0"``)."""
    return f"{float(age):.1f}"


# ------------------------------------------------------------------ reading a folder


def _read_description(folder: Path) -> dict:
    path = folder / FORECAST_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing: {folder} is not a forecast folder "
                         "(written by 'neuroatrophy progression predict')")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"could not read {path}: {error}") from error
    if not isinstance(description, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(description).__name__}")
    version = description.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version}; this version of NeuroAtrophy reads up to "
                         f"{FORMAT_VERSION}: update NeuroAtrophy")
    return description


def _checked_ages(values, path: Path) -> list:
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{path}: target_ages must be a non-empty list of ages, got {values!r}")
    try:
        ages = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{path}: target_ages must be numbers, got {values!r}") from None
    if not all(math.isfinite(a) for a in ages):
        raise ValueError(f"{path}: target_ages must be finite, got {values!r}")
    labels = [format_age(a) for a in ages]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{path}: target_ages repeats an age, got {values!r}")
    return sorted(ages)


def _listed_files(description: dict, path: Path) -> dict:
    files = description.get("files", {})
    if files is None:
        return {}
    if not isinstance(files, dict):
        raise ValueError(f"{path}: 'files' must be a JSON object, got {type(files).__name__}")
    for kind in MAP_KINDS:
        if kind in files and files[kind] is not None and not isinstance(files[kind], dict):
            raise ValueError(f"{path}: files[{kind!r}] must map ages to file names, got {files[kind]!r}")
    return files


def _resolve(folder: Path, name, what: str, path: Path) -> Path:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{path}: the {what} file name must be a non-empty string, got {name!r}")
    return folder / name


def _map_files(folder: Path, kind: str, ages: list, listed: dict, path: Path):
    """Paths of one kind of per-age map, or None when the folder has none of them."""
    pattern, required = MAP_KINDS[kind]
    names = listed.get(kind)
    if names:
        by_age = {format_age(key): value for key, value in names.items()}
        missing = [format_age(a) for a in ages if format_age(a) not in by_age]
        if missing:
            raise ValueError(f"{path}: files[{kind!r}] lists no file for target age(s) {missing}")
        files = [_resolve(folder, by_age[format_age(a)], f"{kind} {format_age(a)}", path) for a in ages]
    else:
        files = [folder / pattern.format(age=format_age(a)) for a in ages]
        if not required and not any(f.is_file() for f in files):
            return None  # this kind of map was not written
    for file in files:
        if not file.is_file():
            raise ValueError(f"forecast file {file} is missing ({kind} map of {folder})")
    return files


def read_forecast(folder) -> dict:
    """Check a forecast output folder and resolve its files.

    Parameters
    ----------
    folder : str or path-like
        Output folder of ``neuroatrophy progression predict`` (layout in the module docstring).

    Returns
    -------
    dict
        ``folder`` (Path), ``target_ages`` (sorted list of float), ``baseline_age`` (float or
        None), ``description`` (the content of ``forecast.json``), ``baseline`` and ``volumes``
        (Paths) and, per kind of :data:`MAP_KINDS`, a list of Paths in age order (None for an
        optional kind the folder does not have).

    Raises
    ------
    FileNotFoundError
        If ``folder`` is not a folder.
    ValueError
        If ``forecast.json`` is missing or malformed, or a file it implies is missing
        (the message names the file).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"forecast folder not found: {folder}")
    path = folder / FORECAST_FILE
    description = _read_description(folder)
    ages = _checked_ages(description.get("target_ages"), path)
    baseline_age = description.get("baseline_age")
    if baseline_age is not None:
        try:
            baseline_age = float(baseline_age)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: baseline_age must be a number, got {baseline_age!r}") from None
    listed = _listed_files(description, path)
    info = {"folder": folder, "target_ages": ages, "baseline_age": baseline_age, "description": description}
    for key, default in (("baseline", BASELINE_FILE), ("volumes", VOLUMES_FILE)):
        file = _resolve(folder, listed.get(key) or default, key, path)
        if not file.is_file():
            raise ValueError(f"forecast file {file} is missing ({key} of {folder})")
        info[key] = file
    for kind in MAP_KINDS:
        info[kind] = _map_files(folder, kind, ages, listed, path)
    return info


def _load_images(files, reference=None):
    """Checked float32 images, all on ``reference``'s grid (default: the first one's); errors name the file."""
    from .thalamus_image import load_image, same_grid

    images = []
    for file in files:
        image = load_image(file, name=str(file), allow_constant=True)
        grid = reference if reference is not None else (images[0] if images else image)
        if not same_grid(image, grid):
            raise ValueError(f"{file} is not on the grid of {'the baseline' if reference is not None else files[0]} "
                             f"(shape {image.shape} vs {grid.shape[:3]}, or a different affine)")
        images.append(image)
    return images


def _read_volumes(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except Exception as error:  # pandas raises many types for malformed files
        raise ValueError(f"could not read the table {path}: {error}") from error
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in ("target_age", *REGIONS) if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing} (needs target_age and {list(REGIONS)})")
    if frame.empty:
        raise ValueError(f"{path} has no rows")
    for column in ("target_age", *REGIONS):
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.isna().any():
            raise ValueError(f"{path}: column {column!r} must hold numbers for every row")
        frame[column] = values.astype(float)
    if "source" in frame.columns:
        frame["source"] = frame["source"].fillna("").astype(str)
    return frame.sort_values("target_age", kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------ generic sequences


def _unattached_volume(array_kji, ijk_to_ras, name):
    """A scalar volume node outside any scene (a sequence item)."""
    slicer, vtk, numpy_support = mrml._mrml()
    array = np.asarray(array_kji)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.ndim != 3 or 0 in array.shape or not (np.issubdtype(array.dtype, np.integer)
                                                   or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"sequence item {name!r} must be a non-empty numeric 3-D array, got "
                         f"shape {array.shape} and dtype {array.dtype}")
    array = np.ascontiguousarray(mrml._writable_voxel_type(array))
    image = vtk.vtkImageData()
    image.SetDimensions(*array.shape[::-1])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True))
    volume = slicer.vtkMRMLScalarVolumeNode()
    volume.SetName(name)
    volume.SetIJKToRASMatrix(mrml._vtk_matrix(mrml._check_ijk_to_ras(ijk_to_ras)))
    volume.SetAndObserveImageData(image)
    return volume


def _sequence_item(item, name):
    """``(array_kji, ijk_to_ras)`` or a volume node -> (unattached volume node, array, matrix)."""
    if hasattr(item, "IsA"):
        mrml._check_node(item, "vtkMRMLScalarVolumeNode", "volumes")
        array, matrix = mrml.array_from_volume(item), mrml.ijk_to_ras_from_volume(item)
    else:
        try:
            array, matrix = item
        except (TypeError, ValueError):
            raise ValueError("volumes must hold volume nodes or (array_kji, ijk_to_ras) pairs") from None
    return _unattached_volume(array, matrix, name), np.asarray(array), np.asarray(matrix, dtype=float)


def _index_text(value) -> str:
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            number = float("nan")
    else:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        text = repr(number)
    if not math.isfinite(number):
        raise ValueError(f"index_values must be finite numbers, got {value!r}")
    return text


def _register_browser_class(scene):
    """Let a bare scene create sequence browser nodes (Slicer's Sequences logic registers them)."""
    slicer, _, _ = mrml._mrml()
    if not scene.IsNodeClassRegistered("vtkMRMLSequenceBrowserNode"):
        scene.RegisterNodeClass(slicer.vtkMRMLSequenceBrowserNode())


def add_volume_sequence(scene, volumes, index_values, name, index_name="age", index_unit="years",
                        browser_node=None):
    """Add volumes as a sequence node, browsed by a new or an existing sequence browser.

    Parameters
    ----------
    scene : vtkMRMLScene
    volumes : sequence
        One item per index value: a ``vtkMRMLScalarVolumeNode`` (copied) or a pair
        ``(array_kji, ijk_to_ras)`` as for :func:`neuroatrophy.mrml.add_volume`.
    index_values : sequence of float or str
        Numeric index value of each item (e.g. ages); unique. The sequence keeps its items
        sorted by value.
    name : str
        Name of the sequence node and of its proxy volume.
    index_name, index_unit : str
        Shown by Slicer's sequence browser (default ``"age"`` in ``"years"``).
    browser_node : vtkMRMLSequenceBrowserNode, optional
        Browser that also shows this sequence (synchronised by index value with its master
        sequence). By default a new browser ``"<name> browser"`` with this sequence as master.

    Returns
    -------
    sequence_node : vtkMRMLSequenceNode
    browser_node : vtkMRMLSequenceBrowserNode
    proxy_node : vtkMRMLScalarVolumeNode
        The volume in the scene that shows the browser's selected item (with a display node).

    Raises
    ------
    ValueError
        If the numbers of volumes and index values differ, an index value repeats or is
        not a number, or an item is not a valid volume.
    """
    mrml._check_scene(scene)
    mrml._check_name(name)
    mrml._check_name(index_name, "index_name")
    volumes, texts = list(volumes), [_index_text(v) for v in index_values]
    if not volumes or len(volumes) != len(texts):
        raise ValueError(f"volumes ({len(volumes)}) and index_values ({len(texts)}) must be non-empty "
                         "and of the same length")
    if len({float(t) for t in texts}) != len(texts):
        raise ValueError(f"index_values must be unique, got {texts}")
    if browser_node is not None:
        mrml._check_node(browser_node, "vtkMRMLSequenceBrowserNode", "browser_node")
        if not scene.IsNodePresent(browser_node):
            raise ValueError(f"browser_node {browser_node.GetName()!r} is not in the scene")
    items = [_sequence_item(v, f"{name} {t}") for v, t in zip(volumes, texts)]
    _register_browser_class(scene)
    with _remove_added_nodes_on_error(scene):
        sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
        sequence.SetIndexName(index_name)
        sequence.SetIndexUnit(str(index_unit or ""))
        sequence.SetIndexType(sequence.NumericIndex)
        for (node, _array, _matrix), text in zip(items, texts):
            sequence.SetDataNodeAtValue(node, text)
        if browser_node is None:
            browser_node = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", f"{name} browser")
            browser_node.SetPlaybackRateFps(PLAYBACK_FPS)
            browser_node.SetPlaybackLooped(False)
            # In Slicer the Sequences logic creates the proxy volume here.
            browser_node.SetAndObserveMasterSequenceNodeID(sequence.GetID())
        else:
            browser_node.AddSynchronizedSequenceNode(sequence)
        proxy = browser_node.GetProxyNode(sequence)
        if proxy is None:  # no Sequences logic: a proxy holding the first item
            first = min(range(len(texts)), key=lambda i: float(texts[i]))
            _node, array, matrix = items[first]
            proxy = mrml.add_volume(scene, array, matrix, name)
            browser_node.AddProxyNode(proxy, sequence, False)
        if proxy.GetDisplayNode() is None:
            proxy.CreateDefaultDisplayNodes()
    return sequence, browser_node, proxy


# ------------------------------------------------------------------ tables and charts


def add_volumes_table(scene, volumes, name="Forecast volumes"):
    """Add the predicted regional volumes (``volumes.csv``) as a table node.

    Parameters
    ----------
    scene : vtkMRMLScene
    volumes : pandas.DataFrame
        Columns ``target_age``, the five regions of
        :data:`~neuroatrophy.progression_covariates.REGIONS` (mm3), optionally ``source``.
    name : str

    Returns
    -------
    vtkMRMLTableNode
        Rows sorted by age; column units set to years and mm3.
    """
    mrml._check_scene(scene)
    if not isinstance(volumes, pd.DataFrame):
        raise ValueError(f"volumes must be a DataFrame, got {type(volumes).__name__}")
    missing = [c for c in ("target_age", *REGIONS) if c not in volumes.columns]
    if missing:
        raise ValueError(f"volumes lacks column(s) {missing}")
    frame = volumes.sort_values("target_age", kind="stable").reset_index(drop=True)
    with _remove_added_nodes_on_error(scene):
        table = mrml.table_from_dataframe(scene, frame, name)
        table.SetColumnUnitLabel("target_age", "years")
        for region in REGIONS:
            table.SetColumnUnitLabel(region, "mm3")
            table.SetColumnTitle(region, _REGION_LABELS[region])
        table.SetAttribute(ATTRIBUTE_KIND, "forecast volumes")
    return table


def add_volumes_chart(scene, table_node, name="Forecast volumes chart", regions=REGIONS):
    """Add a chart of the regional volumes over age, one line per region.

    Parameters
    ----------
    scene : vtkMRMLScene
    table_node : vtkMRMLTableNode
        Made by :func:`add_volumes_table` (columns ``target_age`` and the regions).
    name : str
    regions : sequence of str
        Columns to plot (default: the five BrLP regions).

    Returns
    -------
    vtkMRMLPlotChartNode
        One series per region, named after it (e.g. "Hippocampus"), x = age in years.
    """
    regions = list(regions)
    unknown = [r for r in regions if r not in _REGION_LABELS]
    if unknown:
        raise ValueError(f"regions must be among {list(REGIONS)}, got {unknown}")
    with _remove_added_nodes_on_error(scene):
        chart = mrml.add_plot(scene, table_node, "target_age", regions, name, plot_type="Line",
                              x_label="Age (years)", y_label="Volume (mm³)",
                              colors=[_REGION_COLORS[r] for r in regions],
                              marker_styles=["circle"] * len(regions))
        for index, region in enumerate(regions):
            chart.GetNthPlotSeriesNode(index).SetName(_REGION_LABELS[region])
        chart.SetAttribute(ATTRIBUTE_KIND, "forecast volumes")
    return chart


# ------------------------------------------------------------------ a whole forecast


def _kji(image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.dataobj, dtype=np.float32).transpose(2, 1, 0))


def _value_range(images, symmetric=False):
    """Display range shared by every age of a sequence, so that scrubbing keeps the scale."""
    low = min(float(np.min(image.dataobj)) for image in images)
    high = max(float(np.max(image.dataobj)) for image in images)
    if symmetric:
        bound = max(abs(low), abs(high)) or 1.0
        return -bound, bound
    return (low, high) if high > low else (low, low + 1.0)


def load_forecast(scene, folder, name=None, separate_volumes=True) -> dict:
    """Show the output folder of ``neuroatrophy progression predict``.

    Parameters
    ----------
    scene : vtkMRMLScene
    folder : str or path-like
        Forecast folder (layout in the module docstring).
    name : str, optional
        Prefix of the node names (default ``"Forecast"``).
    separate_volumes : bool, default True
        Also add the prediction at each target age as a volume of its own
        (``"<name> predicted <age>"``), e.g. to compare two ages side by side.

    Returns
    -------
    dict
        ``baseline_volume`` (MNI); ``predicted_volumes`` (list, one per target age, empty
        without ``separate_volumes``); ``browser`` (one vtkMRMLSequenceBrowserNode for all
        sequences); ``predicted_sequence`` and, when the folder has them,
        ``uncertainty_sequence``, ``difference_sequence``, ``native_sequence``
        (vtkMRMLSequenceNode, index "age" in "years", one item per target age in age order,
        index values ``repr(age)``); ``<kind>_proxy`` for each sequence (the volume that shows
        the selected age); ``volumes_table`` and ``volumes_chart``.

    Raises
    ------
    FileNotFoundError
        If ``folder`` does not exist.
    ValueError
        If the folder is incomplete or malformed (the message names the file).
    """
    mrml._check_scene(scene)
    name = "Forecast" if name is None else name
    mrml._check_name(name)
    info = read_forecast(folder)
    ages = info["target_ages"]
    baseline = _load_images([info["baseline"]])[0]
    # MNI maps lie on the baseline's grid; native ones on the grid of the first of them.
    maps = {kind: _load_images(info[kind], reference=None if kind == "native" else baseline)
            for kind in MAP_KINDS if info[kind] is not None}
    volumes = _read_volumes(info["volumes"])
    description = info["description"]

    nodes = {"predicted_volumes": []}
    index_values = [repr(float(a)) for a in ages]
    with _remove_added_nodes_on_error(scene):
        nodes["baseline_volume"] = mrml.add_volume(scene, _kji(baseline), baseline.affine, f"{name} baseline (MNI)")
        grey_range = _value_range([baseline, *maps["predicted"]])
        mrml.set_volume_display(nodes["baseline_volume"], value_range=grey_range)
        if separate_volumes:
            for age, image in zip(ages, maps["predicted"]):
                volume = mrml.add_volume(scene, _kji(image), image.affine, f"{name} predicted {format_age(age)}")
                mrml.set_volume_display(volume, value_range=grey_range)
                volume.SetAttribute(ATTRIBUTE_KIND, "forecast predicted")
                nodes["predicted_volumes"].append(volume)
        browser = None
        for kind, images in maps.items():
            items = [(_kji(image), image.affine) for image in images]
            sequence, browser, proxy = add_volume_sequence(scene, items, index_values,
                                                           f"{name} {_KIND_LABELS[kind]}", browser_node=browser)
            if kind == "difference":
                mrml.set_volume_display(proxy, mrml.diverging_color_table(scene),
                                        _value_range(images, symmetric=True))
            elif kind == "uncertainty":
                mrml.set_volume_display(proxy, mrml.sequential_color_table(scene), (0.0, _value_range(images)[1]))
            elif kind == "native":
                mrml.set_volume_display(proxy, value_range=_value_range(images))
            else:
                mrml.set_volume_display(proxy, value_range=grey_range)
            for node in (sequence, proxy):
                node.SetAttribute(ATTRIBUTE_KIND, f"forecast {kind}")
            nodes[f"{kind}_sequence"], nodes[f"{kind}_proxy"] = sequence, proxy
        browser.SetName(f"{name} browser")
        browser.SetAttribute(ATTRIBUTE_KIND, "forecast")
        browser.SetAttribute(ATTRIBUTE_FOLDER, str(Path(folder).resolve()))
        nodes["browser"] = browser
        uncertainty = description.get("global_uncertainty")
        if isinstance(uncertainty, (list, tuple)):
            nodes["predicted_sequence"].SetAttribute(ATTRIBUTE_GLOBAL_UNCERTAINTY, json.dumps(list(uncertainty)))
        nodes["volumes_table"] = add_volumes_table(scene, volumes, f"{name} volumes")
        nodes["volumes_chart"] = add_volumes_chart(scene, nodes["volumes_table"], f"{name} volumes over age")
    return nodes


def remove_forecast_nodes(scene, nodes) -> None:
    """Remove a forecast shown by :func:`load_forecast` (its dict, or a list of nodes).

    Browsers take their proxy volumes with them, charts their series and tables; colour
    tables stay (they are shared).
    """
    mrml.remove_shown_nodes(scene, nodes)


# ------------------------------------------------------------------ module support


def parse_target_ages(text, baseline_age=None) -> list:
    """Target ages from a text such as ``"72, 74, 76"`` (commas, semicolons or spaces).

    Parameters
    ----------
    text : str or sequence of numbers
    baseline_age : float, optional
        Every target age must come after it.

    Returns
    -------
    list of float
        Sorted, without repeats.

    Raises
    ------
    ValueError
        Naming the offending entry: not a number, outside 0-120 years, not after the
        baseline age, or no age at all.
    """
    if isinstance(text, str):
        entries = [e for e in re.split(r"[,;\s]+", text.strip()) if e]
    else:
        entries = list(text or [])
    if not entries:
        raise ValueError("target ages: give at least one age in years, e.g. '72, 74, 76'")
    ages = []
    for entry in entries:
        try:
            age = float(entry)
        except (TypeError, ValueError):
            raise ValueError(f"target ages: {entry!r} is not a number of years") from None
        if not math.isfinite(age) or not 0.0 < age < 120.0:
            raise ValueError(f"target ages: {entry!r} is not an age in years (0-120)")
        if baseline_age is not None and age <= float(baseline_age):
            raise ValueError(f"target ages: {format_age(age)} is not after the baseline age "
                             f"{format_age(baseline_age)}")
        ages.append(age)
    unique = {format_age(a): a for a in ages}
    return sorted(unique.values())


def _choice(value, choices, param):
    text = str(value).strip()
    for choice in choices:
        if text.lower() == choice.lower():
            return choice
    raise ValueError(f"{param} must be one of {list(choices)}, got {value!r}")


def predict_arguments(t1, age, sex, diagnosis, target_ages, weights, output_folder, labels=None, visits=None,
                      m=4, steps=25, device="cpu") -> list:
    """Arguments of ``neuroatrophy progression predict`` (``--progress json`` is added by the job).

    Parameters
    ----------
    t1 : path
        Baseline T1w image.
    age : float
        Age at the baseline scan, in years.
    sex : {"F", "M"}
    diagnosis : {"CN", "MCI", "AD"}
    target_ages : str or sequence of float
        Checked with :func:`parse_target_ages` (after ``age``).
    weights : path
        BrLP configuration file or weights folder.
    output_folder : path
    labels : path, optional
        FreeSurfer/SynthSeg label map of the baseline, for the regional volumes.
    visits : path, optional
        CSV of earlier visits for the disease-course model.
    m : int
        Latent average stabilisation samples (>= 1).
    steps : int
        DDIM steps (>= 1).
    device : {"cpu", "cuda"}

    Returns
    -------
    list of str

    Raises
    ------
    ValueError
        Naming the parameter that is missing or out of range.
    """
    for value, param in ((t1, "t1"), (weights, "weights"), (output_folder, "output_folder")):
        if value is None or str(value) in ("", "."):
            raise ValueError(f"{param} is not given")
    try:
        age = float(age)
    except (TypeError, ValueError):
        raise ValueError(f"age must be a number of years, got {age!r}") from None
    if not math.isfinite(age) or not 0.0 < age < 120.0:
        raise ValueError(f"age must be in years (0-120), got {age!r}")
    ages = parse_target_ages(target_ages, baseline_age=age)
    for value, param in ((m, "m"), (steps, "steps")):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{param} must be a positive integer, got {value!r}")
    args = ["progression", "predict", "--t1", str(t1), "--age", repr(age),
            "--sex", _choice(sex, SEXES, "sex"), "--diagnosis", _choice(diagnosis, DIAGNOSES, "diagnosis"),
            "--target-ages", *[repr(a) for a in ages]]
    if labels is not None and str(labels) not in ("", "."):
        args += ["--labels", str(labels)]
    if visits is not None and str(visits) not in ("", "."):
        args += ["--visits", str(visits)]
    args += ["--weights", str(weights), "--m", str(int(m)), "--steps", str(int(steps)),
             "--device", _choice(device, DEVICES, "device"), "--out", str(output_folder)]
    return args


def weights_problem(weights):
    """What is wrong with a weights folder or configuration file, or None if a forecast can run with it.

    Parameters
    ----------
    weights : str or path-like or None
        BrLP configuration file (JSON/YAML) or folder of weight files
        (:func:`neuroatrophy.progression_config.load_config`).

    Returns
    -------
    str or None
        A message that says what is missing and, with :data:`WEIGHTS_HELP`, how to get it;
        None when the autoencoder, UNet and ControlNet files all exist. The disease-course
        models are optional (without them the regional volumes come from a regression).
    """
    from .progression_config import load_config

    if weights is None or str(weights) in ("", "."):
        return "No weights selected. " + WEIGHTS_HELP
    path = Path(weights)
    if not path.exists():
        return f"Weights not found: {path}. " + WEIGHTS_HELP
    try:
        config = load_config(path)
    except (ValueError, OSError) as error:
        return str(error).rstrip(". ") + ". " + WEIGHTS_HELP
    missing = []
    for network in REQUIRED_NETWORKS:
        try:
            config.weight_path(network)
        except (FileNotFoundError, ValueError):
            value = config.weights.get(network)
            missing.append(f"{network} ({value} does not exist)" if value else network)
    if missing:
        return f"Incomplete weights in {path}: missing {', '.join(missing)}. " + WEIGHTS_HELP
    return None
