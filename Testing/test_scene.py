"""Tests of neuroatrophy.scene with a real fitted model and a real MRML scene (slicer-core)."""

import numpy as np
import pandas as pd
import pytest
import slicer

from neuroatrophy import mrml
from neuroatrophy import scene as na_scene
from neuroatrophy.demo import make_demo_cohort
from neuroatrophy.surface import load_fsaverage5
from neuroatrophy.thickness_model import CorticalThicknessModel


@pytest.fixture(scope="module")
def fitted():
    """A small demo cohort, a model fitted on most of its controls, and one patient's map."""
    cohort = make_demo_cohort(n_controls=48, n_patients=2, n_sites=2, seed=3)
    covariates = cohort.covariates
    controls = np.flatnonzero(~cohort.is_patient)
    train, held_out = controls[:40], controls[40:]
    model = CorticalThicknessModel().fit(cohort.thickness[train], covariates.iloc[train])
    patient = np.flatnonzero(cohort.is_patient)[0]
    patient_map = model.patient_map(cohort.thickness[patient], covariates.iloc[[patient]], threshold=-1.96,
                                    min_cluster_size=20)
    return {"cohort": cohort, "model": model, "patient": patient, "map": patient_map, "held_out": held_out}


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def _node_count(scene):
    return scene.GetNumberOfNodes()


def test_show_patient_map_puts_the_library_result_on_the_surface(scene, fitted):
    pm = fitted["map"]
    assert pm.atrophy.n_atrophic > 0  # the demo patient has atrophy to show

    nodes = na_scene.show_patient_map(scene, pm)

    model = nodes["model"]
    assert set(nodes) == {"model", "color_table", "regions_table"}
    assert all(scene.IsNodePresent(node) for node in nodes.values())
    assert model.GetName() == f"{pm.subject_id} atrophy map"
    vertices, faces = mrml.mesh_from_model(model)
    inflated = load_fsaverage5("inflated")
    np.testing.assert_allclose(vertices, inflated.vertices)
    np.testing.assert_array_equal(faces, inflated.faces)

    z = mrml.array_from_model_scalars(model, "z")
    np.testing.assert_array_equal(z, pm.z)  # NaN (medial wall) compares equal to NaN
    np.testing.assert_array_equal(mrml.array_from_model_scalars(model, "centile"), pm.centile)
    np.testing.assert_array_equal(mrml.array_from_model_scalars(model, "atrophic"), pm.atrophy.mask)
    np.testing.assert_array_equal(mrml.array_from_model_scalars(model, "cluster"), pm.atrophy.cluster_labels)
    shown = mrml.array_from_model_scalars(model, "atrophy_z")
    np.testing.assert_array_equal(shown[pm.atrophy.mask], pm.z[pm.atrophy.mask])
    assert np.all(shown[~pm.atrophy.mask] == 0)
    assert np.all(shown[pm.atrophy.mask] < -1.96)

    display = model.GetDisplayNode()
    assert display.GetActiveScalarName() == "atrophy_z"
    assert display.GetColorNodeID() == nodes["color_table"].GetID()
    low, high = display.GetScalarRange()
    assert low == -high and high >= 1.96 + 1

    regions = mrml.dataframe_from_table(nodes["regions_table"])
    assert list(regions.columns) == list(pm.regions.columns)
    assert list(regions["region"]) == list(pm.regions["region"])
    np.testing.assert_allclose(regions["thickness_mm"], pm.regions["thickness_mm"])
    assert model.GetAttribute(na_scene.ATTRIBUTE_REGIONS_TABLE) == nodes["regions_table"].GetID()
    assert model.GetAttribute(na_scene.ATTRIBUTE_SUBJECT) == pm.subject_id


def test_other_threshold_matches_the_model_computed_with_that_threshold(scene, fitted):
    model, cohort, patient = fitted["model"], fitted["cohort"], fitted["patient"]
    strict = model.patient_map(cohort.thickness[patient], cohort.covariates.iloc[[patient]], threshold=-3.0,
                               min_cluster_size=20)
    assert 0 < strict.atrophy.n_atrophic < fitted["map"].atrophy.n_atrophic

    nodes = na_scene.show_patient_map(scene, fitted["map"], surface_kind="pial", threshold=-3.0, name="strict")

    np.testing.assert_array_equal(mrml.array_from_model_scalars(nodes["model"], "atrophic"), strict.atrophy.mask)
    np.testing.assert_array_equal(mrml.mesh_from_model(nodes["model"])[0], load_fsaverage5("pial").vertices)
    assert nodes["model"].GetName() == "strict"
    assert float(nodes["model"].GetAttribute(na_scene.ATTRIBUTE_THRESHOLD)) == -3.0


def test_update_threshold_recomputes_mask_and_clusters(scene, fitted):
    model, cohort, patient, pm = fitted["model"], fitted["cohort"], fitted["patient"], fitted["map"]
    node = na_scene.show_patient_map(scene, pm)["model"]
    expected = model.patient_map(cohort.thickness[patient], cohort.covariates.iloc[[patient]], threshold=-2.5,
                                 min_cluster_size=20).atrophy

    amap = na_scene.update_threshold(node, -2.5)

    np.testing.assert_array_equal(amap.mask, expected.mask)
    np.testing.assert_array_equal(mrml.array_from_model_scalars(node, "atrophic"), expected.mask)
    np.testing.assert_array_equal(mrml.array_from_model_scalars(node, "cluster"), expected.cluster_labels)
    shown = mrml.array_from_model_scalars(node, "atrophy_z")
    assert np.count_nonzero(shown) == expected.n_atrophic
    assert float(node.GetAttribute(na_scene.ATTRIBUTE_THRESHOLD)) == -2.5
    np.testing.assert_array_equal(mrml.array_from_model_scalars(node, "z"), pm.z)  # z itself is untouched

    na_scene.update_threshold(node, -1.96)
    np.testing.assert_array_equal(mrml.array_from_model_scalars(node, "atrophic"), pm.atrophy.mask)

    # Without cluster filtering every vertex below the threshold is atrophic.
    unfiltered = na_scene.update_threshold(node, -1.96, min_cluster_size=0)
    np.testing.assert_array_equal(unfiltered.mask, np.nan_to_num(pm.z, nan=0.0) < -1.96)
    assert node.GetAttribute(na_scene.ATTRIBUTE_MIN_CLUSTER_SIZE) == "0"

    # A threshold beyond the colour range widens it symmetrically.
    na_scene.update_threshold(node, -9.5)
    low, high = node.GetDisplayNode().GetScalarRange()
    assert low == -high and high >= 10.5


def test_update_threshold_rejects_other_models(scene, fitted):
    plain = mrml.add_surface_model(scene, np.eye(3), [[0, 1, 2]], "triangle")
    with pytest.raises(ValueError, match="triangle.*not a patient atrophy map"):
        na_scene.update_threshold(plain, -2.0)
    node = na_scene.show_patient_map(scene, fitted["map"])["model"]
    with pytest.raises(ValueError, match="threshold must be finite"):
        na_scene.update_threshold(node, float("nan"))


def test_bad_input_adds_no_nodes(scene, fitted):
    before = _node_count(scene)
    with pytest.raises(ValueError, match="surface_kind must be one of"):
        na_scene.show_patient_map(scene, fitted["map"], surface_kind="sphere-ish")
    short = fitted["map"]
    truncated = type(short)(**{**short.__dict__, "z": short.z[:100]})
    with pytest.raises(ValueError, match=r"patient_map.z must have one value per fsaverage5 vertex"):
        na_scene.show_patient_map(scene, truncated)
    assert _node_count(scene) == before


def test_centile_curves_with_the_patient(scene, fitted):
    model, pm = fitted["model"], fitted["map"]
    region = pm.regions["region"].iloc[0]

    chart = na_scene.show_centile_curves(scene, model, region, patient_map=pm)

    assert chart.GetName() == f"{region} thickness"
    series = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
    assert [s.GetName() for s in series] == ["p5", "p25", "p50", "p75", "p95", "Patient"]
    curves = mrml.dataframe_from_table(series[0].GetTableNode())
    site = pm.site if pm.site in model.sites_ else None
    expected = model.region_centile_curves(region, sex=pm.sex, site=site)
    np.testing.assert_allclose(curves[list(expected.columns)].to_numpy(), expected.to_numpy())
    patient = mrml.dataframe_from_table(series[-1].GetTableNode())
    assert patient["age"].tolist() == [pytest.approx(pm.age)]
    assert patient["value"].tolist() == [pytest.approx(pm.regional_thickness[region])]


def test_centile_curves_without_patient_and_errors(scene, fitted):
    model = fitted["model"]
    chart = na_scene.show_centile_curves(scene, model, "L_insula", sex="M")
    assert chart.GetNumberOfPlotSeriesNodes() == 5
    curves = mrml.dataframe_from_table(chart.GetNthPlotSeriesNode(0).GetTableNode())
    expected = model.region_centile_curves("L_insula", sex="M")
    np.testing.assert_allclose(curves["p50"], expected["p50"])

    with pytest.raises(ValueError, match="region 'L_hippocampus' is not a region of the model.*L_insula"):
        na_scene.show_centile_curves(scene, model, "L_hippocampus")
    with pytest.raises(ValueError, match="give both patient_age and patient_value"):
        na_scene.show_centile_curves(scene, model, "L_insula", patient_age=50.0)


def test_remove_plot_removes_chart_series_and_tables(scene, fitted):
    keep = na_scene.show_centile_curves(scene, fitted["model"], "R_insula", patient_map=fitted["map"])
    before = _node_count(scene)
    chart = na_scene.show_centile_curves(scene, fitted["model"], "L_insula", patient_map=fitted["map"])
    assert _node_count(scene) == before + 1 + 6 + 2  # chart, 6 series, curve and patient tables

    na_scene.remove_plot(scene, chart)

    assert _node_count(scene) == before
    assert scene.IsNodePresent(keep) and keep.GetNumberOfPlotSeriesNodes() == 6


def test_fit_quality_table_summarises_held_out_controls(scene, fitted):
    cohort, held_out = fitted["cohort"], fitted["held_out"]
    table_df, calibration = fitted["model"].evaluate(cohort.thickness[held_out], cohort.covariates.iloc[held_out])

    node = na_scene.show_fit_quality(scene, table_df, calibration)

    summary = mrml.dataframe_from_table(node)
    assert list(summary.columns) == ["measure", "value", "reference"]
    values = dict(zip(summary["measure"], summary["value"]))
    references = dict(zip(summary["measure"], summary["reference"]))
    assert values["Explained variance (median over vertices)"] == pytest.approx(np.median(table_df["EV"]))
    assert values["Pearson correlation (median over vertices)"] == pytest.approx(np.median(table_df["Rho"]))
    assert values["Mean z of held-out controls"] == pytest.approx(calibration["z_mean"])
    assert references["SD of z of held-out controls"] == 1.0
    assert references["Fraction of |z| > 1.96"] == 0.05
    assert np.isnan(references["Explained variance (median over vertices)"])

    with pytest.raises(ValueError, match="no fit-quality measure found"):
        na_scene.show_fit_quality(scene, pd.DataFrame({"other": [1.0]}), {})


def test_patient_map_survives_saving_the_scene(scene, fitted, tmp_path):
    pm = fitted["map"]
    na_scene.show_patient_map(scene, pm)
    mrml.save_scene(scene, tmp_path / "map.mrml")

    loaded = mrml.load_scene(tmp_path / "map.mrml")

    model = loaded.GetFirstNodeByName(f"{pm.subject_id} atrophy map")
    np.testing.assert_array_equal(mrml.array_from_model_scalars(model, "z"), pm.z)
    np.testing.assert_array_equal(mrml.array_from_model_scalars(model, "atrophic"), pm.atrophy.mask)
    assert model.GetAttribute(na_scene.ATTRIBUTE_SURFACE) == "inflated"
    # The saved map can still be re-thresholded.
    assert na_scene.update_threshold(model, -2.5).n_atrophic < pm.atrophy.n_atrophic
