"""Show atrophy network results in an MRML scene.

The display side of :mod:`neuroatrophy.network_analysis`. Every function takes the
scene (``vtkMRMLScene``) as its first argument, or a node of one, and reaches MRML
only through :mod:`neuroatrophy.mrml`, so the same calls work in 3D Slicer
(``slicer.mrmlScene``) and headless with ``slicer-core``. Functions that add nodes
leave the scene as it was when they raise.

Results of a fsaverage5 connectome are drawn on the fsaverage5 surface; results of
an MNI152-2mm connectome become volumes on the connectome's voxel grid (nodes are the
grid's mask voxels in C order; voxels outside the mask are 0).

A network model carries the point-data arrays

``t``
    the patient's seed-map t (one-sample t of Fisher z over connectome subjects;
    NaN where a node has no signal, e.g. the medial wall);
``mean_z``
    the mean Fisher z map;
``network``
    +1 in the positive network (``t > threshold``), -1 in the negative one, else 0;
``network_t``
    the displayed array: ``t`` inside the network, 0 elsewhere, coloured blue-white-red
    over a range symmetric around 0 (the whole cortex stays visible, white outside
    the network).

A convergence model carries ``convergence`` (percentage of patients whose network
holds the node) and the displayed ``convergent`` (the percentage where it reaches the
chosen fraction of patients, else 0), coloured by a sequential table over 0-100 %.
:func:`update_convergence_fraction` re-thresholds it, and its convergent-regions
table, in place. A volume shows the thresholded map by hiding voxels below the
fraction in slice views.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import mrml
from .mrml import _remove_added_nodes_on_error

__all__ = [
    "NETWORK_SCALARS",
    "CONVERGENCE_SCALARS",
    "SIGNS",
    "analysis_grid",
    "show_network",
    "show_network_summary",
    "convergence_values",
    "show_convergence",
    "update_convergence_fraction",
    "targets_from_markups",
    "network_targets",
    "show_targets",
    "show_target_connectivity",
    "show_outcome_results",
    "show_outcome_plot",
]

#: Point-data arrays of a network model, in the order they are added.
NETWORK_SCALARS = ("t", "mean_z", "network", "network_t")
#: Point-data arrays of a convergence model.
CONVERGENCE_SCALARS = ("convergence", "convergent")
#: Network signs: positive or negative connectivity with the atrophy seed.
SIGNS = ("positive", "negative")

_SURFACE_KINDS = ("inflated", "pial", "white")
_NETWORK_DISPLAY = "network_t"
_CONVERGENCE_DISPLAY = "convergent"

# Node attributes that let later calls work from the node alone.
_ATTR = "NeuroAtrophy."
ATTRIBUTE_KIND = _ATTR + "Kind"
ATTRIBUTE_SUBJECT = _ATTR + "SubjectID"
ATTRIBUTE_SPACE = _ATTR + "Space"
ATTRIBUTE_THRESHOLD = _ATTR + "Threshold"
ATTRIBUTE_SIGN = _ATTR + "Sign"
ATTRIBUTE_SPECIFIC = _ATTR + "Specific"
ATTRIBUTE_FRACTION = _ATTR + "Fraction"
ATTRIBUTE_REGIONS_TABLE = _ATTR + "RegionsTableID"
ATTRIBUTE_T_VOLUME = _ATTR + "TVolumeID"

# Colour range of t-maps: this percentile of |t| (so a few extreme nodes do not wash
# out the map), at least the network threshold plus a margin.
_RANGE_PERCENTILE = 99.0
_RANGE_MARGIN = 1.0


# --------------------------------------------------------------------------- grid
def analysis_grid(analysis):
    """The voxel grid ``(mask, affine)`` of a volume analysis, from its connectome store.

    Returns None for a fsaverage5 analysis.

    Raises
    ------
    FileNotFoundError
        If the connectome recorded in ``analysis.options["connectome"]`` is gone.
    ValueError
        If the analysis does not record its connectome.
    """
    if analysis.space == "fsaverage5":
        return None
    from .connectome import ConnectomeStore

    folder = analysis.options.get("connectome")
    if not folder:
        raise ValueError(f"This {analysis.space} analysis does not record its connectome folder; pass grid=")
    return ConnectomeStore.open(folder).mask()


def _checked_grid(analysis, grid):
    mask, affine = analysis_grid(analysis) if grid is None else grid
    mask = np.asarray(mask, dtype=bool)
    n_nodes = analysis.maps.t.shape[1]
    if mask.ndim != 3 or int(mask.sum()) != n_nodes:
        raise ValueError(f"grid mask must be 3-D with one voxel per node ({n_nodes}), "
                         f"got shape {mask.shape} with {int(mask.sum())} voxels")
    return mask, np.asarray(affine, dtype=np.float64)


def _volume_kji(values, mask) -> np.ndarray:
    """Node values (V,) as a float32 volume in Slicer's KJI order, 0 outside the mask."""
    volume = np.zeros(mask.shape, np.float32)
    volume[mask] = np.nan_to_num(values)
    return volume.transpose(2, 1, 0)


# --------------------------------------------------------------------------- networks
def show_network(scene, analysis, patient, surface_kind="inflated", grid=None, name=None, replace=None) -> dict:
    """Show one patient's atrophy network (t-map and thresholded network).

    Parameters
    ----------
    scene : vtkMRMLScene
        Scene to add the nodes to.
    analysis : neuroatrophy.network_analysis.NetworkAnalysis
        Result of ``analyse_networks`` or ``NetworkAnalysis.load``.
    patient : str
        Patient id (one of ``analysis.patients``).
    surface_kind : {"inflated", "pial", "white"}
        fsaverage5 surface the map is drawn on (fsaverage5 analyses).
    grid : (mask, affine), optional
        Voxel grid of an MNI152-2mm analysis; default read from its connectome
        (:func:`analysis_grid`).
    name : str, optional
        Node name; defaults to ``"<patient> atrophy network"``.
    replace : dict, optional
        Nodes shown earlier (the return value of a previous call); removed once the
        new nodes exist.

    Returns
    -------
    dict
        ``"node"``: a vtkMRMLModelNode with the arrays listed in the module
        docstring (fsaverage5), or a vtkMRMLScalarVolumeNode of ``network_t``
        (MNI152-2mm), then with ``"t_volume"``, the whole t-map; and
        ``"color_table"``, the diverging color table.

    Raises
    ------
    ValueError
        If the patient is not in the analysis or the surface or grid does not match.
    """
    index = _patient_index(analysis, patient)
    patient = analysis.patients[index]
    row = analysis.maps.index(patient)  # the maps may also hold the targets' own seed maps
    t = np.asarray(analysis.maps.t[row], dtype=np.float64)
    signed = analysis.networks.signed()[index]
    threshold = float(analysis.networks.threshold)
    shown = np.where(signed != 0, np.nan_to_num(t), 0.0)
    limit = _color_limit(t, threshold)
    name = name or f"{patient} atrophy network"
    with _remove_added_nodes_on_error(scene):
        color_table = mrml.diverging_color_table(scene)
        if analysis.space == "fsaverage5":
            surface = _fsaverage5(surface_kind, t.size)
            scalars = {"t": t, "mean_z": np.asarray(analysis.maps.mean_z[row], dtype=np.float64),
                       "network": signed.astype(np.int8), _NETWORK_DISPLAY: shown}
            node = mrml.add_surface_model(scene, surface.vertices, surface.faces, name, scalars=scalars,
                                          active_scalar=_NETWORK_DISPLAY, color_node=color_table,
                                          scalar_range=(-limit, limit))
            nodes = {"node": node, "color_table": color_table}
        else:
            mask, affine = _checked_grid(analysis, grid)
            node = mrml.add_volume(scene, _volume_kji(shown, mask), affine, name)
            t_volume = mrml.add_volume(scene, _volume_kji(t, mask), affine, f"{patient} t-map")
            for volume in (node, t_volume):
                mrml.set_volume_display(volume, color_table, (-limit, limit))
            node.SetAttribute(ATTRIBUTE_T_VOLUME, t_volume.GetID())
            nodes = {"node": node, "t_volume": t_volume, "color_table": color_table}
        for key, value in ((ATTRIBUTE_KIND, "network"), (ATTRIBUTE_SUBJECT, patient),
                           (ATTRIBUTE_SPACE, analysis.space), (ATTRIBUTE_THRESHOLD, repr(threshold))):
            node.SetAttribute(key, value)
    _remove_replaced(scene, replace, nodes)
    return nodes


def show_network_summary(scene, analysis, name="Atrophy networks", table_node=None):
    """Table node of the per-patient network summary (sizes, peak t, specificity).

    ``table_node`` (a table made earlier) is overwritten instead of adding a new one.
    """
    return mrml.table_from_dataframe(scene, _text_columns(analysis.summary), name, table_node=table_node)


def _patient_index(analysis, patient) -> int:
    patients = analysis.patients
    try:
        return patients.index(str(patient))
    except ValueError:
        from .cohort import format_listing

        raise ValueError(f"Patient {patient!r} is not in this network analysis; patients: "
                         f"{format_listing(patients)}") from None


def _fsaverage5(surface_kind, n_nodes):
    from .surface import load_fsaverage5

    if surface_kind not in _SURFACE_KINDS:
        raise ValueError(f"surface_kind must be one of {list(_SURFACE_KINDS)}, got {surface_kind!r}")
    surface = load_fsaverage5(surface_kind)
    if surface.n_vertices != n_nodes:
        raise ValueError(f"the analysis has {n_nodes} nodes, fsaverage5 has {surface.n_vertices} vertices")
    return surface


def _color_limit(t, threshold) -> float:
    finite = np.abs(t[np.isfinite(t)])
    spread = float(np.percentile(finite, _RANGE_PERCENTILE)) if finite.size else 0.0
    return float(np.ceil(max(spread, threshold + _RANGE_MARGIN)))


def _remove_replaced(scene, replace, keep):
    if not replace:
        return
    kept = {node.GetID() for node in keep.values() if node is not None}
    mrml.remove_nodes(scene, [node for node in replace.values() if node is not None and node.GetID() not in kept])


def _text_columns(table: pd.DataFrame) -> pd.DataFrame:
    """Object columns (e.g. subject ids read from CSV) as str, which table nodes store."""
    table = table.copy()
    for column in table.columns:
        if table[column].dtype == object:
            table[column] = table[column].map(lambda v: "" if pd.isna(v) else str(v)).astype(str)
    return table


# --------------------------------------------------------------------------- convergence
def convergence_values(analysis, sign="positive", specific=False, folder=None, grid=None) -> np.ndarray:
    """Convergence map (V,): percentage of patients whose network holds each node.

    Parameters
    ----------
    analysis : NetworkAnalysis
    sign : {"positive", "negative"}
    specific : bool
        The specificity-filtered map: only network nodes that also beat the null
        seeds count. An analysis loaded from a folder does not hold it; it is then
        read from the folder's ``specific_convergence_<sign>`` file(s).
    folder : str or path-like, optional
        Folder the analysis was saved to (for ``specific=True`` after loading).
    grid : (mask, affine), optional
        Voxel grid of an MNI152-2mm analysis (default: from its connectome).

    Raises
    ------
    ValueError
        Unknown sign, or no specificity-filtered map (analysis run without null
        seeds, or loaded without ``folder``).
    """
    _check_sign(sign)
    if not specific:
        return np.asarray(analysis.convergence_positive if sign == "positive" else analysis.convergence_negative,
                          dtype=np.float64)
    values = analysis.specific_convergence(sign)
    if values is not None:
        return np.asarray(values, dtype=np.float64)
    if folder is None:
        raise ValueError("This analysis holds no specificity-filtered convergence: run it with null seeds "
                         "(n_null > 0), or pass the folder it was saved to")
    return _read_node_map(analysis, folder, f"specific_convergence_{sign}", grid)


def _read_node_map(analysis, folder, stem, grid) -> np.ndarray:
    from pathlib import Path

    folder = Path(folder)
    if analysis.space == "fsaverage5":
        from .io import read_surface_data

        files = [folder / f"{hemi}.{stem}.mgh" for hemi in ("lh", "rh")]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"No specificity-filtered convergence in {folder} (missing {', '.join(missing)}); "
                             "the analysis was run without null seeds")
        return np.concatenate([read_surface_data(f) for f in files]).astype(np.float64)
    import nibabel as nib

    file = folder / f"{stem}.nii.gz"
    if not file.is_file():
        raise ValueError(f"No specificity-filtered convergence in {folder} (missing {file}); "
                         "the analysis was run without null seeds")
    mask, _ = _checked_grid(analysis, grid)
    volume = np.asarray(nib.load(file).dataobj, dtype=np.float64)
    if volume.shape != mask.shape:
        raise ValueError(f"{file} has shape {volume.shape}; the connectome grid is {mask.shape}")
    return volume[mask]


def show_convergence(scene, analysis, sign="positive", fraction=0.75, specific=False, folder=None,
                     surface_kind="inflated", grid=None, name=None, replace=None) -> dict:
    """Show a convergence map, thresholded at a fraction of patients.

    Parameters
    ----------
    scene : vtkMRMLScene
    analysis : NetworkAnalysis
    sign : {"positive", "negative"}
        Convergence of the positive or of the negative networks.
    fraction : float in (0, 1]
        Nodes shared by at least this fraction of patients are shown.
    specific : bool
        Show the specificity-filtered map (see :func:`convergence_values`).
    folder : path-like, optional
        Folder of a loaded analysis (needed for ``specific=True`` after loading).
    surface_kind : {"inflated", "pial", "white"}
    grid : (mask, affine), optional
        Voxel grid of an MNI152-2mm analysis.
    name : str, optional
        Node name; defaults to e.g. ``"Convergence (positive networks)"``.
    replace : dict, optional
        Nodes of a previous call, removed once the new ones exist.

    Returns
    -------
    dict
        ``"node"`` (vtkMRMLModelNode with ``convergence`` and ``convergent``, or a
        vtkMRMLScalarVolumeNode of the percentage), ``"color_table"`` (sequential) and
        ``"regions_table"`` (Desikan-Killiany regions by convergent fraction, see
        ``NetworkAnalysis.convergent_regions``; None for volumes).
    """
    fraction = _check_fraction(fraction)
    percent = convergence_values(analysis, sign, specific, folder, grid)
    kind = "specific " if specific else ""
    name = name or f"Convergence ({kind}{sign} networks)"
    with _remove_added_nodes_on_error(scene):
        color_table = mrml.sequential_color_table(scene)
        regions_table = None
        if analysis.space == "fsaverage5":
            surface = _fsaverage5(surface_kind, percent.size)
            scalars = {"convergence": percent, _CONVERGENCE_DISPLAY: _convergent(percent, fraction)}
            node = mrml.add_surface_model(scene, surface.vertices, surface.faces, name, scalars=scalars,
                                          active_scalar=_CONVERGENCE_DISPLAY, color_node=color_table,
                                          scalar_range=(0.0, 100.0))
            regions_table = mrml.table_from_dataframe(scene, _regions(percent, fraction), f"{name} regions")
            node.SetAttribute(ATTRIBUTE_REGIONS_TABLE, regions_table.GetID())
        else:
            mask, affine = _checked_grid(analysis, grid)
            node = mrml.add_volume(scene, _volume_kji(percent, mask), affine, name)
            mrml.set_volume_display(node, color_table, (0.0, 100.0), lower_threshold=_lowest_shown(fraction))
        for key, value in ((ATTRIBUTE_KIND, "convergence"), (ATTRIBUTE_SPACE, analysis.space),
                           (ATTRIBUTE_SIGN, sign), (ATTRIBUTE_SPECIFIC, str(bool(specific))),
                           (ATTRIBUTE_FRACTION, repr(fraction))):
            node.SetAttribute(key, value)
    nodes = {"node": node, "color_table": color_table, "regions_table": regions_table}
    _remove_replaced(scene, replace, nodes)
    return nodes


def update_convergence_fraction(node, fraction):
    """Re-threshold a convergence node made by :func:`show_convergence`, in place.

    The displayed array (surface) or the slice-view threshold (volume) is updated,
    and so is the node's convergent-regions table.

    Returns
    -------
    pandas.DataFrame or None
        The new convergent-regions table (None for volumes).

    Raises
    ------
    ValueError
        If the node is not a convergence node or the fraction is not in (0, 1].
    """
    kind = node.GetAttribute(ATTRIBUTE_KIND) if hasattr(node, "GetAttribute") else None
    if kind != "convergence":
        node_name = node.GetName() if hasattr(node, "GetName") else type(node).__name__
        raise ValueError(f"node {node_name!r} is not a convergence map made by show_convergence")
    fraction = _check_fraction(fraction)
    regions = None
    if node.IsA("vtkMRMLModelNode"):
        percent = mrml.array_from_model_scalars(node, "convergence")
        mrml.set_model_scalars(node, _CONVERGENCE_DISPLAY, _convergent(percent, fraction), active=False)
        table = node.GetScene().GetNodeByID(node.GetAttribute(ATTRIBUTE_REGIONS_TABLE) or "")
        regions = _regions(percent, fraction)
        if table is not None:
            mrml.table_from_dataframe(node.GetScene(), regions, table.GetName(), table_node=table)
    else:
        mrml.set_volume_display(node, lower_threshold=_lowest_shown(fraction))
    node.SetAttribute(ATTRIBUTE_FRACTION, repr(fraction))
    return regions


def _convergent(percent, fraction) -> np.ndarray:
    # The same comparison as network.convergent_regions.
    return np.where(percent >= 100.0 * fraction, percent, 0.0)


def _lowest_shown(fraction) -> float:
    # Percentages are multiples of 100 / n_patients: a hair below 100 * fraction keeps
    # nodes exactly at the fraction visible despite float rounding.
    return 100.0 * fraction - 1e-6


def _regions(percent, fraction) -> pd.DataFrame:
    from .network import convergent_regions
    from .surface import dk_atlas

    return convergent_regions(percent, dk_atlas(), fraction)


def _check_sign(sign):
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {list(SIGNS)}, got {sign!r}")


def _check_fraction(fraction) -> float:
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}") from None
    if not 0 < value <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    return value


# --------------------------------------------------------------------------- targets
def targets_from_markups(node, radius_mm=None):
    """User targets from a markups point list (labels are the target names, RAS = MNI mm).

    Raises
    ------
    ValueError
        If the node is not a markups node, has no points, or two points share a label.
    """
    from .targets import DEFAULT_RADIUS_MM, targets_from_points

    points, labels = mrml.points_from_markups(node)
    return targets_from_points(points, labels, DEFAULT_RADIUS_MM if radius_mm is None else radius_mm)


def network_targets(markups=None, table=None, standard=True):
    """The targets of an analysis: standard ones, plus user ones from markups and/or a table.

    Parameters
    ----------
    markups : vtkMRMLMarkupsNode, optional
        User targets placed in Slicer (see :func:`targets_from_markups`).
    table : str, path-like or DataFrame, optional
        User targets from a CSV/TSV (``name, x, y, z[, radius_mm]``).
    standard : bool
        Include :func:`neuroatrophy.targets.standard_targets`.

    Raises
    ------
    ValueError
        If there are no targets at all, or two targets share a name.
    """
    from .targets import standard_targets, targets_from_table, targets_table

    chosen = standard_targets() if standard else []
    if markups is not None:
        chosen += targets_from_markups(markups)
    if table is not None:
        chosen += targets_from_table(table)
    if not chosen:
        raise ValueError("No targets: choose the standard targets, a markups node or a target table")
    # Round trip through the table reader: it rejects duplicate names, naming them.
    return targets_from_table(targets_table(chosen))


def show_targets(scene, targets, name="rTMS targets", replace=None) -> dict:
    """Show targets as a locked point list labelled with their names, and as a table.

    Parameters
    ----------
    scene : vtkMRMLScene
    targets : list of neuroatrophy.targets.Target, or a DataFrame
        Targets, or a targets table (``NetworkAnalysis.targets``).
    name : str
        Point list name; the table is ``"<name> table"``.
    replace : dict, optional
        Nodes of a previous call, removed once the new ones exist.

    Returns
    -------
    dict
        ``"markups"`` (vtkMRMLMarkupsFiducialNode, one point per target at its MNI
        centre; the description of each point gives radius and indication) and
        ``"table"`` (vtkMRMLTableNode of the targets with citations).
    """
    from .targets import targets_from_table, targets_table

    if isinstance(targets, pd.DataFrame):
        targets = targets_from_table(targets)
    table = targets_table(targets)
    with _remove_added_nodes_on_error(scene):
        markups = mrml.add_markups_points(scene, table[["x", "y", "z"]].to_numpy(float), list(table["name"]), name)
        for index, target in enumerate(targets):
            markups.SetNthControlPointDescription(
                index, f"{target.radius_mm:g} mm sphere; {target.indication or target.kind + ' target'}")
        markups.SetLocked(True)
        table_node = mrml.table_from_dataframe(scene, table, f"{name} table")
    nodes = {"markups": markups, "table": table_node}
    _remove_replaced(scene, replace, nodes)
    return nodes


def show_target_connectivity(scene, analysis, method="map", name=None, table_node=None):
    """Table node of per-patient connectivity with each target (``subject_id`` + one column per target).

    ``method="map"``: the patient's mean Fisher-z network map averaged in the target
    sphere; ``"roi"``: Fisher z between the seed's and the target's mean time series.
    """
    if method not in ("map", "roi"):
        raise ValueError(f"method must be 'map' or 'roi', got {method!r}")
    table = analysis.target_connectivity if method == "map" else analysis.target_connectivity_roi
    name = name or ("Target connectivity" if method == "map" else "Target connectivity (ROI)")
    table = table.copy()
    table.index = table.index.map(str).rename("subject_id")
    return mrml.table_from_dataframe(scene, table, name, table_node=table_node)


# --------------------------------------------------------------------------- outcome
def show_outcome_results(scene, results, name="Target-outcome association", table_node=None):
    """Table node of ``neuroatrophy.outcome.target_outcome_analysis`` results (one row per target)."""
    if not isinstance(results, pd.DataFrame) or "target" not in results.columns:
        raise ValueError("results must be the DataFrame of target_outcome_analysis (with a 'target' column)")
    return mrml.table_from_dataframe(scene, _text_columns(results), name, table_node=table_node)


def show_outcome_plot(scene, connectivity, outcome, target, results=None, name=None, outcome_name=None):
    """Scatter plot of connectivity with one target against outcome, with the least-squares line.

    Parameters
    ----------
    scene : vtkMRMLScene
    connectivity : pandas.DataFrame
        Index subject_id, one column per target (``NetworkAnalysis.target_connectivity``).
    outcome : pandas.Series
        Outcome per subject, indexed by subject_id (e.g. a cohort column); its
        values for the subjects of ``connectivity`` are used.
    target : str
        Column of ``connectivity``.
    results : pandas.DataFrame, optional
        ``target_outcome_analysis`` results; the target's r and p go in the title.
    name : str, optional
        Chart name; defaults to ``"<target> vs <outcome>"``.
    outcome_name : str, optional
        Axis title of the outcome (default ``outcome.name``).

    Returns
    -------
    vtkMRMLPlotChartNode
        A chart with a scatter series ``"Patients"`` (table ``"<name> patients"``:
        ``subject_id, connectivity, outcome``) and line series ``"Least-squares fit"``,
        ``"Lower 95 % band"``, ``"Upper 95 % band"`` (table ``"<name> fit"``, from
        :func:`neuroatrophy.outcome.fit_line`).

    Raises
    ------
    ValueError
        Unknown target, subjects without an outcome, or too few subjects for a line.
    """
    from .cohort import format_listing
    from .outcome import fit_line

    columns = {str(column): column for column in connectivity.columns}
    if str(target) not in columns:
        raise ValueError(f"target {target!r} is not a column of the connectivity table; targets: "
                         f"{format_listing(list(columns))}")
    subjects = [str(s) for s in connectivity.index]
    values = pd.Series(np.asarray(outcome), index=[str(s) for s in outcome.index])
    missing = [s for s in subjects if s not in values.index]
    if missing:
        raise ValueError(f"No outcome for subject(s) {format_listing(missing)}")
    y = pd.to_numeric(values.loc[subjects], errors="coerce").to_numpy(np.float64)
    if not np.all(np.isfinite(y)):
        bad = np.asarray(subjects)[~np.isfinite(y)]
        raise ValueError(f"Outcome is missing or not a number for {format_listing(bad)}")
    x = connectivity[columns[str(target)]].to_numpy(np.float64)
    line = fit_line(x, y)
    outcome_name = outcome_name or (str(outcome.name) if outcome.name is not None else "outcome")
    name = name or f"{target} vs {outcome_name}"
    points = pd.DataFrame({"subject_id": subjects, "connectivity": x, "outcome": y})
    fit = pd.DataFrame({"connectivity": line["x"], "fit": line["y"], "lower": line["lower"], "upper": line["upper"]})
    band = f"{100 * line['level']:g} % band"
    with _remove_added_nodes_on_error(scene):
        points_table = mrml.table_from_dataframe(scene, points, f"{name} patients")
        fit_table = mrml.table_from_dataframe(scene, fit, f"{name} fit")
        chart = mrml.add_plot(scene, points_table, "connectivity", "outcome", name, plot_type="Scatter",
                              x_label=f"Connectivity with {target} (Fisher z)", y_label=outcome_name,
                              colors=[(0.1, 0.3, 0.7)], marker_styles=["circle"])
        chart.GetNthPlotSeriesNode(0).SetName("Patients")
        chart.SetTitle(_outcome_title(name, target, results))
        mrml.add_plot_series(scene, chart, fit_table, "connectivity", "fit", "Least-squares fit",
                             color=(0.8, 0.1, 0.1))
        for column, label in (("lower", f"Lower {band}"), ("upper", f"Upper {band}")):
            mrml.add_plot_series(scene, chart, fit_table, "connectivity", column, label, line_style="dash",
                                 color=(0.6, 0.6, 0.6))
    return chart


def _outcome_title(name, target, results) -> str:
    if results is None or "target" not in getattr(results, "columns", ()):
        return name
    rows = results[results["target"].astype(str) == str(target)]
    if rows.empty:
        return name
    row = rows.iloc[0]
    title = f"{name}: r = {row['r']:+.2f}"
    if "p_permutation" in row and np.isfinite(row["p_permutation"]):
        title += f", permutation p = {row['p_permutation']:.3g}"
    return title
