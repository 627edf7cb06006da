"""Show AtrophyNetwork results in an MRML scene.

Every function takes the scene (``vtkMRMLScene``) as its first argument, or a node
of one, and reaches MRML only through :mod:`neuroatrophy.mrml`. The same calls
therefore work in 3D Slicer (``slicer.mrmlScene``) and headless with ``slicer-core``.

A patient map is shown as a model of the fsaverage5 surface carrying the point-data
arrays

``z``
    vertex-wise deviation from the normative model (NaN on the medial wall);
``centile``
    the same as a centile (0-100);
``atrophic``
    1 on atrophic vertices (``z`` below the threshold, in clusters of at least the
    minimum size), else 0;
``cluster``
    cluster label of each atrophic vertex (1 = largest), else 0;
``atrophy_z``
    the displayed array: ``z`` on atrophic vertices and 0 elsewhere.

``atrophy_z`` is coloured by a blue-white-red table with a range symmetric around
0, so the whole cortex stays visible (white) and atrophy stands out in blue. The
threshold is applied through this mask rather than by hiding the rest of the
surface, and :func:`update_threshold` recomputes it (clusters included) in
milliseconds, so a GUI slider can update the map live.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import mrml

__all__ = [
    "SCALAR_NAMES",
    "show_patient_map",
    "update_threshold",
    "show_centile_curves",
    "show_fit_quality",
    "remove_plot",
]

#: Point-data arrays of a patient-map model, in the order they are added.
SCALAR_NAMES = ("z", "centile", "atrophic", "cluster", "atrophy_z")
_DISPLAY_SCALAR = "atrophy_z"
_SURFACE_KINDS = ("inflated", "pial", "white")

# Model node attributes that let update_threshold redo the map from the node alone.
_ATTR = "NeuroAtrophy."
ATTRIBUTE_SUBJECT = _ATTR + "SubjectID"
ATTRIBUTE_SURFACE = _ATTR + "Surface"
ATTRIBUTE_THRESHOLD = _ATTR + "Threshold"
ATTRIBUTE_MIN_CLUSTER_SIZE = _ATTR + "MinClusterSize"
ATTRIBUTE_REGIONS_TABLE = _ATTR + "RegionsTableID"

# The colour range covers this percentile of |z| over the cortex (so a few extreme
# vertices do not wash out the map) and at least |threshold| + this margin.
_RANGE_PERCENTILE = 99.0
_RANGE_MARGIN = 1.0


def show_patient_map(scene, patient_map, surface_kind="inflated", threshold=None, name=None) -> dict:
    """Add a patient's atrophy map to the scene as a coloured fsaverage5 surface.

    Parameters
    ----------
    scene : vtkMRMLScene
        Scene to add the nodes to.
    patient_map : neuroatrophy.thickness_model.PatientMap
        Result of ``CorticalThicknessModel.patient_map``.
    surface_kind : {"inflated", "pial", "white"}
        fsaverage5 surface to draw the map on.
    threshold : float, optional
        z threshold of the displayed map. Defaults to the map's own threshold, in
        which case the map's atrophy mask is shown as computed; another value
        recomputes the mask with the map's minimum cluster size.
    name : str, optional
        Model name; defaults to ``"<subject_id> atrophy map"``.

    Returns
    -------
    dict
        ``"model"`` (vtkMRMLModelNode with the arrays listed in :mod:`neuroatrophy.scene`),
        ``"color_table"`` (vtkMRMLColorTableNode), ``"regions_table"`` (vtkMRMLTableNode
        of ``patient_map.regions``).

    Raises
    ------
    ValueError
        If ``surface_kind`` is unknown or the map does not have one value per vertex
        of the surface.
    """
    from .surface import load_fsaverage5

    surface = load_fsaverage5(_check_surface_kind(surface_kind))
    z = _vertex_values(patient_map.z, surface.n_vertices, "patient_map.z")
    centile = _vertex_values(patient_map.centile, surface.n_vertices, "patient_map.centile")
    atrophy = patient_map.atrophy
    if threshold is not None:
        threshold = _check_threshold(threshold)
    if threshold is None or threshold == float(atrophy.threshold):
        threshold = float(atrophy.threshold)
        mask, clusters = np.asarray(atrophy.mask, dtype=bool), np.asarray(atrophy.cluster_labels)
    else:
        recomputed = _atrophy(z, threshold, int(atrophy.min_cluster_size), surface)
        mask, clusters = recomputed.mask, recomputed.cluster_labels
    name = name or f"{patient_map.subject_id} atrophy map"
    scalars = {
        "z": z,
        "centile": centile,
        "atrophic": mask.astype(np.uint8),
        "cluster": clusters.astype(np.int32),
        _DISPLAY_SCALAR: _masked_z(z, mask),
    }
    limit = _color_limit(z, threshold)
    color_table = mrml.diverging_color_table(scene)
    model = mrml.add_surface_model(
        scene, surface.vertices, surface.faces, name, scalars=scalars, active_scalar=_DISPLAY_SCALAR,
        color_node=color_table, scalar_range=(-limit, limit),
    )
    try:
        regions = mrml.table_from_dataframe(scene, patient_map.regions, f"{name} regions")
    except BaseException:
        scene.RemoveNode(model)
        raise
    for key, value in (
        (ATTRIBUTE_SUBJECT, str(patient_map.subject_id)),
        (ATTRIBUTE_SURFACE, surface_kind),
        (ATTRIBUTE_THRESHOLD, repr(float(threshold))),
        (ATTRIBUTE_MIN_CLUSTER_SIZE, str(int(atrophy.min_cluster_size))),
        (ATTRIBUTE_REGIONS_TABLE, regions.GetID()),
    ):
        model.SetAttribute(key, value)
    return {"model": model, "color_table": color_table, "regions_table": regions}


def update_threshold(model_node, threshold, min_cluster_size=None):
    """Recompute the displayed atrophy of a patient-map model for a new threshold.

    Parameters
    ----------
    model_node : vtkMRMLModelNode
        Model made by :func:`show_patient_map`.
    threshold : float
        New z threshold (a vertex is atrophic when ``z < threshold``).
    min_cluster_size : int, optional
        New minimum cluster size in vertices; defaults to the one stored on the node.

    Returns
    -------
    neuroatrophy.atrophy.AtrophyMap
        The recomputed map (its ``mask`` is the new ``atrophic`` array).

    Raises
    ------
    ValueError
        If the node is not a patient-map model or a parameter is invalid.
    """
    from .surface import load_fsaverage5

    surface_kind = model_node.GetAttribute(ATTRIBUTE_SURFACE) if hasattr(model_node, "GetAttribute") else None
    if not surface_kind:
        node_name = model_node.GetName() if hasattr(model_node, "GetName") else type(model_node).__name__
        raise ValueError(f"model_node {node_name!r} is not a patient atrophy map made by show_patient_map")
    if min_cluster_size is None:
        min_cluster_size = int(model_node.GetAttribute(ATTRIBUTE_MIN_CLUSTER_SIZE) or 0)
    threshold = _check_threshold(threshold)
    surface = load_fsaverage5(_check_surface_kind(surface_kind))
    z = mrml.array_from_model_scalars(model_node, "z")
    amap = _atrophy(z, threshold, int(min_cluster_size), surface)
    mrml.set_model_scalars(model_node, "atrophic", amap.mask.astype(np.uint8), active=False)
    mrml.set_model_scalars(model_node, "cluster", amap.cluster_labels.astype(np.int32), active=False)
    mrml.set_model_scalars(model_node, _DISPLAY_SCALAR, _masked_z(z, amap.mask), active=False)
    model_node.SetAttribute(ATTRIBUTE_THRESHOLD, repr(threshold))
    model_node.SetAttribute(ATTRIBUTE_MIN_CLUSTER_SIZE, str(int(min_cluster_size)))
    display = model_node.GetDisplayNode()
    if display is not None:
        # Widen the symmetric colour range if the threshold moved past it.
        limit = max(abs(display.GetScalarRange()[0]), abs(threshold) + _RANGE_MARGIN)
        display.SetScalarRange(-limit, limit)
    return amap


def show_centile_curves(scene, thickness_model, region, patient_map=None, patient_value=None, patient_age=None,
                        sex=None, site=None, name=None):
    """Plot the normative centiles of a region's mean thickness against age, with the patient.

    Parameters
    ----------
    scene : vtkMRMLScene
        Scene to add the nodes to.
    thickness_model : neuroatrophy.thickness_model.CorticalThicknessModel
        Fitted model; its ``region_centile_curves`` gives the 5th-95th centiles.
    region : str
        Desikan-Killiany region, e.g. ``"L_superiortemporal"``.
    patient_map : PatientMap, optional
        Gives the patient's sex, site, age and the region's mean thickness.
    patient_value, patient_age : float, optional
        The patient's point, overriding ``patient_map``; without any patient the
        chart holds the curves only.
    sex : {"F", "M"}, optional
        Sex of the curves (default: the patient's, else ``"F"``).
    site : str, optional
        Site of the curves (default: the patient's, else the model's first site).
    name : str, optional
        Chart name; defaults to ``"<region> thickness"`` (its tables add " centiles" and " patient").

    Returns
    -------
    vtkMRMLPlotChartNode

    Raises
    ------
    ValueError
        If the region is unknown to the model, or only one of age and value is known.
    """
    regions = list(thickness_model.region_names)
    if region not in regions:
        raise ValueError(f"region {region!r} is not a region of the model; regions: {', '.join(regions)}")
    if patient_map is not None:
        sex = sex or patient_map.sex
        site = site or patient_map.site
        if patient_age is None:
            patient_age = patient_map.age
        if patient_value is None:
            patient_value = patient_map.regional_thickness[region]
    sex = sex or "F"
    if site is not None and site not in thickness_model.sites_:
        site = None  # an unseen site has no offset of its own: the curves of the first site are the reference
    curves = thickness_model.region_centile_curves(region, sex=sex, site=site)
    name = name or f"{region} thickness"
    centile_columns = {column: curves[column].to_numpy() for column in curves.columns if column != "age"}
    if (patient_age is None) != (patient_value is None):
        raise ValueError(
            f"give both patient_age and patient_value (or a patient_map), got age={patient_age!r}, "
            f"value={patient_value!r}"
        )
    if patient_age is not None:
        return mrml.centile_plot(scene, curves["age"].to_numpy(), centile_columns, float(patient_age),
                                 float(patient_value), name)
    table = mrml.table_from_dataframe(scene, curves, f"{name} centiles")
    try:
        return mrml.add_plot(scene, table, "age", list(centile_columns), name, x_label="Age (years)",
                             y_label="Cortical thickness (mm)")
    except BaseException:
        scene.RemoveNode(table)
        raise


def show_fit_quality(scene, table_df, calibration, name="Normative model fit quality"):
    """Summarise a model's fit quality on held-out controls in a table node.

    Parameters
    ----------
    scene : vtkMRMLScene
        Scene to add the table to.
    table_df : pandas.DataFrame
        Per-vertex metrics from ``CorticalThicknessModel.evaluate`` (columns ``EV``,
        ``SMSE``, ``MSLL``, ``Rho``; others are ignored).
    calibration : dict
        z calibration from the same call (``z_mean``, ``z_sd``, ``frac_beyond_1.96``).
    name : str
        Table node name.

    Returns
    -------
    vtkMRMLTableNode
        Columns ``measure``, ``value`` and ``reference`` (the value of a perfectly
        calibrated model, NaN where there is none); metrics are medians over vertices.

    Raises
    ------
    ValueError
        If neither the metrics nor the calibration hold any known measure.
    """
    rows = []
    for column, label in _METRIC_LABELS.items():
        if column in table_df.columns:
            rows.append((f"{label} (median over vertices)", float(np.nanmedian(table_df[column])), np.nan))
    for key, (label, reference) in _CALIBRATION_LABELS.items():
        if key in calibration:
            rows.append((label, float(calibration[key]), reference))
    if not rows:
        raise ValueError(
            f"no fit-quality measure found: metrics columns {list(table_df.columns)}, "
            f"calibration keys {sorted(calibration)}; expected {list(_METRIC_LABELS)} or {list(_CALIBRATION_LABELS)}"
        )
    summary = pd.DataFrame(rows, columns=["measure", "value", "reference"])
    summary["measure"] = summary["measure"].astype(str)
    return mrml.table_from_dataframe(scene, summary, name)


def remove_plot(scene, chart_node) -> None:
    """Remove a chart, its series and the tables only they use (e.g. a replaced centile plot)."""
    series = [chart_node.GetNthPlotSeriesNode(i) for i in range(chart_node.GetNumberOfPlotSeriesNodes())]
    tables = {s.GetTableNodeID() for s in series if s is not None and s.GetTableNodeID()}
    scene.RemoveNode(chart_node)
    for node in series:
        if node is not None and scene.IsNodePresent(node):
            scene.RemoveNode(node)
    for table_id in tables:
        if not _referenced_by_series(scene, table_id):
            table = scene.GetNodeByID(table_id)
            if table is not None:
                scene.RemoveNode(table)


_METRIC_LABELS = {
    "EV": "Explained variance",
    "SMSE": "Standardised mean squared error",
    "MSLL": "Mean standardised log loss",
    "Rho": "Pearson correlation",
}
_CALIBRATION_LABELS = {
    "z_mean": ("Mean z of held-out controls", 0.0),
    "z_sd": ("SD of z of held-out controls", 1.0),
    "frac_beyond_1.96": ("Fraction of |z| > 1.96", 0.05),
    "frac_below_-1.96": ("Fraction of z < -1.96", 0.025),
}


def _check_surface_kind(kind) -> str:
    if kind not in _SURFACE_KINDS:
        raise ValueError(f"surface_kind must be one of {list(_SURFACE_KINDS)}, got {kind!r}")
    return kind


def _check_threshold(threshold) -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number, got {threshold!r}") from None
    if not np.isfinite(value):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    return value


def _vertex_values(values, n_vertices, what) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (n_vertices,):
        raise ValueError(f"{what} must have one value per fsaverage5 vertex ({n_vertices},), got {values.shape}")
    return values


def _atrophy(z, threshold, min_cluster_size, surface):
    from .atrophy import atrophy_map

    adjacency = surface.adjacency() if min_cluster_size > 0 else None
    return atrophy_map(z, threshold=threshold, min_cluster_size=min_cluster_size, adjacency=adjacency,
                       valid=np.isfinite(z))


def _masked_z(z, mask) -> np.ndarray:
    return np.where(mask & np.isfinite(z), z, 0.0)


def _color_limit(z, threshold) -> float:
    finite = np.abs(z[np.isfinite(z)])
    spread = float(np.percentile(finite, _RANGE_PERCENTILE)) if finite.size else 0.0
    return float(np.ceil(max(spread, abs(threshold) + _RANGE_MARGIN)))


def _referenced_by_series(scene, table_id) -> bool:
    count = scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode")
    return any(scene.GetNthNodeByClass(i, "vtkMRMLPlotSeriesNode").GetTableNodeID() == table_id for i in range(count))
