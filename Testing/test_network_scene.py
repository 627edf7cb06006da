"""Tests of neuroatrophy.network_scene (and the mrml bridges it added) on a real MRML scene (slicer-core).

The analyses are real: a small fsaverage5 connectome of simulated subjects
(neuroatrophy.demo_connectome) seeded with Desikan-Killiany regions, and a small
MNI152-2mm connectome on a box of voxels, both run through analyse_networks.
"""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import slicer

from neuroatrophy import mrml
from neuroatrophy import network_scene as ns
from neuroatrophy.connectome import ConnectomeStore, fsaverage5_coordinates
from neuroatrophy.demo_connectome import simulate_connectome_subjects
from neuroatrophy.network_analysis import NetworkAnalysis, analyse_networks
from neuroatrophy.outcome import target_outcome_analysis
from neuroatrophy.surface import dk_atlas, load_fsaverage5
from neuroatrophy.targets import standard_targets, targets_table, user_target

PATIENTS = ["p1", "p2", "p3", "p4"]
SEED_REGIONS = ["L_superiortemporal", "R_precuneus", "L_insula", "L_superiortemporal"]
# A voxel box over the left dorsolateral prefrontal cortex, x axis flipped (as in MNI templates).
BOX_AFFINE = np.array([[-2.0, 0, 0, -30], [0, 2.0, 0, 14], [0, 0, 2.0, 38], [0, 0, 0, 1]])
BOX_SHAPE = (10, 12, 10)


@pytest.fixture(scope="module")
def surface_analysis(tmp_path_factory):
    """Networks of 4 region seeds in 6 simulated fsaverage5 subjects, saved and loaded back."""
    folder = tmp_path_factory.mktemp("surface")
    store = ConnectomeStore.create(folder / "connectome", dtype="float32")
    for subject_id, timeseries in simulate_connectome_subjects(n_subjects=6, n_timepoints=60, seed=0):
        store.add_subject(subject_id, timeseries)
    atlas = dk_atlas()
    names = list(atlas.names)
    seeds = np.array([atlas.labels == names.index(region) + 1 for region in SEED_REGIONS], dtype=float)
    seeds[3, :5000] = 0  # p4: part of p1's seed, so that the two networks overlap without being equal
    analysis = analyse_networks(store, seeds, PATIENTS, n_null=20, seed=0, engine="numpy")
    analysis.save(folder / "results", grid=store.mask())
    return {"analysis": analysis, "folder": folder / "results", "loaded": NetworkAnalysis.load(folder / "results")}


@pytest.fixture(scope="module")
def volume_analysis(tmp_path_factory):
    """Networks of 3 seeds in a 5-subject MNI152-2mm connectome on a box of voxels."""
    folder = tmp_path_factory.mktemp("volume")
    mask = np.ones(BOX_SHAPE, np.uint8)
    mask[0, 0, 0] = 0  # one voxel outside the mask: nodes are the mask voxels, not the box
    store = ConnectomeStore.create(folder / "connectome", space="MNI152-2mm", dtype="float32",
                                   mask_img=nib.Nifti1Image(mask, BOX_AFFINE))
    rng = np.random.default_rng(0)
    coordinates = store.coordinates()
    centres = np.array([[-40, 20, 45], [-35, 30, 52], [-45, 34, 42]])
    loadings = np.exp(-((coordinates[None] - centres[:, None]) ** 2).sum(-1) / 200)
    for subject in range(5):
        store.add_subject(f"s{subject}", rng.standard_normal((40, 3)) @ loadings
                          + 0.5 * rng.standard_normal((40, store.n_nodes)))
    vertices = fsaverage5_coordinates()
    seeds = np.array([np.linalg.norm(vertices - c, axis=1) < 8 for c in ([-40, 22, 46], [-38, 32, 50])], float)
    analysis = analyse_networks(store, seeds, ["m1", "m2"], targets=[user_target("box", (-38, 26, 48), 6)],
                                n_null=20, seed=0, engine="numpy")
    analysis.save(folder / "results", grid=store.mask())
    return {"analysis": analysis, "grid": store.mask(), "folder": folder / "results"}


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def _node_ids(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _at_mask(volume_node, mask):
    """A volume's voxels at the mask, in node order (C order of the mask)."""
    return mrml.array_from_volume(volume_node).transpose(2, 1, 0)[mask]


# --------------------------------------------------------------------------- networks
def test_show_network_puts_the_t_map_and_network_on_the_surface(scene, surface_analysis):
    analysis = surface_analysis["analysis"]
    k = PATIENTS.index("p2")
    t = analysis.maps.t[k].astype(np.float64)
    signed = analysis.networks.signed()[k]
    assert 0 < np.count_nonzero(signed) < 20484  # a network to show, and cortex outside it

    nodes = ns.show_network(scene, analysis, "p2")

    model = nodes["node"]
    assert model.GetName() == "p2 atrophy network"
    vertices, faces = mrml.mesh_from_model(model)
    inflated = load_fsaverage5("inflated")
    np.testing.assert_allclose(vertices, inflated.vertices)
    np.testing.assert_array_equal(faces, inflated.faces)
    np.testing.assert_array_equal(mrml.array_from_model_scalars(model, "t"), t)  # NaN where no signal
    np.testing.assert_array_equal(mrml.array_from_model_scalars(model, "mean_z"), analysis.maps.mean_z[k])
    np.testing.assert_array_equal(mrml.array_from_model_scalars(model, "network"), signed)
    shown = mrml.array_from_model_scalars(model, "network_t")
    np.testing.assert_array_equal(shown[signed != 0], t[signed != 0])
    assert np.all(shown[signed == 0] == 0)
    assert np.all(np.abs(shown[signed != 0]) > analysis.networks.threshold)

    display = model.GetDisplayNode()
    assert display.GetActiveScalarName() == "network_t"
    assert display.GetColorNodeID() == nodes["color_table"].GetID()
    assert nodes["color_table"].GetName() == "NeuroAtrophy diverging"
    low, high = display.GetScalarRange()
    assert low == -high and high >= analysis.networks.threshold + 1
    assert model.GetAttribute(ns.ATTRIBUTE_SUBJECT) == "p2"
    assert float(model.GetAttribute(ns.ATTRIBUTE_THRESHOLD)) == analysis.networks.threshold


def test_a_loaded_analysis_shows_the_same_network(scene, surface_analysis):
    model = ns.show_network(scene, surface_analysis["loaded"], "p1", surface_kind="pial")["node"]

    np.testing.assert_array_equal(mrml.array_from_model_scalars(model, "t"), surface_analysis["analysis"].maps.t[0])
    np.testing.assert_array_equal(mrml.mesh_from_model(model)[0], load_fsaverage5("pial").vertices)


def test_replace_switches_the_patient_and_removes_the_old_nodes(scene, surface_analysis):
    analysis = surface_analysis["analysis"]
    first = ns.show_network(scene, analysis, "p1")
    before = _node_ids(scene)

    second = ns.show_network(scene, analysis, "p3", replace=first)

    assert not scene.IsNodePresent(first["node"])
    assert scene.IsNodePresent(second["color_table"]) and second["color_table"] is first["color_table"]
    # The old model and its display node went, the new ones came: nothing left behind.
    assert len(_node_ids(scene)) == len(before)
    np.testing.assert_array_equal(mrml.array_from_model_scalars(second["node"], "network"),
                                  analysis.networks.signed()[2])


def test_show_network_on_a_volume_connectome_round_trips_the_values(scene, volume_analysis):
    analysis, (mask, affine) = volume_analysis["analysis"], volume_analysis["grid"]
    t = analysis.maps.t[1].astype(np.float64)
    signed = analysis.networks.signed()[1]
    assert np.any(signed != 0)

    nodes = ns.show_network(scene, analysis, "m2")  # grid read from the connectome the analysis records

    volume, t_volume = nodes["node"], nodes["t_volume"]
    assert volume.GetName() == "m2 atrophy network" and t_volume.GetName() == "m2 t-map"
    assert volume.IsA("vtkMRMLScalarVolumeNode")
    np.testing.assert_array_equal(mrml.ijk_to_ras_from_volume(volume), affine)
    assert mrml.array_from_volume(volume).shape == BOX_SHAPE[::-1]
    np.testing.assert_allclose(_at_mask(t_volume, mask), np.nan_to_num(t), rtol=1e-6)
    np.testing.assert_allclose(_at_mask(volume, mask), np.where(signed != 0, t, 0.0), rtol=1e-6)
    assert mrml.array_from_volume(volume)[0, 0, 0] == 0  # the voxel outside the mask
    for node in (volume, t_volume):
        display = node.GetDisplayNode()
        assert display.GetColorNodeID() == nodes["color_table"].GetID()
        assert not display.GetAutoWindowLevel()
        low, high = display.GetWindowLevelMin(), display.GetWindowLevelMax()
        assert low == pytest.approx(-high) and high >= analysis.networks.threshold + 1
    assert volume.GetAttribute(ns.ATTRIBUTE_T_VOLUME) == t_volume.GetID()

    # The same voxels as the NIfTI file the analysis wrote.
    written = np.asarray(nib.load(volume_analysis["folder"] / "maps" / "m2_t.nii.gz").dataobj)
    np.testing.assert_allclose(mrml.array_from_volume(t_volume).transpose(2, 1, 0), written, rtol=1e-6)


def test_network_errors_leave_the_scene_unchanged(scene, surface_analysis, volume_analysis):
    before = _node_ids(scene)
    with pytest.raises(ValueError, match=r"Patient 'nobody' is not in this network analysis; patients: p1, p2"):
        ns.show_network(scene, surface_analysis["analysis"], "nobody")
    with pytest.raises(ValueError, match="surface_kind must be one of"):
        ns.show_network(scene, surface_analysis["analysis"], "p1", surface_kind="sphere")
    wrong_grid = (np.ones((3, 3, 3), bool), BOX_AFFINE)
    with pytest.raises(ValueError, match=r"grid mask must be 3-D with one voxel per node \(1199\)"):
        ns.show_network(scene, volume_analysis["analysis"], "m1", grid=wrong_grid)
    assert _node_ids(scene) == before  # not even the color table was left behind


def test_network_summary_table(scene, surface_analysis):
    analysis = surface_analysis["loaded"]

    table = mrml.dataframe_from_table(ns.show_network_summary(scene, analysis))

    assert list(table["subject_id"]) == PATIENTS
    np.testing.assert_array_equal(table["n_positive"], analysis.networks.positive.sum(axis=1))
    np.testing.assert_allclose(table["specificity_positive"], analysis.summary["specificity_positive"])


# --------------------------------------------------------------------------- convergence
def test_show_convergence_thresholds_the_map_and_tabulates_regions(scene, surface_analysis):
    analysis = surface_analysis["analysis"]
    percent = analysis.convergence_positive
    assert percent.max() == 50.0  # p1 and p4 share part of their networks

    nodes = ns.show_convergence(scene, analysis, "positive", fraction=0.5)

    model = nodes["node"]
    assert model.GetName() == "Convergence (positive networks)"
    np.testing.assert_array_equal(mrml.array_from_model_scalars(model, "convergence"), percent)
    shown = mrml.array_from_model_scalars(model, "convergent")
    np.testing.assert_array_equal(shown, np.where(percent >= 50, percent, 0))
    assert np.count_nonzero(shown) > 0
    display = model.GetDisplayNode()
    assert display.GetActiveScalarName() == "convergent"
    assert display.GetColorNodeID() == nodes["color_table"].GetID()
    assert nodes["color_table"].GetName() == "NeuroAtrophy sequential"
    assert display.GetScalarRange() == (0.0, 100.0)
    regions = mrml.dataframe_from_table(nodes["regions_table"])
    expected = analysis.convergent_regions(0.5, "positive")
    assert list(regions["region"]) == list(expected["region"])
    np.testing.assert_allclose(regions["convergent_fraction"], expected["convergent_fraction"])

    changed = ns.update_convergence_fraction(model, 0.25)

    np.testing.assert_array_equal(mrml.array_from_model_scalars(model, "convergent"),
                                  np.where(percent >= 25, percent, 0))
    expected = analysis.convergent_regions(0.25, "positive")
    regions = mrml.dataframe_from_table(nodes["regions_table"])
    np.testing.assert_allclose(regions["convergent_fraction"], expected["convergent_fraction"])
    pd.testing.assert_frame_equal(changed, expected)
    assert float(model.GetAttribute(ns.ATTRIBUTE_FRACTION)) == 0.25


def test_specific_convergence_of_a_loaded_analysis_is_read_from_its_folder(scene, surface_analysis):
    analysis, loaded = surface_analysis["analysis"], surface_analysis["loaded"]
    expected = analysis.specific_convergence("negative")
    np.testing.assert_array_equal(loaded.specific_convergence("negative"), expected)
    # A folder without the specificity masks (an analysis saved before they were stored): read the maps.
    loaded.specific_positive = loaded.specific_negative = None
    with pytest.raises(ValueError, match="holds no specificity-filtered convergence"):
        ns.convergence_values(loaded, "negative", specific=True)
    nodes = ns.show_convergence(scene, loaded, "negative", specific=True, folder=surface_analysis["folder"])

    assert nodes["node"].GetName() == "Convergence (specific negative networks)"
    np.testing.assert_allclose(mrml.array_from_model_scalars(nodes["node"], "convergence"), expected, atol=1e-4)
    np.testing.assert_array_equal(ns.convergence_values(analysis, "negative", specific=True), expected)


def test_convergence_on_a_volume_hides_voxels_below_the_fraction(scene, volume_analysis):
    analysis, (mask, _) = volume_analysis["analysis"], volume_analysis["grid"]

    nodes = ns.show_convergence(scene, analysis, "positive", fraction=1.0)

    volume = nodes["node"]
    assert nodes["regions_table"] is None
    np.testing.assert_allclose(_at_mask(volume, mask), analysis.convergence_positive)
    display = volume.GetDisplayNode()
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(100.0)
    assert display.GetLowerThreshold() <= 100.0  # nodes at exactly 100 % stay visible
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 100.0)

    assert ns.update_convergence_fraction(volume, 0.5) is None
    assert display.GetLowerThreshold() == pytest.approx(50.0)


def test_convergence_errors(scene, surface_analysis, volume_analysis):
    before = _node_ids(scene)
    with pytest.raises(ValueError, match=r"sign must be one of \['positive', 'negative'\]"):
        ns.show_convergence(scene, surface_analysis["analysis"], "both")
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 0"):
        ns.show_convergence(scene, surface_analysis["analysis"], fraction=0)
    without_masks = NetworkAnalysis.load(volume_analysis["folder"])
    without_masks.specific_positive = without_masks.specific_negative = None
    with pytest.raises(ValueError, match="missing .*specific_convergence_positive.nii.gz"):
        ns.convergence_values(without_masks, specific=True, folder=volume_analysis["folder"].parent)
    assert _node_ids(scene) == before
    network = ns.show_network(scene, surface_analysis["analysis"], "p1")["node"]
    with pytest.raises(ValueError, match="is not a convergence map made by show_convergence"):
        ns.update_convergence_fraction(network, 0.5)


# --------------------------------------------------------------------------- targets
def test_show_targets_places_labelled_points_at_the_target_centres(scene):
    targets = standard_targets() + [user_target("mine", (-30.5, 40, 20), radius_mm=6)]

    nodes = ns.show_targets(scene, targets)

    markups = nodes["markups"]
    assert markups.IsA("vtkMRMLMarkupsFiducialNode") and markups.GetName() == "rTMS targets"
    points, labels = mrml.points_from_markups(markups)
    np.testing.assert_allclose(points, [t.mni for t in targets])
    assert labels == [t.name for t in targets]
    assert markups.GetLocked()
    assert markups.GetNthControlPointDescription(len(targets) - 1) == "6 mm sphere; user target"
    table = mrml.dataframe_from_table(nodes["table"])
    assert list(table["name"]) == labels
    np.testing.assert_allclose(table[["x", "y", "z"]], [t.mni for t in targets])

    # Targets from the analysis's table replace the earlier ones.
    again = ns.show_targets(scene, targets_table(targets[:2]), replace=nodes)
    assert not scene.IsNodePresent(markups) and not scene.IsNodePresent(nodes["table"])
    assert mrml.points_from_markups(again["markups"])[1] == [t.name for t in targets[:2]]


def test_user_targets_from_markups_and_a_table(scene, tmp_path):
    placed = mrml.add_markups_points(scene, [[-40.0, 30, 40], [10, 20, -5]], ["left", "right"], "my targets")
    csv = tmp_path / "targets.csv"
    pd.DataFrame({"name": ["tablet"], "x": [5.0], "y": [-50.0], "z": [30.0], "radius_mm": [8.0]}).to_csv(csv)

    from_markups = ns.targets_from_markups(placed, radius_mm=7)
    combined = ns.network_targets(markups=placed, table=csv)

    assert [(t.name, t.mni, t.radius_mm, t.kind) for t in from_markups] == [
        ("left", (-40.0, 30.0, 40.0), 7.0, "user"), ("right", (10.0, 20.0, -5.0), 7.0, "user")]
    assert [t.name for t in combined] == [t.name for t in standard_targets()] + ["left", "right", "tablet"]
    assert combined[-1].radius_mm == 8.0 and combined[0].kind == "standard"
    assert [t.name for t in ns.network_targets(table=csv, standard=False)] == ["tablet"]
    clash = mrml.add_markups_points(scene, [[0.0, 0, 0]], ["sgACC"], "clash")
    with pytest.raises(ValueError, match="Duplicate target names .*sgACC"):
        ns.network_targets(markups=clash)
    with pytest.raises(ValueError, match="No targets"):
        ns.network_targets(standard=False)


def test_target_connectivity_table(scene, surface_analysis):
    analysis = surface_analysis["loaded"]

    table = mrml.dataframe_from_table(ns.show_target_connectivity(scene, analysis))
    roi = mrml.dataframe_from_table(ns.show_target_connectivity(scene, analysis, method="roi"))

    assert list(table.columns) == ["subject_id"] + [t.name for t in standard_targets()]
    assert list(table["subject_id"]) == PATIENTS
    np.testing.assert_allclose(table.iloc[:, 1:], analysis.target_connectivity.to_numpy())
    np.testing.assert_allclose(roi.iloc[:, 1:], analysis.target_connectivity_roi.to_numpy())


# --------------------------------------------------------------------------- outcome
@pytest.fixture(scope="module")
def outcome_data(surface_analysis):
    connectivity = surface_analysis["analysis"].target_connectivity
    cohort = pd.DataFrame({"subject_id": PATIENTS, "change": [-10.0, -4.0, -12.0, 1.0],
                           "age": [30.0, 50.0, 41.0, 65.0]})
    results = target_outcome_analysis(connectivity, cohort, "change", n_permutations=200, seed=1)
    return connectivity, cohort.set_index("subject_id")["change"], results


def test_outcome_results_and_scatter_plot_with_fitted_line(scene, outcome_data):
    connectivity, outcome, results = outcome_data

    table = mrml.dataframe_from_table(ns.show_outcome_results(scene, results))
    chart = ns.show_outcome_plot(scene, connectivity, outcome, "DLPFC_F3", results=results)

    assert list(table["target"]) == list(connectivity.columns)
    np.testing.assert_allclose(table["r"], results["r"])
    np.testing.assert_allclose(table["p_permutation"], results["p_permutation"])
    assert chart.GetName() == "DLPFC_F3 vs change"
    row = results.set_index("target").loc["DLPFC_F3"]
    assert chart.GetTitle() == f"DLPFC_F3 vs change: r = {row['r']:+.2f}, permutation p = {row['p_permutation']:.3g}"
    series = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
    assert [s.GetName() for s in series] == ["Patients", "Least-squares fit", "Lower 95 % band", "Upper 95 % band"]
    assert series[0].GetPlotType() == series[0].PlotTypeScatter
    assert all(s.GetPlotType() == s.PlotTypeLine for s in series[1:])
    points = mrml.dataframe_from_table(scene.GetNodeByID(series[0].GetTableNodeID()))
    assert list(points["subject_id"]) == PATIENTS
    np.testing.assert_allclose(points["connectivity"], connectivity["DLPFC_F3"])
    np.testing.assert_allclose(points["outcome"], outcome.to_numpy())
    fit = mrml.dataframe_from_table(scene.GetNodeByID(series[1].GetTableNodeID()))
    slope, intercept = np.polyfit(connectivity["DLPFC_F3"], outcome.to_numpy(), 1)
    np.testing.assert_allclose(fit["fit"], intercept + slope * fit["connectivity"])
    assert np.all(fit["lower"] < fit["fit"]) and np.all(fit["fit"] < fit["upper"])
    assert fit["connectivity"].min() == pytest.approx(connectivity["DLPFC_F3"].min())


def test_outcome_plot_errors_leave_the_scene_unchanged(scene, outcome_data):
    connectivity, outcome, _ = outcome_data
    before = _node_ids(scene)
    with pytest.raises(ValueError, match=r"target 'M1' is not a column of the connectivity table"):
        ns.show_outcome_plot(scene, connectivity, outcome, "M1")
    with pytest.raises(ValueError, match="No outcome for subject.*p4"):
        ns.show_outcome_plot(scene, connectivity, outcome.drop("p4"), "sgACC")
    with pytest.raises(ValueError, match="Outcome is missing or not a number for p2"):
        ns.show_outcome_plot(scene, connectivity, outcome.replace(-4.0, np.nan), "sgACC")
    with pytest.raises(ValueError, match="with a 'target' column"):
        ns.show_outcome_results(scene, connectivity)
    assert _node_ids(scene) == before


# --------------------------------------------------------------------------- mrml bridges
def test_add_plot_series_from_another_table_and_its_errors(scene):
    data = mrml.table_from_dataframe(scene, pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": [2.0, 1.0, 4.0]}), "data")
    grid = mrml.table_from_dataframe(scene, pd.DataFrame({"u": [1.0, 3.0], "v": [1.0, 3.0], "s": ["a", "b"]}), "grid")
    chart = mrml.add_plot(scene, data, "x", "y", "chart", plot_type="Scatter")

    series = mrml.add_plot_series(scene, chart, grid, "u", "v", "line", line_style="dash", color=(1.0, 0.0, 0.0))

    assert chart.GetNumberOfPlotSeriesNodes() == 2 and chart.GetNthPlotSeriesNode(1) is series
    assert series.GetTableNodeID() == grid.GetID() and series.GetYColumnName() == "v"
    assert series.GetPlotType() == series.PlotTypeLine and series.GetLineStyle() == series.LineStyleDash
    assert series.GetColor() == (1.0, 0.0, 0.0)
    before = _node_ids(scene)
    with pytest.raises(ValueError, match="y_column: column 's' is not numeric"):
        mrml.add_plot_series(scene, chart, grid, "u", "s", "text")
    with pytest.raises(ValueError, match="marker_styles: unknown style 'star'"):
        mrml.add_plot_series(scene, chart, grid, "u", "v", "star", marker_style="star")
    assert _node_ids(scene) == before and chart.GetNumberOfPlotSeriesNodes() == 2


def test_set_volume_display_and_remove_nodes(scene):
    volume = mrml.add_volume(scene, np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.eye(4), "v")
    colors = mrml.sequential_color_table(scene)

    mrml.set_volume_display(volume, colors, (-1.0, 5.0), lower_threshold=2.0)

    display = volume.GetDisplayNode()
    assert display.GetColorNodeID() == colors.GetID()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (-1.0, 5.0)
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == 2.0
    mrml.set_volume_display(volume)
    assert not display.GetApplyThreshold() and display.GetColorNodeID() == colors.GetID()
    with pytest.raises(ValueError, match="value_range must be finite"):
        mrml.set_volume_display(volume, value_range=(5.0, -1.0))

    model = mrml.add_surface_model(scene, np.eye(3), [[0, 1, 2]], "m", scalars={"a": [1.0, 2.0, 3.0]})
    mrml.remove_nodes(scene, [volume, model, colors, None])

    remaining = {scene.GetNthNode(i).GetClassName() for i in range(scene.GetNumberOfNodes())}
    assert remaining == {"vtkMRMLColorTableNode"}  # display nodes went with their nodes; colors are shared
