"""The bridge between NeuroAtrophy results and MRML nodes.

Every function takes the MRML scene (``vtkMRMLScene``) as its first argument, or
a node that belongs to one, and never touches ``slicer.mrmlScene``,
``slicer.app``, ``slicer.modules`` or Qt. The same code therefore runs inside 3D
Slicer (pass ``slicer.mrmlScene``) and headless with the ``slicer-core`` wheel
(pass ``slicer.vtkMRMLScene()``). ``slicer`` and ``vtk`` are imported lazily, so
importing this module works without them.

Functions that create nodes leave the scene as it was when they raise: nodes
added before the error are removed again.

Coordinates are RAS (the MRML convention); storage nodes convert to LPS on disk.
"""

import contextlib
import functools
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

__all__ = [
    "add_surface_model",
    "set_model_scalars",
    "array_from_model_scalars",
    "mesh_from_model",
    "set_scalar_threshold",
    "diverging_color_table",
    "sequential_color_table",
    "table_from_dataframe",
    "dataframe_from_table",
    "add_plot",
    "add_plot_series",
    "centile_plot",
    "add_volume",
    "array_from_volume",
    "ijk_to_ras_from_volume",
    "volume_from_nifti",
    "set_volume_display",
    "add_markups_points",
    "points_from_markups",
    "remove_nodes",
    "save_scene",
    "load_scene",
]

# Storage node classes that the Markups module logic registers in Slicer; a bare
# scene does not know them, so scenes holding markups could neither be written
# with a default storage node nor parsed back.
_EXTRA_NODE_CLASSES = (
    "vtkMRMLMarkupsJsonStorageNode",
    "vtkMRMLMarkupsPlaneJsonStorageNode",
    "vtkMRMLMarkupsROIJsonStorageNode",
    "vtkMRMLMarkupsFiducialStorageNode",
)

# File extensions written by save_scene, by storage node class; other storable
# nodes use their storage node's default extension.
_WRITE_EXTENSIONS = {
    "vtkMRMLModelStorageNode": "vtk",  # legacy VTK keeps point-data arrays
    "vtkMRMLTableStorageNode": "tsv",
    "vtkMRMLVolumeArchetypeStorageNode": "nrrd",
    "vtkMRMLMarkupsJsonStorageNode": "mrk.json",
    "vtkMRMLColorTableStorageNode": "ctbl",
}

_DIVERGING_ANCHORS = ((0.02, 0.19, 0.58), (1.0, 1.0, 1.0), (0.70, 0.02, 0.15))
_SEQUENTIAL_ANCHORS = ((1.0, 1.0, 0.80), (0.99, 0.55, 0.24), (0.50, 0.0, 0.15))


# --------------------------------------------------------------------------
# Lazy imports and small checks
# --------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _mrml():
    """Return the ``slicer``, ``vtk`` and ``numpy_support`` modules (imported once)."""
    try:
        import slicer
        import vtk
        from vtk.util import numpy_support
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "neuroatrophy.mrml needs 3D Slicer or the slicer-core package "
            "(pip install 'neuroatrophy[mrml]')"
        ) from error
    return slicer, vtk, numpy_support


def new_scene():
    """A new, empty ``vtkMRMLScene`` (for headless use; in Slicer pass ``slicer.mrmlScene``).

    Raises ImportError with the install hint when neither Slicer nor slicer-core is available.
    """
    return _mrml()[0].vtkMRMLScene()


def _check_scene(scene):
    _mrml()  # fail with the install hint before anything else
    if scene is None or not hasattr(scene, "IsA") or not scene.IsA("vtkMRMLScene"):
        raise ValueError(f"scene must be a vtkMRMLScene, got {type(scene).__name__}")


def _check_node(node, class_name, param):
    if node is None or not hasattr(node, "IsA") or not node.IsA(class_name):
        raise ValueError(f"{param} must be a {class_name}, got {type(node).__name__}")


def _check_name(name, param="name"):
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{param} must be a non-empty string, got {name!r}")


def _nodes(scene, class_name="vtkMRMLNode"):
    """All nodes of ``class_name`` in ``scene``, in scene order."""
    count = scene.GetNumberOfNodesByClass(class_name)
    return [scene.GetNthNodeByClass(i, class_name) for i in range(count)]


@contextlib.contextmanager
def _remove_added_nodes_on_error(scene):
    """Remove the nodes added to ``scene`` inside the block if the block raises."""
    before = {node.GetID() for node in _nodes(scene)}
    try:
        yield
    except BaseException:
        added = [node for node in _nodes(scene) if node.GetID() not in before]
        for node in reversed(added):
            if scene.IsNodePresent(node):
                scene.RemoveNode(node)
        raise


def _register_node_classes(scene):
    """Register storage node classes that only module logics register in Slicer."""
    slicer, _, _ = _mrml()
    for class_name in _EXTRA_NODE_CLASSES:
        node_class = getattr(slicer, class_name, None)
        if node_class is not None and not scene.IsNodeClassRegistered(class_name):
            scene.RegisterNodeClass(node_class())


def _resolve_color_node(scene, color_node):
    """Accept a color node or a node ID; return the node, which must be in ``scene``."""
    if isinstance(color_node, str):
        node = scene.GetNodeByID(color_node)
        if node is None:
            raise ValueError(f"color_node: no node with ID {color_node!r} in the scene")
        color_node = node
    _check_node(color_node, "vtkMRMLColorNode", "color_node")
    if not scene.IsNodePresent(color_node):
        raise ValueError(f"color_node {color_node.GetName()!r} is not in the scene")
    return color_node


def _check_range(values, param):
    """Return ``values`` as a (lower, upper) pair of finite floats with lower <= upper."""
    try:
        lower, upper = (float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{param} must be a pair (lower, upper), got {values!r}") from None
    if not (np.isfinite(lower) and np.isfinite(upper)) or lower > upper:
        raise ValueError(f"{param} must be finite with lower <= upper, got {values!r}")
    return lower, upper


# --------------------------------------------------------------------------
# Surface models
# --------------------------------------------------------------------------
def _check_mesh(vertices, faces):
    vertices = np.asarray(vertices)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or len(vertices) == 0:
        raise ValueError(f"vertices must have shape (n_vertices, 3), got {vertices.shape}")
    if not np.issubdtype(vertices.dtype, np.floating):
        vertices = vertices.astype(np.float64)
    if not np.all(np.isfinite(vertices)):
        raise ValueError("vertices contains NaN or infinite coordinates")
    faces = np.asarray(faces)
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must have shape (n_faces, 3), got {faces.shape}")
    if faces.size and not np.issubdtype(faces.dtype, np.integer):
        raise ValueError(f"faces must hold integer vertex indices, got dtype {faces.dtype}")
    if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError(
            f"faces must index vertices 0..{len(vertices) - 1}, "
            f"got indices {faces.min()}..{faces.max()}"
        )
    return vertices, faces.astype(np.int64)


def _check_point_values(values, n_points, name):
    """Return ``values`` as a numeric (n_points,) array; the message names the array."""
    _check_name(name, "scalar name")
    values = np.asarray(values)
    if values.dtype == bool:
        values = values.astype(np.uint8)
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise ValueError(f"scalars {name!r} must be numeric, got dtype {values.dtype}")
    if values.shape != (n_points,):
        raise ValueError(
            f"scalars {name!r} must have shape ({n_points},) (one value per vertex), "
            f"got {values.shape}"
        )
    return np.ascontiguousarray(values)


def _polydata(vertices, faces):
    _, vtk, numpy_support = _mrml()
    points = vtk.vtkPoints()
    points.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(vertices), deep=True))
    offsets = np.arange(0, 3 * len(faces) + 1, 3, dtype=np.int64)
    polys = vtk.vtkCellArray()
    polys.SetData(
        numpy_support.numpy_to_vtkIdTypeArray(offsets, deep=True),
        numpy_support.numpy_to_vtkIdTypeArray(np.ascontiguousarray(faces.ravel()), deep=True),
    )
    polydata = vtk.vtkPolyData()
    polydata.SetPoints(points)
    polydata.SetPolys(polys)
    return polydata


def _vtk_point_array(values, name):
    _, _, numpy_support = _mrml()
    array = numpy_support.numpy_to_vtk(values, deep=True)
    array.SetName(name)
    return array


def add_surface_model(
    scene,
    vertices,
    faces,
    name,
    scalars=None,
    active_scalar=None,
    color_node=None,
    scalar_range=None,
    threshold=None,
    visible=True,
):
    """Add a triangle surface with per-vertex scalars as a model node.

    Parameters
    ----------
    scene : vtkMRMLScene
        Scene to add the nodes to.
    vertices : array_like of shape (n_vertices, 3)
        Vertex coordinates in RAS (mm).
    faces : array_like of int, shape (n_faces, 3)
        Triangles as indices into ``vertices``.
    name : str
        Name of the model node.
    scalars : dict of str to array_like of shape (n_vertices,), optional
        Point-data arrays to attach (booleans are stored as uint8).
    active_scalar : str, optional
        Array shown on the surface; defaults to the first of ``scalars``.
    color_node : vtkMRMLColorNode or str, optional
        Color table (node or node ID) that maps the active scalar to colors.
    scalar_range : (float, float), optional
        Manual color range; by default the range of the active scalar's data.
    threshold : (float, float), optional
        Show only the vertices whose active scalar lies in ``[lower, upper]``.
    visible : bool, default True
        Visibility of the model.

    Returns
    -------
    vtkMRMLModelNode
        The model, with a ``vtkMRMLModelDisplayNode``.

    Raises
    ------
    ValueError
        If the mesh is malformed, a scalar array does not have one value per
        vertex, ``active_scalar`` is not one of ``scalars``, or a range is invalid.
    """
    _check_scene(scene)
    _check_name(name)
    vertices, faces = _check_mesh(vertices, faces)
    scalars = dict(scalars or {})
    arrays = {key: _check_point_values(value, len(vertices), key) for key, value in scalars.items()}
    if active_scalar is None and arrays:
        active_scalar = next(iter(arrays))
    if active_scalar is not None and active_scalar not in arrays:
        raise ValueError(
            f"active_scalar {active_scalar!r} is not one of the scalars {sorted(arrays)}"
        )
    if threshold is not None:
        if active_scalar is None:
            raise ValueError("threshold needs scalars to threshold")
        threshold = _check_range(threshold, "threshold")
    if scalar_range is not None:
        scalar_range = _check_range(scalar_range, "scalar_range")
    if color_node is not None:
        color_node = _resolve_color_node(scene, color_node)

    polydata = _polydata(vertices, faces)
    for key, values in arrays.items():
        polydata.GetPointData().AddArray(_vtk_point_array(values, key))

    with _remove_added_nodes_on_error(scene):
        model = scene.AddNewNodeByClass("vtkMRMLModelNode", name)
        model.SetAndObservePolyData(polydata)
        model.CreateDefaultDisplayNodes()
        display = model.GetDisplayNode()
        display.SetVisibility(bool(visible))
        if color_node is not None:
            display.SetAndObserveColorNodeID(color_node.GetID())
        if active_scalar is not None:
            _show_scalar(display, active_scalar)
        if scalar_range is not None:
            display.SetScalarRangeFlag(display.UseManualScalarRange)
            display.SetScalarRange(*scalar_range)
        if threshold is not None:
            display.SetThresholdRange(*threshold)
            display.SetThresholdEnabled(True)
    return model


def _show_scalar(display, name):
    _, vtk, _ = _mrml()
    display.SetActiveScalar(name, vtk.vtkAssignAttribute.POINT_DATA)
    display.SetScalarVisibility(True)


def _model_polydata(model_node, param="model_node"):
    _check_node(model_node, "vtkMRMLModelNode", param)
    polydata = model_node.GetPolyData()
    if polydata is None or polydata.GetPoints() is None:
        raise ValueError(f"{param} {model_node.GetName()!r} has no surface")
    return polydata


def set_model_scalars(model_node, name, values, active=True):
    """Add or replace a point-data array of a model.

    Parameters
    ----------
    model_node : vtkMRMLModelNode
        Model with a surface.
    name : str
        Array name; an existing array with this name is replaced.
    values : array_like of shape (n_vertices,)
        One value per vertex (booleans are stored as uint8).
    active : bool, default True
        Also make it the displayed scalar (when the model has a display node).

    Raises
    ------
    ValueError
        If the model has no surface or ``values`` is not one number per vertex.
    """
    polydata = _model_polydata(model_node)
    values = _check_point_values(values, polydata.GetNumberOfPoints(), name)
    point_data = polydata.GetPointData()
    point_data.RemoveArray(name)
    point_data.AddArray(_vtk_point_array(values, name))
    polydata.Modified()
    display = model_node.GetDisplayNode()
    if active and display is not None:
        _show_scalar(display, name)
        display.UpdateScalarRange()


def array_from_model_scalars(model_node, name):
    """Return a copy of a model's point-data array.

    Parameters
    ----------
    model_node : vtkMRMLModelNode
        Model with a surface.
    name : str
        Array name.

    Returns
    -------
    numpy.ndarray of shape (n_vertices,)

    Raises
    ------
    ValueError
        If the model has no array called ``name``.
    """
    _, _, numpy_support = _mrml()
    point_data = _model_polydata(model_node).GetPointData()
    array = point_data.GetArray(name) if isinstance(name, str) else None
    if array is None:
        available = [point_data.GetArrayName(i) for i in range(point_data.GetNumberOfArrays())]
        raise ValueError(
            f"model {model_node.GetName()!r} has no scalars {name!r}; available: {sorted(available)}"
        )
    return numpy_support.vtk_to_numpy(array).copy()


def mesh_from_model(model_node):
    """Return the vertices and triangles of a model.

    Parameters
    ----------
    model_node : vtkMRMLModelNode
        Model whose surface is made of triangles.

    Returns
    -------
    vertices : numpy.ndarray of shape (n_vertices, 3)
        RAS coordinates.
    faces : numpy.ndarray of int64, shape (n_faces, 3)

    Raises
    ------
    ValueError
        If the model has no surface or a polygon is not a triangle.
    """
    _, _, numpy_support = _mrml()
    polydata = _model_polydata(model_node)
    vertices = numpy_support.vtk_to_numpy(polydata.GetPoints().GetData()).copy()
    polys = polydata.GetPolys()
    offsets = numpy_support.vtk_to_numpy(polys.GetOffsetsArray())
    connectivity = numpy_support.vtk_to_numpy(polys.GetConnectivityArray())
    if np.any(np.diff(offsets) != 3):
        raise ValueError(f"model {model_node.GetName()!r} has polygons that are not triangles")
    return vertices, connectivity.astype(np.int64).reshape(-1, 3)


def set_scalar_threshold(model_node, lower, upper, enabled=True):
    """Show only the part of a model whose active scalar lies in ``[lower, upper]``.

    Parameters
    ----------
    model_node : vtkMRMLModelNode
        Model with a display node.
    lower, upper : float
        Threshold range.
    enabled : bool, default True
        Turn thresholding on or off.

    Raises
    ------
    ValueError
        If the model has no display node or ``lower > upper``.
    """
    _check_node(model_node, "vtkMRMLModelNode", "model_node")
    lower, upper = _check_range((lower, upper), "threshold (lower, upper)")
    display = model_node.GetDisplayNode()
    if display is None:
        raise ValueError(f"model_node {model_node.GetName()!r} has no display node")
    display.SetThresholdRange(lower, upper)
    display.SetThresholdEnabled(bool(enabled))


# --------------------------------------------------------------------------
# Color tables
# --------------------------------------------------------------------------
def _color_ramp(anchors, n):
    """``n`` RGB colors interpolated linearly through equally spaced ``anchors``."""
    anchors = np.asarray(anchors, dtype=float)
    positions = np.linspace(0.0, 1.0, len(anchors))
    samples = np.linspace(0.0, 1.0, n)
    rgb = np.column_stack([np.interp(samples, positions, anchors[:, c]) for c in range(3)])
    # Color table files store 8-bit colors: quantise now so saving is lossless.
    return np.round(rgb * 255.0) / 255.0


def _color_table(scene, name, n, anchors, description):
    _check_scene(scene)
    _check_name(name)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    existing = scene.GetFirstNodeByName(name)
    if existing is not None:
        _check_node(existing, "vtkMRMLColorTableNode", f"existing node {name!r}")
        return existing
    with _remove_added_nodes_on_error(scene):
        table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
        table.SetTypeToUser()
        table.SetDescription(description)
        # Visible to editors so Slicer lists it and save_scene stores it with the data.
        table.SetHideFromEditors(False)
        table.SetNumberOfColors(int(n))
        for index, (r, g, b) in enumerate(_color_ramp(anchors, int(n))):
            table.SetColor(index, r, g, b, 1.0)
    return table


def diverging_color_table(scene, name="NeuroAtrophy diverging", n=256):
    """Return a blue (negative) - white (zero) - red (positive) color table.

    Parameters
    ----------
    scene : vtkMRMLScene
        Scene to add the table to.
    name : str, default "NeuroAtrophy diverging"
        Node name; an existing color table with this name is returned as is.
    n : int, default 256
        Number of colors (odd numbers give an exact white middle).

    Returns
    -------
    vtkMRMLColorTableNode
    """
    return _color_table(scene, name, n, _DIVERGING_ANCHORS, "Blue - white - red (z-scores)")


def sequential_color_table(scene, name="NeuroAtrophy sequential", n=256):
    """Return a light yellow - orange - dark red color table (for magnitudes).

    Parameters
    ----------
    scene : vtkMRMLScene
        Scene to add the table to.
    name : str, default "NeuroAtrophy sequential"
        Node name; an existing color table with this name is returned as is.
    n : int, default 256
        Number of colors.

    Returns
    -------
    vtkMRMLColorTableNode
    """
    return _color_table(scene, name, n, _SEQUENTIAL_ANCHORS, "Yellow - orange - red")


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------
def _vtk_column(series, name):
    """Convert one DataFrame column to a typed VTK array."""
    import pandas as pd

    _, vtk, numpy_support = _mrml()
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        if series.isna().any():
            raise ValueError(f"column {name!r} has missing values; boolean columns cannot")
        array = vtk.vtkBitArray()
        array.SetNumberOfValues(len(series))
        for index, value in enumerate(series.to_numpy(dtype=bool)):
            array.SetValue(index, int(value))
    elif pd.api.types.is_numeric_dtype(dtype):
        if isinstance(dtype, pd.api.extensions.ExtensionDtype):
            numpy_dtype = np.dtype(dtype.numpy_dtype)
            if series.isna().any() and not np.issubdtype(numpy_dtype, np.floating):
                raise ValueError(f"column {name!r} has missing values; integer columns cannot")
            values = series.to_numpy(dtype=numpy_dtype, na_value=np.nan)
        else:
            values = series.to_numpy()
        if np.iscomplexobj(values):
            raise ValueError(f"column {name!r} is complex; only real numbers can be stored")
        array = numpy_support.numpy_to_vtk(np.ascontiguousarray(values), deep=True)
    elif pd.api.types.is_string_dtype(dtype) or isinstance(dtype, pd.CategoricalDtype):
        array = vtk.vtkStringArray()
        array.SetNumberOfValues(len(series))
        for index, value in enumerate(series):
            array.SetValue(index, "" if pd.isna(value) else str(value))
    else:
        raise ValueError(
            f"column {name!r} has dtype {dtype}; only float, int, bool and str are supported"
        )
    array.SetName(name)
    return array


def table_from_dataframe(scene, df, name, table_node=None):
    """Store a DataFrame in a table node, one typed column per DataFrame column.

    Floats and integers keep their numpy dtype, booleans become ``vtkBitArray``
    and strings ``vtkStringArray`` (missing strings become ``""``). A named or
    non-range index is stored as leading column(s).

    Parameters
    ----------
    scene : vtkMRMLScene
        Scene to add the table to.
    df : pandas.DataFrame
        Table to store; column names are converted to strings.
    name : str
        Node name.
    table_node : vtkMRMLTableNode, optional
        Existing table node to overwrite instead of adding a new one.

    Returns
    -------
    vtkMRMLTableNode

    Raises
    ------
    ValueError
        If a column has an unsupported dtype or names collide.
    """
    import pandas as pd

    _, vtk, _ = _mrml()
    _check_scene(scene)
    _check_name(name)
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    if table_node is not None:
        _check_node(table_node, "vtkMRMLTableNode", "table_node")
    if not (isinstance(df.index, pd.RangeIndex) and df.index.name is None):
        df = df.reset_index()
    names = [str(column) for column in df.columns]
    duplicates = sorted({column for column in names if names.count(column) > 1})
    if duplicates:
        raise ValueError(f"df has duplicate column names {duplicates}")

    table = vtk.vtkTable()
    for position, column in enumerate(names):
        table.AddColumn(_vtk_column(df.iloc[:, position], column))
    with _remove_added_nodes_on_error(scene):
        if table_node is None:
            table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
        else:
            table_node.SetName(name)
        table_node.SetAndObserveTable(table)
    return table_node


def _column_values(array):
    _, _, numpy_support = _mrml()
    if array.IsA("vtkBitArray"):
        return np.array([bool(array.GetValue(i)) for i in range(array.GetNumberOfValues())])
    if array.IsA("vtkDataArray"):
        if array.GetNumberOfComponents() != 1:
            raise ValueError(f"column {array.GetName()!r} has several components")
        return numpy_support.vtk_to_numpy(array).copy()
    return [str(array.GetValue(i)) for i in range(array.GetNumberOfValues())]


def dataframe_from_table(table_node):
    """Return the content of a table node as a DataFrame.

    Parameters
    ----------
    table_node : vtkMRMLTableNode

    Returns
    -------
    pandas.DataFrame
        One column per table column, with a default RangeIndex; numeric columns
        keep their dtype, bit columns are bool and string columns str.
    """
    import pandas as pd

    _check_node(table_node, "vtkMRMLTableNode", "table_node")
    table = table_node.GetTable()
    columns = {}
    for index in range(table.GetNumberOfColumns()):
        array = table.GetColumn(index)
        values = _column_values(array)
        columns[array.GetName()] = values if not isinstance(values, list) else pd.Series(
            values, dtype=str
        )
    return pd.DataFrame(columns, index=pd.RangeIndex(table.GetNumberOfRows()))


# --------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------
def _table_column_names(table_node):
    table = table_node.GetTable()
    return [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())]


def _check_plot_column(table_node, column, param):
    names = _table_column_names(table_node)
    if column not in names:
        raise ValueError(
            f"{param}: table {table_node.GetName()!r} has no column {column!r}; columns: {names}"
        )
    if not table_node.GetTable().GetColumnByName(column).IsA("vtkDataArray"):
        raise ValueError(f"{param}: column {column!r} is not numeric and cannot be plotted")


def _per_series(values, n_series, param):
    if values is None:
        return [None] * n_series
    if isinstance(values, str):
        values = [values] * n_series
    values = list(values)
    if len(values) != n_series:
        raise ValueError(f"{param} must have one entry per y column ({n_series}), got {len(values)}")
    return values


def _style_code(series_node, getter, value, param):
    code = getattr(series_node, getter)(value) if isinstance(value, str) else -1
    if code < 0:
        raise ValueError(f"{param}: unknown style {value!r}")
    return code


def _check_color(color, param):
    try:
        rgb = tuple(float(c) for c in color)
    except (TypeError, ValueError):
        raise ValueError(f"{param}: color must be an (r, g, b) triple, got {color!r}") from None
    if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
        raise ValueError(f"{param}: color must be (r, g, b) in [0, 1], got {color!r}")
    return rgb


def _series_settings(plot_type, y_columns, line_styles, colors, marker_styles):
    """Validate the per-series styles; return a list of dicts of MRML codes."""
    slicer, _, _ = _mrml()
    probe = slicer.vtkMRMLPlotSeriesNode()
    if plot_type not in ("Line", "Scatter"):
        raise ValueError(f"plot_type must be 'Line' or 'Scatter', got {plot_type!r}")
    n_series = len(y_columns)
    default_line = "solid" if plot_type == "Line" else "none"
    default_marker = "none" if plot_type == "Line" else "circle"
    settings = []
    for line, color, marker in zip(
        _per_series(line_styles, n_series, "line_styles"),
        _per_series(colors, n_series, "colors"),
        _per_series(marker_styles, n_series, "marker_styles"),
    ):
        settings.append({
            "plot_type": probe.GetPlotTypeFromString(plot_type),
            "line": _style_code(probe, "GetLineStyleFromString", line or default_line,
                                "line_styles"),
            "marker": _style_code(probe, "GetMarkerStyleFromString", marker or default_marker,
                                  "marker_styles"),
            "color": None if color is None else _check_color(color, "colors"),
        })
    return settings


def _add_series(scene, chart, table_node, x_column, y_column, series_name, setting):
    series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", series_name)
    series.SetAndObserveTableNodeID(table_node.GetID())
    series.SetXColumnName(x_column)
    series.SetYColumnName(y_column)
    series.SetPlotType(setting["plot_type"])
    series.SetLineStyle(setting["line"])
    series.SetMarkerStyle(setting["marker"])
    if setting["color"] is not None:
        series.SetColor(*setting["color"])
    chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return series


def add_plot(
    scene,
    table_node,
    x_column,
    y_columns,
    name,
    plot_type="Line",
    x_label=None,
    y_label=None,
    line_styles=None,
    colors=None,
    marker_styles=None,
):
    """Add a plot chart with one series per y column of a table.

    Parameters
    ----------
    scene : vtkMRMLScene
        Scene holding ``table_node``.
    table_node : vtkMRMLTableNode
        Table with the data; the series reference it by column name.
    x_column : str
        Numeric column on the x axis.
    y_columns : str or sequence of str
        Numeric column(s) on the y axis; each becomes a series named after it.
    name : str
        Chart name and title.
    plot_type : {"Line", "Scatter"}, default "Line"
    x_label, y_label : str, optional
        Axis titles (default: the column names).
    line_styles : sequence of str, optional
        Per series: "none", "solid", "dash", "dot", "dash-dot", "dash-dot-dot".
    colors : sequence of (r, g, b), optional
        Per series, components in [0, 1].
    marker_styles : sequence of str, optional
        Per series: "none", "cross", "plus", "square", "circle", "diamond".

    Returns
    -------
    vtkMRMLPlotChartNode
        Chart holding one ``vtkMRMLPlotSeriesNode`` per y column.

    Raises
    ------
    ValueError
        If a column is missing or not numeric, or a style is unknown.
    """
    _check_scene(scene)
    _check_name(name)
    _check_node(table_node, "vtkMRMLTableNode", "table_node")
    if not scene.IsNodePresent(table_node):
        raise ValueError(f"table_node {table_node.GetName()!r} is not in the scene")
    y_columns = [y_columns] if isinstance(y_columns, str) else list(y_columns)
    if not y_columns:
        raise ValueError("y_columns must name at least one column")
    _check_plot_column(table_node, x_column, "x_column")
    for column in y_columns:
        _check_plot_column(table_node, column, "y_columns")
    settings = _series_settings(plot_type, y_columns, line_styles, colors, marker_styles)

    with _remove_added_nodes_on_error(scene):
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
        chart.SetTitle(name)
        chart.SetXAxisTitle(x_label if x_label is not None else x_column)
        chart.SetYAxisTitle(y_label if y_label is not None else ", ".join(y_columns))
        for column, setting in zip(y_columns, settings):
            _add_series(scene, chart, table_node, x_column, column, column, setting)
    return chart


def add_plot_series(
    scene,
    chart_node,
    table_node,
    x_column,
    y_column,
    name,
    plot_type="Line",
    line_style=None,
    color=None,
    marker_style=None,
):
    """Add one series to an existing chart, e.g. a fitted line over a scatter plot.

    The series may come from another table than the chart's other series, so a
    line sampled on a regular grid can be drawn over the data points.

    Parameters
    ----------
    scene : vtkMRMLScene
        Scene holding ``chart_node`` and ``table_node``.
    chart_node : vtkMRMLPlotChartNode
        Chart to add the series to (e.g. made by :func:`add_plot`).
    table_node : vtkMRMLTableNode
        Table with the series' data.
    x_column, y_column : str
        Numeric columns of ``table_node``.
    name : str
        Series name (shown in the legend).
    plot_type : {"Line", "Scatter"}, default "Line"
    line_style, marker_style, color :
        As one entry of the per-series styles of :func:`add_plot`.

    Returns
    -------
    vtkMRMLPlotSeriesNode

    Raises
    ------
    ValueError
        If a node is not in the scene, a column is missing or not numeric, or a
        style is unknown.
    """
    _check_scene(scene)
    _check_name(name)
    _check_node(chart_node, "vtkMRMLPlotChartNode", "chart_node")
    _check_node(table_node, "vtkMRMLTableNode", "table_node")
    for node, param in ((chart_node, "chart_node"), (table_node, "table_node")):
        if not scene.IsNodePresent(node):
            raise ValueError(f"{param} {node.GetName()!r} is not in the scene")
    _check_plot_column(table_node, x_column, "x_column")
    _check_plot_column(table_node, y_column, "y_column")
    setting = _series_settings(plot_type, [y_column], [line_style], [color], [marker_style])[0]
    with _remove_added_nodes_on_error(scene):
        return _add_series(scene, chart_node, table_node, x_column, y_column, name, setting)


def _centile_column_name(key):
    """Column name of a centile curve: strings as given, numbers as ``"p<number>"``."""
    if isinstance(key, str):
        _check_name(key, "centile_curves key")
        return key
    if isinstance(key, (int, float, np.integer, np.floating)) and not isinstance(key, bool):
        return f"p{float(key):g}"
    raise ValueError(f"centile_curves keys must be strings or numbers, got {key!r}")


def centile_plot(
    scene,
    ages,
    centile_curves,
    patient_age,
    patient_value,
    name,
    y_label="Cortical thickness (mm)",
):
    """Plot normative centile curves against age with one patient's value on top.

    The curves are drawn in the given order; the middle one (e.g. the median of
    5/25/50/75/95) is solid black, the others dashed grey. The patient is a red
    diamond.

    Parameters
    ----------
    scene : vtkMRMLScene
        Scene to add the nodes to.
    ages : array_like of shape (n,)
        Ages (years) at which the curves are sampled.
    centile_curves : dict of str or float to array_like of shape (n,)
        Curve label to values at ``ages``. String labels name the table column
        and series as given; numbers (centiles such as 5, 50, 95) become
        ``"p5"``, ``"p50"``, ``"p95"``.
    patient_age, patient_value : float
        The patient's point.
    name : str
        Chart name; the tables are named ``"<name> centiles"`` and ``"<name> patient"``.
    y_label : str, default "Cortical thickness (mm)"

    Returns
    -------
    vtkMRMLPlotChartNode

    Raises
    ------
    ValueError
        If a curve's length differs from ``ages`` or values are not finite.
    """
    import pandas as pd

    _check_scene(scene)
    _check_name(name)
    ages = np.asarray(ages, dtype=float)
    if ages.ndim != 1 or len(ages) < 2 or not np.all(np.isfinite(ages)):
        raise ValueError(f"ages must be a 1-D array of >= 2 finite values, got shape {ages.shape}")
    if not centile_curves:
        raise ValueError("centile_curves must hold at least one curve")
    columns = {"age": ages}
    for key, curve in centile_curves.items():
        label = _centile_column_name(key)
        if label in columns:
            raise ValueError(f"centile_curves: the name {label!r} is reserved for the age column")
        curve = np.asarray(curve, dtype=float)
        if curve.shape != ages.shape:
            raise ValueError(
                f"centile_curves[{key!r}] must have shape {ages.shape} like ages, got {curve.shape}"
            )
        columns[label] = curve
    patient = pd.DataFrame({"age": [float(patient_age)], "value": [float(patient_value)]})
    if not np.all(np.isfinite(patient.to_numpy())):
        raise ValueError(
            f"patient_age and patient_value must be finite, got {patient_age!r}, {patient_value!r}"
        )

    labels = list(columns)[1:]
    middle = len(labels) // 2 if len(labels) % 2 else None
    line_styles = ["solid" if i == middle else "dash" for i in range(len(labels))]
    colors = [(0.0, 0.0, 0.0) if i == middle else (0.45, 0.45, 0.45) for i in range(len(labels))]
    with _remove_added_nodes_on_error(scene):
        curves_table = table_from_dataframe(scene, pd.DataFrame(columns), f"{name} centiles")
        patient_table = table_from_dataframe(scene, patient, f"{name} patient")
        chart = add_plot(scene, curves_table, "age", labels, name, plot_type="Line",
                         x_label="Age (years)", y_label=y_label,
                         line_styles=line_styles, colors=colors)
        setting = _series_settings("Scatter", ["value"], ["none"], [(0.85, 0.1, 0.1)],
                                   ["diamond"])[0]
        series = _add_series(scene, chart, patient_table, "age", "value", "Patient", setting)
        series.SetMarkerSize(12)
    return chart


# --------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------
def _check_ijk_to_ras(ijk_to_ras):
    matrix = np.asarray(ijk_to_ras, dtype=float)
    if matrix.shape != (4, 4):
        raise ValueError(f"ijk_to_ras must be a 4x4 matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)) or not np.allclose(matrix[3], [0, 0, 0, 1]):
        raise ValueError("ijk_to_ras must be finite with last row [0, 0, 0, 1]")
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise ValueError("ijk_to_ras has a zero-length axis (singular matrix)")
    directions = matrix[:3, :3] / spacing
    # A volume node stores spacing, origin and orthonormal directions: no shear.
    if not np.allclose(directions.T @ directions, np.eye(3), atol=1e-5):
        raise ValueError("ijk_to_ras must be a rotation times axis scaling (no shear)")
    return matrix


def _vtk_matrix(matrix):
    _, vtk, _ = _mrml()
    vtk_matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            vtk_matrix.SetElement(row, column, matrix[row, column])
    return vtk_matrix


def _writable_voxel_type(array):
    """Cast voxel types that Slicer's image writers reject to a lossless supported one."""
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if array.dtype == np.int8:
        return array.astype(np.int16)
    if array.dtype in (np.int64, np.uint64):
        low, high = (array.min(), array.max())
        for candidate in (np.int32, np.uint32):
            info = np.iinfo(candidate)
            if info.min <= low and high <= info.max:
                return array.astype(candidate)
        raise ValueError(
            f"array_kji holds 64-bit integers outside the 32-bit range ({low}..{high}), "
            "which volume files cannot store"
        )
    return array


def add_volume(scene, array_kji, ijk_to_ras, name, label_map=False):
    """Add a 3-D image as a scalar or label map volume.

    Parameters
    ----------
    scene : vtkMRMLScene
        Scene to add the nodes to.
    array_kji : array_like of shape (n_k, n_j, n_i)
        Voxel values in Slicer's KJI order (``nibabel`` data transposed ``(2, 1, 0)``).
        Types that volume files cannot hold are cast losslessly: bool to uint8,
        int8 to int16, int64/uint64 to int32/uint32, float16 to float32.
    ijk_to_ras : array_like of shape (4, 4)
        Voxel-to-RAS matrix (rotation times spacing, no shear).
    name : str
        Node name.
    label_map : bool, default False
        Create a ``vtkMRMLLabelMapVolumeNode`` (integer values required).

    Returns
    -------
    vtkMRMLScalarVolumeNode or vtkMRMLLabelMapVolumeNode

    Raises
    ------
    ValueError
        If the array is not 3-D numeric, or the matrix is not a valid 4x4.
    """
    _, vtk, numpy_support = _mrml()
    _check_scene(scene)
    _check_name(name)
    array = np.asarray(array_kji)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.ndim != 3 or 0 in array.shape:
        raise ValueError(f"array_kji must be a non-empty 3-D array, got shape {array.shape}")
    if label_map and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"array_kji of a label map must hold integers, got dtype {array.dtype}")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"array_kji must be numeric, got dtype {array.dtype}")
    array = _writable_voxel_type(array)
    matrix = _check_ijk_to_ras(ijk_to_ras)

    image = vtk.vtkImageData()
    image.SetDimensions(*array.shape[::-1])
    image.GetPointData().SetScalars(
        numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    )
    class_name = "vtkMRMLLabelMapVolumeNode" if label_map else "vtkMRMLScalarVolumeNode"
    with _remove_added_nodes_on_error(scene):
        volume = scene.AddNewNodeByClass(class_name, name)
        volume.SetIJKToRASMatrix(_vtk_matrix(matrix))
        volume.SetAndObserveImageData(image)
        volume.CreateDefaultDisplayNodes()
    return volume


def array_from_volume(volume_node):
    """Return a copy of a volume's voxels in KJI order.

    Parameters
    ----------
    volume_node : vtkMRMLScalarVolumeNode

    Returns
    -------
    numpy.ndarray of shape (n_k, n_j, n_i)

    Raises
    ------
    ValueError
        If the node has no image data.
    """
    _, _, numpy_support = _mrml()
    _check_node(volume_node, "vtkMRMLVolumeNode", "volume_node")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise ValueError(f"volume_node {volume_node.GetName()!r} has no image data")
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    shape = image.GetDimensions()[::-1]
    components = image.GetNumberOfScalarComponents()
    return scalars.reshape(shape + ((components,) if components > 1 else ())).copy()


def ijk_to_ras_from_volume(volume_node):
    """Return a volume's 4x4 voxel-to-RAS matrix.

    Parameters
    ----------
    volume_node : vtkMRMLVolumeNode

    Returns
    -------
    numpy.ndarray of shape (4, 4)
    """
    _, vtk, _ = _mrml()
    _check_node(volume_node, "vtkMRMLVolumeNode", "volume_node")
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_from_nifti(scene, path, name=None, label_map=False):
    """Read a NIfTI (or NRRD, MHA, ...) image into a volume node.

    Uses ``vtkMRMLVolumeArchetypeStorageNode``, so no Slicer application is needed.

    Parameters
    ----------
    scene : vtkMRMLScene
        Scene to add the nodes to.
    path : str or path-like
        Image file.
    name : str, optional
        Node name; defaults to the file name without extension.
    label_map : bool, default False
        Read as a label map volume.

    Returns
    -------
    vtkMRMLScalarVolumeNode or vtkMRMLLabelMapVolumeNode
        The volume, which keeps a storage node pointing at ``path``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file cannot be read as an image.
    """
    _check_scene(scene)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    if name is None:
        name = re.sub(r"\.(nii(\.gz)?|nrrd|nhdr|mha|mhd)$", "", path.name, flags=re.IGNORECASE)
    _check_name(name)
    class_name = "vtkMRMLLabelMapVolumeNode" if label_map else "vtkMRMLScalarVolumeNode"
    with _remove_added_nodes_on_error(scene):
        volume = scene.AddNewNodeByClass(class_name, name)
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path.resolve()))
        volume.SetAndObserveStorageNodeID(storage.GetID())
        if not storage.ReadData(volume) or volume.GetImageData() is None:
            raise ValueError(f"could not read an image from {path}")
        volume.CreateDefaultDisplayNodes()
    return volume


def set_volume_display(volume_node, color_node=None, value_range=None, lower_threshold=None):
    """Colour a scalar volume with a color table over a fixed range.

    Parameters
    ----------
    volume_node : vtkMRMLScalarVolumeNode
        Volume with a display node (e.g. made by :func:`add_volume`).
    color_node : vtkMRMLColorNode or str, optional
        Color table (node or node ID, in the volume's scene).
    value_range : (float, float), optional
        Values mapped to the first and the last color (fixed window and level);
        by default Slicer's automatic window and level are kept.
    lower_threshold : float, optional
        Show only voxels at or above this value in slice views; None shows all.

    Raises
    ------
    ValueError
        If the volume has no display node, the color node is not in its scene,
        or a value is not finite.
    """
    _check_node(volume_node, "vtkMRMLScalarVolumeNode", "volume_node")
    display = volume_node.GetDisplayNode()
    if display is None:
        raise ValueError(f"volume_node {volume_node.GetName()!r} has no display node")
    if color_node is not None:
        color_node = _resolve_color_node(volume_node.GetScene(), color_node)
    if value_range is not None:
        value_range = _check_range(value_range, "value_range")
    if lower_threshold is not None:
        lower_threshold = float(lower_threshold)
        if not np.isfinite(lower_threshold):
            raise ValueError(f"lower_threshold must be finite, got {lower_threshold!r}")
    modifying = display.StartModify()
    try:
        if color_node is not None:
            display.SetAndObserveColorNodeID(color_node.GetID())
        if value_range is not None:
            display.SetAutoWindowLevel(False)
            display.SetWindowLevelMinMax(*value_range)
        if lower_threshold is None:
            display.SetApplyThreshold(False)
        else:
            display.SetAutoThreshold(False)
            display.SetThreshold(lower_threshold, np.finfo(np.float32).max)
            display.SetApplyThreshold(True)
    finally:
        display.EndModify(modifying)


# --------------------------------------------------------------------------
# Markups
# --------------------------------------------------------------------------
def add_markups_points(scene, points_ras, labels, name):
    """Add a point list (fiducials).

    Parameters
    ----------
    scene : vtkMRMLScene
        Scene to add the nodes to.
    points_ras : array_like of shape (n_points, 3)
        RAS positions.
    labels : sequence of str or None
        One label per point; None numbers them ``"<name>-1"``, ``"<name>-2"``, ...
    name : str
        Node name.

    Returns
    -------
    vtkMRMLMarkupsFiducialNode

    Raises
    ------
    ValueError
        If the points are not (n, 3) finite or labels do not match them.
    """
    _check_scene(scene)
    _check_name(name)
    points = np.asarray(points_ras, dtype=float)
    if points.ndim != 2 or points.shape[1] != 3 or not np.all(np.isfinite(points)):
        raise ValueError(f"points_ras must be a finite (n_points, 3) array, got shape {points.shape}")
    if labels is None:
        labels = [f"{name}-{i + 1}" for i in range(len(points))]
    labels = list(labels)
    if len(labels) != len(points) or not all(isinstance(label, str) for label in labels):
        raise ValueError(f"labels must be {len(points)} strings (one per point), got {labels!r}")
    _register_node_classes(scene)
    with _remove_added_nodes_on_error(scene):
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        node.CreateDefaultDisplayNodes()
        modifying = node.StartModify()
        for position, label in zip(points, labels):
            node.AddControlPoint([float(c) for c in position], label)
        node.EndModify(modifying)
    return node


def points_from_markups(node):
    """Return the control points of a markups node.

    Parameters
    ----------
    node : vtkMRMLMarkupsNode

    Returns
    -------
    points : numpy.ndarray of shape (n_points, 3)
        RAS positions.
    labels : list of str
    """
    _check_node(node, "vtkMRMLMarkupsNode", "node")
    n_points = node.GetNumberOfControlPoints()
    points = np.zeros((n_points, 3))
    for index in range(n_points):
        position = [0.0, 0.0, 0.0]
        node.GetNthControlPointPosition(index, position)
        points[index] = position
    return points, [node.GetNthControlPointLabel(i) for i in range(n_points)]


def remove_shown_nodes(scene, nodes) -> None:
    """Remove what a module showed (a dict of nodes or lists of nodes, or a list of nodes).

    Sequence browsers take their proxy nodes with them, plot charts their series and the
    series' tables; colour tables stay (they are shared). Missing nodes are skipped.
    """
    _check_scene(scene)
    if isinstance(nodes, dict):
        nodes = [n for value in nodes.values() for n in (value if isinstance(value, list) else [value])]
    expanded = []
    for node in nodes:
        if node is None or isinstance(node, str) or not scene.IsNodePresent(node):
            continue
        if node.IsA("vtkMRMLSequenceBrowserNode"):
            collection = _mrml()[1].vtkCollection()
            node.GetAllProxyNodes(collection)
            expanded += [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
        if node.IsA("vtkMRMLPlotChartNode"):
            for index in range(node.GetNumberOfPlotSeriesNodes()):
                series = node.GetNthPlotSeriesNode(index)
                expanded += [series, series.GetTableNode() if series is not None else None]
        expanded.append(node)
    remove_nodes(scene, expanded)


def remove_nodes(scene, nodes):
    """Remove nodes from a scene together with their display and storage nodes.

    Parameters
    ----------
    scene : vtkMRMLScene
    nodes : iterable of vtkMRMLNode or None
        Nodes to remove; None entries and nodes no longer in the scene are skipped.
        Color nodes are left alone: color tables are shared between results.
    """
    _check_scene(scene)
    for node in nodes:
        if node is None or not scene.IsNodePresent(node) or node.IsA("vtkMRMLColorNode"):
            continue
        related = []
        if node.IsA("vtkMRMLDisplayableNode"):
            related += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        if node.IsA("vtkMRMLStorableNode"):
            related += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
        scene.RemoveNode(node)
        for other in related:
            if other is not None and scene.IsNodePresent(other):
                scene.RemoveNode(other)


# --------------------------------------------------------------------------
# Scene files
# --------------------------------------------------------------------------
def _nodes_to_write(scene):
    """Storable nodes whose data goes to ``<stem>_data``.

    Nodes hidden from editors are left to ``vtkMRMLScene.Commit``, which stores
    them in ``<stem>_Private``; nodes without a default storage class keep their
    content in the scene XML.
    """
    nodes = []
    for node in _nodes(scene, "vtkMRMLStorableNode"):
        if not node.GetSaveWithScene() or node.GetHideFromEditors():
            continue
        if node.GetStorageNode() is None and not node.GetDefaultStorageNodeClassName(""):
            continue
        nodes.append(node)
    return nodes


def _storage_state(scene):
    """Snapshot the file references of every storage and storable node."""
    storage = {
        node.GetID(): (
            node.GetFileName(),
            [node.GetNthFileName(i) for i in range(node.GetNumberOfFileNames())],
            node.GetURI(),
        )
        for node in _nodes(scene, "vtkMRMLStorageNode")
    }
    references = {
        node.GetID(): node.GetStorageNodeID() for node in _nodes(scene, "vtkMRMLStorableNode")
    }
    return storage, references, scene.GetURL(), scene.GetRootDirectory()


def _restore_storage_state(scene, state):
    storage, references, url, root = state
    for node_id, (file_name, file_names, uri) in storage.items():
        node = scene.GetNodeByID(node_id)
        if node is None:
            continue
        node.SetFileName(file_name)
        node.ResetFileNameList()
        for extra in file_names:
            node.AddFileName(extra)
        node.SetURI(uri)
    for node_id, storage_id in references.items():
        node = scene.GetNodeByID(node_id)
        if node is not None and node.GetStorageNodeID() != storage_id:
            node.SetAndObserveStorageNodeID(storage_id)
    scene.SetURL(url or "")
    scene.SetRootDirectory(root or "")


def _storage_node_for(scene, node):
    """The node's storage node if it has the default class, else a new one."""
    class_name = node.GetDefaultStorageNodeClassName("")
    storage = node.GetStorageNode()
    if storage is not None and (not class_name or storage.GetClassName() == class_name):
        return storage
    storage = scene.AddNewNodeByClass(class_name)
    if storage is None:
        raise ValueError(f"no storage node class {class_name!r} for node {node.GetName()!r}")
    node.SetAndObserveStorageNodeID(storage.GetID())
    return storage


def _write_node_data(scene, node, data_dir, used_stems):
    storage = _storage_node_for(scene, node)
    extension = _WRITE_EXTENSIONS.get(storage.GetClassName(), storage.GetDefaultWriteFileExtension())
    from .io import safe_file_stem

    file_path = data_dir / f"{safe_file_stem(node.GetName(), used_stems, default='node')}.{extension}"
    storage.SetFileName(str(file_path))
    storage.ResetFileNameList()
    storage.SetURI(None)
    if not storage.WriteData(node) or not file_path.exists():
        raise ValueError(f"could not write the data of node {node.GetName()!r} to {file_path.name}")


def _commit_scene_file(scene, mrml_path):
    """Write the scene XML; storage file names are written relative to its folder."""
    version = scene.GetVersion()
    # Headless slicer-core stamps scenes "slicer-core 4.0.0 0"; Slicer warns that such
    # a scene "may not load correctly". The version attribute is optional, so omit it.
    stamp_is_slicer = bool(version) and version.split(" ")[0].startswith("Slicer")
    if not stamp_is_slicer:
        scene.SetVersion(None)
    try:
        if not scene.Commit(str(mrml_path)):
            raise ValueError(f"could not write the scene file {mrml_path.name}")
    finally:
        scene.SetVersion(version)


def _move_into_place(staging, parent, mrml_name):
    """Move the staged data folders, then the scene file, over the targets."""
    backups = []
    try:
        for entry in sorted(p for p in staging.iterdir() if p.name != mrml_name):
            target = parent / entry.name
            if target.exists():
                backup = staging / f".previous-{entry.name}"
                os.replace(target, backup)
                backups.append((backup, target))
            os.replace(entry, target)
            backups.append((None, target))
        os.replace(staging / mrml_name, parent / mrml_name)
    except BaseException:
        for backup, target in reversed(backups):
            if backup is None:
                shutil.rmtree(target, ignore_errors=True)
            else:
                os.replace(backup, target)
        raise


def _relocate_storage_files(scene, staging, parent):
    """Point storage nodes from the staging folder to the final folder."""
    prefix = str(staging) + os.sep
    for storage in _nodes(scene, "vtkMRMLStorageNode"):
        file_name = storage.GetFileName()
        if file_name and file_name.startswith(prefix):
            storage.SetFileName(str(parent / file_name[len(prefix):]))


def _unreferenced(scene, storage_ids):
    """The storage nodes among ``storage_ids`` that no storable node uses any more."""
    referenced = {node.GetStorageNodeID() for node in _nodes(scene, "vtkMRMLStorableNode")}
    nodes = (scene.GetNodeByID(storage_id) for storage_id in storage_ids - referenced)
    return [node for node in nodes if node is not None and node.GetSaveWithScene()]


def save_scene(scene, path):
    """Write a scene to a ``.mrml`` file with its data next to it.

    Every storable node's data is written by its storage node into the folder
    ``<stem>_data`` next to ``path``: models as ``.vtk`` (point-data scalars
    included), tables as ``.tsv`` (+ ``.schema.tsv``), volumes as ``.nrrd``,
    markups as ``.mrk.json`` and color tables as ``.ctbl``. The scene file refers
    to them by relative paths, so the pair can be moved together and opened in
    Slicer. Everything is first written to a temporary folder beside ``path``
    and then renamed over an existing scene of the same name (whose
    ``<stem>_data`` folder is replaced).

    On success the storage nodes of ``scene`` point to the written files and the
    scene's URL is ``path``; on error the scene is left as it was.

    Parameters
    ----------
    scene : vtkMRMLScene
        Scene to write.
    path : str or path-like
        Scene file, ending in ``.mrml``; its folder must exist.

    Raises
    ------
    ValueError
        If ``path`` does not end in ``.mrml`` or some node's data cannot be written.
    FileNotFoundError
        If the folder of ``path`` does not exist.
    """
    _check_scene(scene)
    path = Path(path)
    if path.suffix.lower() != ".mrml":
        raise ValueError(f"path must end in .mrml, got {str(path)!r}")
    parent = path.parent.resolve()
    if not parent.is_dir():
        raise FileNotFoundError(f"folder of the scene file not found: {path.parent}")
    if path.is_dir():
        raise ValueError(f"path {str(path)!r} is a folder")
    _register_node_classes(scene)

    state = _storage_state(scene)
    replaced = []
    staging = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", suffix=".saving", dir=parent))
    try:
        with _remove_added_nodes_on_error(scene):
            try:
                data_dir = staging / f"{path.stem}_data"
                data_dir.mkdir()
                used_stems = set()
                for node in _nodes_to_write(scene):
                    _write_node_data(scene, node, data_dir, used_stems)
                # Storage nodes replaced by one of the default class would be written
                # as orphans pointing at old files; leave them out, remove them after.
                replaced = _unreferenced(scene, {sid for sid in state[1].values() if sid})
                for storage in replaced:
                    storage.SetSaveWithScene(False)
                _commit_scene_file(scene, staging / path.name)
                _move_into_place(staging, parent, path.name)
            except BaseException:
                for storage in replaced:
                    storage.SetSaveWithScene(True)
                _restore_storage_state(scene, state)
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _relocate_storage_files(scene, staging, parent)
    for storage in replaced:
        scene.RemoveNode(storage)
    scene.SetURL(str(parent / path.name))
    scene.SetRootDirectory(str(parent))


def load_scene(path):
    """Read a ``.mrml`` scene file and its data into a new scene.

    Parameters
    ----------
    path : str or path-like
        Scene file written by :func:`save_scene` or by Slicer.

    Returns
    -------
    vtkMRMLScene
        A new scene whose storable nodes hold the data read from their files.

    Raises
    ------
    FileNotFoundError
        If the scene file or a data file it refers to does not exist.
    ValueError
        If the scene file cannot be parsed or a data file cannot be read.
    """
    slicer, vtk, _ = _mrml()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scene file not found: {path}")
    scene = slicer.vtkMRMLScene()
    _register_node_classes(scene)
    scene.SetURL(str(path.resolve()))
    # Connect() parses the XML and reads every storable node's data through its
    # storage node (no application needed); it returns 0 if anything failed.
    connected = scene.Connect()
    unreadable = []
    for node in _nodes(scene, "vtkMRMLStorableNode"):
        storage = node.GetStorageNode()
        if storage is None or not storage.GetFileName():
            continue
        data_file = Path(storage.GetFullNameFromFileName())
        if not data_file.is_file():
            raise FileNotFoundError(
                f"{path.name}: data file of node {node.GetName()!r} not found: {data_file}"
            )
        if storage.GetUserMessages().GetNumberOfMessagesOfType(vtk.vtkCommand.ErrorEvent):
            unreadable.append(f"{data_file.name} (node {node.GetName()!r})")
    if unreadable:
        raise ValueError(f"{path.name}: could not read {', '.join(unreadable)}")
    if not connected:
        raise ValueError(f"could not read the MRML scene {path}")
    return scene
