"""Brain-progression forecasts in a real (slicer-core) MRML scene: sequences over age, table, chart, rollback."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import slicer

from neuroatrophy import mrml
from neuroatrophy.progression_covariates import REGIONS
from neuroatrophy.progression_scene import (
    add_volume_sequence,
    load_forecast,
    parse_target_ages,
    predict_arguments,
    read_forecast,
    remove_forecast_nodes,
    weights_problem,
)

# BrLP's output affine (MNI152, 1.5 mm) on a small grid.
MNI_AFFINE = np.array([[-1.5, 0, 0, 90], [0, 1.5, 0, -126], [0, 0, 1.5, -72], [0, 0, 0, 1]])
NATIVE_AFFINE = np.array([[1.0, 0, 0, -10], [0, 1.0, 0, -12], [0, 0, 1.2, -8], [0, 0, 0, 1]])
SHAPE = (6, 7, 5)
AGES = [72.0, 74.0, 76.5]


def _image(age, kind):
    """Voxel values that identify the kind and the age (and vary over the grid)."""
    ramp = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) / 1000.0
    offset = {"predicted": 1.0, "uncertainty": 0.01, "difference": -0.1}[kind]
    return (offset * age + ramp).astype(np.float32)


def _volumes():
    rows = []
    for index, age in enumerate(AGES):
        row = {"target_age": age, "source": "dcm"}
        for r, region in enumerate(REGIONS):
            row[region] = 1000.0 * (r + 1) - 10.0 * index * (r + 1)
        rows.append(row)
    return pd.DataFrame(rows)[["target_age", *REGIONS, "source"]]


def write_forecast(folder, native=False, listed=True, ages=AGES):
    """A forecast folder as ``neuroatrophy progression predict`` writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"baseline": "baseline_mni.nii.gz", "volumes": "volumes.csv", "predicted": {}, "uncertainty": {},
             "difference": {}}
    nib.save(nib.Nifti1Image(_image(70.0, "predicted"), MNI_AFFINE), folder / "baseline_mni.nii.gz")
    for age in ages:
        key = f"{age:.1f}"
        for kind in ("predicted", "uncertainty", "difference"):
            name = f"{kind}_{key}.nii.gz"
            nib.save(nib.Nifti1Image(_image(age, kind), MNI_AFFINE), folder / name)
            files[kind][key] = name
        if native:
            name = f"predicted_{key}_native.nii.gz"
            data = np.full((4, 5, 3), age, dtype=np.float32)
            nib.save(nib.Nifti1Image(data, NATIVE_AFFINE), folder / name)
            files.setdefault("native", {})[key] = name
    _volumes().to_csv(folder / "volumes.csv", index=False)
    description = {"format_version": 1, "target_ages": list(ages), "baseline_age": 70.0, "m": 2, "ddim_steps": 3,
                   "global_uncertainty": [0.01 * (i + 1) for i in range(len(ages))]}
    if listed:
        description["files"] = files
    (folder / "forecast.json").write_text(json.dumps(description), encoding="utf-8")
    return folder


def _node_ids(scene):
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def _kji(data):
    return data.transpose(2, 1, 0)


@pytest.mark.parametrize("listed", [True, False], ids=["files-listed", "file-patterns"])
def test_forecast_sequence_has_one_item_per_target_age(tmp_path, listed):
    folder = write_forecast(tmp_path / "forecast", listed=listed)
    scene = mrml.new_scene()
    nodes = load_forecast(scene, folder, name="Sub-01")

    for kind in ("predicted", "uncertainty", "difference"):
        sequence = nodes[f"{kind}_sequence"]
        assert sequence.GetIndexName() == "age" and sequence.GetIndexUnit() == "years"
        assert sequence.GetNumberOfDataNodes() == 3
        assert [sequence.GetNthIndexValue(i) for i in range(3)] == ["72.0", "74.0", "76.5"]
        for i, age in enumerate(AGES):
            item = sequence.GetNthDataNode(i)
            np.testing.assert_allclose(mrml.array_from_volume(item), _kji(_image(age, kind)), rtol=1e-6)
            np.testing.assert_allclose(mrml.ijk_to_ras_from_volume(item), MNI_AFFINE)
    assert "native_sequence" not in nodes
    # One browser scrubs every sequence.
    browser = nodes["browser"]
    assert browser.GetName() == "Sub-01 browser"
    assert browser.GetMasterSequenceNode() is nodes["predicted_sequence"]
    assert browser.IsSynchronizedSequenceNode(nodes["difference_sequence"].GetID())
    assert browser.IsSynchronizedSequenceNode(nodes["uncertainty_sequence"].GetID())
    # The baseline and one volume per age in the scene, on BrLP's MNI grid.
    np.testing.assert_allclose(mrml.array_from_volume(nodes["baseline_volume"]), _kji(_image(70.0, "predicted")))
    assert [v.GetName() for v in nodes["predicted_volumes"]] == [
        "Sub-01 predicted 72.0", "Sub-01 predicted 74.0", "Sub-01 predicted 76.5"]
    np.testing.assert_allclose(mrml.array_from_volume(nodes["predicted_volumes"][2]), _kji(_image(76.5, "predicted")))
    np.testing.assert_allclose(mrml.ijk_to_ras_from_volume(nodes["predicted_volumes"][0]), MNI_AFFINE)
    assert json.loads(nodes["predicted_sequence"].GetAttribute("NeuroAtrophy.Forecast.GlobalUncertainty")) == \
        pytest.approx([0.01, 0.02, 0.03])


def test_difference_maps_use_a_symmetric_diverging_colour_scale(tmp_path):
    scene = mrml.new_scene()
    nodes = load_forecast(scene, write_forecast(tmp_path / "f"))
    display = nodes["difference_proxy"].GetDisplayNode()
    assert scene.GetNodeByID(display.GetColorNodeID()).GetName() == "NeuroAtrophy diverging"
    bound = max(abs(_image(a, "difference")).max() for a in AGES)
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((-bound, bound), rel=1e-5)
    unc = nodes["uncertainty_proxy"].GetDisplayNode()
    assert scene.GetNodeByID(unc.GetColorNodeID()).GetName() == "NeuroAtrophy sequential"
    assert unc.GetWindowLevelMin() == 0.0


def test_volumes_table_and_chart_one_series_per_region(tmp_path):
    scene = mrml.new_scene()
    nodes = load_forecast(scene, write_forecast(tmp_path / "f"), name="F")
    table = mrml.dataframe_from_table(nodes["volumes_table"])
    expected = _volumes()
    assert list(table.columns) == list(expected.columns)
    np.testing.assert_allclose(table["target_age"], AGES)
    np.testing.assert_allclose(table[list(REGIONS)].to_numpy(), expected[list(REGIONS)].to_numpy())
    assert list(table["source"]) == ["dcm"] * 3
    assert nodes["volumes_table"].GetColumnUnitLabel("hippocampus") == "mm3"

    chart = nodes["volumes_chart"]
    assert chart.GetNumberOfPlotSeriesNodes() == len(REGIONS)
    series = [chart.GetNthPlotSeriesNode(i) for i in range(len(REGIONS))]
    assert [s.GetName() for s in series] == ["Cerebral cortex", "Hippocampus", "Amygdala", "Cerebral white matter",
                                             "Lateral ventricles"]
    assert [(s.GetXColumnName(), s.GetYColumnName()) for s in series] == [("target_age", r) for r in REGIONS]
    assert all(s.GetTableNode() is nodes["volumes_table"] for s in series)
    assert chart.GetXAxisTitle() == "Age (years)"


def test_native_predictions_go_into_a_native_sequence(tmp_path):
    scene = mrml.new_scene()
    nodes = load_forecast(scene, write_forecast(tmp_path / "f", native=True))
    sequence = nodes["native_sequence"]
    assert sequence.GetNumberOfDataNodes() == 3
    for i, age in enumerate(AGES):
        item = sequence.GetNthDataNode(i)
        assert mrml.array_from_volume(item).shape == (3, 5, 4)
        assert float(mrml.array_from_volume(item).mean()) == pytest.approx(age)
        np.testing.assert_allclose(mrml.ijk_to_ras_from_volume(item), NATIVE_AFFINE)
    assert nodes["browser"].IsSynchronizedSequenceNode(sequence.GetID())


def test_with_the_sequences_logic_every_proxy_follows_the_browser(tmp_path):
    scene = mrml.new_scene()
    logic = slicer.vtkSlicerSequencesLogic()
    logic.SetMRMLScene(scene)
    nodes = load_forecast(scene, write_forecast(tmp_path / "f", native=True))
    browser = nodes["browser"]
    colour = nodes["difference_proxy"].GetDisplayNode().GetColorNodeID()
    for index in (2, 0, 1):
        browser.SetSelectedItemNumber(index)
        age = AGES[index]
        np.testing.assert_allclose(mrml.array_from_volume(nodes["predicted_proxy"]), _kji(_image(age, "predicted")))
        np.testing.assert_allclose(mrml.array_from_volume(nodes["difference_proxy"]), _kji(_image(age, "difference")))
        assert float(mrml.array_from_volume(nodes["native_proxy"]).mean()) == pytest.approx(age)
    assert nodes["difference_proxy"].GetDisplayNode().GetColorNodeID() == colour


def test_read_forecast_sorts_ages_and_resolves_listed_names(tmp_path):
    folder = write_forecast(tmp_path / "f", ages=[76.0, 72.0])
    info = read_forecast(folder)
    assert info["target_ages"] == [72.0, 76.0]
    assert [p.name for p in info["predicted"]] == ["predicted_72.0.nii.gz", "predicted_76.0.nii.gz"]
    assert info["native"] is None and info["baseline_age"] == 70.0


def test_a_broken_folder_names_the_file_and_leaves_the_scene_unchanged(tmp_path):
    scene = mrml.new_scene()
    load_forecast(scene, write_forecast(tmp_path / "good"), name="Earlier")
    before = _node_ids(scene)

    missing = write_forecast(tmp_path / "missing")
    (missing / "difference_74.0.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"difference_74\.0\.nii\.gz is missing"):
        load_forecast(scene, missing)
    assert _node_ids(scene) == before

    unlisted = write_forecast(tmp_path / "unlisted", listed=False)
    (unlisted / "uncertainty_76.5.nii.gz").unlink()  # some ages only: incomplete
    with pytest.raises(ValueError, match=r"uncertainty_76\.5\.nii\.gz is missing"):
        load_forecast(scene, unlisted)
    assert _node_ids(scene) == before

    no_table = write_forecast(tmp_path / "no-table")
    (no_table / "volumes.csv").unlink()
    with pytest.raises(ValueError, match=r"volumes\.csv is missing"):
        load_forecast(scene, no_table)

    bad_table = write_forecast(tmp_path / "bad-table")
    _volumes().drop(columns="amygdala").to_csv(bad_table / "volumes.csv", index=False)
    with pytest.raises(ValueError, match=r"volumes\.csv lacks column\(s\) \['amygdala'\]"):
        load_forecast(scene, bad_table)

    wrong_grid = write_forecast(tmp_path / "grid")
    nib.save(nib.Nifti1Image(_image(74.0, "predicted"), NATIVE_AFFINE), wrong_grid / "predicted_74.0.nii.gz")
    with pytest.raises(ValueError, match=r"predicted_74\.0\.nii\.gz is not on the grid of the baseline"):
        load_forecast(scene, wrong_grid)

    no_json = write_forecast(tmp_path / "no-json")
    (no_json / "forecast.json").unlink()
    with pytest.raises(ValueError, match=r"forecast\.json is missing"):
        load_forecast(scene, no_json)

    newer = write_forecast(tmp_path / "newer")
    description = json.loads((newer / "forecast.json").read_text())
    description["format_version"] = 2
    (newer / "forecast.json").write_text(json.dumps(description))
    with pytest.raises(ValueError, match="format_version 2"):
        load_forecast(scene, newer)
    assert _node_ids(scene) == before

    with pytest.raises(FileNotFoundError, match="forecast folder not found"):
        load_forecast(scene, tmp_path / "nowhere")


def test_failure_after_nodes_were_added_rolls_them_back(tmp_path):
    """A valid folder whose last step fails (a sheared grid) leaves nothing behind."""
    folder = write_forecast(tmp_path / "f")
    sheared = MNI_AFFINE.copy()
    sheared[0, 1] = 0.5
    for name in ["baseline_mni.nii.gz"] + [f"{k}_{a:.1f}.nii.gz" for k in ("predicted", "uncertainty", "difference")
                                           for a in AGES]:
        image = nib.load(folder / name)
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), sheared), folder / name)
    scene = mrml.new_scene()
    before = _node_ids(scene)
    with pytest.raises(ValueError, match="no shear"):
        load_forecast(scene, folder)
    assert _node_ids(scene) == before


def test_remove_forecast_nodes_takes_everything_but_colour_tables(tmp_path):
    scene = mrml.new_scene()
    before = scene.GetNumberOfNodes()
    nodes = load_forecast(scene, write_forecast(tmp_path / "f", native=True))
    remove_forecast_nodes(scene, nodes)
    left = [scene.GetNthNode(i) for i in range(before, scene.GetNumberOfNodes())]
    assert {node.GetClassName() for node in left} == {"vtkMRMLColorTableNode"}


def test_add_volume_sequence_from_nodes_and_arrays():
    scene = mrml.new_scene()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    node = mrml.add_volume(scene, np.full((2, 3, 4), 5, np.int16), affine, "five")
    sequence, browser, proxy = add_volume_sequence(scene, [(np.zeros((2, 3, 4)), affine), node], [1, 0.5], "s",
                                                   index_name="time", index_unit="s")
    assert [sequence.GetNthIndexValue(i) for i in range(2)] == ["0.5", "1.0"]
    assert mrml.array_from_volume(sequence.GetNthDataNode(0)).max() == 5
    assert mrml.array_from_volume(proxy).max() == 5  # the first index value
    other, same_browser, _ = add_volume_sequence(scene, [node, node], [0.5, 1], "t", browser_node=browser)
    assert same_browser is browser and browser.IsSynchronizedSequenceNode(other.GetID())
    before = _node_ids(scene)
    with pytest.raises(ValueError, match="unique"):
        add_volume_sequence(scene, [node, node], [1, 1.0], "u")
    with pytest.raises(ValueError, match="same length"):
        add_volume_sequence(scene, [node], [1, 2], "u")
    with pytest.raises(ValueError, match="finite numbers"):
        add_volume_sequence(scene, [node], ["early"], "u")
    assert _node_ids(scene) == before


def test_parse_target_ages():
    assert parse_target_ages("72, 74 ;76", baseline_age=70) == [72.0, 74.0, 76.0]
    assert parse_target_ages("76 72 72.0") == [72.0, 76.0]
    with pytest.raises(ValueError, match="'7x' is not a number"):
        parse_target_ages("72, 7x")
    with pytest.raises(ValueError, match="69.0 is not after the baseline age 70.0"):
        parse_target_ages("69, 72", baseline_age=70)
    with pytest.raises(ValueError, match="at least one age"):
        parse_target_ages(" , ")
    with pytest.raises(ValueError, match="'720' is not an age"):
        parse_target_ages("720")


def test_predict_arguments():
    args = predict_arguments("t1.nii.gz", 70, "f", "mci", "74, 72", "weights", "out", labels="aseg.nii.gz",
                             m=4, steps=25, device="cpu")
    assert args == ["progression", "predict", "--t1", "t1.nii.gz", "--age", "70.0", "--sex", "F", "--diagnosis",
                    "MCI", "--target-ages", "72.0", "74.0", "--labels", "aseg.nii.gz", "--weights", "weights",
                    "--m", "4", "--steps", "25", "--device", "cpu", "--out", "out"]
    with_visits = predict_arguments("t1", 70.5, "M", "AD", [71], "w", "o", visits="visits.csv", device="cuda")
    assert with_visits[with_visits.index("--visits") + 1] == "visits.csv"
    assert "--labels" not in with_visits and with_visits[with_visits.index("--device") + 1] == "cuda"
    with pytest.raises(ValueError, match="sex must be one of"):
        predict_arguments("t1", 70, "1", "CN", "72", "w", "o")
    with pytest.raises(ValueError, match="weights is not given"):
        predict_arguments("t1", 70, "F", "CN", "72", "", "o")
    with pytest.raises(ValueError, match="m must be a positive integer"):
        predict_arguments("t1", 70, "F", "CN", "72", "w", "o", m=0)
    with pytest.raises(ValueError, match="not after the baseline age"):
        predict_arguments("t1", 73, "F", "CN", "72", "w", "o")


def test_weights_problem_says_what_is_missing_and_how_to_get_it(tmp_path):
    assert "No weights selected" in weights_problem("")
    assert "github.com/LemuelPuglisi/BrLP" in weights_problem(None)
    assert f"Weights not found: {tmp_path / 'nowhere'}" in weights_problem(tmp_path / "nowhere")

    folder = tmp_path / "weights"
    folder.mkdir()
    problem = weights_problem(folder)
    assert "no BrLP weight files" in problem and "docs/progression.md" in problem
    (folder / "autoencoder-ep-5.pth").write_bytes(b"x")
    (folder / "unet-ep-5.pth").write_bytes(b"x")
    problem = weights_problem(folder)
    assert problem.startswith(f"Incomplete weights in {folder}: missing controlnet.")
    (folder / "cnet-ep-5.pth").write_bytes(b"x")
    assert weights_problem(folder) is None

    config = tmp_path / "confs.yaml"
    config.write_text("autoencoder: weights/autoencoder-ep-5.pth\nunet: weights/gone.pth\n"
                      "controlnet: weights/cnet-ep-5.pth\n")
    problem = weights_problem(config)
    assert "missing unet (" in problem and "gone.pth does not exist" in problem
