"""Show SuStaIn subtype results in an MRML scene.

The display side of :mod:`neuroatrophy.sustain` and :mod:`neuroatrophy.subtypes_pipeline`.
Every function takes the scene (``vtkMRMLScene``) as its first argument and reaches
MRML through :mod:`neuroatrophy.mrml`, so the same calls work in 3D Slicer
(``slicer.mrmlScene``) and headless with ``slicer-core``. Functions that add nodes
leave the scene as it was when they raise.

* :func:`add_subject_table`: each subject's most likely subtype and stage with
  their probabilities (a table node).
* :func:`add_cv_plot`: CVIC against the number of subtypes (a plot chart).
* :func:`add_stage_sequence`: the progression of one subtype on the brain, a
  sequence of volumes (stage 0..N, regions of a labelled atlas painted with the
  model's expected z, or with 1 once a mixture model's event has occurred) and a
  sequence browser to step or play through the stages. The colour table and the
  colour range are the same at every stage; voxels outside the biomarkers' regions
  hold -1 and are hidden in slice views, so normal regions (0) show in grey.
* :func:`add_onset_volume`: one volume, each region painted with the stage at which
  it first becomes abnormal (early stages dark red, late ones yellow).
* :func:`show_subtypes`: all of the above for a ``SubtypesResult``.

Sequences
---------
A sequence browser shows the selected stage in a *proxy* volume. In Slicer (and
headless when a ``vtkSlicerSequencesLogic`` is attached to the scene) the Sequences
module logic creates the proxy and copies the selected stage into it whenever the
browser's selected item changes or it plays. Without that logic (a bare
``slicer-core`` scene) this module creates the proxy itself, holding stage 0; it
then does not follow the browser.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import mrml
from .mrml import _remove_added_nodes_on_error
from .subtypes_atlas import (
    RegionAtlas,
    match_biomarkers,
    onset_map,
    stage_maps,
    unmatched_biomarkers,
)

__all__ = [
    "OUTSIDE_VALUE",
    "add_subject_table",
    "add_cv_plot",
    "add_stage_sequence",
    "add_onset_volume",
    "show_subtypes",
    "remove_subtype_nodes",
    "default_atlas",
]

#: Value of voxels outside every biomarker's region in stage volumes (hidden in slice views).
OUTSIDE_VALUE = -1.0
#: Stages per second when a stage sequence plays.
PLAYBACK_FPS = 2.0

_ATTR = "NeuroAtrophy."
ATTRIBUTE_KIND = _ATTR + "Kind"
ATTRIBUTE_SUBTYPE = _ATTR + "Subtype"
ATTRIBUTE_UNMAPPED = _ATTR + "UnmappedBiomarkers"

_STAGE_COLORS = "NeuroAtrophy SuStaIn stage"
_STAGE_ANCHORS = ((0.80, 0.80, 0.80), (1.0, 0.85, 0.30), (0.93, 0.35, 0.10), (0.50, 0.0, 0.15))
_ONSET_COLORS = "NeuroAtrophy SuStaIn onset"
_ONSET_ANCHORS = ((0.50, 0.0, 0.15), (0.93, 0.35, 0.10), (1.0, 0.85, 0.30), (1.0, 1.0, 0.80))
# Downsampling of the default 1 mm atlas: a sequence holds one volume per stage.
_DEFAULT_ATLAS_STEP = 2


def default_atlas() -> RegionAtlas:
    """The atlas :func:`show_subtypes` uses by default: Desikan-Killiany aparc+aseg at 2 mm."""
    return RegionAtlas.desikan_killiany(step=_DEFAULT_ATLAS_STEP)


# ------------------------------------------------------------------ tables and plots


def add_subject_table(scene, staged, name="SuStaIn subjects", table_node=None):
    """Add the subjects' subtypes and stages as a table node.

    Parameters
    ----------
    scene : vtkMRMLScene
    staged : pandas.DataFrame
        From ``SustainModel.stage`` (index = subjects; ``ml_subtype``, ``ml_stage``,
        probabilities, ``normal_appearing``). The index becomes a ``subject_id`` column.
    name : str
    table_node : vtkMRMLTableNode, optional
        Existing table to overwrite.

    Returns
    -------
    vtkMRMLTableNode

    Raises
    ------
    ValueError
        If ``staged`` is not a DataFrame with ``ml_subtype`` and ``ml_stage``.
    """
    if not isinstance(staged, pd.DataFrame):
        raise ValueError(f"staged must be a DataFrame, got {type(staged).__name__}")
    missing = [c for c in ("ml_subtype", "ml_stage") if c not in staged.columns]
    if missing:
        raise ValueError(f"staged lacks column(s) {missing}")
    table = staged.copy()
    table.index = table.index.astype(str)
    table.index.name = table.index.name or "subject_id"
    table = table.reset_index()
    return mrml.table_from_dataframe(scene, table, name, table_node=table_node)


def add_cv_plot(scene, cv_result, name="SuStaIn cross-validation"):
    """Add a chart of CVIC against the number of subtypes.

    The chart's table (``chart.GetNthPlotSeriesNode(0).GetTableNode()``) also holds
    the mean test log-likelihood over folds and its SD, minimum and maximum.

    Parameters
    ----------
    scene : vtkMRMLScene
    cv_result : CVResult
        From :func:`neuroatrophy.sustain.cross_validate`.
    name : str

    Returns
    -------
    vtkMRMLPlotChartNode
    """
    from .subtypes_plot import cv_summary

    summary = cv_summary(cv_result)
    summary["n_subtypes"] = summary["n_subtypes"].astype(np.float64)
    with _remove_added_nodes_on_error(scene):
        table = mrml.table_from_dataframe(scene, summary, f"{name} table")
        chart = mrml.add_plot(scene, table, "n_subtypes", ["cvic"], name, plot_type="Line",
                              x_label="number of subtypes", y_label="CVIC (lower is better)",
                              marker_styles=["circle"])
    return chart


# ------------------------------------------------------------------ volumes


def _stage_color_table(scene):
    return mrml._color_table(scene, _STAGE_COLORS, 256, _STAGE_ANCHORS,
                             "SuStaIn stage: grey (normal) - yellow - red (abnormal)")


def _onset_color_table(scene):
    return mrml._color_table(scene, _ONSET_COLORS, 256, _ONSET_ANCHORS,
                             "SuStaIn onset stage: dark red (early) - yellow (late)")


def _stage_value_range(model) -> tuple:
    """Colour range of stage volumes, the same for every stage and subtype of a model."""
    if model.kind == "mixture":
        return 0.0, 1.0
    trajectories = np.asarray(model.trajectories(), dtype=float)
    high = float(np.nanmax(trajectories)) if np.isfinite(trajectories).any() else 1.0
    return 0.0, max(high, 1e-6)


def _ras_kji(volume_ijk) -> np.ndarray:
    """A volume in nibabel's IJK order as Slicer's KJI array."""
    return np.ascontiguousarray(np.transpose(volume_ijk, (2, 1, 0)))


def _unattached_volume(array_ijk, affine, name):
    """A scalar volume node outside any scene (a sequence item)."""
    slicer, vtk, numpy_support = mrml._mrml()
    array = _ras_kji(array_ijk)
    image = vtk.vtkImageData()
    image.SetDimensions(*array.shape[::-1])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True))
    volume = slicer.vtkMRMLScalarVolumeNode()
    volume.SetName(name)
    volume.SetIJKToRASMatrix(mrml._vtk_matrix(mrml._check_ijk_to_ras(affine)))
    volume.SetAndObserveImageData(image)
    return volume


def _register_browser_class(scene):
    """Let a bare scene create sequence browser nodes (Slicer's Sequences logic registers them)."""
    slicer, _, _ = mrml._mrml()
    if not scene.IsNodeClassRegistered("vtkMRMLSequenceBrowserNode"):
        scene.RegisterNodeClass(slicer.vtkMRMLSequenceBrowserNode())


def _tag(node, kind, subtype, unmapped):
    node.SetAttribute(ATTRIBUTE_KIND, kind)
    node.SetAttribute(ATTRIBUTE_SUBTYPE, str(subtype))
    node.SetAttribute(ATTRIBUTE_UNMAPPED, ";".join(unmapped))


def add_stage_sequence(scene, model, atlas, subtype, name=None, matches=None):
    """Add one subtype's progression as a sequence of volumes, stage 0..N, and a browser.

    Parameters
    ----------
    scene : vtkMRMLScene
    model : SustainModel
    atlas : RegionAtlas
        Its geometry becomes the volumes' geometry (at 1 mm every stage holds the
        whole atlas grid: downsample large atlases, see :meth:`RegionAtlas.downsampled`).
    subtype : int
        1-based.
    name : str, optional
        Name of the sequence (default ``"Subtype <s> stages"``); the browser is
        ``"<name> browser"``.
    matches : dict, optional
        Biomarker -> region (:func:`~neuroatrophy.subtypes_atlas.match_biomarkers`).

    Returns
    -------
    sequence_node : vtkMRMLSequenceNode
        N + 1 scalar volumes (index "stage", values "0".."N"), voxels as in
        :func:`~neuroatrophy.subtypes_atlas.stage_maps` with background -1.
    browser_node : vtkMRMLSequenceBrowserNode
        Browser of the sequence; its proxy volume (``browser_node.GetProxyNode(sequence_node)``)
        has the stage colour table over a fixed range and hides the voxels outside the regions.
        Attributes ``NeuroAtrophy.Subtype`` and ``NeuroAtrophy.UnmappedBiomarkers``
        (";"-separated biomarkers without a region) are set on both nodes.

    Raises
    ------
    ValueError
        If ``subtype`` is out of range or no biomarker has a region.
    """
    mrml._check_scene(scene)
    if matches is None:
        matches = match_biomarkers(atlas, model.biomarkers)
    maps = stage_maps(model, atlas, subtype, background=OUTSIDE_VALUE, matches=matches)
    name = name or f"Subtype {subtype} stages"
    mrml._check_name(name)
    unmapped = unmatched_biomarkers(matches)
    value_range = _stage_value_range(model)
    _register_browser_class(scene)
    with _remove_added_nodes_on_error(scene):
        sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
        sequence.SetIndexName("stage")
        sequence.SetIndexUnit("")
        sequence.SetIndexType(sequence.NumericIndex)
        for stage, volume in enumerate(maps):
            item = _unattached_volume(volume, atlas.affine, f"{name} {stage}")
            sequence.SetDataNodeAtValue(item, str(stage))
        browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", f"{name} browser")
        browser.SetPlaybackRateFps(PLAYBACK_FPS)
        browser.SetPlaybackLooped(False)
        # In Slicer the Sequences logic creates the proxy volume here.
        browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
        proxy = browser.GetProxyNode(sequence)
        if proxy is None:  # no Sequences logic: a proxy holding stage 0
            proxy = mrml.add_volume(scene, _ras_kji(maps[0]), atlas.affine, name)
            browser.AddProxyNode(proxy, sequence, False)
        if proxy.GetDisplayNode() is None:
            proxy.CreateDefaultDisplayNodes()
        mrml.set_volume_display(proxy, _stage_color_table(scene), value_range,
                                lower_threshold=OUTSIDE_VALUE / 2)
        for node in (sequence, browser, proxy):
            _tag(node, "subtype stages", subtype, unmapped)
    return sequence, browser


def add_onset_volume(scene, model, atlas, subtype, name=None, level=0, matches=None):
    """Add a volume of the stage at which each region first becomes abnormal.

    Parameters
    ----------
    scene : vtkMRMLScene
    model : SustainModel
    atlas : RegionAtlas
    subtype : int
        1-based.
    name : str, optional
        Default ``"Subtype <s> onset stage"``.
    level : int, default 0
        Z-level counted as abnormal (0: the first).
    matches : dict, optional
        Biomarker -> region.

    Returns
    -------
    vtkMRMLScalarVolumeNode
        Values as :func:`~neuroatrophy.subtypes_atlas.onset_map` (1..N; 0 outside and
        never, hidden in slice views), coloured from dark red (stage 1) to yellow (stage N).
    """
    mrml._check_scene(scene)
    if matches is None:
        matches = match_biomarkers(atlas, model.biomarkers)
    values = onset_map(model, atlas, subtype, level=level, matches=matches)
    name = name or f"Subtype {subtype} onset stage"
    n_events = int(model.n_events)
    with _remove_added_nodes_on_error(scene):
        volume = mrml.add_volume(scene, _ras_kji(values), atlas.affine, name)
        mrml.set_volume_display(volume, _onset_color_table(scene), (1.0, float(max(n_events, 2))),
                                lower_threshold=0.5)
        _tag(volume, "subtype onset", subtype, unmatched_biomarkers(matches))
    return volume


# ------------------------------------------------------------------ everything


def _chosen_model(result):
    n_subtypes = int(result.chosen_n_subtypes)
    for model in result.models:
        if int(model.n_subtypes) == n_subtypes:
            return model
    raise ValueError(f"result has no model with its chosen {n_subtypes} subtypes "
                     f"(models with {[int(m.n_subtypes) for m in result.models]})")


def show_subtypes(scene, result, atlas=None, name="SuStaIn"):
    """Show a ``SubtypesResult`` (:mod:`neuroatrophy.subtypes_pipeline`) in a scene.

    Parameters
    ----------
    scene : vtkMRMLScene
    result : SubtypesResult
        Its model with ``chosen_n_subtypes`` subtypes is shown.
    atlas : RegionAtlas, optional
        Atlas of the biomarkers' regions. By default the Desikan-Killiany aparc+aseg
        atlas at 2 mm (:func:`default_atlas`); if none of the biomarkers is one of its
        regions, the brain display is left out (with an explicit atlas that is an error).
    name : str, default "SuStaIn"
        Prefix of the node names.

    Returns
    -------
    dict
        ``subjects_table`` (vtkMRMLTableNode); ``cv_chart`` (vtkMRMLPlotChartNode, only
        with cross-validation); ``stage_sequences``, ``stage_browsers``, ``onset_volumes``
        (lists, one per subtype, in subtype order; empty without atlas regions);
        ``unmapped_biomarkers`` (list of str: biomarkers with no atlas region).

    Raises
    ------
    ValueError
        If the result has no model with its chosen number of subtypes, or an explicit
        atlas has no region for any biomarker.
    """
    mrml._check_scene(scene)
    mrml._check_name(name)
    model = _chosen_model(result)
    atlas, matches = _atlas_and_matches(model, atlas)
    nodes = {"stage_sequences": [], "stage_browsers": [], "onset_volumes": [],
             "unmapped_biomarkers": unmatched_biomarkers(matches) if matches else list(model.biomarkers)}
    with _remove_added_nodes_on_error(scene):
        nodes["subjects_table"] = add_subject_table(scene, result.staged, f"{name} subjects")
        if getattr(result, "cv", None) is not None:
            nodes["cv_chart"] = add_cv_plot(scene, result.cv, f"{name} cross-validation")
        if matches is not None:
            for subtype in range(1, int(model.n_subtypes) + 1):
                sequence, browser = add_stage_sequence(scene, model, atlas, subtype,
                                                       f"{name} subtype {subtype} stages", matches)
                nodes["stage_sequences"].append(sequence)
                nodes["stage_browsers"].append(browser)
                nodes["onset_volumes"].append(add_onset_volume(
                    scene, model, atlas, subtype, f"{name} subtype {subtype} onset stage", matches=matches))
    return nodes


def _atlas_and_matches(model, atlas):
    """The atlas and the biomarkers' regions; with the default atlas, (None, None) when nothing matches."""
    if atlas is not None:
        return atlas, match_biomarkers(atlas, model.biomarkers)
    atlas = default_atlas()
    try:
        return atlas, match_biomarkers(atlas, model.biomarkers)
    except ValueError:
        return None, None


def remove_subtype_nodes(scene, nodes) -> None:
    """Remove nodes shown by this module (a :func:`show_subtypes` dict or a list of nodes).

    Sequence browsers take their proxy volumes with them, charts their series and
    tables; colour tables stay (they are shared).
    """
    mrml.remove_shown_nodes(scene, nodes)
