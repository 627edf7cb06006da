"""Tests of neuroatrophy.mrml against the real MRML scene of the slicer-core wheel."""

import shutil
import subprocess
import sys
import urllib.parse
import xml.etree.ElementTree as ET

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import slicer

from neuroatrophy import mrml


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------
def _icosphere(subdivisions=1):
    """Unit icosphere: (vertices, faces) with outward-facing triangles."""
    t = (1.0 + 5**0.5) / 2.0
    vertices = [(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t),
                (0, -1, -t), (0, 1, -t), (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)]
    faces = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4),
             (11, 10, 2), (10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8),
             (3, 8, 9), (4, 9, 5), (2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1)]
    vertices = [np.array(v, dtype=float) / np.linalg.norm(v) for v in vertices]
    for _ in range(subdivisions):
        midpoints, refined = {}, []

        def midpoint(a, b):
            key = (min(a, b), max(a, b))
            if key not in midpoints:
                m = vertices[a] + vertices[b]
                vertices.append(m / np.linalg.norm(m))
                midpoints[key] = len(vertices) - 1
            return midpoints[key]

        for a, b, c in faces:
            ab, bc, ca = midpoint(a, b), midpoint(b, c), midpoint(c, a)
            refined += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
        faces = refined
    return np.array(vertices) * 50.0, np.array(faces, dtype=np.int64)


@pytest.fixture(scope="module")
def sphere():
    """An icosphere of radius 50 mm: 42 vertices, 80 triangles."""
    return _icosphere(1)


@pytest.fixture
def scene():
    """A fresh, empty MRML scene (no Slicer application)."""
    return slicer.vtkMRMLScene()


@pytest.fixture
def example_df():
    """A table with every supported column type."""
    return pd.DataFrame({
        "age": [34.5, 61.25, np.nan, 80.0],
        "n_vertices": np.array([10, 20, 30, -4], dtype=np.int64),
        "count32": np.array([1, 2, 3, 2**30], dtype=np.int32),
        "is_patient": [True, False, False, True],
        "subject_id": ["sub-01", "sub 02", "", "sub-04"],
        "score": np.array([0.5, 1.5, 2.5, 3.5], dtype=np.float32),
    })


def _count(scene):
    return scene.GetNumberOfNodes()


# --------------------------------------------------------------------------
# Import without slicer
# --------------------------------------------------------------------------
def test_module_imports_without_slicer():
    code = (
        "import sys; sys.modules['slicer'] = None; sys.modules['vtk'] = None\n"
        "import neuroatrophy.mrml as m\n"
        "try:\n"
        "    m.diverging_color_table(None)\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ImportError: neuroatrophy.mrml needs 3D Slicer or the slicer-core" in result.stdout


# --------------------------------------------------------------------------
# Surface models
# --------------------------------------------------------------------------
def test_add_surface_model_stores_mesh_scalars_and_display(scene, sphere, rng):
    vertices, faces = sphere
    z = rng.normal(size=len(vertices))
    mask = z < -1
    colors = mrml.diverging_color_table(scene)
    model = mrml.add_surface_model(
        scene, vertices, faces, "lh z", scalars={"z": z, "mask": mask}, active_scalar="z",
        color_node=colors, scalar_range=(-4, 4), threshold=(-10, -1.96), visible=False,
    )
    assert model.IsA("vtkMRMLModelNode") and model.GetName() == "lh z"
    got_vertices, got_faces = mrml.mesh_from_model(model)
    np.testing.assert_array_equal(got_vertices, vertices)
    np.testing.assert_array_equal(got_faces, faces)
    np.testing.assert_array_equal(mrml.array_from_model_scalars(model, "z"), z)
    np.testing.assert_array_equal(mrml.array_from_model_scalars(model, "mask"), mask.astype(np.uint8))

    display = model.GetDisplayNode()
    assert display.IsA("vtkMRMLModelDisplayNode")
    assert display.GetActiveScalarName() == "z"
    assert display.GetActiveAttributeLocation() == 0  # point data
    assert display.GetScalarVisibility()
    assert display.GetScalarRangeFlag() == display.UseManualScalarRange
    assert display.GetScalarRange() == (-4.0, 4.0)
    assert display.GetColorNodeID() == colors.GetID()
    assert display.GetThresholdEnabled()
    assert display.GetThresholdRange() == (-10.0, -1.96)
    assert not display.GetVisibility()


def test_add_surface_model_defaults(scene, sphere):
    vertices, faces = sphere
    plain = mrml.add_surface_model(scene, vertices, faces, "plain")
    assert not plain.GetDisplayNode().GetScalarVisibility()
    assert plain.GetDisplayNode().GetVisibility()
    model = mrml.add_surface_model(
        scene, vertices, faces, "two", scalars={"first": vertices[:, 0], "second": vertices[:, 1]}
    )
    display = model.GetDisplayNode()
    assert display.GetActiveScalarName() == "first"
    assert not display.GetThresholdEnabled()
    assert display.GetScalarRangeFlag() != display.UseManualScalarRange


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scalars": {"thickness": np.zeros(5)}}, r"scalars 'thickness' must have shape \(42,\)"),
        ({"scalars": {"z": np.zeros(42)}, "active_scalar": "t"}, "active_scalar 't'"),
        ({"scalars": {"z": np.zeros(42)}, "threshold": (2, 1)}, "threshold"),
        ({"scalars": {"z": np.zeros(42)}, "scalar_range": (1,)}, "scalar_range"),
        ({"threshold": (0, 1)}, "threshold needs scalars"),
        ({"color_node": "vtkMRMLColorTableNodeNope"}, "color_node"),
        ({"scalars": {"z": np.array(["a"] * 42)}}, "scalars 'z' must be numeric"),
    ],
)
def test_add_surface_model_rejects_bad_input(scene, sphere, kwargs, message):
    vertices, faces = sphere
    before = _count(scene)
    with pytest.raises(ValueError, match=message):
        mrml.add_surface_model(scene, vertices, faces, "bad", **kwargs)
    assert _count(scene) == before


def test_add_surface_model_rejects_bad_mesh(scene, sphere):
    vertices, faces = sphere
    with pytest.raises(ValueError, match="faces must index vertices 0..41"):
        mrml.add_surface_model(scene, vertices, faces + 1, "bad")
    with pytest.raises(ValueError, match=r"vertices must have shape \(n_vertices, 3\)"):
        mrml.add_surface_model(scene, vertices[:, :2], faces, "bad")
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        mrml.add_surface_model(scene, vertices, faces, "")
    with pytest.raises(ValueError, match="scene must be a vtkMRMLScene"):
        mrml.add_surface_model(object(), vertices, faces, "bad")
    other = slicer.vtkMRMLScene()
    foreign = mrml.diverging_color_table(other)
    with pytest.raises(ValueError, match="color_node .* is not in the scene"):
        mrml.add_surface_model(scene, vertices, faces, "bad", color_node=foreign)
    assert _count(scene) == 0


def test_set_model_scalars_adds_replaces_and_activates(scene, sphere, rng):
    vertices, faces = sphere
    model = mrml.add_surface_model(scene, vertices, faces, "m", scalars={"a": np.zeros(42)})
    values = rng.normal(size=42)
    mrml.set_model_scalars(model, "b", values)
    np.testing.assert_array_equal(mrml.array_from_model_scalars(model, "b"), values)
    assert model.GetDisplayNode().GetActiveScalarName() == "b"

    mrml.set_model_scalars(model, "a", values * 2, active=False)
    np.testing.assert_array_equal(mrml.array_from_model_scalars(model, "a"), values * 2)
    assert model.GetPolyData().GetPointData().GetNumberOfArrays() == 2
    assert model.GetDisplayNode().GetActiveScalarName() == "b"

    with pytest.raises(ValueError, match=r"scalars 'c' must have shape \(42,\)"):
        mrml.set_model_scalars(model, "c", values[:10])
    with pytest.raises(ValueError, match=r"no scalars 'c'; available: \['a', 'b'\]"):
        mrml.array_from_model_scalars(model, "c")
    with pytest.raises(ValueError, match="model_node must be a vtkMRMLModelNode"):
        mrml.set_model_scalars(scene, "c", values)


def test_set_scalar_threshold(scene, sphere):
    vertices, faces = sphere
    model = mrml.add_surface_model(scene, vertices, faces, "m", scalars={"z": vertices[:, 2]})
    mrml.set_scalar_threshold(model, -5, 20)
    assert model.GetDisplayNode().GetThresholdEnabled()
    assert model.GetDisplayNode().GetThresholdRange() == (-5.0, 20.0)
    mrml.set_scalar_threshold(model, -5, 20, enabled=False)
    assert not model.GetDisplayNode().GetThresholdEnabled()
    with pytest.raises(ValueError, match="lower <= upper"):
        mrml.set_scalar_threshold(model, 3, 1)
    bare = scene.AddNewNodeByClass("vtkMRMLModelNode", "bare")
    with pytest.raises(ValueError, match="'bare' has no display node"):
        mrml.set_scalar_threshold(bare, 0, 1)


# --------------------------------------------------------------------------
# Color tables
# --------------------------------------------------------------------------
def _rgb(table, index):
    rgba = [0.0] * 4
    table.GetColor(index, rgba)
    return np.array(rgba[:3])


def test_diverging_color_table_is_blue_white_red_and_reused(scene):
    table = mrml.diverging_color_table(scene, n=257)
    assert table.IsA("vtkMRMLColorTableNode") and table.GetNumberOfColors() == 257
    low, middle, high = _rgb(table, 0), _rgb(table, 128), _rgb(table, 256)
    assert low[2] > 0.5 > low[0]
    assert high[0] > 0.5 > high[2]
    np.testing.assert_array_equal(middle, [1.0, 1.0, 1.0])
    count = _count(scene)
    again = mrml.diverging_color_table(scene, n=257)
    assert again.GetID() == table.GetID() and _count(scene) == count


def test_sequential_color_table_and_errors(scene):
    table = mrml.sequential_color_table(scene, n=16)
    assert table.GetNumberOfColors() == 16
    assert _rgb(table, 0).sum() > _rgb(table, 15).sum()  # light to dark
    with pytest.raises(ValueError, match="n must be an integer >= 2"):
        mrml.diverging_color_table(scene, name="other", n=1)
    scene.AddNewNodeByClass("vtkMRMLTableNode", "taken")
    with pytest.raises(ValueError, match="existing node 'taken' must be a vtkMRMLColorTableNode"):
        mrml.diverging_color_table(scene, name="taken")


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------
def test_table_round_trip_keeps_types(scene, example_df):
    node = mrml.table_from_dataframe(scene, example_df, "cohort")
    assert node.GetTable().GetNumberOfRows() == 4
    assert node.GetTable().GetColumnByName("subject_id").IsA("vtkStringArray")
    assert node.GetTable().GetColumnByName("is_patient").IsA("vtkBitArray")
    pd.testing.assert_frame_equal(mrml.dataframe_from_table(node), example_df)


def test_table_overwrite_and_index(scene, example_df):
    node = mrml.table_from_dataframe(scene, example_df, "first")
    indexed = pd.DataFrame({"thickness": [2.5, 2.75]}, index=pd.Index(["a", "b"], name="subject_id"))
    same = mrml.table_from_dataframe(scene, indexed, "second", table_node=node)
    assert same.GetID() == node.GetID() and same.GetName() == "second"
    pd.testing.assert_frame_equal(mrml.dataframe_from_table(node), indexed.reset_index())


def test_table_rejects_unsupported_columns(scene):
    before = _count(scene)
    dates = pd.DataFrame({"visit": pd.to_datetime(["2020-01-01", "2021-01-01"])})
    with pytest.raises(ValueError, match="column 'visit' has dtype"):
        mrml.table_from_dataframe(scene, dates, "t")
    nullable = pd.DataFrame({"n": pd.array([1, None], dtype="Int64")})
    with pytest.raises(ValueError, match="column 'n' has missing values"):
        mrml.table_from_dataframe(scene, nullable, "t")
    duplicated = pd.DataFrame([[1, 2]], columns=["x", "x"])
    with pytest.raises(ValueError, match=r"duplicate column names \['x'\]"):
        mrml.table_from_dataframe(scene, duplicated, "t")
    with pytest.raises(ValueError, match="df must be a pandas DataFrame"):
        mrml.table_from_dataframe(scene, {"x": [1]}, "t")
    assert _count(scene) == before


# --------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------
def _series(chart):
    return [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]


def test_add_plot_references_table_columns(scene, example_df):
    table = mrml.table_from_dataframe(scene, example_df, "cohort")
    chart = mrml.add_plot(
        scene, table, "age", ["score", "n_vertices"], "Scores", plot_type="Scatter",
        y_label="Score", marker_styles=["square", "diamond"], colors=[(1, 0, 0), (0, 0, 1)],
    )
    assert chart.IsA("vtkMRMLPlotChartNode")
    assert chart.GetXAxisTitle() == "age" and chart.GetYAxisTitle() == "Score"
    series = _series(chart)
    assert [s.GetYColumnName() for s in series] == ["score", "n_vertices"]
    for s in series:
        assert s.IsA("vtkMRMLPlotSeriesNode")
        assert s.GetTableNodeID() == table.GetID()
        assert s.GetXColumnName() == "age"
        assert s.GetPlotTypeAsString(s.GetPlotType()) == "Scatter"
    assert [s.GetMarkerStyleAsString(s.GetMarkerStyle()) for s in series] == ["square", "diamond"]
    assert series[0].GetColor() == (1.0, 0.0, 0.0)

    line = mrml.add_plot(scene, table, "age", "score", "Line", line_styles=["dash"])
    (only,) = _series(line)
    assert only.GetPlotTypeAsString(only.GetPlotType()) == "Line"
    assert only.GetLineStyleAsString(only.GetLineStyle()) == "dash"


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (("age", ["volume"]), {}, r"y_columns: table 'cohort' has no column 'volume'"),
        (("when", ["score"]), {}, "x_column: table 'cohort' has no column 'when'"),
        (("age", ["subject_id"]), {}, "column 'subject_id' is not numeric"),
        (("age", ["score"]), {"plot_type": "Pie"}, "plot_type must be 'Line' or 'Scatter'"),
        (("age", ["score"]), {"marker_styles": ["star"]}, "marker_styles: unknown style 'star'"),
        (("age", ["score", "age"]), {"colors": [(1, 0, 0)]}, "colors must have one entry per y column"),
        (("age", ["score"]), {"colors": [(2, 0, 0)]}, r"colors: color must be \(r, g, b\) in \[0, 1\]"),
        (("age", []), {}, "y_columns must name at least one column"),
    ],
)
def test_add_plot_rejects_bad_input(scene, example_df, args, kwargs, message):
    table = mrml.table_from_dataframe(scene, example_df, "cohort")
    before = _count(scene)
    with pytest.raises(ValueError, match=message):
        mrml.add_plot(scene, table, *args, "chart", **kwargs)
    assert _count(scene) == before


def test_centile_plot_shows_curves_and_patient(scene):
    ages = np.linspace(20, 90, 8)
    curves = {f"p{c}": 3.0 - 0.01 * ages + 0.1 * k for k, c in enumerate((5, 25, 50, 75, 95))}
    chart = mrml.centile_plot(scene, ages, curves, 67.5, 2.1, "superiorfrontal")
    series = _series(chart)
    assert [s.GetName() for s in series] == [*curves, "Patient"]
    curve_table = scene.GetFirstNodeByName("superiorfrontal centiles")
    expected = pd.DataFrame({"age": ages, **curves})
    pd.testing.assert_frame_equal(mrml.dataframe_from_table(curve_table), expected)
    for s in series[:-1]:
        assert s.GetTableNodeID() == curve_table.GetID() and s.GetXColumnName() == "age"
        assert s.GetPlotTypeAsString(s.GetPlotType()) == "Line"
    styles = [s.GetLineStyleAsString(s.GetLineStyle()) for s in series[:-1]]
    assert styles == ["dash", "dash", "solid", "dash", "dash"]

    patient = series[-1]
    patient_table = patient.GetTableNode()
    pd.testing.assert_frame_equal(
        mrml.dataframe_from_table(patient_table), pd.DataFrame({"age": [67.5], "value": [2.1]})
    )
    assert patient.GetPlotTypeAsString(patient.GetPlotType()) == "Scatter"
    assert patient.GetMarkerStyleAsString(patient.GetMarkerStyle()) == "diamond"
    assert patient.GetColor() != series[0].GetColor()
    assert chart.GetYAxisTitle() == "Cortical thickness (mm)"


def test_centile_plot_accepts_numeric_centiles(scene):
    ages = np.array([20.0, 50.0, 80.0])
    chart = mrml.centile_plot(scene, ages, {5: ages * 0, 50: ages * 0 + 1, 97.5: ages * 0 + 2}, 40, 1.0, "c")
    assert [s.GetYColumnName() for s in _series(chart)] == ["p5", "p50", "p97.5", "value"]


def test_centile_plot_rejects_bad_input(scene):
    ages = np.linspace(20, 90, 8)
    before = _count(scene)
    with pytest.raises(ValueError, match=r"centile_curves\['p95'\] must have shape \(8,\)"):
        mrml.centile_plot(scene, ages, {"p50": ages, "p95": ages[:3]}, 50, 2.0, "c")
    with pytest.raises(ValueError, match=r"centile_curves\[95\] must have shape \(8,\)"):
        mrml.centile_plot(scene, ages, {95: ages[:3]}, 50, 2.0, "c")
    with pytest.raises(ValueError, match="patient_age and patient_value must be finite"):
        mrml.centile_plot(scene, ages, {"p50": ages}, np.nan, 2.0, "c")
    with pytest.raises(ValueError, match="'age' is reserved"):
        mrml.centile_plot(scene, ages, {"age": ages}, 50, 2.0, "c")
    assert _count(scene) == before


# --------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------
def _oblique_ijk_to_ras():
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation * [1.5, 2.0, 2.5]
    matrix[:3, 3] = [-90.0, 12.5, 30.0]
    return matrix


def test_add_volume_keeps_voxels_and_geometry(scene, rng):
    data = rng.normal(size=(4, 5, 6)).astype(np.float32)
    matrix = _oblique_ijk_to_ras()
    volume = mrml.add_volume(scene, data, matrix, "t1")
    assert volume.IsA("vtkMRMLScalarVolumeNode") and not volume.IsA("vtkMRMLLabelMapVolumeNode")
    assert volume.GetImageData().GetDimensions() == (6, 5, 4)
    np.testing.assert_array_equal(mrml.array_from_volume(volume), data)
    np.testing.assert_allclose(mrml.ijk_to_ras_from_volume(volume), matrix, atol=1e-12)
    np.testing.assert_allclose(volume.GetSpacing(), [1.5, 2.0, 2.5])
    np.testing.assert_allclose(volume.GetOrigin(), [-90.0, 12.5, 30.0])
    assert volume.GetDisplayNode() is not None


def test_add_volume_label_map_casts_types(scene, rng):
    mask = rng.random((3, 4, 5)) > 0.5
    label = mrml.add_volume(scene, mask, np.eye(4), "mask", label_map=True)
    assert label.IsA("vtkMRMLLabelMapVolumeNode")
    np.testing.assert_array_equal(mrml.array_from_volume(label), mask.astype(np.uint8))
    labels64 = rng.integers(0, 35, size=(3, 4, 5))  # int64, which NRRD writers reject
    parcels = mrml.add_volume(scene, labels64, np.eye(4), "parcels", label_map=True)
    got = mrml.array_from_volume(parcels)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, labels64)


@pytest.mark.parametrize(
    "array, matrix, kwargs, message",
    [
        (np.zeros((2, 2, 2)), np.eye(3), {}, r"ijk_to_ras must be a 4x4 matrix, got shape \(3, 3\)"),
        (np.zeros((2, 2, 2)), [[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], {}, "no shear"),
        (np.zeros((2, 2, 2)), np.diag([1, 0, 1, 1]), {}, "zero-length axis"),
        (np.zeros((2, 2, 2)), np.ones((4, 4)), {}, r"last row \[0, 0, 0, 1\]"),
        (np.zeros((2, 2)), np.eye(4), {}, "array_kji must be a non-empty 3-D array"),
        (np.zeros((2, 2, 2)), np.eye(4), {"label_map": True}, "label map must hold integers"),
        (np.full((2, 2, 2), 2**40), np.eye(4), {}, "outside the 32-bit range"),
    ],
)
def test_add_volume_rejects_bad_input(scene, array, matrix, kwargs, message):
    before = _count(scene)
    with pytest.raises(ValueError, match=message):
        mrml.add_volume(scene, array, matrix, "v", **kwargs)
    assert _count(scene) == before


def test_volume_from_nifti_matches_nibabel(scene, tmp_path, rng):
    data = rng.normal(size=(6, 5, 4)).astype(np.float32)  # nibabel order: i, j, k
    affine = _oblique_ijk_to_ras()
    path = tmp_path / "t1w.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    volume = mrml.volume_from_nifti(scene, path)
    assert volume.GetName() == "t1w"
    np.testing.assert_array_equal(mrml.array_from_volume(volume), data.transpose(2, 1, 0))
    np.testing.assert_allclose(mrml.ijk_to_ras_from_volume(volume), affine, atol=1e-4)

    labels = rng.integers(0, 5, size=(6, 5, 4)).astype(np.int16)
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "aseg.nii")
    label = mrml.volume_from_nifti(scene, tmp_path / "aseg.nii", name="aseg", label_map=True)
    assert label.IsA("vtkMRMLLabelMapVolumeNode")
    np.testing.assert_array_equal(mrml.array_from_volume(label), labels.transpose(2, 1, 0))


def test_volume_from_nifti_errors_leave_scene_unchanged(scene, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        mrml.volume_from_nifti(scene, tmp_path / "missing.nii.gz")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="could not read an image from .*broken.nii.gz"):
        mrml.volume_from_nifti(scene, broken)
    assert _count(scene) == 0  # the volume and storage nodes made before the failure are gone


# --------------------------------------------------------------------------
# Markups
# --------------------------------------------------------------------------
def test_markups_points_round_trip(scene, rng):
    points = rng.normal(scale=40, size=(5, 3))
    labels = ["peak 1", "peak 2", "peak 3", "peak 4", "peak 5"]
    node = mrml.add_markups_points(scene, points, labels, "Atrophy peaks")
    assert node.IsA("vtkMRMLMarkupsFiducialNode")
    got_points, got_labels = mrml.points_from_markups(node)
    np.testing.assert_array_equal(got_points, points)
    assert got_labels == labels
    numbered = mrml.add_markups_points(scene, points[:2], None, "P")
    assert mrml.points_from_markups(numbered)[1] == ["P-1", "P-2"]


def test_markups_rejects_bad_input(scene):
    before = _count(scene)
    with pytest.raises(ValueError, match="labels must be 2 strings"):
        mrml.add_markups_points(scene, np.zeros((2, 3)), ["only one"], "m")
    with pytest.raises(ValueError, match=r"points_ras must be a finite \(n_points, 3\) array"):
        mrml.add_markups_points(scene, np.zeros((2, 2)), ["a", "b"], "m")
    assert _count(scene) == before


# --------------------------------------------------------------------------
# Rollback helper
# --------------------------------------------------------------------------
def test_failed_block_removes_the_nodes_it_added(scene):
    kept = scene.AddNewNodeByClass("vtkMRMLTableNode", "kept")
    with pytest.raises(RuntimeError, match="boom"):
        with mrml._remove_added_nodes_on_error(scene):
            scene.AddNewNodeByClass("vtkMRMLModelNode", "new")
            scene.AddNewNodeByClass("vtkMRMLTableNode", "new table")
            raise RuntimeError("boom")
    assert _count(scene) == 1 and scene.GetNodeByID(kept.GetID()) is not None


# --------------------------------------------------------------------------
# Scene files
# --------------------------------------------------------------------------
@pytest.fixture
def full_scene(sphere, rng, example_df):
    """A scene with every kind of node save_scene handles; returns (scene, expected values)."""
    scene = slicer.vtkMRMLScene()
    vertices, faces = sphere
    z = rng.normal(size=len(vertices))
    colors = mrml.diverging_color_table(scene)
    mrml.add_surface_model(
        scene, vertices, faces, "lh atrophy", scalars={"z": z, "atrophy": z < -1},
        color_node=colors, scalar_range=(-4, 4), threshold=(-10, -1.96),
    )
    table = mrml.table_from_dataframe(scene, example_df, "cohort")
    chart = mrml.add_plot(scene, table, "age", ["score"], "Score by age", plot_type="Scatter")
    mrml.centile_plot(scene, np.linspace(20, 90, 5), {"p5": np.arange(5.0), "p50": np.arange(5.0) + 1,
                      "p95": np.arange(5.0) + 2}, 50.0, 1.5, "Centiles")
    volume_data = rng.normal(size=(4, 5, 6))
    volume = mrml.add_volume(scene, volume_data, _oblique_ijk_to_ras(), "t1")
    labels = rng.integers(0, 4, size=(4, 5, 6)).astype(np.int16)
    mrml.add_volume(scene, labels, np.eye(4), "labels", label_map=True)
    points = rng.normal(scale=40, size=(3, 3))
    mrml.add_markups_points(scene, points, ["a", "b", "c"], "peaks")
    expected = {
        "vertices": vertices, "faces": faces, "z": z, "table": example_df, "volume": volume_data,
        "spacing": volume.GetSpacing(), "origin": volume.GetOrigin(), "labels": labels,
        "points": points, "color_id": colors.GetID(), "chart_id": chart.GetID(),
    }
    return scene, expected


def _storage_file_names(mrml_path):
    root = ET.parse(mrml_path).getroot()
    return {element.tag: element.get("fileName") for element in root if element.get("fileName")}


def _assert_scene_content(loaded, expected):
    model = loaded.GetFirstNodeByName("lh atrophy")
    got_vertices, got_faces = mrml.mesh_from_model(model)
    np.testing.assert_array_equal(got_vertices, expected["vertices"])
    np.testing.assert_array_equal(got_faces, expected["faces"])
    np.testing.assert_array_equal(mrml.array_from_model_scalars(model, "z"), expected["z"])
    np.testing.assert_array_equal(
        mrml.array_from_model_scalars(model, "atrophy"), (expected["z"] < -1).astype(np.uint8)
    )
    display = model.GetDisplayNode()
    assert display.GetColorNodeID() == expected["color_id"]
    assert display.GetColorNode().GetName() == "NeuroAtrophy diverging"
    assert display.GetColorNode().GetNumberOfColors() == 256
    assert display.GetScalarRange() == (-4.0, 4.0)
    assert display.GetScalarRangeFlag() == display.UseManualScalarRange
    assert display.GetActiveScalarName() == "z"
    assert display.GetThresholdEnabled() and display.GetThresholdRange() == (-10.0, -1.96)

    table = loaded.GetFirstNodeByName("cohort")
    pd.testing.assert_frame_equal(mrml.dataframe_from_table(table), expected["table"])
    chart = loaded.GetNodeByID(expected["chart_id"])
    (series,) = _series(chart)
    assert series.GetTableNodeID() == table.GetID()
    assert (series.GetXColumnName(), series.GetYColumnName()) == ("age", "score")
    centiles = loaded.GetFirstNodeByName("Centiles")
    assert [s.GetName() for s in _series(centiles)] == ["p5", "p50", "p95", "Patient"]
    assert _series(centiles)[-1].GetTableNode().GetName() == "Centiles patient"

    volume = loaded.GetFirstNodeByName("t1")
    np.testing.assert_array_equal(mrml.array_from_volume(volume), expected["volume"])
    np.testing.assert_allclose(volume.GetSpacing(), expected["spacing"], rtol=1e-12)
    np.testing.assert_allclose(volume.GetOrigin(), expected["origin"], rtol=1e-12)
    label = loaded.GetFirstNodeByName("labels")
    assert label.IsA("vtkMRMLLabelMapVolumeNode")
    np.testing.assert_array_equal(mrml.array_from_volume(label), expected["labels"])

    points, labels = mrml.points_from_markups(loaded.GetFirstNodeByName("peaks"))
    np.testing.assert_allclose(points, expected["points"], rtol=0, atol=1e-9)
    assert labels == ["a", "b", "c"]


def test_save_and_load_scene_round_trip(full_scene, tmp_path):
    scene, expected = full_scene
    path = tmp_path / "atrophy.mrml"
    mrml.save_scene(scene, path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["atrophy.mrml", "atrophy_data"]
    file_names = _storage_file_names(path)
    assert {"ModelStorage", "TableStorage", "VolumeArchetypeStorage", "MarkupsJsonStorage",
            "ColorTableStorage"} <= set(file_names)
    for tag, name in file_names.items():
        assert name.startswith("atrophy_data/"), (tag, name)
        assert (tmp_path / name).is_file()
    written = sorted(p.name for p in (tmp_path / "atrophy_data").iterdir())
    for name in ("lh_atrophy.vtk", "cohort.tsv", "cohort.schema.tsv", "t1.nrrd", "labels.nrrd",
                 "peaks.mrk.json", "NeuroAtrophy_diverging.ctbl"):
        assert name in written
    assert "slicer-core" not in path.read_text()  # no version stamp that makes Slicer warn

    # The saved scene now refers to the written files.
    assert scene.GetURL() == str(path)
    storage = scene.GetFirstNodeByName("lh atrophy").GetStorageNode()
    assert storage.GetFileName() == str(tmp_path / "atrophy_data" / "lh_atrophy.vtk")

    _assert_scene_content(mrml.load_scene(path), expected)

    # Relative paths: the scene still opens after moving its folder.
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.copytree(tmp_path, moved)
    _assert_scene_content(mrml.load_scene(moved / "atrophy.mrml"), expected)


def test_save_scene_replaces_an_existing_scene(full_scene, tmp_path):
    scene, expected = full_scene
    path = tmp_path / "scene.mrml"
    (tmp_path / "scene_data").mkdir()
    (tmp_path / "scene_data" / "stale.vtk").write_text("old")
    path.write_text("old")
    mrml.save_scene(scene, path)
    mrml.save_scene(scene, path)  # again, reusing the storage nodes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.mrml", "scene_data"]
    assert not (tmp_path / "scene_data" / "stale.vtk").exists()
    assert scene.GetNumberOfNodesByClass("vtkMRMLModelStorageNode") == 1
    _assert_scene_content(mrml.load_scene(path), expected)


def test_failed_save_leaves_scene_and_folder_unchanged(full_scene, tmp_path):
    scene, _ = full_scene
    empty = scene.AddNewNodeByClass("vtkMRMLModelNode", "empty")  # no surface: cannot be written
    before = _count(scene)
    with pytest.raises(ValueError, match="could not write the data of node 'empty'"):
        mrml.save_scene(scene, tmp_path / "broken.mrml")
    assert _count(scene) == before
    assert empty.GetStorageNode() is None
    assert scene.GetFirstNodeByName("lh atrophy").GetStorageNode() is None
    assert scene.GetURL() == ""
    assert list(tmp_path.iterdir()) == []


def test_save_scene_reuses_or_replaces_existing_storage_nodes(scene, tmp_path, rng):
    data = rng.normal(size=(6, 5, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "t1w.nii.gz")
    volume = mrml.volume_from_nifti(scene, tmp_path / "t1w.nii.gz")
    reader = volume.GetStorageNode()
    markups = mrml.add_markups_points(scene, np.ones((1, 3)), ["x"], "fcsv points")
    legacy = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialStorageNode")
    markups.SetAndObserveStorageNodeID(legacy.GetID())

    out = tmp_path / "out"
    out.mkdir()
    mrml.save_scene(scene, out / "s.mrml")
    assert volume.GetStorageNode().GetID() == reader.GetID()  # same class: reused, new file
    assert scene.GetNodeByID(legacy.GetID()) is None  # replaced by a JSON storage node
    text = (out / "s.mrml").read_text()
    assert "nii.gz" not in text and "MarkupsFiducialStorage" not in text
    assert _storage_file_names(out / "s.mrml") == {
        "VolumeArchetypeStorage": "s_data/t1w.nrrd", "MarkupsJsonStorage": "s_data/fcsv_points.mrk.json",
    }
    loaded = mrml.load_scene(out / "s.mrml")
    np.testing.assert_array_equal(
        mrml.array_from_volume(loaded.GetFirstNodeByName("t1w")), data.transpose(2, 1, 0)
    )


def test_save_scene_moves_private_node_data(scene, tmp_path):
    hidden = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "hidden colors")  # hidden by default
    hidden.SetTypeToUser()
    hidden.SetNumberOfColors(2)
    hidden.SetColor(0, 0.0, 0.0, 0.0, 1.0)
    hidden.SetColor(1, 1.0, 1.0, 1.0, 1.0)
    mrml.save_scene(scene, tmp_path / "p.mrml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.mrml", "p_Private", "p_data"]
    (name,) = _storage_file_names(tmp_path / "p.mrml").values()
    name = urllib.parse.unquote(name)  # Slicer percent-encodes these file names
    assert name.startswith("p_Private/") and (tmp_path / name).is_file()
    assert hidden.GetStorageNode().GetFileName() == str(tmp_path / name)
    loaded = mrml.load_scene(tmp_path / "p.mrml")
    assert loaded.GetFirstNodeByName("hidden colors").GetNumberOfColors() == 2


def test_save_scene_rejects_bad_paths(scene, tmp_path):
    with pytest.raises(ValueError, match=r"path must end in \.mrml"):
        mrml.save_scene(scene, tmp_path / "scene.mrb")
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        mrml.save_scene(scene, tmp_path / "no-such-folder" / "scene.mrml")


def test_load_scene_errors(full_scene, tmp_path):
    scene, _ = full_scene
    with pytest.raises(FileNotFoundError, match="missing.mrml"):
        mrml.load_scene(tmp_path / "missing.mrml")
    path = tmp_path / "s.mrml"
    mrml.save_scene(scene, path)
    (tmp_path / "s_data" / "t1.nrrd").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"could not read t1.nrrd \(node 't1'\)"):
        mrml.load_scene(path)
    (tmp_path / "s_data" / "t1.nrrd").unlink()
    with pytest.raises(FileNotFoundError, match="node 't1' not found: .*t1.nrrd"):
        mrml.load_scene(path)
